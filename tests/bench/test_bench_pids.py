"""The bench signals only processes it proved its own (issue 32, items 2 and 5).

Patroni's postmasters are no children of ours: their pids come from ``postmaster.pid``, a file
the server's account writes. Rewritten, it named any process for root to SIGKILL. And a run
killed hard left those postmasters listening until some later Patroni cluster started.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from dropsafe.testing import PostgresServer
from dropsafe.testing._binaries import find_postgres_binaries
from dropsafe.testing._leftovers import TEMP_PREFIX, _start_time
from dropsafe.testing._patroni import _kill_postmaster_group, _Node
from dropsafe.testing._runtime import Owner, PortHolds, wait_until

# Nobody may log in to the leftover: it only has to listen.
INITDB_OPTIONS = ("--auth-local=peer", "--auth-host=reject", "-U", "postgres", "--no-sync")

# shared_server: a server of this module's own: it reads the server's processes.
pytestmark = pytest.mark.own_server


def _settings(data: Path) -> list[str]:
    return ["-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={data}"]


def _node_on(base_dir: Path) -> _Node:
    return _Node(
        name="node1",
        base_dir=base_dir,
        pg_port=0,
        rest_port=0,
        etcd_port=0,
        psql=find_postgres_binaries().tool("psql"),
        owner=Owner.for_this_process(),
    )


def _survives(process: subprocess.Popen[bytes]) -> bool:
    try:
        process.wait(timeout=1)
    except subprocess.TimeoutExpired:
        return True
    return False


@pytest.mark.parametrize("as_owner", [False, True])
def test_a_rewritten_pid_file_gets_nothing_killed(tmp_path, as_owner):
    """The file names a process of ours (root's), or one of the server's account: not a server."""
    owner = Owner.for_this_process()
    if as_owner and not owner.is_other_user:
        pytest.skip("the server's account is ours: covered by the other case")
    victim = subprocess.Popen(
        ["sleep", "60"],
        user=owner.uid if as_owner else None,
        group=owner.gid if as_owner else None,
        extra_groups=[] if as_owner else None,
    )
    try:
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "postmaster.pid").write_text(f"{victim.pid}\n/elsewhere\n")
        node = _node_on(tmp_path)
        _kill_postmaster_group(node)  # what close() and crash_leader_node() do
        assert _survives(victim), "the bench killed the process a pid file named"
        assert node.postmaster_pid() is None
    finally:
        victim.kill()
        victim.wait()


def test_the_real_postmaster_is_recognised_in_its_own_folder_only(shared_server, tmp_path):
    assert _node_on(shared_server.base_dir).postmaster_pid() == shared_server.pid
    # Another node's pid file naming this server's postmaster: not that node's server.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "postmaster.pid").write_text(f"{shared_server.pid}\n")
    assert _node_on(tmp_path).postmaster_pid() is None


def _owner_to_kill() -> tuple[subprocess.Popen[bytes], str]:
    # Alive while the leftover is set up: every bench start on this machine sweeps dead runs.
    owner = subprocess.Popen(["sleep", "120"])
    return owner, f"{owner.pid}_{_start_time(owner.pid)}"


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_killed_runs_cluster_stops_listening_at_the_next_start(tmp_path):
    """A postmaster in a dead run's Patroni folder (as a SIGKILLed run leaves one) is swept."""
    binaries = find_postgres_binaries()
    owner = Owner.for_this_process()
    run, tag = _owner_to_kill()
    folder = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{tag}-patroni"))
    leftover = None
    # Held for the whole test: a port merely probed as free can be bound by another process
    # before the postmaster binds it (which then exits, while the other process answers
    # _accepts), or after the sweep (and answers the last check). PostgreSQL sets
    # SO_REUSEADDR, so it binds the held port.
    ports = PortHolds("127.0.0.1")
    try:
        folder.chmod(0o755)
        data = folder / "node1" / "data"
        data.parent.mkdir()
        owner.give(data.parent)
        owner.run(
            [binaries.tool("initdb"), "-D", str(data), *INITDB_OPTIONS],
            cwd=folder,
            what="initdb",
        )
        port = ports.take()
        # A session of its own and no parent-death signal: as Patroni starts a postmaster.
        leftover = subprocess.Popen(
            [binaries.tool("postgres"), "-D", str(data), "-p", str(port), *_settings(data)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            cwd=folder,
            user=owner.uid,
            group=owner.gid,
            extra_groups=None if owner.uid is None else [],
        )
        wait_until(lambda: _accepts(port), timeout=60, what="the leftover postmaster")
        run.kill()  # the run dies hard
        run.wait()
        PostgresServer(tls=False).close()  # any bench service's start sweeps
        assert leftover.wait(timeout=10) == -signal.SIGKILL
        assert not _accepts(port)
    finally:
        run.kill()
        run.wait()
        if leftover is not None and leftover.poll() is None:
            leftover.kill()
            leftover.wait()
        ports.close()
        shutil.rmtree(folder, ignore_errors=True)


def test_signal_backend_reaches_the_servers_own_processes_only(shared_server):
    """A pid the server reports is checked: a child of its postmaster, run by its account."""
    victim = subprocess.Popen(["sleep", "60"])
    try:
        assert not shared_server.signal_backend(victim.pid, signal.SIGKILL)
        assert _survives(victim)
    finally:
        victim.kill()
        victim.wait()
    assert not shared_server.signal_backend(shared_server.pid, signal.SIGKILL)  # not a child
    backend = shared_server.execute(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'"
    )
    assert shared_server.signal_backend(int(backend[0][0]), 0)
