"""What tests in several folders share about child processes: a script's JSON report, a command
run as another local user."""

from __future__ import annotations

import json
import subprocess


def json_report(*command, timeout):
    """Run ``command`` to its end (exit code 0, or the test fails with its stderr): the JSON
    value on the last line of its output."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def as_nobody(*command, timeout=60):
    """Run ``command`` as the user ``nobody`` (needs root): (exit code, output and errors)."""
    result = subprocess.run(
        ["runuser", "-u", "nobody", "--", *command],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


def psql_as_nobody(psql, *target, timeout=60):
    """``psql`` run as ``nobody`` with an empty environment: no password, no password file."""
    return as_nobody("env", "-i", psql, "-X", "-w", *target, timeout=timeout)


__all__ = ["as_nobody", "json_report", "psql_as_nobody"]
