"""What every bench service stands on: its owner, its ports, its processes, psql, its error."""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import functools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from dropsafe._errors import ConfigurationError, DropsafeError
from dropsafe._redaction import redact_text
from dropsafe.testing._leftovers import (
    TEMP_PREFIX,
    forget_on_sigterm,
    process_tag,
    remove_on_sigterm,
    sweep_orphan_postmasters,
    sweep_temp_folders,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from types import TracebackType

    from typing_extensions import Self

__all__ = [
    "TEMP_PREFIX",
    "Owner",
    "PortHolds",
    "Rows",
    "ServerError",
    "Service",
    "cleanup",
    "closed_port",
    "free_port",
    "kill_group",
    "log_tail",
    "run_psql",
    "stop_process",
    "track",
    "wait_until",
    "write_no_link",
]

#: Rows from psql, every value as text.
Rows = list[tuple[str, ...]]
_PR_SET_PDEATHSIG = 1
_POLL_INTERVAL = 0.02


class Service:
    """A throwaway thing started by a ``with`` block and closed when it ends, even on error."""

    def start(self) -> None:
        """Start, and return once ready."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop and release everything; safe to call twice, and before start."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class ServerError(DropsafeError):
    """The throwaway server could not do what was asked; the message carries its log's tail.

    The message is masked (`redact_text`): it may quote SQL such as ``CREATE ROLE ...
    PASSWORD '...'``, or a log line that does, and errors end up in CI logs.
    """

    __module__ = "dropsafe.testing"

    def __init__(self, message: str) -> None:
        super().__init__(redact_text(message))


@dataclass(frozen=True)
class Owner:
    """Who runs the servers: as root, an unprivileged user (PostgreSQL refuses root)."""

    uid: int | None = None
    gid: int | None = None

    @classmethod
    def for_this_process(cls) -> Owner:
        """Pick ``postgres`` (or ``nobody``) when we are root; else run as ourselves."""
        if os.geteuid() != 0:
            return cls()
        for name in ("postgres", "nobody"):
            with contextlib.suppress(KeyError):
                entry = pwd.getpwnam(name)
                return cls(entry.pw_uid, entry.pw_gid)
        raise ConfigurationError(
            "running as root needs a 'postgres' or 'nobody' user to run the server"
        )

    @property
    def process_uid(self) -> int:
        """The uid the owner's processes run as (ours when it is no other user)."""
        return os.geteuid() if self.uid is None else self.uid

    @property
    def is_other_user(self) -> bool:
        """Whether processes run as another user than ours."""
        return self.uid is not None

    def make_base_dir(self, name: str) -> Path:
        """Create a temp folder for one server, named for its owner, enterable by the server.

        First what dead runs left goes (see ``_leftovers``): each start sweeps.
        """
        # Postmasters first: a dead run's Patroni cluster would listen on (see `_leftovers`).
        sweep_orphan_postmasters(self.process_uid)
        sweep_temp_folders()
        base_dir = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{process_tag()}-{name}"))
        if self.is_other_user and self.gid is not None:
            # mkdtemp folders are 0700: the server's user must be able to enter this one, and
            # no one else (its path is on `ps`). Ours, not the server's: an account that owned
            # it could plant a link where we (root) then open a log.
            os.chown(base_dir, -1, self.gid)
            base_dir.chmod(0o710)
        return base_dir

    def give(self, path: Path) -> None:
        """Hand ``path`` to the owner."""
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)

    def run(
        self, command: list[str], *, cwd: Path, what: str, env: dict[str, str] | None = None
    ) -> None:
        """Run a short command as the owner; raise ``DropsafeError`` with its stderr."""
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=cwd,
            env=env,
            user=self.uid,
            group=self.gid,
            extra_groups=self._extra_groups,
        )
        if result.returncode != 0:
            raise ServerError(f"{what} failed: {result.stderr.strip()}")

    def spawn(
        self, command: list[str], *, log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a long-running process as the owner; it dies with this process."""
        with _open_log(log) as log_file:
            return (
                _spawner()
                .submit(
                    subprocess.Popen,
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,  # only calls prctl: safe between fork and exec
                    user=self.uid,
                    group=self.gid,
                    extra_groups=self._extra_groups,
                )
                .result()
            )

    @property
    def _extra_groups(self) -> list[int] | None:
        # As root, drop root's supplementary groups along with its uid.
        return None if self.uid is None else []


def _open_log(path: Path) -> BinaryIO:
    """Open a service's log to append, readable by its owner only (it may quote secrets).

    A log can hold a failed ``ALTER ROLE ... PASSWORD`` statement, or a value a driver
    inlined into SQL. Never through a link: the folder may be another account's.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab")


def write_no_link(path: Path, text: str, *, append: bool = False) -> None:
    """Write ``text`` to ``path`` in a folder the server's account owns, never through a link.

    A server's data folder is its account's: had it put a link where we (root) write its
    config, a plain open would write through it, wherever it points.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if append else os.O_TRUNC)
    with os.fdopen(os.open(path, flags, 0o600), "w") as file:
        file.write(text)


def free_port(host: str) -> int:
    """Return a TCP port that is free on ``host`` now, and may be taken the next moment.

    Only for a number that nothing will listen on; a service takes its ports from `PortHolds`.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def closed_port(host: str) -> Iterator[int]:
    """Give a port on ``host`` that nothing listens on, kept so until the block ends.

    A connect to it is refused. A port merely probed as closed can be listened on by another
    process the next moment (a parallel run's server), and the connect then reaches it.
    """
    holds = PortHolds(host)
    try:
        yield holds.take()
    finally:
        holds.close()


class PortHolds:
    """The ports of one service, each kept from the moment it is taken until `close`.

    A port merely probed as free can be bound by anyone before the service binds it (another
    run's server, a client's ephemeral port): the service then fails to start, or a client
    reaches the other process. Here each port stays bound by a socket that never listens: the
    kernel hands it to no ``bind(0)`` and no ``connect``, and a plain bind of it fails. With
    SO_REUSEADDR on both sides (which PostgreSQL, PgBouncer, etcd, HAProxy, Patroni's REST
    API and asyncio set) the service still binds it, and binds it again after a restart:
    what a grabber would need, SO_REUSEADDR on a port it did not probe, nothing here does.
    """

    def __init__(self, host: str) -> None:
        self.host = host
        self._sockets: list[socket.socket] = []
        # The sockets, not self: closed when the service is garbage, or at exit.
        self._finalizer = weakref.finalize(self, _close_all, self._sockets)

    def take(self, port: int = 0) -> int:
        """Bind and keep a port (``port``, or one the kernel picks); return its number."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        hold = socket.socket(family, socket.SOCK_STREAM)
        try:
            hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            hold.bind((self.host, port))
        except BaseException:
            hold.close()
            raise
        self._sockets.append(hold)
        return int(hold.getsockname()[1])

    def close(self) -> None:
        """Let every port go; safe to call twice."""
        self._finalizer()


def _close_all(sockets: list[socket.socket]) -> None:
    for hold in sockets:
        hold.close()
    sockets.clear()


def run_psql(
    psql: str,
    sql: str,
    *,
    host: str,
    port: int,
    database: str = "postgres",
    what: str,
    timeout: float = 60,
    owner: Owner | None = None,
    password: str | None = None,
) -> Rows:
    """Run ``sql`` as ``postgres`` through psql's stdin; rows come as text.

    The one SQL runner of every bench service. ``host`` is an address or a Unix socket's
    folder; ``owner`` runs psql as the server's account (a socket whose folder only that
    account enters); ``password`` goes in the environment (``PGPASSWORD``), never on the
    command line, which every local account can read in ``/proc``, nor does the SQL.
    """
    target = ["-h", host, "-p", str(port), "-U", "postgres", "-d", database]
    # Unaligned, tuples only, fields split by \x1f; stop at the first error.
    quiet = ["-X", "-q", "-A", "-t", "-F", "\x1f", "-v", "ON_ERROR_STOP=1", "-f", "-"]
    env = None if password is None else {**os.environ, "PGPASSWORD": password}
    user = None if owner is None else owner.uid
    try:
        result = subprocess.run(
            [psql, *target, *quiet],
            input=sql,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            user=user,
            group=None if owner is None else owner.gid,
            extra_groups=None if user is None else [],
            env=env,
        )
    except subprocess.TimeoutExpired:
        raise ServerError(f"{what} timed out on {sql!r}") from None
    if result.returncode != 0:
        raise ServerError(f"{what} failed on {sql!r}: {result.stderr.strip()}")
    return [tuple(line.split("\x1f")) for line in result.stdout.splitlines() if line]


def wait_until(ready: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Poll ``ready`` until it holds; raise ``TimeoutError`` naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(_POLL_INTERVAL)


def log_tail(path: Path, lines: int = 30) -> str:
    """Return the last lines of a server's log, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def kill_group(pgid: int) -> None:
    """Kill a process group, if anything of it is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def stop_process(
    process: subprocess.Popen[bytes], stop_signal: signal.Signals, timeout: float
) -> None:
    """Signal ``process``, wait up to ``timeout`` (then kill it), and kill what it left."""
    if process.poll() is None:
        process.send_signal(stop_signal)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    kill_group(process.pid)


def track(
    service: object, processes: list[subprocess.Popen[bytes]], base_dir: Path
) -> weakref.finalize[..., object]:
    """Return the finalizer that ends ``service``'s processes and removes its files.

    It runs at ``close()``, when the service is garbage, at exit, and on SIGTERM.
    """
    finalizer = owners_finalizer(service, cleanup, processes, base_dir)
    remove_on_sigterm(base_dir, finalizer)
    return finalizer


def owners_finalizer(
    service: object, action: Callable[..., object], *args: object
) -> weakref.finalize[..., object]:
    """Return ``weakref.finalize(service, action, *args)``, acting only in this process.

    A forked child inherits the finalizer with the service; at its normal exit (a gunicorn
    worker's, a test's forked helper's) it would kill the parent's servers and remove their
    files. In any other process than the one that made it, it does nothing.
    """
    return weakref.finalize(service, _in_owner, os.getpid(), action, *args)


def _in_owner(owner: int, action: Callable[..., object], *args: object) -> None:
    if os.getpid() == owner:
        action(*args)


def cleanup(processes: list[subprocess.Popen[bytes]], base_dir: Path) -> None:
    """Kill what is left of ``processes`` and remove ``base_dir`` (a finalizer's job).

    ``processes`` is the owner's own list: it holds whatever process runs when this is called.
    """
    for process in processes:
        stop_process(process, signal.SIGKILL, timeout=30)
    shutil.rmtree(base_dir, ignore_errors=True)
    forget_on_sigterm(base_dir)


@functools.cache
def _spawner() -> concurrent.futures.ThreadPoolExecutor:
    """Return the one thread that starts servers; it lives until the interpreter exits.

    The kernel's parent-death signal fires when the *thread* that forked the child exits:
    servers started from a short-lived thread (a test's fault injector) would die with it.
    Forking from this thread instead ties every server's life to the process's.
    """
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dropsafe-pg-spawner")


def _die_with_parent() -> None:
    # Runs in the child after its user changed, so the kernel keeps this setting through exec.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
