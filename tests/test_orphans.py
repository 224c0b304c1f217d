"""What the clients of a dead host come to, as pure functions: which buckets can be reset,
which a live host's connections keep, and the probes' frames."""

from __future__ import annotations

import ipaddress
import struct

from shoal.config import parse_config
from shoal.daemon import neighbour
from shoal.daemon.orphans import held_tokens, orphaned, reset_tokens
from shoal.dataplane.contract import DEFAULT_TOKEN, bucket_token, single_token
from shoal.dataplane.sockets import Conn
from shoal.verdict import rule_bucket
from tests.conftest import example_doc

CFG = parse_config(example_doc())
CL = CFG.cluster  # web: tcp multiple; dns: udp multiple; ssh: single; telnet: disabled


def test_only_buckets_of_rules_carrying_tcp_are_reset() -> None:
    tokens = frozenset({bucket_token(0, 5), bucket_token(1, 5), single_token(2), DEFAULT_TOKEN})
    assert reset_tokens(CL, tokens) == {bucket_token(0, 5)}


def test_a_bucket_a_live_host_holds_is_kept_and_an_unknown_answer_keeps_all() -> None:
    cands = frozenset({1, 2, 3, 4})
    assert orphaned(cands, [frozenset({2}), frozenset({4, 9})]) == {1, 3}
    assert orphaned(cands, []) == cands
    assert orphaned(cands, [frozenset(), None]) == frozenset()


def test_held_buckets_are_those_of_the_hosts_connections() -> None:
    web = CL.effective_rules[0]
    vip = ipaddress.ip_address("198.18.0.100")
    clients = [ipaddress.ip_address(f"198.19.0.{i}") for i in range(1, 40)]
    conns = [Conn(2, vip, 80, c, 40000 + i, 0, i) for i, c in enumerate(clients)]
    conns.append(Conn(2, vip, 9999, clients[0], 1, 0, 99))  # no rule: the default host's
    buckets = [rule_bucket(CL, web, c, 0) for c in clients]
    among = frozenset(bucket_token(0, b) for b in buckets[:10])
    assert held_tokens(CL, conns, among) == among
    assert held_tokens(CL, conns[10:], among) == among - {
        bucket_token(0, b) for b in buckets[:10] if b not in buckets[10:]
    }


def test_probe_frames_are_well_formed() -> None:
    mac = bytes.fromhex("02bfc6120064")
    me4, target4 = ipaddress.IPv4Address("198.18.0.11"), ipaddress.IPv4Address("198.18.0.13")
    req = neighbour.arp_request(mac, me4, target4)
    assert req[:6] == b"\xff" * 6 and req[12:14] == b"\x08\x06" and req[38:42] == target4.packed
    reply = bytearray(req)
    reply[20:22], reply[28:32] = b"\x00\x02", target4.packed
    assert neighbour.is_arp_reply(bytes(reply), target4)
    assert not neighbour.is_arp_reply(req, target4)  # a request is not an answer
    me6, target6 = ipaddress.IPv6Address("fe80::1"), ipaddress.IPv6Address("2001:db8::13")
    ns = neighbour.neighbour_solicitation(mac, me6, target6)
    assert ns[:6] == b"\x33\x33\xff\x00\x00\x13" and ns[54] == 135
    body, src, dst = ns[54:], ns[22:38], ns[38:54]
    pseudo = src + dst + struct.pack("!I3xB", len(body), 58)
    assert neighbour._checksum(pseudo + body) == 0  # the checksum checks
    na = bytearray(ns)
    na[54] = 136
    assert neighbour.is_advertisement(bytes(na), target6)
    assert not neighbour.is_advertisement(ns, target6)
