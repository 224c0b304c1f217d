"""Hold TCP connections across a map change (runs in a client namespace).

``conn_tool.py DST PORT SRC...``: opens one connection per source, prints ``i host``;
then waits for a line on stdin, sends on every connection and prints ``i ok|reset|timeout``.
"""

from __future__ import annotations

import socket
import sys


def main() -> None:
    dst, port, sources = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    conns = []
    for i, src in enumerate(sources):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(3)
        s.bind((src, 0))
        s.connect((dst, port))
        host = s.recv(16).decode().strip()
        conns.append(s)
        print(i, host, flush=True)
    print("ready", flush=True)
    sys.stdin.readline()
    for i, s in enumerate(conns):
        try:
            s.sendall(b"ping\n")
            data = s.recv(16)
            print(i, "ok" if data == b"ping\n" else "reset", flush=True)
        except (ConnectionResetError, BrokenPipeError):
            print(i, "reset", flush=True)
        except TimeoutError:
            print(i, "timeout", flush=True)
        finally:
            s.close()


if __name__ == "__main__":
    main()
