"""The offline commands (``shoal plan``, ``shoal check`` across hosts) and the configuration
keys an engine reads at start and on reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shoal.cli import app
from shoal.config import load_config, parse_config
from shoal.protocol.codec import Keys
from shoal.protocol.engine import Engine
from shoal.protocol.frames import HostState
from shoal.sim.scenario import KEY, cluster_configs
from tests.conftest import write_private


def test_plan_shows_each_hosts_share_and_what_a_join_moves(example_files: list[str]) -> None:
    args = ["plan", *example_files, "--members", "1,2,3", "--from", "1,2", "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["members"] == [1, 2, 3] and doc["from"] == [1, 2]
    web = next(r for r in doc["rules"] if r["rule"] == "web")
    cfgs = [load_config(Path(f)) for f in example_files]
    weights = {c.host.host_id: c.host_rule("web").weight for c in cfgs}
    total = sum(weights.values())
    for h in web["hosts"]:
        ideal = web["buckets"] * weights[h["host_id"]] / total
        assert abs(h["buckets"] - ideal) < 1  # within one bucket of its weighted share
    joiner = next(h for h in web["hosts"] if h["host_id"] == 3)
    assert web["moved"] == web["minimum"] == joiner["gained"] > 0  # only what it must
    ssh = next(r for r in doc["rules"] if r["rule"] == "ssh")
    assert ssh["handler"] == 1  # the lowest handling priority


def test_plan_refuses_a_member_without_a_file(example_files: list[str]) -> None:
    res = CliRunner().invoke(app, ["plan", *example_files, "--members", "1,4"])
    assert res.exit_code == 2 and "--members: host 4 has no configuration file" in res.output


def test_check_names_a_handling_priority_used_twice(
    tmp_path: Path, example_files: list[str]
) -> None:
    text = Path(example_files[2]).read_text()
    twin = write_private(
        tmp_path / "twin3.toml", text.replace("handling_priority = 3", "handling_priority = 2")
    )
    res = CliRunner().invoke(app, ["check", example_files[0], example_files[1], str(twin)])
    assert res.exit_code == 1
    assert "handling_priority 2 for rule 'ssh' is also used by" in res.output


@pytest.mark.parametrize("initial", ["stopped", "suspended"])
def test_initial_state_is_where_the_engine_starts(initial: str) -> None:
    """A host configured to start stopped or suspended takes nothing until told."""
    doc = cluster_configs(1)[0].model_dump(mode="json")
    doc["cluster"]["key"] = KEY.decode()
    doc["host"]["initial_state"] = initial
    engine = Engine(parse_config(doc), Keys(KEY), 1, 0.0)
    engine.tick(5.0)
    assert engine.state is HostState[initial.upper()]
    assert not engine.install.serving and not engine.install.tokens


def test_reload_refuses_another_host_id() -> None:
    one, two = cluster_configs(2)
    engine = Engine(one, Keys(KEY), 1, 0.0)
    with pytest.raises(ValueError, match=r"host\.host_id cannot change on reload"):
        engine.reload(two, 1.0)
    assert engine.me == 1 and engine.cfg is one
