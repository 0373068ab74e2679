"""A broken stream where the xid question's replies are due ends the connection, never asyncpg.

asyncpg's parser loops forever in C on a message whose type byte is zero
(``ReadBuffer.finish_message`` returns early for it and ``take_message`` hands it out again):
the event loop is stuck, no timeout fires, the process spins. PgBouncer 1.18 was seen sending
such bytes (16 KB of its heap after a SASL reply, then "failed to send welcome message"). A
real server here, behind a relay on loopback that zeroes the type byte of one of the replies to
dropsafe's question, in the reply to the write that carries it: the watch must end the
connection (the statement fails as on a cut, the pool discards the connection) and hand asyncpg
none of it. On dropsafe before this, the zeroed reply was handed to asyncpg, which spun.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import sys
import time
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

pytest.importorskip("asyncpg")

pytestmark = [pytest.mark.fault, pytest.mark.timeout(60)]

APP_TIMEOUT = 30.0
WRITE = "UPDATE broken SET v = $1 WHERE id = 1 RETURNING id, v"
#: The start of the question's Parse (the unnamed statement, a SELECT): its write is dropsafe's.
QUESTION = b"\x00SELECT "


class ZeroingRelay:
    """Relays a client to the server; zeroes one message's type byte in one reply.

    ``arm(n)``: in the server's reply to the next write that carries the question, the ``n``th
    message (0: ParseComplete, 1: BindComplete, 2: the DataRow, 3: CommandComplete) gets type 0.
    """

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._index: int | None = None
        self._question_sent = False
        self.zeroed = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._server is not None:
            await self._server.wait_closed()

    def arm(self, index: int) -> None:
        self._index = index
        self._question_sent = False

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        pumps = [
            asyncio.ensure_future(self._pump(reader, upstream_writer, up=True)),
            asyncio.ensure_future(self._pump(upstream_reader, writer, up=False)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            for stream in (writer, upstream_writer):
                stream.transport.abort()
            self._tasks.difference_update(pumps)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool
    ) -> None:
        while chunk := await reader.read(65536):
            if up and self._index is not None and chunk[:1] == b"P" and chunk[5:13] == QUESTION:
                self._question_sent = True
            elif not up and self._question_sent and self._index is not None:
                chunk = self._zero(chunk, self._index)
                self._index = None
            writer.write(chunk)
            await writer.drain()

    def _zero(self, chunk: bytes, index: int) -> bytes:
        at = 0
        for _ in range(index):
            at += 1 + struct.unpack("!i", chunk[at + 1 : at + 5])[0]
        assert at < len(chunk), "the replies came in more than one read: the relay cannot aim"
        self.zeroed += 1
        return chunk[:at] + b"\x00" + chunk[at + 1 :]


@pytest.fixture
async def relay(shared_server: Any) -> AsyncIterator[tuple[ZeroingRelay, str]]:
    """The relay in front of the module's database, whose one row the app updates."""
    server = shared_server
    server.execute(
        "CREATE TABLE IF NOT EXISTS broken (id int PRIMARY KEY, v text); "
        "INSERT INTO broken VALUES (1, 'a') ON CONFLICT DO NOTHING"
    )
    relay = ZeroingRelay(server.host, server.port)
    host, port = await relay.start()
    # Plain TCP: the relay reads the messages (TLS would end at the server).
    url = sa.make_url(server.url("asyncpg", ssl="disable")).set(host=host, port=port)
    try:
        yield relay, url.render_as_string(hide_password=False)
    finally:
        await relay.close()


#: The app's side, in a process of its own: a regression spins in C holding the GIL, where no
#: timeout of the test's process (signal or thread) could end it; this one is killed.
APP = """
import asyncio, sys
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from asyncpg_sending import send_statement
from dropsafe._drivers.asyncpg import _goodbye_watch

WRITE = sys.argv[2]


def send(sync_connection, value):
    sync_connection.begin()
    cursor, reading = send_statement(sync_connection, WRITE, (value,), read=True)
    return [tuple(row) for row in cursor.fetchall()], reading


async def main():
    engine = create_async_engine(sys.argv[1], pool_size=1, max_overflow=0)
    try:
        async with engine.connect() as connection:
            await connection.exec_driver_sql(WRITE, ("warm",))  # prepared: one flight
            await connection.rollback()
            raw = await connection.get_raw_connection()
            native = raw.driver_connection
            print("sending", flush=True)
            try:
                await asyncio.wait_for(connection.run_sync(lambda c: send(c, "z")), 10)
            except engine.dialect.loaded_dbapi.Error as error:
                watch = _goodbye_watch(native)
                print("raised", type(error.__cause__).__name__, flush=True)
                print("disconnect", engine.dialect.is_disconnect(error, raw.dbapi_connection, None))
                print("closed", native.is_closed(), watch is None or watch.broken)
                await connection.invalidate()
            else:
                print("no error")
        async with engine.connect() as connection:
            rows, reading = await connection.run_sync(lambda c: send(c, "after"))
            print("after", rows, reading is not None)
            await connection.rollback()
    finally:
        await engine.dispose()


asyncio.run(main())
"""


@pytest.mark.parametrize("index", [0, 1, 2, 3], ids=["Parse", "Bind", "row", "tag"])
async def test_a_zeroed_reply_to_the_question_ends_the_connection(
    relay: tuple[ZeroingRelay, str], index: int
) -> None:
    proxy, url = relay
    proxy.arm(index)  # zeroes only in the reply to the question's write: the app's first
    app = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        APP,
        url,
        WRITE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert app.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + APP_TIMEOUT
    try:
        while line := await asyncio.wait_for(app.stdout.readline(), deadline - time.monotonic()):
            lines.append(line.decode().rstrip("\n"))
        await asyncio.wait_for(app.wait(), deadline - time.monotonic())
    except asyncio.TimeoutError:
        app.kill()
        await app.wait()
        pytest.fail(f"the app's process hung (asyncpg's parser spinning?) after {lines}")
    assert app.returncode == 0, lines
    assert proxy.zeroed == 1
    # What a cut connection raises: a disconnect, for SQLAlchemy and for dropsafe; the pool
    # made a new connection, whose statement and read work.
    assert lines == [
        "sending",
        "raised ConnectionDoesNotExistError",
        "disconnect True",
        "closed True True",
        "after [(1, 'after')] True",
    ]
