"""examples/flask_sqlalchemy: three engines made by Flask-SQLAlchemy, hardened by the URL flag.

Driven over HTTP (the test client, and a real threaded server) while the proxy in front of the
database cuts every connection and the server terminates backends and restarts.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import pytest
from example_apps import load_example
from flask import got_request_exception
from werkzeug.serving import make_server

import dropsafe
from dropsafe._bench._ledger import Ledger, Nemesis
from dropsafe._engine.guard import guard_of

pytest.importorskip("flask_sqlalchemy")

example = load_example("flask_sqlalchemy", "dropsafe_example_flask_sqlalchemy")

DATABASES = ("notes", "accounts", "audit")
# COMMITs of notes and deposits take a while, so that cuts land while they are in flight.
SLOW_COMMIT = """
CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS
  $$ BEGIN PERFORM pg_sleep(0.03); RETURN NULL; END $$;
CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT OR UPDATE ON {table}
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();
"""
# Settings in the URL: a unit of work facing several faults a second keeps trying.
CHAOS_SETTINGS = {
    "dropsafe_max_attempts": "30",
    "dropsafe_deadline": "60",
    "dropsafe_backoff_max": "0.5",
}


def _make_app(server, proxy, *, flag, **settings):
    for name in DATABASES:
        server.execute(f"CREATE DATABASE {name}")
    params = {"plugin": "dropsafe", **settings} if flag else {}
    urls = {
        name: proxy.route(server.url("psycopg2", database=name, **params)) for name in DATABASES
    }
    app = example.create_app(urls["notes"], {"accounts": urls["accounts"], "audit": urls["audit"]})
    server.execute(SLOW_COMMIT.format(table="notes"), database="notes")
    server.execute(SLOW_COMMIT.format(table="accounts"), database="accounts")
    return app


def _engines(app):
    with app.app_context():
        return dict(example.db.engines)


def _dispose(app):
    for engine in _engines(app).values():
        engine.dispose()


@pytest.mark.fault
@pytest.mark.parametrize("flag", [True, False], ids=["with-flag", "without-flag"])
def test_a_cut_between_requests_fails_no_request_on_any_engine(postgres_server, chaos_proxy, flag):
    """Fault: every connection of all three engines reset (RST) between requests.

    Outcome: with the flag, the next reads on ``db.session`` (no retry there) succeed on every
    engine, so each is hardened. Without it, each engine's next read fails: the control.
    """
    app = _make_app(postgres_server, chaos_proxy, flag=flag)
    try:
        engines = _engines(app)
        assert set(engines) == {None, "accounts", "audit"}
        assert all((guard_of(engine) is not None) is flag for engine in engines.values())
        client = app.test_client()
        note = client.post("/notes", json={"body": "hello", "token": "t1"}).get_json()["id"]
        deposited = client.post("/accounts/alice/deposit", json={"amount": 5, "token": "t2"})
        assert deposited.get_json() == {"balance": 5}
        reads = [f"/notes/{note}", "/accounts/alice", "/audit/t2"]
        for _ in range(3):
            assert chaos_proxy.cut("rst") >= 1
            statuses = [client.get(path).status_code for path in reads]
            if not flag:
                assert statuses == [500, 500, 500]
                return
            assert statuses == [200, 200, 200]
        assert client.get("/accounts/alice").get_json() == {"name": "alice", "balance": 5}
        assert client.get("/audit/t2").get_json() == ["deposit 5 to alice"]
    finally:
        _dispose(app)


@pytest.mark.shares_server
def test_a_bad_url_setting_fails_at_startup_naming_it(postgres_server):
    url = postgres_server.url("psycopg2", plugin="dropsafe", dropsafe_deadline="soon")
    with pytest.raises(dropsafe.ConfigurationError, match="dropsafe_deadline"):
        example.create_app(url, {"accounts": url, "audit": url})


class _Clients:
    """Worker threads that post notes and deposits over HTTP and remember every answer.

    They run for ``seconds`` and until ``at_least`` notes were answered (a loaded machine is
    slow), but never past ``MAX_SECONDS``.
    """

    MAX_SECONDS = 30

    def __init__(self, base: str, workers: int, seconds: float, at_least: int) -> None:
        started = time.monotonic()
        self.base, self.at_least = base, at_least
        self.stop_at, self.give_up_at = started + seconds, started + self.MAX_SECONDS
        self.lock = threading.Lock()
        self.notes: list[str] = []  # tokens of acknowledged notes
        self.deposits: Counter[str] = Counter()  # account -> acknowledged amount
        self.deposit_tokens: list[str] = []
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._work, args=(n,)) for n in range(workers)]

    def _post(self, path: str, body: dict[str, object]) -> dict[str, object] | None:
        request = urllib.request.Request(  # noqa: S310 - a loopback http URL of the test
            self.base + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=70) as response:  # noqa: S310
                return json.loads(response.read())  # type: ignore[no-any-return]
        except (urllib.error.URLError, OSError) as exc:
            with self.lock:
                self.failures.append(f"{path}: {exc}")
            return None

    def _work(self, worker: int) -> None:
        for n in range(10_000):
            now = time.monotonic()
            if now > self.give_up_at or (
                now > self.stop_at and len(self.notes) + len(self.failures) >= self.at_least
            ):
                return
            token = f"w{worker}-{n}"
            if self._post("/notes", {"body": f"note {n}", "token": token}) is not None:
                with self.lock:
                    self.notes.append(token)
            amount = n + 1
            account = f"acct{worker}"
            answer = self._post(f"/accounts/{account}/deposit", {"amount": amount, "token": token})
            if answer is not None:
                with self.lock:
                    self.deposits[account] += amount
                    self.deposit_tokens.append(token)

    def run(self) -> None:
        for thread in self.threads:
            thread.start()
        for thread in self.threads:
            thread.join(timeout=self.MAX_SECONDS + 75)
        assert not any(thread.is_alive() for thread in self.threads), "a client hung"


@pytest.mark.fault
def test_no_request_fails_and_no_write_is_lost_or_doubled_under_faults(
    postgres_server, chaos_proxy
):
    """Faults: RST and FIN cuts of every connection, terminated backends, one fast restart.

    Outcome: every HTTP request answers 2xx; each acknowledged note and audit line is stored
    exactly once; each balance is the sum of its acknowledged deposits.
    """
    app = _make_app(postgres_server, chaos_proxy, flag=True, **CHAOS_SETTINGS)
    errors: list[str] = []  # what the app raised, to say why a request failed
    got_request_exception.connect(
        lambda sender, exception, **extra: errors.append(repr(exception)), app, weak=False
    )
    server = make_server("127.0.0.1", 0, app, threaded=True)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    ledger = Ledger()
    faults = {
        "cut-rst": (lambda: chaos_proxy.cut("rst"), None, 4),
        "cut-fin": (lambda: chaos_proxy.cut("fin"), None, 2),
        "terminate": (postgres_server.terminate_backends, None, 2),
        "restart-fast": (lambda: postgres_server.restart("fast"), 1, 1),
    }
    nemesis = Nemesis(faults, ledger, seed=15, seconds=5)
    clients = _Clients(f"http://127.0.0.1:{server.server_port}", workers=4, seconds=5, at_least=40)
    started = time.monotonic()
    try:
        nemesis.start()
        clients.run()
    finally:
        nemesis.stop.set()
        nemesis.join(timeout=60)
        server.shutdown()
        serving.join(timeout=30)
        _dispose(app)
    if nemesis.error is not None:
        raise nemesis.error
    notes = Counter(
        token for (token,) in postgres_server.execute("SELECT token FROM notes", database="notes")
    )
    audit = Counter(
        token
        for (token,) in postgres_server.execute("SELECT token FROM audit_entries", database="audit")
    )
    balances = {
        name: int(balance)
        for name, balance in postgres_server.execute(
            "SELECT name, balance FROM accounts", database="accounts"
        )
    }
    print(
        f"{time.monotonic() - started:.1f}s: notes {len(clients.notes)}, deposits "
        f"{len(clients.deposit_tokens)}, failed {len(clients.failures)}, "
        f"faults {dict(ledger.faults)}"
    )
    assert not clients.failures, (clients.failures[:5], errors[:5])
    assert sum(ledger.faults.values()) >= 5, ledger.faults
    assert len(clients.notes) >= 40, "too few requests to prove anything"
    assert notes == Counter(clients.notes), "a note was lost or written twice"
    assert audit == Counter(clients.deposit_tokens), "an audit line was lost or written twice"
    assert balances == dict(clients.deposits), "a deposit was lost or applied twice"
