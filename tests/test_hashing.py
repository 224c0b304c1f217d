"""The bucket hash: lookup3's published vectors, and the real kernel's nft ``jhash``."""

from __future__ import annotations

import ipaddress
import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.hashing import affinity_address, bucket_of, hash_key, jhash, reciprocal_scale
from shoal.lab.topology import veth
from tests.conftest import needs_root
from tests.nethelp import namespaces, python_in, sh

pytestmark = pytest.mark.beside  # times nothing: runs beside the lab tests


def test_lookup3_published_vectors() -> None:
    # Bob Jenkins' lookup3.c driver5(): hashlittle() equals the kernel's jhash()
    assert jhash(b"", 0) == 0xDEADBEEF
    assert jhash(b"", 0xDEADBEEF) == 0xBD5B7DDE
    assert jhash(b"Four score and seven years ago", 0) == 0x17770551
    assert jhash(b"Four score and seven years ago", 1) == 0xCD628161


def test_key_layout_pads_each_field_to_four_bytes() -> None:
    v4 = ipaddress.ip_address("198.18.0.1")
    assert hash_key(v4, 0x1234) == bytes([198, 18, 0, 1, 0x12, 0x34, 0, 0])
    v6 = ipaddress.ip_address("2001:db8::1")
    assert len(hash_key(v6, 80)) == 20 and len(hash_key(v6, None)) == 16


def test_network_affinity_masks_the_address() -> None:
    assert str(affinity_address(ipaddress.ip_address("198.18.7.99"), 24)) == "198.18.7.0"
    assert str(affinity_address(ipaddress.ip_address("2001:db8:1:2:3::9"), 64)) == "2001:db8:1:2::"


@given(h=st.integers(0, 2**32 - 1), n=st.integers(1, 65536))
def test_reciprocal_scale_stays_in_range(h: int, n: int) -> None:
    assert 0 <= reciprocal_scale(h, n) < n


# --- against the kernel ---------------------------------------------------------------------

CASES = [
    # (family, key expression, prefix, with port, modulus)
    (4, "ip saddr . udp sport", None, True, 4096),
    (4, "ip saddr", None, False, 4096),
    (4, "ip saddr & 255.255.255.0", 24, False, 1000),
    (6, "ip6 saddr . udp sport", None, True, 4096),
    (6, "ip6 saddr", None, False, 16384),
    (6, "ip6 saddr & ffff:ffff:ffff:ffff::", 64, False, 60),
]


def _sources(family: int, rng: random.Random, n: int) -> list[tuple[str, int]]:
    out = []
    for _ in range(n):
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address
        if family == 4:
            addr = ipaddress.IPv4Address(
                int(ipaddress.IPv4Address("198.19.0.0")) + rng.randrange(2**16)
            )
        else:
            base = int(ipaddress.IPv6Address("2001:db8:8000::"))
            addr = ipaddress.IPv6Address(base + rng.randrange(2**95))
        out.append((str(addr), rng.randrange(1024, 65536)))
    return out


@needs_root()
@pytest.mark.root
@pytest.mark.parametrize(("family", "expr", "prefix", "with_port", "mod"), CASES)
def test_kernel_jhash_agrees_bit_for_bit(
    tmp_path: Path, family: int, expr: str, prefix: int | None, with_port: bool, mod: int
) -> None:
    """Half the buckets are owned; exactly the predicted datagrams must get through nft."""
    rng = random.Random(f"{expr}/{mod}")
    seed = rng.randrange(2**32)
    owned = sorted(rng.sample(range(mod), mod // 2))
    flows = _sources(family, rng, 600)
    with namespaces("tx", "rx") as ns:
        veth("tx0", ns["tx"], "rx0", ns["rx"])
        for side, dev in (("tx", "tx0"), ("rx", "rx0")):
            sh("ip", "link", "set", dev, "up", ns=ns[side])
        sh(
            "sysctl",
            "-qw",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.rx0.rp_filter=0",
            ns=ns["rx"],
        )
        sh("ip", "addr", "add", "198.18.0.2/24", "dev", "rx0", ns=ns["rx"])
        sh("ip", "addr", "add", "2001:db8::2/64", "dev", "rx0", "nodad", ns=ns["rx"])
        rx_mac = sh("cat", "/sys/class/net/rx0/address", ns=ns["rx"]).strip()
        elements = ", ".join(map(str, owned))
        ruleset = f"""
        table inet shoaltest {{
          set owned {{ typeof jhash ip saddr mod {mod}; elements = {{ {elements} }} }}
          chain pre {{ type filter hook prerouting priority -300; policy accept;
            udp dport 9999 jhash {expr} mod {mod} seed {seed:#x} != @owned drop
          }}
        }}
        """
        sh("nft", "-f", "-", ns=ns["rx"], input=ruleset)
        dst = "198.18.0.2" if family == 4 else "2001:db8::2"
        plan = tmp_path / "flows.txt"
        plan.write_text("".join(f"{s} {dst} {p} 9999\n" for s, p in flows))
        receiver = python_in(ns["rx"], "recv", "9999", "2.0")
        assert receiver.stdout is not None
        assert receiver.stdout.readline().strip() == "ready"
        sender = python_in(ns["tx"], "send", "tx0", rx_mac, str(plan))
        assert sender.wait(timeout=60) == 0, sender.stderr.read() if sender.stderr else ""
        got_text, _ = receiver.communicate(timeout=130)
    got = {
        (ipaddress.ip_address(a), int(p)) for a, p in (ln.split() for ln in got_text.splitlines())
    }
    owned_set = set(owned)
    expected = set()
    for s, p in flows:
        addr = affinity_address(ipaddress.ip_address(s), prefix)
        if bucket_of(addr, p if with_port else None, seed, mod) in owned_set:
            expected.add((ipaddress.ip_address(s), p))
    assert len(expected) > 200  # the test says something only if many flows pass and many drop
    assert got == expected
