"""Prometheus metrics of one daemon, served on the host's ``metrics_address`` by
prometheus-client's HTTP server, in a thread of its own.

A scrape reads the latest :class:`~shoal.daemon.reading.Reading` the loop published on the
:class:`~shoal.daemon.reading.Board` and the shared count of established connections; it
never touches the engine and never waits for the loop, so it cannot delay a heartbeat.
Convergence durations (from leaving ``converged``, or starting, to being converged again)
are observed from the engine's events.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from shoal.daemon.reading import Board
from shoal.protocol.events import Event, EventId
from shoal.protocol.frames import HostState, Rejection

STATES = [s.name.lower() for s in HostState]
_STARTS = {EventId.CONVERGING, EventId.CLUSTER_STARTED}
_ENDS = {EventId.CONVERGED, EventId.CONVERGED_DEFAULT}


class ShoalCollector(Collector):
    """Metric families from the latest :class:`Reading`."""

    def __init__(self, board: Board, established: Callable[[], dict[str, int]]) -> None:
        self.board = board
        self.established = established

    def collect(self) -> Iterator[Any]:
        r = self.board.reading  # one read: the loop replaces it whole
        if r is None:
            return
        snap = r.snapshot
        state = GaugeMetricFamily(
            "shoal_host_state", "This host's state (1 for the state it is in).", labels=["state"]
        )
        for name in STATES:
            state.add_metric([name], 1.0 if snap.state.name.lower() == name else 0.0)
        yield state
        yield GaugeMetricFamily(
            "shoal_default_host", "1 when this host is the cluster's default host.",
            value=1.0 if snap.default else 0.0,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "shoal_leader", "1 when this host leads the cluster.",
            value=1.0 if snap.leader == snap.host_id else 0.0,
        )  # fmt: skip
        hosts = GaugeMetricFamily(
            "shoal_hosts", "Hosts of the cluster this host hears (itself included), by state.",
            labels=["state"],
        )  # fmt: skip
        counts = dict.fromkeys(STATES, 0)
        counts[snap.state.name.lower()] += 1
        for p in snap.peers:
            counts[p.state.name.lower()] += 1
        for name in STATES:
            hosts.add_metric([name], float(counts[name]))
        yield hosts
        yield GaugeMetricFamily(
            "shoal_epoch", "The number of the epoch this host holds (0: none).",
            value=float(snap.epoch.number if snap.epoch else 0),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "shoal_lease_left_seconds", "Time left of this host's lease (0: none).",
            value=snap.lease_left or 0.0,
        )  # fmt: skip
        c = r.counters
        yield CounterMetricFamily(
            "shoal_frames_sent", "Heartbeat, map and proof frames sent.", value=c["frames_sent"]
        )
        yield CounterMetricFamily(
            "shoal_frames_received", "Frames the daemon read.", value=c["frames_received"]
        )
        rejected = CounterMetricFamily(
            "shoal_frames_rejected", "Frames dropped, by reason.", labels=["reason"]
        )
        for reason in sorted(r.value for r in Rejection):
            rejected.add_metric([reason], float(c.get(reason, 0)))
        yield rejected
        yield CounterMetricFamily(
            "shoal_epochs_created", "Epochs this host created as the leader.",
            value=c["epochs_created"],
        )  # fmt: skip
        drops = CounterMetricFamily(
            "shoal_socket_drops", "Frames a socket's queue had no room for.", labels=["socket"]
        )
        for sock, n in sorted(r.socket_drops.items()):
            drops.add_metric([sock], float(n))
        yield drops
        owned = GaugeMetricFamily(
            "shoal_rule_buckets_owned",
            "Buckets of a rule this host takes new connections for (a single rule: 1 if it "
            "handles it).",
            labels=["rule"],
        )
        for name, n in zip(r.rules, r.owned, strict=True):
            owned.add_metric([name], float(n))
        yield owned
        accepted = CounterMetricFamily(
            "shoal_rule_new_connections", "New connections the kernel accepted, per rule.",
            labels=["rule"],
        )  # fmt: skip
        dropped = CounterMetricFamily(
            "shoal_rule_dropped_packets", "Packets the kernel dropped, per rule.", labels=["rule"]
        )
        reset = CounterMetricFamily(
            "shoal_rule_dead_host_resets",
            "Mid-stream packets of a dead host's connections answered with a reset, per rule.",
            labels=["rule"],
        )
        for rc in r.rule_counters:
            accepted.add_metric([rc.rule], float(rc.accepted))
            dropped.add_metric([rc.rule], float(rc.dropped))
            reset.add_metric([rc.rule], float(rc.reset))
        yield accepted
        yield dropped
        yield reset
        if r.screen:
            screened = CounterMetricFamily(
                "shoal_xdp_packets",
                'Packets the XDP screen passed or dropped, per rule ("" for none) and verdict.',
                labels=["rule", "verdict"],
            )
            for rule, verdicts in r.screen.items():
                for verdict, tally in verdicts.items():
                    screened.add_metric([rule, verdict], float(tally["packets"]))
            yield screened
        open_now = GaugeMetricFamily(
            "shoal_rule_established_connections",
            "TCP connections to a VIP established on this host, per rule.",
            labels=["rule"],
        )
        for name, n in self.established().items():
            open_now.add_metric([name], float(n))
        yield open_now
        yield from _checks(r.checks)


def _checks(checks: tuple[dict[str, Any], ...]) -> Iterator[Any]:
    """This host's health checks: verdict, results and the last one's latency."""
    healthy = GaugeMetricFamily(
        "shoal_check_healthy", "1 while a health check's verdict is healthy.",
        labels=["check", "rule"],
    )  # fmt: skip
    results = CounterMetricFamily(
        "shoal_check_results", "Health check results, by outcome.", labels=["check", "result"]
    )
    latency = GaugeMetricFamily(
        "shoal_check_latency_seconds", "How long the last result of a check took.",
        labels=["check"],
    )  # fmt: skip
    for c in checks:
        healthy.add_metric([c["name"], c["rule"] or ""], 1.0 if c["healthy"] else 0.0)
        results.add_metric([c["name"], "success"], float(c["successes"]))
        results.add_metric([c["name"], "failure"], float(c["failures"]))
        if c["last_latency_ms"] is not None:
            latency.add_metric([c["name"]], c["last_latency_ms"] / 1000)
    yield healthy
    yield results
    yield latency


class Metrics:
    """The registry, what feeds it, and its HTTP server."""

    def __init__(self, board: Board, established: Callable[[], dict[str, int]]) -> None:
        self.registry = CollectorRegistry()
        self.collector = ShoalCollector(board, established)
        self.registry.register(self.collector)
        self.convergence = Histogram(
            "shoal_convergence_duration_seconds",
            "From leaving converged (or starting) to converged again.",
            buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
            registry=self.registry,
        )
        self._since: float | None = None
        self._server: Any = None

    def saw(self, event: Event) -> None:
        """Time a convergence from the engine's events."""
        if event.id in _STARTS and self._since is None:
            self._since = event.at
        elif event.id in _ENDS and self._since is not None:
            self.convergence.observe(max(0.0, event.at - self._since))
            self._since = None

    def serve(self, address: str, port: int) -> None:
        self._server, _ = start_http_server(port, addr=address, registry=self.registry)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
