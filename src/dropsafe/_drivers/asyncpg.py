"""asyncpg, through SQLAlchemy's adapter: TCP options set after connecting, its protocol state.

asyncpg takes no TCP options, so dropsafe sets them on its socket (`socket_for_options`); its
errors keep the SQLSTATE in ``sqlstate`` and the severity in ``severity_en``.

The server's goodbye. PostgreSQL sends an ErrorResponse of severity FATAL (a terminated
backend, a shutdown) before it closes the socket. asyncpg's event loop reads it at once; with
no operation running, its protocol has no one to give it to and waits for a ReadyForQuery that
never comes (``protocol/coreproto.pyx``: "cannot process message" in ``_read_server_messages``,
then ``PROTOCOL_ERROR_CONSUME``). Until the close arrives, ``is_closed()`` is False and the
socket is quiet, yet the next operation fails with ``InternalClientError: cannot switch to
state 15; another operation (2) is in progress``. So dropsafe stands a thin watch between the
transport and asyncpg's protocol (`_GoodbyeWatch`) that notes a goodbye, and the checkout look
reports such a connection closed.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from typing import TYPE_CHECKING

from sqlalchemy.engine import AdaptedConnection

from dropsafe._classify import DriverErrors, ErrorKind, error_chain
from dropsafe._drivers import asyncpg_begin, asyncpg_rollback
from dropsafe._drivers.asyncpg_flight import Flight, InFlightReplies, question_messages
from dropsafe._drivers.base import (
    Capabilities,
    DBAPIConnection,
    DeferredRollback,
    Driver,
    Health,
    Server,
    Tls,
    XidQuestion,
    XidReading,
    await_,
    driver_connection,
    is_instance,
    timeout_argument,
)
from dropsafe._drivers.sockets import SocketPoll, poll

# What asyncpg says of an operation refused after it read the server's goodbye (its state 2).
_REFUSED_AFTER_GOODBYE = "another operation (2) is in progress"

if TYPE_CHECKING:
    import socket
    from collections.abc import Callable

    from sqlalchemy.engine import Dialect

    from dropsafe._drivers.base import ConnectArgs
    from dropsafe._policy import ConnectionPolicy

__all__ = ["Asyncpg"]


def _sqlstate(error: BaseException) -> object:
    return getattr(error, "sqlstate", None)


def _severity(error: BaseException) -> object:
    return getattr(error, "severity_en", None)


class _GoodbyeWatch(asyncio.Protocol):
    """Passes everything to asyncpg's protocol; notes a FATAL or PANIC ErrorResponse.

    Only a message that starts what the loop read is looked at: the goodbye to an idle
    connection comes alone, and one inside an operation's replies is asyncpg's to handle (it
    fails that operation). A byte test per read, no parsing of the stream, except while the
    replies to an xid question sent in a statement's flight are due (`asyncpg_flight`): those
    are taken out before asyncpg reads; and while the reply to a ROLLBACK not awaited is due
    (`asyncpg_rollback`): a goodbye may then come in the same read right behind it (the
    backend terminated as the request ended), after which asyncpg, idle again, refuses every
    operation; so each message of those reads is looked at (`scan_to_ready`).
    """

    __slots__ = ("broken", "goodbye", "inner", "replies", "scanned", "transport")

    def __init__(self, inner: asyncio.Protocol, transport: asyncio.Transport) -> None:
        self.inner = inner
        self.transport = transport
        #: A reply to the question came malformed: the connection was aborted, and nothing
        #: more is read (`asyncpg_flight`: asyncpg's parser may loop forever on such bytes).
        self.broken = False
        #: The server said FATAL (or PANIC): the session is over, whatever the socket says.
        self.goodbye = False
        #: The replies to an xid question sent ahead of asyncpg's messages, still to take out
        #: of the stream (`dropsafe._drivers.asyncpg_flight`).
        self.replies: InFlightReplies | None = None
        #: While a ROLLBACK's reply is due: what was read of the stream and not yet looked at
        #: (a message cut by the read); None when messages are not looked at.
        self.scanned: bytearray | None = None

    def scan_to_ready(self) -> None:
        """Look at each message the server sends, up to a ReadyForQuery and its read's end."""
        self.scanned = bytearray()

    def data_received(self, data: bytes) -> None:
        if self.scanned is not None:
            self._scan(data)
        replies = self.replies
        if replies is not None:
            data = replies.take(data)
            if replies.done:
                self.replies = None
                if replies.malformed:
                    self._break(data)
                    return
            if not data:
                return
        elif self.broken:
            return
        if data[:1] == b"E" and _ends_session(data):
            self.goodbye = True
        self.inner.data_received(data)

    def _scan(self, data: bytes) -> None:
        """Note a goodbye anywhere in what was read; stop after a ReadyForQuery's read."""
        held = self.scanned
        if held is None:
            return
        held += data
        at = 0
        ready = False
        while len(held) - at >= _HEADER:
            end = at + 1 + int.from_bytes(held[at + 1 : at + _HEADER], "big")
            if end > len(held):
                break
            kind = held[at]
            if kind == ord("E") and _ends_session(bytes(held[at:end])):
                self.goodbye = True
            ready = ready or kind == ord("Z")
            at = end
        del held[:at]
        if ready and not held:
            self.scanned = None

    def _break(self, whole: bytes) -> None:
        """End the connection on a broken stream; asyncpg gets the whole messages before it.

        The statement then fails as on a cut connection (asyncpg's "closed in the middle of
        operation", a disconnect: the pool discards the connection).
        """
        self.broken = True
        if whole:
            self.inner.data_received(whole)
        self.transport.abort()

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.replies is not None:
            self.replies.lost()
            self.replies = None
        self.inner.connection_lost(exc)

    def expect(self, replies: InFlightReplies) -> None:
        """Take the replies to a question just sent out of the stream, before asyncpg reads."""
        self.replies = replies

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


#: The severities that end the session, in the ErrorResponse's untranslated field (``V``,
#: PostgreSQL 9.6+), and in its ``S`` field for a pooler that sends no ``V`` (PgBouncer's
#: goodbyes: ``SFATAL`` and a SQLSTATE); PostgreSQL may translate ``S``, never ``V``.
_SESSION_ENDING = (b"\x00VFATAL\x00", b"\x00VPANIC\x00", b"\x00SFATAL\x00", b"\x00SPANIC\x00")
_FIRST_FIELD = tuple(marker[1:] for marker in _SESSION_ENDING)
_HEADER = 5  # the message type and its length


def _ends_session(data: bytes) -> bool:
    """Whether ``data`` starts with an ErrorResponse whose severity ends the session."""
    message = bytes(data)  # asyncio hands bytes; anything else is copied, on this rare path
    end = 1 + int.from_bytes(message[1:_HEADER], "big")
    # A field starts the fields, or follows another's terminating zero byte.
    return message.startswith(_FIRST_FIELD, _HEADER) or any(
        message.find(marker, _HEADER, end) != -1 for marker in _SESSION_ENDING
    )


def _goodbye_watch(native: DBAPIConnection) -> _GoodbyeWatch | None:
    """Return the watch on an asyncpg connection, put in place the first time (None: none fits).

    The transport's protocol is swapped (asyncio's documented ``set_protocol``) only while it
    is asyncpg's own: someone else's wrapper there is left alone.
    """
    transport = native._transport  # noqa: SLF001 - asyncpg keeps it private
    if transport is None or transport.is_closing():
        return None
    current = transport.get_protocol()
    if isinstance(current, _GoodbyeWatch):
        return current
    if current is not native._protocol:  # noqa: SLF001
        return None
    watch = _GoodbyeWatch(current, transport)
    transport.set_protocol(watch)
    return watch


def _socket(native: DBAPIConnection) -> socket.socket | None:
    """Return the socket under an asyncpg connection's transport (None once it is closed).

    asyncio's TransportSocket, which has the socket methods dropsafe uses.
    """
    sock: socket.socket | None = native._transport.get_extra_info("socket")  # noqa: SLF001 - asyncpg keeps it private
    return sock


class Asyncpg(Driver):
    """asyncpg: the protocol's closed state, and the socket for what the loop has not read yet."""

    name = "asyncpg"
    dialect_drivers = ("asyncpg",)
    sync = False
    asyncio = True
    extra = "asyncpg"
    # InterfaceError is not a client error here: it is the caller's misuse (wrong number of
    # arguments, another operation in progress) or a connection already closed, which
    # SQLAlchemy's is_disconnect reports.
    errors = DriverErrors(
        package="asyncpg",
        sqlstate=_sqlstate,
        severity=_severity,
        client_errors={"TargetServerAttributeNotMatched": ErrorKind.FAILOVER},
        disconnect_messages=(
            "connection was closed in the middle of operation",
            # The next operation on a connection whose server (or pooler) said goodbye while
            # it sat idle: asyncpg read the FATAL with no operation running, stays in its
            # error-consuming state (2) and refuses the operation before sending anything.
            _REFUSED_AFTER_GOODBYE,
        ),
        failover_messages=("none of the hosts match the target attribute",),
    )
    tls = Tls(url_parameters={"ssl": "require"}, off_url_parameters={"ssl": "disable"})
    # On asyncio's own transports (plain and TLS); uvloop's cannot be hooked and read nothing.
    # (The parser loop once seen under PgBouncer with faults was asyncpg's own, at connect, on
    # PgBouncer's garbage: no question is sent there. A malformed reply to the question ends
    # the connection, never reaches asyncpg: `asyncpg_flight`.)
    capabilities = Capabilities(reads_xid_in_flight=True)
    async_deferred_rollback = DeferredRollback(
        asyncpg_rollback.send_rollback, asyncpg_rollback.settle, asyncpg_rollback.close_settled
    )

    def owns(self, dbapi_connection: DBAPIConnection) -> bool:
        return isinstance(dbapi_connection, AdaptedConnection) and is_instance(
            dbapi_connection.driver_connection, "asyncpg", "Connection"
        )

    def connect_defaults(
        self, policy: ConnectionPolicy, cargs: list[object], cparams: ConnectArgs
    ) -> set[str]:
        del cargs
        # One budget for all hosts in turn (libpq gives each host its own): a vanished first
        # host eats it all, so after a failed attempt the guard starts from the next host.
        added = timeout_argument(cparams, policy)
        if policy.pooler == "transaction":
            added |= _no_lasting_statements(cparams)
        return added

    def socket_for_options(self, dbapi_connection: DBAPIConnection) -> socket.socket | None:
        return _socket(dbapi_connection.driver_connection)

    def socket_fd(self, dbapi_connection: DBAPIConnection) -> int | None:
        sock = _socket(dbapi_connection.driver_connection)
        return None if sock is None else int(sock.fileno())

    def fileno_reader(self, dbapi_connection: DBAPIConnection) -> Callable[[], int | None]:
        # The transport's socket is the connection's for life; closed, it says -1.
        sock = _socket(dbapi_connection.driver_connection)
        if sock is None:
            return _no_fd
        fileno: Callable[[], int | None] = sock.fileno
        return fileno

    def server_of(self, dbapi_connection: DBAPIConnection) -> Server | None:
        address = dbapi_connection.driver_connection._addr  # noqa: SLF001 - asyncpg's private
        return Server(str(address[0]), int(address[1])) if isinstance(address, tuple) else None

    def _reported_parameter(self, dbapi_connection: DBAPIConnection, name: str) -> str | None:
        settings = dbapi_connection.driver_connection.get_settings()
        value = getattr(settings, name, None)
        return value if isinstance(value, str) else None

    def hosts(self, cparams: ConnectArgs) -> list[tuple[str, str]]:
        hosts, ports = cparams.get("host"), cparams.get("port")
        if not isinstance(hosts, list) or not isinstance(ports, list):
            return []
        return [(str(host), str(port)) for host, port in zip(hosts, ports, strict=False)]

    def set_hosts(self, cparams: ConnectArgs, pairs: list[tuple[str, str]]) -> None:
        cparams["host"] = [host for host, _ in pairs]
        cparams["port"] = [int(port) for _, port in pairs]

    def transaction_idle(self, dbapi_connection: DBAPIConnection) -> bool | None:
        # SQLAlchemy's adapter sends its BEGIN itself, lazily, at the first statement it is
        # given (or arms it to ride that statement's flight: asyncpg_begin, the transaction
        # started all the same), and keeps its asyncpg Transaction (private: ``_transaction``
        # in SQLAlchemy 2.1, a ``_started`` flag in 2.0; a SQLAlchemy with neither gets no
        # replay). The app's own work on the asyncpg connection shows in is_in_transaction().
        if hasattr(dbapi_connection, "_transaction"):
            started = dbapi_connection._transaction is not None  # noqa: SLF001
        elif isinstance(getattr(dbapi_connection, "_started", None), bool):
            started = dbapi_connection._started  # noqa: SLF001
        else:
            return None
        return not started and not dbapi_connection.driver_connection.is_in_transaction()

    def gone(self, dbapi_connection: DBAPIConnection) -> bool | None:
        return bool(dbapi_connection.driver_connection.is_closed())

    def transaction_characteristics(
        self, dbapi_connection: DBAPIConnection
    ) -> tuple[object, ...] | None:
        # SQLAlchemy's adapter makes asyncpg's transaction(isolation=, readonly=, deferrable=)
        # from these (its isolation "autocommit" is the autocommit flag); an adapter without
        # them is one dropsafe does not know.
        names = ("isolation_level", "readonly", "deferrable")
        if not all(hasattr(dbapi_connection, name) for name in names):
            return None
        return tuple(getattr(dbapi_connection, name) for name in names)

    def refused_unsent(self, error: BaseException) -> bool:
        # asyncpg read the server's goodbye with no operation running (its error-consuming
        # state, 2) and refuses the next operation in `_set_state`, before writing anything.
        return any(
            type(seen).__name__ == "InternalClientError" and _REFUSED_AFTER_GOODBYE in str(seen)
            for seen in error_chain(error)
        )

    def send_reading_xid(
        self,
        send: Callable[[str], None],
        dbapi_connection: DBAPIConnection,
        statement: str,
        question: XidQuestion,
    ) -> XidReading | None:
        # asyncpg_flight: the question's Parse, Bind and Execute ride in front of the
        # statement's Bind, in its write; its replies are taken out before asyncpg reads.
        # The engine hands asyncpg's own connection (SQLAlchemy's adapter is taken too).
        native = driver_connection(dbapi_connection)
        watch = _goodbye_watch(native)
        flight = None
        if watch is not None and watch.replies is None:
            # BEGIN armed on it (asyncpg_begin) goes first, in the same write when it is the
            # Bind's; "in a transaction" is asked when the Bind goes: BEGIN is done (or went
            # ahead) by then, and in autocommit there is no transaction to read (the question
            # would join the statement's own).
            flight = Flight.install(
                native._transport,  # noqa: SLF001 - asyncpg keeps it private
                watch.expect,
                native.is_in_transaction,
            )
        if flight is None:
            send(statement)
            return None
        flight.question = _messages(question)
        flight.replies = None
        try:
            send(statement)
        finally:
            flight.question = None
            flight.settle()
        return flight.reading()

    def begin_in_first_flight(self, dbapi_connection: DBAPIConnection) -> bool:
        # The adapter's _start_transaction arms BEGIN ahead of the next operation's first
        # message, in the same write (asyncpg_begin): one flight, not two.
        return asyncpg_begin.install(dbapi_connection, _goodbye_watch)

    def backend_pid(self, dbapi_connection: DBAPIConnection) -> int | None:
        pid = driver_connection(dbapi_connection).get_server_pid()
        return pid if isinstance(pid, int) and pid > 0 else None

    def probe(self, dbapi_connection: DBAPIConnection) -> Health:
        connection = dbapi_connection.driver_connection
        if connection.is_closed():
            return Health.CLOSED
        watch = _goodbye_watch(connection)
        if watch is not None and watch.goodbye:
            return Health.CLOSED
        # The event loop may not have run since the peer hung up: look at the socket too.
        sock = _socket(connection)
        return Health.QUIET if sock is None else poll(sock)

    def prober(self, dbapi_connection: DBAPIConnection) -> Callable[[], Health]:
        connection = dbapi_connection.driver_connection
        # Made when the pool connects: the watch is in place before the connection idles.
        watch = _goodbye_watch(connection)
        sock = _socket(connection)
        look = None if sock is None else SocketPoll(sock)

        def probe() -> Health:
            if connection.is_closed() or (watch is not None and watch.goodbye):
                return Health.CLOSED
            # The event loop may not have run since the peer hung up: look at the socket too.
            return Health.QUIET if look is None else look()

        return probe

    def ping(self, dialect: Dialect, dbapi_connection: DBAPIConnection, timeout: float) -> None:
        del dialect
        connection = dbapi_connection.driver_connection
        # execute() without arguments uses the simple query protocol: one round trip, and no
        # prepared statement for a transaction-mode pooler to lose.
        try:
            await_(asyncio.wait_for(connection.execute("SELECT 1"), timeout))
        except BaseException:
            # The pool replaces it; closing it politely would wait on the hung server again
            # (SQLAlchemy gives a graceful close 2 s), so abort it now.
            connection.terminate()
            raise


@functools.lru_cache(maxsize=8)
def _messages(question: XidQuestion) -> bytes:
    """Build the question's messages once per question (a handful per process)."""
    return question_messages(question)


def _no_fd() -> None:
    """Return no descriptor: the connection's transport had no socket."""


def _no_lasting_statements(cparams: ConnectArgs) -> set[str]:
    """Keep asyncpg's prepared statements inside one transaction, under names no one else has.

    Behind a transaction-mode pooler each transaction may run on another server connection,
    shared with other clients. asyncpg names statements ``__asyncpg_stmt_N__``, counting per
    client connection, and keeps them for reuse: two clients then collide on one server
    connection ("already exists"), and a kept statement is missing on the next one ("does not
    exist"). So: no statement cache in asyncpg (its own queries go unnamed), none in
    SQLAlchemy's adapter, and a unique name for each statement SQLAlchemy prepares (it prepares
    inside the transaction that runs it). What the user set wins.
    """
    wanted: dict[str, object] = {
        "statement_cache_size": 0,  # asyncpg's cache
        "prepared_statement_cache_size": 0,  # SQLAlchemy's adapter's cache
        "prepared_statement_name_func": _unique_statement_name,
    }
    added = set()
    for key, value in wanted.items():
        if key not in cparams:
            cparams[key] = value
            added.add(key)
    return added


def _unique_statement_name() -> str:
    return f"__dropsafe_{uuid.uuid4().hex}__"
