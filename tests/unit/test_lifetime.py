"""The lifetime's pure logic: each connection's limit, and when it counts as expired."""

import random

import pytest
import sqlalchemy.exc

from dropsafe import PoolPolicy
from dropsafe._lifetime import JITTER, ConnectionLifetime, draw_limit


def test_limits_are_drawn_within_the_jitter_window_and_fill_it():
    rng = random.Random(15)
    limits = [draw_limit(100.0, rng) for _ in range(1000)]
    assert min(limits) >= 100.0 * (1 - JITTER)
    assert max(limits) <= 100.0
    # Spread over the window, not bunched: every tenth of it holds some draws.
    buckets = {int((limit - 90.0) // 1.0) for limit in limits}
    assert buckets >= set(range(10))


class _Entry:
    """A pool entry as the lifetime sees one: weakly referenceable, can be closed."""

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_a_connection_is_closed_at_checkin_only_once_past_its_own_limit():
    now = [0.0]
    lifetime = ConnectionLifetime(PoolPolicy(max_lifetime=10), clock=lambda: now[0])
    entry = _Entry()
    lifetime.listeners()["connect"](object(), entry)
    expiry = lifetime.expiry_of(entry)
    assert expiry is not None
    assert 9.0 <= expiry <= 10.0
    now[0] = expiry - 0.001
    lifetime.on_checkin(object(), entry)
    assert not entry.closed
    now[0] = expiry
    lifetime.on_checkin(None, entry)  # invalidated while out: nothing left to close
    assert not entry.closed
    lifetime.on_checkin(object(), entry)
    assert entry.closed


def test_an_expired_idle_connection_is_refused_at_checkout():
    now = [0.0]
    lifetime = ConnectionLifetime(PoolPolicy(max_lifetime=10), clock=lambda: now[0])
    entry = _Entry()
    lifetime.listeners()["connect"](object(), entry)
    lifetime.on_checkout(object(), entry, None)  # young: handed out
    now[0] = 10.0
    with pytest.raises(sqlalchemy.exc.DisconnectionError, match="max_lifetime"):
        lifetime.on_checkout(object(), entry, None)
    assert lifetime.expiry_of(entry) is None  # the replacement draws its own


def test_max_lifetime_none_listens_to_nothing():
    assert ConnectionLifetime(PoolPolicy(max_lifetime=None)).listeners() == {}
