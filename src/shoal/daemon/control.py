"""The control protocol: one JSON request per connection on the daemon's unix socket
(root only), one JSON answer. ``{"cmd": "query"}`` → ``{"ok": true, "hosts": [...]}``."""

from __future__ import annotations

import ipaddress
import json
import socket
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoal.protocol.engine import Command
from shoal.protocol.frames import HostState

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
}


def _host_state(state: HostState, default: bool) -> str:
    if state is HostState.CONVERGED and default:
        return "converged (default)"
    return state.name.lower()


def query(d: Daemon) -> dict[str, Any]:
    e = d.engine
    now = d.now()
    epoch = e.epoch
    hosts = [
        {
            "host_id": e.me,
            "state": d.state_name(),
            "dedicated_ip": str(e.dedicated_ip) if e.dedicated_ip else None,
            "this_host": True,
        }
    ]
    for p in sorted(e.peers.values(), key=lambda p: p.host_id):
        if p.hb is None or not e._alive(p, now):
            continue
        default = bool(epoch and epoch.default_host == p.host_id and p.hb.epoch == epoch.key)
        hosts.append(
            {
                "host_id": p.host_id,
                "state": _host_state(p.hb.state, default),
                "dedicated_ip": str(p.hb.dedicated_ip) if p.hb.dedicated_ip else None,
                "this_host": False,
            }
        )
    hosts.sort(key=lambda h: int(str(h["host_id"])))
    return {
        "ok": True,
        "cluster": d.cfg.cluster.name,
        "hosts": hosts,
        "epoch": str(epoch.key) if epoch else None,
        "default_host": epoch.default_host if epoch else None,
    }


def _rules_for(d: Daemon, port: Any, vip: Any) -> list[int] | str:
    rules = d.cfg.cluster.effective_rules
    if port == "all":
        return list(range(len(rules)))
    try:
        p = int(port)
    except (TypeError, ValueError):
        return f"port: {port!r} is neither a port number nor 'all'"
    want = None
    if vip is not None:
        try:
            want = ipaddress.ip_address(vip)
        except ValueError:
            return f"vip: {vip!r} is not an IP address"
    found = [
        i
        for i, r in enumerate(rules)
        if r.start <= p <= r.last and (want is None or r.vip == "all" or r.vip == want)
    ]
    return found or f"port: no port rule covers port {p}" + (f" on {vip}" if vip else "")


def dispatch(d: Daemon, req: dict[str, Any]) -> dict[str, Any]:
    cmd = req.get("cmd")
    if cmd not in VERBS:
        return {"ok": False, "error": f"cmd: unknown command {cmd!r}"}
    e = d.engine
    now = d.now()
    if cmd == "query":
        return query(d)
    if cmd == "display":
        return {
            "ok": True,
            "state": d.state_name(),
            "host_id": e.me,
            "configuration": d.cfg.cluster.digest_document(),
            "host": json.loads(d.cfg.host.model_dump_json()),
            "events": d.events[-50:],
        }
    if cmd == "params":
        return {
            "ok": True,
            "state": d.state_name(),
            "host_id": e.me,
            "period_ms": d.cfg.cluster.period_ms,
            "loss_tolerance": d.cfg.cluster.tolerance,
            "lease_ms": round(e.timing.lease * 1000),
            "buckets": d.cfg.cluster.buckets,
            "hash_seed": d.cfg.cluster.seed,
            "mode": d.cfg.cluster.mode.value,
            "partition_policy": d.cfg.cluster.partition_policy.value,
            "cluster_digest": d.cfg.cluster.digest(),
            "incarnation": e.incarnation,
            "epoch": str(e.epoch.key) if e.epoch else None,
            "owned_tokens": len(e.installed),
            "counters": dict(e.counters),
            "rules": [asdict(c) for c in d.backend.counters()],
        }
    if cmd == "reload":
        return d.reload()
    if cmd in ("enable", "disable", "drain"):
        found = _rules_for(d, req.get("port"), req.get("vip"))
        if isinstance(found, str):
            return {"ok": False, "error": found}
        messages = []
        targets: list[int | None] = [None] if req.get("port") == "all" else list(found)
        for i in targets:
            res = e.command(Command(cmd), now, rule=i)
            if not res.ok:
                return {"ok": False, "error": res.message}
            messages.append(res.message)
        return {"ok": True, "message": "; ".join(messages)}
    timeout = req.get("timeout")
    if timeout is not None and (not isinstance(timeout, int | float) or timeout < 0):
        return {"ok": False, "error": f"timeout: {timeout!r} is not a number of seconds >= 0"}
    res = e.command(Command(cmd), now, timeout=timeout)
    return {"ok": res.ok, ("message" if res.ok else "error"): res.message}


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
