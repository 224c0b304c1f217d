"""The web view: a read-only page of the whole cluster, served by the daemon on the host's
``web_address`` from a thread of its own (stdlib ``http.server``; the page and its script
are one file in the package, nothing from elsewhere: hosts are often offline).

Routes, GET only: ``/`` the page; ``/api/picture`` the cluster as this host sees it, with
each host's connections; ``/api/maps`` the held epoch's bucket maps; ``/api/local`` this
host's own numbers, which the other hosts' web views ask for. Every answer is made from the
latest published reading (see :mod:`shoal.daemon.reading`), never from the engine.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from shoal.daemon.picture import Local, bucket_maps, local, picture
from shoal.daemon.reading import Board, Reading

FANOUT_MAX = 32  # peers whose numbers a picture asks for; beyond that they show as unknown
PEER_TIMEOUT = 0.3  # seconds a peer has to answer /api/local
PEER_EVERY = 1.0  # seconds the peers' numbers are reused


@functools.cache
def page() -> bytes:
    """The page, read from the package once."""
    return resources.files("shoal.daemon").joinpath("page.html").read_bytes()


class Numbers:
    """Every host's own numbers for a picture: this host's counted here, the others' asked
    of their web views at their dedicated address and this host's web port (none without
    one), all at once, at most once a second. Blocking: called from a serving thread or an
    executor, never on the event loop."""

    def __init__(self, established: Callable[[], dict[str, int]], port: int | None) -> None:
        self.established = established
        self.port = port
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._numbers: dict[int, Local | None] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="web-peers")

    def of(self, r: Reading) -> dict[int, Local | None]:
        out: dict[int, Local | None] = {}
        if self.port is not None:
            peers = r.snapshot.peers
            out.update(self._ask({p.host_id: str(p.dedicated_ip) for p in peers if p.dedicated_ip}))
        out[r.snapshot.host_id] = local(r, self.established())
        return out

    def _ask(self, addresses: dict[int, str]) -> dict[int, Local | None]:
        with self._lock:
            if time.monotonic() - self._at >= PEER_EVERY:
                hosts = sorted(addresses)[:FANOUT_MAX]
                got = self._pool.map(lambda h: self._one(addresses[h]), hosts)
                self._numbers = dict(zip(hosts, got, strict=True))
                self._at = time.monotonic()
            return dict(self._numbers)

    def _one(self, address: str) -> Local | None:
        host = f"[{address}]" if ":" in address else address
        try:
            with urllib.request.urlopen(
                f"http://{host}:{self.port}/api/local", timeout=PEER_TIMEOUT
            ) as res:
                doc = json.loads(res.read(65536))
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict) or not isinstance(doc.get("connections"), dict):
            return None
        return {"connections": doc["connections"], "accepted": doc.get("accepted") or {}}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class Web:
    """The web view's HTTP server and what it answers from."""

    def __init__(self, board: Board, numbers: Numbers) -> None:
        self.board = board
        self.numbers = numbers
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def answer(self, path: str) -> tuple[HTTPStatus, str, bytes]:
        """Status, content type and body for a GET of ``path``."""
        route = path.split("?", 1)[0]
        if route in ("/", "/index.html"):
            return HTTPStatus.OK, "text/html; charset=utf-8", page()
        if route not in ("/api/picture", "/api/maps", "/api/local"):
            return HTTPStatus.NOT_FOUND, "text/plain", b"not found\n"
        r = self.board.reading
        if r is None:
            return HTTPStatus.SERVICE_UNAVAILABLE, "text/plain", b"starting\n"
        doc: Any
        if route == "/api/maps":
            doc = bucket_maps(r)
        elif route == "/api/local":
            doc = local(r, self.numbers.established())
        else:
            doc = picture(r, self.numbers.of(r))
        return HTTPStatus.OK, "application/json", json.dumps(doc).encode()

    def serve(self, address: str, port: int) -> None:
        web = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "shoal"

            def do_GET(self) -> None:
                status, ctype, body = web.answer(self.path)
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # requests are not events

        cls = _Server6 if ":" in address else ThreadingHTTPServer
        self._server = cls((address, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="web", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
