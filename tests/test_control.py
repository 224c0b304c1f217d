"""The daemon's control protocol and its wiring to the kernel, without root: a real
``Daemon`` around a real engine and runtime, with a recording backend and socket in place of
nftables and AF_PACKET."""

from __future__ import annotations

import asyncio
import functools
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shoal.config import ShoalConfig, parse_config
from shoal.config_errors import ConfigError
from shoal.daemon import control, wire
from shoal.daemon.control import MAX_REQUEST, VERBS
from shoal.daemon.shell import Daemon
from shoal.dataplane.contract import (
    AffinityRead,
    Away,
    Backend,
    Install,
    RuleCounters,
    RuleState,
)
from shoal.protocol.codec import Codec, Keys
from shoal.protocol.frames import Answer, HostState, Rejection, Request
from tests.conftest import EXAMPLES, example_doc, write_private


class RecordingBackend:
    """The data-plane contract, remembering what it was asked."""

    def __init__(self, cfg: ShoalConfig) -> None:
        self.cfg = cfg
        self.installs: list[Install] = []
        self.renewals: list[int] = []
        self.resets: frozenset[int] = frozenset()
        self.removed = False

    def attach(self) -> None:
        pass

    def apply(self, inst: Install) -> None:
        self.installs.append(inst)

    def renew(self, ms: int) -> None:
        self.renewals.append(ms)

    def reset(self, tokens: frozenset[int]) -> None:
        self.resets = tokens

    def affine_reader(self) -> Callable[[], AffinityRead]:
        return lambda: AffinityRead({}, {})

    def away(self, entries: Away) -> None:
        pass

    def counters(self) -> list[RuleCounters]:
        return [RuleCounters(r.key, 0, 0, 0) for r in self.cfg.cluster.effective_rules]

    def describe(self) -> dict[str, Any]:
        return {"dataplane": "recorded"}

    def remove(self) -> None:
        self.removed = True


class RecordingSocket:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendto(self, frame: bytes, address: object) -> None:
        self.sent.append(frame)

    def recv(self, size: int) -> bytes:
        raise BlockingIOError

    def setsockopt(self, level: int, option: int, value: bytes) -> None:
        pass  # a kernel filter: nothing to filter here

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        return bytes(size)  # packet statistics: nothing dropped


def _daemon(tmp_path: Path, factory: Callable[[ShoalConfig], Backend] = RecordingBackend) -> Daemon:
    config = write_private(tmp_path / "host1.toml", (EXAMPLES / "host1.toml").read_text())
    d = Daemon(
        config,
        tmp_path / "control.sock",
        tmp_path / "state",
        setup_adapter=False,
        backend_factory=factory,
    )
    d.loop = asyncio.new_event_loop()
    sockets: Any = (RecordingSocket(), RecordingSocket())
    d.wire = wire.Wire(d.cfg.interface, d.engine.codec.cluster, b"\xff" * 6, sockets, None)
    return d


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = _daemon(tmp_path)
    assert d.loop is not None
    try:
        yield d
    finally:
        d.loop.close()


def backend(d: Daemon) -> RecordingBackend:
    b = d.backend
    assert isinstance(b, RecordingBackend)
    return b


def run(d: Daemon, seconds: float) -> None:
    """Let the daemon's engine step on its own clock, as the event loop would."""
    end = d.now() + seconds
    while d.now() < end:
        if d.timer is not None:
            d.timer.cancel()  # on_timer is called here in its place
        d.on_timer()


def test_a_verb_reaches_the_kernel_and_the_wire(daemon: Daemon) -> None:
    """disable: the next install says the rule is off, a heartbeat went out after it."""
    run(daemon, 0.6)  # alone, the host forms a cluster after the detection time
    assert daemon.engine.state is HostState.CONVERGED
    sent = len(daemon.wire.known.sent)  # type: ignore[attr-defined]
    resp = daemon.handle({"cmd": "disable", "port": "80"})
    assert resp == {"ok": True, "message": "rule web: disabled"}
    assert backend(daemon).installs[-1].rule_states[0] is RuleState.DISABLED
    assert len(daemon.wire.known.sent) > sent  # type: ignore[attr-defined]
    assert backend(daemon).renewals  # the kernel lease was set


@pytest.mark.parametrize(
    ("req", "error"),
    [
        ({"cmd": "drainstop", "timeout": math.nan}, "timeout: nan is not a number of seconds"),
        ({"cmd": "drainstop", "timeout": math.inf}, "timeout: inf is not a number of seconds"),
        ({"cmd": "drainstop", "timeout": True}, "timeout: True is not a number of seconds"),
        ({"cmd": "drainstop", "timeout": -1}, "timeout: -1 is not a number of seconds"),
        ({"cmd": "disable", "port": "80", "vip": "not-an-ip"}, "vip: 'not-an-ip' is not an IP"),
        ({"cmd": "disable", "port": "all", "vip": "198.18.9.9"}, "vip: 198.18.9.9 is not a VIP"),
        ({"cmd": "drain", "port": "eighty"}, "port: 'eighty' is neither a port number nor"),
        ({"cmd": "frobnicate"}, "cmd: unknown command 'frobnicate'"),
    ],
)
def test_bad_requests_are_refused_by_name_and_change_nothing(
    daemon: Daemon, req: dict[str, Any], error: str
) -> None:
    run(daemon, 0.6)
    installs = len(backend(daemon).installs)
    state = daemon.engine.state
    resp = daemon.handle(req)
    assert not resp["ok"] and error in resp["error"], resp
    assert daemon.engine.state is state and len(backend(daemon).installs) == installs


def test_all_rules_on_one_vip(daemon: Daemon) -> None:
    """``drain all --vip V`` drains the rules that cover V, and only them."""
    run(daemon, 0.6)
    rules = daemon.cfg.cluster.effective_rules
    vip = str(daemon.cfg.cluster.primary_vip)
    resp = daemon.handle({"cmd": "drain", "port": "all", "vip": vip})
    assert resp["ok"], resp
    states = backend(daemon).installs[-1].rule_states
    for rule, state in zip(rules, states, strict=True):
        covers = rule.vip == "all" or str(rule.vip) == vip
        assert (state is RuleState.DRAINING) is covers


def test_query_params_and_display(daemon: Daemon) -> None:
    run(daemon, 0.6)
    q = daemon.handle({"cmd": "query"})
    assert q["hosts"] == [
        {
            "host_id": 1,
            "state": "converged (default)",
            "dedicated_ip": q["hosts"][0]["dedicated_ip"],
            "this_host": True,
            "health": {},
        }
    ]
    p = daemon.handle({"cmd": "params"})
    assert p["state"] == "converged (default)" and p["leader"] == 1
    assert p["owned_tokens"] > 0 and 0 < p["lease_left_ms"] <= p["lease_ms"]
    assert set(p["reads"]) == {"wakeups", "batches"}
    assert p["socket_drops"] == {"known": 0, "other": 0}
    shown = daemon.handle({"cmd": "display"})
    assert shown["ok"] and any("converged as default host" in e["text"] for e in shown["events"])
    json.dumps(p), json.dumps(shown)  # what the socket sends


def test_reload_refuses_a_new_host_id_and_a_bad_file(daemon: Daemon) -> None:
    run(daemon, 0.6)
    good = daemon.config_path.read_text()
    daemon.config_path.write_text(good.replace("host_id = 1", "host_id = 5"))
    resp = daemon.reload()
    assert not resp["ok"] and "host.host_id and the interface need a restart" in resp["error"]
    daemon.config_path.write_text(good.replace("load_weight = 50", "load_weight = 101"))
    resp = daemon.reload()
    assert not resp["ok"] and "load_weight" in resp["error"]
    assert resp["kept"] == "running configuration" and daemon.engine.me == 1
    daemon.config_path.write_text(good)
    assert daemon.reload() == {"ok": True, "message": "host parameters applied"}


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Path]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    d = _daemon(tmp)
    assert d.loop is not None
    try:
        yield d, tmp / "c.sock"
    finally:
        d.loop.close()


async def _ask_all(d: Daemon, path: Path, lines: list[bytes]) -> list[dict[str, Any]]:
    """Serve the control socket as the daemon does and send each line on its own connection."""
    serve = functools.partial(control.answer, d)
    server = await asyncio.start_unix_server(serve, path=str(path), limit=MAX_REQUEST)
    answers = []
    try:
        for line in lines:
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(line)
            if not line.endswith(b"\n"):
                writer.write_eof()
            await writer.drain()
            answers.append(json.loads(await reader.readline()))
            writer.close()
    finally:
        server.close()
    return answers


BAD_INPUT = [
    (b'{"cmd": "query", "vip": "' + b"9" * 70_000 + b'"}\n', "over the limit of 4096 bytes"),
    (b"[" * 60_000 + b"]" * 60_000 + b"\n", "over the limit"),
    (b"[" * 2_000 + b"]" * 2_000 + b"\n", "nested too deep"),
    (b'{"cmd": "drainstop", "timeout": NaN}\n', "NaN is not a number JSON allows"),
    (b'{"cmd": "drainstop", "timeout": -Infinity}\n', "-Infinity is not a number JSON allows"),
    (b'{"cmd": "drain", "port": [80]}\n', "port: list where a string or a number belongs"),
    (b'{"cmd": "stop", "timout": 5}\n', "unknown field 'timout'"),
    (b'"stop"\n', "a JSON object is expected, not str"),
    (b"\xff\xfe\n", "request: not JSON"),
    (b'{"cmd": "stop"', "cut short (no newline)"),
]


def test_the_control_socket_answers_bad_input_and_changes_nothing(
    daemon: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Too long, too deep, NaN, the wrong types, unknown fields, cut short: each answered
    with an error that names it, nothing changed, no traceback."""
    run(daemon, 0.6)
    assert daemon.loop is not None
    installs = len(backend(daemon).installs)
    lines = [line for line, _ in BAD_INPUT] + [b'{"cmd": "query"}\n']
    answers = daemon.loop.run_until_complete(_ask_all(daemon, tmp_path / "c.sock", lines))
    for (line, error), answer in zip(BAD_INPUT, answers, strict=False):
        assert answer["ok"] is False and error in answer["error"], (line[:40], answer)
    assert answers[-1]["ok"] and answers[-1]["hosts"][0]["state"] == "converged (default)"
    assert daemon.engine.state is HostState.CONVERGED
    assert len(backend(daemon).installs) == installs
    assert "Traceback" not in capsys.readouterr().err


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=300),
        st.recursive(
            st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner),
            max_leaves=20,
        ).map(lambda doc: json.dumps(doc).encode()),
        st.fixed_dictionaries(
            {"cmd": st.sampled_from(sorted(VERBS))},
            optional={
                "port": st.one_of(st.integers(), st.text(max_size=6), st.floats()),
                "vip": st.one_of(st.text(max_size=12), st.integers()),
                "timeout": st.one_of(st.floats(), st.integers(), st.text(max_size=4)),
            },
        ).map(lambda doc: json.dumps(doc).encode()),
    )
)
def test_any_request_is_answered_without_a_traceback(
    fuzzed: tuple[Daemon, Path], line: bytes
) -> None:
    """Fuzz: whatever a client sends (one line), the daemon answers with JSON, and the
    next command still works."""
    d, path = fuzzed
    assert d.loop is not None
    one = line.replace(b"\n", b" ") + b"\n"
    answer, after = d.loop.run_until_complete(_ask_all(d, path, [one, b'{"cmd": "params"}\n']))
    assert isinstance(answer["ok"], bool) and (answer["ok"] or answer["error"])
    assert after["ok"]


class BrokenCounters(RecordingBackend):
    def counters(self) -> list[RuleCounters]:
        raise RuntimeError("counter map gone")


def test_a_request_failing_inside_is_answered_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fault inside the daemon while it answers (here the backend's counters) is the
    request's error and one logged line; the daemon goes on."""
    d = _daemon(tmp_path, BrokenCounters)
    assert d.loop is not None
    try:
        run(d, 0.6)
        lines = [b'{"cmd": "params"}\n', b'{"cmd": "query"}\n']
        params, query = d.loop.run_until_complete(_ask_all(d, tmp_path / "c.sock", lines))
    finally:
        d.loop.close()
    assert params == {
        "ok": False,
        "error": "params: failed inside the daemon (RuntimeError('counter map gone'))",
    }
    assert query["ok"]
    err = capsys.readouterr().err
    assert "Traceback" not in err and '"name": "control_failed"' in err


def _signed_by(d: Daemon, key: bytes) -> bool:
    """Whether the daemon's last frame on the wire opens with ``key`` alone."""
    frame = d.wire.known.sent[-1]  # type: ignore[attr-defined]
    return not isinstance(Codec(d.engine.codec.cluster, Keys(key)).decode(frame), Rejection)


def test_a_reload_applies_a_new_key_or_refuses_it(daemon: Daemon) -> None:
    """A changed key is said and used at once; a host file left open to others is refused
    and the running key kept: never "applied" with the old key still signing."""
    run(daemon, 0.6)
    old, new = b"example-only-change-me-0123456789", b"rotated-key-0123456789abcdef"
    assert _signed_by(daemon, old)
    good = daemon.config_path.read_text()
    write_private(daemon.config_path, good.replace(old.decode(), new.decode()))
    resp = daemon.reload()
    assert resp["ok"] and "cluster key changed" in resp["message"], resp
    run(daemon, 0.3)
    assert _signed_by(daemon, new) and not _signed_by(daemon, old)
    daemon.config_path.write_text(good)
    daemon.config_path.chmod(0o644)
    resp = daemon.reload()
    assert not resp["ok"] and "has mode 0644, open to others" in resp["error"]
    assert resp["kept"] == "running configuration"
    run(daemon, 0.3)
    assert _signed_by(daemon, new)


class RefusingSocket(RecordingSocket):
    def setsockopt(self, level: int, option: int, value: bytes) -> None:
        raise OSError(12, "Cannot allocate memory")


def test_a_refused_socket_filter_is_logged_and_the_daemon_goes_on(
    daemon: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    """The kernel may refuse a new filter (its option memory): the old one stays, one line
    says so, and the daemon keeps stepping."""
    run(daemon, 0.6)
    daemon.wire.known = RefusingSocket()  # type: ignore[assignment]
    daemon.wire.filtered = (-2, daemon.engine.codec.cluster)
    daemon.refilter()
    run(daemon, 0.3)
    assert daemon.engine.state is HostState.CONVERGED
    assert '"name": "filter_refused"' in capsys.readouterr().err


def test_a_filter_names_runs_only_up_to_its_limit() -> None:
    """Up to MAX_RUNS runs, one block each; past it, the known socket takes every frame of
    the cluster and the other none (a filter that size is refused by the kernel)."""
    few = [(h, 10**18 + h) for h in range(2, 2 + wire.MAX_RUNS)]
    many = [(h, 10**18 + h) for h in range(2, 3 + wire.MAX_RUNS)]
    assert len(wire.program(b"12345678", few, True)) == 15 + 7 * wire.MAX_RUNS + 1
    assert wire.program(b"12345678", many, True)[-1] == (0x06, 0, 0, 0xFFFF)
    assert wire.program(b"12345678", many, False)[-1] == (0x06, 0, 0, 0)
    assert len(wire.program(b"12345678", many, True)) == 16


def test_metrics_show_this_host_and_its_convergence(daemon: Daemon) -> None:
    """What a scrape returns, parsed as Prometheus parses it: the state, leader and
    default host, the epoch, the hosts by state, every bucket of the web rule owned by the
    only host, the frames counted, and one convergence timed."""
    run(daemon, 0.6)
    daemon.publish()
    text = generate_latest(daemon.metrics.registry).decode()
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    assert got[("shoal_host_state", (("state", "converged"),))] == 1
    assert got[("shoal_host_state", (("state", "stopped"),))] == 0
    assert got[("shoal_leader", ())] == 1 and got[("shoal_default_host", ())] == 1
    assert got[("shoal_hosts", (("state", "converged"),))] == 1
    assert got[("shoal_epoch", ())] >= 1
    assert got[("shoal_rule_buckets_owned", (("rule", "web"),))] == daemon.cfg.cluster.buckets
    assert got[("shoal_frames_sent_total", ())] > 0
    assert got[("shoal_convergence_duration_seconds_count", ())] == 1
    assert 0 < got[("shoal_convergence_duration_seconds_sum", ())] < 1


def test_a_metrics_address_is_validated_by_name() -> None:
    doc = example_doc()
    for bad, why in [
        ("198.18.0.11", "is not ADDRESS:PORT"),
        ("198.18.0.11:0", "is not ADDRESS:PORT"),
        ("nowhere:9474", "'nowhere' is not an IP address"),
    ]:
        doc["host"]["metrics_address"] = bad
        with pytest.raises(ConfigError) as err:
            parse_config(doc, "h.toml")
        assert "host.metrics_address" in str(err.value) and why in str(err.value)
    doc["host"]["metrics_address"] = "[2001:db8::11]:9474"
    assert parse_config(doc, "h.toml").host.metrics_endpoint == ("2001:db8::11", 9474)


def _answers(d: Daemon) -> list[Answer]:
    frames = [d.engine.codec.decode(f) for f in d.wire.known.sent]  # type: ignore[attr-defined]
    return [f for f in frames if isinstance(f, Answer)]


def test_a_remote_request_is_carried_out_once_and_answered(daemon: Daemon) -> None:
    """A request from host 2 to disable the web rule: carried out, logged with who asked,
    answered in a frame; the same request again (the asker resends until answered) is
    answered again from the cache, not carried out twice. With remote control off, it is
    refused and nothing happens."""
    run(daemon, 0.6)
    body = json.dumps({"cmd": "disable", "port": "80"}).encode()
    daemon.remote.on_request(Request(2, 5, 1, 1, 42, body))
    assert backend(daemon).installs[-1].rule_states[0] is RuleState.ENABLED  # off here
    answer = _answers(daemon)[-1]
    assert (answer.peer, answer.request_id) == (2, 42)
    assert json.loads(answer.body) == {"ok": False, "error": "remote control is off on host 1"}
    on = daemon.cfg.cluster.model_copy(update={"remote_control": True})
    daemon.cfg = daemon.cfg.model_copy(update={"cluster": on})
    daemon.remote.answered.clear()
    for seq in (2, 3):
        daemon.remote.on_request(Request(2, 5, seq, 1, 43, body))
    assert backend(daemon).installs[-1].rule_states[0] is RuleState.DISABLED
    done = [e for e in daemon.events if e["name"] == "remote_command"]
    assert len(done) == 1 and done[0]["peer"] == 2 and done[0]["command"] == "disable"
    again = _answers(daemon)[-2:]
    assert [a.request_id for a in again] == [43, 43] and json.loads(again[1].body)["ok"] is True
