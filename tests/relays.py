"""A relay for asyncpg tests over plain TCP: it passes bytes both ways and holds a closed link.

Shared by tests/drivers/test_asyncpg_goodbye.py and tests/units/test_resolution_meets_a_goodbye.py.
"""

from __future__ import annotations

import asyncio

from sqlalchemy.engine import make_url

__all__ = ["CloseHoldingRelay"]


class CloseHoldingRelay:
    """Passes bytes both ways; when the server closes a link, holds the client's side open.

    Plain TCP (TLS would close with a close_notify record, which is data it cannot hold).
    """

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._release = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Links whose server side has closed (its last bytes passed on to the client).
        self.closed_by_server = 0
        self.port = 0

    async def start(self) -> None:
        """Listen on a free loopback port."""
        self._server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def release(self) -> None:
        """Let the held closes through (before the pool closes its connections gracefully)."""
        self._release.set()

    async def stop(self) -> None:
        """Close every link and stop listening."""
        self.release()
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def route(self, url: str) -> str:
        """The URL through this relay, without TLS."""
        return (
            make_url(url)
            .set(port=self.port)
            .update_query_dict({"ssl": "disable"})
            .render_as_string(hide_password=False)
        )

    async def _link(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        server_r, server_w = await asyncio.open_connection(*self._target)

        async def up() -> None:
            while data := await client_r.read(65536):
                server_w.write(data)
                await server_w.drain()
            server_w.close()

        async def down() -> None:
            while data := await server_r.read(65536):
                client_w.write(data)
                await client_w.drain()
            self.closed_by_server += 1
            await self._release.wait()
            client_w.close()  # the client's reads end, and with them up()

        try:
            await asyncio.gather(up(), down())
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for writer in (client_w, server_w):
                writer.close()
            self._tasks.discard(task)
