"""Looking at a driver's socket without a round trip: a zero-timeout poll, and TCP_INFO's counts.

Shared by every driver file; the socket itself is each driver's business (`Driver.socket_fd`).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import select
import socket
import struct
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

from dropsafe._drivers.base import Health
from dropsafe._process import unpatched

if TYPE_CHECKING:
    from collections.abc import Callable

    from dropsafe._drivers.base import DBAPIConnection, Driver

__all__ = [
    "TCP_COUNTS_AT",
    "HasFileno",
    "SentBytes",
    "SocketPoll",
    "borrow_socket",
    "poll",
    "readable",
    "socket_fd_of",
    "tcp_bytes_sent",
    "unpack_counts",
]

# Readable means data or EOF waits; the others mean the peer hung up or the socket failed.
# The interpreter's own poll, whichever import order: gevent's (after ``monkey.patch_all()``)
# never reports a hang-up, so every dead idle connection would cost a ping; eventlet's has none.
_real_poll = unpatched("select", "poll")
_POLL_DEAD = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)
_POLL_MASK = select.POLLIN | _POLL_DEAD


class _PollFd(ctypes.Structure):
    """struct pollfd (poll.h): one descriptor, the events asked, the events seen."""

    _fields_ = (("fd", ctypes.c_int), ("events", ctypes.c_short), ("revents", ctypes.c_short))


def _poll_keeping_the_gil() -> Callable[[Any, int, int], int] | None:
    """Return libc's poll(2) called with the GIL held (ctypes.PyDLL); None where it is absent.

    A zero-timeout poll cannot block, yet ``select.poll().poll(0)`` gives the GIL up around
    it (as every call that may block does): where other threads wait for the GIL (a pool's
    other requests), the thread that looks then waits for its turn again at every checkout,
    a context switch and about 50-90 us of CPU a request at 4 threads
    (tests/drivers/test_socket_poll.py; benchmarks/unit_throughput.py). The real poll, so
    gevent's and eventlet's patches (which replace ``select``) do not reach it either.
    """
    try:
        function = ctypes.PyDLL(None).poll
    except Exception:  # noqa: BLE001 - no C library to load, no poll in it, no PyDLL here
        return None
    # nfds_t is an unsigned long on Linux (an unsigned int on macOS: the same register).
    function.argtypes = (ctypes.POINTER(_PollFd), ctypes.c_ulong, ctypes.c_int)
    function.restype = ctypes.c_int
    return cast("Callable[[Any, int, int], int]", function)


_c_poll = _poll_keeping_the_gil()
# struct tcp_info (linux/tcp.h, Linux 4.19+): u32 tcpi_notsent_bytes at 144, u64
# tcpi_bytes_sent at 200 and tcpi_bytes_retrans at 208, read in one unpack. The layout only
# grows at its end, so these offsets hold on later kernels.
_TCP_INFO_COUNTS = struct.Struct("=I52xQQ")
#: Where `unpack_counts` reads in struct tcp_info.
TCP_COUNTS_AT = 144
#: ``(queued, sent, retransmitted)`` of a struct tcp_info (raises struct.error if shorter): the
#: bytes written are ``sent - retransmitted + queued`` (`tcp_bytes_sent`).
unpack_counts = _TCP_INFO_COUNTS.unpack_from
_TCP_INFO_LENGTH = TCP_COUNTS_AT + _TCP_INFO_COUNTS.size
_TCP_INFO: int | None = getattr(socket, "TCP_INFO", None)  # Linux only
# The C socket type (socket.socket is its Python subclass, whose __init__ and detach() are
# Python calls): a borrowed fd is wrapped and let go at every TCP_INFO read, twice a request.
_SocketType = socket.SocketType
_IPPROTO_TCP = socket.IPPROTO_TCP
_AF_INET, _SOCK_STREAM = socket.AF_INET, socket.SOCK_STREAM


class HasFileno(Protocol):
    """A socket, or a driver's connection that says its socket's file descriptor."""

    def fileno(self) -> int:
        """Return the file descriptor."""
        ...


def socket_fd_of(driver: Driver, native: DBAPIConnection) -> int | None:
    """Return the fd of the socket of a connection ``driver`` owns, or None (closed, unknown)."""
    try:
        return driver.socket_fd(native)
    except Exception:  # noqa: BLE001 - a closed connection may not say its socket
        return None


def borrow_socket(fd: int) -> socket.socket | None:
    """Return a socket object on a driver's fd, to be detached, never closed; None if closed.

    The fd may be closed already (a driver that found its connection lost) or -1 (asyncpg's
    closed transport): Python refuses both when the object is made (EBADF, ValueError).
    """
    try:
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
    except (OSError, ValueError):
        return None


def tcp_bytes_sent(fd: int) -> int | None:
    """Return the data bytes written so far to the TCP socket ``fd``; None if unknown.

    Sent, or queued in the kernel and not sent yet; retransmissions are not counted: the
    number grows only when the client writes something. One getsockopt (TCP_INFO); None on a
    Unix socket, on a kernel before 4.19, or on a closed fd. The driver's fd is left open.
    """
    if _TCP_INFO is None:
        return None
    # A socket object on the driver's own fd, detached (never closed) when done: no dup(2) and
    # close(2) around the one getsockopt. CPython 3.11 still calls getsockname(2) on the fd
    # to check it is a socket, family given or not: a closed fd fails there (EBADF), -1 too
    # (ValueError). `SentBytes` makes its object once per connection for that reason.
    try:
        sock = _SocketType(_AF_INET, _SOCK_STREAM, 0, fd)
    except (OSError, ValueError):
        return None
    try:
        info = sock.getsockopt(_IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LENGTH)
    except OSError:  # not TCP (a Unix socket), or closed
        return None
    finally:
        sock.detach()
    try:
        queued, sent, retransmitted = unpack_counts(info, TCP_COUNTS_AT)
    except struct.error:  # a kernel before 4.19: a shorter struct
        return None
    written: int = sent - retransmitted + queued  # no int(): a call at each read
    return written


class _Borrowed(_SocketType):
    """A socket object on a driver's own fd: detached, never closed, whenever it goes.

    Its finalizer (this ``__del__``, which takes the place of the C type's, the one that would
    close the fd) lets the fd go, also when the garbage collector ends it in a cycle.
    """

    __slots__ = ()

    def __del__(self) -> None:
        self.detach()


class SentBytes:
    """`tcp_bytes_sent` for one connection's socket, its socket object made once, not per read.

    Read twice per request by the first-statement replay (at checkout and before the first
    statement): a socket object made and detached at each read costs about a third of it.
    The fd is the caller's, asked of the connection at each checkout (never remembered by
    the caller either); the object is remade when it changes, and let go (`release`) with
    the connection. One connection is used by one thread at a time: no lock.

    Those two reads run at every request, so they are made without a Python call of their
    own: where ``fd`` is the descriptor read last, the caller calls ``tcp_info()`` (the socket
    object's own getsockopt, its arguments bound: C calls only) and `unpack_counts` itself;
    any other descriptor goes through a call of this object, which remakes the socket object
    on it. ``fd`` is -1 when no socket object is held.
    """

    __slots__ = ("_sock", "fd", "tcp_info")

    def __init__(self) -> None:
        self._sock: _Borrowed | None = None
        #: The descriptor ``tcp_info`` reads; -1 while no socket object is held.
        self.fd = -1
        #: Reads the socket's raw struct tcp_info (raises OSError once the fd is closed).
        self.tcp_info: Callable[[], bytes] = _no_tcp_info

    def __call__(self, fd: int) -> int | None:
        """Return the data bytes written so far to the TCP socket ``fd``; None if unknown."""
        if _TCP_INFO is None:
            return None
        if self._sock is None or fd != self.fd:
            self.release()
            try:
                sock = _Borrowed(_AF_INET, _SOCK_STREAM, 0, fd)
            except (OSError, ValueError):  # -1: a closed transport
                return None
            self._sock = sock
            # getsockopt with a length returns bytes (typeshed's overload for it is an int).
            self.tcp_info = cast(
                "Callable[[], bytes]",
                functools.partial(sock.getsockopt, _IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LENGTH),
            )
            self.fd = fd
        try:
            queued, sent, retransmitted = unpack_counts(self.tcp_info(), TCP_COUNTS_AT)
        except OSError:  # not TCP (a Unix socket), or closed
            return None
        except struct.error:  # a kernel before 4.19: a shorter struct
            return None
        written: int = sent - retransmitted + queued
        return written

    def release(self) -> None:
        """Let the socket object go now (detached: the fd stays the driver's)."""
        sock, self._sock, self.fd, self.tcp_info = self._sock, None, -1, _no_tcp_info
        if sock is not None:
            sock.detach()


def _no_tcp_info() -> bytes:
    """Read no socket: a `SentBytes` that holds none (its ``fd`` is -1, never a caller's)."""
    raise OSError(errno.EBADF, "no socket")


def poll(source: HasFileno) -> Health:
    """Poll ``source``'s socket with a zero timeout; one that cannot be polled is dead."""
    if _c_poll is not None:
        try:
            fd = source.fileno()
        except Exception:  # noqa: BLE001 - a connection that cannot say its fd is not usable
            return Health.CLOSED
        health = _c_health(_c_poll, fd)
        if health is not None:
            return health
    poller = _real_poll()
    try:
        poller.register(source.fileno(), _POLL_MASK)
        events = poller.poll(0)
    except Exception:  # noqa: BLE001 - a connection that cannot say its fd is not usable
        return Health.CLOSED
    return _health_of(events)


def readable(fd: int) -> bool:
    """Whether data, end-of-file or an error waits on ``fd`` now (a zero-timeout look).

    ``select.select((fd,), (), (), 0)``'s answer, the GIL kept where libc's poll can be had
    (`_poll_keeping_the_gil`): asked where a request ends (psycopg's ROLLBACK not awaited).
    A descriptor that cannot be looked at (closed, -1) is readable: its reader finds out why.
    """
    if _c_poll is not None:
        health = _c_health(_c_poll, fd)
        if health is not None:
            return health is not Health.QUIET
    try:
        return bool(select.select((fd,), (), (), 0)[0])
    except (OSError, ValueError):
        return True


def _c_health(c_poll: Callable[[Any, int, int], int], fd: int) -> Health | None:
    """Return what libc's poll says of ``fd``; None: its poll failed (EINTR, ENOMEM).

    A negative fd is one poll(2) ignores (it would read as quiet): a closed transport's -1.
    """
    if fd < 0:
        return Health.CLOSED
    entry = _PollFd(fd, _POLL_MASK, 0)
    ready = c_poll(ctypes.pointer(entry), 1, 0)
    if ready < 0:
        return None
    return Health.QUIET if ready == 0 else _health_of([(fd, entry.revents)])


def _health_of(events: list[tuple[int, int]]) -> Health:
    """Read a zero-timeout poll's answer for one socket."""
    if not events:
        return Health.QUIET
    revents = events[0][1]
    if revents & (_POLL_DEAD | select.POLLNVAL):
        return Health.CLOSED
    return Health.DATA_WAITING


class SocketPoll:
    """`poll` for one connection's socket, its pollfd made once (asked at each checkout).

    The descriptor is asked of the connection at each look, never remembered: a connection
    that lost its socket says so there (or raises), and a number the kernel gave to another
    socket since would be looked at otherwise. ``flags``: the source is a driver's connection
    whose ``closed`` (and, with ``"broken"``, ``broken``) attribute says it is closed before
    any poll (libpq's drivers): read here, not in a wrapper, since a call is paid at every look.
    """

    __slots__ = (
        "_broken",
        "_c_poll",
        "_closed",
        "_entry",
        "_fd",
        "_poller",
        "_pollfd",
        "_source",
    )

    def __init__(
        self, source: HasFileno, flags: tuple[Literal["closed", "broken"], ...] = ()
    ) -> None:
        self._source = source
        # libc's poll with the GIL held where it can be had (`_poll_keeping_the_gil`); the
        # interpreter's poll object otherwise, and for a look libc's poll failed.
        self._c_poll = _c_poll
        self._entry = _PollFd(-1, _POLL_MASK, 0)
        self._pollfd = ctypes.pointer(self._entry)
        self._poller = _real_poll()
        self._fd = -1
        self._closed = "closed" in flags
        self._broken = "broken" in flags

    def __call__(self) -> Health:
        source: Any = self._source
        if self._closed and (source.closed or (self._broken and source.broken)):
            return Health.CLOSED
        c_poll = self._c_poll
        if c_poll is None:
            return self._select_poll()
        try:
            fd = source.fileno()
        except Exception:  # noqa: BLE001 - a connection that cannot say its fd is not usable
            fd = -1
        if fd < 0:  # poll(2) ignores a negative fd: a closed transport's -1 would read quiet
            return Health.CLOSED
        entry = self._entry
        entry.fd = fd
        ready = c_poll(self._pollfd, 1, 0)
        if ready == 0:  # the answer at nearly every checkout
            return Health.QUIET
        if ready > 0:
            return _health_of([(fd, entry.revents)])
        return self._select_poll()  # libc's poll failed (EINTR, ENOMEM): retried or raised

    def _select_poll(self) -> Health:
        """Look with the interpreter's poll object (it gives the GIL up around the poll)."""
        try:
            fd = self._source.fileno()
            if fd < 0:  # -1 at the first look would be "registered" already: no events
                return Health.CLOSED
            if fd != self._fd:
                if self._fd >= 0:
                    self._poller.unregister(self._fd)
                    self._fd = -1
                self._poller.register(fd, _POLL_MASK)
                self._fd = fd
            events = self._poller.poll(0)
        except Exception:  # noqa: BLE001 - a connection that cannot say its fd is not usable
            return Health.CLOSED
        return _health_of(events)
