"""``shoal filter`` without root: flows named as operators write them, the verdict from
an epoch and from the host files alone, and bad input refused by name. (Against real
connections: tests/test_daemon.py.)"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shoal.cli import app
from shoal.config import load_config
from shoal.dataplane.contract import RuleState
from shoal.filter import endpoint, fresh_view, view_of, where
from shoal.hashing import bucket_of
from shoal.protocol.epoch import next_epoch
from shoal.protocol.frames import EpochKey, RuleReport

IP = ipaddress.ip_address


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("198.51.100.7", (IP("198.51.100.7"), None)),
        ("198.51.100.7:40000", (IP("198.51.100.7"), 40000)),
        ("[2001:db8::7]:443", (IP("2001:db8::7"), 443)),
        ("2001:db8::7", (IP("2001:db8::7"), None)),
    ],
)
def test_a_flow_is_written_as_operators_write_it(text: str, want: object) -> None:
    assert endpoint(text, "client", port_needed=False) == want


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("198.51.100", "client: '198.51.100' is not an IP address"),
        ("198.51.100.7:99999", "client: port '99999' is not 0..65535"),
        ("[2001:db8::7", "client: '[2001:db8::7' is not [ADDRESS]:PORT"),
    ],
)
def test_a_bad_flow_is_refused_by_name(text: str, says: str) -> None:
    with pytest.raises(ValueError) as err:
        endpoint(text, "client", port_needed=False)
    assert str(err.value) == says


def test_offline_and_from_an_epoch_agree_with_the_hash(example_files: list[str]) -> None:
    """The web rule (affinity single) hashes the client address alone: the bucket is the
    jhash of the address; an epoch formed by all three hosts and the offline view name
    the same owner; a port no rule covers goes to the default host."""
    configs = [load_config(Path(f)) for f in example_files]
    cl = configs[0].cluster
    client, vip = IP("198.51.100.7"), IP("198.18.0.100")
    offline = where(cl, fresh_view(configs, {1, 2, 3}), client, 40000, vip, 80, "tcp")
    assert offline["rule"] == "web" and offline["hash_key"] == "198.51.100.7"
    assert offline["bucket"] == bucket_of(client, None, cl.seed, cl.buckets)
    reports = {
        c.host.host_id: tuple(
            RuleReport(c.weight(r.key), RuleState.ENABLED, c.priority(r.key))
            for r in cl.effective_rules
        )
        for c in configs
    }
    epoch = next_epoch(
        None, EpochKey(1, 1), frozenset({1, 2, 3}), frozenset(), (), (), reports,
        cl.effective_rules, cl.buckets,
    )  # fmt: skip
    online = where(cl, view_of(epoch, cl.effective_rules), client, 40000, vip, 80, "tcp")
    assert online == offline
    uncovered = where(cl, fresh_view(configs, {2, 3}), client, 1, vip, 9999, "udp")
    assert (uncovered["rule"], uncovered["host"]) == (None, 2)
    with pytest.raises(ValueError, match=r"vip: 198\.18\.0\.9 is not a VIP"):
        where(cl, fresh_view(configs, {1}), client, 1, IP("198.18.0.9"), 80, "tcp")
    with pytest.raises(ValueError, match="not of one IP version"):
        where(cl, fresh_view(configs, {1}), IP("2001:db8::7"), 1, vip, 80, "tcp")


def test_the_command_answers_offline_and_refuses_bad_arguments(example_files: list[str]) -> None:
    runner = CliRunner()
    files = [x for f in example_files for x in ("--config", f)]
    res = runner.invoke(app, ["filter", "198.51.100.7", "198.18.0.100:22", *files, "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert (doc["offline"], doc["rule"], doc["host"]) == (True, "ssh", 1)
    res = runner.invoke(app, ["filter", "198.51.100.7", "198.18.0.100:22", *files,
                              "--members", "2,3", "--json"])  # fmt: skip
    assert json.loads(res.output)["host"] == 2  # the next handling priority
    for args, says in [
        (["198.51.100.7", "198.18.0.100"], "VIP:PORT: '198.18.0.100' has no port"),
        (["198.51.100.7", "198.18.0.100:80", "--protocol", "sctp"], "--protocol: 'sctp'"),
        (["198.51.100.7", "198.18.0.100:80", "--members", "1"], "--members: only with --config"),
        (["198.51.100.7", "198.18.0.100:80", *files, "--members", "7"], "host 7 has no"),
    ]:
        res = runner.invoke(app, ["filter", *args])
        assert res.exit_code == 2 and says in res.output, (args, res.output)
