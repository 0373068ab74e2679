"""Settings per layer: each knob lives in the layer that applies it, with defaults for a WAN.

dropsafe acts at three places, and a knob means something at one of them only:

- `ConnectionPolicy`: when a connection is opened (connect timeout, TCP keepalives,
  ``tcp_user_timeout``). The driver's connect arguments and socket options.
- `PoolPolicy`: when a pooled connection is checked out (the free look, the ping after idle).
- `UnitPolicy`: when `run_transaction` runs a unit of work (attempts, backoff, deadline,
  commit verification).

An engine carries a `Policy`: one of each, plus the hooks that receive its events. A unit of
work takes the engine's `UnitPolicy` and may override what it owns (``deadline=``,
``max_attempts=``, or a whole ``policy=UnitPolicy(...)``); it cannot change how connections are
opened or checked, because those belong to the engine.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from dropsafe._errors import ConfigurationError
from dropsafe.events import LoggingHook

if TYPE_CHECKING:
    from collections.abc import Callable

    from dropsafe.events import Hook

__all__ = [
    "ConnectionPolicy",
    "Duration",
    "Policy",
    "PoolPolicy",
    "Pooler",
    "UnitPolicy",
    "environment_name",
    "parse_knob",
    "seconds",
]

Duration = float | timedelta
#: What sits between the application and PostgreSQL, when it is a pooler that matters.
Pooler = Literal["session", "transaction"]


def seconds(value: Duration) -> float:
    """Return a duration in seconds, whichever form it was given in."""
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


class _Validated:
    """Checks every field against its (minimum, maximum) when the value is made.

    A bad value raises `ConfigurationError` naming the class, the field and its allowed range,
    at the call that made it. Durations are stored as seconds.
    """

    _RANGES: ClassVar[dict[str, tuple[float, float]]] = {}
    _INTEGERS: ClassVar[frozenset[str]] = frozenset()
    _OPTIONAL: ClassVar[frozenset[str]] = frozenset()  # None is allowed (and means "off")
    _BOOLEANS: ClassVar[frozenset[str]] = frozenset()
    _CHOICES: ClassVar[dict[str, tuple[object, ...]]] = {}  # fields that take one of a few values
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]  # set by @dataclass

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for each in dataclasses.fields(self):
            name = each.name
            value = getattr(self, name)
            if name in self._CHOICES:
                if value not in self._CHOICES[name] or isinstance(value, bool):
                    allowed = ", ".join(repr(choice) for choice in self._CHOICES[name])
                    raise ConfigurationError(f"{owner}.{name} must be one of {allowed}: {value!r}")
                continue
            if name in self._BOOLEANS:
                if not isinstance(value, bool):
                    raise ConfigurationError(f"{owner}.{name} must be a bool: {value!r}")
                continue
            if value is None and name in self._OPTIONAL:
                continue
            low, high = self._RANGES[name]
            number = _number(f"{owner}.{name}", value, integer=name in self._INTEGERS)
            if not low <= number <= high:
                raise ConfigurationError(
                    f"{owner}.{name} must be within {low:g}..{high:g}: {value!r}"
                )
            object.__setattr__(self, name, number)


_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})
_NONE = frozenset({"none", "off"})
_ENVIRONMENT_PREFIX = "DROPSAFE_"
_V = TypeVar("_V", bound=_Validated)


def environment_name(knob: str) -> str:
    """Name the environment variable that sets ``knob``'s default: ``DROPSAFE_DEADLINE``."""
    return _ENVIRONMENT_PREFIX + knob.upper()


def parse_knob(kind: type[_Validated], knob: str, text: str, where: str) -> object:
    """Parse a knob's text (from a URL or the environment) to its type; the layer checks ranges.

    ``where`` names the text's source in the error: ``URL parameter dropsafe_deadline``.
    """
    word = text.strip().lower()
    choices = kind._CHOICES.get(knob)
    if choices is not None:
        return _choice(choices, text, where)
    if knob in kind._BOOLEANS:
        if word not in _TRUE | _FALSE:
            raise ConfigurationError(f"{where} must be true or false: {text!r}")
        return word in _TRUE
    if knob in kind._OPTIONAL and word in _NONE:
        return None
    integer = knob in kind._INTEGERS
    try:
        return int(word) if integer else float(word)
    except ValueError:
        off = " (or none)" if knob in kind._OPTIONAL else ""
        what = "an integer" if integer else f"a number of seconds{off}"
        raise ConfigurationError(f"{where} must be {what}: {text!r}") from None


def _choice(choices: tuple[object, ...], text: str, where: str) -> object:
    """Parse a knob that takes one of a few values (``none`` for None, where allowed)."""
    word = text.strip().lower()
    if word in _NONE and None in choices:
        return None
    if word in choices:
        return word
    allowed = ", ".join("none" if choice is None else str(choice) for choice in choices)
    raise ConfigurationError(f"{where} must be one of {allowed}: {text!r}")


def _environment_defaults(kind: type[_V]) -> type[_V]:
    """Let ``DROPSAFE_<KNOB>`` environment variables set the defaults of ``kind``'s knobs.

    12-factor apps configure by environment. A knob given in code (or by the URL plugin, which
    passes every knob it reads) wins; the variable only replaces the built-in default, read
    when the layer is made. A malformed or out-of-range value raises `ConfigurationError`
    naming the variable, at that call.
    """
    init: Callable[..., None] = kind.__init__
    names = [each.name for each in dataclasses.fields(kind)]

    @functools.wraps(init)
    def init_from_environment(self: _V, *args: object, **kwargs: object) -> None:
        given = set(names[: len(args)]) | set(kwargs)
        from_environment: dict[str, str] = {}
        for name in names:
            text = None if name in given else os.environ.get(environment_name(name))
            if text is not None:
                where = f"environment variable {environment_name(name)}"
                kwargs[name] = parse_knob(kind, name, text, where)
                from_environment[name] = text
        try:
            init(self, *args, **kwargs)
        except ConfigurationError as exc:
            named = [name for name in from_environment if re.search(rf"\b{name}\b", str(exc))]
            if not named:
                raise
            variable = f"{environment_name(named[0])}={from_environment[named[0]]!r}"
            raise ConfigurationError(f"environment variable {variable}: {exc}") from None

    setattr(kind, "__init__", init_from_environment)  # noqa: B010 - mypy refuses assigning a method
    return kind


@_environment_defaults
@dataclass(frozen=True)
class ConnectionPolicy(_Validated):
    """How a connection is opened: applied as the driver's connect arguments and socket options.

    The defaults notice a dead peer within about 5 s even in the middle of a query, and keep
    an idle connection alive through NAT and load balancers with a keepalive every 2 s.

    Example::

        dropsafe.Policy(connection=dropsafe.ConnectionPolicy(tcp_user_timeout=5))
    """

    _RANGES: ClassVar[dict[str, tuple[float, float]]] = {
        "connect_timeout": (1, 600),
        "connect_wait": (0, 600),
        "tcp_user_timeout": (0.1, 3600),
        "keepalive_idle": (1, 7200),
        "keepalive_interval": (1, 600),
        "keepalive_count": (1, 100),
    }
    _INTEGERS: ClassVar[frozenset[str]] = frozenset({"keepalive_count"})
    _OPTIONAL: ClassVar[frozenset[str]] = frozenset({"tcp_user_timeout", "keepalive_idle"})
    _CHOICES: ClassVar[dict[str, tuple[object, ...]]] = {
        "pooler": (None, "session", "transaction"),
    }

    #: Time allowed to open a connection (libpq ``connect_timeout``, asyncpg ``timeout``).
    connect_timeout: Duration = 5.0
    #: How long a checkout that cannot connect because the server is not there now (refused,
    #: reset, starting up, in recovery, shutting down, a failover in progress) keeps trying,
    #: with backoff, before it fails the request. 10 s outlasts a restart (0.3-0.5 s measured
    #: on a small local server) with room for a busy one, and stays well below a web server's
    #: request timeout (30 s for gunicorn and Heroku's router). Errors that waiting cannot fix
    #: (a wrong password, a missing database, a TLS setting) fail at once; inside a unit of
    #: work the unit does the waiting, within its deadline. 0 fails at once, as before.
    connect_wait: Duration = 10.0
    #: Time sent data (or a keepalive probe) may stay unacknowledged before the kernel drops
    #: the connection; this is what ends a request on a half-open socket: about 4.5 s after
    #: the link died, idle or mid-query. Linux counts it from the sending of the oldest data
    #: still unacknowledged once that data needed a retransmission, never a transfer's total
    #: time: data acknowledged slowly but steadily (a slow link, a large result or upload) is
    #: not cut, nor is a long query (the server's kernel answers keepalives). On a link with
    #: more than 100 ms of round trip or frequent loss, raise it (300 ms: 12 s, see
    #: docs/guarantees.md). None leaves the OS default (~15 min).
    tcp_user_timeout: Duration | None = 4.0
    #: Idle time before the first TCP keepalive probe; None turns keepalives off. 2 s: a query
    #: that runs while the link dies is found by probes (tcp_user_timeout ends it at the first
    #: unanswered probe past it); one small packet per 2 s per idle connection, answered by the
    #: server's kernel.
    keepalive_idle: Duration | None = 2.0
    #: Time between keepalive probes.
    keepalive_interval: Duration = 1.0
    #: Unanswered probes before the connection is declared dead.
    keepalive_count: int = 3
    #: The pooler between the application and PostgreSQL, if any. ``"transaction"`` (PgBouncer,
    #: Supavisor, RDS Proxy in transaction mode): each transaction may run on another server
    #: connection, so no driver may keep named prepared statements across transactions; asyncpg
    #: then gets no statement caches and a unique name per statement, psycopg 3 never prepares.
    #: ``"session"`` and None change nothing.
    pooler: Pooler | None = None


@_environment_defaults
@dataclass(frozen=True)
class PoolPolicy(_Validated):
    """How a pooled connection is checked out: a free look at its socket, a ping after idle.

    Example::

        dropsafe.Policy(pool=dropsafe.PoolPolicy(ping_after_idle=60))
    """

    _RANGES: ClassVar[dict[str, tuple[float, float]]] = {
        "ping_after_idle": (0, 86400),
        "ping_timeout": (0.05, 300),
        "max_lifetime": (1, 7 * 86400),
        "replay_max_statements": (1, 10_000),
        "replay_max_rows": (0, 10_000_000),
        "replay_max_bytes": (0, 1 << 30),
    }
    _OPTIONAL: ClassVar[frozenset[str]] = frozenset({"max_lifetime"})
    _INTEGERS: ClassVar[frozenset[str]] = frozenset(
        {"replay_max_statements", "replay_max_rows", "replay_max_bytes"}
    )
    _BOOLEANS: ClassVar[frozenset[str]] = frozenset(
        {
            "replay_first_statement",
            "replay_transaction",
            "defer_checkin_rollback",
            "begin_in_first_flight",
            "read_xid_in_flight",
        }
    )

    #: A connection idle longer than this is pinged at checkout (a round trip);
    #: a busier one is checked by looking at its socket only, which costs nothing.
    ping_after_idle: Duration = 30.0
    #: Bound on a checkout ping.
    ping_timeout: Duration = 5.0
    #: A connection older than its own limit is closed when it is checked in, or replaced when
    #: it is checked out, never while in use. Each connection draws its limit uniformly in
    #: [0.9, 1.0] x ``max_lifetime``, so connections made together are not all replaced
    #: together. Set it below any lifetime limit of a proxy or load balancer on the way;
    #: None keeps connections for as long as they work.
    max_lifetime: Duration | None = 3600.0
    #: A connection lost under the first statement it is given after checkout, in a
    #: transaction (not autocommit), before any reply: the statement is sent once more on a
    #: fresh connection, and the app never knows. The transaction cannot have committed; see
    #: docs/guarantees.md for statements with effects outside transactions, and for the
    #: per-statement opt-out ``execution_options(dropsafe_replay=False)``.
    replay_first_statement: bool = True
    #: A connection lost later in such a transaction, before its COMMIT was sent: its
    #: statements so far are sent again on a fresh connection, and each result compared with
    #: what the app received (rowcount, a digest of the rows it fetched); all the same, the
    #: statement goes on there. Any difference, or a statement that may act outside the
    #: transaction, and the original error is raised (docs/mid-transaction.md). Needs
    #: ``replay_first_statement``; off behind a pooler.
    replay_transaction: bool = False
    #: What one transaction records at most; past it, the replay is off for that transaction.
    replay_max_statements: int = 100
    #: Rows the app fetched (hashed, not kept).
    replay_max_rows: int = 100_000
    #: Statement text and parameter bytes (kept, to send them again).
    replay_max_bytes: int = 1_000_000
    #: The ROLLBACK that ends a request (a Session's or Connection's close, the pool's reset at
    #: checkin) is sent without waiting for its reply, which is read before the connection is
    #: used again: a request that ends with a ROLLBACK saves a round trip. A ROLLBACK that fails
    #: there has its connection replaced, unseen. psycopg 3 (sync and async) and asyncpg; see
    #: docs/guarantees.md.
    defer_checkin_rollback: bool = True
    #: A transaction's BEGIN is sent in the same flight as its first statement (a pipeline:
    #: BEGIN, the statement, one Sync), so that a one-query request waits for one round trip,
    #: not two. A BEGIN that fails is the error raised, and the statement does not run.
    #: psycopg 3 (sync and async) only; see docs/guarantees.md.
    begin_in_first_flight: bool = True
    #: A verified unit of work's xid is read in the flight of its first statement that may
    #: write, instead of by a statement of its own before COMMIT (the mark): a verified unit
    #: makes no round trip more than an unverified one. Where nothing can be read there (no
    #: TCP socket to count bytes on, a declared pooler, bytes sent around SQLAlchemy after the
    #: read, psycopg2 without leave to run a DO block, ...) the mark reads, as with False.
    #: Needs ``replay_first_statement``; psycopg2, psycopg 3 and asyncpg. The histories that
    #: kept it off in session 13 are closed: docs/guarantees.md, "The xid read in the flight
    #: of the unit's first write".
    read_xid_in_flight: bool = True


@_environment_defaults
@dataclass(frozen=True)
class UnitPolicy(_Validated):
    """How `run_transaction` runs a unit of work: attempts, backoff, deadline, verified COMMITs.

    Example::

        dropsafe.run_transaction(Session, fn, policy=dropsafe.UnitPolicy(max_attempts=3))
    """

    _RANGES: ClassVar[dict[str, tuple[float, float]]] = {
        "max_attempts": (1, 1000),
        "backoff_initial": (0, 60),
        "backoff_max": (0, 600),
        "backoff_multiplier": (1, 10),
        "deadline": (0.01, 86400),
        "commit_status_timeout": (0, 600),
    }
    _INTEGERS: ClassVar[frozenset[str]] = frozenset({"max_attempts"})
    _BOOLEANS: ClassVar[frozenset[str]] = frozenset({"verify_commits"})

    #: Runs of the unit that reached the server, the first one included. Failed connects do
    #: not count: an unreachable server is waited for until the deadline.
    max_attempts: int = 5
    #: First backoff before a retry; later ones grow by ``backoff_multiplier`` up to
    #: ``backoff_max``, each drawn uniformly below that bound (full jitter).
    backoff_initial: Duration = 0.05
    backoff_max: Duration = 1.0
    backoff_multiplier: float = 2.0
    #: Absolute bound on a unit of work: connects, runs, backoff and commit resolution.
    #: Below the 30 s of gunicorn's worker timeout and Heroku's router, so that the app gets
    #: to answer with the unit's error before its request is killed (docs/settings.md).
    deadline: Duration = 20.0
    #: Resolve a COMMIT whose reply was lost by asking the server (write transactions only).
    verify_commits: bool = True
    #: How long to keep asking while the server reports the transaction "in progress".
    commit_status_timeout: Duration = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if seconds(self.backoff_max) < seconds(self.backoff_initial):
            raise ConfigurationError(
                "UnitPolicy.backoff_max must be >= backoff_initial: "
                f"{self.backoff_max!r} < {self.backoff_initial!r}"
            )


# Where each knob of the pre-release API's flat Policy went, for a helpful error.
_LAYER_OF = {
    **dict.fromkeys(
        (*ConnectionPolicy._RANGES, *ConnectionPolicy._CHOICES),
        "connection=ConnectionPolicy",
    ),
    **dict.fromkeys(
        (*PoolPolicy._RANGES, *PoolPolicy._BOOLEANS),
        "pool=PoolPolicy",
    ),
    **dict.fromkeys((*UnitPolicy._RANGES, "verify_commits"), "unit=UnitPolicy"),
}


@dataclass(frozen=True, init=False)
class Policy:
    """What an engine does at each layer, and who hears about it.

    Example::

        engine = dropsafe.create_engine(url, policy=dropsafe.Policy(
            connection=dropsafe.ConnectionPolicy(tcp_user_timeout=5),
            unit=dropsafe.UnitPolicy(deadline=10),
        ))
    """

    #: Applied when a connection is opened.
    connection: ConnectionPolicy = field(default_factory=ConnectionPolicy)
    #: Applied when a pooled connection is checked out.
    pool: PoolPolicy = field(default_factory=PoolPolicy)
    #: The default for units of work on this engine; each unit may override it.
    unit: UnitPolicy = field(default_factory=UnitPolicy)
    #: Callables that receive every `dropsafe.events.Event` of the engine and of its units of
    #: work; by default a `dropsafe.events.LoggingHook`. Pass your own tuple to replace it
    #: (keep ``LoggingHook()`` in it to keep the log lines).
    hooks: tuple[Hook, ...] = (LoggingHook(),)

    def __init__(
        self,
        connection: ConnectionPolicy | None = None,
        pool: PoolPolicy | None = None,
        unit: UnitPolicy | None = None,
        hooks: tuple[Hook, ...] = (LoggingHook(),),
        **misplaced: object,  # only to name where a knob went
    ) -> None:
        if misplaced:
            name = min(misplaced)
            where = _LAYER_OF.get(name)
            if where is None:
                raise ConfigurationError(f"Policy has no setting {name!r}")
            raise ConfigurationError(
                f"{name} belongs to a layer: Policy({where}({name}=...)); see docs/settings.md"
            )
        for name, value, kind in (
            ("connection", connection, ConnectionPolicy),
            ("pool", pool, PoolPolicy),
            ("unit", unit, UnitPolicy),
        ):
            if value is not None and not isinstance(value, kind):
                raise ConfigurationError(f"Policy.{name} must be a {kind.__name__}: {value!r}")
            object.__setattr__(self, name, kind() if value is None else value)
        if not isinstance(hooks, tuple) or not all(callable(hook) for hook in hooks):
            raise ConfigurationError(f"Policy.hooks must be a tuple of callables: {hooks!r}")
        object.__setattr__(self, "hooks", hooks)


def _number(name: str, value: object, *, integer: bool) -> float:
    kind = "an int" if integer else "a number of seconds or a timedelta"
    if isinstance(value, bool) or not isinstance(value, (int, float, timedelta)):
        raise ConfigurationError(f"{name} must be {kind}: {value!r}")
    if integer and not isinstance(value, int):
        raise ConfigurationError(f"{name} must be {kind}: {value!r}")
    number = seconds(value) if isinstance(value, timedelta) else value
    if not math.isfinite(number):
        raise ConfigurationError(f"{name} must be finite: {value!r}")
    return number if integer else float(number)
