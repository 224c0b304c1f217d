"""CPU time a process, or each of its threads, has used: user + system, from /proc. What the
benchmarks charge a daemon for."""

from __future__ import annotations

import os
from pathlib import Path


def _seconds(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """The whole process (every thread, live or ended)."""
    return _seconds(Path(f"/proc/{pid}/stat"))


def thread_seconds(pid: int) -> dict[int, float]:
    """Each live thread, by thread id (the main thread's id is the process id)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = _seconds(task / "stat")
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended meanwhile
    return out
