"""The ``shoal`` command line: NLB's verbs, and the tools that need no daemon."""

from __future__ import annotations

import ipaddress
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from shoal.cluster_mac import ClusterMode, ip2mac
from shoal.config import ConfigError, ShoalConfig, check_cluster, load_config
from shoal.console import EXIT_INVALID, error, fail, out
from shoal.lab.cli import lab_app
from shoal.plan import plan

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="shoal: Network Load Balancing for Linux.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(lab_app, name="lab")

# where the verbs are carried out: this host (empty), one other host or every host
REMOTE: dict[str, int | str] = {}


@app.callback()
def _where(
    ctx: typer.Context,
    host: Annotated[
        int | None,
        typer.Option("--host", min=1, max=256, help="Carry the verb out on this host id."),
    ] = None,
    every: Annotated[bool, typer.Option("--all", help="Carry the verb out on every host.")] = False,
) -> None:
    """shoal: Network Load Balancing for Linux. With --host N or --all, NLB's verbs go to
    other hosts of the cluster through the local daemon (cluster.remote_control)."""
    if host is not None and every:
        raise fail("--host and --all: give one of them", 2)
    from shoal.daemon.remote import VERBS

    if (host is not None or every) and ctx.invoked_subcommand not in VERBS:
        verbs = ", ".join(sorted(VERBS))
        raise fail(f"--host and --all: only for the verbs {verbs}", 2)
    REMOTE.clear()
    if host is not None:
        REMOTE["host"] = host
    elif every:
        REMOTE["host"] = "all"


def _load_all(files: list[Path]) -> list[ShoalConfig]:
    configs: list[ShoalConfig] = []
    problems: list[str] = []
    for f in files:
        try:
            configs.append(load_config(f))
        except ConfigError as e:
            problems.extend(f"{e.source}: {p}" for p in e.problems)
    if not problems:
        problems = check_cluster(configs, [str(f) for f in files])
    if problems:
        for p in problems:
            error(p)
        raise typer.Exit(EXIT_INVALID)
    return configs


def _id_list(text: str | None, option: str) -> set[int] | None:
    if text is None:
        return None
    try:
        ids = {int(x) for x in text.split(",") if x.strip()}
    except ValueError:
        raise fail(f"{option}: expected host ids like 1,2,3, got {text!r}", 2) from None
    bad = sorted(i for i in ids if not 1 <= i <= 256)
    if bad:
        raise fail(f"{option}: host id {bad[0]} is outside 1..256", 2)
    return ids


@app.command("ip2mac")
def ip2mac_cmd(
    vip: Annotated[str, typer.Argument(help="The cluster's primary VIP.")],
    mode: Annotated[ClusterMode, typer.Option(help="Cluster mode.")] = ClusterMode.UNICAST,
) -> None:
    """Print the cluster MAC address for a VIP, as NLB derives it."""
    try:
        address = ipaddress.ip_address(vip)
    except ValueError:
        raise fail(f"VIP: {vip!r} is not an IP address", 2) from None
    typer.echo(ip2mac(address, mode))


@app.command()
def check(
    files: Annotated[list[Path], typer.Argument(help="One configuration file per host.")],
) -> None:
    """Validate configuration files and print the cluster digest."""
    configs = _load_all(files)
    for f, c in zip(files, configs, strict=True):
        typer.echo(
            f"{f}: ok, host {c.host.host_id}, cluster {c.cluster.name}, digest {c.cluster.digest()}"
        )


@app.command("init")
def init_cmd(
    vip: Annotated[list[str], typer.Option(help="A VIP (repeat; the first is the primary).")],
    hosts: Annotated[int, typer.Option(help="How many hosts.")],
    interface: Annotated[str, typer.Option(help="The cluster interface.")] = "eth0",
    mode: Annotated[ClusterMode, typer.Option(help="Cluster mode.")] = ClusterMode.UNICAST,
    preset: Annotated[str, typer.Option(help="Port rules: web, dns or all.")] = "web",
    name: Annotated[str, typer.Option(help="The cluster's name.")] = "shoal",
    addresses: Annotated[
        str | None,
        typer.Option(help="Each host's dedicated ADDRESS/PREFIX, comma-separated, in order."),
    ] = None,
    out_dir: Annotated[Path, typer.Option("--dir", help="Where to write the files.")] = Path("."),
) -> None:
    """Write a new cluster's files: a random key (mode 0600) and one host file per host."""
    from shoal.init import Answers, write

    try:
        vips = [ipaddress.ip_address(v) for v in vip]
    except ValueError as e:
        raise fail(f"--vip: {e}", 2) from None
    answers = Answers(
        name=name,
        vips=vips,
        hosts=hosts,
        interface=interface,
        mode=mode,
        preset=preset,
        addresses=[a.strip() for a in addresses.split(",")] if addresses else [],
    )
    try:
        written = write(answers, out_dir)
    except (ValueError, OSError) as e:
        raise fail(str(e), 2) from None
    for path in written:
        typer.echo(str(path))


@app.command("plan")
def plan_cmd(
    files: Annotated[list[Path], typer.Argument(help="One configuration file per host.")],
    members: Annotated[str | None, typer.Option(help="Live host ids, e.g. 1,2,3.")] = None,
    from_: Annotated[
        str | None, typer.Option("--from", help="Earlier membership to show moves from.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show each rule's buckets and share per host, and what a membership change moves."""
    configs = _load_all(files)
    known = {c.host.host_id for c in configs}
    live = _id_list(members, "--members") or known
    before = _id_list(from_, "--from")
    for opt, ids in (("--members", live), ("--from", before or set())):
        unknown = sorted(ids - known)
        if unknown:
            raise fail(f"{opt}: host {unknown[0]} has no configuration file", 2)
    plans = plan(configs, live, before)
    if as_json:
        doc = {
            "members": sorted(live),
            "from": sorted(before) if before else None,
            "rules": [asdict(p) for p in plans],
        }
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    for p in plans:
        title = f"rule {p.rule} ({p.mode})"
        if p.mode != "multiple":
            who = f"host {p.handler}" if p.handler else "nobody"
            out.print(f"{title}: handled by {who}" if p.mode == "single" else f"{title}: dropped")
            continue
        if p.moved is not None:
            title += f": {p.moved} of {p.buckets} buckets move (minimum {p.minimum})"
        table = Table(title=title, title_justify="left")
        for col in ("host", "weight", "buckets", "share"):
            table.add_column(col, justify="right")
        if before:
            table.add_column("gained", justify="right")
            table.add_column("lost", justify="right")
        for h in p.hosts:
            row = [str(h.host_id), str(h.weight), str(h.buckets), f"{100 * h.share:.2f}%"]
            if before:
                row += [str(h.gained), str(h.lost)]
            table.add_row(*row)
        out.print(table)


# ------------------------------------------------------------------ the daemon and its verbs

EXIT_REFUSED = 1
EXIT_UNREACHABLE = 3


@app.command()
def daemon(
    config: Annotated[Path, typer.Option("--config", "-c", help="This host's configuration.")],
    control: Annotated[Path | None, typer.Option(help="Control socket path.")] = None,
    state_dir: Annotated[Path, typer.Option(help="Where the membership record is kept.")] = Path(
        "/var/lib/shoal"
    ),
    no_adapter: Annotated[
        bool, typer.Option("--no-adapter", help="Leave the cluster interface as it is.")
    ] = False,
    rt_priority: Annotated[
        int,
        typer.Option(
            min=0,
            max=99,
            help="Real-time (SCHED_RR) priority of the heartbeat loop; 0: ordinary scheduling.",
        ),
    ] = 10,
) -> None:
    """Run this host's cluster daemon in the foreground."""
    import asyncio

    from shoal.daemon.shell import Daemon

    try:
        d = Daemon(
            config, control, state_dir, setup_adapter=not no_adapter, rt_priority=rt_priority
        )
    except ConfigError as e:
        for p in e.problems:
            error(f"{e.source}: {p}")
        raise typer.Exit(EXIT_INVALID) from None
    from shoal.dataplane.adapter import AdapterError

    try:
        d.prepare()
    except AdapterError as e:
        raise fail(str(e)) from None
    try:
        asyncio.run(d.run())
    except OSError as e:
        # the socket or the kernel refused something at start (e.g. an old kernel)
        raise fail(f"daemon: {e}") from None
    finally:
        d.restore()


def _control_path(control: Path | None, config: Path | None) -> Path:
    import os

    from shoal.daemon.shell import default_control

    if control is not None:
        return control
    if os.environ.get("SHOAL_CONTROL"):
        return Path(os.environ["SHOAL_CONTROL"])
    path = config or (
        Path(os.environ["SHOAL_CONFIG"])
        if os.environ.get("SHOAL_CONFIG")
        else Path("/etc/shoal/shoal.toml")
    )
    try:
        return default_control(load_config(path))
    except ConfigError as e:
        raise fail(f"cannot find the daemon: {e}", EXIT_UNREACHABLE) from None


ControlOpt = Annotated[Path | None, typer.Option("--control", help="Daemon control socket.")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Host configuration.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _call(req: dict[str, object], control: Path | None, config: Path | None) -> dict[str, object]:
    from shoal.daemon.control import call

    path = _control_path(control, config)
    try:
        resp = call(path, req)
    except (OSError, ValueError) as e:
        raise fail(f"no daemon answers on {path}: {e}", EXIT_UNREACHABLE) from None
    if not resp.get("ok"):
        raise fail(str(resp.get("error")), EXIT_REFUSED)
    return resp


def _verb(cmd: str, control: Path | None, config: Path | None, **extra: object) -> None:
    if REMOTE:
        _remote(cmd, control, config, **extra)
        return
    resp = _call({"cmd": cmd, **extra}, control, config)
    typer.echo(str(resp.get("message", "ok")))


def _remote(cmd: str, control: Path | None, config: Path | None, **extra: object) -> None:
    """A verb carried out by other hosts: one line per host; exit 1 if any refused."""
    from shoal.daemon.control import call

    path = _control_path(control, config)
    req = {
        "cmd": "remote",
        "verb": cmd,
        **REMOTE,
        **{k: v for k, v in extra.items() if v is not None},
    }
    try:
        resp = call(path, req, timeout=15)
    except (OSError, ValueError) as e:
        raise fail(f"no daemon answers on {path}: {e}", EXIT_UNREACHABLE) from None
    answers = resp.get("answers")
    if not isinstance(answers, dict):
        raise fail(str(resp.get("error")), EXIT_REFUSED)
    for host, a in answers.items():
        if cmd == "query" and a.get("ok"):
            text = f"{a['state']} (epoch {a['epoch'] or 'none'})"
        else:
            text = str(a.get("message") or a.get("error") or ("ok" if a.get("ok") else "refused"))
        typer.echo(f"host {host}: {text}")
    if not resp.get("ok"):
        raise typer.Exit(EXIT_REFUSED)


@app.command()
def query(control: ControlOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Every host of the cluster as this host sees it (with --host or --all: each such
    host's own state, as it says it)."""
    if REMOTE:
        _remote("query", control, config)
        return
    resp = _call({"cmd": "query"}, control, config)
    if as_json:
        typer.echo(json.dumps(resp))
        return
    hosts = resp["hosts"]
    assert isinstance(hosts, list)
    for h in hosts:
        checks = ", ".join(f"{k} {v}" for k, v in (h.get("health") or {}).items())
        typer.echo(
            f"Host {h['host_id']} ({h['dedicated_ip'] or '-'}) is {h['state']}"
            + (" (this host)" if h["this_host"] else "")
            + (f"; checks: {checks}" if checks else "")
        )


@app.command()
def start(control: ControlOpt = None, config: ConfigOpt = None) -> None:
    """Start cluster operations on this host."""
    _verb("start", control, config)


@app.command()
def stop(control: ControlOpt = None, config: ConfigOpt = None) -> None:
    """Stop cluster operations (existing connections are dropped)."""
    _verb("stop", control, config)


@app.command()
def drainstop(
    control: ControlOpt = None,
    config: ConfigOpt = None,
    timeout: Annotated[
        float | None, typer.Option(help="Close what remains after S seconds.")
    ] = None,
) -> None:
    """Take no new connections, let existing ones finish, then stop."""
    _verb("drainstop", control, config, timeout=timeout)


@app.command()
def suspend(control: ControlOpt = None, config: ConfigOpt = None) -> None:
    """Stop, and refuse every command but resume."""
    _verb("suspend", control, config)


@app.command()
def resume(control: ControlOpt = None, config: ConfigOpt = None) -> None:
    """Leave the suspended state (the host is then stopped)."""
    _verb("resume", control, config)


def _rule_verb(
    cmd: str, port: str, vip: str | None, control: Path | None, config: Path | None
) -> None:
    if vip is not None:
        try:
            ipaddress.ip_address(vip)
        except ValueError:
            raise fail(f"--vip: {vip!r} is not an IP address", 2) from None
    _verb(cmd, control, config, port=port, vip=vip)


PortArg = Annotated[str, typer.Argument(help="A port the rule covers, or all.")]
VipOpt = Annotated[str | None, typer.Option(help="Only the rule for this VIP.")]


@app.command()
def enable(
    port: PortArg, vip: VipOpt = None, control: ControlOpt = None, config: ConfigOpt = None
) -> None:
    """Take traffic for the rule covering PORT (or all rules) on this host."""
    _rule_verb("enable", port, vip, control, config)


@app.command()
def disable(
    port: PortArg, vip: VipOpt = None, control: ControlOpt = None, config: ConfigOpt = None
) -> None:
    """Drop all traffic of the rule covering PORT on this host, existing connections too."""
    _rule_verb("disable", port, vip, control, config)


@app.command()
def drain(
    port: PortArg, vip: VipOpt = None, control: ControlOpt = None, config: ConfigOpt = None
) -> None:
    """Take no new connections for the rule covering PORT on this host; keep existing ones."""
    _rule_verb("drain", port, vip, control, config)


@app.command()
def display(control: ControlOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Configuration, state and recent events."""
    resp = _call({"cmd": "display"}, control, config)
    if as_json:
        typer.echo(json.dumps(resp))
        return
    events = resp.pop("events", [])
    _print_tree({k: v for k, v in resp.items() if k != "ok"})
    typer.echo("events:")
    assert isinstance(events, list)
    for ev in events:
        typer.echo(f"  {ev.get('at', '')}  {ev.get('text', ev.get('name', ''))}")


@app.command()
def params(control: ControlOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Every effective parameter and counter."""
    resp = _call({"cmd": "params"}, control, config)
    if as_json:
        typer.echo(json.dumps(resp))
        return
    _print_tree({k: v for k, v in resp.items() if k != "ok"})


def _print_tree(doc: object, indent: int = 0) -> None:
    """A JSON document as indented ``key: value`` lines, for people."""
    pad = "  " * indent
    if isinstance(doc, dict):
        for k, v in doc.items():
            if isinstance(v, dict | list) and v:
                typer.echo(f"{pad}{k}:")
                _print_tree(v, indent + 1)
            else:
                typer.echo(f"{pad}{k}: {_scalar(v)}")
    elif isinstance(doc, list):
        for item in doc:
            if isinstance(item, dict):
                typer.echo(f"{pad}-")
                _print_tree(item, indent + 1)
            else:
                typer.echo(f"{pad}- {_scalar(item)}")


def _scalar(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, dict | list):
        return "none"
    return str(v)


@app.command("filter")
def filter_cmd(
    client: Annotated[str, typer.Argument(help="CLIENT_IP or CLIENT_IP:PORT ([IPv6]:PORT).")],
    target: Annotated[str, typer.Argument(help="VIP:PORT ([IPv6]:PORT).")],
    protocol: Annotated[str, typer.Option(help="tcp or udp.")] = "tcp",
    configs: Annotated[
        list[Path] | None,
        typer.Option("--config", "-c", help="Answer offline from these host files (repeat)."),
    ] = None,
    members: Annotated[
        str | None, typer.Option(help="Offline: the live host ids, e.g. 1,2,3 (all).")
    ] = None,
    control: ControlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Which host takes a new connection of this flow now, and why (rule, bucket, owner).
    Asks the local daemon; with --config, answers offline from the host files as a cluster
    of --members would map it when formed together."""
    from shoal.filter import endpoint, fresh_view, where

    try:
        src, sport = endpoint(client, "client", port_needed=False)
        vip, port = endpoint(target, "VIP:PORT", port_needed=True)
    except ValueError as e:
        raise fail(str(e), 2) from None
    assert port is not None
    if protocol not in ("tcp", "udp"):
        raise fail(f"--protocol: {protocol!r} is neither tcp nor udp", 2)
    if members is not None and not configs:
        raise fail("--members: only with --config (offline)", 2)
    if configs:
        loaded = _load_all(configs)
        known = {c.host.host_id for c in loaded}
        live = _id_list(members, "--members") or known
        if live - known:
            raise fail(f"--members: host {min(live - known)} has no configuration file", 2)
        try:
            doc = where(
                loaded[0].cluster, fresh_view(loaded, live), src, sport or 0, vip, port, protocol
            )
        except ValueError as e:
            raise fail(str(e), 2) from None
        doc = {"offline": True, "members": sorted(live), **doc}
    else:
        req = {"cmd": "filter", "client": str(src), "sport": sport or 0, "vip": str(vip),
               "port": port, "protocol": protocol}  # fmt: skip
        doc = {"offline": False, **_call(req, control, None)}
        doc.pop("ok", None)
    if as_json:
        typer.echo(json.dumps(doc))
        return
    who = f"host {doc['host']}" if doc["host"] else "no host"
    typer.echo(
        f"{doc['protocol']} {doc['client']}:{doc['client_port']} -> {doc['vip']}:{doc['port']}: "
        f"{who}" + (f", bucket {doc['bucket']}" if doc["bucket"] is not None else "")
    )
    typer.echo(f"  {doc['why']}")
    if not doc["offline"]:
        typer.echo(f"  (epoch {doc['epoch'] or 'none'}, this host {doc['state']})")


@app.command()
def top(
    control: ControlOpt = None,
    config: ConfigOpt = None,
    every: Annotated[float, typer.Option(min=0.2, help="Seconds between two pictures.")] = 1.0,
    count: Annotated[int | None, typer.Option(min=1, help="Stop after this many pictures.")] = None,
) -> None:
    """The whole cluster, live in the terminal: hosts, connections, rates, events."""
    import contextlib

    from shoal import top as view
    from shoal.daemon.control import call

    path = _control_path(control, config)

    def fetch() -> dict[str, object]:
        resp = call(path, {"cmd": "view"})  # a daemon that is away is shown, not fatal
        if not resp.get("ok"):
            raise ValueError(str(resp.get("error")))
        return resp

    with contextlib.suppress(KeyboardInterrupt):
        view.run(fetch, every, count)


@app.command()
def reload(control: ControlOpt = None, config: ConfigOpt = None) -> None:
    """Re-read the configuration file (an invalid file is refused; nothing changes)."""
    _verb("reload", control, config)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
