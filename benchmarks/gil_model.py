"""A threaded client without a database: does a request with more Python cost more per thread.

Each "request" runs some interpreter work, a round trip to a local echo server (in a process
of its own, so that its CPU is not under this process's GIL), the same work again and a second
round trip: the shape of a one-INSERT unit of work (two round trips on every driver). Printed,
per amount of work, the client's CPU a request and its voluntary context switches with one
thread and with four (docs/benchmarks.md, "Four threads": dropsafe's requests cost 25-40% more
CPU at four threads than at one, plain SQLAlchemy's do not). Example (a few seconds)::

    python benchmarks/gil_model.py --requests 4000
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import socket
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable
    from multiprocessing.connection import Connection

#: (loop length, distinct functions): the work a request does, twice.
SHAPES = ((10, 4), (40, 4), (10, 40), (40, 40))


def _echo_server(pipe: Connection) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    pipe.send(server.getsockname()[1])

    def serve(client: socket.socket) -> None:
        while data := client.recv(64):
            client.sendall(data)

    while True:
        client, _ = server.accept()
        threading.Thread(target=serve, args=(client,), daemon=True).start()


def _functions(count: int) -> list[Callable[[int], object]]:
    """Return ``count`` distinct functions of the same shape: more code for the interpreter."""
    made = []
    for index in range(count):
        namespace: dict[str, Callable[[int], object]] = {}
        exec(  # noqa: S102 - code made here, from integers
            f"def work(n):\n    d = {{}}\n    for i in range(n):\n"
            f"        d[i & 15] = d.get(i & {index % 7 + 1}, {index}) + i\n    return d\n",
            namespace,
        )
        made.append(namespace["work"])
    return made


def _request(sock: socket.socket, length: int, functions: list[Callable[[int], object]]) -> None:
    for function in functions:
        function(length)
    sock.sendall(b"x")
    sock.recv(64)
    for function in functions:
        function(length)
    sock.sendall(b"y")
    sock.recv(64)


def _run(
    port: int, threads: int, requests: int, length: int, functions: list[Callable[[int], object]]
) -> tuple[float, float]:
    sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(threads)]
    for sock in sockets:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    each = requests // threads

    def client(sock: socket.socket) -> None:
        for _ in range(each):
            _request(sock, length, functions)

    before = resource.getrusage(resource.RUSAGE_SELF)
    workers = [threading.Thread(target=client, args=(sock,)) for sock in sockets]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    after = resource.getrusage(resource.RUSAGE_SELF)
    for sock in sockets:
        sock.close()
    done = each * threads
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return cpu / done * 1e6, (after.ru_nvcsw - before.ru_nvcsw) / done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=4000)
    args = parser.parse_args()
    mine, theirs = multiprocessing.Pipe()
    server = multiprocessing.Process(target=_echo_server, args=(theirs,), daemon=True)
    server.start()
    port = mine.recv()
    for length, count in SHAPES:
        functions = _functions(count)
        one = _run(port, 1, args.requests, length, functions)
        four = _run(port, 4, args.requests, length, functions)
        print(
            f"loop {length:3d}, {count:3d} functions: one thread {one[0]:6.1f} us "
            f"{one[1]:4.2f} switches, four {four[0]:6.1f} us {four[1]:4.2f} switches "
            f"({four[0] / one[0]:.2f}x)"
        )
    server.kill()


if __name__ == "__main__":
    main()
