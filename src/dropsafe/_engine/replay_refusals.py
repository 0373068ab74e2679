"""Why a statement, or a transaction, must not be replayed: the refusals of the replay.

Each answers without a round trip (they run at every statement of a recorded transaction, and
at every checkout's first: tests/engine/test_checkout_scale.py counts the calls). What they
guard against, and why each is enough: docs/guarantees.md, "A transaction's first statement is
replayed, once" and "A transaction lost before its COMMIT is replayed".
"""

from __future__ import annotations

import asyncio
import errno
import struct
from typing import TYPE_CHECKING

from sqlalchemy.engine.interfaces import ExecuteStyle

from dropsafe._classify import ErrorKind, classify, sqlstate_of
from dropsafe._dbapi import ask, dialect_says_disconnect
from dropsafe._drivers.sockets import TCP_COUNTS_AT, unpack_counts
from dropsafe._engine.transcript import refusal_of_text
from dropsafe._errors import ConfigurationError
from dropsafe._log import SafeLogger

if TYPE_CHECKING:
    from collections.abc import Mapping

    from sqlalchemy.engine import Connection, Dialect, ExecutionContext
    from sqlalchemy.pool import PoolProxiedConnection

    from dropsafe._drivers.base import Driver
    from dropsafe._engine.transcript import Transcript
    from dropsafe._engine_state import Unsent

__all__ = [
    "CONNECTION_ENDED",
    "OPT_OUT",
    "ReplayRefusals",
    "check_opt_out",
    "sent_around",
    "statement_refusal",
    "timed_out",
]

logger = SafeLogger()

#: The execution option that opts a statement (or a Connection, an engine) out of the replay.
OPT_OUT = "dropsafe_replay"

# insertmanyvalues (the third style) sends batches on a cursor SQLAlchemy holds itself. Told
# by identity, not a set: an Enum's hash is a Python call, paid at every recorded statement.
_EXECUTE, _EXECUTEMANY = ExecuteStyle.EXECUTE, ExecuteStyle.EXECUTEMANY


def timed_out(error: BaseException) -> bool:
    """Whether the connection was lost to a timeout: anywhere in the chain, by type or text."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (TimeoutError, asyncio.TimeoutError)) or (
            isinstance(current, OSError) and current.errno == errno.ETIMEDOUT
        ):
            return True
        if "timed out" in str(current).lower():
            return True
        current = current.__cause__ or current.__context__
    return False


# What a server sends as it ends a connection, the statement not run: a terminated backend or a
# fast or immediate shutdown, a crash of another backend, an idle session timed out.
CONNECTION_ENDED = frozenset({"57P01", "57P02", "25P03", "57P05"})


def check_opt_out(options: Mapping[str, object]) -> None:
    """Raise unless the opt-out, if given, is True or False.

    SQLAlchemy does not look at options it does not know, so a ``dropsafe_replay=0`` or
    ``"false"`` would be neither honoured nor refused: the statement the app meant to opt out
    would be replayed. It is refused at the statement, before anything is sent.
    """
    value = options.get(OPT_OUT, True)
    if value is not True and value is not False:
        raise ConfigurationError(f"execution option {OPT_OUT} must be True or False, not {value!r}")


def statement_refusal(context: ExecutionContext, statement: str) -> str | None:
    """Why a statement turns its transaction's replay off, or None."""
    options = context.execution_options  # read with `in` first: no call at every statement
    if OPT_OUT in options and options[OPT_OUT] is False:
        return f"{OPT_OUT}=False"
    if ("stream_results" in options and options["stream_results"]) or (  # noqa: RUF019 - no call
        "yield_per" in options and options["yield_per"]  # noqa: RUF019
    ):
        return "a server-side cursor (stream_results): its rows are read as the app goes"
    style = getattr(context, "execute_style", None)
    if style is not _EXECUTE and style is not _EXECUTEMANY:
        return f"execute style {getattr(style, 'name', style)}"
    return refusal_of_text(statement)


def sent_around(transcript: Transcript) -> str | None:
    """Why the driver's connection sent bytes that are not in the transcript, or None."""
    fd, before = transcript.fd, transcript.sent_after
    now = None if fd is None else transcript.count_sent(fd)
    if now is None or before is None:
        return "the bytes sent on its socket are unknown (not TCP?)"
    if now != before:
        return f"the driver's connection sent {now - before} bytes around SQLAlchemy"
    return None


# SQLAlchemy's own detect_autocommit_setting of each PostgreSQL dialect dropsafe replays on:
# each returns ``bool(dbapi_connection.autocommit)`` (SQLAlchemy 2.0 and 2.1).
_FLAG_READERS = frozenset(
    {
        (
            "sqlalchemy.dialects.postgresql._psycopg_common",
            "_PGDialect_common_psycopg.detect_autocommit_setting",
        ),
        ("sqlalchemy.dialects.postgresql.asyncpg", "PGDialect_asyncpg.detect_autocommit_setting"),
        ("sqlalchemy.dialects.postgresql.pg8000", "PGDialect_pg8000.detect_autocommit_setting"),
    }
)


class ReplayRefusals:
    """What one engine's dialect and driver say of a statement and of a lost connection."""

    def __init__(self, dialect: Dialect, driver: Driver | None) -> None:
        self._dialect = dialect
        self._driver = driver
        # Where the dialect's detect_autocommit_setting is SQLAlchemy's own (each PostgreSQL
        # dialect's returns ``bool(dbapi_connection.autocommit)``), the flag is read here: a
        # call less at every first statement. A dialect whose class or instance says it
        # otherwise, even once hardened, is asked (checked at each statement, with no call).
        method = getattr(type(dialect), "detect_autocommit_setting", None)
        self._flag_reader = (
            method
            if (getattr(method, "__module__", None), getattr(method, "__qualname__", None))
            in _FLAG_READERS
            else None
        )

    def first_statement(  # noqa: C901, PLR0911, PLR0912 - one function: a call less per request
        self,
        connection: Connection,
        context: ExecutionContext,
        statement: str,
        checkout: PoolProxiedConnection,
        pending: Unsent,
    ) -> str | None:
        """Why this first statement must not be replayed, or None.

        It runs at every first statement: no call here that the check does not need (the
        calls a healthy request pays are counted, tests/engine/test_checkout_scale.py).
        """
        style = getattr(context, "execute_style", None)
        options = context.execution_options
        if OPT_OUT in options and options[OPT_OUT] is False:  # other values: check_opt_out
            reason = f"{OPT_OUT}=False"
        elif style is not _EXECUTE and style is not _EXECUTEMANY:
            reason = f"execute style {getattr(style, 'name', style)}"
        elif ";" in statement and ";" in statement.strip().rstrip(";"):  # no call without one
            # Several statements in one string may hold a COMMIT of their own.
            reason = "the text may hold several statements"
        elif not connection.in_transaction():
            reason = "no transaction"
        elif checkout.dbapi_connection is None:
            reason = "no connection"
        else:
            try:
                dialect = self._dialect
                if (
                    dialect.__class__.detect_autocommit_setting is self._flag_reader
                    and "detect_autocommit_setting" not in dialect.__dict__
                ):
                    autocommit = checkout.dbapi_connection.autocommit
                else:
                    autocommit = dialect.detect_autocommit_setting(checkout.dbapi_connection)
            except Exception:  # a connection we cannot read is not replayed
                logger.debug("dropsafe could not tell a connection's autocommit", exc_info=True)
                return "its autocommit setting is unknown"
            if autocommit:
                return "autocommit: the statement may have committed"
            # Whether the driver's connection already holds work of the app's, inlined (a
            # call less at every first statement). SQLAlchemy's first statement on a checkout
            # is not the connection's first: the app may have written through the driver's
            # own connection (a cursor of its own, a COPY, an ``after_begin`` or
            # ``before_cursor_execute`` listener, SET TRANSACTION) before it. That work is in
            # the transaction the driver opened, and a replay on a fresh connection would drop
            # it while the commit succeeds. The driver's local transaction status tells,
            # without a round trip; where it cannot be read, nothing is replayed.
            native, driver = pending.native, self._driver
            if native is None or driver is None:
                return "the driver's connection is not one dropsafe can read"
            try:
                idle = driver.transaction_idle(native)
            except Exception:  # a state we cannot read is not replayed
                logger.debug("dropsafe could not tell a transaction's status", exc_info=True)
                idle = None
            if idle is None:
                return "the driver's transaction status is unknown"
            if not idle:
                return "a transaction was already open on the driver's connection"
            # Work committed through the driver's connection (a session SET, then commit)
            # leaves it idle: only the bytes its socket sent since checkout tell. The same fd
            # as at checkout: a driver that closed it since is not idle (above).
            fd, before = pending.fd, pending.sent
            if fd is None or before is None:
                return "the bytes sent on its socket since checkout are unknown (not TCP?)"
            counter = pending.entry.sent_bytes
            if fd != counter.fd:  # let go since checkout: a new socket object (SentBytes)
                sent = counter(fd)
            else:  # SentBytes's read, inlined (C calls only): it runs at every first statement
                try:
                    queued, sent, retransmitted = unpack_counts(counter.tcp_info(), TCP_COUNTS_AT)
                except (OSError, struct.error):  # closed, not TCP, or an older kernel
                    sent = None
                else:
                    sent = sent - retransmitted + queued
            if sent is None:
                return "the bytes sent on its socket since checkout are unknown (not TCP?)"
            if sent != before:
                return f"the driver's connection sent {sent - before} bytes since checkout"
            return None
        return reason

    def lost(self, error: Exception, checkout: PoolProxiedConnection) -> bool:
        """Whether ``error`` says the connection was lost before the server replied.

        An error with a SQLSTATE is the server's reply, unless it is one of those a server sends
        as it ends the connection: an error the server answered is never replayed, whatever
        the dialect's ``is_disconnect`` (which a user may have widened) says of it. A connection
        that timed out (``tcp_user_timeout``, keepalives: the peer went silent) is not replayed
        either: the server may still hold the transaction, and the locks its first statement
        took, until it notices the client is gone (hours, with its default keepalives); a
        replay could wait on them that long, and a fresh connect on a path that is down would
        only add its own timeout to the app's wait.
        """
        if timed_out(error) or not self._gone(checkout):
            return False
        state = sqlstate_of(error)
        if state is not None:
            return state in CONNECTION_ENDED or state.startswith("08")
        if classify(error) is ErrorKind.DISCONNECT:
            return True
        # An unsure verdict is no lost connection.
        return dialect_says_disconnect(
            self._dialect, error, checkout, what="whether a statement's connection was lost"
        )

    def _gone(self, checkout: PoolProxiedConnection) -> bool:
        """Whether the driver found its connection lost: an error alone does not tell.

        A server answers SQLSTATE 08001 on a healthy connection when dblink or postgres_fdw
        cannot reach their remote; sent again, such a statement would run twice.
        """
        driver = self._driver
        native = None if driver is None else driver.native(checkout.dbapi_connection)
        if native is None or driver is None:
            return False
        # An unsure verdict is no lost connection.
        return ask(
            lambda: driver.gone(native) is True,
            unknown=False,
            what="whether a driver lost its connection",
        )
