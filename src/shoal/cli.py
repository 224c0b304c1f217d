"""The ``shoal`` command line: the daemon, the tools that need no daemon, and NLB's verbs
(:mod:`shoal.cli_verbs`)."""

from __future__ import annotations

import ipaddress
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from shoal.cli_verbs import REMOTE, ControlOpt, JsonOpt, call_daemon, verbs_app
from shoal.cluster_mac import ClusterMode, ip2mac
from shoal.config import ShoalConfig, check_cluster, load_config
from shoal.config_errors import ConfigError
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
app.add_typer(verbs_app)


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


# ------------------------------------------------------------------ the daemon


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
        doc = {"offline": False, **call_daemon(req, control, None)}
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


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
