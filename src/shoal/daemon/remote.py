"""Remote control: an operator's verb carried out on another host of the cluster (``shoal
--host N drainstop``, ``shoal --all query``), off unless ``cluster.remote_control`` says so.

The request and the answer travel as cluster frames (:class:`~shoal.protocol.frames.Request`,
:class:`~shoal.protocol.frames.Answer`): HMAC-signed with the cluster key, numbered in the
sender's run, so the receiver's replay window and its proofs of liveness drop a copy or a
recording, as for heartbeats; they never leave the segment (EtherType 0x886F is not routed).
The target validates the request as its control socket would, carries it out, logs who
asked, and answers. The asker resends every :data:`RESEND` seconds until every host
answered or :data:`WAIT` passed; a target answers a request it already carried out from its
cache, so a verb runs once however often it was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shoal.daemon.control import guarded, parse_request
from shoal.protocol.events import Event, EventId
from shoal.protocol.frames import MAX_REMOTE, Answer, Request

if TYPE_CHECKING:
    from shoal.daemon.shell import Daemon

VERBS = frozenset(
    {"query", "start", "stop", "drainstop", "suspend", "resume", "enable", "disable", "drain",
     "reload"}
)  # fmt: skip
WAIT = 2.0  # seconds an asker waits for every answer
RESEND = 0.25  # seconds between two sendings of a request not answered by all
REMEMBER = 60.0  # seconds a target keeps an answer, for a request sent again
PASSED = ("port", "vip", "timeout")  # a verb's fields that travel with it
HELD = "held"  # the daemons' own question: see shoal.daemon.orphans


@dataclass
class Pending:
    hosts: set[int]  # who is to answer
    answers: dict[int, dict[str, Any]] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Remote:
    """Both sides of remote control in one daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.waiting: dict[int, Pending] = {}
        self.answered: dict[tuple[int, int, int], tuple[float, bytes]] = {}
        self.working: set[tuple[int, int, int]] = set()  # internal questions being answered
        self.tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------- the asker

    async def ask(self, req: dict[str, Any]) -> dict[str, Any]:
        """A control request ``{"cmd": "remote", "host": N | "all", "verb": V, ...}``:
        every answer, by host."""
        d = self.d
        if not d.cfg.cluster.remote_control:
            return {"ok": False, "error": "remote control is off in this cluster "
                    "(cluster.remote_control = false)"}  # fmt: skip
        verb = req.get("verb")
        if verb not in VERBS:
            return {
                "ok": False,
                "error": f"verb: {verb!r} is not one of {', '.join(sorted(VERBS))}",
            }
        target = req.get("host")
        peers = {p.host_id for p in d.engine.snapshot(d.now()).peers}
        if target == "all":
            hosts, wire = peers | {d.engine.me}, 0
        elif isinstance(target, int) and not isinstance(target, bool) and 1 <= target <= 256:
            hosts, wire = {target}, target
        else:
            return {"ok": False, "error": f"host: {target!r} is neither a host id nor 'all'"}
        inner = {"cmd": verb, **{k: req[k] for k in PASSED if k in req}}
        body = json.dumps(inner).encode()
        answers: dict[int, dict[str, Any]] = {}
        if d.engine.me in hosts:  # this host answers for itself here
            answers[d.engine.me] = self.carry_out(inner, d.engine.me, "this host")
            hosts = hosts - {d.engine.me}
        answers.update(await self.exchange(hosts, wire, body))
        return {"ok": all(a.get("ok") for a in answers.values()),
                "answers": {str(h): answers[h] for h in sorted(answers)}}  # fmt: skip

    async def exchange(self, hosts: set[int], wire: int, body: bytes) -> dict[int, dict[str, Any]]:
        """Send request ``body`` to host ``wire`` (0: every host) until each of ``hosts``
        answered or :data:`WAIT` passed; the answers by host (an error for the silent)."""
        d = self.d
        if not hosts:
            return {}
        rid = secrets.randbits(63)
        pending = self.waiting[rid] = Pending(set(hosts))
        deadline = d.now() + WAIT
        try:
            while not pending.done.is_set() and d.now() < deadline:
                d.engine.request(wire, rid, body)
                d.after()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(pending.done.wait(), RESEND)
        finally:
            del self.waiting[rid]
        answers = dict(pending.answers)
        for h in hosts - set(pending.answers):
            answers[h] = {"ok": False, "error": f"no answer within {WAIT:g} s"}
        return answers

    def on_answer(self, a: Answer) -> None:
        pending = self.waiting.get(a.request_id)
        if pending is None or a.host_id not in pending.hosts:
            return  # late, or not asked of it
        try:
            doc = json.loads(a.body)
        except ValueError:
            doc = None
        pending.answers[a.host_id] = doc if isinstance(doc, dict) else {
            "ok": False, "error": "the answer was not a JSON object"}  # fmt: skip
        if set(pending.answers) >= pending.hosts:
            pending.done.set()

    # ------------------------------------------------------------ the target

    def on_request(self, r: Request) -> None:
        now = time.monotonic()
        key = (r.host_id, r.incarnation, r.request_id)
        for k in [k for k, (t, _) in self.answered.items() if now - t > REMEMBER]:
            del self.answered[k]
        if key in self.answered or not self.internal(r, key):
            self.send_answer(r, key, now)

    def send_answer(self, r: Request, key: tuple[int, int, int], now: float) -> None:
        d = self.d
        if key not in self.answered:
            if not d.cfg.cluster.remote_control:
                resp = {"ok": False, "error": f"remote control is off on host {d.engine.me}"}
            else:
                resp = self.carry_out(r.body, r.host_id, self.address(r.host_id))
            self.answered[key] = (now, _fit(resp))
        d.engine.answer(r.host_id, r.request_id, self.answered[key][1])
        d.after()

    def internal(self, r: Request, key: tuple[int, int, int]) -> bool:
        """A question the daemons ask one another (not an operator's verb, so answered
        whether or not remote control is on): started here, answered when known."""
        try:
            doc = json.loads(r.body)
        except ValueError:
            return False
        if not isinstance(doc, dict) or doc.get("cmd") != HELD:
            return False
        if key not in self.working:
            self.working.add(key)
            task = asyncio.get_running_loop().create_task(self._held(r, key, doc))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return True

    async def _held(self, r: Request, key: tuple[int, int, int], doc: dict[str, Any]) -> None:
        try:
            resp = await self.d.orphans.held(doc, r.host_id)
            self.answered[key] = (time.monotonic(), _fit(resp))
        finally:
            self.working.discard(key)
        self.send_answer(r, key, time.monotonic())

    def address(self, host: int) -> str:
        for p in self.d.engine.snapshot(self.d.now()).peers:
            if p.host_id == host and p.dedicated_ip is not None:
                return str(p.dedicated_ip)
        return "address unknown"

    def carry_out(self, request: bytes | dict[str, Any], peer: int, where: str) -> dict[str, Any]:
        """Validate and carry out one verb for host ``peer``; log it as an event."""
        d = self.d
        raw = request if isinstance(request, bytes) else json.dumps(request).encode()
        req = parse_request(raw + b"\n")
        if isinstance(req, str):
            resp: dict[str, Any] = {"ok": False, "error": req}
        elif req.get("cmd") not in VERBS:
            resp = {"ok": False, "error": f"cmd: {req.get('cmd')!r} is not a remote verb"}
        elif req["cmd"] == "query":
            snap = d.engine.snapshot(d.now())
            resp = {"ok": True, "host_id": snap.host_id, "state": snap.state_name,
                    "epoch": str(snap.epoch) if snap.epoch else None}  # fmt: skip
        else:
            resp = guarded(d, req)
        cmd = req.get("cmd") if isinstance(req, dict) else "?"
        result = resp.get("message") or resp.get("error") or ("ok" if resp.get("ok") else "refused")
        ev = Event(EventId.REMOTE_COMMAND, d.now(), {"host": d.engine.me, "command": str(cmd),
                   "peer": peer, "address": where, "result": str(result)})  # fmt: skip
        d.log(ev)
        return resp


def _fit(resp: dict[str, Any]) -> bytes:
    """An answer as it travels: whole if it fits a frame, else its verdict alone."""
    body = json.dumps(resp).encode()
    if len(body) <= MAX_REMOTE:
        return body
    return json.dumps(
        {"ok": resp.get("ok", False), "error": "the answer is too long to send"}
    ).encode()
