"""asyncpg: the question that resolves a lost COMMIT meets the server's goodbye.

Seen under load in test_pgbouncer's asyncpg ledger (1 of 2 full runs, 2 of 29 runs of its
file alone): a COMMIT cut in flight was resolved as unknown, "asking the server failed:
InternalClientError: cannot switch to state 12; another operation (2) is in progress", with no
fault that loses WAL. The server (or PgBouncer)
had said FATAL to the resolution's fresh connection between the reply to its question's
prepare and its bind: asyncpg read the goodbye with no operation running, its protocol waits
for a ReadyForQuery that never comes, and the bind fails with a client error that is not
classified as a lost connection, so the resolution gave up at once instead of asking again on
another connection. The question was never sent: asking again is safe. asyncpg's "another
operation (2) is in progress" (its error-consuming state) now reads as a lost connection.

Here a relay makes that moment every time: it cuts the link right after the unit's COMMIT
has passed (the server commits; the client loses the reply), then, on the resolution's
connection, passes on the reply to the question's prepare followed by a FATAL, and holds the
link open (a real close arrives a moment later; held, the window is the test's).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa

import dropsafe
from dropsafe.events import CommitResolved
from relays import CloseHoldingRelay

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

pytest.importorskip("asyncpg")

pytestmark = [pytest.mark.fault, pytest.mark.timeout(60)]

_QUESTION = b"pg_control_system"  # in the resolution's first question (server_sql.SERVER_LIFE_SQL)
_FIELDS = b"SFATAL\0VFATAL\0C57P01\0Mterminating connection due to administrator command\0\0"
_GOODBYE = b"E" + (4 + len(_FIELDS)).to_bytes(4, "big") + _FIELDS


class _Relay(CloseHoldingRelay):
    """Cuts after one COMMIT, then says goodbye on one question's link (and holds it)."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.commit_cut = False
        self.goodbyes = 0

    async def _link(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        server_r, server_w = await asyncio.open_connection(*self._target)
        asked = asyncio.Event()  # this link's client sent the question's prepare

        async def up() -> None:
            while data := await client_r.read(65536):
                server_w.write(data)
                await server_w.drain()
                if self.commit_cut and self.goodbyes == 0 and _QUESTION in data:
                    asked.set()
                if not self.commit_cut and data.startswith(b"Q") and b"COMMIT" in data:
                    self.commit_cut = True  # passed on whole: the server commits
                    raise ConnectionResetError

        async def down() -> None:
            pending = b""
            while data := await server_r.read(65536):
                if not asked.is_set():
                    client_w.write(data)
                    await client_w.drain()
                    continue
                pending += data
                while len(pending) >= 5 and len(pending) >= 1 + int.from_bytes(pending[1:5], "big"):
                    end = 1 + int.from_bytes(pending[1:5], "big")
                    message, pending = pending[:end], pending[end:]
                    client_w.write(message)
                    if message[:1] == b"T":  # the prepare's reply is complete: now, goodbye
                        client_w.write(_GOODBYE)
                        await client_w.drain()
                        self.goodbyes += 1
                        await self._release.wait()
                        return
                await client_w.drain()

        directions = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
        try:
            await asyncio.wait(directions, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for direction in directions:
                direction.cancel()
            await asyncio.gather(*directions, return_exceptions=True)
            for writer in (client_w, server_w):
                writer.close()
            self._tasks.discard(task)


@contextlib.asynccontextmanager
async def _relayed(server: object) -> AsyncIterator[_Relay]:
    relay = _Relay(server.host, server.port)  # type: ignore[attr-defined]
    await relay.start()
    try:
        yield relay
    finally:
        await relay.stop()


async def test_a_goodbye_to_the_resolutions_question_is_asked_again(shared_server):
    shared_server.execute("CREATE TABLE IF NOT EXISTS goodbye_ledger (v int)")
    events: list[object] = []
    async with _relayed(shared_server) as relay:
        engine = dropsafe.create_async_engine(
            relay.route(shared_server.url("asyncpg")),
            policy=dropsafe.Policy(hooks=(events.append,)),
        )

        async def unit(connection: object) -> None:
            await connection.execute(sa.text("INSERT INTO goodbye_ledger VALUES (1)"))  # type: ignore[attr-defined]

        try:
            await dropsafe.run_transaction_async(engine, unit)
        finally:
            await engine.dispose()
        assert relay.commit_cut
        assert relay.goodbyes == 1
    outcomes = [event.outcome for event in events if isinstance(event, CommitResolved)]
    assert outcomes == ["committed"], outcomes
    assert shared_server.execute("SELECT count(*) FROM goodbye_ledger") == [("1",)]
