"""The XDP screen in a namespace of its own: a veth pair, the program on one end, crafted
frames sent from the other, its verdicts read from its own counters; what a restarted daemon
takes over; that a change never drops what the states before and after both own; and a
staged change the kernel refuses, undone. Whole clusters with it run in tests/test_lab.py
(verify) and tests/test_e2e.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.dataplane import xdp
from shoal.lab.topology import pyenv
from tests.conftest import needs_root
from tests.nethelp import namespaces, sh

pytestmark = pytest.mark.beside  # times nothing: runs beside the lab tests

PROBE = r"""
import ipaddress, json, random, socket, struct, threading, time
from shoal.config import parse_config
from shoal.dataplane.backend import NftBackend
from shoal.dataplane.contract import Install, RuleState, bucket_token
from shoal.dataplane.nft import Nft, NftError
from shoal.dataplane.xdp import XdpScreen
from shoal.verdict import rule_bucket
from tests.conftest import example_doc

doc = example_doc()
doc["host"]["interface"] = "xa"
doc["host"]["dataplane"] = "xdp"
cfg = parse_config(doc)
cl = cfg.cluster
web = cl.effective_rules[0]                      # TCP 80-443, affinity single: SYNs checked
V4, V6 = ipaddress.ip_address("198.18.0.100"), ipaddress.ip_address("2001:db8::100")
rng = random.Random(5)

def bucket(src):
    return rule_bucket(cl, web, ipaddress.ip_address(src), 0)

def sources(v6, want, n):
    out = []
    while len(out) < n:
        s = (f"2001:db8:9::{rng.randrange(1, 1 << 16):x}" if v6
             else f"198.19.{rng.randrange(256)}.{rng.randrange(1, 255)}")
        if bucket(s) in want and s not in out:
            out.append(s)
    return out

OWNED = set(range(0, 4096, 2))                   # owned now
KEEP = OWNED | set(range(1, 2048, 2))            # and once owned: mid-stream packets pass
NEVER = set(range(4096)) - KEEP

sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
sock.bind(("xb", 0))
smac = sock.getsockname()[4]
dmac = bytes.fromhex(open("/sys/class/net/xa/address").read().strip().replace(":", ""))

def tcp(sport, dport, flags, length=20):
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 512, 0, 0)[:length]

def v4(src, l4, proto=6, frag=0x4000):
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, frag, 64, proto, 0,
                     ipaddress.ip_address(src).packed, V4.packed)
    return dmac + smac + b"\x08\x00" + ip + l4

def v6(src, l4, exts=()):
    chain = b""
    nxt = 6
    for kind in reversed(exts):                  # each an 8-byte header naming the next
        chain = struct.pack("!BB6x", nxt, 0) + chain
        nxt = kind
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(chain) + len(l4), nxt, 64,
                      ipaddress.ip_address(src).packed, V6.packed)
    return dmac + smac + b"\x86\xdd" + ip6 + chain + l4

SYN, ACK = 0x02, 0x10
sent = {"passed": 0, "never_owned": 0, "syn_unowned": 0, "malformed": 0}
frames = []
def add(verdict, frame):
    frames.append(frame)
    if verdict:
        sent[verdict] += 1

for fam in (False, True):
    mk = (lambda s, l4: v6(s, l4)) if fam else v4
    for s in sources(fam, OWNED, 20):
        add("passed", mk(s, tcp(40000, 80, SYN)))
    for s in sources(fam, KEEP - OWNED, 20):
        add("syn_unowned", mk(s, tcp(40000, 443, SYN)))
        add("passed", mk(s, tcp(40000, 443, ACK)))          # a connection of this host's
    for s in sources(fam, NEVER, 20):
        add("never_owned", mk(s, tcp(40000, 80, ACK)))
    for s in sources(fam, OWNED, 5):
        add("malformed", mk(s, tcp(40000, 80, SYN, length=10)))  # truncated
        add(None, mk(s, tcp(40000, 9999, SYN)))                  # no rule: not counted
# behind extension headers: hop-by-hop, destination options, a first fragment
for s in sources(True, KEEP - OWNED, 10):
    add("syn_unowned", v6(s, tcp(40000, 80, SYN), exts=(0, 60)))
for s in sources(True, OWNED, 10):
    add("passed", v6(s, tcp(40000, 80, SYN), exts=(0,)))
for s in sources(True, OWNED, 5):
    add("malformed", v6(s, tcp(40000, 80, SYN), exts=(60,) * 7))  # more than a client sends
for s in sources(False, NEVER, 5):
    add(None, v4(s, b"\0" * 16, frag=0x0010))                  # not the first fragment

out = {"mode": None}
screen = XdpScreen(cfg)
out["found_at_start"] = screen.attach()
out["mode"] = screen.mode
screen.change({0: ([], sorted(OWNED))}, {0: sorted(KEEP)})

def counts(s):
    c = s.counters()
    return {v: n["packets"] for v, n in c["web"].items()}, c[""]

before, _ = counts(screen)
for f in frames:
    sock.send(f)
time.sleep(0.3)
after, none = counts(screen)
got = {v: after[v] - before[v] for v in after}
got["malformed"] += none["malformed"]["packets"]
out["sent"], out["got"] = sent, got

# a restarted daemon takes over what the program holds
screen.close()
again = XdpScreen(cfg)
found = again.attach()
out["taken_over"] = found is not None and found[0][0] == OWNED and found[1][0] == KEEP

# SYNs into buckets owned before and after every change, while half the others flip
always = sources(False, set(range(0, 2048, 2)), 64)
flips = sorted(set(range(2048, 4096, 2)))
stop = threading.Event()
def blast():
    fs = [v4(s, tcp(41000, 80, SYN)) for s in always]
    n = 0
    while not stop.is_set() and n < 400_000:
        sock.send(fs[n % len(fs)])
        n += 1
    out["blasted"] = n
base, _ = counts(again)
t = threading.Thread(target=blast)
t.start()
for k in range(600):
    moves = (flips, []) if k % 2 == 0 else ([], flips)
    again.change({0: moves}, {})
stop.set()
t.join()
time.sleep(0.2)
end, _ = counts(again)
out["flips"] = 600
out["flip_syn_drops"] = end["syn_unowned"] - base["syn_unowned"]
out["flip_passed"] = end["passed"] - base["passed"]
# another cluster's daemon on this interface is refused, and this cluster's is untouched
import copy
from shoal.dataplane.contract import DataplaneError
other = copy.deepcopy(doc)
other["cluster"]["name"] = "other"
try:
    XdpScreen(parse_config(other)).attach()
    out["other_cluster"] = "attached"
except DataplaneError as e:
    out["other_cluster"] = str(e)
out["still_ours"] = again.held()["web"] == OWNED  # (600 flips: back where they began)
again.remove()

# the backend: a change the kernel refuses leaves the XDP bitmaps as they were
b = NftBackend(cfg)
b.create()
states = tuple(RuleState.ENABLED for _ in cl.effective_rules)
def tokens(bs):                                  # of the dns rule: UDP, owned in inet too
    return frozenset(bucket_token(1, x) for x in bs)
b.apply(Install(tokens(range(100)), True, states))
Nft().run(f"delete table inet {b.names.inet}")   # the next transaction fails for real
try:
    b.apply(Install(tokens(range(50, 150)), True, states))
    out["refused"] = False
except NftError:
    out["refused"] = True
out["held_after_refusal"] = sorted(b.first.screen.held()["dns"]) == list(range(100))
b.remove()
print(json.dumps(out))
"""


@needs_root()
def test_the_screen_drops_what_is_not_ours_and_flips_whole() -> None:
    """Every crafted frame gets the verdict it should (never owned, unowned SYN, once owned
    ACK, SYNs behind IPv6 extension headers, truncated headers, too many extension headers,
    later fragments, no rule), counted per rule and verdict; a new run takes the maps over;
    600 changes under a stream of SYNs drop none of those owned before and after each;
    a change the kernel refuses leaves the XDP program as it was; another cluster's daemon
    is refused the interface."""
    xdp.built()
    with namespaces("x") as ns:
        sh("ip", "link", "add", "name", "xa", "type", "veth", "peer", "name", "xb", ns=ns["x"])
        for dev in ("xa", "xb"):
            sh("ip", "link", "set", dev, "up", ns=ns["x"])
        res = subprocess.run(
            ["ip", "netns", "exec", ns["x"], sys.executable, "-c", PROBE],
            capture_output=True, text=True, env=pyenv(), timeout=120,
        )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    assert out["found_at_start"] is None and out["mode"] == "native"
    assert out["got"] == out["sent"], out
    assert out["sent"]["syn_unowned"] >= 50 and out["sent"]["malformed"] >= 15
    assert out["taken_over"]
    assert out["blasted"] > 1000 and out["flip_passed"] > 1000, out
    assert out["flip_syn_drops"] == 0, out
    assert out["refused"] and out["held_after_refusal"], out
    assert "another cluster's XDP program" in out["other_cluster"] and out["still_ours"], out


@given(st.data(), st.sampled_from([16, 4096, 16384, 65536]))
def test_the_bitmaps_written_have_bucket_b_at_bit_b(data: st.DataObject, size: int) -> None:
    """What the program reads: bucket b is bit b & 7 of byte b >> 3 (the daemon keeps a byte
    per bucket and packs them whole); and a bitmap read back gives the same buckets."""
    buckets = data.draw(st.sets(st.integers(0, size - 1), max_size=300))
    flags = bytearray(size)
    xdp._mark(flags, sorted(buckets), True)
    bits = xdp._pack(flags)
    assert len(bits) == xdp.WORDS * 8
    assert {b for b in range(xdp.WORDS * 64) if bits[b >> 3] >> (b & 7) & 1} == buckets
    assert xdp._unpack(bits, size) == flags
