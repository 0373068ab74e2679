"""Whose leftovers are whose: the owner tag in names, and the sweep that spares the living."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import warnings

from dropsafe.testing import _leftovers
from dropsafe.testing._leftovers import TEMP_PREFIX, owner_is_gone, process_tag


def _parse(tag):
    pid, start = tag.split("_")
    return int(pid), int(start)


def test_this_process_is_its_own_live_owner():
    pid, start = _parse(process_tag())
    assert pid == os.getpid()
    assert not owner_is_gone(pid, start)


def test_a_reused_pid_is_not_the_owner():
    pid, start = _parse(process_tag())
    # Same pid, another start time: the pid now names another process.
    assert owner_is_gone(pid, start + 1)


def test_an_ended_process_is_gone():
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "from dropsafe.testing._leftovers import process_tag as t; print(t())",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert owner_is_gone(*_parse(child.stdout.strip()))


def test_the_sweep_takes_only_folders_of_ended_owners(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    pid, start = _parse(process_tag())
    mine = tmp_path / f"{TEMP_PREFIX}{pid}_{start}-abc"
    dead = tmp_path / f"{TEMP_PREFIX}{pid}_{start + 1}-bouncer-def"
    untagged = tmp_path / f"{TEMP_PREFIX}old12345"  # from a version without tags: unknown owner
    for folder in (mine, dead, untagged):
        (folder / "data").mkdir(parents=True)
        (folder / "data" / "file").write_bytes(b"x")
    assert _leftovers.sweep_temp_folders() == [dead]
    assert mine.exists()
    assert untagged.exists()
    assert not dead.exists()


def test_a_pid_that_cannot_exist_is_gone():
    assert owner_is_gone(2**22 + 1, 1)  # above the kernel's largest pid_max


def test_a_forked_child_inherits_nothing_to_remove():
    removed = []
    _leftovers.remove_on_sigterm("key", lambda: removed.append(True))
    try:
        read_end, write_end = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork() in a threaded process
            pid = os.fork()
        if pid == 0:  # the child: it must not act on its parent's behalf
            os.write(write_end, str(len(_leftovers._ON_SIGTERM)).encode())
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            assert pipe.read() == "0"
        os.waitpid(pid, 0)
        assert "key" in _leftovers._ON_SIGTERM
    finally:
        _leftovers.forget_on_sigterm("key")
    assert removed == []
