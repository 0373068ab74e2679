#!/usr/bin/env bash
# Set up (see setup.sh), then lint, type-check and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/mypy
# SQLAlchemy's own tests, plain and hardened, compared (docs/sqlalchemy-compat.md); full runs only.
if [ "$#" -eq 0 ]; then .venv/bin/python scripts/sqlalchemy_compat.py; fi
exec .venv/bin/pytest "$@"
