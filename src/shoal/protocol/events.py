"""Events the engine reports, with stable ids (NLB's numbers where NLB has the event)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any


class EventId(IntEnum):
    ENGINE_STARTED = 4
    CLUSTER_STARTED = 5
    CLUSTER_STOPPED = 6
    PARTITION_HEALED = 18
    RULE_ENABLED = 23
    RULE_DISABLED = 24
    RULE_COMMAND_REFUSED = 26
    CONVERGED = 28
    CONVERGED_DEFAULT = 29
    RELOADED = 36
    RULE_DRAINING = 39
    DRAIN_STARTED = 44
    DRAIN_INTERRUPTED = 45
    DRAIN_FINISHED = 46
    CONVERGING = 69
    HOST_JOINED = 100
    HOST_LEFT = 101
    CONFIG_MISMATCH = 102
    DUPLICATE_HOST_ID = 103
    NO_QUORUM = 104
    LEASE_LOST = 105
    EPOCH_CREATED = 106
    SUSPENDED = 107
    RESUMED = 108
    DRAIN_TIMEOUT = 109
    HEALTH_FAILED = 110
    HEALTH_RECOVERED = 111
    HEALTH_HELD = 112
    REMOTE_COMMAND = 113
    DEAD_HOST_CLIENTS = 114
    DEAD_HOST_SPARED = 115
    HANDOFF_SENT = 116
    HANDOFF_TAKEN = 117
    DRAIN_AFFINE_IDLE = 118
    HANDOFF_GIVEN_UP = 119
    DATAPLANE_ATTACHED = 120


TEMPLATES: dict[EventId, str] = {
    EventId.ENGINE_STARTED: "shoal engine started on host {host}, incarnation {incarnation}",
    EventId.CLUSTER_STARTED: "cluster operations started on host {host}",
    EventId.CLUSTER_STOPPED: "cluster operations stopped on host {host}",
    EventId.PARTITION_HEALED: (
        "two default hosts seen ({a} and {b}): the network may have been partitioned; "
        "converging to one cluster"
    ),
    EventId.RULE_ENABLED: "traffic enabled for rule {rule} on host {host}",
    EventId.RULE_DISABLED: "traffic disabled for rule {rule} on host {host}",
    EventId.RULE_COMMAND_REFUSED: "rule command {command} refused on host {host}: {reason}",
    EventId.CONVERGED: "host {host} converged with hosts {members} (epoch {epoch})",
    EventId.CONVERGED_DEFAULT: (
        "host {host} converged as default host with hosts {members} (epoch {epoch})"
    ),
    EventId.RELOADED: "configuration reloaded on host {host}: {what}",
    EventId.RULE_DRAINING: "new traffic disabled for rule {rule} on host {host} (draining)",
    EventId.DRAIN_STARTED: "connection draining started on host {host}",
    EventId.DRAIN_INTERRUPTED: "connection draining interrupted on host {host} by {command}",
    EventId.DRAIN_FINISHED: "connection draining finished on host {host}; host stopped",
    EventId.CONVERGING: "initiating convergence on host {host}: {reason}",
    EventId.HOST_JOINED: "host {peer} joined the cluster",
    EventId.HOST_LEFT: "host {peer} left the cluster: {reason}",
    EventId.CONFIG_MISMATCH: (
        "host {peer} has cluster digest {theirs}, this host has {ours}: kept out of the cluster"
    ),
    EventId.DUPLICATE_HOST_ID: "host id {peer} is used by two hosts: not converging with it",
    EventId.NO_QUORUM: (
        "hosts {live} are not a quorum of the last membership {members}: "
        "not taking over the others' traffic"
    ),
    EventId.LEASE_LOST: "lease expired on host {host}: too few hosts acknowledge it",
    EventId.EPOCH_CREATED: (
        "epoch {epoch} created by host {host}: members {members}, {moved} buckets move"
    ),
    EventId.SUSPENDED: "cluster operations suspended on host {host}",
    EventId.RESUMED: "cluster control resumed on host {host}",
    EventId.DRAIN_TIMEOUT: (
        "drain timeout on host {host}: remaining connections closed; host stopped"
    ),
    EventId.HEALTH_FAILED: "check {check} failing on host {host}: {effect} ({reason})",
    EventId.HEALTH_RECOVERED: "check {check} healthy again on host {host}: {effect} ({reason})",
    EventId.REMOTE_COMMAND: (
        "remote command {command} from host {peer} ({address}) on host {host}: {result}"
    ),
    EventId.DEAD_HOST_CLIENTS: (
        "host {host} resets the clients of dead host {peer} in {reset} of the {buckets} "
        "buckets it took over (live hosts hold connections in the others)"
    ),
    EventId.DEAD_HOST_SPARED: (
        "host {host} took over {buckets} buckets of host {peer} and resets none of their "
        "clients: {why}"
    ),
    EventId.HANDOFF_SENT: (
        "host {host} hands {clients} affine clients of rule {rule} in {buckets} buckets over "
        "to host {peer} (epoch {epoch})"
    ),
    EventId.HANDOFF_TAKEN: (
        "host {host} took host {peer}'s handoff of {clients} affine clients of rule {rule} "
        "(epoch {epoch})"
    ),
    EventId.HANDOFF_GIVEN_UP: (
        "host {host} gave its affine clients up: the kernel did not list them in time for "
        "epoch {epoch}"
    ),
    EventId.DATAPLANE_ATTACHED: "host {host} filters with {dataplane} on {interface}",
    EventId.DRAIN_AFFINE_IDLE: (
        "host {host} drains: its affine clients are idle or gone, it leaves the cluster"
    ),
    EventId.HEALTH_HELD: (
        "check {check} passes again on host {host}, but it flaps: back in service at the "
        "earliest in {wait_s} s"
    ),
}


@dataclass(frozen=True)
class Event:
    id: EventId
    at: float
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return TEMPLATES[self.id].format(**self.fields)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": int(self.id),
            "name": self.id.name.lower(),
            "at": self.at,
            "text": self.text,
            **self.fields,
        }
