"""The checkout check: no dead connection handed out, and no round trip paid by a busy pool.

A look first (a zero-timeout poll of the socket, or the driver's closed flag); a ping only when
the look is unsure or the connection sat idle past ``PoolPolicy.ping_after_idle``. A dead one
is replaced by raising `DisconnectionError` from the ``checkout`` event; dead idle neighbours (a
restart, a failover) recycle the whole pool. Per-connection state is weakly keyed on the pool
entry, never in the user's ``.info``. Connections it cannot look into (a ``creator=`` wrapper):
docs/sqlalchemy-compat.md, "Connections dropsafe cannot look into".
"""

from __future__ import annotations

import functools
import itertools
import math
import struct
import threading
import time
import weakref
from typing import TYPE_CHECKING, Literal, NoReturn

import sqlalchemy.exc

from dropsafe._drivers import Driver, Health, SentBytes
from dropsafe._drivers.sockets import TCP_COUNTS_AT, unpack_counts
from dropsafe._engine.connect_wait import count_wait_from
from dropsafe._engine_state import UNSENT_KEY, Unsent
from dropsafe._hooks import emit
from dropsafe._log import SafeLogger
from dropsafe._policy import PoolPolicy, seconds
from dropsafe._process import renew_lock_in_child
from dropsafe._redaction import describe_error
from dropsafe.events import DeadConnectionReplaced, PingSucceeded

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.engine import Dialect
    from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

    from dropsafe._dbapi import DBAPIConnection, NativeConnection
    from dropsafe.events import Hook

__all__ = ["CheckoutCheck", "EntryState"]

logger = SafeLogger()

_CHECKS = itertools.count()
# The bytes counter of a connection whose socket is unknown: never given an fd (fileno says
# None), so it holds no socket.
_NO_SOCKET = SentBytes()


class EntryState:
    """What the check knows about the connection a pool entry holds now.

    Made when the pool connects the entry, so that a checkout only reads it: the driver's own
    connection inside it is found once per connection, not once per checkout.
    """

    __slots__ = (
        "connection",
        "fileno",
        "fresh",
        "idle",
        "idle_since",
        "native",
        "probe",
        "retire_at",
        "sent_bytes",
        "used",
    )

    def __init__(
        self,
        connection: DBAPIConnection,
        native: NativeConnection,
        probe: Callable[[], Health] | None,
        now: float,
        retire_at: float,
        *,
        fresh: bool,
    ) -> None:
        #: The DBAPI connection this state is about; None once the pool let it go.
        self.connection = connection
        self.native = native
        #: The driver's look at this connection's socket (None: it cannot be looked into).
        self.probe = probe
        #: Asks the connection its socket's descriptor (`Driver.fileno_reader`), for the
        #: replay's mark; it returns None where dropsafe cannot read the connection.
        self.fileno: Callable[[], int | None] = _no_fd
        #: Reads the bytes its socket sent (`SentBytes`), for the replay's mark.
        self.sent_bytes = _NO_SOCKET
        #: The first-statement replay marked the connection as having run a statement
        #: (`dropsafe._engine.session_state.mark_connection`): kept here, read at no cost,
        #: so that its later checkouts need not mark it again.
        self.used = False
        self.idle_since = now
        #: When the connection retires (``PoolPolicy.max_lifetime``); infinite if never.
        self.retire_at = retire_at
        #: Made for the coming checkout: its handshake just proved it.
        self.fresh = fresh
        #: Checked in, in the pool.
        self.idle = False


class CheckoutCheck:
    """The checkout check of one engine's pool, and what it knows of the idle connections.

    It also retires connections past their own lifetime (``draw_lifetime`` gives a new
    connection's limit in seconds, see `dropsafe._engine.lifetime`), and, with
    ``marks_unsent``, notes on each checkout that passed what its first statement needs
    (`dropsafe._engine.replay`): one listener per pool event, and one lookup of the entry's
    state, at each checkout and checkin.
    """

    def __init__(
        self,
        policy: PoolPolicy,
        hooks: tuple[Hook, ...],
        driver: Driver,
        dialect: Dialect,
        *,
        pre_ping: bool,
        draw_lifetime: Callable[[], float] | None = None,
        marks_unsent: bool = False,
        settle: Callable[[NativeConnection], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.driver = driver
        self._hooks = hooks
        self._dialect = dialect
        self._ping_after_idle = seconds(policy.ping_after_idle)
        self._ping_timeout = seconds(policy.ping_timeout)
        # The user's pool_pre_ping already pays a round trip at each checkout: no second one.
        self._pre_ping = pre_ping
        self._draw_lifetime = draw_lifetime
        # The first-statement replay's mark (`Unsent`), made here rather than in a listener
        # or a function of the replay's: every checkout listener, and every call, costs each
        # checkout a Python frame.
        self._marks_unsent = marks_unsent
        # Reads the reply of a ROLLBACK sent at checkin without waiting (quiet_rollback), before
        # anything else looks at the connection; a raise means it died and was closed.
        self._settle = settle
        self._clock = clock
        # Weakly keyed on the pool entry: an entry the pool drops (dispose(close=False), a
        # collected pool) takes its state along, and its connection is closed as without us.
        # Reads take no lock (one dictionary read is atomic, and an entry's state changes only
        # in the pool's events for that entry, which the pool runs one at a time); insertions
        # and the snapshot of the idle ones take it, since iterating must not see the
        # dictionary change size.
        self._states: weakref.WeakKeyDictionary[ConnectionPoolEntry, EntryState] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        renew_lock_in_child(self)  # another thread may hold it at a fork
        # This check's name in a pool entry's __dict__ (two engines may share one pool).
        self._key = f"_dropsafe_check_{next(_CHECKS)}"
        # Set once a connection dropsafe cannot look into was made (a creator= of unknown
        # objects): this pool then gets SQLAlchemy's own pool-wide recycle on a disconnect.
        self._opaque = False
        #: Counters for benchmarks and tests: how often the check looked at an idle socket,
        #: pinged, and found a connection dead (plain ints: += under the GIL is not atomic
        #: across threads, so read them as close counts, not exact ones, with many threads).
        self.probes = 0
        self.pings = 0
        self.replaced = 0

    def listeners(self) -> dict[str, Callable[..., None]]:
        """Return the pool events this check listens to, by name."""
        return {
            "connect": self._on_connect,
            "checkout": self._on_checkout,
            "checkin": self._on_checkin,
            "close": self._forget,
            "detach": self._forget,
            "invalidate": self._forget_invalidated,
            "soft_invalidate": self._forget_invalidated,
        }

    def other_idle_connections_dead(self) -> bool:
        """Look (for free) at every idle connection: another one dead means a server event.

        One that dropsafe cannot look into counts as dead, and so does a pool that has had
        one: SQLAlchemy's own decision (recycle the whole pool on a disconnect) stands wherever
        dropsafe cannot prove it unneeded.
        """
        if self._opaque:
            return True
        with self._lock:
            idle = [
                (entry, entry.dbapi_connection)
                for entry, state in self._states.items()
                if state.idle and entry.dbapi_connection is not None
            ]
        for entry, connection in idle:
            native = self.driver.native(connection)
            if native is not None and self._probe(native) in (Health.QUIET, Health.DATA_WAITING):
                continue
            # The snapshot may be stale: the pool announces a close, detach or invalidation
            # before it acts, so a connection it is closing is no longer idle here, and only a
            # connection still idle, still the same one, is evidence of a server event.
            with self._lock:
                state = self._states.get(entry)
                if state is not None and state.idle and entry.dbapi_connection is connection:
                    return True
        return False

    # -- pool events -----------------------------------------------------------------------

    def _on_connect(self, dbapi_connection: DBAPIConnection, entry: ConnectionPoolEntry) -> None:
        self._remember(dbapi_connection, entry, fresh=True)

    def _remember(
        self,
        dbapi_connection: DBAPIConnection,
        entry: ConnectionPoolEntry,
        *,
        fresh: bool,
    ) -> EntryState:
        """Make the state of the entry's (new) connection, and keep it if the entry allows."""
        native = self.driver.native(dbapi_connection)
        probe = None
        if native is None:
            self._opaque = True
        else:
            try:
                probe = self.driver.prober(native)
            except Exception:  # a look that cannot be made: pinged after idle instead
                logger.debug("dropsafe could not look into a connection", exc_info=True)
        now = self._clock()
        lifetime = math.inf if self._draw_lifetime is None else self._draw_lifetime()
        state = EntryState(dbapi_connection, native, probe, now, now + lifetime, fresh=fresh)
        if native is not None and self._marks_unsent:
            try:
                state.fileno = self.driver.fileno_reader(native)
            except Exception:  # a socket it cannot say: the replay then refuses (not TCP)
                logger.debug("dropsafe could not find a connection's socket", exc_info=True)
            else:
                state.sent_bytes = SentBytes()
        if _weakable(entry):
            with self._lock:
                self._states[entry] = state
            # Also in the entry's own __dict__ (SQLAlchemy's entries have one), under this
            # check's name: read there at each checkout and checkin with no Python call, where
            # the weak map costs two (it stays, for the look at every idle connection).
            entry_dict = getattr(entry, "__dict__", None)
            if isinstance(entry_dict, dict):
                entry_dict[self._key] = state
        return state

    def _on_checkin(self, dbapi_connection: DBAPIConnection, entry: ConnectionPoolEntry) -> None:
        if dbapi_connection is None:
            return  # invalidated while checked out: the pool reconnects it on next use
        try:  # _state(), inlined: this runs at every checkin
            state = entry.__dict__.get(self._key)
        except AttributeError:  # an entry without a __dict__ of its own (a stand-in)
            state = self._state(entry)
        if state is None:
            return
        now = self._clock()
        state.idle_since = now
        state.idle = True
        if now >= state.retire_at:
            # Retired as it comes back; the close event marks it not idle, the next checkout
            # opens a new connection for this entry.
            logger.debug("dropsafe retires a connection that reached its max_lifetime")
            entry.close()

    def _on_checkout(  # noqa: C901, PLR0912 - one listener: a helper is a call at every checkout
        self,
        dbapi_connection: DBAPIConnection,
        entry: ConnectionPoolEntry,
        proxy: PoolProxiedConnection,
    ) -> None:
        """Let the checkout through (and mark it for the replay) or raise to replace it."""
        now = self._clock()
        try:  # _state(), inlined: this runs at every checkout
            state = entry.__dict__.get(self._key)
        except AttributeError:  # an entry without a __dict__ of its own (a stand-in)
            state = self._state(entry)
        if state is None or state.connection is not dbapi_connection:
            # An entry made before harden(), one we cannot key on, or a connection the
            # connect event did not show us: not fresh, so looked at like any idle one.
            state = self._remember(dbapi_connection, entry, fresh=False)
        state.idle = False
        if now >= state.retire_at:
            # Refused before any look or ping; forgotten, so that the pool's fresh
            # connection for this entry draws its own limit.
            state.connection = None
            raise sqlalchemy.exc.DisconnectionError("the connection reached its max_lifetime")
        if self._settle is not None:
            try:
                self._settle(state.native)
            except Exception as exc:  # noqa: BLE001 - any failure of the ROLLBACK: replace it
                self._replace(f"the ROLLBACK at checkin failed: {describe_error(exc)}", entry, now)
        if state.fresh:
            # Made for this checkout: its handshake just proved it. And never refused, even if
            # it died since: SQLAlchemy gives a checkout two tries, the second always on a
            # fresh connection, and after a second refusal raises its own InvalidRequestError
            # ("This connection is closed"), which is no driver error, so no unit of work could
            # retry it. Let through, a dead one fails the first statement with the driver's
            # disconnect error instead, which invalidates it and is retried.
            state.fresh = False
        else:
            probe = state.probe
            if probe is None:
                health = Health.UNSEEN
            else:  # _look(), inlined: this runs at every checkout
                self.probes += 1
                try:
                    health = probe()
                except Exception:  # a look that fails proves nothing: ping instead
                    logger.debug("dropsafe could not look into a connection", exc_info=True)
                    health = Health.UNSEEN
            # The user's pool_pre_ping has just proven this one.
            if not (
                (health is Health.QUIET or health is Health.UNSEEN)
                and (self._pre_ping or now - state.idle_since <= self._ping_after_idle)
            ):
                self._verify(dbapi_connection, entry, state.native, health, now)
        if self._marks_unsent:
            # Last of dropsafe's checkout work (the ping, if any, is paid): what the socket
            # sends from here to the first statement is the app's (replay_refusals' _driver_busy).
            try:
                fd = state.fileno()
            except Exception:  # noqa: BLE001 - a closed connection may not say its socket
                fd = None
            sent = None
            if fd is not None:
                counter = state.sent_bytes
                if fd != counter.fd:  # a new socket object on it (SentBytes, its slow path)
                    sent = counter(fd)
                else:  # SentBytes's read, inlined (C calls only): it runs at every checkout
                    try:
                        queued, sent, retransmitted = unpack_counts(
                            counter.tcp_info(), TCP_COUNTS_AT
                        )
                    except (OSError, struct.error):  # closed, not TCP, or an older kernel
                        sent = None
                    else:
                        sent = sent - retransmitted + queued
            # tuple.__new__: a NamedTuple's own __new__ is a Python call, at every checkout.
            proxy.__dict__[UNSENT_KEY] = tuple.__new__(Unsent, (state.native, fd, sent, state))

    def _verify(
        self,
        dbapi_connection: DBAPIConnection,
        entry: ConnectionPoolEntry,
        native: NativeConnection,
        health: Health,
        now: float,
    ) -> None:
        """Ping a connection the look could not clear; replace it (or the pool) if it is dead."""
        reason = f"probe found the connection {health.value}"
        if health is not Health.CLOSED:
            try:
                self._ping(dbapi_connection, native)
            except Exception as exc:  # noqa: BLE001 - any failure of the ping means replace it
                reason = f"ping failed: {describe_error(exc)}"
            else:
                why: Literal["idle", "data_waiting"] = (
                    "data_waiting" if health is Health.DATA_WAITING else "idle"
                )
                emit(self._hooks, PingSucceeded(self._clock() - now, why))
                return
        self._replace(reason, entry, now)

    def _replace(self, reason: str, entry: ConnectionPoolEntry, now: float) -> NoReturn:
        """Refuse this checkout's connection (the pool fetches another), or the whole pool.

        The connect that replaces it counts its ``connect_wait`` from ``now``, when this
        checkout began (on this check's clock): what it waited here (a ROLLBACK's reply, a
        ping, up to ``ping_timeout``) is not waited again on top.
        """
        self.replaced += 1
        count_wait_from(entry, time.monotonic() - max(self._clock() - now, 0.0))
        pool_wide = self.other_idle_connections_dead()
        emit(self._hooks, DeadConnectionReplaced(reason, pool_wide=pool_wide))
        if pool_wide:
            raise sqlalchemy.exc.InvalidatePoolError(reason)
        raise sqlalchemy.exc.DisconnectionError(reason)

    def _forget(self, dbapi_connection: DBAPIConnection, entry: ConnectionPoolEntry) -> None:
        """Mark the entry not idle: the pool closes, detaches or invalidates its connection."""
        del dbapi_connection
        state = self._state(entry)
        if state is not None:
            state.idle = False
            # Nothing kept of a connection let go.
            state.connection = state.native = state.probe = None
            state.fileno = _no_fd
            state.sent_bytes.release()

    def _forget_invalidated(
        self,
        dbapi_connection: DBAPIConnection,
        entry: ConnectionPoolEntry,
        exception: BaseException | None,
    ) -> None:
        del exception
        self._forget(dbapi_connection, entry)

    # -- looking and pinging ---------------------------------------------------------------

    def _probe(self, native: NativeConnection) -> Health:
        return self._look(functools.partial(self.driver.probe, native))

    def _look(self, probe: Callable[[], Health]) -> Health:
        self.probes += 1
        try:
            return probe()
        except Exception:  # a look that fails proves nothing: ping instead
            logger.debug("dropsafe could not look into a connection", exc_info=True)
            return Health.UNSEEN

    def _ping(self, dbapi_connection: DBAPIConnection, native: NativeConnection) -> None:
        """One round trip: the driver's bounded ping, or the dialect's own for unknown objects."""
        self.pings += 1
        if native is not None:
            self.driver.ping(self._dialect, native, self._ping_timeout)
        elif not self._dialect.do_ping(dbapi_connection):
            raise sqlalchemy.exc.DisconnectionError("the dialect's ping found it disconnected")

    def _state(self, entry: ConnectionPoolEntry) -> EntryState | None:
        try:
            return self._states.get(entry)
        except TypeError:  # a stand-in entry that takes no weak reference
            return None


def _no_fd() -> None:
    """Return no descriptor: dropsafe cannot read the connection."""


def _weakable(entry: object) -> bool:
    """SQLAlchemy's pool entries take weak references; a stand-in from elsewhere may not."""
    return hasattr(type(entry), "__weakref__")
