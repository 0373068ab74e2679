"""Every command that takes a URL, fed URLs of every shape: no piece of the password comes out.

Users paste URLs whose password holds ``@``, ``:``, ``/`` or ``%`` unencoded; a parser that
splits them elsewhere than the user meant (``u:Hunt@er2Secret@host`` read as host
``er2Secret@host``) must not make part of the password show up in stdout, stderr or a log.
"""

from __future__ import annotations

import contextlib
import io
import logging
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dropsafe._cli import _parser, main
from dropsafe._cli._arguments import database_url

# Passwords are drawn from letters that no report, error or user name here contains, so any
# 4 characters of the password holding two of them in the output can only be a leak.
_SECRET_LETTERS = "QZXJKW"  # noqa: S105 - not a password
# Letters twice as likely as each troublesome character: runs of letters between them are what
# a misplaced split would show.
_PASSWORD_TOKENS = [*_SECRET_LETTERS * 2, "@", ":", "/", "%", "%40", "%3A", "%2F", "%25"]
passwords = st.lists(st.sampled_from(_PASSWORD_TOKENS), min_size=4, max_size=12).map("".join)
# User names: lowercase letters with at most one of the troublesome characters.
users = st.builds(
    lambda head, special, tail: head + special + tail,
    st.text("abcdef", min_size=1, max_size=5),
    st.sampled_from(["", "@", ":", "/", "%", "%40"]),
    st.text("abcdef", max_size=5),
)


def _url_commands():
    """Each command with an argument of type database_url, as (name, argv before the URL)."""
    subparsers = _parser()._subparsers._group_actions[0].choices
    return [
        (name, [name, *action.option_strings[:1]])
        for name, parser in subparsers.items()
        for action in parser._actions
        if action.type is database_url
    ]


URL_COMMANDS = _url_commands()


def test_the_url_commands_are_found():
    assert [name for name, _ in URL_COMMANDS] == ["doctor"]


def _fragments(secret):
    """The pieces of 4 characters of ``secret`` that ordinary output cannot hold.

    Those with two of the secret letters; for a password written by hand (no secret letter),
    every piece.
    """
    pieces = {secret[start : start + 4] for start in range(len(secret) - 3)}
    if not any(ch in _SECRET_LETTERS for ch in secret):
        return pieces
    return {p for p in pieces if sum(ch in _SECRET_LETTERS for ch in p) >= 2}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.texts = []

    def emit(self, record):
        self.texts.append(self.format(record))


def _run(argv):
    out, err, records = io.StringIO(), io.StringIO(), _Records()
    root = logging.getLogger()
    level = root.level
    root.addHandler(records)
    root.setLevel(logging.DEBUG)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        root.removeHandler(records)
        root.setLevel(level)
    return code, out.getvalue() + err.getvalue() + "\n".join(records.texts)


@pytest.mark.parametrize(("command", "argv"), URL_COMMANDS)
@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(user=users, password=passwords)
@example(user="u", password="Hunt@er2Secret")  # noqa: S106 - the needle.via("the report of issue 21")
def test_no_output_holds_a_piece_of_the_password(shared_server, command, argv, user, password):
    url = f"postgresql+psycopg2://{user}:{password}@127.0.0.1:{shared_server.port}/postgres"
    code, output = _run([*argv, url])
    assert code in (0, 1, 2)
    secrets = {password, unquote(password)}
    leaks = sorted(
        piece
        for secret in secrets
        for piece in {secret} | _fragments(secret)
        if len(piece) >= 4 and piece in output
    )
    assert leaks == [], output
