"""The explorer's own pieces: flights counted at direction changes, and a checker that fails."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections import Counter

import pytest

from dropsafe._bench._explore import FAULTS, Outcome, check, parse_history
from dropsafe._bench._flights import FlightProxy, Strike, label_of
from dropsafe._bench._shapes import APP_ROLE, CATALOG, Effects

READY = b"Z\x00\x00\x00\x05I"


def _query(text: str) -> bytes:
    body = text.encode() + b"\x00"
    return b"Q" + (4 + len(body)).to_bytes(4, "big") + body


class _Replier(threading.Thread):
    """A loopback server that answers every message it reads with one ReadyForQuery."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received: list[bytes] = []
        self.start()

    def run(self) -> None:
        with self.listener:
            connection, _ = self.listener.accept()
        with connection, contextlib.suppress(OSError):  # a reset link ends the server too
            while data := connection.recv(65536):
                self.received.append(data)
                connection.sendall(READY)


def _round_trips(port: int, messages: list[bytes]) -> list[bytes]:
    replies = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        for message in messages:
            client.sendall(message)
            try:
                replies.append(client.recv(65536))
            except OSError:
                replies.append(b"")
    return replies


def test_flights_are_counted_per_direction_change_and_startup_is_apart() -> None:
    replier = _Replier()
    with FlightProxy(replier.port) as proxy:
        _round_trips(proxy.port, [b"\x00\x00\x00\x08startup", _query("BEGIN"), _query("COMMIT")])
        flights = proxy.flights
    assert [f.startup for f in flights] == [True, False, False]
    assert [f.label for f in flights if not f.startup] == ["Q BEGIN", "Q COMMIT"]


def test_a_strike_after_the_flight_delivers_it_and_withholds_the_reply() -> None:
    replier = _Replier()
    with FlightProxy(replier.port) as proxy:
        proxy.reset(Strike(step=2, phase="after", then="fin"))
        replies = _round_trips(
            proxy.port, [b"\x00\x00\x00\x08startup", _query("BEGIN"), _query("COMMIT")]
        )
        assert proxy.strike is not None
        assert proxy.strike.fired
    assert replies[:2] == [READY, READY]
    assert replies[2] == b""  # the COMMIT's reply never reached the client
    assert _query("COMMIT") in b"".join(replier.received)  # but the server had it


def test_a_strike_before_the_flight_never_delivers_it() -> None:
    replier = _Replier()
    with FlightProxy(replier.port) as proxy:
        proxy.reset(Strike(step=1, phase="before", then="rst"))
        _round_trips(proxy.port, [b"\x00\x00\x00\x08startup", _query("INSERT 1")])
    replier.join(5)
    assert _query("INSERT 1") not in b"".join(replier.received)


def test_labels_name_the_first_message() -> None:
    assert label_of(_query("COMMIT")) == "Q COMMIT"
    assert label_of(b"X\x00\x00\x00\x04") == "terminate"
    assert label_of(b"\x00\x00\x00\x08\x04\xd2\x16\x2f") == "startup"


ROW = ("a", APP_ROLE, "a")
SHAPE = CATALOG["session_insert"]
WANT = Effects(Counter([ROW]))


def _verdict(outcome: str, rows: list[tuple[str, str, str]], *, roles=None, shape=SHAPE):
    return check(
        shape,
        Outcome(outcome),
        WANT,
        Counter(rows),
        Counter(),
        roles or {APP_ROLE},
        commit_sent=True,
    )


def test_a_planted_duplicate_row_is_a_violation() -> None:
    assert _verdict("ok", [ROW]).violation is None
    verdict = _verdict("ok", [ROW, ROW])
    assert verdict.violation is not None
    assert "2x (want 1)" in verdict.violation


def test_the_checker_rules() -> None:
    assert _verdict("ok", []).violation is not None  # acknowledged, row missing
    assert _verdict("error", [ROW]).violation is not None  # failed, yet written
    assert _verdict("error", []).violation is None
    assert _verdict("refused", []).violation is None
    assert _verdict("refused", [ROW]).violation is not None
    unknown = _verdict("unknown", [ROW])
    assert unknown.violation is None
    assert unknown.unknown
    assert _verdict("unknown", [ROW, ROW]).violation is not None  # never twice
    assert _verdict("ok", [ROW], roles={APP_ROLE, "postgres"}).violation is not None
    wrong_schema = ("a", "public", "a")
    assert _verdict("ok", [wrong_schema]).violation is not None
    # CommitOutcomeUnknown from a server that stayed up and could answer is a defect.
    assert (
        check(
            SHAPE,
            Outcome("unknown", "the server crashed"),
            WANT,
            Counter([ROW]),
            Counter(),
            {APP_ROLE},
            commit_sent=True,
            server_can_tell=True,
        ).violation
        is not None
    )
    # The app committed part of the work itself (the DBAPI connection's commit() inside the
    # unit): CommitOutcomeUnknown saying so may leave any part of the effects, never twice.
    two = Effects(Counter([ROW, ("a", APP_ROLE, "b")]))
    for seen, broken in (([], False), ([ROW], False), ([ROW, ROW], True)):
        partial = check(
            SHAPE, Outcome("partial"), two, Counter(seen), Counter(), {APP_ROLE}, commit_sent=True
        )
        assert (partial.violation is not None, partial.unknown) == (broken, True)
    # Whether the app's own commit committed cannot be known: a defect where the server could
    # have told, as for any unknown.
    from dropsafe._commit_truth.resolution import APP_ENDED_UNKNOWN

    for can_tell in (False, True):
        doubt = check(
            SHAPE,
            Outcome("partial", f"{APP_ENDED_UNKNOWN}: ...the server crashed"),
            two,
            Counter([ROW]),
            Counter(),
            {APP_ROLE},
            commit_sent=True,
            server_can_tell=can_tell,
        )
        assert (doubt.violation is not None, doubt.unknown) == (can_tell, True)
    # Outside a unit, a raise for a COMMIT that was sent may leave the effect.
    zero_code = CATALOG["plain_request"]
    assert _verdict("error", [ROW], shape=zero_code).unknown


def test_history_ids_round_trip_and_bad_ones_are_refused() -> None:
    history = parse_history("session_insert:psycopg2:fin:7")
    assert history.id == "session_insert:psycopg2:fin:7"
    from dropsafe import ConfigurationError

    for bad in ("session_insert:psycopg2:fin", "nope:psycopg2:fin:1", "x:y:z:w"):
        with pytest.raises(ConfigurationError):
            parse_history(bad)


def test_every_shape_has_a_face_and_every_fault_a_known_phase() -> None:
    assert all(shape.faces() for shape in CATALOG.values())
    assert {fault.phase for fault in FAULTS.values()} <= {"before", "after"}


def test_every_shape_goes_a_known_route_and_the_pooled_ones_are_in_the_catalog() -> None:
    from dropsafe._bench._pooler import ROUTES
    from dropsafe._bench._shapes import POOLED

    assert {shape.route for shape in CATALOG.values()} == set(ROUTES)
    for route, bases in POOLED.items():
        for base in bases:
            pooled = CATALOG[f"{base}_via_{route}"]
            assert pooled.route == route
            assert pooled.faces() == CATALOG[base].faces()
            assert pooled.zero_code == CATALOG[base].zero_code


def test_a_pooler_gives_drivers_what_transaction_mode_needs() -> None:
    from dropsafe._bench._pooler import ROUTES, driver_kw

    assert driver_kw("asyncpg", ROUTES["direct"]) == {}
    assert driver_kw("asyncpg", ROUTES["pgbouncer_session"]) == {}
    # Declared to dropsafe (ConnectionPolicy.pooler): dropsafe sets the drivers up.
    assert ROUTES["pgbouncer_tx"].pooler == "transaction"
    assert driver_kw("asyncpg", ROUTES["pgbouncer_tx"]) == {}
    assert driver_kw("psycopg", ROUTES["pgbouncer_tx_upstream"]) == {}
    # Not declared: the app sets them up by hand, as their documentation says.
    undeclared = ROUTES["pgbouncer_tx_undeclared"]
    assert undeclared.pooler is None
    asyncpg = driver_kw("asyncpg", undeclared)["connect_args"]
    assert asyncpg["statement_cache_size"] == 0
    names = asyncpg["prepared_statement_name_func"]
    assert names() != names()  # one backend's statement is never another's
    assert driver_kw("psycopg", undeclared) == {"connect_args": {"prepare_threshold": None}}
    assert driver_kw("psycopg2", undeclared) == {}


def test_the_bench_refuses_a_driver_it_makes_no_url_for() -> None:
    from dropsafe import ConfigurationError
    from dropsafe._bench._engines import bench_driver

    assert bench_driver("asyncpg") == "asyncpg"
    with pytest.raises(ConfigurationError, match="no URL for the driver 'mysqldb'"):
        bench_driver("mysqldb")


def test_a_history_id_has_four_parts_and_a_numbered_step() -> None:
    from dropsafe import ConfigurationError

    for text in ("commit_only:psycopg2:rst", "a:b:c:d:1", "commit_only:psycopg2:rst:x"):
        with pytest.raises(ConfigurationError, match="shape:driver:fault:step"):
            parse_history(text)


def test_the_xid_read_axis_is_a_fifth_field_and_old_ids_still_parse() -> None:
    from dropsafe import ConfigurationError

    old = parse_history("session_insert:psycopg2:fin:7")
    assert (old.read, old.id) == ("mark", "session_insert:psycopg2:fin:7")
    flight = parse_history("session_insert:psycopg2:fin:7:flight")
    assert (flight.read, flight.id) == ("flight", "session_insert:psycopg2:fin:7:flight")
    assert parse_history(flight.id) == flight
    # The default spelled out is the four-field id (one id per history).
    assert parse_history("session_insert:psycopg2:fin:7:mark") == old
    for bad in ("session_insert:psycopg2:fin:7:on", "session_insert:psycopg2:fin:7:flight:x"):
        with pytest.raises(ConfigurationError, match="shape:driver:fault:step"):
            parse_history(bad)


def test_the_xid_read_axis_reaches_the_policy_and_a_plugin_url() -> None:
    from dropsafe._bench._explore import Explorer
    from dropsafe._bench._shapes import Context, _plugin_request_sync

    assert Explorer.policy().pool.read_xid_in_flight is False
    assert Explorer.policy(read="flight").pool.read_xid_in_flight is True
    from dropsafe._engine_state import state_of

    seen = []

    class _Stop(Exception):
        pass

    def warm(engine):
        seen.append(state_of(engine).policy.pool.read_xid_in_flight)
        raise _Stop

    for read in (True, False):
        ctx = Context({"a": "postgresql+psycopg2://u@h/d"}, Explorer.policy(), "n")
        ctx.read_xid_in_flight = read
        ctx.warm = warm  # type: ignore[method-assign]
        with pytest.raises(_Stop):
            _plugin_request_sync(ctx)
    # The plugin read dropsafe_read_xid_in_flight from the URL, both ways (True is the default).
    assert seen == [True, False]


def test_the_sample_draws_both_reads_and_zero_code_shapes_read_by_the_mark() -> None:
    from dropsafe._bench._explore import READS, Explorer

    explorer = Explorer()  # cells() needs no server
    cells = explorer.cells(faults=["none"], include_expected=False)
    assert {read for *_, read in cells} == set(READS)
    zero_code = {name for name, shape in CATALOG.items() if shape.zero_code}
    assert all(read == "mark" for shape, _, _, read in cells if shape in zero_code)
    mark_known = {name for name, shape in CATALOG.items() if shape.mark_violation}
    assert cells_of(cells, "flight") - mark_known <= cells_of(cells, "mark")
    marks = explorer.cells(faults=["none"], reads=("mark",))
    assert {read for *_, read in marks} == {"mark"}


def cells_of(cells, read):
    return {shape for shape, _, _, r in cells if r == read}


def test_the_matrix_shows_the_xid_read_and_the_json_keeps_it() -> None:
    import json
    import tempfile
    from pathlib import Path

    from dropsafe._bench._explore import Record
    from dropsafe._bench._explore_report import matrix_lines, read_json, write_json

    records = [
        Record(
            parse_history(text),
            Outcome("ok"),
            None,
            unknown=False,
            seconds=0.1,
            fired=True,
            expected_violation=None,
        )
        for text in ("session_insert:psycopg2:fin:3", "session_insert:psycopg2:fin:3:flight")
    ]
    lines = matrix_lines(records, command="x", seconds=1.0)
    assert any(line.startswith("| shape | xid read | drivers |") for line in lines)
    assert any(line.startswith("| session_insert | flight |") for line in lines)
    assert any(line.startswith("| session_insert | mark |") for line in lines)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "part.json"
        write_json(path, records, command="x", seed=1)
        assert [r.history for r in read_json(path)] == [r.history for r in records]
        cells = json.loads(path.read_text())["cells [histories, violations, unknowns, seconds]"]
        assert set(cells) == {"session_insert:psycopg2:fin", "session_insert:psycopg2:fin:flight"}


def test_the_issue_28_shapes_are_in_the_catalog_and_the_broken_ones_known() -> None:
    from dropsafe._bench._shapes import FLIGHT_SHAPES

    names = {shape.name for shape in FLIGHT_SHAPES}
    assert names <= set(CATALOG)
    assert not {shape.name for shape in FLIGHT_SHAPES if shape.expected_violation}
    # Only the mark reads no xid before the app's own commit(): its histories stay known.
    known = {shape.name for shape in FLIGHT_SHAPES if shape.mark_violation}
    assert known == {
        "raw_commit_then_raw_write",
        "raw_commit_then_write",
        "raw_commit_only",
        "two_engines_raw_commit",
    }
    assert all("issue 28" in CATALOG[name].mark_violation for name in known)


def test_a_mark_only_break_leaves_the_flight_histories_in_the_sample() -> None:
    from dropsafe._bench._explore import Explorer

    cells = Explorer().cells(
        shapes=["raw_commit_then_raw_write"], faults=["none"], include_expected=False
    )
    assert {read for *_, read in cells} == {"flight"}
    every = Explorer().cells(shapes=["raw_commit_then_raw_write"], faults=["none"])
    assert {read for *_, read in every} == {"mark", "flight"}
    assert CATALOG["session_insert_via_pgbouncer_session_undeclared"].route == (
        "pgbouncer_session_undeclared"
    )
