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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar, overload

from sqlalchemy.engine import URL, make_url

from dropsafe._errors import ConfigurationError
from dropsafe.testing._runtime import Service

if TYPE_CHECKING:
    from collections.abc import Coroutine


__all__ = ["ChaosProxy", "CutMode", "ProxyStats"]

CutMode = Literal["fin", "rst"]
_T = TypeVar("_T")
_CHUNK = 65536
_CALL_TIMEOUT = 30.0
_THREAD_PREFIX = "dropsafe-chaos-proxy"


@dataclass(frozen=True)
class ProxyStats:
    """Counters since the proxy started; ``connections_open`` is the only gauge."""

    connections_total: int
    connections_open: int
    bytes_to_server: int
    bytes_to_client: int


@dataclass
class _Faults:
    latency_s: float = 0.0
    jitter_s: float = 0.0
    bandwidth_bps: float | None = None
    die_after: int | None = None


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
    force (``cut`` returns once the sockets are closed). The proxy listens on loopback unless
    told otherwise.
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
        if not 0 < upstream_port < 65536:  # noqa: PLR2004
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
        self._random = random.Random(seed)  # noqa: S311 - jitter, not cryptography
        self._faults = _Faults()
        self._links: set[_Link] = set()
        self._connections_total = 0
        self._bytes_to_server = 0
        self._bytes_to_client = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start listening; ``.port`` is set when this returns."""
        if self._thread is not None:
            return
        loop = asyncio.new_event_loop()
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
            self._call(self._shutdown())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=_CALL_TIMEOUT)
        loop.close()
        self._loop = None
        self._thread = None

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
        self._faults.latency_s = ms / 1000
        self._faults.jitter_s = jitter_ms / 1000

    def bandwidth(self, kbps: float) -> None:
        """Limit each direction of each connection to ``kbps`` kilobits per second."""
        if kbps <= 0:
            raise ConfigurationError(f"kbps must be > 0: {kbps!r}")
        self._faults.bandwidth_bps = kbps * 1000

    def cut(self, mode: CutMode = "fin") -> int:
        """Close every open connection on both sides with FIN or RST; return how many."""
        if mode not in ("fin", "rst"):
            raise ConfigurationError(f"cut mode must be 'fin' or 'rst': {mode!r}")
        return self._call(self._cut_all(mode))

    def blackhole(self) -> None:
        """Forward nothing, in either direction, keeping every socket open, until `heal`."""
        self._call(self._set_flowing(flowing=False))

    def refuse(self) -> None:
        """Stop listening, so new connections are refused (open ones are kept)."""
        self._call(self._stop_listening())

    def die_after(self, nbytes: int) -> None:
        """Reset each connection, open or new, once it has carried ``nbytes`` more bytes."""
        if nbytes < 0:
            raise ConfigurationError(f"nbytes must be >= 0: {nbytes!r}")
        self._call(self._set_budget(nbytes))

    def heal(self) -> None:
        """Remove every fault: data flows again (held data included) and new connections work."""
        self._call(self._heal())

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

    async def _listen(self) -> None:
        if self._flowing is None:
            self._flowing = asyncio.Event()
            self._flowing.set()
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _set_flowing(self, *, flowing: bool) -> None:
        assert self._flowing is not None  # noqa: S101 - set by _listen
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _set_budget(self, nbytes: int) -> None:
        self._faults.die_after = nbytes
        for link in self._links:
            link.budget = nbytes

    async def _heal(self) -> None:
        self._faults = _Faults()
        for link in self._links:
            link.budget = None
        await self._set_flowing(flowing=True)
        if self._server is None:
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
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        delivery = asyncio.create_task(self._deliver(link, queue, writer, to_server=to_server))
        last_due = 0.0
        try:
            while True:
                try:
                    data = await reader.read(_CHUNK)
                except OSError:
                    data = b""
                delay = self._faults.latency_s
                if self._faults.jitter_s:
                    delay += self._random.uniform(-self._faults.jitter_s, self._faults.jitter_s)
                # Later chunks never overtake earlier ones, whatever the jitter.
                last_due = max(last_due, time.monotonic() + delay)
                queue.put_nowait((last_due, data))
                if not data:
                    break
            await delivery
        finally:
            delivery.cancel()

    async def _deliver(
        self,
        link: _Link,
        queue: asyncio.Queue[tuple[float, bytes]],
        writer: asyncio.StreamWriter,
        *,
        to_server: bool,
    ) -> None:
        assert self._flowing is not None  # noqa: S101 - set by _listen
        while True:
            due, data = await queue.get()
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
                await self._write_paced(writer, data, to_server=to_server)
            except OSError:
                return

    async def _write_paced(
        self, writer: asyncio.StreamWriter, data: bytes, *, to_server: bool
    ) -> None:
        """Write ``data``, no faster than the bandwidth limit allows (in slices of ~20 ms)."""
        bps = self._faults.bandwidth_bps
        step = max(1, int(bps / 8 / 50)) if bps else len(data)
        for start in range(0, len(data), step):
            piece = data[start : start + step]
            if bps:
                await asyncio.sleep(len(piece) * 8 / bps)
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
