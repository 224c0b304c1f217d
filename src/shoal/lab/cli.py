"""``shoal lab``: a real cluster in network namespaces, its self-check and the demo."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from shoal.choices import Dataplane, Profile
from shoal.cluster_mac import ClusterMode
from shoal.console import fail
from shoal.lab.topology import Lab, LabError

lab_app = typer.Typer(
    help="A real cluster in network namespaces (needs root).", no_args_is_help=True
)


def _lab(name: str) -> Lab:
    try:
        return Lab.load(name)
    except LabError as e:
        raise fail(str(e)) from None


@lab_app.command("up")
def lab_up(
    name: Annotated[str, typer.Option(help="Lab name (1-8 lower-case letters/digits).")] = "lab",
    hosts: Annotated[int, typer.Option(help="Number of cluster hosts.")] = 3,
    mode: Annotated[ClusterMode, typer.Option(help="Cluster mode.")] = ClusterMode.UNICAST,
    ipv6: Annotated[bool, typer.Option("--ipv6", help="Add IPv6 VIP and clients.")] = False,
    no_service: Annotated[bool, typer.Option("--no-service", help="Start no service.")] = False,
    no_daemon: Annotated[
        bool, typer.Option("--no-daemon", help="No shoal daemons: a bare lab for data-plane tests.")
    ] = False,
    profile: Annotated[Profile, typer.Option(help="Heartbeat timing profile.")] = Profile.DEFAULT,
    weights: Annotated[
        str, typer.Option(help="The web rule's load weight per host, e.g. 1,2,3 (default equal).")
    ] = "",
    dataplane: Annotated[
        Dataplane, typer.Option(help="Every host's data plane (host.dataplane).")
    ] = Dataplane.NFTABLES,
) -> None:
    """Build a lab: switch, hosts h1..hN, router, clients c1..c3."""
    try:
        loads = [int(w) for w in weights.split(",")] if weights else []
    except ValueError:
        raise fail(f"--weights {weights!r}: comma-separated integers 0..100", 2) from None
    lab = Lab(
        name=name,
        hosts=hosts,
        mode=mode.value,
        ipv6=ipv6,
        daemons=not no_daemon,
        profile=profile.value,
        weights=loads,
        dataplane=dataplane.value,
    )
    try:
        lab.up(service=not no_service)
    except LabError as e:
        raise fail(str(e)) from None
    typer.echo(json.dumps(lab.status()))


@lab_app.command("status")
def lab_status(name: Annotated[str, typer.Argument()] = "lab") -> None:
    """Show a lab's nodes, namespaces and processes."""
    typer.echo(json.dumps(_lab(name).status(), indent=2))


def _host(lab: Lab, host: int) -> int:
    if not 1 <= host <= lab.hosts:
        raise fail(f"HOST: {host} is not a host of lab {lab.name} (1..{lab.hosts})", 2)
    return host


@lab_app.command("crash")
def lab_crash(
    name: Annotated[str, typer.Argument()],
    host: Annotated[int, typer.Argument(help="The host number.")],
    link: Annotated[
        bool, typer.Option("--link", help="Also cut its switch port (the host loses power).")
    ] = False,
) -> None:
    """Kill a host's daemon with SIGKILL (its kernel tables stay: a daemon-only crash), and
    with --link cut its switch port too."""
    from shoal.lab.clients import crash

    lab = _lab(name)
    if f"daemon-h{_host(lab, host)}" not in lab.pids:
        raise fail(f"host {host} of lab {name} runs no daemon")
    try:
        crash(lab, host, cut=link)
    except LabError as e:
        raise fail(str(e)) from None
    lab.save()
    typer.echo(f"host {host}: daemon killed" + (", switch port down" if link else ""))


@lab_app.command("revive")
def lab_revive(
    name: Annotated[str, typer.Argument()],
    host: Annotated[int, typer.Argument(help="The host number.")],
) -> None:
    """Bring a crashed host back: switch port up, daemon started (it takes over its tables)."""
    from shoal.lab.clients import revive

    lab = _lab(name)
    try:
        revive(lab, _host(lab, host))
    except LabError as e:
        raise fail(str(e)) from None
    lab.save()
    typer.echo(f"host {host}: port up, daemon pid {lab.pids[f'daemon-h{host}']}")


@lab_app.command("down")
def lab_down(name: Annotated[str, typer.Argument()] = "lab") -> None:
    """Tear a lab down (idempotent)."""
    try:
        lab = Lab.load(name)
    except LabError:
        lab = Lab(name=name)
    lab.down()
    typer.echo(f"lab {name} is down")


@lab_app.command(
    "exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def lab_exec(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument()],
    node: Annotated[str, typer.Argument(help="h1..hN, rt, sw or c1..c3")],
) -> None:
    """Run a command inside a lab node: shoal lab exec NAME h1 -- CMD..."""
    if not ctx.args:
        raise fail("give a command after --", 2)
    try:
        code = _lab(name).exec(node, list(ctx.args))
    except LabError as e:
        raise fail(str(e)) from None
    raise typer.Exit(code)


@lab_app.command("demo")
def lab_demo(
    hosts: Annotated[int, typer.Option(min=3, max=32, help="Cluster hosts.")] = 4,
) -> None:
    """The live demo: traffic, a crash, a rejoin, an application failure, a drainstop, and a
    summary (3 hosts at least: each step has a host of its own)."""
    from shoal.lab.demo import demo

    raise typer.Exit(demo(hosts))


@lab_app.command("verify")
def lab_verify(
    name: Annotated[str, typer.Argument()] = "lab",
    flows: Annotated[int, typer.Option(help="Number of flows.")] = 2000,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Install a random map (no daemon) and check each flow against the reference model."""
    from shoal.lab.verify import verify

    if flows < 1:
        raise fail(f"--flows {flows}: give at least one flow", 2)
    try:
        result = verify(_lab(name), flows, seed)
    except LabError as e:
        raise fail(str(e)) from None
    typer.echo(json.dumps(result, indent=None if as_json else 2))
    bad = result["mismatches"] or result["double_accepts"] or result["unaccepted"]
    raise typer.Exit(1 if bad else 0)
