"""ChaosProxy's bandwidth limit, measured: ``python benchmarks/proxy_bandwidth.py``.

One connection, one direction: a client pushes a payload through the proxy to a sink that reads
and discards it; the rate is the payload over the time until the sink holds every byte. Each
target is run ``--repeat`` times and the median reported, with "unlimited" (no limit set) as the
proxy's own ceiling on this machine. Loopback only; bounded by the payload sizes.

Measured on 2 cores shared with other jobs (load 4), median of 5 (Mbit/s):

| target | before (sleep per slice) | now (absolute schedule) |
|---:|---:|---:|
| 10 | 9 (95%) | 10 (100%) |
| 100 | 83 (83%) | 100 (100%) |
| 500 | 239 (48%) | 500 (100%) |
| 1000 | 446 (45%) | 998 (100%) |
| 2000 | 453 (23%) | 1996 (100%) |
| 4000 | - | 3859 (96%) |
| unlimited | 4500 to 7000 | 4500 to 6500 |
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time

from dropsafe.testing import ChaosProxy

_MIB = 1 << 20


class _Sink:
    """A loopback TCP server that counts and discards what it receives."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received = 0
        self.done = threading.Event()
        self.expected = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                while chunk := conn.recv(1 << 18):
                    self.received += len(chunk)
                    if self.received >= self.expected:
                        self.done.set()

    def close(self) -> None:
        self.listener.close()


def measure(sink: _Sink, proxy: ChaosProxy, nbytes: int) -> float:
    """Push ``nbytes`` through the proxy; return the rate the sink saw, in Mbit/s."""
    sink.received, sink.expected = 0, nbytes
    sink.done.clear()
    payload = b"x" * _MIB
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=120) as sock:
        started = time.perf_counter()
        for _ in range(nbytes // _MIB):
            sock.sendall(payload)
        if not sink.done.wait(timeout=120):
            raise TimeoutError("the sink did not receive every byte")
        elapsed = time.perf_counter() - started
    return nbytes * 8 / elapsed / 1e6


def main() -> None:
    """Measure each target and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="payload per run, in seconds")
    args = parser.parse_args()
    sink = _Sink()
    print("| target Mbit/s | measured Mbit/s (median) | ratio |")
    print("|---:|---:|---:|")
    try:
        for target in (10, 100, 500, 1000, 2000, 4000, None):
            with ChaosProxy("127.0.0.1", sink.port) as proxy:
                if target is not None:
                    proxy.bandwidth(target * 1000)
                rate_guess = target or 2000
                nbytes = max(2, int(rate_guess * 1e6 / 8 * args.seconds) // _MIB) * _MIB
                rates = [measure(sink, proxy, nbytes) for _ in range(args.repeat)]
            median = statistics.median(rates)
            ratio = f"{median / target:.0%}" if target else "-"
            shown = target if target is not None else "unlimited"
            print(f"| {shown} | {median:.0f} | {ratio} |", flush=True)
    finally:
        sink.close()


if __name__ == "__main__":
    main()
