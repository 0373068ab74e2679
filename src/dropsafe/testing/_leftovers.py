"""What a test run leaves behind: find it, sweep what dead runs left, and leave none on SIGTERM.

A run killed with SIGKILL (or pytest-timeout's ``os._exit``, or a cancelled CI job) runs no
``finally``: its temp folders (tens of MB each) and kernel rules stay. So each carries its
owner in its name, ``{pid}_{start}`` (the process id and the kernel's start time of that
process, so that a reused pid is not mistaken for the owner), and the next run sweeps those
whose owner is gone, never those of a live process: two suites may run at once on one machine.
A SIGTERM is caught (while nothing else handles it) to remove what this process holds, after
which the process dies of the SIGTERM as it would have.

The owner's pid is only meaningful in its own pid namespace: runs in different containers
must not share a temp folder (containers normally have their own /tmp and network).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Hashable
    from types import FrameType

__all__ = [
    "TEMP_PREFIX",
    "forget_on_sigterm",
    "leftover_processes",
    "owner_is_gone",
    "process_tag",
    "remove_on_sigterm",
    "sweep_temp_folders",
]

# Every folder and hence every server command line carries it: the leftovers check looks for it.
TEMP_PREFIX = "dropsafe-pg-"
_THREAD_PREFIX = "dropsafe-chaos-proxy"
# A temp folder's name: the prefix, the owner's tag, then what mkdtemp adds.
_TAGGED_FOLDER = re.compile(rf"^{re.escape(TEMP_PREFIX)}(?P<pid>\d+)_(?P<start>\d+)-")


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
            ppid = int(_stat_fields(int(proc.name))[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and TEMP_PREFIX in cmdline:
            found.append(f"process {proc.name}: {cmdline.strip()}")
    found.extend(
        f"thread {thread.name}"
        for thread in threading.enumerate()
        if thread.name.startswith(_THREAD_PREFIX)
    )
    return found


# -- owners ----------------------------------------------------------------------------------


def process_tag() -> str:
    """Name this process (``{pid}_{start}``) for what it leaves, asked anew after a fork."""
    pid = os.getpid()
    return f"{pid}_{_start_time(pid)}"


def owner_is_gone(pid: int, start: int) -> bool:
    """Whether the process that made a tag has ended (its pid is free, or now another's).

    When in doubt (``/proc`` hides the process) the owner counts as alive: a leftover stays
    rather than a live run losing its files.
    """
    try:
        return _start_time(pid) != start
    except FileNotFoundError:
        return True
    except (OSError, ValueError, IndexError):
        return False


def _start_time(pid: int) -> int:
    # Field 22 of /proc/PID/stat: clock ticks after boot at which the process started.
    return int(_stat_fields(pid)[19])


def _stat_fields(pid: int) -> list[str]:
    # The fields after the parenthesised command name (which may hold spaces): state first.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


# -- sweeping --------------------------------------------------------------------------------


def sweep_temp_folders() -> list[Path]:
    """Remove the temp folders of runs that ended without cleaning up; return them.

    Their servers died with their owner (the kernel's parent-death signal), so nothing writes
    there any more. A folder a late writer refilled stays for the next sweep.
    """
    swept: list[Path] = []
    for folder in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*"):
        match = _TAGGED_FOLDER.match(folder.name)
        if match and owner_is_gone(int(match["pid"]), int(match["start"])):
            # Another sweeper may be at it too; another user's folder may not be ours to remove.
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                swept.append(folder)
    return swept


# -- SIGTERM ---------------------------------------------------------------------------------

# What to undo on SIGTERM, by key. No lock: the handler runs in the main thread between
# bytecodes, possibly while that thread holds any lock; dict operations are atomic.
_ON_SIGTERM: dict[Hashable, Callable[[], object]] = {}
_installed: list[Any] = []  # the handler that was there before ours, once ours is in
# A forked child (multiprocessing's Process.terminate() sends SIGTERM) holds none of it: on its
# SIGTERM it must not kill its parent's servers or remove its parent's folders and rules.
os.register_at_fork(after_in_child=_ON_SIGTERM.clear)


def remove_on_sigterm(key: Hashable, action: Callable[[], object]) -> None:
    """Run ``action`` if this process gets SIGTERM before `forget_on_sigterm` (key)."""
    _ON_SIGTERM[key] = action
    _install()


def forget_on_sigterm(key: Hashable) -> None:
    """Drop ``key``'s action: what it would remove is gone already."""
    _ON_SIGTERM.pop(key, None)


def _install() -> None:
    # Only the main thread may set handlers; another thread's call leaves it to the next one
    # (or to the sweep at the next start). A handler someone else set (an ignore, a handler
    # installed from C) is left alone; a Python one is called after ours.
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN or previous is None:
        return
    signal.signal(signal.SIGTERM, _on_sigterm)
    _installed.append(previous)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    for key, action in list(_ON_SIGTERM.items()):
        _ON_SIGTERM.pop(key, None)
        with contextlib.suppress(Exception):  # a failed removal must not stop the others
            action()
    previous = _installed[0]
    if callable(previous):
        previous(signum, frame)
        return
    # Die of the SIGTERM, as without us: the exit status tells the parent what happened.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
