"""What dropsafe asks of every DBAPI driver: the `Driver` base class and the shapes it answers in.

One subclass per driver lives beside this file (psycopg2.py, psycopg.py, asyncpg.py, pg8000.py);
the registry in ``__init__`` lists them. docs/architecture.md ("Drivers") tells how to add one.
"""

from __future__ import annotations

import enum
import functools
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from sqlalchemy.engine import AdaptedConnection
from sqlalchemy.util import concurrency as _sa_concurrency

from dropsafe._policy import ConnectionPolicy, seconds

if TYPE_CHECKING:
    import socket
    from collections.abc import Awaitable, Callable

    from sqlalchemy.engine import Dialect

    from dropsafe._classify import DriverErrors
    from dropsafe._drivers.deferred_rollback import Reporter

__all__ = [
    "Capabilities",
    "DBAPIConnection",
    "DeferredRollback",
    "Driver",
    "Health",
    "Server",
    "Tls",
    "XidQuestion",
    "XidReading",
    "await_",
    "driver_connection",
    "is_instance",
    "timeout_argument",
]

#: A DBAPI connection (or a driver's own, or a wrapper around one). DBAPI connections are
#: untyped (PEP 249 defines no class), and each driver's methods are reached by duck typing.
DBAPIConnection = Any
#: Connect arguments as SQLAlchemy's ``do_connect`` event hands them over: any value.
ConnectArgs = dict[str, Any]

# Runs a coroutine from SQLAlchemy's greenlet; SQLAlchemy 2.1 renamed await_only to await_.
await_: Callable[[Awaitable[DBAPIConnection]], DBAPIConnection] = (
    getattr(_sa_concurrency, "await_", None) or _sa_concurrency.await_only
)
# Attributes through which known wrappers reach the driver's connection: the AWS Advanced
# Python Wrapper (target_connection), wrapt and functools-style proxies, common hand-made ones.
_WRAPPER_ATTRIBUTES = ("target_connection", "__wrapped__", "_wrapped", "_connection", "_conn")
_UNWRAP_DEPTH = 3


@dataclass(frozen=True)
class Server:
    """Where a connection went: with several hosts, the one that answered as wanted."""

    host: str
    port: int


class Health(enum.Enum):
    """What a look at an idle connection's socket, without a round trip, saw."""

    #: Open, and nothing arrived while it sat idle.
    QUIET = "quiet"
    #: Something arrived while idle: the server's goodbye (an ERROR before it closes), or a
    #: notice or notification. Only a ping tells which.
    DATA_WAITING = "data waiting"
    #: The driver says it is closed, or the socket says the peer hung up or it failed.
    CLOSED = "closed"
    #: No look was possible: not this driver's connection (a wrapper dropsafe does not know,
    #: a creator's own type), or the look itself failed. It is pinged after idle.
    UNSEEN = "unseen"


@dataclass(frozen=True)
class Capabilities:
    """What a driver lets dropsafe do beyond the common ground."""

    #: Whether a transaction's first statement may be sent again on a fresh connection: the
    #: driver tells a lost connection from a timed-out one, and says whether one is open.
    replays_first_statement: bool = True
    #: Whether the driver can send several statements before reading replies (libpq's
    #: pipeline mode). Not used yet: issue 28 (BEGIN and the xid mark in one flight).
    pipelines: bool = False
    #: Whether `Driver.send_reading_xid` reads the xid in the statement's own flight.
    reads_xid_in_flight: bool = False
    #: Whether that read runs a DO block (plpgsql): only on sessions allowed to run one.
    xid_read_runs_do_block: bool = False


@dataclass(frozen=True)
class XidQuestion:
    """What to read of a transaction in a statement's own flight (issue 27 item 3).

    Two SELECT lists (`dropsafe._commit_truth.server_sql` builds them) of the same columns,
    the xid first, then ``synchronous_commit``: ``before`` is read before the statement runs
    and gives the transaction an xid if it has none; ``after`` is read after it and gives none.
    """

    before: str
    after: str


@dataclass(frozen=True)
class XidReading:
    """What a `XidQuestion` read: its columns, each as text (None for NULL)."""

    values: tuple[str | None, ...]
    #: Read with ``before``: the read gave the transaction its xid if it had none.
    assigned: bool


@dataclass(frozen=True)
class DeferredRollback:
    """How a driver sends a connection's ROLLBACK now and reads its reply before its next use.

    ``send(dbapi_connection, during, timeout, report)`` sends it; False: nothing sent, roll back
    as usual (``report``: the engine's `Reporter`). ``settle(native)`` reads a reply that is
    due (bounded by the ``timeout`` given to ``send``); a failure closes the connection, is
    given to ``report`` and raised.
    ``before_close(dbapi_connection)``, where the driver has one, runs before the dialect pings,
    closes or terminates a connection (uses that do not pass through the driver's own hook, as
    SQLAlchemy's asyncio adapters): it settles a reply that is due and never raises.
    """

    send: Callable[[DBAPIConnection, Literal["rollback", "reset"], float, Reporter], bool]
    settle: Callable[[DBAPIConnection], None]
    before_close: Callable[[DBAPIConnection], None] | None = None


@dataclass(frozen=True)
class Tls:
    """How a test server's URL asks this driver for TLS (the bench, `dropsafe.testing`)."""

    #: Query parameters that ask for TLS without checking the certificate, and for no TLS.
    url_parameters: dict[str, str] = field(default_factory=dict)
    off_url_parameters: dict[str, str] = field(default_factory=dict)
    #: Whether TLS can only be asked for with an ``ssl_context`` connect argument.
    needs_ssl_context: bool = False


class Driver:
    """What dropsafe needs to know about one DBAPI driver; subclasses fill it in."""

    #: The driver's name in a URL (``postgresql+NAME``) and its DBAPI module.
    name: ClassVar[str]
    #: SQLAlchemy's ``dialect.driver`` values it serves (psycopg's async face has its own).
    dialect_drivers: ClassVar[tuple[str, ...]]
    #: Whether it has a sync face (`dropsafe.create_engine`), an asyncio one, or both.
    sync: ClassVar[bool] = True
    asyncio: ClassVar[bool] = False
    #: The extra that installs it: ``pip install 'dropsafe[EXTRA]'``.
    extra: ClassVar[str]
    #: What the classifier must know of its exceptions (`dropsafe._classify.DriverErrors`).
    errors: ClassVar[DriverErrors]
    capabilities: ClassVar[Capabilities] = Capabilities()
    #: Where a sync connection's ROLLBACK may go unawaited (PoolPolicy.defer_checkin_rollback).
    deferred_rollback: ClassVar[DeferredRollback | None] = None
    #: The same for its asyncio face (SQLAlchemy's async adapter).
    async_deferred_rollback: ClassVar[DeferredRollback | None] = None
    tls: ClassVar[Tls] = Tls()

    def connect_defaults(
        self, policy: ConnectionPolicy, cargs: list[object], cparams: ConnectArgs
    ) -> set[str]:
        """Add dropsafe's connect arguments where the user set none; return the keys added."""
        del policy, cargs, cparams
        return set()

    def socket_for_options(self, dbapi_connection: DBAPIConnection) -> socket.socket | None:
        """Return the socket dropsafe must set TCP options on itself, after connecting.

        None where the connect arguments already set them (libpq takes keepalives and
        ``tcp_user_timeout`` as parameters), or where there is no socket to tune.
        """
        del dbapi_connection
        return None

    def after_connect(self, dbapi_connection: DBAPIConnection, added: set[str]) -> None:
        """Undo what a connect argument dropsafe ``added`` would do beyond the connect."""
        del dbapi_connection, added

    def first_flight_connect_args(self, cparams: ConnectArgs) -> None:
        """Add to a connect's arguments what its connection needs to send BEGIN in the flight.

        Before the connect (PoolPolicy.begin_in_first_flight): psycopg2's connection class.
        """
        del cparams

    def begin_in_first_flight(self, dbapi_connection: DBAPIConnection) -> bool:
        """Make a new connection send BEGIN in its first statement's flight; whether it does.

        PoolPolicy.begin_in_first_flight; a driver that cannot keeps its own BEGIN.
        """
        del dbapi_connection
        return False

    def owns(self, dbapi_connection: DBAPIConnection) -> bool:
        """Whether ``dbapi_connection`` is this driver's own, that `probe` can look into."""
        del dbapi_connection
        return False

    def native(self, dbapi_connection: DBAPIConnection) -> DBAPIConnection:
        """Return this driver's own connection inside ``dbapi_connection``, or None if unknown.

        Known wrappers (the AWS Advanced Python Wrapper's ``target_connection``,
        ``__wrapped__`` proxies) are looked through, at most three deep: the search runs at
        every checkout.
        """
        candidate = dbapi_connection
        for _ in range(_UNWRAP_DEPTH + 1):
            if candidate is None:
                return None
            if self.owns(candidate):
                return candidate
            candidate = _unwrap_once(candidate)
        return None

    def socket_fd(self, dbapi_connection: DBAPIConnection) -> int | None:
        """Return the file descriptor of the socket of a connection that `owns` accepts."""
        raise NotImplementedError

    def fileno_reader(self, dbapi_connection: DBAPIConnection) -> Callable[[], int | None]:
        """Return `socket_fd` for one connection, with what can be found once already found.

        Made once per connection (the checkout check keeps it), called at each checkout that
        the first-statement replay marks: the descriptor is asked each time, never remembered
        (a connection that lost its socket says so, or raises).
        """
        return functools.partial(self.socket_fd, dbapi_connection)

    def probe(self, dbapi_connection: DBAPIConnection) -> Health:
        """Look at an idle connection without a round trip (only one that `owns` accepts)."""
        raise NotImplementedError

    def prober(self, dbapi_connection: DBAPIConnection) -> Callable[[], Health]:
        """Return `probe` for one connection, with what can be found once already found.

        Made once per connection (the checkout check keeps it), called at each checkout.
        """
        return functools.partial(self.probe, dbapi_connection)

    def server_of(self, dbapi_connection: DBAPIConnection) -> Server | None:
        """Return the host and port a new connection reached (None on a Unix socket)."""
        del dbapi_connection
        return None

    def in_hot_standby(self, dbapi_connection: DBAPIConnection) -> bool | None:
        """Whether the server is in recovery (a standby), as it last reported; None if unknown.

        PostgreSQL 14+ reports ``in_hot_standby`` to every client at connect and whenever it
        changes (a promotion), so this costs no round trip.
        """
        value = self._reported_parameter(dbapi_connection, "in_hot_standby")
        return None if value is None else value == "on"

    def _reported_parameter(self, dbapi_connection: DBAPIConnection, name: str) -> str | None:
        """Return a parameter the server reported (ParameterStatus), if the driver keeps it."""
        del dbapi_connection, name
        return None

    def reported_parameter(self, dbapi_connection: DBAPIConnection, name: str) -> str | None:
        """Return a parameter the server last reported, also on a connection found lost.

        The first-statement replay compares a lost connection's with a fresh one's
        (`dropsafe._engine.session_state`). Raises where the driver cannot say.
        """
        return self._reported_parameter(dbapi_connection, name)

    def transaction_characteristics(
        self, dbapi_connection: DBAPIConnection
    ) -> tuple[object, ...] | None:
        """Return what the driver begins transactions with: isolation, read only, deferrable, ....

        Set on the driver's connection, they last for its life and no statement shows them;
        readable without a round trip, also on a connection found lost. None where unknown.
        """
        del dbapi_connection
        return None

    def hosts(self, cparams: ConnectArgs) -> list[tuple[str, str]]:
        """Return the (host, port) pairs of a multi-host target; empty for a single host."""
        del cparams
        return []

    def set_hosts(self, cparams: ConnectArgs, pairs: list[tuple[str, str]]) -> None:
        """Write ``pairs`` back as the multi-host target, in the form the driver takes."""
        del cparams, pairs

    def ping(self, dialect: Dialect, dbapi_connection: DBAPIConnection, timeout: float) -> None:
        """Make one round trip, bounded by ``timeout``; raise if it fails."""
        raise NotImplementedError

    def transaction_idle(self, dbapi_connection: DBAPIConnection) -> bool | None:
        """Whether no transaction is open on the connection, as the driver knows it locally.

        False once anything (the app's own cursor, a COPY, a listener) began one; None when
        the driver does not say. Read without a round trip: the first-statement replay asks
        it before it sends, since a statement sent into an open transaction is not its first.
        """
        del dbapi_connection
        return None

    def gone(self, dbapi_connection: DBAPIConnection) -> bool | None:
        """Whether the driver has found the connection lost (closed under it); None if unknown.

        Read after an error: a SQLSTATE of class 08 is also what a server answers on a healthy
        connection (dblink, postgres_fdw failing to reach their remote), so only this tells a
        lost connection from a reply.
        """
        del dbapi_connection
        return None

    def refused_unsent(self, error: BaseException) -> bool:
        """Whether ``error`` is the driver refusing an operation, unsent, on a lost connection.

        Proof that nothing of the operation left the client, where a driver gives it (a COMMIT
        so refused cannot have committed); False when unsure.
        """
        del error
        return False

    def send_reading_xid(
        self,
        send: Callable[[str], None],
        dbapi_connection: DBAPIConnection,
        statement: str,
        question: XidQuestion,
    ) -> XidReading | None:
        """Send ``statement`` and read ``question`` in the same flight; None: not read.

        ``send`` sends a text with the app's parameters, SQLAlchemy's way. What the app receives
        (rows, rowcount, description, the statement's own error) must be exactly what
        ``send(statement)`` gives. Only where ``capabilities.reads_xid_in_flight``: the default
        cannot, and sends the statement alone.
        """
        del dbapi_connection, question
        send(statement)
        return None

    def backend_pid(self, dbapi_connection: DBAPIConnection) -> int | None:
        """Return the connection's backend pid as the driver knows it (no round trip)."""
        del dbapi_connection
        return None

    def last_error_text(self, dbapi_connection: DBAPIConnection) -> str:
        """Return what the connection kept of its last error ("" if nothing), beyond the exception.

        A pooler's FATAL just before it closes the connection may be only there.
        """
        del dbapi_connection
        return ""

    def tls_connect_args(self, ca_file: str) -> dict[str, object]:
        """Return the connect arguments that ask for TLS where the URL cannot (`Tls`)."""
        del ca_file
        return {}


def timeout_argument(cparams: ConnectArgs, policy: ConnectionPolicy) -> set[str]:
    """Set the driver's ``timeout`` argument to the connect timeout, unless the user set it."""
    if "timeout" in cparams:
        return set()
    cparams["timeout"] = seconds(policy.connect_timeout)
    return {"timeout"}


def is_instance(candidate: object, module: str, name: str) -> bool:
    """``isinstance(candidate, module.name)`` if the driver is imported (if not, it cannot be)."""
    cls = getattr(sys.modules.get(module), name, None)
    return isinstance(cls, type) and isinstance(candidate, cls)


def driver_connection(connection: DBAPIConnection) -> DBAPIConnection:
    """Return the driver's connection inside SQLAlchemy's async adapter, or ``connection``."""
    if isinstance(connection, AdaptedConnection):
        return connection.driver_connection
    return connection


def _unwrap_once(wrapper: object) -> DBAPIConnection:
    """Return the object ``wrapper`` wraps through one known attribute, or None."""
    for name in _WRAPPER_ATTRIBUTES:
        try:
            inner = getattr(wrapper, name, None)
        except Exception:  # noqa: BLE001, S112 - a property that fails is not a way in
            continue
        if inner is not None and inner is not wrapper:
            return inner
    return None
