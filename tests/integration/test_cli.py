"""The command line, run as a user would."""

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
