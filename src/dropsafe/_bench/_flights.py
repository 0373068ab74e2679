"""A plaintext proxy that numbers every client flight and fires one fault at flight k.

A *flight* is what a client sends after the server last spoke on that link: a round trip seen
from the wire. Flights are numbered over all links in the order they start, so one healthy run
of a unit of work counts its round trips (connects, resolution and pool resets included), and
a second run can strike the k-th one. The client reaches the proxy without TLS (TLS would hide
the message boundaries the labels and the startup phase are read from; direction changes alone
would still count flights): the explorer starts its server with TLS off.

Flights sent before a link's first ReadyForQuery are *startup* flights (TLS request, startup
packet, SCRAM exchange); the explorer strikes *query* flights only, numbered from 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, final

from dropsafe.testing._proxy import send_rst

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine

__all__ = ["Flight", "FlightProxy", "Strike", "label_of"]

_CHUNK = 65536
_READY_FOR_QUERY = b"Z\x00\x00\x00\x05"
_CALL_TIMEOUT = 30.0
_HANDLERS_END_S = 5.0  # a cut link's handler ends on the loop's next turns

#: When a strike acts: before flight k is forwarded, or once the server's reply to it arrives
#: (the reply is then withheld from the client: the server did it, the client cannot know).
Phase = Literal["before", "after"]
#: What the link does after the action: forward the flight (``pass``), drop it and reset the
#: link after ``hold_s`` (``lost``), reset or close it at once (``rst``, ``fin``).
Then = Literal["pass", "lost", "rst", "fin"]


@dataclass(frozen=True)
class Flight:
    """One client flight: its global number, its link, and what it carried first."""

    number: int
    link: int
    label: str
    startup: bool


@dataclass
class Strike:
    """A fault armed at query flight ``step``: ``action(backend_port)`` runs, then ``then``."""

    step: int
    phase: Phase
    then: Then
    action: Callable[[int], Awaitable[None]] | None = None
    hold_s: float = 1.0
    fired: bool = False
    #: The action started (a reply that never comes never starts an "after" action).
    acting: bool = False
    error: BaseException | None = None
    #: Set once the action has run: a history ends only after its fault did.
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Link:
    number: int
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    upstream_port: int
    startup: bool = True
    last_from_client: bool = False
    withhold_reply: Strike | None = None
    dead: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


_HEADER = 5  # a protocol message's type byte and length


def label_of(data: bytes) -> str:
    """Name a flight by its first protocol message (plaintext only)."""
    if len(data) >= _HEADER and data[:1].isalpha():
        kind = chr(data[0])
        if kind == "Q":
            text = data[_HEADER:].split(b"\x00", 1)[0].decode("utf-8", "replace")
            return "Q " + " ".join(text.split())[:60]
        if kind == "P":
            body = data[_HEADER:].split(b"\x00", 2)
            text = body[1].decode("utf-8", "replace") if len(body) > 1 else ""
            return "P " + " ".join(text.split())[:60]
        return {"X": "terminate", "B": "bind/execute", "S": "sync", "d": "copy data"}.get(
            kind, kind
        )
    return "startup"


def _run_until_stopped(loop: asyncio.AbstractEventLoop) -> None:
    """Run ``loop`` until stopped, then end its tasks: none is left pending when it closes.

    A link's handler still running at close would otherwise be destroyed pending, and its
    coroutine's GeneratorExit reported in whatever test the garbage collector runs next.
    """
    asyncio.set_event_loop(loop)
    loop.run_forever()
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))


@final
class FlightProxy:
    """Forward loopback TCP to ``upstream_port``, number client flights, strike one of them.

    Example::

        with FlightProxy(server.port) as proxy:
            run_unit(proxy.port)
            steps = proxy.query_flights()
    """

    def __init__(self, upstream_port: int, *, upstream_host: str = "127.0.0.1") -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.port = 0
        self.flights: list[Flight] = []
        self.strike: Strike | None = None
        #: While paused, flights are forwarded but neither counted nor struck.
        self.paused = False
        self._links: dict[int, _Link] = {}
        self._link_count = 0
        self._query_count = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None

    def __enter__(self) -> FlightProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Listen on a free loopback port (``.port``) in a background thread."""
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=_run_until_stopped, args=(loop,), name="dropsafe-flight-proxy", daemon=True
        )
        self._thread.start()
        self._call(self._listen())

    def close(self) -> None:
        """Close every link and stop the thread."""
        if self._loop is None or self._thread is None:
            return
        with contextlib.suppress(Exception):
            self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(_CALL_TIMEOUT)
        self._loop.close()
        self._loop = None

    def reset(self, strike: Strike | None = None) -> None:
        """Forget the flights counted so far, cut every link, and arm ``strike`` (or none)."""
        self._call(self._reset(strike))

    def pause(self, *, paused: bool) -> None:
        """Stop or resume counting (an engine's first connect is not part of a history)."""
        self.paused = paused

    def query_flights(self) -> list[Flight]:
        """Return the flights after each link's startup, in order: step k is the k-th."""
        return [flight for flight in self.flights if not flight.startup]

    # -- loop side ---------------------------------------------------------------------------

    def _call(self, coro: Coroutine[object, object, None]) -> None:
        if self._loop is None:
            raise RuntimeError("the flight proxy is not started")
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(_CALL_TIMEOUT)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._reset(None)
        # Let each link's handler see its cut and end: one still pending when the loop stops
        # is cancelled, and Python 3.11's stream callback logs the cancellation as an error.
        handlers = asyncio.all_tasks() - {asyncio.current_task()}
        if handlers:
            await asyncio.wait(handlers, timeout=_HANDLERS_END_S)

    async def _reset(self, strike: Strike | None) -> None:
        for link in list(self._links.values()):
            _cut(link, "fin")
        self._links.clear()
        self.flights = []
        self._query_count = 0
        self.strike = strike

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
        except OSError:
            _abort(writer, "rst")
            return
        self._link_count += 1
        port = int(up_writer.get_extra_info("sockname")[1])
        link = _Link(self._link_count, writer, up_writer, port)
        self._links[link.number] = link
        link.tasks = [
            asyncio.create_task(self._from_client(link, reader)),
            asyncio.create_task(self._from_server(link, up_reader)),
        ]
        try:
            await asyncio.gather(*link.tasks, return_exceptions=True)
        finally:
            self._links.pop(link.number, None)
            _cut(link, "fin")

    async def _from_client(self, link: _Link, reader: asyncio.StreamReader) -> None:
        while not link.dead:
            data = await _read_or_pass_eof(reader, link.upstream)
            if not data:
                return
            if not link.last_from_client:
                link.last_from_client = True
                if not await self._new_flight(link, data):
                    return
            if link.dead:
                return
            link.upstream.write(data)
            with contextlib.suppress(OSError):
                await link.upstream.drain()

    async def _new_flight(self, link: _Link, data: bytes) -> bool:
        """Count a flight and strike it if armed; return whether to forward its data."""
        if self.paused:
            return True
        step = 0
        if not link.startup:
            self._query_count += 1
            step = self._query_count
        self.flights.append(
            Flight(len(self.flights) + 1, link.number, label_of(data), link.startup)
        )
        strike = self.strike
        if strike is None or strike.fired or step != strike.step:
            return True
        strike.fired = True
        if strike.phase == "after":
            link.withhold_reply = strike
            return True
        await self._act(strike, link)
        return await self._then(strike, link)

    async def _from_server(self, link: _Link, reader: asyncio.StreamReader) -> None:
        while not link.dead:
            data = await _read_or_pass_eof(reader, link.client)
            if not data:
                return
            link.last_from_client = False
            if link.startup and _READY_FOR_QUERY in data:
                link.startup = False
            if (strike := link.withhold_reply) is not None:
                link.withhold_reply = None
                await self._act(strike, link)
                if strike.then == "pass":
                    strike.then = "fin"  # a reply withheld is never sent late
                await self._then(strike, link)
                return
            link.client.write(data)
            with contextlib.suppress(OSError):
                await link.client.drain()

    async def _act(self, strike: Strike, link: _Link) -> None:
        strike.acting = True
        try:
            if strike.action is not None:
                await strike.action(link.upstream_port)
        except Exception as exc:  # reported with the history, never lost
            strike.error = exc
        finally:
            strike.done.set()

    async def _then(self, strike: Strike, link: _Link) -> bool:
        if strike.then == "pass":
            return True
        link.dead = True
        if strike.then == "lost":
            # Nothing more crosses this link; after hold_s it ends as a TCP timeout would.
            await asyncio.sleep(strike.hold_s)
            _cut(link, "rst")
        else:
            _cut(link, strike.then)
        return False


async def _read_or_pass_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """Read the next chunk; at its end (or a reset), pass the end on to ``writer`` and give b""."""
    try:
        data = await reader.read(_CHUNK)
    except OSError:
        data = b""
    if not data:
        with contextlib.suppress(OSError):
            writer.write_eof()
    return data


def _cut(link: _Link, mode: Literal["rst", "fin", "lost", "pass"]) -> None:
    link.dead = True
    for writer in (link.client, link.upstream):
        _abort(writer, "rst" if mode == "rst" else "fin")
    for task in link.tasks:
        if task is not asyncio.current_task():
            task.cancel()


def _abort(writer: asyncio.StreamWriter, mode: Literal["rst", "fin"]) -> None:
    if mode == "rst":
        send_rst(writer)
    else:
        writer.close()
