"""``dropsafe doctor URL``: look at a real database and say what to set, exactly.

It reports the server's version, TLS and how it is verified, round-trip time and what a ping
costs, the server's timeouts and keepalives, whether a pooler is in between and whether the node
is a standby, whether a transaction-mode pooler is (two sessions that meet on one server backend),
and the client settings dropsafe would use; then recommendations, each with the
exact setting. It never prints a password. A malformed URL ends with one line and exit code 2;
an unreachable host or refused authentication with one line and exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import time
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

import dropsafe
from dropsafe._classify import ErrorKind, classify
from dropsafe._cli._arguments import EXIT_OK, CommandFailed, database_url
from dropsafe._drivers import driver_for
from dropsafe._engine.guard import _parse
from dropsafe._errors import ConfigurationError
from dropsafe._policy import ConnectionPolicy, Policy
from dropsafe._redaction import redact_text, redact_url

if TYPE_CHECKING:
    from collections.abc import Mapping

    from sqlalchemy.engine import URL
    from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = ["diagnose", "register", "run"]

_SETTINGS = (
    "idle_session_timeout",
    "idle_in_transaction_session_timeout",
    "statement_timeout",
    "tcp_keepalives_idle",
    "tcp_keepalives_interval",
    "tcp_keepalives_count",
)


def _policy() -> Policy:
    """Build the doctor's own policy per call: DROPSAFE_* variables set since import count.

    Its connections work through any pooler: no prepared statement outlives its transaction
    (see ConnectionPolicy.pooler). Its events are its report, not log lines.
    """
    return Policy(connection=ConnectionPolicy(pooler="transaction"), hooks=())


# Transactions per session when looking for a transaction-mode pooler.
_POOLER_ROUNDS = 3
_BACKEND_PID = sa.text("SELECT pg_backend_pid()")
# How libpq (psycopg2, psycopg) and the pure-Python drivers refuse a URL's parameter.
_REFUSED_PARAMETER = re.compile(
    r"invalid dsn|invalid connection option|invalid \w+ value|unexpected keyword argument"
)
# What the doctor advises the server to run with, when it runs without.
_KEEPALIVES = {"tcp_keepalives_idle": 60, "tcp_keepalives_interval": 10, "tcp_keepalives_count": 6}
# Above this the OS keeps a dead client's backend for hours (Linux: 7200 s); seconds.
_KEEPALIVE_IDLE_AT_MOST = 300
# A ping that costs more than this is worth taking off every checkout; milliseconds.
_PING_MS_WORTH_SAVING = 5


# The help's text, laid out by hand: argparse would run the lists together.
_DESCRIPTION = """\
Connect to a real database (nothing is written) and report:
  - the server's version, TLS and how the server's identity is checked
  - the round trip, and what a ping costs
  - the server's timeouts and keepalives
  - whether a pooler or proxy is in between, and whether it is in transaction mode
  - whether the node is a standby
  - the client settings dropsafe would use
then recommendations, each with the exact setting to paste. It never prints a password.

exit codes: 0 report printed; 1 the database could not be examined (unreachable,
authentication refused); 2 bad input (a malformed URL, a parameter the driver refuses)."""


class DoctorFailed(CommandFailed):
    """The database could not be examined; the message is the one line to show (exit 1)."""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``doctor`` command."""
    parser = commands.add_parser(
        "doctor",
        help="examine a real database and recommend settings",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "url", type=database_url, help="a SQLAlchemy URL, e.g. postgresql+psycopg2://app@db/app"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print the report (exit 0); `DoctorFailed` when the database cannot be examined."""
    print(diagnose(args.url))
    return EXIT_OK


def diagnose(url_text: str) -> str:
    """Examine the database at ``url_text``; return the report as text."""
    url = _parse(url_text)
    facts: dict[str, Any] = {"url": redact_url(url)}
    started = time.perf_counter()
    if url.get_dialect().is_async:
        facts |= asyncio.run(_examine_async(url))
    else:
        engine = dropsafe.create_engine(url, poolclass=NullPool, policy=_policy())
        try:
            with _Explained(url), engine.connect() as connection:
                facts["connect ms"] = (time.perf_counter() - started) * 1000
                facts |= _examine(connection)
                with engine.connect() as other:
                    facts["pooler"] = _pooler_seen(_backends(connection, other))
        finally:
            engine.dispose()
    cparams: dict[str, Any] = {}
    driver = driver_for(url.get_dialect()())
    driver.connect_defaults(ConnectionPolicy(), [], cparams)
    facts["dropsafe client settings"] = cparams
    return _render(facts, _recommend(facts, url))


async def _examine_async(url: URL) -> dict[str, Any]:
    engine = dropsafe.create_async_engine(url, poolclass=NullPool, policy=_policy())
    started = time.perf_counter()
    try:
        with _Explained(url):
            async with engine.connect() as connection:
                connect_ms = (time.perf_counter() - started) * 1000
                facts: dict[str, Any] = await connection.run_sync(_examine)
                facts["connect ms"] = connect_ms
                async with engine.connect() as other:
                    pids = [
                        (await _pid_async(connection), await _pid_async(other))
                        for _ in range(_POOLER_ROUNDS)
                    ]
                facts["pooler"] = _pooler_seen(pids)
                return facts
    finally:
        await engine.dispose()


async def _pid_async(connection: AsyncConnection) -> int:
    pid = int(await connection.scalar(_BACKEND_PID))
    await connection.commit()  # the transaction ends: a transaction-mode pooler lets go
    return pid


def _backends(first: sa.Connection, second: sa.Connection) -> list[tuple[int, int]]:
    """Return the server backend of each session, transaction after transaction, in turn."""
    pids = []
    for _ in range(_POOLER_ROUNDS):
        pair = []
        for connection in (first, second):
            pair.append(int(connection.execute(_BACKEND_PID).scalar_one()))
            connection.commit()
        pids.append((pair[0], pair[1]))
    return pids


def _pooler_seen(pids: list[tuple[int, int]]) -> str | None:
    """Say "transaction" if two open sessions met on one backend, or one session moved.

    Directly and through a session-mode pooler, each open session keeps its own backend for its
    whole life. A transaction-mode pooler hands a backend back after each transaction, and
    PgBouncer hands the one just freed to the next client: the other session gets it. Seeing
    it proves a transaction-mode pooler; not seeing it proves none is absent (a busy pooler may
    hand out another backend each time).
    """
    first = {pair[0] for pair in pids}
    second = {pair[1] for pair in pids}
    return "transaction" if first & second or len(first) > 1 or len(second) > 1 else None


class _Explained:
    """Turn a connection failure into one line that says what went wrong."""

    def __init__(self, url: URL) -> None:
        self.where = f"{url.host or 'localhost'}:{url.port or 5432}"
        self.user = url.username or "(default user)"

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is None or isinstance(exc, ConfigurationError) or not isinstance(exc, Exception):
            return
        text = redact_text(str(getattr(exc, "orig", None) or exc)).strip().splitlines()
        first = text[0] if text else type(exc).__name__
        lowered = " ".join(text).lower()
        if _REFUSED_PARAMETER.search(lowered):
            # The URL's own parameters, refused by the driver before any connection: input.
            raise ConfigurationError(f"the driver refuses the URL's parameters: {first}") from None
        if "password authentication failed" in lowered or "authentication" in lowered:
            raise DoctorFailed(f"authentication refused for user {self.user}: {first}") from None
        if classify(exc) in (
            ErrorKind.FAILOVER,
            ErrorKind.DISCONNECT,
            ErrorKind.TRANSIENT,
        ) or isinstance(exc, OSError):
            raise DoctorFailed(f"cannot reach {self.where}: {first}") from None
        raise DoctorFailed(f"cannot examine {self.where}: {first}") from None


def _examine(connection: sa.Connection) -> dict[str, Any]:
    def one(sql: str) -> object:  # whatever the server answers
        return connection.execute(sa.text(sql)).scalar()

    facts: dict[str, Any] = {"server version": one("SHOW server_version")}
    row = connection.execute(
        sa.text("SELECT ssl, version, cipher FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    ).first()
    facts["tls"] = None if row is None else {"on": row[0], "version": row[1], "cipher": row[2]}
    rtts = []
    for _ in range(7):
        began = time.perf_counter()
        one("SELECT 1")
        rtts.append((time.perf_counter() - began) * 1000)
    facts["round trip ms"] = statistics.median(rtts)
    connection.rollback()  # a ping runs outside a transaction, as at a checkout
    raw = connection.connection.dbapi_connection
    began = time.perf_counter()
    if raw is not None:
        connection.dialect.do_ping(raw)
    facts["ping ms"] = (time.perf_counter() - began) * 1000
    for setting in _SETTINGS:
        facts[setting] = one(f"SHOW {setting}")
    facts["in recovery"] = bool(one("SELECT pg_is_in_recovery()"))
    facts["server port"] = one("SELECT inet_server_port()")
    facts["user"] = one("SELECT current_user")
    facts["superuser"] = one("SHOW is_superuser") == "on"
    return facts


def _recommend(facts: dict[str, Any], url: URL) -> list[str]:
    advice = []
    tls = facts.get("tls")
    query = {key: str(value) for key, value in url.query.items()}
    mode = query.get("sslmode") or query.get("ssl") or "prefer (libpq's default)"
    if not tls or not tls.get("on"):
        advice.append(
            "TLS is off: add ?sslmode=verify-full&sslrootcert=/path/to/ca.pem to the URL "
            "(asyncpg: ?ssl=verify-full)"
        )
    elif "verify-full" not in mode:
        advice.append(
            f"TLS is on but the server's identity is not checked (sslmode={mode}): use "
            "sslmode=verify-full&sslrootcert=/path/to/ca.pem"
        )
    if facts.get("idle_in_transaction_session_timeout") in ("0", 0):
        advice.append(
            "no idle_in_transaction_session_timeout: "
            + _settings_sql(facts, {"idle_in_transaction_session_timeout": "'60s'"})
        )
    if _seconds(facts.get("tcp_keepalives_idle")) > _KEEPALIVE_IDLE_AT_MOST:
        advice.append(
            "the server keeps dead clients' backends for hours (OS keepalive defaults): "
            + _settings_sql(facts, _KEEPALIVES)
        )
    if facts.get("in recovery"):
        advice.append(
            "this node is a standby (read-only): list every node and add "
            "target_session_attrs=read-write, e.g. ?host=db-1:5432&host=db-2:5432"
            "&target_session_attrs=read-write"
        )
    if url.port and facts.get("server port") not in (None, url.port):
        advice.append(
            f"the server listens on {facts.get('server port')} but you reach port {url.port}: a "
            "pooler or proxy is in between; see docs/managed-clouds.md (poolers)"
        )
    if facts.get("pooler") == "transaction":
        advice.append(
            "a transaction-mode pooler is in between (two sessions met on one server backend): "
            "create the engine with policy=dropsafe.Policy(connection="
            "dropsafe.ConnectionPolicy(pooler='transaction')), so that asyncpg and psycopg 3 "
            "keep no prepared statements across transactions"
        )
    ping = facts.get("ping ms", 0.0)
    if ping > _PING_MS_WORTH_SAVING:
        advice.append(
            f"a ping costs {ping:.1f} ms: pool_pre_ping=True would add it to every checkout; "
            "dropsafe's checkout check costs none (remove pool_pre_ping)"
        )
    return advice or ["nothing to change"]


def _settings_sql(facts: dict[str, Any], settings: Mapping[str, object]) -> str:
    """Say how to set ``settings``, as statements that can be pasted into psql as they are.

    A superuser sets them for the server (ALTER SYSTEM, then a reload, which these settings
    need, not a restart). Anyone else, as on most managed services where ALTER SYSTEM is
    refused, sets them for their own role: new sessions of that role get them.
    """
    if facts.get("superuser"):
        statements = [f"ALTER SYSTEM SET {name} = {value};" for name, value in settings.items()]
        statements.append("SELECT pg_reload_conf();")
        return " ".join(statements)
    role = '"' + str(facts.get("user") or "CURRENT_USER").replace('"', '""') + '"'
    statements = [f"ALTER ROLE {role} SET {name} = {value};" for name, value in settings.items()]
    return (
        " ".join(statements)
        + " (or in your provider's parameter group; ALTER SYSTEM needs a superuser)"
    )


def _seconds(value: object) -> float:
    """Read a setting shown in seconds ('7200', '2h', '0' meaning the OS default of 7200 s)."""
    text = str(value or "0").strip()
    units = {"ms": 0.001, "s": 1, "min": 60, "h": 3600, "d": 86400}
    for unit, factor in sorted(units.items(), key=lambda item: -len(item[0])):
        if text.endswith(unit) and text[: -len(unit)].strip().isdigit():
            return int(text[: -len(unit)]) * factor
    return float(text) if text.isdigit() and text != "0" else 7200.0


def _render(facts: dict[str, Any], advice: list[str]) -> str:
    tls = facts.get("tls")
    tls_text = (
        "off" if not tls or not tls.get("on") else f"on ({tls.get('version')}, {tls.get('cipher')})"
    )
    lines = [
        f"database      {facts['url']}",
        f"server        PostgreSQL {facts['server version']}"
        + ("  (standby, read-only)" if facts.get("in recovery") else ""),
        f"TLS           {tls_text}",
        f"connect       {facts['connect ms']:.1f} ms",
        f"round trip    {facts['round trip ms']:.2f} ms (median of 7)",
        f"ping          {facts['ping ms']:.2f} ms",
        "pooler        "
        + (
            "transaction mode (two sessions met on one server backend)"
            if facts.get("pooler") == "transaction"
            else "no transaction-mode pooler seen"
        ),
    ]
    lines += [f"{name:<36} {facts[name]}" for name in _SETTINGS]
    settings = ", ".join(f"{k}={v}" for k, v in facts["dropsafe client settings"].items())
    lines += ["", f"dropsafe would connect with: {settings}", "", "recommendations:"]
    lines += [f"  - {item}" for item in advice]
    return "\n".join(lines)
