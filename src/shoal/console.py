"""Where the command line writes: its two consoles and how it fails (one red line, an
exit code), shared by every group of commands."""

from __future__ import annotations

import typer
from rich.console import Console

out = Console()
err = Console(stderr=True)

EXIT_INVALID = 1


def fail(message: str, code: int = EXIT_INVALID) -> typer.Exit:
    """Print ``message`` as an error; the caller raises what this returns."""
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)
