"""Policy: every knob of dropsafe in one frozen, validated value, with defaults for a WAN."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Union

from dropsafe._errors import ConfigurationError
from dropsafe.events import LoggingHook

if TYPE_CHECKING:
    from dropsafe.events import Hook

__all__ = ["Duration", "Policy", "seconds"]

Duration = Union[float, timedelta]  # noqa: UP007 - a runtime alias, evaluated on Python 3.10


def seconds(value: Duration) -> float:
    """Return a duration in seconds, whichever form it was given in."""
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


# (minimum, maximum) for each numeric field; durations in seconds.
_RANGES: dict[str, tuple[float, float]] = {
    "connect_timeout": (1, 600),
    "tcp_user_timeout": (0.1, 3600),
    "keepalive_idle": (1, 7200),
    "keepalive_interval": (1, 600),
    "keepalive_count": (1, 100),
    "ping_after_idle": (0, 86400),
    "ping_timeout": (0.05, 300),
    "max_attempts": (1, 1000),
    "backoff_initial": (0, 60),
    "backoff_max": (0, 600),
    "backoff_multiplier": (1, 10),
    "deadline": (0.01, 86400),
    "commit_status_timeout": (0, 600),
}
_INTEGERS = frozenset({"keepalive_count", "max_attempts"})
_OPTIONAL = frozenset({"tcp_user_timeout", "keepalive_idle"})


@dataclass(frozen=True)
class Policy:
    """How dropsafe guards an engine and retries units of work.

    The defaults suit an application talking to a managed PostgreSQL across a WAN: a dead
    peer is noticed within about ``tcp_user_timeout`` (10 s) even mid-query, and an idle
    connection is kept alive through NAT and load balancers by keepalives every 10 s.
    Durations take seconds (``float``) or ``timedelta`` and are stored as seconds. A bad
    value raises `ConfigurationError` naming the field and its allowed range.

    Example::

        dropsafe.create_engine(url, policy=dropsafe.Policy(tcp_user_timeout=5, max_attempts=3))
    """

    #: Time allowed to open a connection (libpq ``connect_timeout``, asyncpg ``timeout``).
    connect_timeout: Duration = 5.0
    #: Time sent data may stay unacknowledged before the kernel drops the connection;
    #: this is what ends a request on a half-open socket. None leaves the OS default (~15 min).
    tcp_user_timeout: Duration | None = 10.0
    #: Idle time before the first TCP keepalive probe; None turns keepalives off.
    keepalive_idle: Duration | None = 10.0
    #: Time between keepalive probes.
    keepalive_interval: Duration = 5.0
    #: Unanswered probes before the connection is declared dead.
    keepalive_count: int = 3
    #: A connection idle longer than this is pinged at checkout (a round trip);
    #: a busier one is checked by looking at its socket only, which costs nothing.
    ping_after_idle: Duration = 30.0
    #: Bound on a checkout ping.
    ping_timeout: Duration = 5.0
    #: Attempts of a unit of work in `run_transaction`, the first one included.
    max_attempts: int = 5
    #: First backoff before a retry; later ones grow by ``backoff_multiplier`` up to
    #: ``backoff_max``, each drawn uniformly below that bound (full jitter).
    backoff_initial: Duration = 0.05
    backoff_max: Duration = 1.0
    backoff_multiplier: float = 2.0
    #: Absolute bound on a unit of work, retries and backoff included.
    deadline: Duration = 30.0
    #: Resolve a COMMIT whose reply was lost by asking the server (write transactions only).
    verify_commits: bool = True
    #: How long to keep asking while the server reports the transaction "in progress".
    commit_status_timeout: Duration = 10.0
    #: Callables that receive every `dropsafe.events.Event` of engines and units of work
    #: using this policy; by default a `dropsafe.events.LoggingHook`. Pass your own tuple to
    #: replace it (keep ``LoggingHook()`` in it to keep the log lines).
    hooks: tuple[Hook, ...] = (LoggingHook(),)

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "hooks":
                _check_hooks(value)
                continue
            if field.name == "verify_commits":
                if not isinstance(value, bool):
                    raise ConfigurationError(f"Policy.verify_commits must be a bool: {value!r}")
                continue
            if value is None and field.name in _OPTIONAL:
                continue
            low, high = _RANGES[field.name]
            number = _number(field.name, value, integer=field.name in _INTEGERS)
            if not low <= number <= high:
                raise ConfigurationError(
                    f"Policy.{field.name} must be within {low:g}..{high:g}: {value!r}"
                )
            object.__setattr__(self, field.name, number)
        if seconds(self.backoff_max) < seconds(self.backoff_initial):
            raise ConfigurationError(
                "Policy.backoff_max must be >= backoff_initial: "
                f"{self.backoff_max!r} < {self.backoff_initial!r}"
            )


def _check_hooks(hooks: object) -> None:
    if not isinstance(hooks, tuple) or not all(callable(hook) for hook in hooks):
        raise ConfigurationError(f"Policy.hooks must be a tuple of callables: {hooks!r}")


def _number(name: str, value: object, *, integer: bool) -> float:
    kind = "an int" if integer else "a number of seconds or a timedelta"
    if isinstance(value, bool) or not isinstance(value, (int, float, timedelta)):
        raise ConfigurationError(f"Policy.{name} must be {kind}: {value!r}")
    if integer and not isinstance(value, int):
        raise ConfigurationError(f"Policy.{name} must be {kind}: {value!r}")
    number = seconds(value) if isinstance(value, timedelta) else value
    if not math.isfinite(number):
        raise ConfigurationError(f"Policy.{name} must be finite: {value!r}")
    return number if integer else float(number)
