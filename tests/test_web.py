"""The web view, ``shoal top`` and what they draw: the picture and bucket maps of a real
daemon (no root), then in a 4-host lab: the page in Debian's Chromium driven by Playwright
following a crash, ``shoal top`` in a pseudo-terminal, and failover while every host's
metrics and page are scraped 20 times a second."""

from __future__ import annotations

import json
import os
import pty
import random
import re
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from shoal.config import parse_config
from shoal.config_errors import ConfigError
from shoal.daemon.control import view
from shoal.daemon.picture import failover
from shoal.daemon.reading import Board
from shoal.daemon.shell import Daemon
from shoal.daemon.web import Numbers, Web
from shoal.lab import clients as C
from shoal.lab.host_files import METRICS_PORT, WEB_PORT
from shoal.lab.topology import Lab, pyenv
from shoal.top import Rates, render
from tests.conftest import ROOT, example_doc, needs_root, revived
from tests.test_control import daemon, run  # noqa: F401  (the fixture)

ARTIFACTS = ROOT / "artifacts"
ALL = [1, 2, 3, 4]


def _get(web: Web, path: str) -> tuple[int, Any]:
    status, ctype, body = web.answer(path)
    return int(status), (json.loads(body) if ctype == "application/json" else body)


def test_the_page_and_its_data_from_a_real_daemon(daemon: Daemon) -> None:  # noqa: F811
    """Alone, the host leads, is the default host and owns every bucket: the picture says
    so, the maps name it as every bucket's owner, and its own numbers are in the picture."""
    web = Web(daemon.board, Numbers(lambda: {"web": 2}, None))
    assert _get(web, "/api/picture")[0] == 503  # nothing published yet
    run(daemon, 0.6)
    daemon.publish()
    status, p = _get(web, "/api/picture")
    assert status == 200
    [me] = p["hosts"]
    assert me["state"] == "converged (default)" and me["leader"] and me["default"]
    assert me["rules"]["web"]["owns"] == daemon.cfg.cluster.buckets
    assert me["numbers"]["connections"] == {"web": 2}
    assert p["maps_for"] == p["epoch"]
    status, m = _get(web, "/api/maps")
    assert m["epoch"] == p["epoch"] and set(m["maps"]["web"]) == {1}
    assert len(m["maps"]["web"]) == daemon.cfg.cluster.buckets
    status, html = _get(web, "/")
    assert status == 200 and b"/api/picture" in html and b"http" not in html.split(b"<script")[1]
    assert _get(web, "/etc/passwd")[0] == 404


def test_view_answers_on_the_control_socket(daemon: Daemon) -> None:  # noqa: F811
    run(daemon, 0.6)
    assert daemon.loop is not None
    resp = daemon.loop.run_until_complete(view(daemon))
    assert resp["ok"] and resp["hosts"][0]["numbers"]["connections"].keys() >= {"web"}


def _events(*items: tuple[str, float, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"name": n, "at": at, "text": n, **fields} for n, at, fields in items]


def test_the_last_failover_runs_from_last_heard_to_converged() -> None:
    evs = _events(
        ("host_left", 10.0, {"peer": 2, "silent_s": 0.4}),
        ("converged", 10.1, {}),
        ("host_left", 20.0, {"peer": 4, "reason": "not in epoch 3/1"}),  # not a failure
        ("host_left", 30.0, {"peer": 3, "silent_s": 0.425}),
        ("epoch_created", 30.01, {}),
        ("converged_default", 30.05, {}),
        ("host_joined", 31.0, {}),
    )
    f = failover(evs)
    assert f is not None and f["host"] == 3 and f["total_ms"] == 475
    assert [s["ms"] for s in f["steps"]] == [0, 425, 435, 475]
    assert failover(evs[2:3]) is None
    unfinished = failover(evs[3:5])
    assert unfinished is not None and unfinished["total_ms"] is None


def test_top_draws_hosts_connections_and_rates(daemon: Daemon) -> None:  # noqa: F811
    run(daemon, 0.6)
    assert daemon.loop is not None
    first = daemon.loop.run_until_complete(view(daemon))
    second = json.loads(json.dumps(first))
    second["hosts"][0]["numbers"]["accepted"]["web"] += 30
    rates = Rates()
    rates.update(first, 100.0)
    rates.update(second, 102.0)
    assert rates.per_host == {1: 15.0}
    console = Console(record=True, width=160)
    console.print(render(second, rates))
    shown = console.export_text()
    assert "converged (default)" in shown and "leader, default" in shown and "15.0" in shown


def test_a_web_address_is_validated_by_name() -> None:
    doc = example_doc()
    doc["host"]["web_address"] = "198.18.0.11"
    with pytest.raises(ConfigError) as err:
        parse_config(doc, "h.toml")
    assert "host.web_address" in str(err.value) and "ADDRESS:PORT" in str(err.value)


def test_board_reading_is_replaced_whole() -> None:
    b = Board()
    assert b.due(0.0) and b.reading is None


# ----------------------------------------------------------------------- in a lab


PIXELS_OF = """(host) => {
  const probe = document.createElement("canvas");
  probe.width = probe.height = 1;
  const g = probe.getContext("2d");
  g.fillStyle = colour(host);
  g.fillRect(0, 0, 1, 1);
  const want = Array.from(g.getImageData(0, 0, 1, 1).data).slice(0, 3).join();
  const counts = {};
  for (const c of document.querySelectorAll("#maps canvas")) {
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let i = 0; i < d.length; i += 4) if (`${d[i]},${d[i + 1]},${d[i + 2]}` === want) n++;
    counts[c.dataset.rule] = n;
  }
  return counts;
}"""
THREE_CONVERGED = """() => {
  const rows = [...document.querySelectorAll("#hosts tbody tr")];
  return rows.length === 3 && rows.every(r => r.dataset.state.startsWith("converged"));
}"""


@needs_root()
@pytest.mark.root
def test_the_page_in_a_browser_follows_a_crash(settled: Lab, tmp_path: Path) -> None:
    """Debian's Chromium, driven by Playwright from inside the lab, opens host 1's page: 4
    hosts, every map coloured by 4 owners. Host 4 crashes: within 2 s the page shows 3
    converged hosts and not one pixel of host 4's colour in any map. Screenshots of both
    are kept in artifacts/."""
    from playwright.sync_api import sync_playwright

    lab = settled
    chromium = tmp_path / "chromium-in-lab"  # the browser runs in the router's namespace
    chromium.write_text(f'#!/bin/sh\nexec ip netns exec {lab.ns("rt")} /usr/bin/chromium "$@"\n')
    chromium.chmod(0o755)
    ARTIFACTS.mkdir(exist_ok=True)
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
    killed = None
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=flags)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 960})
            page.goto(f"http://198.18.0.11:{WEB_PORT}/")
            page.wait_for_function(
                "document.querySelectorAll('#hosts tbody tr').length === 4"
                " && window.shoal.epochDrawn && window.shoal.picture.hosts.every(h => h.numbers)",
                timeout=15000,
            )
            before = page.evaluate(PIXELS_OF, 4)
            assert set(before) == {"web", "dns", "app", "net"} and min(before.values()) > 0, before
            page.screenshot(path=str(ARTIFACTS / "web-view-4-hosts.png"), full_page=True)
            killed = C.crash(lab, 4)

            def left_ms() -> float:  # of the 2 s the page has from the crash
                assert killed is not None
                return max(1.0, 2000 - 1000 * (time.time() - killed))

            page.wait_for_function(THREE_CONVERGED, timeout=left_ms())
            gone = f"() => Object.values(({PIXELS_OF})(4)).every(n => n === 0)"
            page.wait_for_function(gone, timeout=left_ms())
            after = page.evaluate(PIXELS_OF, 1)
            assert min(after.values()) > min(before.values())  # host 1 took a share of them
            timeline = page.inner_text("#failover")
            assert "host 4 last heard" in timeline and "converged" in timeline, timeline
            page.screenshot(path=str(ARTIFACTS / "web-view-after-crash.png"), full_page=True)
        finally:
            browser.close()
            if killed is not None:  # the module's next tests start from 4 hosts, whatever failed
                revived(lab, 4)


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@needs_root()
@pytest.mark.root
def test_top_runs_in_a_terminal(settled: Lab) -> None:
    """``shoal top`` in a pseudo-terminal on host 2: three pictures, each with every host,
    its state, and connections counted on every host (asked of their web views)."""
    lab = settled
    main, side = pty.openpty()
    env = {**pyenv(), "TERM": "xterm-256color", "COLUMNS": "170", "LINES": "60"}
    proc = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns("h2"), sys.executable, "-m", "shoal.cli", "top",
         "--control", str(lab.control(2)), "--count", "3", "--every", "0.5"],
        stdin=side, stdout=side, stderr=side, env=env, close_fds=True,
    )  # fmt: skip
    os.close(side)
    out = b""
    deadline = time.time() + 30
    while time.time() < deadline:
        ready, _, _ = select.select([main], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(main, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    proc.wait(timeout=10)
    os.close(main)
    text = _ANSI.sub("", out.decode(errors="replace"))
    assert proc.returncode == 0, text[-2000:]
    assert "seen from host 2" in text and "converged (default)" in text
    for h in ALL:
        assert re.search(rf"│ {h}( \*)? 198\.18\.0\.1{h}", text), text[-3000:]
    last = text.split("established connections per rule")[-1].split("recent events")[0]
    assert "web 80-443/tcp" in last and " - " not in last, last  # every host's count known


@needs_root()
@pytest.mark.root
def test_failover_holds_while_every_endpoint_is_scraped(settled: Lab) -> None:
    """Every host's metrics scraped 20 times a second and its page 5 times, from inside the
    lab, while host 1 crashes: its buckets accept again within the failover bound, no
    survivor's session breaks, and no survivor loses its lease or sees another survivor
    leave."""
    lab = settled
    cl = lab.config(1).cluster
    bound_ms = (cl.tolerance + 3) * cl.period_ms
    urls = []
    for h in ALL:
        urls += [f"http://198.18.0.1{h}:{METRICS_PORT}/metrics"] * 4
        urls.append(f"http://198.18.0.1{h}:{WEB_PORT}/api/picture")
    scraper = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns("rt"), sys.executable, "-m", "shoal.lab.scraper",
         "--rate", "100", "--seconds", "12", *urls],
        stdout=subprocess.PIPE, text=True, env=pyenv(),
    )  # fmt: skip
    clients = C.Clients(lab)
    rng = random.Random(7)
    probes = C.targets(lab, 1, C.owned_buckets(lab, 1), 48, rng)
    try:
        clients.start(1, 10, probe=probes)
        clients.start(2, 10, rate=20, long=8)
        time.sleep(2.0)
        since = time.time()
        _, failover_ms = C.crash_and_fail_over(lab, clients, 1, 5)
        events = clients.finish()
    finally:
        clients.kill()
    got, _ = scraper.communicate(timeout=30)
    load = json.loads(got)
    assert load["requests"] > 900, load  # it scraped at the rate asked, before and after
    assert failover_ms is not None and failover_ms <= bound_ms, (failover_ms, bound_ms)
    assert C.broken(events, {"h2", "h3", "h4"}) == []
    for h in (2, 3, 4):
        evs = C.daemon_events(lab, h, since)
        assert not [e for e in evs if e.get("name") == "lease_lost"], evs
        assert {e.get("peer") for e in evs if e.get("name") == "host_left"} <= {1}, evs
    revived(lab, 1)
