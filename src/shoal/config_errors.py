"""A refused configuration: the error, and pydantic's complaints turned into lines that
name each field and the value given."""

from __future__ import annotations

from pydantic import ValidationError


class ConfigError(Exception):
    """A configuration was refused; ``problems`` name each field and value."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith(("function-", "literal[", "union[")) or part in {
            "int",
            "str",
            "IPv4Address",
            "IPv6Address",
            "IPv4Interface",
            "IPv6Interface",
            "constrained-int",
        }:
            continue
        else:
            out += ("." if out else "") + part
    return out


def describe(err: ValidationError) -> list[str]:
    """One line per problem: ``field.path: message (got value)``; deduplicated."""
    lines: list[str] = []
    for e in err.errors():
        where = _loc(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            # the unknown key itself is the last part, even if it reads like a type name
            key = e["loc"][-1]
            where = _loc(e["loc"][:-1]) + (f"[{key}]" if isinstance(key, int) else f".{key}")
            line = f"{where.lstrip('.')}: unknown key"
        elif e["type"] in {"model_type", "dict_type"} or "input" not in e:
            line = f"{where}: {msg}" if where else msg
        else:
            shown = e["input"]
            shown_text = repr(shown) if not isinstance(shown, dict) else "{...}"
            line = f"{where}: {msg} (got {shown_text})" if where else msg
        if line not in lines:
            lines.append(line)
    return lines
