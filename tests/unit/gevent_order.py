"""Under gevent, in either import order, the watchdog and the socket look still work.

Run as a script: ``python gevent_order.py before|used-before|after`` imports dropsafe before
``gevent.monkey.patch_all()`` (and uses the watchdog before it, for ``used-before``) or after.
Prints one JSON line:

- ``deadline``: for each of three greenlets blocked reading a silent TCP socket under
  ``shut_down_at`` (deadline 0.3 s), the seconds it took, or an error's type;
- ``hangup``: what the checkout's socket look says of a TCP connection whose peer closed
  (gevent's own ``select.poll`` reports no hang-up: such a connection cost a ping).
"""

from __future__ import annotations

import json
import socket
import sys
import time

ORDER = sys.argv[1]
if ORDER in ("before", "used-before"):
    from dropsafe._drivers import _SocketPoll
    from dropsafe._socket_shutdown import shut_down_at
if ORDER == "used-before":
    # Used before the patch: the watchdog's thread and lock exist already.
    left, right = socket.socketpair()
    with shut_down_at(left.fileno(), time.monotonic() + 60):
        pass
    left.close()
    right.close()

from gevent import monkey  # noqa: E402 - the import order is the point

monkey.patch_all()

import gevent  # noqa: E402 - after the patch, as apps do

if ORDER == "after":
    from dropsafe._drivers import _SocketPoll
    from dropsafe._socket_shutdown import shut_down_at


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    return client, server


def blocked_read() -> object:
    client, server = tcp_pair()
    started = time.monotonic()
    try:
        with shut_down_at(client.fileno(), started + 0.3):
            client.settimeout(10)
            client.recv(1)
        return round(time.monotonic() - started, 3)
    except Exception as exc:
        return type(exc).__name__
    finally:
        client.close()
        server.close()


reads = [gevent.spawn(blocked_read) for _ in range(3)]
gevent.joinall(reads, timeout=20)
client, server = tcp_pair()
look = _SocketPoll(client)
quiet = look().name
server.close()
deadline = time.monotonic() + 5
hangup = look().name
while hangup == "QUIET" and time.monotonic() < deadline:  # the FIN is on its way
    gevent.sleep(0.01)
    hangup = look().name
client.close()
print(json.dumps({"deadline": [r.value for r in reads], "quiet": quiet, "hangup": hangup}))
