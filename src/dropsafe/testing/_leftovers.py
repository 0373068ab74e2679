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
import subprocess
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
    "leftover_rules",
    "owner_is_gone",
    "parent_of",
    "postgres_processes",
    "process_tag",
    "remove_on_sigterm",
    "signal_if",
    "sweep_orphan_postmasters",
    "sweep_temp_folders",
]

# Every folder and hence every server command line carries it: the leftovers check looks for it.
TEMP_PREFIX = "dropsafe-pg-"
_THREAD_PREFIX = "dropsafe-chaos-proxy"
# A temp folder's name: the prefix, the owner's tag, then what mkdtemp adds.
_TAGGED_FOLDER = re.compile(rf"^{re.escape(TEMP_PREFIX)}(?P<pid>\d+)_(?P<start>\d+)-")
# A tagged folder's path anywhere in a command line (a postmaster's "-D DATA_DIR").
_TAG_IN_PATH = re.compile(rf"{re.escape(TEMP_PREFIX)}(?P<pid>\d+)_(?P<start>\d+)-")


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


def leftover_rules() -> list[str]:
    """Name the kernel rules (blackholes, idle reapers) this process made and still holds.

    They carry their owner's tag (`process_tag`); without nft or iptables, or without the right
    to list rules, there is nothing to find.
    """
    owned = f"_{process_tag()}_"
    if shutil.which("nft") is not None:
        commands = [["nft", "list", "tables", "inet"]]
    else:
        commands = [
            [tool, "-S", "INPUT"] for tool in ("iptables", "ip6tables") if shutil.which(tool)
        ]
    found: list[str] = []
    for command in commands:
        listing = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
        found.extend(
            f"rule: {line.strip()}"
            for line in listing.stdout.splitlines()
            if "dropsafe_" in line and owned in line
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


# -- processes the bench did not start itself -------------------------------------------------

# Patroni starts each postmaster in a session of its own: no Popen handle of ours holds it, and
# its pid is known from postmaster.pid, a file the server's account writes. As root, signalling
# whatever that file names would let that account choose what root kills. So a pid read from
# anywhere is signalled only after the process it names proves to be what we expect (its
# owner, its program, its data folder), and through a pidfd opened before the check, so that a
# pid reused in between gets nothing.


def signal_if(pid: int, signum: int, expected: Callable[[int], bool]) -> bool:
    """Send ``signum`` to ``pid`` only if ``expected(pid)`` holds; return whether it was sent."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if not expected(pid):
            return False
        signal.pidfd_send_signal(pidfd, signum)
    except OSError:  # ended meanwhile
        return False
    finally:
        os.close(pidfd)
    return True


def runs_as(pid: int, uid: int) -> bool:
    """Whether ``pid`` runs as ``uid`` (its /proc entry's owner: the effective uid)."""
    try:
        return Path(f"/proc/{pid}").stat().st_uid == uid
    except OSError:
        return False


def parent_of(pid: int) -> int | None:
    """Return ``pid``'s parent process id, or None when it has ended."""
    try:
        return int(_stat_fields(pid)[1])
    except (OSError, ValueError, IndexError):
        return None


def is_postmaster(
    pid: int, *, uid: int, executable: Path | None = None, data_dir: Path | None = None
) -> bool:
    """Whether ``pid`` is a PostgreSQL server run by ``uid`` (from ``executable``, on ``data_dir``).

    Without ``executable``, any program named ``postgres``. The postmaster works in its data
    folder (its cwd), which names the cluster whatever its command line says.
    """
    if not runs_as(pid, uid):
        return False
    try:
        program = Path(f"/proc/{pid}/exe").readlink()
        cwd = Path(f"/proc/{pid}/cwd").readlink()
    except OSError:
        return False
    if executable is not None and program != Path(os.path.realpath(executable)):
        return False
    if executable is None and program.name != "postgres":
        return False
    return data_dir is None or cwd == Path(os.path.realpath(data_dir))


def postgres_processes(postmaster: int, uid: int) -> list[int]:
    """Return the postmaster and its children (backends, WAL senders, workers) run by ``uid``."""
    found = [postmaster]
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int(_stat_fields(int(proc.name))[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == postmaster and runs_as(int(proc.name), uid):
            found.append(int(proc.name))
    return found


def kill_postmaster(
    pid: int, *, uid: int, executable: Path | None = None, data_dir: Path | None = None
) -> bool:
    """SIGKILL a postmaster proved to be ours (see `is_postmaster`), and each of its children.

    Each child too: a backend leads a session of its own, and one SIGSTOPped would never
    notice its postmaster's death; SIGKILL ends stopped ones too. Returns whether it was one.
    """
    if not is_postmaster(pid, uid=uid, executable=executable, data_dir=data_dir):
        return False
    children = postgres_processes(pid, uid)[1:]
    if not signal_if(
        pid,
        signal.SIGKILL,
        lambda p: is_postmaster(p, uid=uid, executable=executable, data_dir=data_dir),
    ):
        return False
    for child in children:
        signal_if(child, signal.SIGKILL, lambda p: runs_as(p, uid))
    return True


def kill_postmasters(chosen: Callable[[str], bool], *, uid: int) -> list[int]:
    """SIGKILL every postmaster run by ``uid`` whose command line ``chosen`` picks; their pids."""
    killed: list[int] = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        # Only postmasters: their command line is the program and "-D DATA_DIR ...".
        if (
            cmdline.split(" ", 1)[0].endswith("/postgres")
            and chosen(cmdline)
            and kill_postmaster(int(proc.name), uid=uid)
        ):
            killed.append(int(proc.name))
    return killed


def sweep_orphan_postmasters(uid: int) -> list[int]:
    """SIGKILL the postmasters (run by ``uid``) of bench clusters whose owning run is gone.

    A run killed hard takes its own children with it (parent-death signal), not the
    postmasters Patroni started in sessions of their own: they would listen on until swept.
    """

    def orphan(cmdline: str) -> bool:
        found = _TAG_IN_PATH.search(cmdline)
        return found is not None and owner_is_gone(int(found["pid"]), int(found["start"]))

    return kill_postmasters(orphan, uid=uid)


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
