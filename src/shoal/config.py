"""Cluster and host configuration: TOML in, validated pydantic models out.

A host's file has a ``[cluster]`` section (with ``[[cluster.rules]]``), identical on every
host, and a ``[host]`` section (with ``[[host.rules]]``) of its own. The cluster digest
covers exactly what hosts must agree on to converge together; the key is not in it (a wrong
key already makes heartbeats fail authentication) and neither is the interface name, which
is local to each host.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from shoal.choices import (
    EQUAL,
    EQUAL_WEIGHT,
    MAX_AFFINITY_TIMEOUT,
    MAX_HOSTS,
    MAX_PORT,
    PROFILE_TIMING,
    XDP_MAX_RULES,
    XDP_MAX_VIPS,
    Affinity,
    AllUnhealthy,
    Dataplane,
    FilteringMode,
    InitialState,
    PartitionPolicy,
    Profile,
    Protocol,
)
from shoal.cluster_mac import ClusterMode
from shoal.config_errors import ConfigError, describe
from shoal.health.spec import Check, CheckKind
from shoal.keys import MIN_KEY, KeyProblems, read_keys
from shoal.protocol.codec import Keys

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

_STRICT = ConfigDict(extra="forbid", frozen=True)


class PortRule(BaseModel):
    """A VIP (or all) × port range × protocol, and how its traffic is shared."""

    model_config = _STRICT

    name: str | None = Field(default=None, min_length=1, max_length=64)
    vip: Literal["all"] | IPAddress = "all"
    start: int = Field(default=0, ge=0, le=MAX_PORT)
    end: int | None = Field(default=None, ge=0, le=MAX_PORT)
    protocol: Protocol = Protocol.BOTH
    mode: FilteringMode = FilteringMode.MULTIPLE
    affinity: Affinity = Affinity.SINGLE
    ipv4_prefix: int = Field(default=24, ge=1, le=32)
    ipv6_prefix: int = Field(default=64, ge=1, le=128)
    # kept in the digest (every host must agree on it): a client idle for less than this
    # keeps its host when its bucket moves (shoal.protocol.engine.handoff); 0: it does not
    affinity_timeout_s: int = Field(default=0, ge=0, le=MAX_AFFINITY_TIMEOUT)
    all_unhealthy: AllUnhealthy = AllUnhealthy.SERVE

    @model_validator(mode="after")
    def _sticky(self) -> PortRule:
        if self.affinity_timeout_s == 0:
            return self
        t = f"affinity_timeout_s = {self.affinity_timeout_s}"
        if self.mode is not FilteringMode.MULTIPLE:
            raise ValueError(f"{t}: only a multiple rule has affinity (mode is {self.mode.value})")
        if self.affinity is Affinity.NONE:
            raise ValueError(f"{t}: the rule has no client affinity (affinity is none)")
        if self.protocol is not Protocol.TCP:
            raise ValueError(
                f"{t}: affinity that outlives convergence is for TCP rules "
                f"(protocol is {self.protocol.value})"
            )
        return self

    @property
    def sticky(self) -> bool:
        """Whether a client keeps its host when its bucket moves (for the timeout)."""
        return self.affinity_timeout_s > 0

    @model_validator(mode="after")
    def _range(self) -> PortRule:
        if self.end is not None and self.end < self.start:
            raise ValueError(f"end port {self.end} is below start port {self.start}")
        return self

    @property
    def last(self) -> int:
        """Last port of the range (``end`` defaults to ``start``... or 65535 with start 0)."""
        if self.end is not None:
            return self.end
        return MAX_PORT if self.start == 0 else self.start

    @property
    def key(self) -> str:
        """The rule's name: given, or derived from its VIP, range and protocol."""
        if self.name:
            return self.name
        return f"{self.vip}:{self.start}-{self.last}/{self.protocol.value}"

    def overlaps(self, other: PortRule) -> bool:
        same_scope = str(self.vip) == str(other.vip)
        ports = self.start <= other.last and other.start <= self.last
        protos = (
            self.protocol is Protocol.BOTH
            or other.protocol is Protocol.BOTH
            or self.protocol is other.protocol
        )
        return same_scope and ports and protos


DEFAULT_RULE = PortRule(name="default", start=0, end=MAX_PORT)


class ClusterConfig(BaseModel):
    """What every host of the cluster must share."""

    model_config = _STRICT

    name: str = Field(default="shoal", min_length=1, max_length=64)
    primary_vip: IPAddress
    vips: list[IPAddress] = Field(default_factory=list)
    mode: ClusterMode = ClusterMode.UNICAST
    key: SecretStr | None = None
    key_file: Path | None = None
    accept_key_files: list[Path] = Field(default_factory=list, max_length=4)
    hash_seed: int | None = Field(default=None, ge=0, le=0xFFFFFFFF)
    buckets: int = Field(default=4096, ge=16, le=65536)
    profile: Profile = Profile.DEFAULT
    heartbeat_period_ms: int | None = Field(default=None, ge=10, le=10000)
    loss_tolerance: int | None = Field(default=None, ge=3, le=100)
    partition_policy: PartitionPolicy = PartitionPolicy.QUORUM
    # operators' verbs from another host of the cluster (shoal --host N, --all): off unless set
    remote_control: bool = False
    # the clients of a host known dead are answered with a reset by its buckets' new owners
    reset_dead_clients: bool = True
    interface: str = Field(default="eth0", min_length=1, max_length=15)
    rules: list[PortRule] = Field(default_factory=list)

    @field_validator("key")
    @classmethod
    def _key_len(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value().encode()) < MIN_KEY:
            raise ValueError(f"key must be at least {MIN_KEY} bytes")
        return v

    @model_validator(mode="after")
    def _cross(self) -> ClusterConfig:
        if (self.key is None) == (self.key_file is None):
            raise ValueError("give exactly one of key and key_file")
        seen: set[IPAddress] = {self.primary_vip}
        for i, vip in enumerate(self.vips):
            if vip in seen:
                raise ValueError(f"vips[{i}]: {vip} is listed twice")
            seen.add(vip)
        names: set[str] = set()
        for i, rule in enumerate(self.rules):
            if rule.vip != "all" and rule.vip not in seen:
                raise ValueError(f"rules[{i}].vip: {rule.vip} is not a cluster VIP")
            if rule.key in names:
                raise ValueError(f"rules[{i}].name: {rule.key!r} is used twice")
            names.add(rule.key)
            for j in range(i):
                if rule.overlaps(self.rules[j]):
                    raise ValueError(
                        f"rules[{i}] ({rule.key}, ports {rule.start}-{rule.last}) overlaps "
                        f"rules[{j}] ({self.rules[j].key}, ports "
                        f"{self.rules[j].start}-{self.rules[j].last})"
                    )
        return self

    @property
    def all_vips(self) -> list[IPAddress]:
        return [self.primary_vip, *self.vips]

    def rule(self, key: str) -> PortRule:
        """The rule with this name (KeyError if none)."""
        for r in self.effective_rules:
            if r.key == key:
                return r
        raise KeyError(key)

    @property
    def effective_rules(self) -> list[PortRule]:
        """The configured rules, or NLB's default rule when none is given."""
        return list(self.rules) if self.rules else [DEFAULT_RULE]

    @property
    def period_ms(self) -> int:
        return self.heartbeat_period_ms or PROFILE_TIMING[self.profile][0]

    @property
    def tolerance(self) -> int:
        return self.loss_tolerance or PROFILE_TIMING[self.profile][1]

    @property
    def seed(self) -> int:
        """The explicit jhash seed; without one, a seed derived from the primary VIP."""
        if self.hash_seed is not None:
            return self.hash_seed
        digest = hashlib.sha256(b"shoal-seed:" + self.primary_vip.packed).digest()
        return int.from_bytes(digest[:4], "big")

    def digest_document(self) -> dict[str, Any]:
        """Everything hosts must agree on, in canonical form."""
        return {
            "version": 1,
            "name": self.name,
            "vips": [str(v) for v in self.all_vips],
            "mode": self.mode.value,
            "seed": self.seed,
            "buckets": self.buckets,
            "period_ms": self.period_ms,
            "tolerance": self.tolerance,
            "partition_policy": self.partition_policy.value,
            "remote_control": self.remote_control,
            "reset_dead_clients": self.reset_dead_clients,
            "rules": [
                {
                    "name": r.key,
                    "vip": str(r.vip),
                    "start": r.start,
                    "end": r.last,
                    "protocol": r.protocol.value,
                    "mode": r.mode.value,
                    "affinity": r.affinity.value,
                    "ipv4_prefix": r.ipv4_prefix,
                    "ipv6_prefix": r.ipv6_prefix,
                    "affinity_timeout_s": r.affinity_timeout_s,
                    "all_unhealthy": r.all_unhealthy.value,
                }
                for r in self.effective_rules
            ],
        }

    def digest(self) -> str:
        """SHA-256 of the canonical digest document, hex."""
        doc = json.dumps(self.digest_document(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(doc.encode()).hexdigest()

    def heartbeat_digest(self) -> bytes:
        """The digest as heartbeats carry it: its first 8 bytes."""
        return bytes.fromhex(self.digest())[:8]


class HostRule(BaseModel):
    """This host's share of one port rule."""

    model_config = _STRICT

    rule: str = Field(min_length=1)
    load_weight: Literal["equal"] | Annotated[int, Field(ge=0, le=100)] = EQUAL
    handling_priority: int | None = Field(default=None, ge=1, le=MAX_HOSTS)

    @property
    def weight(self) -> int:
        return EQUAL_WEIGHT if self.load_weight == EQUAL else int(self.load_weight)


class HostConfig(BaseModel):
    """What is particular to one host."""

    model_config = _STRICT

    host_id: int = Field(ge=1, le=MAX_HOSTS)
    dedicated_ips: list[IPInterface] = Field(default_factory=list)
    initial_state: InitialState = InitialState.STARTED
    interface: str | None = Field(default=None, min_length=1, max_length=15)
    dataplane: Dataplane = Dataplane.NFTABLES
    rules: list[HostRule] = Field(default_factory=list)
    # Prometheus metrics on "ADDRESS:PORT" ("[ADDRESS]:PORT" for IPv6); off when unset
    metrics_address: str | None = None
    # the web view, read-only, on "ADDRESS:PORT"; off when unset
    web_address: str | None = None
    checks: list[Check] = Field(default_factory=list, max_length=64)

    @field_validator("metrics_address", "web_address")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None:
            split_endpoint(v)
        return v

    @property
    def metrics_endpoint(self) -> tuple[str, int] | None:
        return None if self.metrics_address is None else split_endpoint(self.metrics_address)

    @property
    def web_endpoint(self) -> tuple[str, int] | None:
        return None if self.web_address is None else split_endpoint(self.web_address)


def split_endpoint(text: str) -> tuple[str, int]:
    """``"198.18.0.11:9474"`` or ``"[2001:db8::11]:9474"`` as (address, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not ADDRESS:PORT with a port 1..65535")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    return host, int(port)


class ShoalConfig(BaseModel):
    """One host's whole configuration file."""

    model_config = _STRICT

    cluster: ClusterConfig
    host: HostConfig

    @model_validator(mode="after")
    def _host_rules(self) -> ShoalConfig:
        known = {r.key: r for r in self.cluster.effective_rules}
        seen: set[str] = set()
        for i, hr in enumerate(self.host.rules):
            if hr.rule not in known:
                raise ValueError(
                    f"host.rules[{i}].rule: {hr.rule!r} names no cluster rule "
                    f"(known: {', '.join(sorted(known))})"
                )
            if hr.rule in seen:
                raise ValueError(f"host.rules[{i}].rule: {hr.rule!r} is given twice")
            seen.add(hr.rule)
        vips = set(self.cluster.all_vips)
        for i, dip in enumerate(self.host.dedicated_ips):
            if dip.ip in vips:
                raise ValueError(f"host.dedicated_ips[{i}]: {dip.ip} is a cluster VIP")
        self._checks(known)
        if self.host.dataplane is Dataplane.XDP:
            rules, vips_n = len(self.cluster.effective_rules), len(self.cluster.all_vips)
            if rules > XDP_MAX_RULES:
                raise ValueError(
                    f"host.dataplane: 'xdp' takes {XDP_MAX_RULES} port rules at most "
                    f"(the cluster has {rules})"
                )
            if vips_n > XDP_MAX_VIPS:
                raise ValueError(
                    f"host.dataplane: 'xdp' takes {XDP_MAX_VIPS} VIPs at most "
                    f"(the cluster has {vips_n})"
                )
        return self

    def _checks(self, rules: dict[str, PortRule]) -> None:
        names: set[str] = set()
        targets: set[str | None] = set()
        for i, c in enumerate(self.host.checks):
            where = f"host.checks[{i}]"
            if c.key in names:
                raise ValueError(f"{where}.name: {c.key!r} is used twice")
            names.add(c.key)
            if c.rule in targets:
                what = f"rule {c.rule!r}" if c.rule else "the host"
                raise ValueError(f"{where}.rule: {what} has a check already (one each)")
            targets.add(c.rule)
            if c.rule is not None:
                rule = rules.get(c.rule)
                if rule is None:
                    raise ValueError(
                        f"{where}.rule: {c.rule!r} names no cluster rule "
                        f"(known: {', '.join(sorted(rules))})"
                    )
                if rule.mode is FilteringMode.DISABLED:
                    raise ValueError(f"{where}.rule: rule {c.rule!r} is disabled: nothing to check")
            needs_port = c.kind is not CheckKind.COMMAND and c.port is None
            if needs_port and (c.rule is None or rules[c.rule].start == 0):
                raise ValueError(f"{where}.port: give the port to check (no rule port to take)")

    def check_target(self, check: Check) -> tuple[IPAddress, int]:
        """Where a network check connects: its address, or this host's first dedicated
        address (the loopback without one); its port, or its rule's first port."""
        if check.address is not None:
            address: IPAddress = check.address
        elif self.host.dedicated_ips:
            address = self.host.dedicated_ips[0].ip
        else:
            address = ipaddress.IPv4Address("127.0.0.1")
        if check.port is not None:
            return address, check.port
        assert check.rule is not None
        return address, self.cluster.rule(check.rule).start

    @property
    def interface(self) -> str:
        return self.host.interface or self.cluster.interface

    def host_rule(self, rule: str) -> HostRule:
        for hr in self.host.rules:
            if hr.rule == rule:
                return hr
        return HostRule(rule=rule)

    def weight(self, rule: str) -> int:
        return self.host_rule(rule).weight

    def priority(self, rule: str) -> int:
        return self.host_rule(rule).handling_priority or self.host.host_id


def parse_config(data: dict[str, Any], source: str = "<config>") -> ShoalConfig:
    """Validate a parsed TOML document; raises ConfigError naming every problem."""
    try:
        return ShoalConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(source, describe(err)) from None


def load_config(path: Path) -> ShoalConfig:
    """Read and validate one host's TOML file, its keys included (see :mod:`shoal.keys`)."""
    return load_host(path)[0]


def load_host(path: Path) -> tuple[ShoalConfig, Keys]:
    """One host's TOML file, validated, and the keys it names, read once."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as err:
        raise ConfigError(str(path), [f"cannot read: {err.strerror}"]) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(str(path), [f"not valid TOML: {err}"]) from None
    cfg = parse_config(data, str(path))
    try:
        return cfg, read_keys(cfg.cluster, path)
    except KeyProblems as err:
        raise ConfigError(str(path), err.problems) from None


def check_cluster(configs: list[ShoalConfig], sources: list[str]) -> list[str]:
    """Problems that only show across hosts: digests, host ids, handling priorities."""
    problems: list[str] = []
    if not configs:
        return problems
    first = configs[0].cluster.digest()
    by_id: dict[int, str] = {}
    for cfg, src in zip(configs, sources, strict=True):
        if cfg.cluster.digest() != first:
            problems.append(
                f"{src}: cluster digest {cfg.cluster.digest()[:16]} differs from "
                f"{sources[0]}'s {first[:16]}"
            )
        hid = cfg.host.host_id
        if hid in by_id:
            problems.append(f"{src}: host.host_id {hid} is also used by {by_id[hid]}")
        by_id.setdefault(hid, src)
    for rule in configs[0].cluster.effective_rules:
        if rule.mode is not FilteringMode.SINGLE:
            continue
        prios: dict[int, str] = {}
        for cfg, src in zip(configs, sources, strict=True):
            p = cfg.priority(rule.key)
            if p in prios:
                problems.append(
                    f"{src}: handling_priority {p} for rule {rule.key!r} is also used by {prios[p]}"
                )
            prios.setdefault(p, src)
    return problems
