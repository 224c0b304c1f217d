"""Validation: every refusal names the field and the value; digests cover what must match."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from shoal.cli import app
from shoal.config import parse_config
from shoal.config_errors import ConfigError
from tests.conftest import EXAMPLES, example_doc, write_private


def refused(doc: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    return "; ".join(info.value.problems)


def test_examples_are_valid_and_agree(example_files: list[str]) -> None:
    result = CliRunner().invoke(app, ["check", *example_files])
    assert result.exit_code == 0, result.output
    digests = {line.rsplit(" ", 1)[1] for line in result.output.splitlines()}
    assert len(digests) == 1


def test_unknown_key_is_named(tmp_path: Path) -> None:
    text = (EXAMPLES / "host1.toml").read_text().replace("[host]\n", "[host]\nweigth = 3\n")
    f = tmp_path / "h.toml"
    f.write_text(text)
    result = CliRunner().invoke(app, ["check", str(f)])
    assert result.exit_code != 0
    assert "host.weigth: unknown key" in result.output


@pytest.mark.parametrize(
    ("path", "value", "needle"),
    [
        (("cluster", "primary_vip"), "198.18.0.999", "cluster.primary_vip"),
        (("cluster", "mode"), "broadcast", "cluster.mode"),
        (("cluster", "buckets"), 3, "cluster.buckets"),
        (("cluster", "hash_seed"), 2**32, "cluster.hash_seed"),
        (("cluster", "heartbeat_period_ms"), 5, "cluster.heartbeat_period_ms"),
        (("cluster", "loss_tolerance"), 1, "cluster.loss_tolerance"),
        (("cluster", "key"), "short", "key must be at least 16 bytes"),
        (("cluster", "vips"), ["2001:db8::100", "2001:db8::100"], "listed twice"),
        (("host", "host_id"), 257, "host.host_id"),
        (("host", "host_id"), 0, "host.host_id"),
        (("host", "dedicated_ips"), ["198.18.0.100/24"], "is a cluster VIP"),
        (("host", "dedicated_ips"), ["not-an-ip"], "host.dedicated_ips[0]"),
        (("host", "initial_state"), "running", "host.initial_state"),
        (("host", "dataplane"), "ebpf", "host.dataplane"),
    ],
)
def test_bad_values_are_named(path: tuple[str, str], value: Any, needle: str) -> None:
    doc = example_doc()
    doc[path[0]][path[1]] = value
    msg = refused(doc)
    assert needle in msg
    if not isinstance(value, list) and "key" not in path[1]:
        assert repr(value) in msg or str(value) in msg


def test_the_xdp_data_plane_takes_what_its_program_holds() -> None:
    """The XDP program's rule table has 32 entries: a cluster with more rules is refused
    with dataplane "xdp", by name, and taken with nftables."""
    doc = example_doc()
    doc["cluster"]["rules"] = [
        {"name": f"r{i}", "start": 1000 + i, "protocol": "tcp"} for i in range(33)
    ]
    doc["host"]["rules"] = []
    parse_config(doc)
    doc["host"]["dataplane"] = "xdp"
    assert "host.dataplane: 'xdp' takes 32 port rules at most (the cluster has 33)" in refused(doc)


def test_reversed_range_is_refused() -> None:
    doc = example_doc()
    doc["cluster"]["rules"][0].update(start=443, end=80)
    assert "end port 80 is below start port 443" in refused(doc)


def test_port_out_of_range() -> None:
    doc = example_doc()
    doc["cluster"]["rules"][0]["end"] = 70000
    msg = refused(doc)
    assert "cluster.rules[0].end" in msg and "70000" in msg


def test_overlapping_rules_are_refused() -> None:
    doc = example_doc()
    doc["cluster"]["rules"].append({"name": "alt", "start": 400, "end": 500, "protocol": "both"})
    msg = refused(doc)
    assert "rules[4]" in msg and "overlaps rules[0]" in msg


def test_rules_on_different_protocols_may_share_ports() -> None:
    doc = example_doc()
    doc["cluster"]["rules"].append({"name": "dns-tcp", "start": 53, "protocol": "tcp"})
    parse_config(doc)


def test_specific_vip_rule_may_overlap_all_rule() -> None:
    doc = example_doc()
    doc["cluster"]["rules"].append(
        {"name": "v6web", "vip": "2001:db8::100", "start": 80, "protocol": "tcp"}
    )
    parse_config(doc)


def test_rule_vip_must_be_a_cluster_vip() -> None:
    doc = example_doc()
    doc["cluster"]["rules"][0]["vip"] = "198.18.9.9"
    assert "198.18.9.9 is not a cluster VIP" in refused(doc)


def test_host_rule_must_name_a_cluster_rule() -> None:
    doc = example_doc()
    doc["host"]["rules"][0]["rule"] = "nope"
    assert "host.rules[0].rule: 'nope' names no cluster rule" in refused(doc)


def test_weight_out_of_range() -> None:
    doc = example_doc()
    doc["host"]["rules"][0]["load_weight"] = 101
    msg = refused(doc)
    assert "host.rules[0].load_weight" in msg and "101" in msg


def test_key_or_key_file_exactly_one() -> None:
    doc = example_doc()
    doc["cluster"]["key_file"] = "/etc/shoal/key"
    assert "exactly one of key and key_file" in refused(doc)
    del doc["cluster"]["key"]
    del doc["cluster"]["key_file"]
    assert "exactly one of key and key_file" in refused(doc)


def test_missing_key_file_is_named(tmp_path: Path) -> None:
    text = (EXAMPLES / "host1.toml").read_text()
    text = text.replace('key = "example-only-change-me-0123456789"', 'key_file = "absent.key"')
    f = write_private(tmp_path / "h.toml", text)
    result = CliRunner().invoke(app, ["check", str(f)])
    assert result.exit_code == 1
    said = " ".join(result.output.split())
    assert f"cluster.key_file: cannot read {tmp_path}/absent.key" in said


def test_duplicate_host_ids_across_files(tmp_path: Path) -> None:
    for name in ("a", "b"):
        write_private(tmp_path / f"{name}.toml", (EXAMPLES / "host1.toml").read_text())
    result = CliRunner().invoke(app, ["check", str(tmp_path / "a.toml"), str(tmp_path / "b.toml")])
    assert result.exit_code == 1
    assert "host.host_id 1 is also used by" in result.output


def test_mismatched_cluster_sections_across_files(tmp_path: Path) -> None:
    a = (EXAMPLES / "host1.toml").read_text()
    b = (EXAMPLES / "host2.toml").read_text().replace("buckets = 4096", "buckets = 8192")
    write_private(tmp_path / "a.toml", a)
    write_private(tmp_path / "b.toml", b)
    result = CliRunner().invoke(app, ["check", str(tmp_path / "a.toml"), str(tmp_path / "b.toml")])
    assert result.exit_code == 1
    assert "cluster digest" in result.output and "differs" in result.output


def test_not_toml(tmp_path: Path) -> None:
    f = tmp_path / "h.toml"
    f.write_text("[cluster\n")
    result = CliRunner().invoke(app, ["check", str(f)])
    assert result.exit_code == 1 and "not valid TOML" in result.output


def test_default_rule_when_none_given() -> None:
    doc = example_doc()
    doc["cluster"].pop("rules")
    doc["host"].pop("rules")
    cfg = parse_config(doc)
    (rule,) = cfg.cluster.effective_rules
    assert (rule.start, rule.last, rule.protocol, rule.mode, rule.affinity) == (
        0,
        65535,
        "both",
        "multiple",
        "single",
    )
    assert cfg.weight("default") == 50


def test_digest_ignores_host_section_and_interface() -> None:
    a, b = example_doc(1), example_doc(2)
    b["cluster"]["interface"] = "ens5"
    assert parse_config(a).cluster.digest() == parse_config(b).cluster.digest()


def test_digest_covers_rules() -> None:
    a, b = example_doc(1), example_doc(1)
    b["cluster"]["rules"][0]["affinity"] = "none"
    assert parse_config(a).cluster.digest() != parse_config(b).cluster.digest()


def test_profile_sets_timing_and_explicit_values_win() -> None:
    doc = example_doc()
    doc["cluster"]["profile"] = "nlb"
    cfg = parse_config(doc)
    assert (cfg.cluster.period_ms, cfg.cluster.tolerance) == (1000, 5)
    doc["cluster"]["heartbeat_period_ms"] = 250
    assert parse_config(doc).cluster.period_ms == 250


# --- property tests -------------------------------------------------------------------------

FIELDS = [
    ("cluster", k)
    for k in (
        "primary_vip",
        "mode",
        "buckets",
        "hash_seed",
        "profile",
        "loss_tolerance",
        "heartbeat_period_ms",
        "partition_policy",
    )
]
FIELDS += [("host", k) for k in ("host_id", "initial_state")]
junk = st.one_of(
    st.text(max_size=8),
    st.integers(-(10**6), 10**12),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(FIELDS), value=junk)
def test_any_value_is_accepted_or_refused_by_name(field: tuple[str, str], value: Any) -> None:
    doc = example_doc()
    doc[field[0]][field[1]] = value
    try:
        parse_config(copy.deepcopy(doc))
    except ConfigError as e:
        assert any(f"{field[0]}.{field[1]}" in p for p in e.problems), e.problems


@settings(max_examples=200, deadline=None)
@given(
    key=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12),
    section=st.sampled_from(["cluster", "host"]),
)
def test_any_unknown_key_is_refused_by_name(key: str, section: str) -> None:
    doc = example_doc()
    model = type(parse_config(doc)).model_fields[section].annotation
    assert model is not None and hasattr(model, "model_fields")
    if key in doc[section] or key in model.model_fields:
        return
    doc[section][key] = 1
    assert f"{section}.{key}: unknown key" in refused(doc)


def test_example_files_parse_with_tomllib() -> None:
    for f in EXAMPLES.glob("*.toml"):
        tomllib.loads(f.read_text())
