#!/usr/bin/env bash
# Set up (see setup.sh), then lint, type-check, run the install matrix and the whole test suite.
# DROPSAFE_SKIP_INSTALL_MATRIX=1 skips the matrix (about 3 minutes) on a developer's machine;
# CI always runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks scripts examples
.venv/bin/ruff format --check src tests benchmarks scripts examples
.venv/bin/mypy
if [[ ${DROPSAFE_SKIP_INSTALL_MATRIX:-0} != 1 || ${CI:-} == true ]]; then
    # The built wheel in fresh venvs, each extra alone: what users get (scripts/install_matrix.py).
    .venv/bin/python scripts/install_matrix.py
fi
# SQLAlchemy's own tests, plain and hardened, compared (docs/sqlalchemy-compat.md), for the
# installed SQLAlchemy and the latest 2.0.x; full runs only (about 12 min on a fresh machine).
if [ "$#" -eq 0 ]; then
    .venv/bin/python scripts/sqlalchemy_compat.py
    .venv/bin/python scripts/sqlalchemy_compat.py --sqlalchemy '2.0.*'
fi
exec .venv/bin/pytest "$@"
