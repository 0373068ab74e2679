"""``dropsafe reproduce``: a throwaway TLS server, a pooled connection broken, the app's error."""

from __future__ import annotations

import importlib.util
import time
from typing import TYPE_CHECKING, cast

import sqlalchemy as sa

from dropsafe._cli._arguments import EXIT_FOUND_PROBLEM, EXIT_OK, require_extra
from dropsafe._drivers import driver_named, sync_drivers
from dropsafe._errors import ConfigurationError
from dropsafe.testing import ChaosProxy, PostgresServer

if TYPE_CHECKING:
    import argparse

    from dropsafe.testing._server import Driver

__all__ = ["register", "run"]

_FAULTS = ("fin", "rst", "terminate")
_SYNC_DRIVERS = sync_drivers()


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``reproduce`` command."""
    parser = commands.add_parser(
        "reproduce",
        help="show the error a web app sees when its pooled connection dies",
        description=(
            "Start a throwaway PostgreSQL with TLS behind a fault proxy, warm a plain "
            "SQLAlchemy pool, break its connection, and show what the next request gets."
        ),
    )
    parser.add_argument(
        "--driver",
        choices=_SYNC_DRIVERS,
        help="the driver the app uses (default: the first installed of "
        f"{', '.join(_SYNC_DRIVERS)})",
    )
    parser.add_argument(
        "--fault",
        choices=_FAULTS,
        default="fin",
        help="fin/rst: the network closes or resets the connection; "
        "terminate: the server ends the backend (default: fin)",
    )
    parser.add_argument("--no-tls", action="store_true", help="run the server without TLS")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Reproduce the error; exit 0 when the app saw it, 1 (a problem found) when it did not."""
    driver = _driver(args.driver)
    say = _Printer()
    with PostgresServer(tls=not args.no_tls) as server:
        say(
            f"PostgreSQL {server.binaries.major_version} on 127.0.0.1:{server.port}, "
            f"TLS {'on' if server.tls else 'off'}"
        )
        with ChaosProxy(server.host, server.port) as proxy:
            params = {} if server.tls else driver_named(driver).tls.off_url_parameters
            url = proxy.route(server.url(driver, **params))
            args.secrets.add_url(url)  # the throwaway server's password, when it has one
            engine = sa.create_engine(url, connect_args=server.connect_args(driver))
            try:
                with engine.connect() as conn:
                    conn.execute(sa.text("SELECT 1"))
                say(f"plain SQLAlchemy pool ({driver}) warmed through a proxy on port {proxy.port}")
                if args.fault == "terminate":
                    server.terminate_backends()
                    say("the server terminated the pooled connection's backend")
                else:
                    proxy.cut(args.fault)
                    say(
                        f"the network {'closed' if args.fault == 'fin' else 'reset'} the connection"
                    )
                try:
                    with engine.connect() as conn:
                        conn.execute(sa.text("SELECT 1"))
                except sa.exc.DBAPIError as exc:
                    say("the app's next request failed with:")
                    print(f"\n    {type(exc.orig).__module__}.{type(exc.orig).__name__}: ", end="")
                    print(str(exc.orig).strip().replace("\n", "\n    "), "\n")
                    say("this is the error dropsafe exists to make disappear")
                    return EXIT_OK
                say("the request succeeded: the problem did not reproduce")
                return EXIT_FOUND_PROBLEM
            finally:
                engine.dispose()


class _Printer:
    def __init__(self) -> None:
        self._start = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self._start:6.2f}s] {message}", flush=True)


def _driver(asked: Driver | None) -> Driver:
    """Return the driver asked for, or the first one installed; refuse one that is not.

    Checked before a server starts: a missing driver costs a line, not a server's start and
    a traceback.
    """
    if asked is not None:
        require_extra(asked, asked)
        return asked
    for name in _SYNC_DRIVERS:
        if importlib.util.find_spec(name) is not None:
            return cast("Driver", name)  # the registry's names are the Literal's (a test checks)
    raise ConfigurationError(
        "no PostgreSQL driver is installed: pip install 'dropsafe[psycopg2]' "
        "(or dropsafe[psycopg], dropsafe[pg8000])"
    )
