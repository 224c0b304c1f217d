"""The probes, one per kind of check, as coroutines: each answers ``(ok, detail)`` and
never raises for what the service does (refused, reset, wrong answer, no answer); the
caller cuts it at the check's timeout.

HTTP is spoken by hand (one ``GET`` with ``Connection: close``, HTTP/1.1, the status line
and, when a substring is expected, up to :data:`MAX_BODY` bytes of the body): a health
check needs no client library. HTTPS does not verify the certificate unless told to (as
HAProxy's ``check-ssl`` with ``verify none``): it checks the service, not the PKI.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import ssl

from shoal.health.spec import Check, CheckKind

MAX_BODY = 65536
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


async def probe(check: Check, address: IPAddress | None, port: int) -> tuple[bool, str]:
    """Run one check against ``address``/``port`` (None and unused for a command check)."""
    try:
        if check.kind is CheckKind.COMMAND:
            return await _command(check)
        assert address is not None
        if check.kind is CheckKind.TCP:
            return await _tcp(str(address), port)
        if check.kind in (CheckKind.HTTP, CheckKind.HTTPS):
            return await _http(check, str(address), port)
        return await _udp(check, str(address), port)
    except (OSError, EOFError, ValueError, UnicodeError, ssl.SSLError) as e:
        return False, f"{type(e).__name__}: {e}".rstrip(": ")


async def _tcp(address: str, port: int) -> tuple[bool, str]:
    _, writer = await asyncio.open_connection(address, port)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True, "connected"


def _tls(check: Check) -> ssl.SSLContext | None:
    if check.kind is not CheckKind.HTTPS:
        return None
    ctx = ssl.create_default_context()
    if not check.tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _http(check: Check, address: str, port: int) -> tuple[bool, str]:
    reader, writer = await asyncio.open_connection(address, port, ssl=_tls(check))
    try:
        host = f"[{address}]" if ":" in address else address
        path = check.path or "/"
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: shoal-check\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        await writer.drain()
        line = await reader.readline()
        parts = line.decode("latin-1").split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            return False, f"not an HTTP answer: {line[:60]!r}"
        status = int(parts[1])
        want = check.expect_status or 200
        if status != want:
            return False, f"status {status}, expected {want}"
        if check.expect_body is None:
            return True, f"status {status}"
        while (await reader.readline()) not in (b"\r\n", b"\n", b""):
            pass  # the headers
        body = await reader.read(MAX_BODY)
        if check.expect_body.encode() not in body:
            return False, f"status {status}, body without {check.expect_body!r}"
        return True, f"status {status}, body matches"
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


class _Answer(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: object) -> None:
        if not self.got.done():
            self.got.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.got.done():
            self.got.set_exception(exc)  # an ICMP port unreachable, say


async def _udp(check: Check, address: str, port: int) -> tuple[bool, str]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(_Answer, remote_addr=(address, port))
    try:
        transport.sendto((check.send or "").encode())
        data = await proto.got
    finally:
        transport.close()
    if check.expect is not None and check.expect.encode() not in data:
        return False, f"answer without {check.expect!r}"
    return True, f"answered ({len(data)} bytes)"


async def _command(check: Check) -> tuple[bool, str]:
    assert check.command
    proc = await asyncio.create_subprocess_exec(
        *check.command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,  # its own group: cut at the timeout, children included
    )
    try:
        code = await proc.wait()
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            await asyncio.shield(proc.wait())
        raise
    return code == 0, f"exit status {code}"
