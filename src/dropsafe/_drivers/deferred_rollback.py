"""What every driver's unawaited ROLLBACK shares: the pending reply's core.

`dropsafe._engine.quiet_rollback` decides when a ROLLBACK may go unawaited; each driver's module
sends it its own way (`dropsafe._drivers.psycopg_rollback`, `psycopg_async_rollback`,
`psycopg2_rollback`, `asyncpg_rollback`) and keeps a `DeferredRollback` until its outcome is
read: whose ROLLBACK it is, how long its reply may take, who says a failure, and which process
sent it (a forked child shares the socket: the reply is the parent's, never its own). A failure
closes the connection (its state is unknown: nothing is sent on it again) and is said, unless
quiet (before a close). The drivers' subclasses keep what differs: how the reply is awaited or
read, and how a connection is closed.

The constructor is the subclasses' own (none defines one): a request's checkin makes one, and
an ``__init__`` calling this one would be a call more on that path. A subclass's extra state is
set by its module's ``send_rollback`` right after it is made.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["FORKED", "DeferredRollback", "During", "Reporter"]

#: Whose ROLLBACK it is: a Connection's, or the pool's reset at checkin.
During = Literal["rollback", "reset"]

#: Why a reply due in another process is never read there.
FORKED = "a ROLLBACK sent by another process is still unanswered here"


class Reporter(Protocol):
    """The engine a ROLLBACK not awaited belongs to: what the driver tells it, and asks it."""

    def __call__(self, during: During, error: BaseException) -> None:
        """Say that a ROLLBACK not awaited failed: its connection is closed, as if lost."""

    def app_listens_before_settle(self, proxied: Any) -> bool:  # noqa: ANN401 - a pool's entry
        """Whether listeners of the app's may touch ``proxied``'s connection before it is settled.

        ``checkin`` listeners (they run right after the pool's reset) and ``checkout`` ones that
        run before dropsafe's checkout check: a driver whose connection refuses what they may
        do to it while its ROLLBACK is under way (psycopg2) awaits that ROLLBACK there. True
        where it cannot be told.
        """


class DeferredRollback:
    """A ROLLBACK sent (or under way) whose outcome is read before the connection's next use."""

    __slots__ = ("_connection", "_pid", "_report", "_timeout", "during", "error")

    def __init__(
        self,
        connection: Any,  # noqa: ANN401 - the driver's own connection
        timeout: float,
        during: During,
        report: Callable[[During, BaseException], None],
    ) -> None:
        self._connection = connection
        #: How long the reply may take (``ping_timeout``).
        self._timeout = timeout
        #: Says a failure (the event and the log line), whoever reads the reply.
        self._report = report
        #: Whose ROLLBACK it is: a Connection's, or the pool's reset at checkin.
        self.during = during
        #: Its failure, where the driver keeps one to raise at the settle.
        self.error: BaseException | None = None
        # A forked child shares the socket: the reply is the parent's to read, never its own.
        self._pid = os.getpid()

    def _failed(self, error: BaseException, *, quiet: bool = False) -> None:
        """Close the connection after a failure; say the failure unless ``quiet``."""
        self._close()
        if not quiet:
            self._report(self.during, error)

    def _close(self) -> None:
        """End the connection so that nothing is sent on it again (each driver its own way)."""
        raise NotImplementedError
