"""Under gevent or eventlet, in any import order, the watchdog and the socket look still work.

Run as a script: ``python green_order.py gevent|eventlet before|used-before|after`` imports
dropsafe before the library's monkey patching (``gevent.monkey.patch_all()``,
``eventlet.monkey_patch()``), uses the watchdog before it too for ``used-before``, or imports
dropsafe after it. Prints one JSON line:

- ``deadline``: for each of three greenlets blocked reading a silent TCP socket under
  ``shut_down_at`` (deadline 0.3 s), the seconds it took, or an error's type;
- ``hangup``: what the checkout's socket look says of a TCP connection whose peer closed
  (gevent's own ``select.poll`` reports no hang-up: such a connection cost a ping; eventlet
  removes ``select.poll``: the look raised AttributeError).
"""

from __future__ import annotations

import json
import socket
import sys
import time
import warnings

warnings.simplefilter("ignore")  # eventlet warns that it is deprecated, on import
LIBRARY, ORDER = sys.argv[1], sys.argv[2]
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

if LIBRARY == "gevent":
    import gevent
    from gevent import monkey

    monkey.patch_all()
    spawn, sleep = gevent.spawn, gevent.sleep
else:
    import eventlet

    eventlet.monkey_patch()
    spawn, sleep = eventlet.spawn, eventlet.sleep

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


reads = [spawn(blocked_read) for _ in range(3)]
results = [read.get() if LIBRARY == "gevent" else read.wait() for read in reads]
client, server = tcp_pair()
look = _SocketPoll(client)
quiet = look().name
server.close()
deadline = time.monotonic() + 5
hangup = look().name
while hangup == "QUIET" and time.monotonic() < deadline:  # the FIN is on its way
    sleep(0.01)
    hangup = look().name
client.close()
print(json.dumps({"deadline": results, "quiet": quiet, "hangup": hangup}))
