"""Issue 27's must-show: two apps with unchanged handlers, under faults, per engine variant.

``python benchmarks/continuity.py --runs 2 --seconds 15 --label "main at abc123"``

The apps are what a new user writes, with no dropsafe code in the handlers:

- ``flask``: Flask-SQLAlchemy with a bind (psycopg2): notes on the default engine, deposits on
  the ``accounts`` bind (a read of the balance, then an insert: two statements), reads; each
  write is ``db.session.add(...)`` and ``db.session.commit()``;
- ``fastapi``: FastAPI with asyncpg, an ``AsyncSession`` per request from a ``yield``
  dependency, the same writes and reads.

Variants of the engines only: ``plain``, ``pre_ping`` (``pool_pre_ping=True``), ``flag``
(``?plugin=dropsafe`` in each URL: the transaction replay on, as the flag turns it on) and
``flag_no_replay`` (the flag and ``dropsafe_replay_transaction=false``: the flag as it was
before it turned the replay on). Faults,
while 4 clients send requests: ``kill`` terminates every backend once a second; ``restart``
restarts the server, fast and immediate in turn, 1.5 s after it is back each time. The server
is real (TLS, loopback).

A request that failed (5xx) is counted where its last database error happened, as
benchmarks/example_app.py does: at connect, on a transaction's first statement, mid-transaction,
at COMMIT, at the ROLLBACK that closes a session; with the flag, each failed request also by
the ``TransactionReplayed`` event it met (its outcome and reason, read from the ``dropsafe``
logger as a user would), or none. Every write carries a token: an acknowledged
write missing from the database is "lost", one stored twice "doubled" (both must stay 0).
Writes benchmarks/results/CONTINUITY.md (a section per ``--label``), machine named.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import random
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable  # noqa: TC003 - FastAPI reads them
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Self

import httpx
import sqlalchemy as sa
from example_app import (
    _REQUEST,
    PLACES,
    Observed,
    RunResult,
    WhereErrorsHappen,
    bench_arguments,
    failure_cells,
    machine_line,
    parse_bounded,
    publish,
    record_request,
    report_run,
)
from fastapi import Depends, FastAPI, HTTPException, Request
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from dropsafe.testing import PostgresServer

RESULTS = Path(__file__).parent / "results" / "CONTINUITY.md"
CLIENTS = 4
APPS = ("flask", "fastapi")
VARIANTS = ("plain", "pre_ping", "flag", "flag_no_replay")
FAULTS = ("kill", "restart")
KILL_EVERY_S = 1.0
RESTART_AFTER_S = 1.5
REQUEST_TIMEOUT_S = 60.0


# -- the apps ---------------------------------------------------------------------------------


class NotesBase(DeclarativeBase):
    """The default engine's tables."""


class AccountsBase(DeclarativeBase):
    """The ``accounts`` bind's tables (Flask-SQLAlchemy reads the key from their metadata)."""

    metadata = sa.MetaData(info={"bind_key": "accounts"})


class Note(NotesBase):
    """A note; ``token`` is the client's id for the request."""

    __tablename__ = "notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    token: Mapped[str] = mapped_column(sa.String(64), index=True)
    body: Mapped[str]


class Deposit(AccountsBase):
    """A deposit to an account (on the accounts bind in Flask; FastAPI's app has one engine)."""

    __tablename__ = "deposits"

    id: Mapped[int] = mapped_column(primary_key=True)
    token: Mapped[str] = mapped_column(sa.String(64), index=True)
    account: Mapped[str]
    amount: Mapped[int]


def engine_options(variant: str) -> dict[str, Any]:
    """Return the engine keyword arguments of a variant (the flag is in the URL instead)."""
    return {"pool_pre_ping": True} if variant == "pre_ping" else {}


def variant_url(url: str, variant: str) -> str:
    """``url`` with ``?plugin=dropsafe`` for the flag variants (and the replay's opt-out)."""
    if not variant.startswith("flag"):
        return url
    query = {"plugin": "dropsafe"}
    if variant == "flag_no_replay":
        query["dropsafe_replay_transaction"] = "false"
    flagged = make_url(url).update_query_dict(query)
    return flagged.render_as_string(hide_password=False)


def flask_app(urls: dict[str, str], variant: str) -> Any:  # noqa: ANN401 - a Flask app
    """Flask-SQLAlchemy, a bind, handlers that add and commit with ``db.session``."""
    from flask import Flask, abort, jsonify, request
    from flask_sqlalchemy import SQLAlchemy

    db = SQLAlchemy()
    app = Flask("continuity")
    app.config["SQLALCHEMY_DATABASE_URI"] = variant_url(urls["notes"], variant)
    app.config["SQLALCHEMY_BINDS"] = {"accounts": variant_url(urls["accounts"], variant)}
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = engine_options(variant)
    db.init_app(app)
    app.logger.setLevel(logging.CRITICAL)  # a traceback per failed request otherwise

    @app.post("/notes")
    def add_note() -> Any:  # noqa: ANN401
        note = Note(token=request.json["token"], body="hello")
        db.session.add(note)
        db.session.commit()
        return jsonify(id=note.id), 201

    @app.post("/deposits")
    def deposit() -> Any:  # noqa: ANN401
        account, token = request.json["account"], request.json["token"]
        balance = db.session.scalar(
            sa.select(sa.func.coalesce(sa.func.sum(Deposit.amount), 0)).where(
                Deposit.account == account
            )
        )
        db.session.add(Deposit(token=token, account=account, amount=1))
        db.session.commit()
        return jsonify(balance=int(balance) + 1), 201

    @app.get("/notes/<int:note_id>")
    def show_note(note_id: int) -> Any:  # noqa: ANN401
        note = db.session.get(Note, note_id)
        if note is None:
            abort(404)
        return jsonify(id=note.id)

    with app.app_context():
        engines = [db.engines[None], db.engines["accounts"]]
    app.extensions["continuity_engines"] = engines
    return app


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """Yield the request's session (a ``yield`` dependency), closed after the reply."""
    async with request.app.state.sessions() as session:
        yield session


SessionDependency = Annotated[AsyncSession, Depends(get_session)]


def fastapi_app(urls: dict[str, str], variant: str) -> FastAPI:
    """FastAPI on asyncpg, an ``AsyncSession`` per request from a ``yield`` dependency."""
    engine = create_async_engine(variant_url(urls["notes"], variant), **engine_options(variant))
    app = FastAPI()
    app.state.engine = engine
    app.state.sessions = async_sessionmaker(engine, expire_on_commit=False)

    @app.post("/notes", status_code=201)
    async def add_note(request: Request, session: SessionDependency) -> dict[str, int]:
        note = Note(token=(await request.json())["token"], body="hello")
        session.add(note)
        await session.commit()
        return {"id": note.id}

    @app.post("/deposits", status_code=201)
    async def deposit(request: Request, session: SessionDependency) -> dict[str, int]:
        body = await request.json()
        balance = await session.scalar(
            sa.select(sa.func.coalesce(sa.func.sum(Deposit.amount), 0)).where(
                Deposit.account == body["account"]
            )
        )
        session.add(Deposit(token=body["token"], account=body["account"], amount=1))
        await session.commit()
        return {"balance": int(balance or 0) + 1}

    @app.get("/notes/{note_id}")
    async def show_note(note_id: int, session: SessionDependency) -> dict[str, int]:
        note = await session.get(Note, note_id)
        if note is None:
            raise HTTPException(status_code=404)
        return {"id": note.id}

    return app


# -- the replay events --------------------------------------------------------------------------

NO_EVENT = "no replay event"
# The write a client is sending (table, token): set by the client, read by the app's wrapper
# (httpx's WSGI and ASGI transports call the app in the client's own context).
_WRITE: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "write", default=None
)
_REPLAYED_LINE = re.compile(
    r'^dropsafe\.transaction_replayed .*?outcome=(\w+).*?(?: reason="(.*)")?(?: attempts=\d+)?$'
)
# A lost COMMIT resolved by asking the server (a unit's, or a plain one's by the xid read in
# flight): counted as "commit <outcome>" beside the replays.
_RESOLVED_LINE = re.compile(r"^dropsafe\.commit_resolved .*?outcome=(\w+)")


class ReplayLog(logging.Handler):
    """The ``dropsafe`` logger's ``TransactionReplayed`` lines, by request (``_REQUEST``).

    What a user sees with the default ``LoggingHook``: no code in the app. A failed request is
    then counted by where it failed, the last replay event it met and its error
    (``failed_why``), and a failed write by whether it was stored all the same (``stored``,
    filled by ``audit``: a COMMIT that took effect though the app got an error).
    ``debug``: for a failed request that met no event, dropsafe's last DEBUG line about a
    replay instead (why it did not start one); costs a little, so a run of its own.
    """

    def __init__(self, *, debug: bool = False) -> None:
        super().__init__(logging.DEBUG if debug else logging.INFO)
        self.debug = debug
        self.by_request: dict[int, list[str]] = {}
        self.debug_lines: dict[int, list[str]] = {}
        self.outcomes: Counter[str] = Counter()  # every event of the run, by outcome
        self.failed_why: Counter[tuple[str, str, str]] = Counter()  # (place, event, error)
        self.failed_writes: dict[tuple[str, str, str], list[tuple[str, str]]] = {}
        self.stored: Counter[tuple[str, str, str]] = Counter()  # failed writes stored anyway

    def emit(self, record: logging.LogRecord) -> None:
        """Keep a ``TransactionReplayed`` line's outcome and reason (logging holds the lock)."""
        message, request = record.getMessage(), _REQUEST.get()
        resolved = _RESOLVED_LINE.match(message)
        if resolved is not None:
            outcome = f"commit {resolved.group(1)}"
            self.outcomes[outcome] += 1
            if request is not None:
                self.by_request.setdefault(request, []).append(outcome)
            return
        match = _REPLAYED_LINE.match(message)
        if match is None:
            if self.debug and request is not None and "replay" in message:
                self.debug_lines.setdefault(request, []).append(f"debug: {message}")
            return
        outcome, reason = match.groups()
        self.outcomes[outcome] += 1
        if request is not None:
            why = outcome if reason is None else f"{outcome}: {reason}"
            self.by_request.setdefault(request, []).append(why)

    def count(self, number: int, failure: tuple[str, str] | None) -> None:
        """Take request ``number``'s replay events; a failed one's place, last event and error.

        ``failure``: what ``record_request`` returned for it (None: it was answered).
        """
        events = self.by_request.pop(number, []) or self.debug_lines.pop(number, [])
        self.debug_lines.pop(number, None)
        if failure is None:
            return
        place, what = failure
        key = (place, events[-1] if events else NO_EVENT, what[:140])
        self.failed_why[key] += 1
        write = _WRITE.get()
        if write is not None:
            self.failed_writes.setdefault(key, []).append(write)

    def __enter__(self) -> Self:
        logger = logging.getLogger("dropsafe")
        self._before = (logger.level, logger.propagate)
        logger.setLevel(self.level)
        logger.propagate = False  # the events of a run are counted here, not printed
        logger.addHandler(self)
        return self

    def __exit__(self, *_exc: object) -> None:
        logger = logging.getLogger("dropsafe")
        logger.removeHandler(self)
        logger.setLevel(self._before[0])
        logger.propagate = self._before[1]


class ObservedAsgi(Observed):
    """``Observed``, counting each failed request's replay event too."""

    def __init__(
        self,
        app: Any,  # noqa: ANN401 - an ASGI app
        recorder: WhereErrorsHappen,
        result: RunResult,
        replays: ReplayLog,
    ) -> None:
        super().__init__(app, recorder, result)
        self.replays = replays

    def _classify(self, number: int, status: int | None, raised: BaseException | None) -> None:
        failure = record_request(self.recorder, self.result, number, status, raised)
        self.replays.count(number, failure)


# -- the load and the faults ------------------------------------------------------------------


@dataclass
class Tokens:
    """What each write was answered, by token (thread-safe enough: one writer per token)."""

    statuses: Counter[int] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    acknowledged: dict[str, set[str]] = field(
        default_factory=lambda: {"notes": set(), "deposits": set()}
    )


def requests_of(number: int) -> Iterable[tuple[str, str, dict[str, Any] | None]]:
    """Client ``number``'s endless request mix: (method, path, JSON body)."""
    rng = random.Random(number)  # a request mix, not cryptography
    while True:
        roll = rng.random()
        if roll < 0.4:  # the mix
            yield "POST", "/notes", {"token": uuid.uuid4().hex}
        elif roll < 0.7:
            yield "POST", "/deposits", {"token": uuid.uuid4().hex, "account": f"a{number}"}
        else:
            yield "GET", f"/notes/{rng.randint(1, 50)}", None


def note_answer(tokens: Tokens, path: str, body: dict[str, Any] | None, status: int) -> None:
    """Remember an acknowledged write's token; count every answer by status."""
    with tokens.lock:
        tokens.statuses[status] += 1
        if body is not None and status == 201:
            tokens.acknowledged[path.strip("/")].add(body["token"])


class ObservedWsgi:
    """WSGI wrapper: numbers each request and counts how it ended (``record_request``)."""

    def __init__(
        self,
        app: Any,  # noqa: ANN401 - a WSGI app
        recorder: WhereErrorsHappen,
        result: RunResult,
        replays: ReplayLog,
    ) -> None:
        self.app, self.recorder, self.result, self.replays = app, recorder, result, replays
        self.numbers = itertools.count()
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        with self.lock:
            number = next(self.numbers)
        token = _REQUEST.set(number)
        status: int | None = None
        raised: BaseException | None = None

        def observe(line: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:  # noqa: ANN401
            nonlocal status
            status = int(line.split(maxsplit=1)[0])
            return start_response(line, headers, exc_info)

        try:
            # Flask closes the request's session (its ROLLBACK) before returning the body.
            return list(self.app(environ, observe))
        except Exception as exc:  # noqa: BLE001 - a server answers 500 to whatever the app raised
            raised = exc
            if status is None:
                observe("500 Internal Server Error", [("content-type", "text/plain")])
            return [b""]
        finally:
            _REQUEST.reset(token)
            with self.lock:
                failure = record_request(self.recorder, self.result, number, status, raised)
                self.replays.count(number, failure)


def fault_loop(
    server: PostgresServer, fault: str, stop: threading.Event, result: RunResult
) -> None:
    """Terminate every backend once a second, or restart the server (fast, immediate, ...)."""
    modes = itertools.cycle(("fast", "immediate"))
    pause = KILL_EVERY_S if fault == "kill" else RESTART_AFTER_S
    while not stop.wait(pause):  # paces the faults; synchronises nothing
        if fault == "kill":
            server.terminate_backends()
        else:
            server.restart(next(modes))  # type: ignore[arg-type]
        result.faults += 1


def run_flask(
    app: Any,  # noqa: ANN401 - a Flask app
    result: RunResult,
    tokens: Tokens,
    seconds: float,
    replays: ReplayLog,
) -> None:
    """4 client threads through httpx's WSGI transport for ``seconds``."""
    recorder = WhereErrorsHappen(*app.extensions["continuity_engines"])
    transport = httpx.WSGITransport(app=ObservedWsgi(app.wsgi_app, recorder, result, replays))
    deadline = time.monotonic() + seconds

    def client(number: int) -> None:
        with httpx.Client(
            transport=transport, base_url="http://app", timeout=REQUEST_TIMEOUT_S
        ) as http:
            for method, path, body in requests_of(number):
                if time.monotonic() > deadline:
                    return
                _WRITE.set(None if body is None else (path.strip("/"), body["token"]))
                reply = http.request(method, path, json=body)
                note_answer(tokens, path, body, reply.status_code)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 2 * REQUEST_TIMEOUT_S)
    result.round_trips = recorder.round_trips


async def run_fastapi(
    app: Any,  # noqa: ANN401 - a FastAPI app
    result: RunResult,
    tokens: Tokens,
    seconds: float,
    replays: ReplayLog,
) -> None:
    """4 client tasks through httpx's ASGI transport for ``seconds``."""
    recorder = WhereErrorsHappen(app.state.engine.sync_engine)
    observed = ObservedAsgi(app, recorder, result, replays)
    transport = httpx.ASGITransport(app=observed, raise_app_exceptions=False)
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(
        transport=transport, base_url="http://app", timeout=REQUEST_TIMEOUT_S
    ) as http:

        async def client(number: int) -> None:
            for method, path, body in requests_of(number):
                if time.monotonic() > deadline:
                    return
                _WRITE.set(None if body is None else (path.strip("/"), body["token"]))
                reply = await http.request(method, path, json=body)
                note_answer(tokens, path, body, reply.status_code)

        await asyncio.wait_for(
            asyncio.gather(*(client(n) for n in range(CLIENTS))), seconds + 2 * REQUEST_TIMEOUT_S
        )
    result.round_trips = recorder.round_trips
    await app.state.engine.dispose()


@dataclass
class Outcome:
    """One run: the requests' result, and the writes' audit."""

    result: RunResult
    statuses: Counter[int] = field(default_factory=Counter)
    acknowledged: int = 0
    lost: int = 0
    doubled: int = 0
    replays: ReplayLog = field(default_factory=ReplayLog)


def one_run(
    server: PostgresServer,
    app_name: str,
    variant: str,
    fault: str,
    seconds: float,
    *,
    debug: bool = False,
) -> Outcome:
    """Fresh tables, a fresh app, ``seconds`` of load under ``fault``; then the audit.

    ``debug``: ``ReplayLog``'s, why a failed request met no replay event.
    """
    urls = {name: server.url(driver_of(app_name), database=name) for name in ("notes", "accounts")}
    if app_name == "fastapi":
        urls["accounts"] = urls["notes"]
    reset_tables(server)
    result, tokens, replays = RunResult(), Tokens(), ReplayLog(debug=debug)
    stop = threading.Event()
    faults = threading.Thread(target=fault_loop, args=(server, fault, stop, result))
    started = time.monotonic()
    faults.start()
    try:
        with replays:
            if app_name == "flask":
                app = flask_app(urls, variant)
                run_flask(app, result, tokens, seconds, replays)
                for engine in app.extensions["continuity_engines"]:
                    engine.dispose()
            else:
                app = fastapi_app(urls, variant)
                asyncio.run(run_fastapi(app, result, tokens, seconds, replays))
    finally:
        stop.set()
        faults.join(timeout=120)
    result.seconds = time.monotonic() - started
    return audit(server, app_name, result, tokens, replays)


def driver_of(app_name: str) -> str:
    """Return the driver an app uses."""
    return "psycopg2" if app_name == "flask" else "asyncpg"


def reset_tables(server: PostgresServer) -> None:
    """Fresh tables in both databases (FastAPI's app keeps both in ``notes``)."""
    for database in ("notes", "accounts"):
        engine = sa.create_engine(server.url("psycopg2", database=database))
        with engine.begin() as connection:
            for table in (Note.__table__, Deposit.__table__):
                table.drop(connection, checkfirst=True)
                table.create(connection)
        engine.dispose()


def audit(
    server: PostgresServer, app_name: str, result: RunResult, tokens: Tokens, replays: ReplayLog
) -> Outcome:
    """Count acknowledged writes missing, writes stored twice, failed writes stored."""
    outcome = Outcome(result, tokens.statuses, replays=replays)
    deposits_in = "accounts" if app_name == "flask" else "notes"
    for table, database in (("notes", "notes"), ("deposits", deposits_in)):
        query = f"SELECT token, count(*) FROM {table} GROUP BY token"  # noqa: S608 - ours
        rows = server.execute(query, database=database)
        stored = {token: int(count) for token, count in rows}
        outcome.acknowledged += len(tokens.acknowledged[table])
        outcome.lost += sum(1 for token in tokens.acknowledged[table] if token not in stored)
        outcome.doubled += sum(1 for count in stored.values() if count > 1)
        for key, writes in replays.failed_writes.items():
            replays.stored[key] += sum(1 for (t, token) in writes if t == table and token in stored)
    return outcome


# -- the table ----------------------------------------------------------------------------------


def table(rows: list[tuple[str, str, str, list[Outcome]]]) -> list[str]:
    """Totals per app, fault and variant over the runs."""
    lines = [
        "| App | Fault | Variant | Runs | Requests | Faults | Failed | "
        + " | ".join(f"at {place}" for place in PLACES)
        + " | Raised after a 2xx | Writes acknowledged | Lost | Doubled | Requests/s |",
        "|---" * (12 + len(PLACES)) + "|",
    ]
    for app_name, fault, variant, outcomes in rows:
        results = [outcome.result for outcome in outcomes]
        requests = sum(result.requests for result in results)
        lines.append(
            f"| {app_name} | {fault} | {variant} | {failure_cells(results)} | "
            f"{sum(o.acknowledged for o in outcomes)} | {sum(o.lost for o in outcomes)} | "
            f"{sum(o.doubled for o in outcomes)} | "
            f"{requests / max(sum(r.seconds for r in results), 1e-9):.0f} |"
        )
    return lines


def replay_table(rows: list[tuple[str, str, str, list[Outcome]]]) -> list[str]:
    """Return the flag variants' failed requests by place and the last replay event they met."""
    header = "| App | Fault | Variant | Replay events (all requests) | Failed at | Replay event"
    lines = [header + " | Error | Failed | Of them, writes stored |", "|---" * 9 + "|"]
    for app_name, fault, variant, outcomes in rows:
        if not variant.startswith("flag"):
            continue
        events: Counter[str] = sum((o.replays.outcomes for o in outcomes), Counter())
        seen = ", ".join(f"{what} {count}" for what, count in sorted(events.items())) or "none"
        why: Counter[tuple[str, str, str]] = sum(
            (o.replays.failed_why for o in outcomes), Counter()
        )
        stored: Counter[tuple[str, str, str]] = sum((o.replays.stored for o in outcomes), Counter())
        if not why:
            lines.append(f"| {app_name} | {fault} | {variant} | {seen} | - | - | - | 0 | 0 |")
        for (place, event, error), count in sorted(why.items(), key=lambda item: -item[1]):
            lines.append(
                f"| {app_name} | {fault} | {variant} | {seen} | {place} | {event} | "
                f"`{error.replace('|', '/')}` | {count} | {stored[place, event, error]} |"
            )
    return lines


def measure(
    apps: Iterable[str],
    faults: Iterable[str],
    variants: Iterable[str],
    runs: int,
    seconds: float,
    *,
    debug: bool = False,
) -> tuple[list[tuple[str, str, str, list[Outcome]]], dict[str, str]]:
    """Run every combination ``runs`` times on one server; return the rows and examples."""
    rows, examples = [], {}
    with PostgresServer() as server:
        for database in ("notes", "accounts"):
            server.execute(f"CREATE DATABASE {database}")
        for app_name in apps:
            for fault in faults:
                # Variants side by side in each run: the shared machine's load moves in
                # minutes, and each variant then meets the same.
                outcomes: dict[str, list[Outcome]] = {variant: [] for variant in variants}
                for run in range(runs):
                    for variant in variants:
                        outcome = one_run(server, app_name, variant, fault, seconds, debug=debug)
                        result = outcome.result
                        report_run(
                            f"{app_name} {fault} {variant} run {run}",
                            result,
                            answers=dict(outcome.statuses),
                            lost=outcome.lost,
                            doubled=outcome.doubled,
                            replay_events=dict(outcome.replays.outcomes),
                            failed_why=dict(outcome.replays.failed_why),
                            failed_writes_stored=sum(outcome.replays.stored.values()),
                        )
                        outcomes[variant].append(outcome)
                        for place, what in result.examples.items():
                            examples.setdefault(f"{app_name}, {variant}, {place}", what)
                rows.extend((app_name, fault, variant, outcomes[variant]) for variant in variants)
    return rows, examples


def main() -> None:
    """Measure and append a section to the results file."""
    parser = bench_arguments(__doc__.splitlines()[0], runs=2, output=RESULTS)
    parser.add_argument("--apps", nargs="+", choices=APPS, default=list(APPS))
    parser.add_argument("--faults", nargs="+", choices=FAULTS, default=list(FAULTS))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument(
        "--debug-replays",
        action="store_true",
        help="why a failed request met no replay event: dropsafe's DEBUG lines (costs a little)",
    )
    arguments = parse_bounded(parser)
    rows, examples = measure(
        arguments.apps,
        arguments.faults,
        arguments.variants,
        arguments.runs,
        arguments.seconds,
        debug=arguments.debug_replays,
    )
    setup = machine_line(arguments.runs, arguments.seconds) + f" each, {CLIENTS} clients."
    if arguments.debug_replays:
        setup += " dropsafe's DEBUG lines captured (--debug-replays)."
    seen = [f"- {where}: `{what}`" for where, what in sorted(examples.items())]
    lines = table(rows)
    if any(variant.startswith("flag") for variant in arguments.variants):
        lines += ["", "The flag's failed requests by the replay event they met:", ""]
        lines += replay_table(rows)
    publish(arguments, "Issue 27's apps under faults", setup, lines, seen)


if __name__ == "__main__":
    main()
