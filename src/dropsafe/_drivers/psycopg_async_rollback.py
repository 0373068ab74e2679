"""psycopg 3 (asyncio): a ROLLBACK sent now, its reply read before the connection's next use.

The async face of `dropsafe._drivers.psycopg_rollback`, the same design: SQLAlchemy's adapter
keeps no transaction state of its own (its rollback awaits psycopg's
``AsyncConnection.rollback()``), and psycopg reads the transaction status from libpq, so a
ROLLBACK sent through libpq leaves every state right once its reply is read. Every use of a
psycopg connection passes its ``wait`` (a coroutine on the async face), which is shadowed on
that connection until the reply is read; the checkout check reads it first (`settle`, awaited
in SQLAlchemy's greenlet). psycopg's async connection is bound to no event loop (its socket is
waited on by whichever loop runs), so a reply due when a loop closed is read by the next one.
Why and what it costs: docs/guarantees.md, "The ROLLBACK that ends a request is not awaited".
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

from dropsafe._drivers.base import await_
from dropsafe._drivers.deferred_rollback import FORKED, DeferredRollback, During
from dropsafe._drivers.psycopg_rollback import _left_to_psycopg, psycopg_states
from dropsafe._drivers.sockets import readable

if TYPE_CHECKING:
    from collections.abc import Callable

    from dropsafe._dbapi import DBAPIConnection, NativeConnection

__all__ = ["PendingAsyncRollback", "send_rollback", "settle"]


def settle(native: NativeConnection) -> None:
    """Read the reply of a ROLLBACK sent without waiting, if one is due; raise if it failed."""
    connection = getattr(native, "_connection", None)  # SQLAlchemy's adapter holds psycopg's
    shadow = getattr(connection, "__dict__", _NOTHING).get("wait")
    if shadow.__class__ is PendingAsyncRollback:
        await_(shadow.settle())


_NOTHING: dict[str, object] = {}


def send_rollback(
    proxied: DBAPIConnection,
    during: During,
    timeout: float,
    report: Callable[[During, BaseException], None],
) -> bool:
    """Send ROLLBACK on a psycopg async connection without waiting; False: run psycopg's own.

    As `dropsafe._drivers.psycopg_rollback.send_rollback`; also left to psycopg: a connection
    whose lock another task holds (an operation of its own in progress).
    """
    adapter: Any = getattr(proxied, "dbapi_connection", proxied)
    native: Any = getattr(adapter, "_connection", None)
    connection_class, idle, in_transaction, in_error = psycopg_states("AsyncConnection")
    if type(native) is not connection_class or _left_to_psycopg(native):
        return False
    shadows = native.__dict__
    if shadows.get("wait").__class__ is PendingAsyncRollback:
        return True  # on its way, and nothing sent since: the pool's reset after a close
    pgconn = native.pgconn
    status = pgconn.transaction_status
    if status == idle:
        return True  # psycopg's own sends nothing either
    if status != in_transaction and status != in_error:  # noqa: PLR1714 - ints, no set built
        return False
    if native.lock.locked() or readable(pgconn.socket):
        # Another task's operation, or the server spoke since the last reply (an error, its
        # goodbye): psycopg's own ROLLBACK, and a lost connection absorbed, as before.
        return False
    pgconn.send_query(b"ROLLBACK")
    # Shadowed before the flush: from here on, the reply is read before any other use.
    shadows["wait"] = PendingAsyncRollback(native, timeout, during, report)
    if pgconn.flush():  # not all sent yet (a full socket buffer): finish it
        try:
            await_(connection_class.wait(native, sys.modules["psycopg"].generators.send(pgconn)))
        except BaseException:
            shadows.pop("wait", None)  # no reply will come: the error says why, as psycopg's
            raise
    return True


class PendingAsyncRollback(DeferredRollback):
    """Stands in for a psycopg async connection's ``wait`` until its ROLLBACK's reply is read."""

    __slots__ = ()

    async def __call__(self, gen: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        """Run psycopg's wait after reading the ROLLBACK's reply: the next use comes here."""
        await self.settle()
        return await type(self._connection).wait(self._connection, gen, *args, **kwargs)

    async def settle(self) -> None:
        """Read the ROLLBACK's reply (psycopg's own rollback, its second half); close on failure."""
        psycopg = sys.modules["psycopg"]
        connection = self._connection
        vars(connection).pop("wait", None)
        wait = type(connection).wait
        try:
            if os.getpid() != self._pid:
                raise psycopg.OperationalError(FORKED)  # noqa: TRY301 - closed below, as any failure
            results = await wait(
                connection, psycopg.generators.fetch_many(connection.pgconn), timeout=self._timeout
            )
            for result in results:
                if result.status == psycopg.pq.ExecStatus.FATAL_ERROR:
                    raise psycopg.errors.error_from_result(result)  # noqa: TRY301
            # As psycopg's rollback(): statements prepared in the transaction are forgotten.
            prepared = connection._prepared  # noqa: SLF001 - psycopg's own second half
            if prepared.clear():
                await wait(connection, prepared.maintain_gen(connection))
        except BaseException as exc:
            self._failed(exc)
            raise

    def _close(self) -> None:
        # libpq's finish, as psycopg's close, no await needed; psycopg then says it broken.
        self._connection.pgconn.finish()
