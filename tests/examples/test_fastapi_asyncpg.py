"""examples/fastapi_asyncpg over HTTP while its connections are cut, its backends terminated
and the server restarted: no request fails, no acknowledged note is lost, none is doubled.

The app is driven through httpx's ASGI transport with its lifespan run, as a server would;
PostgreSQL is real, behind a ChaosProxy. The faults come one after another, each once the
writers have made progress since the last (no sleeps); every step is bounded in time.
"""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from example_apps import load_example  # noqa: E402 - after the skips: the app needs fastapi

import dropsafe  # noqa: E402
from dropsafe.testing import ChaosProxy  # noqa: E402

WRITERS = 4
PROGRESS = 5  # notes acknowledged between two faults
STEP_TIMEOUT = 40.0


@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.timeout(150)
async def test_no_request_fails_and_no_note_is_lost_or_doubled(postgres_server):  # noqa: PLR0915 - one scenario
    example = load_example("fastapi_asyncpg", "fastapi_asyncpg_example")
    with ChaosProxy(postgres_server.host, postgres_server.port) as proxy:
        app = example.create_app(
            proxy.route(postgres_server.url("asyncpg")),
            policy=dropsafe.Policy(unit=dropsafe.UnitPolicy(deadline=30)),
        )
        faults = [
            ("cut-rst", lambda: proxy.cut("rst")),
            ("terminate", postgres_server.terminate_backends),
            ("cut-fin", lambda: proxy.cut("fin")),
            ("restart", lambda: postgres_server.restart("fast")),
            ("terminate", postgres_server.terminate_backends),
            ("cut-rst", lambda: proxy.cut("rst")),
            ("restart", lambda: postgres_server.restart("fast")),
            ("cut-fin", lambda: proxy.cut("fin")),
        ]
        acknowledged: dict[str, int] = {}  # request_id -> note id
        failures: list[str] = []
        reads = 0
        stop = asyncio.Event()

        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://notes", timeout=60
            ) as client,
        ):

            async def writer(number: int) -> None:
                sequence = 0
                while not stop.is_set():
                    request_id = f"w{number}-{sequence}"
                    sequence += 1
                    try:
                        reply = await client.post(
                            "/notes", json={"text": "hello", "request_id": request_id}
                        )
                    except Exception as exc:
                        failures.append(f"{request_id}: {type(exc).__name__}: {exc}")
                        continue
                    if reply.status_code != 201:
                        failures.append(f"{request_id}: {reply.status_code} {reply.text}")
                        continue
                    acknowledged[request_id] = reply.json()["id"]

            async def reader() -> None:
                nonlocal reads
                while not stop.is_set():
                    try:
                        reply = await client.get("/notes")
                    except Exception as exc:
                        failures.append(f"GET /notes: {type(exc).__name__}: {exc}")
                        continue
                    if reply.status_code != 200:
                        failures.append(f"GET /notes: {reply.status_code} {reply.text}")
                    reads += 1

            async def progress_since(mark: int) -> None:
                deadline = time.monotonic() + STEP_TIMEOUT
                while len(acknowledged) < mark + PROGRESS:
                    assert time.monotonic() < deadline, f"no progress: {failures[:3]}"
                    assert not failures, failures[:3]
                    await asyncio.sleep(0.01)  # yields to the writers; the loop waits on them

            tasks = [asyncio.create_task(writer(n)) for n in range(WRITERS)]
            tasks.append(asyncio.create_task(reader()))
            try:
                for name, fault in faults:
                    await progress_since(len(acknowledged))
                    print(f"fault {name} after {len(acknowledged)} notes")
                    await asyncio.to_thread(fault)
                await progress_since(len(acknowledged))
            finally:
                stop.set()
                await asyncio.gather(*tasks)

            assert failures == [], failures[:5]
            # The request-scoped session dependency reads a note back, faults over.
            some_id, note_id = next(iter(acknowledged.items()))
            reply = await client.get(f"/notes/{note_id}")
            assert reply.status_code == 200
            assert reply.json()["request_id"] == some_id

    rows = postgres_server.execute("SELECT request_id, count(*) FROM notes GROUP BY request_id")
    stored = {request_id: int(count) for request_id, count in rows}
    lost = [request_id for request_id in acknowledged if request_id not in stored]
    doubled = {request_id: count for request_id, count in stored.items() if count > 1}
    print(f"{len(acknowledged)} notes acknowledged, {reads} reads, {len(faults)} faults")
    assert lost == []
    assert doubled == {}
    # Every request was answered, so every note stored was acknowledged.
    assert set(stored) == set(acknowledged)
