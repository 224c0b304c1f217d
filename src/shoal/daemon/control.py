"""The control protocol: one JSON request per connection on the daemon's unix socket
(root only), one JSON answer. ``{"cmd": "query"}`` → ``{"ok": true, "hosts": [...]}``.

A request is untrusted input: at most :data:`MAX_REQUEST` bytes, one flat JSON object of
known fields holding strings, numbers, booleans or null (no NaN or infinity). Anything else is
answered with an error naming what was wrong, and changes nothing.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import socket
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoal.daemon.picture import picture
from shoal.filter import view_of, where
from shoal.protocol.engine import Command
from shoal.protocol.engine.snapshot import Snapshot
from shoal.protocol.frames import Health, RuleReport

if TYPE_CHECKING:
    from shoal.daemon.shell import Daemon

VERBS = {
    "start",
    "stop",
    "drainstop",
    "suspend",
    "resume",
    "enable",
    "disable",
    "drain",
    "query",
    "display",
    "params",
    "reload",
    "view",
    "filter",
    "remote",
}


MAX_REQUEST = 4096  # bytes, the newline included: the longest real request is under 200
FIELDS = frozenset({"cmd", "port", "vip", "timeout", "client", "sport", "protocol", "host", "verb"})


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def parse_request(line: bytes) -> dict[str, Any] | str:
    """The request in ``line``, or why it is refused (never raises)."""
    if len(line) > MAX_REQUEST:
        return f"request: {len(line)} bytes, over the limit of {MAX_REQUEST}"
    try:
        req = json.loads(line, parse_constant=_no_constant)
    except RecursionError:
        return "request: nested too deep"
    except (ValueError, UnicodeDecodeError) as e:
        return f"request: not JSON ({e})"
    if not isinstance(req, dict):
        return f"request: a JSON object is expected, not {type(req).__name__}"
    for key, value in req.items():
        if key not in FIELDS:
            return f"request: unknown field {key!r} (known: {', '.join(sorted(FIELDS))})"
        if isinstance(value, dict | list):
            return f"{key}: {type(value).__name__} where a string or a number belongs"
    return req


def health(d: Daemon, host: Health, rules: tuple[RuleReport, ...]) -> dict[str, Any]:
    """What a host's checks say, as its heartbeat tells: the host's and each checked rule's
    (``ok`` or ``failing``); empty without checks."""
    out: dict[str, Any] = {}
    if host is not Health.NONE:
        out["host"] = host.name.lower()
    names = [r.key for r in d.cfg.cluster.effective_rules]
    for name, rep in zip(names, rules, strict=False):
        if rep.health is not Health.NONE:
            out[name] = rep.health.name.lower()
    return out


def query(d: Daemon, snap: Snapshot) -> dict[str, Any]:
    hosts = [
        {
            "host_id": snap.host_id,
            "state": snap.state_name,
            "dedicated_ip": str(snap.dedicated_ip) if snap.dedicated_ip else None,
            "this_host": True,
            "health": health(d, snap.health, snap.rules),
        }
    ]
    for p in snap.peers:
        hosts.append(
            {
                "host_id": p.host_id,
                "state": p.state_name,
                "dedicated_ip": str(p.dedicated_ip) if p.dedicated_ip else None,
                "this_host": False,
                "health": health(d, p.health, p.rules),
            }
        )
    hosts.sort(key=lambda h: int(str(h["host_id"])))
    return {
        "ok": True,
        "cluster": d.cfg.cluster.name,
        "hosts": hosts,
        "epoch": str(snap.epoch) if snap.epoch else None,
        "default_host": snap.default_host,
    }


def _rules_for(d: Daemon, port: Any, vip: Any) -> list[int] | str:
    rules = d.cfg.cluster.effective_rules
    want = None
    if vip is not None:
        try:
            want = ipaddress.ip_address(vip)
        except (TypeError, ValueError):
            return f"vip: {vip!r} is not an IP address"
        if want not in d.cfg.cluster.all_vips:
            return f"vip: {vip} is not a VIP of cluster {d.cfg.cluster.name}"
    on_vip = [i for i, r in enumerate(rules) if want is None or r.vip == "all" or r.vip == want]
    if port == "all":
        return on_vip or f"vip: no port rule covers {vip}"
    try:
        p = int(port)
    except (TypeError, ValueError):
        return f"port: {port!r} is neither a port number nor 'all'"
    found = [i for i in on_vip if rules[i].start <= p <= rules[i].last]
    return found or f"port: no port rule covers port {p}" + (f" on {vip}" if vip else "")


def affinity(d: Daemon) -> list[dict[str, Any]]:
    """Per sticky rule: its timeout, the affinity entries the kernel held at the last read
    (``entries_read_at``, wall time; a read more than 10 s old starts another, off the
    loop: None until one ends), and the clients handed over and taken in the epoch held."""
    rules = d.cfg.cluster.effective_rules
    if d.loop is not None:
        d.affinity_reads.observe(d.loop, wanted_counts=True)
    held = d.affinity_reads.counts
    return [
        {
            "rule": rules[i].key,
            "timeout_s": rules[i].affinity_timeout_s,
            "entries": None if held is None else held.get(i, 0),
            "entries_read_at": d.affinity_reads.read_at,
            **moves,
        }
        for i, moves in d.engine.handoffs.report().items()
    ]


def _report(d: Daemon, cmd: str, snap: Snapshot) -> dict[str, Any]:
    """query, display and params: what this host knows, read from one snapshot."""
    if cmd == "query":
        return query(d, snap)
    if cmd == "display":
        return {
            "ok": True,
            "state": snap.state_name,
            "host_id": snap.host_id,
            "configuration": d.cfg.cluster.digest_document(),
            "host": json.loads(d.cfg.host.model_dump_json()),
            "checks": d.health.checks.docs(),
            "affinity": affinity(d),
            "events": d.events[-50:],
        }
    return {
        "ok": True,
        "state": snap.state_name,
        "host_id": snap.host_id,
        "period_ms": d.cfg.cluster.period_ms,
        "loss_tolerance": d.cfg.cluster.tolerance,
        "lease_ms": round(d.engine.timing.lease * 1000),
        "buckets": d.cfg.cluster.buckets,
        "hash_seed": d.cfg.cluster.seed,
        "mode": d.cfg.cluster.mode.value,
        "partition_policy": d.cfg.cluster.partition_policy.value,
        "cluster_digest": d.cfg.cluster.digest(),
        "incarnation": snap.incarnation,
        "epoch": str(snap.epoch) if snap.epoch else None,
        "leader": snap.leader,
        "owned_tokens": snap.owned_tokens,
        "lease_left_ms": None if snap.lease_left is None else round(snap.lease_left * 1000),
        "counters": d.counters(),
        "reads": dict(d.reads),
        "socket_drops": d.wire.drops(),
        "rules": [asdict(c) for c in d.backend.counters()],
        **d.backend.describe(),
        "dead_host_clients": d.orphans.docs(),
        "affinity": affinity(d),
        "checks": d.health.checks.docs(),
    }


def _filter(d: Daemon, req: dict[str, Any]) -> dict[str, Any]:
    """Where a flow goes now, by the epoch this host holds."""
    try:
        client = ipaddress.ip_address(str(req.get("client")))
    except ValueError:
        return {"ok": False, "error": f"client: {req.get('client')!r} is not an IP address"}
    try:
        vip = ipaddress.ip_address(str(req.get("vip")))
    except ValueError:
        return {"ok": False, "error": f"vip: {req.get('vip')!r} is not an IP address"}
    numbers = {}
    for key in ("sport", "port"):
        value = req.get(key, 0 if key == "sport" else None)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
            return {"ok": False, "error": f"{key}: {value!r} is not a port 0..65535"}
        numbers[key] = value
    snap = d.engine.snapshot(d.now())
    try:
        doc = where(
            d.cfg.cluster, view_of(snap.epoch_state, d.cfg.cluster.effective_rules), client,
            numbers["sport"], vip, numbers["port"], str(req.get("protocol", "tcp")),
        )  # fmt: skip
    except ValueError as e:
        return {"ok": False, "error": str(e)}
    return {"ok": True, **doc, "epoch": str(snap.epoch) if snap.epoch else None,
            "state": snap.state_name}  # fmt: skip


def dispatch(d: Daemon, req: dict[str, Any]) -> dict[str, Any]:
    cmd = req.get("cmd")
    if cmd not in VERBS:
        return {"ok": False, "error": f"cmd: unknown command {cmd!r}"}
    e = d.engine
    now = d.now()
    if cmd in ("query", "display", "params"):
        return _report(d, cmd, e.snapshot(now))
    if cmd in ("view", "remote"):
        return {"ok": False, "error": f"{cmd}: answered by the daemon's shell, not here"}
    if cmd == "reload":
        return d.reload()
    if cmd == "filter":
        return _filter(d, req)
    if cmd in ("enable", "disable", "drain"):
        found = _rules_for(d, req.get("port"), req.get("vip"))
        if isinstance(found, str):
            return {"ok": False, "error": found}
        messages = []
        every = req.get("port") == "all" and req.get("vip") is None
        targets: list[int | None] = [None] if every else list(found)
        for i in targets:
            res = e.command(Command(cmd), now, rule=i)
            if not res.ok:
                return {"ok": False, "error": res.message}
            messages.append(res.message)
        return {"ok": True, "message": "; ".join(messages)}
    timeout = req.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or timeout < 0
    ):
        return {"ok": False, "error": f"timeout: {timeout!r} is not a number of seconds >= 0"}
    res = e.command(Command(cmd), now, timeout=timeout)
    return {"ok": res.ok, ("message" if res.ok else "error"): res.message}


async def answer(d: Daemon, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One request, one answer. Bad input is answered, never raised: a request too
    long, cut short, malformed or failing inside gets an error and an event, no traceback."""
    try:
        try:
            line = await asyncio.wait_for(reader.readuntil(b"\n"), 5)
            req = parse_request(line)
        except asyncio.LimitOverrunError:
            req = f"request: over the limit of {MAX_REQUEST} bytes"
        except asyncio.IncompleteReadError as e:
            if not e.partial:
                return
            req = "request: cut short (no newline)"
        if isinstance(req, str):
            resp: dict[str, Any] = {"ok": False, "error": req}
        elif req.get("cmd") == "view":
            resp = await view(d)
        elif req.get("cmd") == "remote":
            resp = await d.remote.ask(req)
        else:
            resp = guarded(d, req)
        writer.write((json.dumps(resp) + "\n").encode())
        await writer.drain()
    except (TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()


async def view(d: Daemon) -> dict[str, Any]:
    """The picture ``shoal top`` draws: read on the loop, the hosts' own numbers counted
    and asked for in a worker thread while the loop goes on."""
    assert d.loop is not None
    try:
        r = d.reading()
        numbers = await d.loop.run_in_executor(None, d.numbers.of, r)
        return {"ok": True, **picture(r, numbers)}
    except Exception as e:  # the daemon outlives any one request
        return failed("view", e)


def guarded(d: Daemon, req: dict[str, Any]) -> dict[str, Any]:
    """``Daemon.handle``, with a failure inside answered and logged in one line."""
    try:
        return d.handle(req)
    except Exception as e:  # the daemon outlives any one request
        return failed(str(req.get("cmd")), e)


def failed(cmd: str, e: Exception) -> dict[str, Any]:
    problem = {"name": "control_failed", "cmd": cmd, "error": repr(e)}
    sys.stderr.write(json.dumps(problem) + "\n")
    return {"ok": False, "error": f"{cmd}: failed inside the daemon ({e!r})"}


def call(path: Path, req: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to a daemon's control socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall((json.dumps(req) + "\n").encode())
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    out: dict[str, Any] = json.loads(data)
    return out
