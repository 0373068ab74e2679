"""Verdicts on statement texts, kept by text: each text is judged once.

An app sends few distinct texts, and a search per statement costs a microsecond where a
dictionary read costs tens of nanoseconds. Bounded in entries (texts with literals inlined
would grow it without end: emptied when full) and in the length of a text kept (a bulk
INSERT's megabytes are judged each time rather than held). Used by the session-state proof
(`dropsafe._engine.session_state.may_change_session`) and the notification check
(`dropsafe._commit_truth.pending_commit.may_notify`).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["MAX_KEPT_LENGTH", "MAX_VERDICTS", "kept_by_text"]

MAX_VERDICTS = 4096
MAX_KEPT_LENGTH = 8192


def kept_by_text(
    verdicts: dict[str, bool],
) -> Callable[[Callable[[str], bool]], Callable[[str], bool]]:
    """Decorate a judge of statement texts: its verdicts kept in ``verdicts``, bounded.

    The judge runs only for a text not kept (otherwise a dictionary read, no call more);
    ``verdicts`` is the caller's, which may read it first itself.
    """

    def decorate(judge: Callable[[str], bool]) -> Callable[[str], bool]:
        @functools.wraps(judge)
        def verdict(statement: str) -> bool:
            found = verdicts.get(statement)
            if found is None:
                found = judge(statement)
                if len(statement) > MAX_KEPT_LENGTH:
                    return found
                if len(verdicts) >= MAX_VERDICTS:
                    verdicts.clear()
                verdicts[statement] = found
            return found

        return verdict

    return decorate
