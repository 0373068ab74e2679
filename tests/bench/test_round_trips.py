"""benchmarks/round_trips.py counts what a request really sends: known shapes, known flights.

A plain pool's single query in a Session is BEGIN, the query and the ROLLBACK of the Session's
close (three round trips); ``pool_pre_ping`` adds its ping before them; a verified one-INSERT
unit of dropsafe reads its xid in a round trip before COMMIT. If the proxy missed a flight, or
counted connecting or the pool's goodbye, these counts would move.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from dropsafe._bench._flights import FlightProxy

pytestmark = pytest.mark.shares_server

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "round_trips.py"


@pytest.fixture(scope="module")
def round_trips():
    sys.path.insert(0, str(_PATH.parent))
    try:
        yield importlib.import_module(_PATH.stem)
    finally:
        sys.path.remove(str(_PATH.parent))
        sys.modules.pop(_PATH.stem, None)


@pytest.fixture(scope="module")
def proxied(shared_server, round_trips):
    for statement in round_trips.SCHEMA:
        shared_server.execute(statement)
    with FlightProxy(shared_server.port) as proxy:
        # Plaintext through the proxy, so that it can name each flight's first message.
        url = sa.make_url(shared_server.url("psycopg2", sslmode="disable"))
        yield proxy, url.set(port=proxy.port).render_as_string(hide_password=False)


def test_a_plain_query_in_a_session_is_begin_query_rollback(round_trips, proxied) -> None:
    proxy, url = proxied
    found = round_trips.count(proxy, "psycopg2", "plain", "query", url, requests=3)
    assert found.per_request == 3
    assert found.labels == ["Q BEGIN", "Q SELECT 1", "Q ROLLBACK"]


def test_pre_ping_pays_one_round_trip_more(round_trips, proxied) -> None:
    proxy, url = proxied
    found = round_trips.count(proxy, "psycopg2", "pre_ping", "query", url, requests=3)
    assert found.per_request == 4
    assert found.labels[1:] == ["Q BEGIN", "Q SELECT 1", "Q ROLLBACK"]


def test_a_verified_unit_reads_its_xid_in_its_inserts_flight(round_trips, proxied) -> None:
    # The default since session 14 (read_xid_in_flight): the xid rides the INSERT's flight (a
    # DO block's NOTICE in the same query string), no round trip of its own. Off, the mark
    # before COMMIT makes one more: tests/units/test_write_path_cost.py. Since session 17
    # BEGIN rides the same query string (3 flights before: BEGIN alone).
    proxy, url = proxied
    found = round_trips.count(proxy, "psycopg2", "dropsafe", "unit verified", url, requests=3)
    assert found.per_request == 2
    assert found.labels[0].startswith("Q BEGIN; DO $dropsafe$")
    assert found.labels[1] == "Q COMMIT"
