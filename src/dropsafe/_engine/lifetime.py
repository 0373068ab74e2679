"""Connection lifetime: each connection retired after its own limit, never while in use.

Each connection draws its limit uniformly in [0.9, 1.0] x ``PoolPolicy.max_lifetime`` (as
psycopg_pool does), so connections made together do not all reconnect together. The checkout
check (`dropsafe._engine.liveness.CheckoutCheck`) applies it where SQLAlchemy's pool allows:
closed at checkin, refused with `DisconnectionError` at checkout. It already looks up each
entry there, and one listener costs less than two. Why retire working connections at all:
docs/settings.md, ``max_lifetime``.
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
