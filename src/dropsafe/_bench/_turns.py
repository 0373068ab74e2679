"""Count round trips for real: a loopback relay that watches which way the bytes go.

The commit guard's price is counted in round trips, so they are counted on the wire, not by
reading code: every byte between a pool and its server passes through this relay unchanged (TLS
included), and each time the conversation turns from the server back to the client, one round
trip begins. Used by ``benchmarks/profile_write.py`` and by the tests that pin the write path's
round trips.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from typing import TYPE_CHECKING

import sqlalchemy as sa

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["TurnCounter"]

_CHUNK = 65536


class TurnCounter:
    """A relay to ``upstream``: ``turns`` counts client flights that follow a reply (or open)."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._turns = 0
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept, name="dropsafe-turns", daemon=True)
        self._acceptor.start()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def turns(self) -> int:
        """Round trips begun since the relay opened or since `reset`."""
        with self._lock:
            return self._turns

    def reset(self) -> None:
        with self._lock:
            self._turns = 0

    def route(self, url: str) -> str:
        """Return ``url`` pointed at the relay (the password kept)."""
        parsed = sa.make_url(url).set(host="127.0.0.1", port=self.port)
        return parsed.render_as_string(hide_password=False)

    def close(self) -> None:
        """Stop accepting (relayed connections end when their pool closes them)."""
        self._closed = True
        with contextlib.suppress(OSError):
            # Closing alone would not wake the thread blocked in accept(); shutting down does.
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._acceptor.join(timeout=5.0)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
                server = socket.create_connection(self._upstream)
            except OSError:
                return
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(
                target=self._relay, args=(client, server), name="dropsafe-turns", daemon=True
            ).start()

    def _relay(self, client: socket.socket, server: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(client, selectors.EVENT_READ, server)
        selector.register(server, selectors.EVENT_READ, client)
        last_from_client = False
        try:
            while True:
                for key, _ in selector.select():
                    source = key.fileobj
                    if not isinstance(source, socket.socket):  # pragma: no cover - registered
                        return
                    data = source.recv(_CHUNK)
                    if not data:
                        return
                    from_client = source is client
                    if from_client and not last_from_client:
                        with self._lock:
                            self._turns += 1
                    last_from_client = from_client
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            selector.close()
            client.close()
            server.close()
