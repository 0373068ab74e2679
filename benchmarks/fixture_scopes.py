"""A user's 20-test file, with a database per test on one server against a server per test.

``python benchmarks/fixture_scopes.py [--tests 20]`` writes the same file twice into a temp
folder, once with ``postgres_database`` (one server per session, a fresh database per test) and
once with ``postgres_server`` (a fresh server per test), runs each with pytest as a user's suite
runs (the plugin loaded from the installed package), and prints the wall time of each run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUITE = """
import pytest
import sqlalchemy as sa

@pytest.mark.parametrize("n", range({tests}))
def test_a_table_of_its_own({fixture}, n):
    engine = sa.create_engine({fixture}.url("psycopg2"))
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE posts (id serial PRIMARY KEY, title text)"))
        conn.execute(sa.text("INSERT INTO posts (title) VALUES ('hello')"))
    engine.dispose()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        for fixture in ("postgres_database", "postgres_server"):
            path = Path(folder) / f"test_{fixture}.py"
            path.write_text(SUITE.format(tests=args.tests, fixture=fixture))
            started = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path.name],
                cwd=folder,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            elapsed = time.perf_counter() - started
            last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr
            print(f"{fixture:<18} {args.tests} tests  {elapsed:6.1f} s  ({last})")


if __name__ == "__main__":
    main()
