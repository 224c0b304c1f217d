"""systemd's readiness protocol (``Type=notify``), without a library: one datagram per
message to the socket systemd names in ``$NOTIFY_SOCKET``. Outside systemd (no variable)
every call does nothing."""

from __future__ import annotations

import os
import socket


def notify(*lines: str) -> bool:
    """Send ``READY=1``, ``STOPPING=1``, ``STATUS=...``; whether systemd was told."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto("\n".join(lines).encode(), path)
    except OSError:
        return False  # a missing manager must not stop the daemon
    return True
