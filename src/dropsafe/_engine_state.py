"""Everything dropsafe keeps for one engine, in one object that lives on the engine.

Below both wings: the engine wing fills the guard and the replay's checkouts, the unit wing the
server lives, the recording flag and the acknowledged commits, and neither imports the other.
The object is an attribute of the root engine (an `Engine.execution_options` copy shares its
parent's pool, dialect and events, so it shares its state too): it goes when the engine goes,
and what it holds per connection is weakly keyed, so `Engine.dispose` and the garbage collector
need nothing from it. Each slot's comment names the module that fills it.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias, cast

from dropsafe._process import renew_lock_in_child
from dropsafe._sqlalchemy_private import POOL_CHECKOUT

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.ext.asyncio import AsyncEngine
    from sqlalchemy.pool import PoolProxiedConnection

    from dropsafe._commit_truth.pending_commit import PendingCommit
    from dropsafe._policy import Policy

__all__ = [
    "UNSENT_KEY",
    "DriverConnection",
    "EngineState",
    "Unsent",
    "peek_state",
    "root_engine",
    "state_of",
]

#: The driver's own connection object (psycopg2's, asyncpg's, ...): untyped, only hashed here.
DriverConnection: TypeAlias = Any

_ATTRIBUTE = "_dropsafe_state"
#: Where a pool checkout whose first statement is not sent yet keeps its `Unsent` entry
#: (`dropsafe._engine.replay` puts it there): in the checkout's own ``__dict__``
#: (SQLAlchemy's ``_ConnectionFairy`` has one, and makes one per checkout), under a name of
#: dropsafe's. It goes with the checkout, and a store and a pop cost no Python call, where a
#: weak map costs four at every checkout.
UNSENT_KEY = "_dropsafe_unsent"


class Unsent(NamedTuple):
    """A checkout whose first statement has not been sent yet, as it was at checkout."""

    native: Any  # the driver's own connection (None if dropsafe cannot read it)
    fd: int | None  # its socket's file descriptor
    sent: int | None  # the bytes its socket had sent at checkout (`tcp_bytes_sent`)
    # What the checkout check knows of the connection (`dropsafe._engine.liveness`): its
    # ``used`` says the replay marked it as having run a statement, at an earlier checkout.
    entry: Any


class EngineState:
    """One engine's state, a slot per concern; each slot is filled by the part that owns it.

    ``lock`` guards the two maps and the slots filled on first use (``acknowledged``). The
    slots a wing's own class fills are typed ``object`` here, so that the base imports no wing
    (the owner's one accessor says what it holds: `guard_of`, `known_server_life`, ...).
    """

    __slots__ = (
        "__weakref__",  # the fork's lock renewal holds it weakly
        "_lock",
        "acknowledged",
        "flight_dropped",
        "flight_xid",
        "guard",
        "lives_answered",
        "policy",
        "recording",
        "server_lives",
        "wal_readable",
    )

    def __init__(self) -> None:
        #: The policy `harden` gave the engine; None: dropsafe does not guard it.
        self.policy: Policy | None = None
        #: The engine wing's listeners (`dropsafe._engine.guard.EngineGuard`).
        self.guard: object = None
        #: Each connection's server life, read once (`dropsafe._commit_truth.server_life`).
        self.server_lives: weakref.WeakKeyDictionary[DriverConnection, object] = (
            weakref.WeakKeyDictionary()
        )
        #: A server of this engine answered the life read: new connections read it in their mark.
        self.lives_answered = False
        #: A server of this engine answered the WAL position: every mark reads it.
        self.wal_readable = False
        #: The unit wing's COMMIT listener is on the engine (`dropsafe._unit.recording`).
        self.recording = False
        #: Its acknowledged commits, for the failover audit; made by the first one.
        self.acknowledged: object = None
        #: The xid a Connection's transaction read in a statement's flight, for a unit's COMMIT
        #: (`dropsafe._engine.replay`, `dropsafe._commit_truth.flight_xid`); None: never read.
        self.flight_xid: Callable[[Connection], PendingCommit | None] | None = None
        #: The reads a Connection's transaction dropped (ended around SQLAlchemy), for a unit's
        #: COMMIT that the mark reads: its resolution asks about them too.
        self.flight_dropped: (
            Callable[[Connection], tuple[tuple[PendingCommit, ...], PendingCommit | None]] | None
        ) = None
        self._lock = threading.Lock()
        renew_lock_in_child(self)  # another thread may hold it at a fork

    @property
    def lock(self) -> threading.Lock:
        """The lock of this engine's maps and slots filled on first use."""
        return self._lock

    def first_statement_sent(self, checkout: PoolProxiedConnection) -> Unsent | None:
        """Say that ``checkout`` sends (or gave up) its first statement; return its entry.

        The replay takes it as it sends; a unit of work gives the replay up (it runs again
        whole, and its deadline and server life hold this connection, not a fresh one's).
        """
        if checkout.__class__ is not POOL_CHECKOUT:  # the first connect's ad hoc connection
            return None
        pending: Unsent | None = checkout.__dict__.pop(UNSENT_KEY, None)
        return pending


def root_engine(engine: Engine | AsyncEngine) -> Engine:
    """Return the engine that owns ``engine``'s pool: itself, its sync engine, or its parent.

    `Engine.execution_options` returns a copy that shares the parent's pool, dialect and events
    (and its listeners see the parent's): one engine for dropsafe.
    """
    found: object = getattr(engine, "sync_engine", engine)
    while (parent := getattr(found, "_proxied", None)) is not None:
        found = parent
    return cast("Engine", found)


def peek_state(engine: Engine | AsyncEngine) -> EngineState | None:
    """Return ``engine``'s state if it has one, without making it."""
    state = getattr(engine, _ATTRIBUTE, None)  # the common case: one attribute read
    if state is None:
        state = getattr(root_engine(engine), _ATTRIBUTE, None)
    return state if isinstance(state, EngineState) else None


def state_of(engine: Engine | AsyncEngine) -> EngineState:
    """Return ``engine``'s state, made on first use (engines dropsafe does not guard have one).

    Example::

        policy = state_of(engine).policy  # None: not hardened
    """
    state = getattr(engine, _ATTRIBUTE, None)  # read on every unit: one attribute read
    if isinstance(state, EngineState):
        return state
    root = root_engine(engine)
    made = getattr(root, _ATTRIBUTE, None)
    if not isinstance(made, EngineState):
        # Atomic: two threads that get here at once get the same state, without a lock (which
        # a forked child would have to renew).
        made = vars(root).setdefault(_ATTRIBUTE, EngineState())
    if engine is not root and hasattr(engine, "__dict__"):  # a copy: found at once next time
        vars(engine)[_ATTRIBUTE] = made
    return made
