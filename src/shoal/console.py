"""Where the command line writes: its two consoles and how it fails (one red line, an
exit code), shared by every group of commands."""

from __future__ import annotations

import typer
from rich.console import Console

out = Console()
err = Console(stderr=True)

EXIT_INVALID = 1


def error(message: str) -> None:
    """One error line, not wrapped by rich (the terminal wraps it): a path or a value in it
    stays whole, to copy."""
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)


def fail(message: str, code: int = EXIT_INVALID) -> typer.Exit:
    """Print ``message`` as an error; the caller raises what this returns."""
    error(message)
    return typer.Exit(code)
