"""What the replay tests share: losing a connection for real, a hardened engine, the events."""

from __future__ import annotations

from sqlalchemy.pool import NullPool

import dropsafe
from dropsafe.events import FirstStatementReplayed


def lose(fault, server, proxy):
    """Lose every connection to ``server``: its backends terminated, cut, or a crash restart."""
    if fault == "terminate":
        assert server.terminate_backends() >= 1
    elif fault == "cut":
        assert proxy.cut("rst") >= 1
    else:
        server.restart("immediate")


def replay_engine(server, proxy, driver, events, *, policy=None, **kwargs):
    """A hardened engine through ``proxy``, a pool of one unless told, its events in ``events``."""
    if kwargs.get("poolclass") is not NullPool:
        kwargs.setdefault("pool_size", 1)
        kwargs.setdefault("max_overflow", 0)
    return dropsafe.create_engine(
        proxy.route(server.url(driver)),
        policy=policy or dropsafe.Policy(hooks=(events.append,)),
        **kwargs,
    )


def replayed(events):
    """The replays that succeeded."""
    return [e for e in events if isinstance(e, FirstStatementReplayed) and e.replay_error is None]


def failed_replays(events):
    """The replays that were tried and failed."""
    return [e for e in events if isinstance(e, FirstStatementReplayed) and e.replay_error]


__all__ = ["failed_replays", "lose", "replay_engine", "replayed"]
