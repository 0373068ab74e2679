"""A unit's xid read in its first writing statement's flight: its mark without a round trip.

A verified unit's COMMIT needs its transaction's xid (`dropsafe._unit.recording`). Read by a
statement of its own right before the COMMIT (the mark), it costs the unit a round trip: a
one-INSERT unit makes four instead of three (issue 28). The engine wing can read it in the
flight of the first statement that may write instead (`dropsafe._engine.xid_in_flight`, as
for a plain transaction's COMMIT); this module is where the two wings meet without importing
each other: the unit says it wants the read (`UNIT_READS_XID`, set for an attempt's
duration), the engine keeps what it read per transaction (`FlightXid`) and answers the unit's
COMMIT listener through `EngineState.flight_xid`. Where nothing was read (no statement that
may write went through SQLAlchemy, a driver that cannot, a pooler in between, a server life
not known yet), the unit reads its mark as before.
"""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from dropsafe._commit_truth.pending_commit import PendingCommit
    from dropsafe._dbapi import NativeConnection

__all__ = ["UNIT_READS_XID", "FlightXid"]

#: True inside the attempt of a unit of work that verifies its COMMIT: the engines it writes
#: through read each transaction's xid in its first writing statement's flight. Read per
#: statement as a C call (no Python frame), outside units too.
UNIT_READS_XID: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "dropsafe_unit_reads_xid", default=False
)


class FlightXid:
    """One transaction's xid as read in a statement's flight; None until one was read.

    ``xid_wanted``: the next statement that may write reads it (none read yet, or the one read
    was dropped: the server's transaction ended under it). ``native``: the driver connection it
    was read on, whose status says whether that transaction is still open. ``fd``,
    ``count_sent``, ``sent_after``: its socket, how to read the bytes it sent, and what it had
    sent when the last statement through SQLAlchemy was; more sent since is the app's own,
    around SQLAlchemy (a DBAPI ``commit()`` and a raw cursor's write): the read is then dropped.
    ``dropped``: the reads dropped so, kept: the COMMIT's resolution asks about them as well.
    """

    __slots__ = ("count_sent", "dropped", "fd", "native", "pending", "sent_after", "xid_wanted")

    def __init__(self) -> None:
        self.pending: PendingCommit | None = None
        self.dropped: tuple[PendingCommit, ...] = ()
        self.xid_wanted = True
        self.native: NativeConnection | None = None
        self.fd: int | None = None
        self.sent_after: int | None = None
        self.count_sent: Callable[[int], int | None] = _unknown


def _unknown(fd: int) -> int | None:
    """Count nothing: a socket whose bytes sent cannot be read (the read is dropped)."""
    del fd
    return None
