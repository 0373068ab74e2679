"""Find what a test run left behind: server processes and proxy threads."""

from __future__ import annotations

import os
import threading
from pathlib import Path

__all__ = ["leftover_processes"]

_MARKERS = ("dropsafe-pg-",)
_THREAD_PREFIX = "dropsafe-chaos-proxy"


def leftover_processes(parent: int | None = None) -> list[str]:
    """Describe every live dropsafe server process and proxy thread (empty when clean).

    ``parent`` limits the search to that process's children (default: this process), so
    that servers of another run on the same machine do not count.
    """
    parent = os.getpid() if parent is None else parent
    found: list[str] = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            # The parent pid is the 2nd field after the parenthesised command name.
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and any(marker in cmdline for marker in _MARKERS):
            found.append(f"process {proc.name}: {cmdline.strip()}")
    found.extend(
        f"thread {thread.name}"
        for thread in threading.enumerate()
        if thread.name.startswith(_THREAD_PREFIX)
    )
    return found
