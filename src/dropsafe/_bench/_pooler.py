"""The explorer's pooler: PgBouncer between the app and the server, a flight proxy on each side.

A *route* says how a shape's app reaches the server, and on which side its faults strike::

    direct:                   app -> flight proxy -> server
    pgbouncer_tx:             app -> flight proxy (struck) -> PgBouncer -> flight proxy -> server
    pgbouncer_tx_upstream:    app -> flight proxy -> PgBouncer -> flight proxy (struck) -> server
    pgbouncer_session:        as pgbouncer_tx, PgBouncer in session mode
    pgbouncer_tx_undeclared:  as pgbouncer_tx, the pooler not told to dropsafe
    pgbouncer_session_undeclared: as pgbouncer_session, the pooler not told to dropsafe

The app tells dropsafe about the pooler as docs/settings.md says (``ConnectionPolicy.pooler``,
``dropsafe_pooler`` in a plugin URL): dropsafe then sets the drivers up for it and replays no
transaction behind it. ``pgbouncer_tx_undeclared`` is the app that does not: it sets its
drivers up by hand as their own documentation says, and dropsafe's replays stay on.

Struck on the client's side, a flight's link is the app's link to PgBouncer: behind a
transaction-mode pooler that link has a backend only while a transaction runs. A fault aimed
at "the flight's backend" then strikes the backend linked to it, or else every idle backend
of the app in the pool (the ones PgBouncer may give the flight). Struck on the server's side,
the link is PgBouncer's own link to one backend, and flights are the ones PgBouncer forwards.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, final

from dropsafe._bench._flights import FlightProxy
from dropsafe.testing._pgbouncer import PgBouncer
from dropsafe.testing._runtime import ServerError

if TYPE_CHECKING:
    from dropsafe.testing._pgbouncer import PoolMode
    from dropsafe.testing._server import PostgresServer

__all__ = ["ROUTES", "Pooler", "Route", "driver_kw", "pgbouncer_missing"]

_CONSOLE_WAIT_S = 15.0


@dataclass(frozen=True)
class Route:
    """How an app reaches the server: straight, or through PgBouncer; which side is struck."""

    name: str
    pool_mode: PoolMode | None = None
    struck: Literal["client", "server"] = "client"
    #: The app tells dropsafe about the pooler (`dropsafe.ConnectionPolicy.pooler`).
    declared: bool = True

    @property
    def pooler(self) -> PoolMode | None:
        """Return what the app sets `dropsafe.ConnectionPolicy.pooler` to."""
        return self.pool_mode if self.declared else None


ROUTES: dict[str, Route] = {
    route.name: route
    for route in (
        Route("direct"),
        Route("pgbouncer_tx", "transaction"),
        Route("pgbouncer_tx_upstream", "transaction", "server"),
        Route("pgbouncer_session", "session"),
        Route("pgbouncer_tx_undeclared", "transaction", declared=False),
        Route("pgbouncer_session_undeclared", "session", declared=False),
    )
}


def pgbouncer_missing() -> str | None:
    """Say why no PgBouncer can run here, or return None."""
    import shutil

    if shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin"):
        return None
    return "PgBouncer is not installed (apt-get install pgbouncer)"


def driver_kw(driver: str, route: Route) -> dict[str, Any]:
    """Return the engine arguments an app gives ``driver`` by hand behind ``route``'s pooler.

    In transaction mode a prepared statement lives on one backend and the next transaction
    may run on another: asyncpg's and psycopg's server-side statements are turned off, as
    SQLAlchemy and psycopg document for PgBouncer (1.18 here tracks none of them). An app that
    declares its pooler leaves this to dropsafe.
    """
    if route.pool_mode != "transaction" or route.declared:
        return {}
    if driver == "asyncpg":
        return {
            "connect_args": {
                "statement_cache_size": 0,
                "prepared_statement_name_func": lambda: f"__asyncpg_{uuid.uuid4()}__",
            }
        }
    if driver == "psycopg":
        return {"connect_args": {"prepare_threshold": None}}
    return {}


class _Bouncer(PgBouncer):
    """PgBouncer that reaches the server through ``upstream_port`` and lets ``users`` in.

    The bench's PgBouncer knows the server's superuser only; the explorer's app logs in as
    a role of its own (the checker tells its rows from anyone else's).
    """

    def __init__(
        self,
        server: PostgresServer,
        *,
        pool_mode: PoolMode,
        upstream_port: int,
        users: dict[str, str],
    ) -> None:
        self._upstream_port = upstream_port
        self._users = users
        super().__init__(server, pool_mode=pool_mode)

    def _write_config(self) -> None:
        super()._write_config()
        direct = f"* = host={self.server.host} port={self.server.port}"
        text = self.config_file.read_text()
        if direct not in text:
            raise ServerError(f"PgBouncer's configuration has no line {direct!r}")
        self.config_file.write_text(
            text.replace(direct, f"* = host={self.server.host} port={self._upstream_port}")
        )
        userlist = self.base_dir / "userlist.txt"
        lines = "".join(f'"{user}" "{password}"\n' for user, password in self._users.items())
        userlist.write_text(userlist.read_text() + lines)


@final
class Pooler:
    """A PgBouncer in ``pool_mode``, a flight proxy before it and one behind it."""

    def __init__(self, server: PostgresServer, pool_mode: PoolMode, users: dict[str, str]) -> None:
        self.server = server
        self.upstream = FlightProxy(server.port)
        self.upstream.start()
        try:
            self.bouncer = _Bouncer(
                server, pool_mode=pool_mode, upstream_port=self.upstream.port, users=users
            )
            self.bouncer.start()
            self.front = FlightProxy(self.bouncer.port)
            self.front.start()
        except BaseException:
            self.upstream.close()
            with contextlib.suppress(Exception):
                self.bouncer.close()
            raise
        self._console: Any = None

    def close(self) -> None:
        """Stop the proxies and PgBouncer; safe to call twice."""
        if self._console is not None:
            with contextlib.suppress(Exception):
                self._console.close()
            self._console = None
        self.front.close()
        self.bouncer.close()
        self.upstream.close()

    def proxy(self, route: Route) -> FlightProxy:
        """Return the proxy ``route`` strikes."""
        return self.upstream if route.struck == "server" else self.front

    def show(self, what: str) -> list[dict[str, str]]:
        """Return ``SHOW <what>`` of PgBouncer's console, a dict per row.

        Through psycopg2 on a kept connection (its columns by name): psql per call cost
        tens of milliseconds, and a fault action waits for it.
        """
        import psycopg2

        deadline = time.monotonic() + _CONSOLE_WAIT_S
        while True:
            try:
                if self._console is None or self._console.closed:
                    self._console = psycopg2.connect(
                        host=self.bouncer.host,
                        port=self.bouncer.port,
                        dbname="pgbouncer",
                        user="postgres",
                        password=self.server.password,
                    )
                    self._console.autocommit = True
                with self._console.cursor() as cursor:
                    cursor.execute(f"SHOW {what}")
                    names = [column.name for column in cursor.description]
                    return [
                        dict(zip(names, map(str, row), strict=True)) for row in cursor.fetchall()
                    ]
            except psycopg2.Error as exc:
                with contextlib.suppress(Exception):
                    self._console.close()
                self._console = None
                if time.monotonic() > deadline:
                    raise ServerError(f"PgBouncer's console: {exc}") from None
                time.sleep(0.05)  # PgBouncer busy with a restarting server: within a deadline

    def backends(self, client_port: int, user: str) -> list[int]:
        """Return the backend pids a flight from ``client_port`` is, or may be, served by.

        The backend linked to that client, if it has one; else every idle backend of
        ``user`` in the pool (a transaction-mode client between transactions has none).
        """
        clients = [c for c in self.show("CLIENTS") if c["port"] == str(client_port)]
        servers = self.show("SERVERS")
        if clients and clients[0]["link"] not in ("", "None", "0x0"):
            linked = [s for s in servers if s["ptr"] == clients[0]["link"]]
            if linked:
                return [int(linked[0]["remote_pid"])]
        return [
            int(s["remote_pid"])
            for s in servers
            if s["user"] == user and s["state"] == "idle" and s["remote_pid"] not in ("", "0")
        ]

    def clients_of(self, user: str) -> int:
        """Return how many client connections of ``user`` PgBouncer holds."""
        return sum(1 for c in self.show("CLIENTS") if c["user"] == user)
