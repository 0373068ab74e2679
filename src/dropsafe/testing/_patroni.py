"""A three-node Patroni cluster on loopback: etcd as its store, HAProxy following the leader.

The open form of a managed database's HA endpoint, started and torn down in bounded time, so
that tests can fail it over for real. Who may get in: docs/reference/testing.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING

from dropsafe._errors import ConfigurationError
from dropsafe.testing._binaries import PostgresBinaries, find_postgres_binaries
from dropsafe.testing._kernel import kernel_blackhole
from dropsafe.testing._leftovers import (
    is_postmaster,
    kill_postmaster,
    kill_postmasters,
    postgres_processes,
    remove_on_sigterm,
    runs_as,
    signal_if,
)
from dropsafe.testing._leftovers import sweep_orphan_postmasters as _sweep_orphan_postmasters
from dropsafe.testing._runtime import (
    Owner,
    PortHolds,
    ServerError,
    Service,
    cleanup,
    log_tail,
    owners_finalizer,
    run_psql,
    stop_process,
)
from dropsafe.testing._urls import Driver, make_certificate, sqlalchemy_url

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = ["PatroniCluster", "patroni_cluster_unavailable", "sweep_orphan_postmasters"]

_PROGRAMS = {"etcd": "/usr/bin/etcd", "haproxy": "/usr/sbin/haproxy"}
# Patroni 4.1 in a venv of the system Python (scripts/setup.sh), else Debian's 3.0.2, which
# loses acknowledged writes when a hung leader resumes (its etcd3 `_update_leader` overwrites
# the new leader's key: upstream pull request 2689); 4.1 does not.
PATRONI_4 = Path("/opt/dropsafe-patroni/bin/patroni")
DEBIAN_PATRONI = Path("/usr/bin/patroni")
_START_TIMEOUT = 90.0
_MIN_NODES = 2  # a leader and one standby
_STOP_TIMEOUT = 20.0  # per process: SIGTERM, then SIGKILL
# ttl, loop_wait, retry_timeout. Patroni 4 raises a ttl below 20 s to 20 s (and refuses a
# retry_timeout below 3): a node crash fails over in ~22 s. retry_timeout 5 s, not 3: on two
# loaded cores one slow etcd write must not demote a healthy leader; loop_wait + 2 *
# retry_timeout <= ttl holds. Debian's 3.0.2 accepts ttl=10: a node crash fails over in ~9 s.
_TIMINGS_4 = (20, 2, 5)
_TIMINGS_3 = (10, 2, 3)
# No proxy for loopback REST calls, whatever http_proxy says.
_NO_PROXY = urllib.request.ProxyHandler({})


def _https(context: ssl.SSLContext | None) -> urllib.request.OpenerDirector:
    """Return an opener that uses no proxy and, given a context, presents its certificate."""
    if context is None:
        return urllib.request.build_opener(_NO_PROXY)
    return urllib.request.build_opener(_NO_PROXY, urllib.request.HTTPSHandler(context=context))


def patroni_cluster_unavailable() -> str | None:
    """Say why `PatroniCluster` cannot run here, or return None when it can."""
    missing = [name for name, path in _PROGRAMS.items() if not Path(path).is_file()]
    if default_patroni_command() is None:
        missing.insert(0, "patroni")
    if missing:
        return (
            f"PatroniCluster needs {', '.join(missing)} "
            "(apt-get install patroni etcd-server etcd-client haproxy, or scripts/setup.sh)"
        )
    if os.geteuid() == 0 and Owner.for_this_process().uid is None:
        return "PatroniCluster needs a 'postgres' user when run as root"
    return None


def default_patroni_command() -> list[str] | None:
    """Return the Patroni `PatroniCluster` runs by default: 4.1 if installed, else Debian's."""
    for program in (PATRONI_4, DEBIAN_PATRONI):
        if program.is_file() and os.access(program, os.X_OK):
            return [str(program)]
    return None


def patroni_version(command: Sequence[str]) -> str:
    """Return the version ``command --version`` prints ("4.1.5"), or "unknown"."""
    try:
        result = subprocess.run(
            [*command, "--version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    found = re.search(r"\b(\d+\.\d+\.\d+)\b", result.stdout)
    return found[1] if found else "unknown"


@dataclass
class _Node:
    """One machine of the cluster: a Patroni and the PostgreSQL it runs."""

    name: str
    base_dir: Path
    pg_port: int
    rest_port: int
    etcd_port: int
    psql: str
    owner: Owner
    process: subprocess.Popen[bytes] | None = None
    # The cluster's certificate and key: the REST API admits no one without them.
    client_tls: ssl.SSLContext | None = None
    crashed: bool = False
    stopped_pids: list[int] = field(default_factory=list)
    # Where the node keeps its things, all in base_dir.
    data_dir: Path = field(init=False, repr=False)
    socket_dir: Path = field(init=False, repr=False)
    config_file: Path = field(init=False, repr=False)
    log_file: Path = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "run"
        self.config_file = self.base_dir / "patroni.yml"
        self.log_file = self.base_dir / "patroni.log"

    def execute(self, sql: str, *, database: str = "postgres") -> list[tuple[str, ...]]:
        """Run SQL through the node's Unix socket (trusted locally; only its owner enters).

        Through psql's stdin: a command line is readable by every local account.
        """
        return run_psql(
            self.psql,
            sql,
            host=str(self.socket_dir),
            port=self.pg_port,
            database=database,
            what=f"psql on {self.name}",
            timeout=30,
            owner=self.owner,
        )

    @property
    def postgres(self) -> Path:
        """The server program (beside psql)."""
        return Path(self.psql).with_name("postgres")

    def is_postmaster(self, pid: int) -> bool:
        """Whether ``pid`` is this node's postmaster: its account, its program, its data."""
        uid = self.owner.process_uid
        return is_postmaster(pid, uid=uid, executable=self.postgres, data_dir=self.data_dir)

    def postmaster_pid(self) -> int | None:
        """Return the running postmaster's pid (None when it is not running).

        Read from its pid file, which the server's account can rewrite: the pid counts only
        if it names a ``postgres`` of that account working in this node's data folder.
        """
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        return pid if self.is_postmaster(pid) else None

    def rest(
        self, path: str, *, method: str = "GET", body: object = None, timeout: float = 2.0
    ) -> tuple[int, str]:
        """Call this node's REST API; (status, body); (0, reason) when it does not answer."""
        data = None if body is None else json.dumps(body).encode()
        scheme = "http" if self.client_tls is None else "https"
        request = urllib.request.Request(  # noqa: S310 - our own loopback URL
            f"{scheme}://127.0.0.1:{self.rest_port}{path}", data=data, method=method
        )
        try:
            with _https(self.client_tls).open(request, timeout=timeout) as response:
                return int(response.status), response.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode(errors="replace")
        except (OSError, ValueError) as exc:
            return 0, str(exc)


class PatroniCluster(Service):
    """Three PostgreSQL nodes run by Patroni, etcd as the store, HAProxy in front of the leader.

    Example::

        with PatroniCluster(synchronous=True) as cluster:
            engine = dropsafe.create_engine(cluster.url("psycopg2"))
            cluster.switchover()

    ``url`` goes through HAProxy (one endpoint, as a managed database offers: it routes to the
    node whose REST API answers ``/primary``); ``multi_host_url`` lists the nodes for libpq to
    pick the writable one. Every connection needs ``password`` (generated; the URLs carry it);
    the REST API and etcd need the cluster's client certificate (``cert_file``, ``key_file``).
    Patroni is 4.1 from ``/opt/dropsafe-patroni`` (scripts/setup.sh) when it is there, else
    Debian's 3.0.2 (``patroni_version`` and the repr say which); ``patroni_command`` runs another
    one (the config file is appended). Timings: ``ttl`` 20 s, ``loop_wait`` 2 s,
    ``retry_timeout`` 5 s (the least Patroni 4 accepts, with room for loaded machines); 10/2/3
    under 3.x, which accepts a shorter ttl.
    The faults act on the current leader: `switchover`, `kill_postmaster`, `crash_leader_node`,
    `hang_leader` and `cut_leader` (undone by `resume`), `stop_etcd`; `revive` restarts crashed
    nodes. Needs root for `cut_leader` only.
    """

    def __init__(
        self,
        *,
        synchronous: bool = False,
        tls: bool = True,
        nodes: int = 3,
        binaries: PostgresBinaries | None = None,
        patroni_command: Sequence[str] | None = None,
    ) -> None:
        if nodes < _MIN_NODES:
            raise ConfigurationError(f"a cluster needs at least 2 nodes: {nodes!r}")
        if reason := patroni_cluster_unavailable():
            raise ConfigurationError(reason)
        self.binaries = binaries or find_postgres_binaries()
        # Another Patroni (e.g. Debian's, to compare versions); the postgres user must be able
        # to run it.
        if patroni_command is None:
            patroni_command = default_patroni_command() or [str(DEBIAN_PATRONI)]
        self.patroni_command = list(patroni_command)
        if (
            isinstance(patroni_command, str)
            or not self.patroni_command
            or not all(isinstance(part, str) and part for part in self.patroni_command)
        ):
            raise ConfigurationError(
                f"patroni_command must be non-empty strings: {patroni_command!r}"
            )
        self.patroni_version = patroni_version(self.patroni_command)
        # An unknown version gets 4's timings: they are valid for every Patroni.
        self.ttl, self.loop_wait, self.retry_timeout = (
            _TIMINGS_3 if self.patroni_version.startswith(("2.", "3.")) else _TIMINGS_4
        )
        self.synchronous = synchronous
        self.tls = tls
        self.host = "127.0.0.1"
        self._password = secrets.token_urlsafe(24)
        self._replication_password = secrets.token_urlsafe(24)
        self._owner = Owner.for_this_process()
        self.base_dir = self._owner.make_base_dir("patroni")
        self.cert_file = self.base_dir / "server.crt"
        self.key_file = self.base_dir / "server.key"
        self._ports = PortHolds(self.host)
        self.etcd_peer_port = self._ports.take()
        self.haproxy_port = self._ports.take()
        self.replica_port = self._ports.take()
        self.nodes = [
            _Node(
                name=f"node{number}",
                base_dir=self.base_dir / f"node{number}",
                pg_port=self._ports.take(),
                rest_port=self._ports.take(),
                # One etcd client port per node: cutting a node off in the kernel then cuts its
                # line to the store too, as a partition of that machine would.
                etcd_port=self._ports.take(),
                psql=self.binaries.tool("psql"),
                owner=self._owner,
            )
            for number in range(1, nodes + 1)
        ]
        self._etcd: subprocess.Popen[bytes] | None = None
        self._haproxy: subprocess.Popen[bytes] | None = None
        self._cut: contextlib.ExitStack | None = None
        self._processes: list[subprocess.Popen[bytes]] = []  # what the finalizer kills
        # Not `track`: the postmasters Patroni started are no children of ours, and must go too.
        self._finalizer = owners_finalizer(self, _cleanup, self._processes, self.base_dir)
        remove_on_sigterm(self.base_dir, self._finalizer)

    def __repr__(self) -> str:
        # Never the password: clusters end up in assertion messages and logs.
        mode = "synchronous" if self.synchronous else "asynchronous"
        return (
            f"<PatroniCluster {len(self.nodes)} nodes, {mode}, Patroni {self.patroni_version}, "
            f"{self.host}:{self.haproxy_port}>"
        )

    @property
    def password(self) -> str:
        """The superuser's password (URL-safe characters); every connection must give it."""
        return self._password

    @property
    def ca_file(self) -> Path:
        """The certificate clients can verify every node with (self-signed, shared)."""
        return self.cert_file

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start etcd, the nodes and HAProxy; return once the cluster is healthy.

        Healthy: a leader takes writes through HAProxy and every other node streams from it
        (synchronously, for one, with ``synchronous``).
        """
        self._prepare_files()
        self._start_etcd()
        self._wait(self._etcd_ready, time.monotonic() + _START_TIMEOUT, "etcd")
        for node in self.nodes:
            self._start_node(node)
        self._haproxy = self._spawn(
            ["/usr/sbin/haproxy", "-db", "-f", str(self.base_dir / "haproxy.cfg")],
            self.base_dir / "haproxy.log",
        )
        self.wait_healthy(_START_TIMEOUT)

    def close(self) -> None:
        """Stop every node (SIGTERM, SIGKILL after a deadline), HAProxy and etcd; remove files.

        Safe to call twice. A hung node is resumed first, a cut one reconnected.
        """
        self.resume()
        for node in self.nodes:
            self._stop_node(node, graceful=True)
        for process in (self._haproxy, self._etcd):
            if process is not None:
                stop_process(process, signal.SIGTERM, _STOP_TIMEOUT)
        for node in self.nodes:
            _kill_postmaster_group(node)
        # A postmaster Patroni was starting as it stopped has no pid file yet: found by path.
        uid = self._owner.process_uid
        kill_postmasters(lambda cmdline: str(self.base_dir) in cmdline, uid=uid)
        self._finalizer()
        self._ports.close()

    def wait_healthy(self, timeout: float = _START_TIMEOUT) -> str:
        """Wait until the leader takes writes through HAProxy and every node streams from it.

        Returns the leader's name. Crashed nodes are not waited for (`revive` them first).
        """
        deadline = time.monotonic() + timeout
        leader = self.wait_for_leader(timeout)
        expected = sum(1 for node in self.nodes if not node.crashed) - 1
        state = "sync" if self.synchronous else "async"
        # Only Patroni's standbys (named after their node): a pg_basebackup that clones one
        # streams too. `state` is one of two constants.
        names = ", ".join(f"'{node.name}'" for node in self.nodes)
        query = (
            "SELECT count(*) FILTER (WHERE state = 'streaming'), "  # noqa: S608
            f"count(*) FILTER (WHERE sync_state = '{state}') FROM pg_stat_replication "
            f"WHERE application_name IN ({names})"
        )

        def streaming() -> bool:
            try:
                rows = self._node(leader).execute(query)
            except ServerError:
                return False
            return int(rows[0][0]) >= expected and int(rows[0][1]) >= min(expected, 1)

        self._wait(streaming, deadline, "every node streaming from the leader")
        if self.synchronous:
            # PostgreSQL streams synchronously a loop before Patroni records the synchronous
            # standby in etcd; until then Patroni fails over to no one (it could lose commits).
            def recorded() -> bool:
                status, body = self._node(leader).rest("/cluster")
                return status == HTTPStatus.OK and '"sync_standby"' in body

            self._wait(recorded, deadline, "Patroni to record the synchronous standby")
        self._wait(self._haproxy_routes, deadline, "HAProxy routing to the leader")
        return leader

    # -- where things are ------------------------------------------------------------------

    def leader(self) -> str | None:
        """Return the name of the node that holds the leader key and runs as primary, or None."""
        for node in self.nodes:
            if not node.crashed and node.rest("/primary")[0] == HTTPStatus.OK:
                return node.name
        return None

    def wait_for_leader(self, timeout: float = 60.0) -> str:
        """Wait until a node is leader and its PostgreSQL takes writes; return its name."""
        deadline = time.monotonic() + timeout
        found: list[str] = []

        def writable() -> bool:
            name = self.leader()
            if name is None:
                return False
            try:
                rows = self._node(name).execute("SELECT NOT pg_is_in_recovery()")
            except ServerError:
                return False
            if rows[0][0] != "t":
                return False
            found[:] = [name]
            return True

        self._wait(writable, deadline, "a leader that takes writes")
        return found[0]

    def execute(
        self, sql: str, *, node: str | None = None, database: str = "postgres"
    ) -> list[tuple[str, ...]]:
        """Run SQL as the superuser (``psql``, Unix socket) on ``node``; rows come as text.

        ``node`` defaults to the current leader.
        """
        name = self.leader() if node is None else node
        if name is None:
            raise ServerError("the cluster has no leader now")
        return self._node(name).execute(sql, database=database)

    def postmaster_pid(self, name: str) -> int | None:
        """Return the pid of node ``name``'s postmaster while it runs."""
        return self._node(name).postmaster_pid()

    # -- URLs ------------------------------------------------------------------------------

    def url(self, driver: Driver = "psycopg2", *, database: str = "postgres", **params: str) -> str:
        """Return a SQLAlchemy URL through HAProxy to the leader (it carries the password)."""
        return self._url(driver, f"{self.host}:{self.haproxy_port}", database, params)

    def replica_url(
        self, driver: Driver = "psycopg2", *, database: str = "postgres", **params: str
    ) -> str:
        """Return a SQLAlchemy URL through HAProxy to a streaming standby (read-only)."""
        return self._url(driver, f"{self.host}:{self.replica_port}", database, params)

    def multi_host_url(
        self, driver: Driver = "psycopg2", *, database: str = "postgres", **params: str
    ) -> str:
        """One URL listing every node, ``target_session_attrs=read-write`` unless given.

        As `dropsafe.testing.multi_host_url` builds it: libpq (psycopg2, psycopg) or asyncpg
        tries the nodes in order and keeps the writable one; no proxy in between.
        """
        return sqlalchemy_url(
            driver,
            password=self.password,
            address="",
            database=database,
            params=params,
            tls=self.tls,
            hosts=[(self.host, node.pg_port) for node in self.nodes],
        )

    # -- faults ----------------------------------------------------------------------------

    def switchover(self, candidate: str | None = None, *, timeout: float = 60.0) -> str:
        """Move the leader role to ``candidate`` (default: Patroni picks) in a planned way.

        Returns the new leader once it takes writes. With synchronous replication Patroni may
        refuse right after a node restart (no synchronous standby yet): retried until timeout.
        """
        deadline = time.monotonic() + timeout
        old = self.wait_for_leader(timeout)
        body: dict[str, str] = {"leader": old}
        if candidate is not None:
            body["candidate"] = candidate
        answer: list[tuple[int, str]] = []

        def accepted() -> bool:
            # Patroni answers once the switchover is done (or failed): a long timeout.
            answer[:] = [self._node(old).rest("/switchover", method="POST", body=body, timeout=30)]
            return answer[0][0] == HTTPStatus.OK or self.leader() not in (None, old)

        try:
            self._wait(accepted, deadline, "Patroni to accept the switchover", pause=0.5)
        except ServerError as exc:
            raise ServerError(f"{exc}; last answer: {answer[-1] if answer else None}") from None

        def moved() -> bool:
            name = self.leader()
            return name is not None and name != old

        self._wait(moved, deadline, "the switchover")
        return self.wait_for_leader(max(1.0, deadline - time.monotonic()))

    def kill_postmaster(self) -> str:
        """SIGKILL the leader's postmaster (Patroni restarts it, on a new timeline); its name."""
        node = self._node(self.wait_for_leader())
        pid = node.postmaster_pid()
        if pid is None or not signal_if(pid, signal.SIGKILL, node.is_postmaster):
            raise ServerError(f"{node.name} has no postmaster running")
        return node.name

    def crash_leader_node(self) -> str:
        """SIGKILL the leader's Patroni and all its PostgreSQL processes; return the node's name.

        As a machine crash would: another node takes over. See `revive`.
        """
        node = self._node(self.wait_for_leader())
        node.crashed = True
        if node.process is not None:
            node.process.kill()
            node.process.wait()
        _kill_postmaster_group(node)
        return node.name

    def hang_leader(self) -> str:
        """SIGSTOP every PostgreSQL process of the leader (not its Patroni); return its name.

        Connections stay open and nothing answers: only a client's own deadline bounds its
        wait. Patroni's loop hangs on its own query, its key expires and a standby is promoted
        (about ttl + 2 s); on `resume` Patroni 4.1 renews its key only if it still holds it: the
        old leader demotes itself, and nothing acknowledged is lost. Debian's 3.0.2 (no
        watchdog here) takes the key back and the promoted node demotes itself: what it
        acknowledged meanwhile is lost (split brain).
        """
        node = self._node(self.wait_for_leader())
        pid = node.postmaster_pid()
        if pid is None:
            raise ServerError(f"{node.name} has no postmaster running")
        # Every process of it: each backend leads a session of its own (PostgreSQL calls
        # setsid in its children), so no process group holds them all. The postmaster is
        # stopped first, then its children are looked for once more: one it forked while
        # /proc was read would otherwise run on, and take writes its stopped walsender never
        # streams.
        uid = self._owner.process_uid
        for _ in range(2):
            for process in postgres_processes(pid, uid):
                if process not in node.stopped_pids and signal_if(
                    process, signal.SIGSTOP, lambda p: runs_as(p, uid)
                ):
                    node.stopped_pids.append(process)
        return node.name

    def cut_leader(self) -> str:
        """Partition the leader off in the kernel; return its name.

        Every packet of its PostgreSQL, its REST API and its line to etcd is dropped, as a
        partition of that machine would. Undone by `resume` (needs root).
        """
        node = self._node(self.wait_for_leader())
        stack = contextlib.ExitStack()
        try:
            for port in (node.pg_port, node.rest_port, node.etcd_port):
                stack.enter_context(kernel_blackhole(port))
        except BaseException:
            stack.close()
            raise
        if self._cut is not None:
            self._cut.close()
        self._cut = stack
        return node.name

    def resume(self) -> None:
        """Undo `hang_leader` (SIGCONT) and `cut_leader`; safe when neither was done."""
        uid = self._owner.process_uid
        for node in self.nodes:
            for pid in node.stopped_pids:
                signal_if(pid, signal.SIGCONT, lambda p: runs_as(p, uid))
            node.stopped_pids.clear()
        if self._cut is not None:
            self._cut.close()
            self._cut = None

    def stop_etcd(self) -> None:
        """SIGKILL etcd: the store is lost (Patroni 3.0 then demotes the leader)."""
        if self._etcd is not None:
            stop_process(self._etcd, signal.SIGKILL, _STOP_TIMEOUT)
            self._etcd = None

    def start_etcd(self) -> None:
        """Start etcd again on its data (after `stop_etcd`)."""
        if self._etcd is None or self._etcd.poll() is not None:
            self._start_etcd()

    def revive(self, timeout: float = _START_TIMEOUT) -> None:
        """Start Patroni again on crashed nodes and wait until the cluster is healthy again.

        They rejoin as standbys (with pg_rewind where needed).
        """
        self.resume()
        self.start_etcd()
        for node in self.nodes:
            if node.crashed or node.process is None or node.process.poll() is not None:
                _kill_postmaster_group(node)
                self._start_node(node)
                node.crashed = False
        self.wait_healthy(timeout)

    # -- internals -------------------------------------------------------------------------

    def _node(self, name: str) -> _Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise ConfigurationError(f"no node named {name!r}")

    def _url(self, driver: Driver, address: str, database: str, params: dict[str, str]) -> str:
        return sqlalchemy_url(
            driver,
            password=self.password,
            address=address,
            database=database,
            params=params,
            tls=self.tls,
        )

    def _wait(
        self, ready: Callable[[], bool], deadline: float, what: str, *, pause: float = 0.1
    ) -> None:
        # Polls at `pause`: REST calls and psql cost a process or a request each.
        while not ready():
            if time.monotonic() > deadline:
                logs = "\n".join(
                    f"--- {node.name}:\n{log_tail(node.log_file, 8)}" for node in self.nodes
                )
                raise ServerError(f"timed out waiting for {what}\n{logs}")
            time.sleep(pause)

    def _spawn(self, command: list[str], log: Path) -> subprocess.Popen[bytes]:
        # Patroni reads no PGPASSWORD: an exported one would override its pgpass (and break
        # pg_rewind and replication after a failover).
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        process = self._owner.spawn(command, log=log, env=env)
        # Only live ones: the finalizer signals each one's process group, and a dead one's
        # pid may belong to another process by then.
        self._processes[:] = [p for p in self._processes if p.poll() is None]
        self._processes.append(process)
        return process

    def _start_etcd(self) -> None:
        peer = f"https://{self.host}:{self.etcd_peer_port}"
        clients = ",".join(f"https://{self.host}:{node.etcd_port}" for node in self.nodes)
        # Client certificates on both ports: a loopback port is every local account's, and
        # etcd's API holds (and rewrites) Patroni's configuration.
        cert, key = str(self.cert_file), str(self.key_file)
        self._etcd = self._spawn(
            [
                "/usr/bin/etcd",
                "--name",
                "etcd0",
                "--data-dir",
                str(self.base_dir / "etcd"),
                *("--cert-file", cert, "--key-file", key, "--trusted-ca-file", cert),
                "--client-cert-auth",
                *("--peer-cert-file", cert, "--peer-key-file", key),
                *("--peer-trusted-ca-file", cert, "--peer-client-cert-auth"),
                "--listen-client-urls",
                clients,
                "--advertise-client-urls",
                clients,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"etcd0={peer}",
            ],
            self.base_dir / "etcd.log",
        )

    def _etcd_ready(self) -> bool:
        # Patroni 4 reads etcd's cluster version at its start and dies on "not_decided", what
        # a just-started etcd says for a moment (Debian's 3.0.2 does not care).
        try:
            with _https(self._client_tls()).open(
                f"https://{self.host}:{self.nodes[0].etcd_port}/version", timeout=2
            ) as r:
                version = json.loads(r.read()).get("etcdcluster", "")
        except (OSError, ValueError):
            return False
        return bool(re.fullmatch(r"\d+\.\d+\.\d+", str(version)))

    def _start_node(self, node: _Node) -> None:
        node.process = self._spawn([*self.patroni_command, str(node.config_file)], node.log_file)

    def _stop_node(self, node: _Node, *, graceful: bool) -> None:
        if node.process is not None:
            stop_process(
                node.process, signal.SIGTERM if graceful else signal.SIGKILL, _STOP_TIMEOUT
            )

    def _haproxy_routes(self) -> bool:

        # A connection through HAProxy reaches a server once HAProxy has marked the leader up;
        # before that, HAProxy closes it at once. The server answers an SSLRequest with one
        # byte ('S' or 'N').
        try:
            with socket.create_connection((self.host, self.haproxy_port), timeout=2) as sock:
                sock.sendall((8).to_bytes(4, "big") + (80877103).to_bytes(4, "big"))
                return sock.recv(1) in (b"S", b"N")
        except OSError:
            return False

    def _client_tls(self) -> ssl.SSLContext:
        # One self-signed certificate is the server's, every client's, and the authority
        # that vouches for both: only the owner (and root) can read its key.
        context = ssl.create_default_context(cafile=str(self.cert_file))
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def _prepare_files(self) -> None:
        # Made whatever `tls` says: the REST API, etcd and HAProxy's checks need it.
        make_certificate(self.cert_file, self.key_file)
        self._owner.give(self.key_file)
        self.key_file.chmod(0o600)
        self.cert_file.chmod(0o644)
        pem = self.base_dir / "client.pem"  # HAProxy takes a certificate and its key in one
        pem.touch(mode=0o600)
        pem.write_bytes(self.cert_file.read_bytes() + self.key_file.read_bytes())
        self._owner.give(pem)
        context = self._client_tls()
        for node in self.nodes:
            node.client_tls = context
        (self.base_dir / "etcd").mkdir(mode=0o700)
        self._owner.give(self.base_dir / "etcd")
        for node in self.nodes:
            for folder in (node.base_dir, node.socket_dir):
                folder.mkdir(mode=0o700)
                self._owner.give(folder)
            node.config_file.touch(mode=0o600)  # it holds the passwords
            node.config_file.write_text(json.dumps(self._patroni_config(node), indent=1))
            self._owner.give(node.config_file)
        haproxy = self.base_dir / "haproxy.cfg"
        haproxy.touch(mode=0o600)
        haproxy.write_text(self._haproxy_config())
        self._owner.give(haproxy)

    def _patroni_config(self, node: _Node) -> dict[str, object]:
        # JSON is YAML: Patroni reads it as its configuration file.
        address = f"{self.host}:{node.pg_port}"
        parameters: dict[str, object] = {
            "unix_socket_directories": str(node.socket_dir),
            "fsync": "off",
            "shared_buffers": "32MB",
            "max_connections": 100,
            "log_line_prefix": "%m [%p] %q%a ",
            "ssl": "on" if self.tls else "off",
            # The ambiguous COMMITs of the tests come from a deferred trigger that sleeps.
            "password_encryption": "scram-sha-256",
        }
        if self.tls:
            parameters["ssl_cert_file"] = str(self.cert_file)
            parameters["ssl_key_file"] = str(self.key_file)
        return {
            "scope": "dropsafe",
            "name": node.name,
            "log": {"level": "INFO"},
            # Every call needs the cluster's client certificate (reads too: /config is how one
            # learns what to PATCH); Patroni's own calls to other nodes present it (ctl).
            "restapi": {
                "listen": f"{self.host}:{node.rest_port}",
                "connect_address": f"{self.host}:{node.rest_port}",
                "certfile": str(self.cert_file),
                "keyfile": str(self.key_file),
                "cafile": str(self.cert_file),
                "verify_client": "required",
            },
            "ctl": {
                "certfile": str(self.cert_file),
                "keyfile": str(self.key_file),
                "cacert": str(self.cert_file),
            },
            # use_proxies: no discovery of etcd's other client URLs, so that a node cut off
            # from its own port is cut off from the store.
            "etcd3": {
                "hosts": f"{self.host}:{node.etcd_port}",
                "use_proxies": True,
                "protocol": "https",
                "cacert": str(self.cert_file),
                "cert": str(self.cert_file),
                "key": str(self.key_file),
            },
            "bootstrap": {
                "dcs": {
                    "ttl": self.ttl,
                    "loop_wait": self.loop_wait,
                    "retry_timeout": self.retry_timeout,
                    "maximum_lag_on_failover": 1048576,
                    "synchronous_mode": self.synchronous,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "use_slots": True,
                        "parameters": {
                            "wal_level": "replica",
                            "hot_standby": "on",
                            "wal_log_hints": "on",
                            "max_wal_senders": 10,
                            "max_replication_slots": 10,
                        },
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}],
            },
            "postgresql": {
                "listen": address,
                "connect_address": address,
                "data_dir": str(node.data_dir),
                "bin_dir": str(self.binaries.bin_dir),
                "pgpass": str(node.base_dir / "pgpass"),
                # Patroni talks to its own PostgreSQL over the Unix socket, as on a real
                # machine a partition leaves it able to. Over TCP, `cut_leader` (which drops
                # the node's port on loopback) cut that line too: Patroni's loop hung on its
                # own query through the cut, and TCP's retransmission backoff kept it hung
                # ~25 s past the cut's end, the old leader a writable primary all along.
                "use_unix_socket": True,
                "authentication": {
                    "superuser": {"username": "postgres", "password": self.password},
                    "replication": {
                        "username": "replicator",
                        "password": self._replication_password,
                    },
                },
                "parameters": parameters,
                "pg_hba": [
                    "local all all trust",
                    "local replication all trust",
                    f"host all all {self.host}/32 scram-sha-256",
                    f"host replication all {self.host}/32 scram-sha-256",
                ],
            },
            "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False},
        }

    def _haproxy_config(self) -> str:
        def listener(name: str, port: int, check: str) -> str:
            # The checks present the cluster's certificate, as the REST API demands.
            tls = f"check-ssl verify none crt {self.base_dir / 'client.pem'}"
            servers = "".join(
                f"  server {node.name} {self.host}:{node.pg_port} "
                f"check port {node.rest_port} {tls}\n"
                for node in self.nodes
            )
            return (
                f"listen {name}\n"
                f"  bind {self.host}:{port}\n"
                f"  option httpchk OPTIONS {check}\n"
                "  http-check expect status 200\n"
                # Marked down after 2 failed checks a second apart; its sessions cut at once.
                "  default-server inter 1s fall 2 rise 1 on-marked-down shutdown-sessions\n"
                f"{servers}"
            )

        return (
            "global\n  maxconn 400\n"
            "defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30m\n"
            "  timeout server 30m\n  timeout check 2s\n"
            + listener("primary", self.haproxy_port, "/primary")
            + listener("replicas", self.replica_port, "/replica")
        )


def _cleanup(processes: list[subprocess.Popen[bytes]], base_dir: Path) -> None:
    """Kill Patroni (so that it restarts nothing), then its postmasters; remove the files.

    Patroni starts each postmaster in a session of its own, so it outlives its Patroni; their
    command lines carry the owner's tag, so a later start also kills those a dead run left.
    """
    # Only live ones: a dead one's pid (and process group) may belong to another by now.
    for process in [p for p in processes if p.poll() is None]:
        stop_process(process, signal.SIGKILL, timeout=30)
    uid = Owner.for_this_process().process_uid
    kill_postmasters(lambda cmdline: str(base_dir) in cmdline, uid=uid)
    cleanup([], base_dir)


def _kill_postmaster_group(node: _Node) -> None:
    pid = node.postmaster_pid()
    if pid is not None:
        kill_postmaster(
            pid, uid=node.owner.process_uid, executable=node.postgres, data_dir=node.data_dir
        )


def sweep_orphan_postmasters() -> list[int]:
    """SIGKILL the postmasters of clusters whose owning process is gone; return their pids.

    Every start of a bench service does it (`Owner.make_base_dir`); kept for callers.
    """
    return _sweep_orphan_postmasters(Owner.for_this_process().process_uid)
