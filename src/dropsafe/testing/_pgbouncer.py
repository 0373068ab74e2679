"""A throwaway PgBouncer in front of a PostgresServer, with its admin console at hand."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
from typing import TYPE_CHECKING, Literal

from dropsafe._errors import ConfigurationError
from dropsafe.testing._runtime import (
    Owner,
    PortHolds,
    ServerError,
    Service,
    log_tail,
    run_psql,
    stop_process,
    track,
    wait_until,
)
from dropsafe.testing._urls import Reachable

if TYPE_CHECKING:
    from dropsafe.testing._server import PostgresServer

__all__ = ["PgBouncer", "PoolMode"]

PoolMode = Literal["session", "transaction"]
_START_TIMEOUT = 30.0
_LONGEST_LOGIN_RETRY = 60  # seconds: a bench has no use for longer
_EXIT_TIMEOUT = 10.0  # a PgBouncer that refuses its console this long after a KILL lives


class PgBouncer(Service, Reachable):
    """PgBouncer on a free loopback port, pooling connections to ``server``.

    Example::

        with PgBouncer(server, pool_mode="transaction") as bouncer:
            engine = dropsafe.create_engine(bouncer.url("psycopg2"))
            bouncer.console("RECONNECT")

    TLS to clients is on when the server's is (same certificate). Clients must give the
    server's password (SCRAM), as the server itself demands: a pooler that trusted its clients
    would let any local account in as the server's superuser. ``postgres`` is the console's
    admin user; there is no Unix socket. Needs Debian's ``pgbouncer`` (or one on PATH).

    ``server_login_retry``: for how many seconds after a failed server login PgBouncer turns away
    every client that needs a server (its own default is 15; here 1, as a bench server restarts
    in about a second).
    """

    def __init__(
        self,
        server: PostgresServer,
        *,
        pool_mode: PoolMode = "session",
        server_login_retry: float = 1,
    ) -> None:
        if pool_mode not in ("session", "transaction"):
            raise ConfigurationError(f"pool_mode must be 'session' or 'transaction': {pool_mode!r}")
        if (
            isinstance(server_login_retry, bool)
            or not isinstance(server_login_retry, (int, float))
            or not 0 < server_login_retry <= _LONGEST_LOGIN_RETRY
        ):
            raise ConfigurationError(
                f"server_login_retry must be seconds, above 0 and at most 60: "
                f"{server_login_retry!r}"
            )
        self.server_login_retry = float(server_login_retry)
        program = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
        if program is None:
            raise ConfigurationError("PgBouncer is not installed: apt-get install pgbouncer")
        self.program = program
        self.server = server
        self.pool_mode = pool_mode
        self.host = server.host
        self._ports = PortHolds(self.host)
        self.port = self._ports.take()
        self.tls = server.tls
        self._owner = Owner.for_this_process()
        self.base_dir = self._owner.make_base_dir("bouncer-")
        self.config_file = self.base_dir / "pgbouncer.ini"
        self.log_file = self.base_dir / "pgbouncer.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._processes: list[subprocess.Popen[bytes]] = []  # what the finalizer stops
        self._finalizer = track(self, self._processes, self.base_dir)
        self._write_config()

    @property
    def running(self) -> bool:
        """Whether the PgBouncer process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start PgBouncer and wait until it accepts connections (on the port it always had).

        A connect to the port is no proof (it could reach another process): its own log line
        "listening on" is.
        """
        if self.running:
            return
        logged_before = self.log_file.stat().st_size if self.log_file.exists() else 0
        process = self._owner.spawn([self.program, str(self.config_file)], log=self.log_file)
        self._process = process
        self._processes[:] = [process]
        listening = f"listening on {self.host}:{self.port}"

        def this_start_logged(text: str) -> bool:
            with self.log_file.open("rb") as log:
                log.seek(logged_before)
                return text in log.read().decode(errors="replace")

        def accepting() -> bool:
            if process.poll() is not None:
                raise ServerError(f"pgbouncer exited at start:\n{log_tail(self.log_file)}")
            if not this_start_logged(listening):
                return False
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
            except OSError:
                return False
            return True

        try:
            wait_until(accepting, timeout=_START_TIMEOUT, what="pgbouncer to accept")
        except TimeoutError as exc:
            self.stop()
            raise ServerError(f"{exc}:\n{log_tail(self.log_file)}") from None

    def stop(self) -> None:
        """Stop PgBouncer at once (SIGTERM): every client connection is closed."""
        process, self._process = self._process, None
        if process is not None:
            stop_process(process, signal.SIGTERM, timeout=30)

    def restart(self) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop, remove every file and let the port go; safe to call twice."""
        self.stop()
        self._finalizer()
        self._ports.close()

    def console(self, command: str) -> list[tuple[str, ...]]:
        """Run an admin command (``RECONNECT``, ``KILL postgres``, ``SHOW POOLS``...).

        Through psql's stdin, as `PostgresServer.execute` does: not on a command line.
        """
        try:
            return run_psql(
                self.server.binaries.tool("psql"),
                command,
                host=self.host,
                port=self.port,
                database="pgbouncer",
                what="pgbouncer console",
                timeout=30,
                password=self.server.password,
            )
        except ServerError as exc:
            died = "" if self.running else f"\npgbouncer has exited:\n{log_tail(self.log_file)}"
            raise ServerError(f"{exc}{died}") from None

    def kill_database(self, database: str = "postgres") -> bool:
        """Drop every client and server connection of ``database`` (``KILL``, then ``RESUME``).

        PgBouncer itself sometimes dies of a ``KILL`` under load (seen here with 1.18 in a
        fault run; pgbouncer/pgbouncer#1401 reports SEGVs with 1.24): every client connection
        is then lost too, which is a fault the clients must survive all the same. So a
        PgBouncer that exits within a few seconds of the command is started again on the same
        port, as its supervisor would, and True is returned; False when it lived.
        """
        # The console takes a bare name: anything else could be a second command.
        if not re.fullmatch(r"[A-Za-z0-9_]+", database):
            raise ConfigurationError(
                f"kill_database takes a database name of letters, digits and _: {database!r}"
            )
        try:
            self.console(f"KILL {database}")
            self.console(f"RESUME {database}")
        except ServerError:
            process = self._process
            if process is None:
                raise
            try:
                process.wait(timeout=_EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                raise ServerError(
                    f"pgbouncer refused its console but did not exit:\n{log_tail(self.log_file)}"
                ) from None
            self._process = None
            self.start()
            return True
        return False

    def _login_server(self) -> PostgresServer:
        return self.server

    def _write_config(self) -> None:
        # In plain text, the server's password both checks clients (SCRAM) and logs PgBouncer in
        # to the server; so the file is the server account's alone.
        userlist = self.base_dir / "userlist.txt"
        userlist.touch(mode=0o600)
        userlist.write_text(f'"postgres" "{self.server.password}"\n')
        lines = [
            "[databases]",
            f"* = host={self.server.host} port={self.server.port}",
            "[pgbouncer]",
            f"listen_addr = {self.host}",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            "auth_type = scram-sha-256",
            f"auth_file = {self.base_dir / 'userlist.txt'}",
            "admin_users = postgres",
            f"pool_mode = {self.pool_mode}",
            "max_client_conn = 200",
            "default_pool_size = 20",
            "server_reset_query = DISCARD ALL",
            "ignore_startup_parameters = extra_float_digits",
            # After one failed server login (a server restarting) PgBouncer turns every client
            # that needs a server away for server_login_retry (PgBouncer's default 15 s; dropsafe
            # waits it out within connect_wait): a bench server restarts in about a second.
            f"server_login_retry = {self.server_login_retry:g}",
        ]
        if self.tls:
            lines += [
                "client_tls_sslmode = allow",
                f"client_tls_cert_file = {self.server.cert_file}",
                f"client_tls_key_file = {self.server.key_file}",
                "server_tls_sslmode = require",
            ]
        self.config_file.touch(mode=0o600)  # its paths and settings are no one else's business
        self.config_file.write_text("\n".join(lines) + "\n")
        # The files, not the folder: the server's account, owning it, could put a link there
        # for us to write through.
        for path in (self.config_file, self.base_dir / "userlist.txt"):
            self._owner.give(path)
