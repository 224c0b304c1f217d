"""The reference verdict: rule lookup, default host, single, disabled, multiple."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from shoal.bucket_map import rebalance
from shoal.config import parse_config
from shoal.verdict import ClusterView, Outcome, Packet, decide, find_rule, rule_bucket
from tests.conftest import example_doc

CFG = parse_config(example_doc())
CL = CFG.cluster
VIP4 = ipaddress.ip_address("198.18.0.100")
VIP6 = ipaddress.ip_address("2001:db8::100")
MAPS = {r.key: rebalance(None, {1: 50, 2: 50, 3: 100}, CL.buckets) for r in CL.effective_rules}
VIEW = ClusterView(default_host=1, maps=MAPS, single_owner={"ssh": 2})
CLIENT = ipaddress.ip_address("198.18.100.7")


def pkt(
    dport: int,
    proto: str = "tcp",
    src: str = "198.18.100.7",
    sport: int = 40000,
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address = VIP4,
) -> Packet:
    return Packet(ipaddress.ip_address(src), dst, proto, sport, dport)


def test_uncovered_port_goes_to_default_host() -> None:
    d = decide(CL, VIEW, pkt(8080))
    assert (d.outcome, d.host, d.rule) == (Outcome.OWNER, 1, None)


def test_disabled_rule_drops() -> None:
    assert decide(CL, VIEW, pkt(23, "udp")).outcome is Outcome.DROP


def test_single_rule_goes_to_handler() -> None:
    assert decide(CL, VIEW, pkt(22)).host == 2
    nobody = ClusterView(default_host=1, maps=MAPS, single_owner={"ssh": None})
    assert decide(CL, nobody, pkt(22)).outcome is Outcome.DROP


def test_dedicated_ip_and_other_protocols_pass() -> None:
    assert (
        decide(CL, VIEW, pkt(80, dst=ipaddress.ip_address("198.18.0.11"))).outcome is Outcome.PASS
    )
    assert decide(CL, VIEW, pkt(0, "icmp")).outcome is Outcome.PASS


def test_protocol_must_match_rule() -> None:
    assert find_rule(CL, VIP4, "udp", 80) is None  # web is tcp only
    rule = find_rule(CL, VIP6, "udp", 53)
    assert rule is not None and rule.key == "dns"


@given(src=st.ip_addresses(v=4), sport=st.integers(1, 65535), sport2=st.integers(1, 65535))
def test_single_affinity_ignores_the_port(
    src: ipaddress.IPv4Address, sport: int, sport2: int
) -> None:
    a = decide(CL, VIEW, pkt(80, src=str(src), sport=sport))
    b = decide(CL, VIEW, pkt(443, src=str(src), sport=sport2))
    assert a.host == b.host and a.bucket == b.bucket


@given(host=st.integers(0, 255), other=st.integers(0, 255))
def test_network_affinity_keeps_a_slash24_together(host: int, other: int) -> None:
    a = decide(CL, VIEW, pkt(53, "udp", src=f"198.18.77.{host}"))
    b = decide(CL, VIEW, pkt(53, "udp", src=f"198.18.77.{other}", sport=999))
    assert a.host == b.host


def test_multiple_rule_follows_the_map() -> None:
    seen: dict[int | None, int] = {}
    for i in range(2000):
        src = f"198.19.{i // 250}.{i % 250}"
        d = decide(CL, VIEW, pkt(80, src=src))
        rule = find_rule(CL, VIP4, "tcp", 80)
        assert rule is not None
        assert d.bucket == rule_bucket(CL, rule, ipaddress.ip_address(src), 40000)
        assert d.host == MAPS["web"][d.bucket]
        seen[d.host] = seen.get(d.host, 0) + 1
    # weights 50/50/100: host 3 gets about half
    assert 850 < seen[3] < 1150 and 400 < seen[1] < 600
