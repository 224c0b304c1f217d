"""The cluster as one host sees it, as JSON documents: what the web view and ``shoal top``
draw.

:func:`picture` is small and changes every reading (hosts, states, weights, counts, recent
events, the last failover's timeline); :func:`bucket_maps` is the held epoch's owner of every
bucket, which changes only with the epoch, so a viewer fetches it again only when the
picture names another epoch. Both are built from a published
:class:`~shoal.daemon.reading.Reading`, off the event loop.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

from shoal.choices import FilteringMode
from shoal.daemon.reading import Reading
from shoal.dataplane.contract import RuleState
from shoal.protocol.engine.snapshot import state_name
from shoal.protocol.frames import Health, RuleReport

RECENT = 30  # events a picture carries
_ENDS = ("converged", "converged_default")


class Local(TypedDict):
    """A host's own numbers, which no heartbeat carries."""

    connections: dict[str, int]  # established TCP connections, per rule
    accepted: dict[str, int]  # new connections its kernel accepted, per rule (a counter)


def local(r: Reading, established: Mapping[str, int]) -> Local:
    return {
        "connections": dict(established),
        "accepted": {c.rule: c.accepted for c in r.rule_counters},
    }


def _rules(r: Reading) -> list[dict[str, Any]]:
    out = []
    for rule in r.cfg.cluster.effective_rules:
        ports = str(rule.start) if rule.start == rule.last else f"{rule.start}-{rule.last}"
        out.append(
            {
                "name": rule.key,
                "vip": str(rule.vip),
                "ports": ports,
                "protocol": rule.protocol.value,
                "mode": rule.mode.value,
                "affinity": rule.affinity.value,
            }
        )
    return out


def _shares(r: Reading) -> dict[int, dict[str, int]]:
    """Per host, what it owns of each rule in the held epoch: buckets of a multiple rule,
    1 for the single rule it handles."""
    e = r.snapshot.epoch_state
    out: dict[int, dict[str, int]] = {}
    if e is None:
        return out
    for name, owners, handler in zip(r.rules, e.maps, e.handlers, strict=True):
        if owners is not None:
            for host, n in Counter(owners).items():
                if host:
                    out.setdefault(host, {})[name] = n
        elif handler:
            out.setdefault(handler, {})[name] = 1
    return out


def _health(h: Health) -> str | None:
    """``ok`` or ``failing``; None without a check."""
    return None if h is Health.NONE else h.name.lower()


def _host_rules(
    names: Sequence[str], reports: Sequence[RuleReport], shares: Mapping[str, int]
) -> dict[str, dict[str, Any]]:
    return {
        name: {
            "weight": rep.weight,
            "state": RuleState(rep.state).name.lower(),
            "priority": rep.priority,
            "owns": shares.get(name, 0),
            "health": _health(rep.health),
        }
        for name, rep in zip(names, reports, strict=False)
    }


def picture(r: Reading, numbers: Mapping[int, Local | None]) -> dict[str, Any]:
    """The whole cluster as this host sees it; ``numbers`` holds the hosts' own numbers
    where they are known (None: not reachable)."""
    snap = r.snapshot
    names = r.rules
    shares = _shares(r)
    e = snap.epoch_state
    me: dict[str, Any] = {
        "host_id": snap.host_id,
        "this_host": True,
        "state": snap.state_name,
        "dedicated_ip": str(snap.dedicated_ip) if snap.dedicated_ip else None,
        "silent_ms": 0,
        "rules": _host_rules(names, snap.rules, shares.get(snap.host_id, {})),
        "health": _health(snap.health),
    }
    hosts = [me]
    for p in snap.peers:
        hosts.append(
            {
                "host_id": p.host_id,
                "this_host": False,
                "state": state_name(p.state, p.default),
                "dedicated_ip": str(p.dedicated_ip) if p.dedicated_ip else None,
                "silent_ms": round(p.silent_for * 1000),
                "rules": _host_rules(names, p.rules, shares.get(p.host_id, {})),
                "health": _health(p.health),
            }
        )
    for h in hosts:
        hid = h["host_id"]
        h["member"] = hid in snap.members
        h["leader"] = hid == snap.leader
        h["default"] = hid == snap.default_host
        h["numbers"] = numbers.get(hid)
    hosts.sort(key=lambda h: int(h["host_id"]))
    return {
        "cluster": r.cfg.cluster.name,
        "host_id": snap.host_id,
        "epoch": str(snap.epoch) if snap.epoch else None,
        "leader": snap.leader,
        "default_host": snap.default_host,
        "members": sorted(snap.members),
        "lease_left_ms": None if snap.lease_left is None else round(snap.lease_left * 1000),
        "rules": _rules(r),
        "hosts": hosts,
        "events": list(r.events[-RECENT:]),
        "failover": failover(r.events),
        "maps_for": str(e.key) if e else None,
    }


def bucket_maps(r: Reading) -> dict[str, Any]:
    """The held epoch's owner of each bucket of each multiple rule (0: no owner)."""
    e = r.snapshot.epoch_state
    maps: dict[str, list[int]] = {}
    if e is not None:
        for rule, owners in zip(r.cfg.cluster.effective_rules, e.maps, strict=True):
            if owners is not None and rule.mode is FilteringMode.MULTIPLE:
                maps[rule.key] = list(owners)
    return {"epoch": str(e.key) if e else None, "maps": maps}


def failover(events: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The last failover: from the moment a host that fell silent was last heard, through
    its leaving, to this host's next converged event; None before any failover."""
    start = None
    for i in range(len(events) - 1, -1, -1):
        ev = events[i]
        if ev.get("name") == "host_left" and "silent_s" in ev:
            start = i
            break
    if start is None:
        return None
    left = events[start]
    heard = float(left["at"]) - float(left["silent_s"])
    steps = [{"ms": 0, "text": f"host {left['peer']} last heard"}]
    done = None
    for ev in events[start:]:
        steps.append({"ms": round((float(ev["at"]) - heard) * 1000), "text": str(ev["text"])})
        if ev.get("name") in _ENDS:
            done = steps[-1]["ms"]
            break
    return {"host": left["peer"], "steps": steps, "total_ms": done}
