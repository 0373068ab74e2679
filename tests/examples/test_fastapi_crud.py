"""examples/fastapi_crud over HTTP: its endpoints work, and dropsafe's one line keeps requests
answering when their connections die between requests and at the end of a request.

httpx's ASGI transport drives the app (FastAPI's threadpool runs its sync endpoints; an error
the app raises, even after its reply, reaches the test); PostgreSQL is real. The faults are
deterministic: every backend terminated between two requests, or the request's own connection
lost (backend terminated, socket reset or closed) after its last statement, before its session
is closed, or after a signup's first read.
"""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

import sqlalchemy as sa  # noqa: E402 - after the skips: the module needs fastapi
from example_apps import load_example  # noqa: E402
from sqlalchemy import event  # noqa: E402

from dropsafe.testing import ChaosProxy  # noqa: E402

example = load_example("fastapi_crud", "fastapi_crud_example")


def _app(server, engine_mode="harden", *, units=False, url=None):
    admin = sa.create_engine(server.url("psycopg"))
    with admin.begin() as connection:
        connection.execute(sa.text('DROP TABLE IF EXISTS item, "user" CASCADE'))
    example.create_schema(admin)
    admin.dispose()
    url = url or server.url("psycopg")
    return example.create_app(url, engine_mode=engine_mode, units=units)


def _client(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://crud")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("units", [False, True], ids=["session-per-request", "request_unit"])
async def test_the_endpoints_work(shared_server, units):
    app = _app(shared_server, units=units)
    async with _client(app) as client:
        signup = {"email": "ada@example.com", "password": "analytical", "full_name": "Ada"}
        reply = await client.post("/users/", json=signup)
        assert reply.status_code == 200, reply.text
        user = reply.json()
        assert user["email"] == "ada@example.com"
        assert "hashed_password" not in user
        assert (await client.post("/users/", json=signup)).status_code == 400

        reply = await client.post(f"/users/{user['id']}/items/", json={"title": "engine"})
        assert reply.status_code == 200, reply.text
        item = reply.json()
        reply = await client.put(f"/items/{item['id']}", json={"title": "difference engine"})
        assert reply.json()["title"] == "difference engine"
        reply = await client.patch(f"/users/{user['id']}", json={"password": "lovelace-1843"})
        assert reply.status_code == 200, reply.text
        with app.state.engine.connect() as connection:
            hashed = connection.scalar(sa.text('SELECT hashed_password FROM "user"'))
        assert example.verify_password("lovelace-1843", hashed)

        assert (await client.get("/users/")).json()["count"] == 1
        assert (await client.get(f"/users/{user['id']}")).json() == user
        reply = await client.get("/items/", params={"owner_id": user["id"]})
        assert [i["title"] for i in reply.json()["data"]] == ["difference engine"]
        assert (await client.delete(f"/items/{item['id']}")).status_code == 200
        assert (await client.delete(f"/users/{user['id']}")).status_code == 200
        assert (await client.get(f"/users/{user['id']}")).status_code == 404
    app.state.engine.dispose()


def test_a_bad_engine_mode_is_refused():
    with pytest.raises(ValueError, match="engine_mode"):
        example.make_engine("postgresql+psycopg://localhost/x", "pre-ping")


async def _requests_after_terminating_backends(server, app, rounds=3):
    """Answer statuses of reads and writes made after every backend was terminated."""
    statuses = []
    async with _client(app) as client:
        reply = await client.post("/users/", json={"email": "a@b.c", "password": "password"})
        assert reply.status_code == 200, reply.text
        user_id = reply.json()["id"]
        for _ in range(rounds):
            assert server.terminate_backends() >= 1
            for _ in range(3):  # more requests than connections left in the pool
                statuses.append((await client.get(f"/users/{user_id}")).status_code)
                reply = await client.post(f"/users/{user_id}/items/", json={"title": "x"})
                statuses.append(reply.status_code)
    return statuses


@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.timeout(90)
async def test_backends_terminated_between_requests_fail_no_request_with_harden(shared_server):
    # The fault hits: the same app on a plain engine answers 500 right after it.
    plain = _app(shared_server, "plain")
    with pytest.raises(sa.exc.OperationalError):
        await _requests_after_terminating_backends(shared_server, plain, rounds=1)
    plain.state.engine.dispose()

    app = _app(shared_server, "harden")
    assert set(await _requests_after_terminating_backends(shared_server, app)) == {200}
    app.state.engine.dispose()


@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.timeout(90)
@pytest.mark.parametrize("fault", ["terminate", "cut-rst", "cut-fin"])
async def test_a_connection_lost_at_the_end_of_a_request_does_not_reach_the_app(
    shared_server, fault
):
    """The request's connection is lost after its last statement (its backend terminated, or
    its socket reset or closed): its session's ROLLBACK meets a dead connection. With harden
    that must not reach the app (issue 20)."""
    with ChaosProxy(shared_server.host, shared_server.port) as proxy:
        app = _app(shared_server, "harden", url=proxy.route(shared_server.url("psycopg")))
        engine = app.state.engine
        armed = False

        def lose_connection_after_statement(connection, cursor, statement, *_args):
            nonlocal armed
            if armed and statement.lstrip().upper().startswith("SELECT"):
                armed = False
                if fault == "terminate":
                    pid = int(connection.connection.dbapi_connection.info.backend_pid)
                    terminated = shared_server.execute(f"SELECT pg_terminate_backend({pid}, 5000)")
                    assert terminated == [("t",)]
                else:
                    assert proxy.cut("rst" if fault == "cut-rst" else "fin") >= 1

        event.listen(engine, "after_cursor_execute", lose_connection_after_statement)
        async with _client(app) as client:
            reply = await client.post("/users/", json={"email": "a@b.c", "password": "password"})
            user_id = reply.json()["id"]
            for _ in range(3):
                armed = True
                # An error at the session's close would be raised here (ASGITransport
                # re-raises what the app raised, even after its reply).
                reply = await client.get(f"/users/{user_id}")
                assert not armed  # the fault was injected
                assert reply.status_code == 200, reply.text
        engine.dispose()


def _terminate_after_next_select(server, engine):
    """Arm a one-shot fault: the backend of the next SELECT is terminated once it answered."""
    armed = {"on": True}

    def terminate(connection, cursor, statement, *_args):
        if armed["on"] and statement.lstrip().upper().startswith("SELECT"):
            armed["on"] = False
            pid = connection.connection.dbapi_connection.info.backend_pid
            assert server.execute(f"SELECT pg_terminate_backend({int(pid)}, 5000)") == [("t",)]

    event.listen(engine, "after_cursor_execute", terminate)
    return armed


@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.timeout(90)
async def test_a_signup_whose_backend_dies_after_its_read_succeeds_with_request_unit(
    shared_server,
):
    """Issue 20's "write in the middle": the email is read, the backend dies, and the INSERT
    flushed at the CRUD function's commit meets a dead connection."""
    signup = {"email": "grace@example.com", "password": "compiler"}
    plain = _app(shared_server, "harden")
    armed = _terminate_after_next_select(shared_server, plain.state.engine)
    async with _client(plain) as client:
        with pytest.raises(sa.exc.OperationalError):  # harden alone: the request fails
            await client.post("/users/", json=signup)
    assert not armed["on"]
    plain.state.engine.dispose()

    app = _app(shared_server, "harden", units=True)
    armed = _terminate_after_next_select(shared_server, app.state.engine)
    async with _client(app) as client:
        reply = await client.post("/users/", json=signup)
        assert not armed["on"]
        assert reply.status_code == 200, reply.text
        assert (await client.get("/users/")).json()["count"] == 1
    app.state.engine.dispose()
