"""The host runtime and the data-plane contract: a refused install, the renewal rule.

No root: the nftables backend runs against a recording stand-in for libnftables (what it
sends is what the kernel tests check for real), and the runtime against the simulator's
kernel model.
"""

from __future__ import annotations

from typing import Any

from shoal.dataplane.backend import NftBackend
from shoal.dataplane.contract import DataplaneError, Install, RuleState, bucket_token
from shoal.dataplane.nft import NftError
from shoal.protocol.codec import Keys
from shoal.protocol.engine import Engine
from shoal.protocol.frames import HostState
from shoal.runtime import HostRuntime, Output
from shoal.sim.checkers import InvariantViolation
from shoal.sim.cluster import Kernel, SimCluster
from shoal.sim.scenario import KEY, cluster_configs

CFG = cluster_configs(3, buckets=64, extra_rule=True)[0]
STATES = (RuleState.ENABLED,) * len(CFG.cluster.effective_rules)


class RecordingNft:
    """libnftables' JSON entry point, refusing the next ``refuse`` transactions."""

    def __init__(self, refuse: int = 0) -> None:
        self.refuse = refuse
        self.sent: list[list[dict[str, Any]]] = []

    def run(self, commands: str) -> str:
        return ""

    def json(self, commands: list[dict[str, Any]]) -> dict[str, Any]:
        if self.refuse:
            self.refuse -= 1
            raise NftError("Error: Could not process rule: No buffer space available")
        self.sent.append(commands)
        return {}


def test_a_refused_install_is_sent_again_in_full() -> None:
    """The backend's view of the kernel moves only when the kernel accepted: after a
    refusal, the retry computes and sends the very transaction that was refused (it used to
    record the new sets first, so the retry found nothing to change and reported success)."""
    nft = RecordingNft()
    backend = NftBackend(CFG, nft)  # type: ignore[arg-type]
    backend.create()
    first = Install(frozenset(bucket_token(0, b) for b in range(32)), True, STATES)
    backend.apply(first)
    second = Install(frozenset(bucket_token(0, b) for b in range(16, 48)), True, STATES)
    nft.refuse = 1
    try:
        backend.apply(second)
    except NftError:
        pass
    else:
        raise AssertionError("the refusal did not reach the caller")
    assert backend.tokens == first.tokens
    backend.apply(second)
    sent = nft.sent[-1]
    deleted = [c["delete"]["element"] for c in sent if "delete" in c]
    added = [c["add"]["element"] for c in sent if "add" in c]
    assert {tuple(d["elem"]) for d in deleted} == {tuple(range(16))}
    assert tuple(range(32, 48)) in {tuple(a["elem"]) for a in added}
    assert backend.tokens == second.tokens
    backend.apply(second)
    assert nft.sent[-1] is sent  # now nothing is left to send


def test_no_heartbeat_leaves_until_the_kernel_takes_the_install() -> None:
    """Host 3's daemon restarts while its kernel refuses installs: its first install (let
    go of what the last run held) is refused, and not one frame of the new run leaves until
    the kernel takes it; then it converges again."""
    sim = SimCluster(cluster_configs(3), KEY, seed=5)
    sim.run_until(20 * sim.period)
    assert sim.converged({1, 2, 3})
    three = sim.hosts[3]
    sim.crash_daemon(3)
    three.kernel.refuse_until = sim.now + 10 * sim.period
    sim.restart_daemon(3)
    sim.run_until(sim.now + 9 * sim.period)
    assert three.frames_withheld > 0 and three.kernel.refused > 0
    engine, heard = three.engine, sim.hosts[1].engine
    assert engine is not None and heard is not None
    assert heard.peers[3].incarnation < engine.incarnation  # not a frame of the new run
    sim.run_until(sim.now + 30 * sim.period)
    assert sim.converged({1, 2, 3}) and sim.covered() and sim.check_exclusive


def join_while_refused(runtime: type[HostRuntime]) -> SimCluster:
    """Hosts 1 and 2 converged; host 3 joins while host 2's kernel refuses installs for
    three periods, among them the one that releases what host 3 is to get."""
    sim = SimCluster(cluster_configs(3), KEY, seed=11, runtime=runtime)
    sim.crash_host(3)
    sim.run_until(20 * sim.period)
    assert sim.converged({1, 2})
    sim.hosts[2].kernel.refuse_until = sim.now + 3 * sim.period
    sim.restart_host(3)
    sim.run_until(sim.now + 30 * sim.period)
    return sim


def test_a_refused_release_stays_off_the_wire() -> None:
    """Host 2's heartbeats would report a release its kernel refused: they are withheld
    until the kernel takes it, so the leader cannot declare the epoch READY and host 3
    takes nothing host 2 still accepts (checked at every step)."""
    sim = join_while_refused(HostRuntime)
    two = sim.hosts[2]
    assert two.kernel.refused > 0 and two.frames_withheld > 0
    assert sim.converged({1, 2, 3}) and sim.covered() and sim.check_exclusive


class Unguarded(HostRuntime):
    """A broken runtime: sends the frames of a step whose install the kernel refused."""

    def _install(self, inst: Install, out: Output) -> bool:
        super()._install(inst, out)
        return True


def test_the_simulator_catches_a_runtime_that_reports_a_refused_release() -> None:
    """The negative control of the test above: with frames sent despite the refusal, two
    hosts accept the same new connections, and the simulator says so."""
    try:
        join_while_refused(Unguarded)
    except InvariantViolation as e:
        assert "exclusive" in str(e)
    else:
        raise AssertionError("the broken runtime went unnoticed")


class CountingKernel(Kernel):
    def __init__(self, now: list[float]) -> None:
        super().__init__(lambda: now[0])
        self.renewals: list[int] = []

    def renew(self, ms: int) -> None:
        self.renewals.append(ms)
        super().renew(ms)


def test_the_kernel_lease_never_outruns_the_engine_and_is_renewed_before_it_ends() -> None:
    """One host alone: its engine's lease moves at every step; the kernel's is set only
    once less than half a lease and a period are left, to no later than the engine's."""
    cfg = cluster_configs(1)[0]
    now = [0.0]
    engine = Engine(cfg, Keys(KEY), 1, now[0])
    kernel = CountingKernel(now)
    rt = HostRuntime(engine, kernel, lambda record, vote: None)
    steps = 0
    while now[0] < 10.0:
        now[0] = round(now[0] + 0.01, 6)
        engine.tick(now[0])
        rt.after(now[0])
        steps += 1
        if engine.state is HostState.CONVERGED:
            assert engine.lease_until is not None
            assert now[0] < kernel.lease_until <= engine.lease_until
    assert engine.state is HostState.CONVERGED
    assert 0 < len(kernel.renewals) < steps / 5  # not at every step


class RefusingRenewals(CountingKernel):
    refuse = True

    def renew(self, ms: int) -> None:
        if self.refuse:
            raise DataplaneError("lease: nf_tables refused it (No buffer space available)")
        super().renew(ms)


def test_a_refused_renewal_is_reported_and_tried_again() -> None:
    """The kernel keeps the lease it had (it runs out on its own); the refusal is reported,
    and the next input renews it."""
    cfg = cluster_configs(1)[0]
    now = [0.0]
    engine = Engine(cfg, Keys(KEY), 1, now[0])
    kernel = RefusingRenewals(now)
    rt = HostRuntime(engine, kernel, lambda record, vote: None)
    problems: list[str] = []
    while engine.state is not HostState.CONVERGED:
        now[0] = round(now[0] + 0.01, 6)
        engine.tick(now[0])
        problems += [p["name"] for p in rt.after(now[0]).problems]
    assert problems == ["lease_renewal_failed"] and kernel.lease_until == float("-inf")
    kernel.refuse = False
    now[0] += 0.01
    engine.tick(now[0])
    assert not rt.after(now[0]).problems and kernel.lease_until > now[0]
