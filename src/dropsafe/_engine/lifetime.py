"""Connection lifetime: each connection retired after its own limit, never while in use.

Why retire working connections: proxies, load balancers and some servers end a connection
after a fixed time whatever it does, and a connection that outlives a DNS change (a failover,
a replica added behind one name) keeps talking to the old address. Retiring them before that
costs one connect per connection per ``PoolPolicy.max_lifetime``.

Why jitter: connections made together (at start, after a restart) would otherwise all reach
the limit together and the pool would reconnect all at once, a burst of connects on the server
and latency on the requests that wait for them. Each connection draws its own limit uniformly
in [0.9, 1.0] x ``max_lifetime`` (psycopg_pool does the same), so their retirements spread over
a tenth of the lifetime.

Retired where SQLAlchemy's pool documents it may be: at checkin the entry's connection is
closed (``ConnectionPoolEntry.close``; the pool opens a new one at the next checkout), and at
checkout an expired idle connection is refused with `DisconnectionError`, upon which the pool
opens a fresh one. A checked-out connection is never touched. The checkout check
(`dropsafe._engine.liveness.CheckoutCheck`) does both, with the limit drawn here: it already
looks up each entry's state at every checkout and checkin, and one listener with one lookup
costs less than two (a checkout as cheap as a plain pool's is a goal of its own).
"""

from __future__ import annotations

import math
import random

from dropsafe._policy import PoolPolicy, seconds
from dropsafe._process import reseed_in_child

__all__ = ["JITTER", "ConnectionLifetime", "draw_limit"]

#: The share of ``max_lifetime`` over which the limits of connections made together spread.
JITTER = 0.1


def draw_limit(max_lifetime: float, rng: random.Random) -> float:
    """Return one connection's own limit: uniform in [1 - JITTER, 1] x ``max_lifetime``."""
    return max_lifetime * rng.uniform(1.0 - JITTER, 1.0)


class ConnectionLifetime:
    """Draws each pooled connection's own limit, from ``PoolPolicy.max_lifetime``."""

    def __init__(self, policy: PoolPolicy, *, rng: random.Random | None = None) -> None:
        self._max_lifetime = None if policy.max_lifetime is None else seconds(policy.max_lifetime)
        # Reseeded in a forked child: workers would otherwise retire their connections together.
        self._rng = rng or reseed_in_child(random.Random())

    @property
    def enabled(self) -> bool:
        """Whether connections are retired at all (``max_lifetime`` is not None)."""
        return self._max_lifetime is not None

    def draw(self) -> float:
        """Return a new connection's limit in seconds (infinite when retirement is off)."""
        if self._max_lifetime is None:
            return math.inf
        return draw_limit(self._max_lifetime, self._rng)
