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
opens a fresh one. A checked-out connection is never touched.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

import sqlalchemy.exc

from dropsafe._policy import PoolPolicy, seconds

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

__all__ = ["JITTER", "ConnectionLifetime", "draw_limit"]

logger = logging.getLogger("dropsafe")

#: The share of ``max_lifetime`` over which the limits of connections made together spread.
JITTER = 0.1


def draw_limit(max_lifetime: float, rng: random.Random) -> float:
    """Return one connection's own limit: uniform in [1 - JITTER, 1] x ``max_lifetime``."""
    return max_lifetime * rng.uniform(1.0 - JITTER, 1.0)


class ConnectionLifetime:
    """Retires one engine's pooled connections once they reach their own limit."""

    def __init__(
        self,
        policy: PoolPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._max_lifetime = None if policy.max_lifetime is None else seconds(policy.max_lifetime)
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        # When each entry's current connection must go; weakly keyed like the checkout check.
        self._expiry: weakref.WeakKeyDictionary[ConnectionPoolEntry, float] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """Whether connections are retired at all (``max_lifetime`` is not None)."""
        return self._max_lifetime is not None

    def listeners(self) -> dict[str, Callable[..., None]]:
        """Return the pool events this listens to, by name (none when retirement is off)."""
        if not self.enabled:
            return {}
        return {
            "connect": self._on_connect,
            "checkout": self.on_checkout,
            "checkin": self.on_checkin,
        }

    def expiry_of(self, entry: ConnectionPoolEntry) -> float | None:
        """Return when the entry's connection is due to retire (on ``clock``), if known."""
        with self._lock:
            return self._expiry.get(entry) if _weakable(entry) else None

    def _on_connect(self, dbapi_connection: Any, entry: ConnectionPoolEntry) -> None:  # noqa: ANN401 - DBAPI connections are untyped
        del dbapi_connection
        if self._max_lifetime is None or not _weakable(entry):
            return
        limit = draw_limit(self._max_lifetime, self._rng)
        with self._lock:
            self._expiry[entry] = self._clock() + limit

    def on_checkin(self, dbapi_connection: Any, entry: ConnectionPoolEntry) -> None:  # noqa: ANN401
        """Close an expired connection as it comes back; the next checkout opens a new one."""
        if dbapi_connection is None or not self._expired(entry):
            return  # None: invalidated while checked out, already gone
        logger.debug("dropsafe retires a connection that reached its max_lifetime")
        entry.close()

    def on_checkout(
        self,
        dbapi_connection: Any,  # noqa: ANN401
        entry: ConnectionPoolEntry,
        proxy: PoolProxiedConnection,
    ) -> None:
        """Refuse an expired idle connection: the pool replaces it before handing it out."""
        del dbapi_connection, proxy
        if self._expired(entry):
            # Forgotten first: the pool's fresh connection for this entry draws its own limit.
            with self._lock:
                self._expiry.pop(entry, None)
            raise sqlalchemy.exc.DisconnectionError("the connection reached its max_lifetime")

    def _expired(self, entry: ConnectionPoolEntry) -> bool:
        expiry = self.expiry_of(entry)
        return expiry is not None and self._clock() >= expiry


def _weakable(entry: object) -> bool:
    """SQLAlchemy's pool entries take weak references; a stand-in from elsewhere may not."""
    return hasattr(type(entry), "__weakref__")
