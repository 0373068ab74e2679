"""No secret of the bench where another local account can read it (issue 32, item 3).

Command lines are world-readable in ``/proc``; the bench's folders sit in /tmp with their path
on ``ps``. So SQL goes to psql through stdin, logs and folders are the owner's alone, and a
`ServerError` quoting a ``PASSWORD '...'`` statement masks it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from dropsafe.testing import PgBouncer, ServerError

AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another local user")

# shared_server: a server of this module's own: it reads the server's log and folder.
pytestmark = pytest.mark.own_server


def _command_lines() -> list[str]:
    lines = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            lines.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, UnicodeDecodeError):  # a process may end meanwhile
            continue
    return lines


def test_sql_never_appears_on_a_command_line(shared_server):
    """A statement that runs for 1 s is watched for in every process's command line."""
    secret = secrets.token_hex(12)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            shared_server.execute(f"SELECT pg_sleep(1), '{secret}'")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    seen = 0
    while thread.is_alive():
        seen += sum(secret in line for line in _command_lines())
        thread.join(0.01)
    thread.join(30)
    assert not errors, errors
    assert seen == 0, f"the SQL was on a command line {seen} times"


@pytest.mark.parametrize(
    "statement",
    [
        "CREATE ROLE leaky LOGIN PASSWORD '{secret}' NO_SUCH_OPTION",
        "ALTER ROLE no_such_role PASSWORD '{secret}'",
        "ALTER ROLE no_such_role PASSWORD 'it''s-{secret}'",
    ],
)
def test_a_server_error_does_not_echo_the_password(shared_server, statement):
    secret = secrets.token_hex(12)
    with pytest.raises(ServerError) as raised:
        shared_server.execute(statement.format(secret=secret))
    assert secret not in str(raised.value)
    assert "PASSWORD '***'" in str(raised.value)


def _private(base_dir: Path) -> list[str]:
    """Name what in ``base_dir`` another account could read, were the folder open.

    The public certificate holds nothing secret.
    """
    exposed = []
    if base_dir.stat().st_mode & 0o007:
        exposed.append(f"{base_dir.name}/ is {oct(base_dir.stat().st_mode & 0o777)}")
    public = ("server.crt",)
    exposed.extend(
        f"{path.relative_to(base_dir)} is {oct(path.stat().st_mode & 0o777)}"
        for path in base_dir.rglob("*")
        if path.is_file() and path.name not in public and path.stat().st_mode & 0o077
    )
    return exposed


def test_logs_and_folders_are_the_owners_alone(shared_server):
    # A failed statement is logged whole by the server: the log must be the owner's alone.
    secret = secrets.token_hex(12)
    with pytest.raises(ServerError):
        shared_server.execute(f"ALTER ROLE no_such_role PASSWORD '{secret}'")
    assert secret in shared_server.log_file.read_text()
    assert _private(shared_server.base_dir) == []


@pytest.mark.skipif(shutil.which("pgbouncer") is None, reason="needs pgbouncer")
def test_the_poolers_files_are_its_owners_alone(shared_server):
    with PgBouncer(shared_server) as bouncer:
        assert _private(bouncer.base_dir) == []
        # We write its config there again (on a new port): the folder is ours, not the
        # server account's, who could otherwise plant a link for root to write through.
        assert bouncer.base_dir.stat().st_uid == os.geteuid()
        assert bouncer.base_dir.stat().st_mode & 0o022 == 0


@AS_ROOT
def test_another_local_user_reads_neither_the_log_nor_the_folder(shared_server):
    for command in (["cat", str(shared_server.log_file)], ["ls", str(shared_server.base_dir)]):
        result = subprocess.run(
            ["runuser", "-u", "nobody", "--", *command],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode != 0, f"nobody ran {command}: {result.stdout[:200]}"


def test_config_written_into_the_servers_folder_never_goes_through_a_link(tmp_path):
    """The server's account owns its data folder: a link it put there must not be followed."""
    from dropsafe.testing._runtime import write_no_link

    target = tmp_path / "roots-own-file"
    target.write_text("untouched\n")
    (tmp_path / "postgresql.conf").symlink_to(target)
    with pytest.raises(OSError, match=r"link|Too many levels"):
        write_no_link(tmp_path / "postgresql.conf", "port = 1\n", append=True)
    assert target.read_text() == "untouched\n"
