"""A fault-injecting TCP proxy: asyncio in a background thread, driven from sync or async code."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import socket
import struct
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal, TypeVar, overload

from sqlalchemy.engine import URL, make_url

from dropsafe._errors import ConfigurationError
from dropsafe.testing._runtime import PortHolds, Service

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine


__all__ = ["ChaosProxy", "CutMode", "ProxyStats"]

CutMode = Literal["fin", "rst"]
_T = TypeVar("_T")
_CHUNK = 65536
_PORT_LIMIT = 65536  # ports are 1..65535
# What one direction of one link may hold (blackholed, delayed or paced) before the proxy stops
# reading from the sender: then the sender's socket fills and its writes block, as on a real
# congested path, and the proxy's memory stays bounded whatever the sender pushes.
_HELD_LIMIT = 16 * _CHUNK
# Pacing catches up a lag this long (a late wake-up, a slow write) with a burst; a longer lag
# means the proxy itself is the bottleneck, and the schedule restarts from now.
_PACING_SLACK_S = 0.05
_CALL_TIMEOUT = 30.0
_THREAD_PREFIX = "dropsafe-chaos-proxy"


@dataclass(frozen=True)
class ProxyStats:
    """Counters since the proxy started; ``connections_open`` is the only gauge."""

    connections_total: int
    connections_open: int
    bytes_to_server: int
    bytes_to_client: int


@dataclass(frozen=True)
class _Faults:
    latency_s: float = 0.0
    jitter_s: float = 0.0
    bandwidth_bps: float | None = None
    die_after: int | None = None


class _Pipe:
    """One direction of a link: chunks in order, each with the time it is due, bounded in bytes.

    One producer (the pump reading the sender) and one consumer (the delivery writing the
    receiver), both on the proxy's loop.
    """

    def __init__(self) -> None:
        self._items: deque[tuple[float, bytes]] = deque()
        self._held = 0
        self._changed = asyncio.Event()

    async def put(self, due: float, data: bytes) -> None:
        """Add a chunk, first waiting while the pipe holds its limit (the backpressure)."""
        while self._held >= _HELD_LIMIT:
            self._changed.clear()
            await self._changed.wait()
        self._items.append((due, data))
        self._held += len(data)
        self._changed.set()

    async def get(self) -> tuple[float, bytes]:
        """Take the oldest chunk, waiting for one."""
        while not self._items:
            self._changed.clear()
            await self._changed.wait()
        due, data = self._items.popleft()
        self._held -= len(data)
        self._changed.set()
        return due, data


class _Pacer:
    """An absolute send schedule for one direction, so that the rate holds at high targets.

    Sleeping per slice loses the time spent writing and every late wake-up (the proxy reached
    45% of 1 Gbit/s that way); a schedule of when each byte may leave makes that time up.
    """

    def __init__(self) -> None:
        self.clock: float | None = None

    def next_slot(self, nbytes: int, bps: float) -> float:
        """Return when ``nbytes`` more may have left, and book them."""
        now = time.monotonic()
        start = now if self.clock is None or self.clock < now - _PACING_SLACK_S else self.clock
        self.clock = start + nbytes * 8 / bps
        return self.clock


class _Link:
    """One proxied connection: a client socket and its upstream socket."""

    def __init__(
        self,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        budget: int | None,
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.budget = budget
        self.tasks: list[asyncio.Task[None]] = []

    def abort(self, mode: CutMode) -> None:
        for _, writer in (self.client, self.upstream):
            _abort(writer, mode)
        for task in self.tasks:
            task.cancel()

    async def wait_closed(self) -> None:
        for _, writer in (self.client, self.upstream):
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class ChaosProxy(Service):
    """A TCP proxy in front of a server, whose faults tests switch on and off.

    Example::

        with ChaosProxy("127.0.0.1", server.port) as proxy:
            engine = create_engine(proxy.route(server.url()))
            ...
            proxy.cut("rst")      # every open connection is reset
            proxy.heal()

    Methods may be called from any thread or event loop; each returns once the fault is in
    force (``cut`` returns once the sockets are closed), and calls take effect one at a time,
    in the order they reach the proxy. A sender that pushes into a blackholed or slow link is
    held back (its socket fills), so the proxy's memory stays bounded. The proxy listens on
    loopback unless told otherwise.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        seed: int | None = None,
    ) -> None:
        if not 0 < upstream_port < _PORT_LIMIT:
            raise ConfigurationError(f"upstream_port must be within 1..65535: {upstream_port!r}")
        if not _is_loopback(listen_host):
            warnings.warn(
                f"ChaosProxy listens on {listen_host}, which is not a loopback address: "
                "other machines can reach it",
                stacklevel=2,
            )
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.host = listen_host
        self.port = listen_port
        self._random = random.Random(seed)  # jitter, not cryptography
        self._faults = _Faults()
        self._links: set[_Link] = set()
        self._connections_total = 0
        self._bytes_to_server = 0
        self._bytes_to_client = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        # Set while data flows: cleared by blackhole(), set again by heal().
        self._flowing = asyncio.Event()
        self._flowing.set()
        # Controls run one at a time on the loop: heal() awaits while it listens again, and a
        # refuse() that ran during that await would find no listener to close.
        self._control = asyncio.Lock()
        self._closing = False
        # The listening port stays ours while the proxy lives, refused phases included.
        self._ports: PortHolds | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start listening; ``.port`` is set when this returns."""
        if self._thread is not None:
            return
        self._ports = PortHolds(self.host)
        self.port = self._ports.take(self.port)
        loop = asyncio.new_event_loop()
        self._control = asyncio.Lock()  # used on this loop only
        self._closing = False
        ready = threading.Event()
        self._loop = loop
        self._thread = threading.Thread(
            target=self._run_loop, args=(loop, ready), name=f"{_THREAD_PREFIX}", daemon=True
        )
        self._thread.start()
        ready.wait()
        self._call(self._listen())
        self._thread.name = f"{_THREAD_PREFIX}:{self.port}"

    def close(self) -> None:
        """Close every connection and the listener, and stop the thread; safe to call twice."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):
            self._call(self._controlled(self._shutdown))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=_CALL_TIMEOUT)
        loop.close()
        self._loop = None
        self._thread = None
        if self._ports is not None:
            self._ports.close()

    @property
    def stats(self) -> ProxyStats:
        """A snapshot of the counters."""
        return ProxyStats(
            connections_total=self._connections_total,
            connections_open=len(self._links),
            bytes_to_server=self._bytes_to_server,
            bytes_to_client=self._bytes_to_client,
        )

    @overload
    def route(self, url: str) -> str: ...
    @overload
    def route(self, url: URL) -> URL: ...
    def route(self, url: str | URL) -> str | URL:
        """Return ``url`` pointed at this proxy, in the form it was given."""
        parsed = make_url(url)
        host = f"[{self.host}]" if ":" in self.host and isinstance(url, str) else self.host
        rerouted = parsed.set(host=host, port=self.port)
        if isinstance(url, str):
            return rerouted.render_as_string(hide_password=False)
        return rerouted

    # -- faults ----------------------------------------------------------------------------

    def latency(self, ms: float, jitter_ms: float = 0.0) -> None:
        """Delay every chunk by ``ms`` (plus or minus up to ``jitter_ms``) in each direction."""
        if ms < 0 or jitter_ms < 0 or jitter_ms > ms:
            raise ConfigurationError(
                f"need 0 <= jitter_ms <= ms: ms={ms!r} jitter_ms={jitter_ms!r}"
            )
        self._change_faults(lambda f: replace(f, latency_s=ms / 1000, jitter_s=jitter_ms / 1000))

    def bandwidth(self, kbps: float) -> None:
        """Limit each direction of each connection to ``kbps`` kilobits per second.

        Paced on an absolute schedule: measured by benchmarks/proxy_bandwidth.py on 2 loaded
        cores, within 1% of the target from 10 Mbit/s to 2 Gbit/s, 96% at 4 Gbit/s; one
        connection through the proxy tops out at about 4.5 Gbit/s unlimited. With `latency`
        set, a direction also carries at most 1 MiB per latency period (what it may hold).
        """
        if kbps <= 0:
            raise ConfigurationError(f"kbps must be > 0: {kbps!r}")
        self._change_faults(lambda f: replace(f, bandwidth_bps=kbps * 1000))

    def cut(self, mode: CutMode = "fin") -> int:
        """Close every open connection on both sides with FIN or RST; return how many."""
        if mode not in ("fin", "rst"):
            raise ConfigurationError(f"cut mode must be 'fin' or 'rst': {mode!r}")
        return self._call(self._controlled(lambda: self._cut_all(mode)))

    def blackhole(self) -> None:
        """Forward nothing, in either direction, keeping every socket open, until `heal`."""
        self._call(self._controlled(lambda: self._set_flowing(flowing=False)))

    def refuse(self) -> None:
        """Stop listening, so new connections are refused (open ones are kept)."""
        self._call(self._controlled(self._stop_listening))

    def die_after(self, nbytes: int) -> None:
        """Reset each connection, open or new, once it has carried ``nbytes`` more bytes."""
        if nbytes < 0:
            raise ConfigurationError(f"nbytes must be >= 0: {nbytes!r}")
        self._call(self._controlled(lambda: self._set_budget(nbytes)))

    def heal(self) -> None:
        """Remove every fault: data flows again (held data included) and new connections work."""
        self._call(self._controlled(self._heal))

    # -- loop side -------------------------------------------------------------------------

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        loop.run_forever()
        # Let cancelled tasks finish before the loop closes.
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))

    def _call(self, coro: Coroutine[object, object, _T]) -> _T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("the proxy is not running")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout=_CALL_TIMEOUT)

    async def _controlled(self, action: Callable[[], Awaitable[_T]]) -> _T:
        async with self._control:
            return await action()

    def _change_faults(self, change: Callable[[_Faults], _Faults]) -> None:
        if self._loop is None:
            self._faults = change(self._faults)  # not started: no loop thread to race with
        else:
            self._call(self._set_faults(change))

    async def _set_faults(self, change: Callable[[_Faults], _Faults]) -> None:
        async with self._control:
            # Replaced whole, never edited: a pump reads one consistent set of faults.
            self._faults = change(self._faults)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _set_flowing(self, *, flowing: bool) -> None:
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _set_budget(self, nbytes: int) -> None:
        self._faults = replace(self._faults, die_after=nbytes)
        for link in self._links:
            link.budget = nbytes

    async def _heal(self) -> None:
        self._faults = _Faults()
        for link in self._links:
            link.budget = None
        await self._set_flowing(flowing=True)
        if self._server is None and not self._closing:
            await self._listen()

    async def _cut_all(self, mode: CutMode) -> int:
        links = list(self._links)
        for link in links:
            link.abort(mode)
        for link in links:
            await link.wait_closed()
            self._links.discard(link)
        return len(links)

    async def _shutdown(self) -> None:
        self._closing = True
        await self._stop_listening()
        await self._cut_all("fin")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections_total += 1
        try:
            upstream = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        except OSError:
            # The upstream refused: the client sees its connection reset, as it would directly.
            _abort(writer, "rst")
            return
        except BaseException:
            _abort(writer, "fin")  # shutting down while connecting upstream
            raise
        link = _Link((reader, writer), upstream, self._faults.die_after)
        self._links.add(link)
        try:
            link.tasks = [
                asyncio.create_task(self._pump(link, reader, upstream[1], to_server=True)),
                asyncio.create_task(self._pump(link, upstream[0], writer, to_server=False)),
            ]
            await asyncio.gather(*link.tasks, return_exceptions=True)
        finally:
            # However this ends (also cancelled at shutdown), no socket outlives the link.
            if link in self._links:
                self._links.discard(link)
                link.abort("fin")

    async def _pump(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        to_server: bool,
    ) -> None:
        pipe = _Pipe()
        delivery = asyncio.create_task(self._deliver(link, pipe, writer, to_server=to_server))
        last_due = 0.0
        try:
            while True:
                try:
                    data = await reader.read(_CHUNK)
                except OSError:
                    data = b""
                faults = self._faults
                delay = faults.latency_s
                if faults.jitter_s:
                    delay += self._random.uniform(-faults.jitter_s, faults.jitter_s)
                # Later chunks never overtake earlier ones, whatever the jitter.
                last_due = max(last_due, time.monotonic() + delay)
                await pipe.put(last_due, data)
                if not data:
                    break
            await delivery
        finally:
            delivery.cancel()

    async def _deliver(
        self,
        link: _Link,
        pipe: _Pipe,
        writer: asyncio.StreamWriter,
        *,
        to_server: bool,
    ) -> None:
        pacer = _Pacer()
        while True:
            due, data = await pipe.get()
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            await self._flowing.wait()
            if not data:
                if writer.can_write_eof():
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                return
            if link.budget is not None and len(data) >= link.budget:
                # Counted before forwarding: whoever sees the bytes must see them counted.
                self._count(link.budget, to_server=to_server)
                writer.write(data[: link.budget])
                with contextlib.suppress(OSError):
                    await writer.drain()
                link.abort("rst")
                return
            if link.budget is not None:
                link.budget -= len(data)
            try:
                await self._write_paced(writer, data, pacer, to_server=to_server)
            except OSError:
                return

    async def _write_paced(
        self, writer: asyncio.StreamWriter, data: bytes, pacer: _Pacer, *, to_server: bool
    ) -> None:
        """Write ``data``, no faster than the bandwidth limit allows (in slices of ~20 ms)."""
        bps = self._faults.bandwidth_bps
        step = max(1, int(bps / 8 / 50)) if bps else len(data)
        for start in range(0, len(data), step):
            piece = data[start : start + step]
            if bps and (wait := pacer.next_slot(len(piece), bps) - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            # Counted before forwarding: the peer may read them (and a test read the
            # counters) before this thread runs again.
            self._count(len(piece), to_server=to_server)
            writer.write(piece)
            await writer.drain()

    def _count(self, nbytes: int, *, to_server: bool) -> None:
        if to_server:
            self._bytes_to_server += nbytes
        else:
            self._bytes_to_client += nbytes


def _abort(writer: asyncio.StreamWriter, mode: CutMode) -> None:
    if mode == "rst":
        send_rst(writer)
    else:
        writer.transport.abort()


def send_rst(writer: asyncio.StreamWriter) -> None:
    """Close ``writer``'s connection at once with a RST (the flight proxy cuts links so too)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        # A zero linger makes close() send RST instead of FIN.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
