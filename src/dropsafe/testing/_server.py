"""Throwaway PostgreSQL clusters for tests: temp folder, free loopback port, TLS, a password.

Only the process that started a server may enter it: every TCP connection must give the
server's generated password (SCRAM), and the Unix socket sits in a folder (0700) that only
root and the server's account can enter, who can read the server's files anyway. A server
that trusted local users would hand every account on the machine a superuser, and with
``COPY ... FROM PROGRAM`` the server's own OS account, while tests run.
"""

from __future__ import annotations

import os
import secrets
import signal
import warnings
from typing import TYPE_CHECKING, Literal

from dropsafe._errors import ConfigurationError
from dropsafe.testing._binaries import PostgresBinaries, find_postgres_binaries
from dropsafe.testing._initdb import copy_template, initdb, password_statement
from dropsafe.testing._leftovers import parent_of, runs_as, signal_if
from dropsafe.testing._runtime import (
    Owner,
    PortHolds,
    Rows,
    ServerError,
    Service,
    log_tail,
    run_psql,
    stop_process,
    track,
    wait_until,
    write_no_link,
)
from dropsafe.testing._urls import (
    Driver,
    Reachable,
    make_certificate,
    sqlalchemy_url,
)

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Sequence
    from pathlib import Path


__all__ = ["Driver", "PostgresServer", "ServerError", "StopMode", "multi_host_url", "run_psql"]

StopMode = Literal["smart", "fast", "immediate"]

_STOP_SIGNALS: dict[str, signal.Signals] = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}
_START_TIMEOUT = 60.0
#: A role name for tests of refused authentication (every role's password is checked).
PASSWORD_ROLE = "dropsafe_password_user"  # noqa: S105 - a role name, not a password
_STOP_TIMEOUT = 60.0
# PostgreSQL 14: SCRAM by default, pg_terminate_backend(pid, timeout).
_SINCE_14 = 14
_PID_FILE_STATUS = 7  # the line of postmaster.pid that says "ready" (PostgreSQL 10+)
_NAME_LIMIT = 63  # bytes in a name (NAMEDATALEN - 1)


class PostgresServer(Service, Reachable):
    """A PostgreSQL cluster that lives as long as this object, for tests and demos.

    Example::

        with PostgresServer() as server:
            engine = sqlalchemy.create_engine(server.url("psycopg2"))

    Every connection needs ``password`` (generated per server; the URLs carry it, quoted).
    As root the server runs as the ``postgres`` user (or ``nobody``), since PostgreSQL
    refuses to run as root. The postmaster is a direct child: if the creating thread dies,
    the kernel kills it, so no server outlives its test run. The cluster is a copy of one
    initdb made once per process, with a system identifier of its own (``fresh_initdb=True``
    runs initdb for this server alone).
    """

    def __init__(
        self,
        *,
        tls: bool = True,
        host: str = "127.0.0.1",
        settings: dict[str, str] | None = None,
        binaries: PostgresBinaries | None = None,
        name: str = "primary",
        fresh_initdb: bool = False,
        _primary: PostgresServer | None = None,
    ) -> None:
        self.binaries = binaries or find_postgres_binaries()
        if tls and not self.binaries.tls:
            warnings.warn(
                f"the PostgreSQL build from {self.binaries.source} has no TLS support: "
                "this server runs with TLS off",
                stacklevel=2,
            )
            tls = False
        self.tls = tls
        self.host = host
        self.name = name
        self.settings = dict(settings or {})
        self.is_standby = _primary is not None
        self._primary = _primary
        # A standby is a copy of its primary's cluster, roles and passwords included.
        self._password = _primary.password if _primary else secrets.token_urlsafe(24)
        self._owner = Owner.for_this_process()
        self.base_dir = self._owner.make_base_dir("")
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "run"
        self.log_file = self.base_dir / "postgres.log"
        self.cert_file = self.base_dir / "server.crt"
        self.key_file = self.base_dir / "server.key"
        self._ports = PortHolds(host)
        self.port = self._ports.take()
        self._process: subprocess.Popen[bytes] | None = None
        self._initialized = False
        self._fresh_initdb = fresh_initdb
        self._password_unset = False  # a copied cluster's, until its first start sets it
        self._processes: list[subprocess.Popen[bytes]] = []  # what the finalizer stops
        self._finalizer = track(self, self._processes, self.base_dir)

    def __repr__(self) -> str:
        # Never the password: servers end up in assertion messages and logs.
        state = "running" if self.running else "stopped"
        return f"<PostgresServer {self.name!r} {self.host}:{self.port} {state}>"

    @property
    def password(self) -> str:
        """The superuser's password (URL-safe characters); every connection must give it."""
        return self._password

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the postmaster process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while it runs."""
        return self._process.pid if self.running and self._process else None

    @property
    def ca_file(self) -> Path:
        """The certificate clients can verify the server with (it is self-signed)."""
        return self.cert_file

    def start(self) -> None:
        """Create the cluster on first use, then start the server and wait until it accepts."""
        if self.running:
            return
        if not self._initialized:
            self._initialize()
        self._launch()
        if self._password_unset:
            self.execute(password_statement(self.password, auth=self._auth_method))
            self._password_unset = False

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server: ``fast`` rolls back and closes sessions, ``immediate`` crashes it."""
        if mode not in _STOP_SIGNALS:
            raise ConfigurationError(f"stop mode must be one of {sorted(_STOP_SIGNALS)}: {mode!r}")
        process = self._process
        if process is None:
            return
        stop_process(process, _STOP_SIGNALS[mode], _STOP_TIMEOUT)
        self._process = None

    def restart(self, mode: StopMode = "fast") -> None:
        """Stop with ``mode`` and start again on the same port with the same data."""
        self.stop(mode)
        self._launch()

    def close(self) -> None:
        """Stop the server at once, remove its files and let its port go; safe to call twice."""
        self.stop("immediate")
        self._finalizer()
        self._ports.close()

    # -- SQL -------------------------------------------------------------------------------

    def execute(self, sql: str, *, database: str = "postgres") -> Rows:
        """Run SQL as the superuser through ``psql`` on the Unix socket; rows come as text.

        The SQL goes through psql's stdin, never its command line, which every local account
        can read in ``/proc`` (a ``CREATE ROLE ... PASSWORD`` would be anyone's). psql runs it
        as a script: statements one by one, each one's rows in order, stopping at an error.
        """
        if not self.running:
            raise ServerError(f"server {self.name!r} is not running")
        return run_psql(
            self.binaries.tool("psql"),
            sql,
            host=str(self.socket_dir),
            port=self.port,
            database=database,
            what=f"psql on {self.name!r}",
        )

    def terminate_backends(self, *, database: str | None = None) -> int:
        """Terminate every client backend (as an administrator would); return how many."""
        where = "backend_type = 'client backend' AND pid <> pg_backend_pid()"
        if database is not None:
            where += f" AND datname = '{database.replace(chr(39), chr(39) * 2)}'"
        wait = ", 5000" if self.binaries.major_version >= _SINCE_14 else ""
        rows = self.execute(
            f"SELECT count(*) FILTER (WHERE pg_terminate_backend(pid{wait})) "  # noqa: S608
            f"FROM pg_stat_activity WHERE {where}"
        )
        return int(rows[0][0])

    def signal_backend(self, pid: int, signum: int) -> bool:
        """Send ``signum`` to one of this server's processes; False if ``pid`` is none of them.

        For fault tests (SIGSTOP a backend, SIGKILL one as the OOM killer would). A pid the
        server reported (``pg_stat_activity``, a connection's backend pid) is signalled only
        if it is a child of this postmaster run by the server's account: the tests may run as
        root, and a pid from elsewhere could name any process.
        """
        postmaster = self.pid
        if postmaster is None:
            return False
        uid = self._owner.process_uid
        return signal_if(pid, signum, lambda p: runs_as(p, uid) and parent_of(p) == postmaster)

    def _login_server(self) -> PostgresServer:
        return self

    # -- replication -----------------------------------------------------------------------

    def make_standby(self, *, synchronous: bool = False, name: str = "standby") -> PostgresServer:
        """Clone this running server into a streaming standby, started and caught up.

        With ``synchronous=True`` every COMMIT on this server waits for the standby.
        """
        if problem := standby_name_problem(name):
            raise ConfigurationError(problem)
        if not self.running:
            raise ServerError(f"server {self.name!r} must run to make a standby")
        standby = PostgresServer(
            tls=self.tls,
            host=self.host,
            settings=self.settings,
            binaries=self.binaries,
            name=name,
            _primary=self,
        )
        try:
            standby.start()
            if synchronous:
                # A list of names, each one an identifier: double-quoted, inside a literal.
                listed = '"' + name.replace('"', '""') + '"'
                self.execute(f"ALTER SYSTEM SET synchronous_standby_names = {sql_literal(listed)}")
                self.execute("SELECT pg_reload_conf()")
            state = "sync" if synchronous else "async"
            self._wait_for(
                "SELECT 1 FROM pg_stat_replication "  # noqa: S608 - quoted
                f"WHERE application_name = {sql_literal(name)} "
                f"AND state = 'streaming' AND sync_state = '{state}'",
                what=f"standby {name!r} streaming ({state})",
            )
        except BaseException:
            standby.close()
            raise
        return standby

    def promote(self) -> None:
        """Turn this standby into a primary and wait until it accepts writes."""
        if not self.is_standby:
            raise ServerError(f"server {self.name!r} is not a standby")
        self.execute("SELECT pg_promote(true, 60)")
        self._wait_for("SELECT 1 WHERE NOT pg_is_in_recovery()", what="promotion")
        self.is_standby = False

    # -- internals -------------------------------------------------------------------------

    def _wait_for(self, sql: str, *, what: str, timeout: float = _START_TIMEOUT) -> None:
        try:
            wait_until(lambda: bool(self.execute(sql)), timeout=timeout, what=what)
        except TimeoutError as exc:
            raise ServerError(str(exc)) from None

    def _password_env(self) -> dict[str, str]:
        # The environment, not the command line: another user can read a command line in /proc.
        return {**os.environ, "PGPASSWORD": self.password}

    @property
    def _auth_method(self) -> str:
        # Before 14, passwords are stored as md5 by default; "md5" then also accepts SCRAM.
        return "scram-sha-256" if self.binaries.major_version >= _SINCE_14 else "md5"

    def _initialize(self) -> None:
        # Both 0700: the socket's folder keeps other accounts off the Unix socket.
        for folder in (self.data_dir, self.socket_dir):
            folder.mkdir(mode=0o700)
            self._owner.give(folder)
        if self._primary is None:
            copied = not self._fresh_initdb and copy_template(
                self.binaries, self._owner, self.data_dir, auth=self._auth_method
            )
            self._password_unset = copied
            if not copied:
                initdb(
                    self.binaries,
                    self._owner,
                    self.data_dir,
                    password=self.password,
                    auth=self._auth_method,
                )
        else:
            self._clone_primary(self._primary)
        if self.tls:
            make_certificate(self.cert_file, self.key_file)
            self._owner.give(self.key_file)
            self.key_file.chmod(0o600)
            self.cert_file.chmod(0o644)
        self._write_config()
        self._initialized = True

    def _clone_primary(self, primary: PostgresServer) -> None:
        self._owner.run(
            [
                self.binaries.tool("pg_basebackup"),
                "-h",
                primary.host,
                "-p",
                str(primary.port),
                "-U",
                "postgres",
                "-D",
                str(self.data_dir),
                "-X",
                "stream",
                "-c",
                "fast",
                "-R",
                "--no-sync",
            ],
            cwd=self.base_dir,
            what="pg_basebackup",
            env=self._password_env(),
        )
        # The data folder (0700) holds it, as the primary's folder holds its password's hash.
        conninfo = " ".join(
            f"{key}={_conninfo_value(value)}"
            for key, value in (
                ("host", primary.host),
                ("port", str(primary.port)),
                ("user", "postgres"),
                ("password", self.password),
                ("application_name", self.name),
                ("sslmode", "disable"),
            )
        )
        write_no_link(
            self.data_dir / "postgresql.auto.conf",
            f"primary_conninfo = {_config_string(conninfo)}\n",
            append=True,
        )

    def _write_config(self) -> None:
        settings = {
            "listen_addresses": f"'{self.host}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "fsync": "off",
            "full_page_writes": "off",
            "shared_buffers": "32MB",
            "max_connections": "100",
            "wal_level": "replica",
            "max_wal_senders": "10",
            "hot_standby": "on",
            "log_line_prefix": "'%m [%p] %q%a '",
            "ssl": "on" if self.tls else "off",
        }
        if self.tls:
            settings["ssl_cert_file"] = f"'{self.cert_file}'"
            settings["ssl_key_file"] = f"'{self.key_file}'"
        settings.update(self.settings)
        lines = ["", "# dropsafe.testing"] + [f"{key} = {value}" for key, value in settings.items()]
        write_no_link(self.data_dir / "postgresql.conf", "\n".join(lines) + "\n", append=True)
        # TCP: a password, since every local account can reach a loopback port. The Unix
        # socket: its folder (0700) already keeps out all but root and the server's account,
        # which own the server's files anyway; a SCRAM exchange per `execute` (~5 ms of CPU on
        # both sides) would buy nothing.
        method = self._auth_method
        write_no_link(
            self.data_dir / "pg_hba.conf",
            "local all all trust\n"
            f"host all all 127.0.0.1/32 {method}\n"
            f"host all all ::1/128 {method}\n"
            "local replication all trust\n"
            f"host replication all 127.0.0.1/32 {method}\n"
            f"host replication all ::1/128 {method}\n",
        )

    def _launch(self) -> None:
        process = self._owner.spawn(
            [self.binaries.tool("postgres"), "-D", str(self.data_dir)], log=self.log_file
        )
        self._process = process
        self._processes[:] = [process]
        try:
            self._wait_until_ready(process)
        except BaseException:
            self.stop("immediate")
            raise

    def _wait_until_ready(self, process: subprocess.Popen[bytes]) -> None:
        pid_file = self.data_dir / "postmaster.pid"

        def ready() -> bool:
            if process.poll() is not None:
                raise ServerError(
                    f"server {self.name!r} exited at start:\n{log_tail(self.log_file)}"
                )
            try:
                lines = pid_file.read_text().splitlines()
            except OSError:
                return False
            # Line 8 holds the postmaster's status once it is up (PostgreSQL 10+).
            return (
                len(lines) > _PID_FILE_STATUS
                and lines[0].strip() == str(process.pid)
                and lines[_PID_FILE_STATUS].strip() in ("ready", "standby")
            )

        try:
            wait_until(ready, timeout=_START_TIMEOUT, what=f"server {self.name!r} to accept")
        except TimeoutError as exc:
            raise ServerError(f"{exc}:\n{log_tail(self.log_file)}") from None


def multi_host_url(
    servers: Sequence[PostgresServer],
    driver: Driver = "psycopg2",
    *,
    database: str = "postgres",
    user: str = "postgres",
    password: str | None = None,
    **params: str,
) -> str:
    """Return one URL listing every server, the way managed databases hand out failover URLs.

    The URL carries ``password`` (default: the first server's; a standby shares its primary's).
    ``target_session_attrs`` defaults to ``read-write``: connections go to whichever server is
    the primary. TLS parameters follow the first server.

    Example::

        url = multi_host_url([primary, standby], "psycopg")
    """
    if not servers:
        raise ConfigurationError("multi_host_url needs at least one server")
    first = servers[0]
    return sqlalchemy_url(
        driver,
        user=user,
        password=first.password if password is None else password,
        address="",
        database=database,
        params=params,
        tls=first.tls,
        hosts=[(server.host, server.port) for server in servers],
    )


def standby_name_problem(name: object) -> str | None:
    """Say why ``name`` cannot name a standby, or None.

    It becomes ``application_name`` (printable ASCII, at most 63 bytes, else PostgreSQL
    mangles it and the standby is never seen streaming) in a conninfo inside a config file
    and in SQL: each is quoted, and a line break, which no config line can hold, refused.
    """
    if not isinstance(name, str) or not name:
        return f"a standby's name must be a non-empty string: {name!r}"
    if len(name) > _NAME_LIMIT or not all(" " <= char <= "~" for char in name):
        return f"a standby's name must be printable ASCII, at most 63 characters: {name!r}"
    return None


def sql_literal(text: str) -> str:
    """Quote ``text`` as a SQL string literal (standard_conforming_strings is on)."""
    return "'" + text.replace("'", "''") + "'"


def _conninfo_value(text: str) -> str:
    # libpq's quoting: single quotes, with backslash before a quote or a backslash.
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _config_string(text: str) -> str:
    # postgresql.conf's quoting: backslash escapes are read, and a quote is doubled.
    return "'" + text.replace("\\", "\\\\").replace("'", "''") + "'"
