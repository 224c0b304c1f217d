"""Health checks without root: what a check is (validated by name), how results become a
verdict (rise, fall, flap damping: a bound that holds however a check flaps, and that an
undamped verdict breaks), and what a verdict does to the cluster, on engines in the
simulator (a rule's share moves away and back, the all-fail policies, the host-wide check
drains, stops and starts the host)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.config import parse_config
from shoal.config_errors import ConfigError
from shoal.dataplane.contract import STRIDE, RuleState
from shoal.health.verdict import Verdict
from shoal.protocol.engine import Command
from shoal.protocol.frames import Health, HostState
from shoal.sim.checkers import InvariantViolation
from shoal.sim.cluster import SimCluster
from shoal.sim.scenario import KEY, cluster_configs, run_scenario
from tests.conftest import example_doc

P = 0.1
WEB = 0  # the web rule's index in the simulator's configurations
CHECK = {"rule": "web", "kind": "tcp"}


def _refused(check: dict[str, Any]) -> str:
    doc = example_doc()
    doc["host"]["checks"] = [check]
    with pytest.raises(ConfigError) as err:
        parse_config(doc, "h.toml")
    return str(err.value)


@pytest.mark.parametrize(
    ("check", "says"),
    [
        ({"rule": "web", "kind": "tcp", "path": "/"}, "path: only for http and https checks"),
        ({"rule": "web", "kind": "command", "command": ["true"]}, "not an absolute path"),
        ({"rule": "web", "kind": "command"}, "needs the command to run"),
        ({"rule": "web", "kind": "http", "timeout_ms": 3000}, "timeout_ms: 3000 is longer"),
        ({"kind": "tcp", "port": 80, "on_failure": "disable"}, "on_failure: a host-wide check"),
        ({"rule": "nope", "kind": "tcp"}, "host.checks[0].rule: 'nope' names no cluster rule"),
        ({"kind": "tcp"}, "host.checks[0].port: give the port to check"),
        ({"rule": "web", "kind": "http", "path": "x"}, "path: 'x' does not start with /"),
        ({"rule": "web", "kind": "tcp", "fall": 0}, "host.checks[0].fall"),
        ({"rule": "web", "kind": "ping"}, "host.checks[0].kind"),
    ],
)
def test_a_bad_check_is_refused_by_name(check: dict[str, Any], says: str) -> None:
    assert says in _refused(check)


def test_two_checks_for_one_rule_are_refused() -> None:
    doc = example_doc()
    doc["host"]["checks"] = [CHECK, {**CHECK, "name": "again"}]
    with pytest.raises(ConfigError) as err:
        parse_config(doc, "h.toml")
    assert "host.checks[1].rule: rule 'web' has a check already" in str(err.value)


def test_a_check_connects_to_the_dedicated_address_and_the_rules_port() -> None:
    doc = example_doc()
    doc["host"]["checks"] = [CHECK]
    cfg = parse_config(doc, "h.toml")
    address, port = cfg.check_target(cfg.host.checks[0])
    assert (str(address), port) == (str(cfg.host.dedicated_ips[0].ip), 80)


# ------------------------------------------------------------------- the verdict


def test_fall_failures_take_it_out_and_rise_successes_bring_it_back() -> None:
    v = Verdict(rise=2, fall=3, flap_limit=2, flap_window=60)
    assert [v.observe(ok, t) for t, ok in enumerate([False, False, True, False, False])] == [
        None] * 5  # fmt: skip
    assert v.observe(False, 5) is False  # the third failure in a row
    assert v.observe(True, 6) is None and v.observe(True, 7) is True


def _changes_in_windows(v: Verdict, results: list[tuple[float, bool]]) -> int:
    """The most verdict changes in any window of the verdict's length."""
    times = [t for t, ok in results if v.observe(ok, t) is not None]
    return max((sum(1 for u in times if t <= u < t + v.flap_window) for t in times), default=0)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0.1, 5.0), st.booleans()), max_size=300),
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(1, 4),
)
def test_no_flapping_makes_more_changes_than_the_bound(
    steps: list[tuple[float, bool]], rise: int, fall: int, limit: int
) -> None:
    """Whatever a check does, its verdict changes at most 2 × flap_limit + 1 times in any
    window: each return to service is one of at most flap_limit, and follows a going-out."""
    t, results = 0.0, []
    for dt, ok in steps:
        t += dt
        results.append((t, ok))
    v = Verdict(rise, fall, limit, 60.0)
    assert _changes_in_windows(v, results) <= 2 * limit + 1


def test_an_alternating_check_is_damped_and_an_undamped_one_is_not() -> None:
    """A check that passes twice and fails three times, every interval, for ten minutes:
    damped, at most 5 changes a minute; with damping off (the broken variant), 12."""
    pattern = [True, True, False, False, False] * 240
    results = [(2.0 * i, ok) for i, ok in enumerate(pattern)]
    damped = _changes_in_windows(Verdict(2, 3, 2, 60.0), results)
    undamped = _changes_in_windows(Verdict(2, 3, 10**6, 60.0), results)
    assert damped <= 5 < undamped == 12


# ---------------------------------------------------------- verdicts in the cluster


def _cluster(n: int = 3, **kw: Any) -> SimCluster:
    sim = SimCluster(cluster_configs(n, buckets=64, checks=[CHECK], **kw), KEY, 1)
    sim.run_until(20 * P)
    assert sim.converged(set(range(1, n + 1)))
    return sim


def _web_share(sim: SimCluster, host: int) -> int:
    return sum(1 for t in sim.hosts[host].kernel.accepting(sim.now) if 0 <= t < STRIDE)


def _kernel_state(sim: SimCluster, host: int) -> RuleState:
    """The web rule's state in what the host's engine asks its kernel to enforce."""
    e = sim.hosts[host].engine
    assert e is not None
    return e.install.rule_states[WEB]


def _state(sim: SimCluster, host: int) -> HostState:
    e = sim.hosts[host].engine
    assert e is not None
    return e.state


def test_a_failing_rule_check_gives_the_share_up_and_back() -> None:
    """Host 2's web check fails: host 2 stays a converged member, the others hold every web
    bucket, and every host reports host 2's web rule failing; it passes again: the web
    buckets are shared by three again."""
    sim = _cluster()
    sim.health(2, WEB, False)
    sim.run_until(sim.now + 20 * P)
    assert sim.converged({1, 2, 3}) and _web_share(sim, 2) == 0
    assert _web_share(sim, 1) + _web_share(sim, 3) == 64
    snap = sim.hosts[1].engine.snapshot(sim.now)  # type: ignore[union-attr]
    [peer2] = [p for p in snap.peers if p.host_id == 2]
    assert peer2.rules[WEB].health is Health.FAILING
    assert _kernel_state(sim, 2) is RuleState.ENABLED  # drain
    sim.health(2, WEB, True)
    sim.run_until(sim.now + 20 * P)
    assert sim.converged({1, 2, 3}) and min(_web_share(sim, h) for h in (1, 2, 3)) == 21


def test_disable_on_failure_drops_established_connections_once_the_share_moved() -> None:
    sim = SimCluster(
        cluster_configs(3, buckets=64, checks=[{**CHECK, "on_failure": "disable"}]), KEY, 1
    )
    sim.run_until(20 * P)
    sim.health(2, WEB, False)
    sim.run_until(sim.now + 20 * P)
    assert _web_share(sim, 2) == 0
    assert _kernel_state(sim, 2) is RuleState.DISABLED


@pytest.mark.parametrize(("policy", "shared_by"), [("serve", {1, 2, 3}), ("drop", set())])
def test_when_every_host_fails_the_policy_decides(policy: str, shared_by: set[int]) -> None:
    """Every host's web check fails: with "serve" all three keep sharing the web rule (as if
    healthy); with "drop" nobody takes its new connections. The ssh rule is untouched."""
    sim = _cluster(all_unhealthy=policy)
    for h in (1, 2, 3):
        sim.health(h, WEB, False)
    sim.run_until(sim.now + 30 * P)
    assert sim.converged({1, 2, 3})
    assert {h for h in (1, 2, 3) if _web_share(sim, h)} == shared_by
    ssh = [h for h in (1, 2, 3) if STRIDE + 65536 in sim.hosts[h].kernel.accepting(sim.now)]
    assert len(ssh) == 1


def test_the_host_check_drains_stops_and_starts_the_host() -> None:
    """The host-wide check fails on host 3: it drains (as drainstop), and with no connection
    left it stops; the check passes again: it starts and converges. After an operator's
    stop, passing again does not start it."""
    sim = _cluster()
    sim.set_connections(3, 0)
    sim.health(3, None, False)
    assert _state(sim, 3) is HostState.DRAINING
    sim.run_until(sim.now + 20 * P)
    assert _state(sim, 3) is HostState.STOPPED and sim.converged({1, 2})
    sim.health(3, None, True)
    sim.run_until(sim.now + 20 * P)
    assert sim.converged({1, 2, 3})
    sim.health(3, None, False)
    sim.command(3, Command.STOP)
    sim.health(3, None, True)
    sim.run_until(sim.now + 20 * P)
    assert _state(sim, 3) is HostState.STOPPED


def test_params_and_metrics_show_a_checks_results() -> None:
    """Two results of a check, as ``params`` lists them and as Prometheus reads them."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from shoal.daemon.health import Checks, Result
    from shoal.daemon.metrics import _checks

    doc = example_doc()
    doc["host"]["checks"] = [{**CHECK, "fall": 1}]
    checks = Checks.of(parse_config(doc, "h.toml"))
    checks.observe(Result("rule:web", True, "connected", 1.5, 0.0), 0.0)
    st, change = checks.observe(Result("rule:web", False, "refused", 0.5, 2.0), 2.0)
    assert change is False and st.rule == WEB
    [d] = checks.docs()
    assert (d["healthy"], d["successes"], d["failures"], d["last_detail"]) == (
        False, 1, 1, "refused")  # fmt: skip
    assert d["target"] == "198.18.0.11:80" and d["last_latency_ms"] == 0.5

    class Collector:
        def collect(self) -> Any:
            return _checks(tuple(checks.docs()))

    registry = CollectorRegistry()
    registry.register(Collector())
    text = generate_latest(registry).decode()
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    assert got[("shoal_check_healthy", (("check", "rule:web"), ("rule", "web")))] == 0
    assert got[("shoal_check_results_total", (("check", "rule:web"), ("result", "failure")))] == 1
    assert got[("shoal_check_latency_seconds", (("check", "rule:web"),))] == 0.0005


@pytest.mark.parametrize("seed", range(30))
def test_random_scenarios_with_health_faults_keep_the_contract(seed: int) -> None:
    """Checks failing and passing again on any host, for a rule or the whole host, among
    crashes, partitions, loss and verbs, under either all_unhealthy policy: every checker
    holds after every input (nothing accepted twice; every epoch balanced as health says),
    and the cluster converges once all is repaired. Seeds replay:
    ``run_scenario(seed, health=True)``."""
    assert run_scenario(seed, health=True).steps


def test_a_leader_that_ignores_health_is_caught() -> None:
    """The broken variant: a leader that gives failing hosts their share anyway. The
    balance checker, which states the health rule on its own, stops the first scenario
    where that matters."""
    import shoal.protocol.epoch as epoch

    def ignoring(rule: Any, reports: Any) -> frozenset[int]:
        return frozenset(h for h, r in reports if r.state is RuleState.ENABLED)

    real = epoch.serving_hosts
    epoch.serving_hosts = ignoring
    try:
        with pytest.raises(InvariantViolation, match="balanced"):
            for seed in range(30):
                run_scenario(seed, health=True)
    finally:
        epoch.serving_hosts = real
