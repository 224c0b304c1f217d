import ipaddress

import pytest
from typer.testing import CliRunner

from shoal.cli import app
from shoal.cluster_mac import ClusterMode, igmp_group, ip2mac


@pytest.mark.parametrize(
    ("mode", "mac"),
    [
        ("unicast", "02-bf-c6-12-00-64"),
        ("multicast", "03-bf-c6-12-00-64"),
        ("igmp", "01-00-5e-7f-00-64"),
    ],
)
def test_ip2mac_cli_prints_nlb_format(mode: str, mac: str) -> None:
    result = CliRunner().invoke(app, ["ip2mac", "198.18.0.100", "--mode", mode])
    assert result.exit_code == 0
    assert result.output == mac + "\n"


def test_ip2mac_default_mode_is_unicast() -> None:
    result = CliRunner().invoke(app, ["ip2mac", "198.18.0.100"])
    assert result.output == "02-bf-c6-12-00-64\n"


def test_ip2mac_rejects_bad_address() -> None:
    result = CliRunner().invoke(app, ["ip2mac", "198.18.0.300"])
    assert result.exit_code == 2
    assert "198.18.0.300" in result.output


def test_ip2mac_ipv6_uses_last_four_bytes() -> None:
    vip = ipaddress.ip_address("2001:db8::c612:64")
    assert ip2mac(vip, ClusterMode.UNICAST) == "02-bf-c6-12-00-64"


def test_igmp_group_matches_igmp_mac() -> None:
    vip = ipaddress.ip_address("198.18.1.200")
    group = igmp_group(vip)
    assert str(group) == "239.255.1.200"
    # RFC 1112: 01-00-5e + low 23 bits of the group
    low = int(group) & 0x7FFFFF
    mac = "01-00-5e-" + "-".join(f"{b:02x}" for b in low.to_bytes(3, "big"))
    assert mac == ip2mac(vip, ClusterMode.IGMP)
