"""The lifetime's logic: each connection's limit, and when the checkout check retires it."""

import math
import random

import pytest
import sqlalchemy.exc
from sqlalchemy.dialects import postgresql

from dropsafe import PoolPolicy
from dropsafe._drivers.psycopg2 import Psycopg2
from dropsafe._engine.lifetime import JITTER, ConnectionLifetime, draw_limit
from dropsafe._engine.liveness import CheckoutCheck


def test_limits_are_drawn_within_the_jitter_window_and_fill_it():
    rng = random.Random(15)
    limits = [draw_limit(100.0, rng) for _ in range(1000)]
    assert min(limits) >= 100.0 * (1 - JITTER)
    assert max(limits) <= 100.0
    # Spread over the window, not bunched: every tenth of it holds some draws.
    buckets = {int((limit - 90.0) // 1.0) for limit in limits}
    assert buckets >= set(range(10))


class _Entry:
    """A pool entry as the check sees one: weakly referenceable, can be closed."""

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def _check(now: list[float], max_lifetime: float | None = 10) -> CheckoutCheck:
    """The checkout check that retires connections, on a clock the test moves."""
    lifetime = ConnectionLifetime(PoolPolicy(max_lifetime=max_lifetime))
    return CheckoutCheck(
        PoolPolicy(),
        (),
        Psycopg2(),
        postgresql.dialect(),
        pre_ping=False,
        draw_lifetime=lifetime.draw if lifetime.enabled else None,
        clock=lambda: now[0],
    )


def _retire_at(check: CheckoutCheck, entry: _Entry) -> float:
    state = check._state(entry)  # the limit it drew
    assert state is not None
    return state.retire_at


def _connected(
    now: list[float], max_lifetime: float | None = 10
) -> tuple[CheckoutCheck, dict, _Entry, object]:
    """A check on the clock ``now``, its listeners, and a pool entry it saw connect."""
    check = _check(now, max_lifetime)
    listeners = check.listeners()
    entry, connection = _Entry(), object()
    listeners["connect"](connection, entry)
    return check, listeners, entry, connection


def test_a_connection_is_closed_at_checkin_only_once_past_its_own_limit():
    now = [0.0]
    check, listeners, entry, connection = _connected(now)
    expiry = _retire_at(check, entry)
    assert 9.0 <= expiry <= 10.0
    now[0] = expiry - 0.001
    listeners["checkin"](connection, entry)
    assert not entry.closed
    now[0] = expiry
    listeners["checkin"](None, entry)  # invalidated while out: nothing left to close
    assert not entry.closed
    listeners["checkin"](connection, entry)
    assert entry.closed


def test_an_expired_idle_connection_is_refused_at_checkout():
    now = [0.0]
    check, listeners, entry, connection = _connected(now)
    listeners["checkout"](connection, entry, None)  # young: handed out
    listeners["checkin"](connection, entry)
    now[0] = 10.0
    with pytest.raises(sqlalchemy.exc.DisconnectionError, match="max_lifetime"):
        listeners["checkout"](connection, entry, None)
    # The replacement draws its own limit, from now.
    replacement = object()
    listeners["connect"](replacement, entry)
    assert _retire_at(check, entry) >= 10.0 + 9.0
    listeners["checkout"](replacement, entry, None)


def test_max_lifetime_none_never_retires():
    now = [0.0]
    check, listeners, entry, connection = _connected(now, max_lifetime=None)
    assert _retire_at(check, entry) == math.inf
    now[0] = 1e9
    listeners["checkin"](connection, entry)
    assert not entry.closed
