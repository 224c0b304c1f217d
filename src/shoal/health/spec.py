"""A health check as the host configuration gives it (``[[host.checks]]``), validated.

Defaults follow HAProxy's (``inter 2s``, ``rise 2``, ``fall 3``) with a 1 s timeout. A check
with a ``rule`` takes the host out of that rule while it fails; one without is host-wide
and does what ``drainstop`` does.
"""

from __future__ import annotations

import ipaddress
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, model_validator

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class CheckKind(StrEnum):
    TCP = "tcp"  # a connection is accepted
    HTTP = "http"  # GET answers the expected status (and body substring)
    HTTPS = "https"
    UDP = "udp"  # a datagram is answered (with the expected substring)
    COMMAND = "command"  # exit status 0


class OnFailure(StrEnum):
    DRAIN = "drain"  # no new connections; established ones go on
    DISABLE = "disable"  # established connections of the rule are dropped too


class Check(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(default=None, min_length=1, max_length=64)
    rule: str | None = Field(default=None, min_length=1)  # None: host-wide
    kind: CheckKind
    # where the check connects: this host's first dedicated address unless given, and the
    # rule's (first) port unless given
    address: IPAddress | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    path: str | None = None  # http, https: "/" unless given
    expect_status: int | None = Field(default=None, ge=100, le=599)  # http, https: 200
    expect_body: str | None = Field(default=None, min_length=1)  # http, https
    tls_verify: bool | None = None  # https: False unless given (a health check, not a client)
    send: str | None = None  # udp: the request ("" unless given)
    expect: str | None = Field(default=None, min_length=1)  # udp: in the answer
    command: list[str] | None = Field(default=None, min_length=1)  # argv, absolute path
    interval_ms: int = Field(default=2000, ge=100, le=3_600_000)
    timeout_ms: int = Field(default=1000, ge=10, le=3_600_000)
    rise: int = Field(default=2, ge=1, le=100)
    fall: int = Field(default=3, ge=1, le=100)
    on_failure: OnFailure | None = None  # rule checks: drain unless given
    # flap damping: at most flap_limit returns to service per flap_window_s
    flap_limit: int = Field(default=2, ge=1, le=100)
    flap_window_s: int = Field(default=60, ge=1, le=86400)

    @property
    def key(self) -> str:
        return self.name or (f"rule:{self.rule}" if self.rule else "host")

    @model_validator(mode="after")
    def _fields_of_kind(self) -> Check:
        k = self.kind
        web = (CheckKind.HTTP, CheckKind.HTTPS)
        only: dict[str, tuple[CheckKind, ...]] = {
            "path": web,
            "expect_status": web,
            "expect_body": web,
            "tls_verify": (CheckKind.HTTPS,),
            "send": (CheckKind.UDP,),
            "expect": (CheckKind.UDP,),
            "command": (CheckKind.COMMAND,),
            "address": (CheckKind.TCP, *web, CheckKind.UDP),
            "port": (CheckKind.TCP, *web, CheckKind.UDP),
        }
        for field, kinds in only.items():
            if getattr(self, field) is not None and k not in kinds:
                allowed = " and ".join(x.value for x in kinds)
                raise ValueError(f"{field}: only for {allowed} checks, not {k.value}")
        if k is CheckKind.COMMAND:
            if not self.command:
                raise ValueError("command: a command check needs the command to run")
            if not self.command[0].startswith("/"):
                raise ValueError(f"command: {self.command[0]!r} is not an absolute path")
        if self.path is not None and not self.path.startswith("/"):
            raise ValueError(f"path: {self.path!r} does not start with /")
        if self.timeout_ms > self.interval_ms:
            raise ValueError(
                f"timeout_ms: {self.timeout_ms} is longer than interval_ms {self.interval_ms}"
            )
        if self.on_failure is not None and self.rule is None:
            raise ValueError("on_failure: a host-wide check always drains the host (drainstop)")
        return self
