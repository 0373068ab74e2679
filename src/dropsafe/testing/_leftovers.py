"""Find what a test run left behind: server processes and proxy threads."""

from __future__ import annotations

import threading
from pathlib import Path

__all__ = ["leftover_processes"]

_MARKERS = ("dropsafe-pg-",)
_THREAD_PREFIX = "dropsafe-chaos-proxy"


def leftover_processes() -> list[str]:
    """Describe every live dropsafe server process and proxy thread (empty when clean)."""
    found: list[str] = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(marker in cmdline for marker in _MARKERS):
            found.append(f"process {proc.name}: {cmdline.strip()}")
    found.extend(
        f"thread {thread.name}"
        for thread in threading.enumerate()
        if thread.name.startswith(_THREAD_PREFIX)
    )
    return found
