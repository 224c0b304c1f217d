"""NLB's verbs on the command line: each a request to a daemon's control socket (this
host's, or through it other hosts' with ``--host`` or ``--all``), its answer printed."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from shoal.config import load_config
from shoal.config_errors import ConfigError
from shoal.console import fail

verbs_app = typer.Typer()

EXIT_REFUSED = 1
EXIT_UNREACHABLE = 3

# where the verbs are carried out: this host (empty), one other host or every host
REMOTE: dict[str, int | str] = {}


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


def call_daemon(
    req: dict[str, object], control: Path | None, config: Path | None
) -> dict[str, object]:
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
    resp = call_daemon({"cmd": cmd, **extra}, control, config)
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


def _asked(
    cmd: str, control: Path | None, config: Path | None, as_json: bool
) -> dict[str, object] | None:
    """The daemon's answer to ``cmd``, for the caller to print; with --json printed here
    as it came (and None)."""
    resp = call_daemon({"cmd": cmd}, control, config)
    if as_json:
        typer.echo(json.dumps(resp))
        return None
    return resp


@verbs_app.command()
def query(control: ControlOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Every host of the cluster as this host sees it (with --host or --all: each such
    host's own state, as it says it)."""
    if REMOTE:
        _remote("query", control, config)
        return
    resp = _asked("query", control, config, as_json)
    if resp is None:
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


# the verbs that take nothing but where the daemon is: name -> what it does
HOST_VERBS = {
    "start": "Start cluster operations on this host.",
    "stop": "Stop cluster operations (existing connections are dropped).",
    "suspend": "Stop, and refuse every command but resume.",
    "resume": "Leave the suspended state (the host is then stopped).",
}
# the verbs of one port rule: name -> what it does
RULE_VERBS = {
    "enable": "Take traffic for the rule covering PORT (or all rules) on this host.",
    "disable": "Drop all traffic of the rule covering PORT on this host, existing connections too.",
    "drain": "Take no new connections for the rule covering PORT on this host; keep existing ones.",
}


def _host_verb(cmd: str) -> Callable[..., None]:
    def verb(control: ControlOpt = None, config: ConfigOpt = None) -> None:
        _verb(cmd, control, config)

    return verb


def _port_verb(cmd: str) -> Callable[..., None]:
    def verb(
        port: PortArg, vip: VipOpt = None, control: ControlOpt = None, config: ConfigOpt = None
    ) -> None:
        _rule_verb(cmd, port, vip, control, config)

    return verb


for _name, _doc in HOST_VERBS.items():
    verbs_app.command(_name, help=_doc)(_host_verb(_name))


@verbs_app.command()
def drainstop(
    control: ControlOpt = None,
    config: ConfigOpt = None,
    timeout: Annotated[
        float | None, typer.Option(help="Close what remains after S seconds.")
    ] = None,
) -> None:
    """Take no new connections, let existing ones finish, then stop."""
    _verb("drainstop", control, config, timeout=timeout)


for _name, _doc in RULE_VERBS.items():
    verbs_app.command(_name, help=_doc)(_port_verb(_name))


@verbs_app.command()
def display(control: ControlOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Configuration, state and recent events."""
    resp = _asked("display", control, config, as_json)
    if resp is None:
        return
    events = resp.pop("events", [])
    _print_tree({k: v for k, v in resp.items() if k != "ok"})
    typer.echo("events:")
    assert isinstance(events, list)
    for ev in events:
        typer.echo(f"  {ev.get('at', '')}  {ev.get('text', ev.get('name', ''))}")


@verbs_app.command()
def params(control: ControlOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Every effective parameter and counter."""
    resp = _asked("params", control, config, as_json)
    if resp is None:
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


@verbs_app.command()
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


@verbs_app.command()
def reload(control: ControlOpt = None, config: ConfigOpt = None) -> None:
    """Re-read the configuration file (an invalid file is refused; nothing changes)."""
    _verb("reload", control, config)
