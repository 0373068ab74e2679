"""The command line, run as a user would."""

import subprocess
import sys

import pytest

from dropsafe._cli import main


@pytest.mark.fault
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["reproduce"], "psycopg2.OperationalError: SSL SYSCALL error: EOF detected"),
        (["reproduce", "--no-tls", "--fault", "rst"], "server closed the connection unexpectedly"),
        (["reproduce", "--driver", "psycopg", "--fault", "terminate"], "AdminShutdown"),
    ],
)
def test_reproduce_shows_the_drivers_error(capsys, argv, expected):
    assert main(argv) == 0
    assert expected in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "reproduce" in capsys.readouterr().out


def _a_file(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    return path


# One convention for every command: 0 done, 1 a problem found, 2 bad usage or input.
@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["--help"], 0, ""),
        (["nope"], 2, "invalid choice"),
        (["doctor"], 2, "the following arguments are required: url"),
        (["doctor", "not-a-url"], 2, "malformed database URL"),
        (["doctor", "mysql://app@db/app"], 2, "PostgreSQL only"),
        (["doctor", "postgresql+psycopg2://app@127.0.0.1:1/app"], 1, "cannot reach 127.0.0.1:1"),
        (["bench", "--only", "nope"], 2, "unknown section"),
        (["bench", "--out", "{file}/results"], 2, "--out {file}/results: cannot write there"),
        (["bench", "--bogus"], 2, "unrecognized arguments: --bogus"),
        (["demo", "--duration", "1"], 2, "--duration must be within"),
        (["demo", "--out", "{file}/out"], 2, "--out {file}/out: cannot write there"),
        (["reproduce", "--fault", "nope"], 2, "invalid choice"),
    ],
)
def test_exit_codes(tmp_path, capsys, argv, code, message):
    file = _a_file(tmp_path)
    argv = [arg.format(file=file) for arg in argv]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message.format(file=file) in err
    assert "Traceback" not in err
    if code and not err.startswith("usage:"):  # argparse prints its usage line first
        assert len(err.strip().splitlines()) == 1, err


def _cli_without(modules, *argv):
    """Run the command line in a fresh interpreter where ``modules`` are not installed."""
    hide = "".join(f"sys.modules[{name!r}] = None\n" for name in modules)
    code = f"import sys\n{hide}from dropsafe._cli import main\nsys.exit(main({list(argv)!r}))\n"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.fault
def test_reproduce_without_psycopg2_uses_the_driver_installed():
    done = _cli_without(("psycopg2",), "reproduce", "--no-tls", "--fault", "terminate")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "plain SQLAlchemy pool (psycopg)" in done.stdout
    assert "Traceback" not in done.stderr


def test_reproduce_with_a_driver_that_is_not_installed_says_so_before_any_server():
    done = _cli_without(("psycopg2",), "reproduce", "--driver", "psycopg2")
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""  # no server was started
    assert done.stderr.strip().splitlines() == [
        (
            "dropsafe reproduce: this command needs the 'psycopg2' extra (psycopg2 missing): "
            "pip install 'dropsafe[psycopg2]'"
        )
    ]
