"""Nothing outlives its test: a run killed mid-test leaves no kernel rule and no temp folder.

A child process holds a server and a kernel blackhole, as a test does, and is killed. SIGKILL
(like pytest-timeout's ``os._exit``) runs no cleanup: the next start must sweep what it left.
SIGTERM must remove it at once. What a live process holds, another run's too, must stay.
"""

from __future__ import annotations

import select
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dropsafe.testing import PostgresServer
from dropsafe.testing._runtime import free_port, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.fault, pytest.mark.timeout(180)]

CHILD = textwrap.dedent(
    """
    import sys
    from dropsafe.testing import PostgresServer, kernel_blackhole

    with PostgresServer() as server, kernel_blackhole(server.port):
        print(server.base_dir, server.pid, server.port, flush=True)
        sys.stdin.read()  # until the parent closes it, or kills us
    """
)


class Holder:
    """A child process holding a running server and a blackhole on its port."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 90)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            self.process.kill()
            _, err = self.process.communicate(timeout=30)
            pytest.fail(f"the holder did not start: {err}")
        base_dir, postmaster, port = line.split()
        self.base_dir = Path(base_dir)
        self.postmaster = int(postmaster)
        self.port = int(port)

    @property
    def table(self) -> str | None:
        """The holder's nftables table (named after its port), if it is there."""
        tables = subprocess.run(
            ["nft", "list", "tables", "inet"], capture_output=True, text=True, check=True
        ).stdout
        for line in tables.splitlines():
            if f"dropsafe_blackhole_{self.port}_" in line:
                return line.split()[-1]
        return None

    def end(self, how: signal.Signals | None) -> int:
        """Kill the holder with ``how`` (or let it finish its block); return its exit code."""
        if how is not None:
            self.process.send_signal(how)
        self.process.communicate(timeout=60)  # closes its stdin (ending its block) and pipes
        code = self.process.returncode
        # Its server dies with it (parent-death signal); wait until no process of it is left.
        wait_until(
            lambda: not _group_alive(self.postmaster), timeout=30, what="the holder's server"
        )
        return code


def _group_alive(pgid):
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _next_start(kernel_blackhole):
    """What a later run does first: make a blackhole and a server (not even started)."""
    with kernel_blackhole(free_port("127.0.0.1")):
        pass
    PostgresServer(tls=False).close()


def test_sigkill_leftovers_are_swept_at_the_next_start(kernel_blackhole, postgres_server):
    killed, alive = Holder(), Holder()
    try:
        assert killed.end(signal.SIGKILL) == -signal.SIGKILL
        # SIGKILL runs no cleanup: both are left behind...
        assert killed.base_dir.exists()
        assert killed.table is not None
        with kernel_blackhole(postgres_server.port, direction="to"):
            _next_start(kernel_blackhole)
            # ...until the next start, which sweeps them.
            assert killed.table is None
            assert not killed.base_dir.exists()
            # What live processes hold stays: another run's, and this one's.
            assert alive.table is not None
            assert alive.base_dir.exists()
            assert postgres_server.base_dir.exists()
            assert any(
                f"dropsafe_blackhole_{postgres_server.port}_" in line
                for line in subprocess.run(
                    ["nft", "list", "tables"], capture_output=True, text=True, check=True
                ).stdout.splitlines()
            )
        assert postgres_server.execute("SELECT 1") == [("1",)]
    finally:
        code = alive.end(None)
    # A holder that ends its block removes its own.
    assert code == 0
    assert alive.table is None
    assert not alive.base_dir.exists()


def test_sigterm_removes_rules_and_folders_at_once(kernel_blackhole):
    holder = Holder()
    assert holder.end(signal.SIGTERM) == -signal.SIGTERM  # it still dies of the SIGTERM
    assert holder.table is None
    assert not holder.base_dir.exists()
