"""asyncpg spinning at connect: ``python benchmarks/asyncpg_connect_spin.py [--rounds N]``.

asyncpg alone (no SQLAlchemy, no dropsafe in the path: dropsafe only starts the servers), 8
tasks connecting over TLS to PgBouncer in transaction mode and running ``SELECT 1``, while
``KILL postgres`` and ``RESUME postgres`` go to PgBouncer's console every 0.2 s. With PgBouncer
1.18, after its SASL reply a login sometimes gets 16 KB of PgBouncer's heap, then a FATAL
"failed to send welcome message"; asyncpg's parser (state AUTH) loops forever in C on that
(``ReadBuffer.finish_message`` leaves a message of type zero unfinished, and
``take_message`` hands it out again): the event loop is stuck, no timeout fires, one core at
100%. This is the spin once seen in CI under tests/units/test_pgbouncer.py's asyncpg ledger.

Each round runs in a process of its own for ``--seconds``; a round whose process prints no
progress for ``--quiet`` seconds spun, and is killed. Prints one line per round and a total.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

ROUND = r"""
import asyncio, sys, threading, time
import asyncpg
from dropsafe.testing import PgBouncer, PostgresServer

seconds = float(sys.argv[1])
with PostgresServer() as server, PgBouncer(server, pool_mode="transaction") as bouncer:
    dsn = bouncer.url("asyncpg").replace("postgresql+asyncpg://", "postgresql://")
    dsn = dsn.replace("ssl=require", "sslmode=require")
    stop = threading.Event()

    def killer():
        while not stop.wait(0.2):
            try:
                bouncer.kill_database("postgres")
            except Exception:
                pass  # a PgBouncer that died of it is started again by kill_database

    threading.Thread(target=killer, daemon=True).start()
    done = [0]

    async def client():
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                connection = await asyncio.wait_for(asyncpg.connect(dsn), 5)
                try:
                    await connection.fetchval("SELECT 1")
                finally:
                    connection.terminate()
            except Exception:
                pass  # "database removed", refused logins: the fault itself
            done[0] += 1
            print("progress", done[0], flush=True)

    async def main():
        await asyncio.gather(*(client() for _ in range(8)))

    asyncio.run(main())
    stop.set()
print("ended", done[0], flush=True)
"""


def _round(seconds: float, quiet: float) -> tuple[bool, int]:
    """Run one round; return whether it spun, and how many connects it made."""
    process = subprocess.Popen(
        [sys.executable, "-c", ROUND, str(seconds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its servers are killed with it
        env=os.environ.copy(),
    )
    stdout = process.stdout
    if stdout is None:  # pragma: no cover - asked for a pipe
        raise RuntimeError("no pipe from the round's process")
    os.set_blocking(stdout.fileno(), False)
    connects, heard = 0, time.monotonic()
    while process.poll() is None:
        chunk = stdout.read()
        if chunk:
            connects += chunk.count(b"progress")
            heard = time.monotonic()
        elif time.monotonic() - heard > quiet:
            os.killpg(process.pid, 9)
            process.wait()
            return True, connects
        time.sleep(0.5)
    return False, connects


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--quiet", type=float, default=30.0)
    args = parser.parse_args()
    spun = 0
    for number in range(1, args.rounds + 1):
        did, connects = _round(args.seconds, args.quiet)
        spun += did
        print(f"round {number}: {'SPUN' if did else 'ended'} after {connects} connects")
    print(f"{spun} of {args.rounds} rounds spun")


if __name__ == "__main__":
    main()
