"""The server SQL catalog sends, byte for byte, what dropsafe sent before it was gathered.

The explorer's histories and the commit-truth tests were measured with these statements: a
change to one must be deliberate. The digests were taken from the statements as
_commit_truth/server_life.py, recording.py, resolution.py and failover_audit.py built them before
the catalog (sha256, first 16 hex digits); a deliberate change updates its digest here.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest

from dropsafe._commit_truth import server_sql

VERSIONS = {"16": (16, 1), "13": (13, 0), "12": (12, 5), "none": None}
XID = 5_000_000_123  # past 2**32: the 32-bit comparisons must wrap it
PID = 4242

BEFORE = {
    "life_and_wal": "1a7f453f677a8718",
    "life": "5e2ee069bd8e7e36",
    "server_question": "fde1566f739f158c",  # + the last checkpoint's redo (session 11)
    "mark/16/True/True": "99066e5b1848cc8c",
    "mark/16/True/False": "6ec526bea27e8591",
    "mark/16/False/True": "2c53986ccd226a6b",
    "mark/16/False/False": "e00f47ab87d87253",
    "status/16": "c1d34519aae534b3",
    "fence/16/True": "44647e2682a1a1b5",
    "fence/16/False": "bfe3f1df431802aa",
    "audit/16": "cdb55d432f51c1c9",
    "mark/13/True/True": "99066e5b1848cc8c",
    "mark/13/True/False": "6ec526bea27e8591",
    "mark/13/False/True": "2c53986ccd226a6b",
    "mark/13/False/False": "e00f47ab87d87253",
    "status/13": "c1d34519aae534b3",
    "fence/13/True": "0ed9a7351ac182e1",
    "fence/13/False": "01c804e2e44c71b1",
    "audit/13": "cdb55d432f51c1c9",
    "mark/12/True/True": "b03a997d857c70d7",
    "mark/12/True/False": "07c3199afcb8ddfd",
    "mark/12/False/True": "4d20a55ce99123d0",
    "mark/12/False/False": "1640fbb4bbcd6a37",
    "status/12": "09afc144c9cc84ac",
    "fence/12/True": "0ed9a7351ac182e1",
    "fence/12/False": "01c804e2e44c71b1",
    "audit/12": "d37a88b52e56f237",
    "mark/none/True/True": "99066e5b1848cc8c",
    "mark/none/True/False": "6ec526bea27e8591",
    "mark/none/False/True": "2c53986ccd226a6b",
    "mark/none/False/False": "e00f47ab87d87253",
    "status/none": "c1d34519aae534b3",
    "fence/none/True": "44647e2682a1a1b5",
    "fence/none/False": "bfe3f1df431802aa",
    "audit/none": "cdb55d432f51c1c9",
}


def _statements() -> dict[str, str]:
    made = {
        "life_and_wal": server_sql.LIFE_AND_WAL,
        "life": server_sql.LIFE,
        "server_question": server_sql.SERVER_QUESTION,
    }
    for name, version in VERSIONS.items():
        dialect = SimpleNamespace(server_version_info=version)
        for life in (True, False):
            for wal in (True, False):
                made[f"mark/{name}/{life}/{wal}"] = server_sql.mark_statement(
                    dialect, with_life=life, with_wal=wal
                )
        made[f"status/{name}"] = server_sql.status_statement(dialect, xid=XID, backend_pid=PID)
        for any_state in (True, False):
            made[f"fence/{name}/{any_state}"] = server_sql.fence_statement(
                dialect, xid=XID, backend_pid=PID, wait_ms=2500, any_state=any_state
            )
        made[f"audit/{name}"] = server_sql.audit_question(dialect, [700, XID])
    return made


STATEMENTS = _statements()


@pytest.mark.parametrize("case", sorted(BEFORE))
def test_each_statement_is_the_one_sent_before(case):
    digest = hashlib.sha256(STATEMENTS[case].encode()).hexdigest()[:16]
    assert digest == BEFORE[case], STATEMENTS[case]


def test_every_statement_is_pinned():
    assert set(STATEMENTS) == set(BEFORE)


def test_an_unknown_server_version_gets_the_newest_statements():
    unknown = SimpleNamespace(server_version_info=None)
    newest = SimpleNamespace(server_version_info=(17, 0))
    assert server_sql.status_statement(unknown, xid=1, backend_pid=2) == (
        server_sql.status_statement(newest, xid=1, backend_pid=2)
    )
    assert "pg_terminate_backend(pid, 100)" in server_sql.fence_statement(
        unknown, xid=1, backend_pid=2, wait_ms=100, any_state=False
    )
    assert "txid_status" in server_sql.status_statement(
        SimpleNamespace(server_version_info=(12, 0)), xid=1, backend_pid=2
    )
