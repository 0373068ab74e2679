"""psycopg 3 (sync): a ROLLBACK sent now, its reply read before the connection's next use.

`dropsafe._engine.quiet_rollback` decides when a ROLLBACK may go unawaited (the connection is
checked in right after it: PoolPolicy.defer_checkin_rollback); this module does it on a psycopg
connection, the one driver whose protocol state a library can send a query beneath and whose
every later use passes one shadowable method (``wait``). Why and what it costs:
docs/guarantees.md, "The ROLLBACK that ends a request is not awaited".
"""

from __future__ import annotations

import functools
import os
import sys
from typing import TYPE_CHECKING, Any

from dropsafe._drivers.deferred_rollback import FORKED, DeferredRollback, During
from dropsafe._drivers.sockets import readable

if TYPE_CHECKING:
    from collections.abc import Callable

    from dropsafe._dbapi import DBAPIConnection, NativeConnection

__all__ = ["PendingRollback", "send_rollback", "settle"]


def settle(native: NativeConnection) -> None:
    """Read the reply of a ROLLBACK sent without waiting, if one is due; raise if it failed."""
    shadow = getattr(native, "__dict__", _NOTHING).get("wait")
    if shadow.__class__ is PendingRollback:
        shadow.settle()


_NOTHING: dict[str, object] = {}


@functools.cache
def psycopg_states(name: str) -> tuple[Any, int, int, int]:
    """Psycopg's connection class ``name`` (sync or async), the transaction states: once."""
    import psycopg

    states = psycopg.pq.TransactionStatus
    return getattr(psycopg, name), int(states.IDLE), int(states.INTRANS), int(states.INERROR)


def send_rollback(
    proxied: DBAPIConnection,
    during: During,
    timeout: float,
    report: Callable[[During, BaseException], None],
) -> bool:
    """Send ROLLBACK on a psycopg 3 connection without waiting; False: run psycopg's own.

    What psycopg's own rollback() would refuse or do more of (a transaction() block, two-phase
    commit, pipeline mode) and any state it would not send ROLLBACK in is left to it. This
    runs at every request's end: attribute reads, no lookups by name.
    """
    native: Any = getattr(proxied, "dbapi_connection", proxied)
    connection_class, idle, in_transaction, in_error = psycopg_states("Connection")
    if type(native) is not connection_class or _left_to_psycopg(native):
        return False
    shadows = native.__dict__
    if shadows.get("wait").__class__ is PendingRollback:
        # A ROLLBACK is on its way and nothing was sent since (anything would have read its
        # reply first): the transaction is ending already, as the pool's reset after a
        # Session's close finds it.
        return True
    pgconn = native.pgconn
    status = pgconn.transaction_status
    if status == idle:
        return True  # psycopg's own sends nothing either
    if status != in_transaction and status != in_error:  # noqa: PLR1714 - ints, no set built
        return False
    if readable(pgconn.socket):
        # The server spoke since the last reply (an error, its goodbye, a notice): psycopg's
        # own ROLLBACK reads it now, and a lost connection is absorbed here, as before.
        return False
    pgconn.send_query(b"ROLLBACK")
    # Shadowed before the flush: from here on, the reply is read before any other use.
    shadows["wait"] = PendingRollback(native, timeout, during, report)
    if pgconn.flush():  # not all sent yet (a nonblocking socket that is full): finish it
        try:
            connection_class.wait(native, sys.modules["psycopg"].generators.send(pgconn))
        except BaseException:
            shadows.pop("wait", None)  # no reply will come: the error says why, as psycopg's
            raise
    return True


def _left_to_psycopg(native: Any) -> bool:  # noqa: ANN401 - a psycopg Connection
    """Whether psycopg's own rollback() must run: a transaction() block, 2PC, pipeline mode."""
    try:  # psycopg's own state (3.1 to 3.3): a version without it keeps psycopg's rollback
        return bool(native._num_transactions or native._tpc or native._pipeline)  # noqa: SLF001
    except AttributeError:
        return True


class PendingRollback(DeferredRollback):
    """Stands in for a psycopg connection's ``wait`` until its ROLLBACK's reply is read."""

    __slots__ = ()

    def __call__(self, gen: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - psycopg's
        """Run psycopg's wait after reading the ROLLBACK's reply: the next use comes here."""
        self.settle()
        return type(self._connection).wait(self._connection, gen, *args, **kwargs)

    def settle(self) -> None:
        """Read the ROLLBACK's reply (psycopg's own rollback, its second half); close on failure."""
        psycopg = sys.modules["psycopg"]
        connection = self._connection
        vars(connection).pop("wait", None)
        try:
            if os.getpid() != self._pid:
                raise psycopg.OperationalError(FORKED)  # noqa: TRY301 - closed below, as any failure
            results = type(connection).wait(
                connection, psycopg.generators.fetch_many(connection.pgconn), timeout=self._timeout
            )
            for result in results:
                if result.status == psycopg.pq.ExecStatus.FATAL_ERROR:
                    raise psycopg.errors.error_from_result(result)  # noqa: TRY301
            # As psycopg's rollback(): statements prepared in the transaction are forgotten.
            prepared = connection._prepared  # noqa: SLF001 - psycopg's own second half
            if prepared.clear():
                type(connection).wait(connection, prepared.maintain_gen(connection))
        except BaseException as exc:
            self._failed(exc)
            raise

    def _close(self) -> None:
        # psycopg's close (in a forked child the pool closes it anyway when it replaces it).
        self._connection.close()
