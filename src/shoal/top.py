"""``shoal top``: the web view's picture in a terminal (rich), drawn anew every second from
the local daemon's ``view``: hosts and their states, connections per host and per rule, new
connections per second, the last failover and recent events. Usable over ssh.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

STYLES = {
    "converged": "green",
    "converged (default)": "bold green",
    "converging": "yellow",
    "draining": "cyan",
    "stopped": "red",
    "suspended": "red",
}
EVENTS = 8  # recent events shown


class Rates:
    """New connections per second per host, from the kernel's accept counters of two
    successive pictures."""

    def __init__(self) -> None:
        self._last: dict[int, tuple[float, int]] = {}
        self.per_host: dict[int, float] = {}

    def update(self, picture: Mapping[str, Any], now: float) -> None:
        for h in picture["hosts"]:
            n = h.get("numbers")
            if not n:
                continue
            total = sum(n["accepted"].values())
            before = self._last.get(h["host_id"])
            if before is not None and now > before[0]:
                self.per_host[h["host_id"]] = max(0.0, (total - before[1]) / (now - before[0]))
            self._last[h["host_id"]] = (now, total)


def _owns(rule: Mapping[str, Any] | None) -> str:
    if rule is None:
        return "-"
    return str(rule["owns"]) + (" (check failing)" if rule.get("health") == "failing" else "")


def render(picture: Mapping[str, Any], rates: Rates) -> RenderableType:
    p = picture
    head = Text.assemble(
        (f"shoal: {p['cluster']}", "bold"),
        f"   seen from host {p['host_id']}   epoch {p['epoch'] or 'none'}   ",
        f"leader {p['leader'] or 'none'}   default host {p['default_host'] or 'none'}",
    )
    shown = [r for r in p["rules"] if r["mode"] != "disabled"]
    hosts = Table(title="hosts", title_justify="left", expand=False)
    for col in ("host", "state", "role"):
        hosts.add_column(col)
    for r in shown:
        hosts.add_column(f"{r['name']} owns", justify="right")
    for col in ("connections", "new/s", "heard"):
        hosts.add_column(col, justify="right")
    for h in p["hosts"]:
        n = h.get("numbers")
        roles = [w for w, on in (("leader", h["leader"]), ("default", h["default"])) if on]
        rate = rates.per_host.get(h["host_id"])
        hosts.add_row(
            f"{h['host_id']}{' *' if h['this_host'] else ''} {h['dedicated_ip'] or ''}",
            Text(
                h["state"] + (" · check failing" if h.get("health") == "failing" else ""),
                style=STYLES.get(h["state"], ""),
            ),
            ", ".join(roles) or "-",
            *(_owns(h["rules"].get(r["name"])) for r in shown),
            str(sum(n["connections"].values())) if n else "-",
            f"{rate:.1f}" if rate is not None else "-",
            "-" if h["this_host"] else f"{h['silent_ms']} ms",
        )
    conns = Table(title="established connections per rule", title_justify="left")
    conns.add_column("rule")
    for h in p["hosts"]:
        conns.add_column(f"host {h['host_id']}", justify="right")
    for r in shown:
        row = [f"{r['name']} {r['ports']}/{r['protocol']}"]
        for h in p["hosts"]:
            n = h.get("numbers")
            row.append(str(n["connections"].get(r["name"], 0)) if n else "-")
        conns.add_row(*row)
    parts: list[RenderableType] = [head, hosts, conns]
    f = p.get("failover")
    if f:
        done = "converging" if f["total_ms"] is None else f"{f['total_ms']} ms"
        lines = [f"  +{s['ms']:>5} ms  {s['text']}" for s in f["steps"]]
        parts.append(Text(f"last failover (host {f['host']}): {done}\n" + "\n".join(lines)))
    recent = [
        time.strftime("  %H:%M:%S  ", time.localtime(ev["at"])) + str(ev["text"])
        for ev in p["events"][-EVENTS:]
    ]
    parts.append(Text("recent events\n" + "\n".join(reversed(recent))))
    return Group(*parts)


def run(
    fetch: Callable[[], Mapping[str, Any]], every: float = 1.0, count: int | None = None
) -> None:
    """Draw a picture every ``every`` seconds, ``count`` times (None: until interrupted)."""
    rates = Rates()
    shown = 0
    with Live(auto_refresh=False) as live:
        while count is None or shown < count:
            started = time.monotonic()
            try:
                picture = fetch()
                rates.update(picture, started)
                live.update(render(picture, rates), refresh=True)
            except (OSError, ValueError, KeyError) as e:
                live.update(Text(f"no picture from the daemon: {e}", style="red"), refresh=True)
            shown += 1
            if count is None or shown < count:
                time.sleep(max(0.0, every - (time.monotonic() - started)))
