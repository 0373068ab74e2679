#!/usr/bin/env bash
# Set up (see setup.sh), then lint, type-check and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/mypy
# SQLAlchemy's own tests, plain and hardened, compared (docs/sqlalchemy-compat.md), for the
# installed SQLAlchemy and the latest 2.0.x; full runs only (about 12 min on a fresh machine).
if [ "$#" -eq 0 ]; then
    .venv/bin/python scripts/sqlalchemy_compat.py
    .venv/bin/python scripts/sqlalchemy_compat.py --sqlalchemy '2.0.*'
fi
exec .venv/bin/pytest "$@"
