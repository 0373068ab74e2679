"""The server SQL catalog sends, byte for byte, what dropsafe sent before it was gathered.

The explorer's histories and the commit-truth tests were measured with these statements: a
change to one must be deliberate. The digests were taken from the statements as
_commit_truth/server_life.py, recording.py, resolution.py and failover_audit.py built them before
the catalog (sha256, first 16 hex digits); a deliberate change updates its digest here.
Session 12 changed them all on purpose: every function, view and type named with
``pg_catalog.`` (an app's function of the same name on its search_path answered before).
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
    "life_and_wal": "9a24781b5d9a7664",
    "life": "f0bb93e6067688fc",
    "server_question": "88c9a87a46cfd73d",  # + the last checkpoint's redo (session 11)
    "mark/16/True/True": "adbf0a8afaea6732",
    "mark/16/True/False": "1ee9d483ab358e91",
    "mark/16/False/True": "4debef5c905f7aae",
    "mark/16/False/False": "9b3b4a862f53d5bd",
    "status/16": "a528e4c0a799c19d",
    "fence/16/True": "bd1f104cf121f9ed",
    "fence/16/False": "5fcc180ce8e4daad",
    "audit/16": "0bc7f25791357676",
    "mark/13/True/True": "adbf0a8afaea6732",
    "mark/13/True/False": "1ee9d483ab358e91",
    "mark/13/False/True": "4debef5c905f7aae",
    "mark/13/False/False": "9b3b4a862f53d5bd",
    "status/13": "a528e4c0a799c19d",
    "fence/13/True": "b130261a33707131",
    "fence/13/False": "4d900d7feb758827",
    "audit/13": "0bc7f25791357676",
    "mark/12/True/True": "fcfc1f466b9eff2d",
    "mark/12/True/False": "8a4f895aac617862",
    "mark/12/False/True": "e4c92e4a15c5fa20",
    "mark/12/False/False": "71c9c4af3e961dd9",
    "status/12": "b543b6482e28c7af",
    "fence/12/True": "b130261a33707131",
    "fence/12/False": "4d900d7feb758827",
    "audit/12": "ac8c35e864872894",
    "mark/none/True/True": "adbf0a8afaea6732",
    "mark/none/True/False": "1ee9d483ab358e91",
    "mark/none/False/True": "4debef5c905f7aae",
    "mark/none/False/False": "9b3b4a862f53d5bd",
    "status/none": "a528e4c0a799c19d",
    "fence/none/True": "bd1f104cf121f9ed",
    "fence/none/False": "5fcc180ce8e4daad",
    "audit/none": "0bc7f25791357676",
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
