"""examples/fastapi_crud under faults: ``python benchmarks/example_app.py [--runs 3]``.

The app of issue 20's shape (FastAPI, psycopg 3, a session per request, CRUD functions that
commit themselves) driven over HTTP (httpx's ASGI transport: the app's own code, FastAPI's
threadpool for its sync endpoints; real sockets to a real TLS PostgreSQL behind a ChaosProxy)
by 4 clients running a mix of signups, reads, updates (with password hashes), item writes and
deletes, while a fault loop cuts every connection (RST or FIN) or terminates every backend each
0.5-1.5 s. Variants: a plain engine, ``pool_pre_ping=True``, ``dropsafe.harden(engine)``, and
harden with every endpoint under ``@dropsafe.request_unit``.

Every database error is recorded where it happened, from the real exception and the engine's
own events (a ``handle_error`` listener; ``begin``/``commit``/``rollback`` and
``before_cursor_execute`` listeners tell which statement of the transaction it was):

- ``rollback/close``: the ROLLBACK when the request's session closes (no statement, last
  operation ROLLBACK);
- ``first statement``: the first statement of a transaction;
- ``mid-transaction``: a statement after others in the same transaction (a flush at
  ``session.commit()`` after reads is one);
- ``commit``: the COMMIT itself;
- ``connect``: opening a connection.

A request whose answer is a 5xx is classified by the last database error recorded while it ran
(the one that reached the app; a 5xx with none is ``other``). A signup answered "already
registered" for an email no other request used would be a unit committed twice: counted too.
Writes benchmarks/results/EXAMPLE_APP.md (``--label`` names the code measured), machine named.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import importlib.util
import itertools
import os
import platform
import random
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy import event

from dropsafe.testing import ChaosProxy, PostgresServer

APP = Path(__file__).parents[1] / "examples" / "fastapi_crud" / "app.py"
RESULTS = Path(__file__).parent / "results" / "EXAMPLE_APP.md"
CLIENTS = 4
VARIANTS = [
    # (name, engine mode, endpoints under @dropsafe.request_unit)
    ("plain", "plain", False),
    ("pool_pre_ping", "pre_ping", False),
    ("harden", "harden", False),
    ("harden + request_unit", "harden", True),
]
PLACES = ["rollback/close", "first statement", "mid-transaction", "commit", "connect", "other"]

_REQUEST: contextvars.ContextVar[int | None] = contextvars.ContextVar("request", default=None)


def load_app_module() -> Any:  # noqa: ANN401 - a module loaded from a path
    """Import examples/fastapi_crud/app.py (it is not a package)."""
    spec = importlib.util.spec_from_file_location("fastapi_crud_example", APP)
    if spec is None or spec.loader is None:
        raise ImportError(APP)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the models' annotations through it
    spec.loader.exec_module(module)
    return module


class WhereErrorsHappen:
    """Record every database error of an engine with where it happened and the request it hit.

    Per connection (``Connection.info``, which lives with the DBAPI connection): the number of
    statements sent in the current transaction, and whether it is ending (COMMIT or ROLLBACK).
    SQLAlchemy fires ``commit``/``rollback`` before it calls the driver, and ``handle_error``
    with no statement when COMMIT or ROLLBACK fails.
    """

    def __init__(self, *engines: sa.Engine) -> None:
        self.by_request: dict[int, list[tuple[str, str]]] = defaultdict(list)
        self.outside_requests: list[tuple[str, str]] = []
        self.round_trips = 0  # statements, COMMITs and ROLLBACKs sent: the cost of a variant
        for engine in engines:  # an app's engines (binds) and an async engine's sync_engine
            event.listen(engine, "begin", self._begin)
            event.listen(engine, "before_cursor_execute", self._statement)
            event.listen(engine, "commit", self._commit)
            event.listen(engine, "rollback", self._rollback)
            event.listen(engine, "handle_error", self._error)

    @staticmethod
    def _info(connection: sa.Connection) -> dict[str, Any]:
        # An invalidated connection has no DBAPI connection left (its info raises): nothing
        # reaches the server on it any more, so there is nothing to follow.
        return {} if connection.invalidated else connection.info

    def _begin(self, connection: sa.Connection) -> None:
        self._info(connection).update(bench_statements=0, bench_ending=None)

    def _statement(self, connection: sa.Connection, *_args: object) -> None:
        self.round_trips += 1
        info = self._info(connection)
        info["bench_statements"] = info.get("bench_statements", 0) + 1

    def _commit(self, connection: sa.Connection) -> None:
        self.round_trips += 1
        # Its own key: dropsafe reads the xid in this same event, a statement after this one.
        self._info(connection)["bench_ending"] = "COMMIT"

    def _rollback(self, connection: sa.Connection) -> None:
        self.round_trips += 1
        self._info(connection)["bench_ending"] = "ROLLBACK"

    def _error(self, context: sa.engine.ExceptionContext) -> None:
        if context.is_pre_ping:
            return  # pool_pre_ping's own ping: the pool reconnects, the app never sees it
        connection = context.connection
        info = self._info(connection) if connection is not None else {}
        if connection is None or connection.closed:
            place = "connect"
        elif context.statement is None:
            ending = info.get("bench_ending")
            place = {"COMMIT": "commit", "ROLLBACK": "rollback/close"}.get(ending, "other")
        elif info.get("bench_statements", 0) <= 1:
            place = "first statement"
        else:
            place = "mid-transaction"
        error = context.original_exception
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        # A CommitOutcomeUnknown's reason is what tells one from another: kept, not its head.
        text = text.partition("cannot be known: ")[2][:120] or text[:90]
        what = f"{type(error).__name__}: {text}"
        request = _REQUEST.get()
        if request is None:
            self.outside_requests.append((place, what))
        else:
            self.by_request[request].append((place, what))


@dataclass
class RunResult:
    """One run of one variant."""

    requests: int = 0
    ok: int = 0
    failed: Counter[str] = field(default_factory=Counter)  # 5xx by where the error happened
    raised_after_reply: Counter[str] = field(default_factory=Counter)
    absorbed: Counter[str] = field(default_factory=Counter)  # errors in requests answered 2xx/4xx
    doubled_signups: int = 0
    faults: int = 0
    seconds: float = 0.0
    round_trips: int = 0
    examples: dict[str, str] = field(default_factory=dict)


class Observed:
    """ASGI wrapper: numbers each request, and classifies how it ended once it has."""

    def __init__(self, app: Any, recorder: WhereErrorsHappen, result: RunResult) -> None:  # noqa: ANN401
        self.app = app
        self.recorder = recorder
        self.result = result
        self.numbers = itertools.count()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:  # noqa: ANN401
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        number = next(self.numbers)
        token = _REQUEST.set(number)
        status: int | None = None

        async def observe(message: Any) -> None:  # noqa: ANN401
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        raised: BaseException | None = None
        try:
            await self.app(scope, receive, observe)
        except Exception as exc:
            raised = exc
            raise
        finally:
            _REQUEST.reset(token)
            self._classify(number, status, raised)

    def _classify(self, number: int, status: int | None, raised: BaseException | None) -> None:
        record_request(self.recorder, self.result, number, status, raised)


def record_request(
    recorder: WhereErrorsHappen,
    result: RunResult,
    number: int,
    status: int | None,
    raised: BaseException | None,
) -> tuple[str, str] | None:
    """Count request ``number`` in ``result``: answered, or failed where its last error was.

    Return where it failed and its error (None: answered), for a caller that counts more.
    """
    errors = recorder.by_request.pop(number, [])
    result.requests += 1
    failed = status is None or status >= 500
    if errors:
        place, what = errors[-1]
    else:
        # No database error seen by the engine's events: asyncpg lets a failed connect's
        # OSError through unwrapped, and SQLAlchemy's handle_error does not see it.
        place = "connect" if isinstance(raised, OSError) else "other"
        what = f"{type(raised).__name__}: {raised}"
    if failed:
        result.failed[place] += 1
        result.examples.setdefault(place, what)
        errors = errors[:-1]
    else:
        result.ok += 1
        if raised is not None:
            result.raised_after_reply[place] += 1
            result.examples.setdefault(f"after reply: {place}", what)
            errors = errors[:-1]
    for absorbed_place, _ in errors:
        result.absorbed[absorbed_place] += 1
    return (place, what) if failed else None


async def drive(client: httpx.AsyncClient, result: RunResult, stop: asyncio.Event) -> None:  # noqa: C901 - the request mix, one closure per request
    """Run the clients' request mix until ``stop``; each client works on its own users."""
    emails = itertools.count()

    async def client_loop(number: int) -> None:  # noqa: C901 - see drive
        # Own users and items: no request races another client's delete (a 404 or a
        # StaleDataError there would be the workload's doing, not a fault's).
        users: list[int] = []
        items: list[int] = []
        rng = random.Random(number)

        async def signup() -> None:
            email = f"user{next(emails)}@example.com"
            reply = await client.post("/users/", json={"email": email, "password": "secret-pass"})
            if reply.status_code == 200:
                users.append(reply.json()["id"])
            elif reply.status_code == 400:
                result.doubled_signups += 1

        async def add_item() -> None:
            reply = await client.post(f"/users/{rng.choice(users)}/items/", json={"title": "a"})
            if reply.status_code == 200:
                items.append(reply.json()["id"])

        async def change_user() -> None:
            body: dict[str, str] = {"full_name": "Someone"}
            if rng.random() < 0.3:
                body["password"] = "another-secret"  # noqa: S105 - test data
            await client.patch(f"/users/{rng.choice(users)}", json=body)

        async def change_item() -> None:
            if items:
                await client.put(f"/items/{rng.choice(items)}", json={"title": "b"})

        async def delete_item() -> None:
            if items:
                await client.delete(f"/items/{items.pop(rng.randrange(len(items)))}")

        async def delete_user() -> None:
            if len(users) > 10:
                await client.delete(f"/users/{users.pop(0)}")
                items.clear()  # deleted with their owner (the list does not say whose)

        mix = [
            (signup, 3),
            (lambda: client.get("/users/", params={"limit": 20}), 3),
            (lambda: client.get(f"/users/{rng.choice(users)}"), 3),
            (change_user, 2),
            (add_item, 3),
            (lambda: client.get("/items/", params={"owner_id": rng.choice(users)}), 3),
            (change_item, 2),
            (delete_item, 1),
            (delete_user, 1),
        ]
        actions = [action for action, weight in mix for _ in range(weight)]
        while not stop.is_set():
            await (signup() if not users else rng.choice(actions)())

    await asyncio.gather(*(client_loop(number) for number in range(CLIENTS)))


def fault_loop(
    server: PostgresServer, proxy: ChaosProxy, stop: threading.Event, result: RunResult
) -> None:
    """Cut every connection or terminate every backend each 0.5-1.5 s, until ``stop``."""
    rng = random.Random(21)
    faults = [lambda: proxy.cut("rst"), lambda: proxy.cut("fin"), server.terminate_backends]
    while not stop.wait(rng.uniform(0.5, 1.5)):
        rng.choice(faults)()
        result.faults += 1


async def one_run(
    example: Any,  # noqa: ANN401 - the app module
    server: PostgresServer,
    proxy: ChaosProxy,
    engine_mode: str,
    *,
    units: bool,
    seconds: float,
    faults_on: bool = True,
) -> RunResult:
    """Drive a fresh app on fresh tables for ``seconds`` under the fault loop."""
    admin = sa.create_engine(server.url("psycopg"))
    with admin.begin() as connection:
        connection.execute(sa.text('DROP TABLE IF EXISTS item, "user" CASCADE'))
    example.create_schema(admin)
    admin.dispose()
    app = example.create_app(
        proxy.route(server.url("psycopg")), engine_mode=engine_mode, units=units
    )
    result = RunResult()
    recorder = WhereErrorsHappen(app.state.engine)
    transport = httpx.ASGITransport(app=Observed(app, recorder, result), raise_app_exceptions=False)
    stop_faults = threading.Event()
    faults = threading.Thread(target=fault_loop, args=(server, proxy, stop_faults, result))
    stop = asyncio.Event()
    started = time.monotonic()
    async with httpx.AsyncClient(transport=transport, base_url="http://crud", timeout=60) as client:
        if faults_on:
            faults.start()
        task = asyncio.create_task(drive(client, result, stop))
        try:
            await asyncio.sleep(seconds)  # the run's length: the clients run meanwhile
        finally:
            stop.set()
            stop_faults.set()
            await asyncio.wait_for(task, timeout=120)
            if faults_on:
                faults.join(timeout=30)
    result.seconds = time.monotonic() - started
    result.round_trips = recorder.round_trips
    app.state.engine.dispose()
    return result


def table(rows: list[tuple[str, list[RunResult]]]) -> list[str]:
    """Totals per variant over its runs."""
    lines = [
        "| Variant | Runs | Requests | Faults | 5xx | "
        + " | ".join(f"5xx at {place}" for place in PLACES)
        + " | Raised after a 2xx | Errors absorbed | Signups committed twice"
        + " | Requests/s | Round trips/request |",
        "|---" * (10 + len(PLACES)) + "|",
    ]
    for name, results in rows:
        absorbed: Counter[str] = sum((result.absorbed for result in results), Counter())
        requests = sum(result.requests for result in results)
        lines.append(
            f"| {name} | {failure_cells(results)} | {sum(absorbed.values())} | "
            f"{sum(r.doubled_signups for r in results)} | "
            f"{requests / sum(r.seconds for r in results):.0f} | "
            f"{sum(r.round_trips for r in results) / max(requests, 1):.1f} |"
        )
    return lines


def report_run(what: str, result: RunResult, **more: object) -> None:
    """Print one run's counts as it ends (a long measurement shows its progress)."""
    extra = "".join(f", {key} {value}" for key, value in more.items())
    print(
        f"{what}: {result.requests} requests, {result.faults} faults, "
        f"5xx {dict(result.failed)}, after reply {dict(result.raised_after_reply)}{extra}",
        flush=True,
    )


def bench_arguments(description: str, *, runs: int, output: Path) -> argparse.ArgumentParser:
    """Return a parser with the options every fault benchmark here takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", type=int, default=runs)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--label", default="this branch", help="the code measured, for the file")
    parser.add_argument("--output", type=Path, default=output)
    return parser


def parse_bounded(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse the command line; refuse runs and seconds out of bounds (the loops are bounded)."""
    arguments = parser.parse_args()
    if not 1 <= arguments.runs <= 20 or not 1 <= arguments.seconds <= 300:
        parser.error("--runs must be 1..20 and --seconds 1..300 (the loops are bounded)")
    return arguments


def failure_cells(results: list[RunResult]) -> str:
    """Return the cells every fault table has: runs, requests, faults, failed, by place, after.

    Failed requests in total (and per run), then by where they failed (``PLACES``), then the
    errors raised after a 2xx reply.
    """
    failed: Counter[str] = sum((result.failed for result in results), Counter())
    after: Counter[str] = sum((result.raised_after_reply for result in results), Counter())
    per_run = ", ".join(str(sum(result.failed.values())) for result in results)
    return (
        f"{len(results)} | {sum(result.requests for result in results)} | "
        f"{sum(result.faults for result in results)} | {sum(failed.values())} ({per_run}) | "
        + " | ".join(str(failed[place]) for place in PLACES)
        + f" | {sum(after.values())}"
    )


def machine_line(runs: int, seconds: float) -> str:
    """Return the line that names the machine and the software measured (ends without a dot)."""
    return (
        f"Machine: {platform.node() or 'unknown'}, {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, "
        f"SQLAlchemy {sa.__version__}; {runs} runs of {seconds:g} s"
    )


def publish(
    arguments: argparse.Namespace, title: str, setup: str, table_lines: list[str], seen: list[str]
) -> None:
    """Append a section for ``--label`` to ``--output`` (made with ``title`` if new); print it.

    The section: how it was measured (``setup``, the machine named), the table, and an error
    of each kind as the app saw it (``seen``).
    """
    lines = [
        f"## {arguments.label}",
        "",
        setup,
        "",
        *table_lines,
        "",
        "One error of each kind, as the app saw it:",
        "",
        *seen,
        "",
    ]
    output: Path = arguments.output
    output.parent.mkdir(parents=True, exist_ok=True)
    before = output.read_text() if output.exists() else f"# {title}\n\n"
    output.write_text(before + "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    """Run every variant ``--runs`` times and write the results."""
    parser = bench_arguments(__doc__.splitlines()[0], runs=3, output=RESULTS)
    parser.add_argument(
        "--no-faults", action="store_true", help="no fault loop: what each variant costs"
    )
    arguments = parse_bounded(parser)
    example = load_app_module()
    rows: list[tuple[str, list[RunResult]]] = []
    examples: dict[str, dict[str, str]] = {}
    with PostgresServer() as server, ChaosProxy(server.host, server.port) as proxy:
        for name, engine_mode, units in VARIANTS:
            results = []
            for run in range(arguments.runs):
                result = asyncio.run(
                    one_run(
                        example,
                        server,
                        proxy,
                        engine_mode,
                        units=units,
                        seconds=arguments.seconds,
                        faults_on=not arguments.no_faults,
                    )
                )
                report_run(
                    f"{name} run {run}",
                    result,
                    absorbed=dict(result.absorbed),
                    doubled=result.doubled_signups,
                )
                results.append(result)
                for place, what in result.examples.items():
                    examples.setdefault(name, {}).setdefault(place, what)
            rows.append((name, results))
    write(arguments, rows, examples)


def write(
    arguments: argparse.Namespace,
    rows: list[tuple[str, list[RunResult]]],
    examples: dict[str, dict[str, str]],
) -> None:
    """Append this measurement to the results file (one section per ``--label``)."""
    setup = (
        machine_line(arguments.runs, arguments.seconds)
        + f" per variant, {CLIENTS} clients"
        + (", no faults." if arguments.no_faults else ".")
    )
    seen = [
        f"- {name}, {place}: `{what}`"
        for name, places in examples.items()
        for place, what in sorted(places.items())
    ]
    publish(arguments, "examples/fastapi_crud under faults", setup, table(rows), seen)


if __name__ == "__main__":
    main()
