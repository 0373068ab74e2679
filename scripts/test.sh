#!/usr/bin/env bash
# Set up (see setup.sh), then lint, type-check, build the docs site, run the install matrix, the
# SQLAlchemy compatibility runs and the whole test suite. Each job prints its time
# ("test.sh: JOB: N s"), so that a CI log shows where the minutes go.
# DROPSAFE_SKIP_INSTALL_MATRIX=1 skips the matrix (about 2 minutes) on a developer's machine;
# CI always runs it. A quick run on a developer's machine: scripts/test.sh -m "not slow".
set -euo pipefail
cd "$(dirname "$0")/.."

# Run a job and print how long it took; return its exit status.
timed() {
    local name=$1 started=$SECONDS status=0
    shift
    "$@" || status=$?
    echo "test.sh: $name: $((SECONDS - started)) s$( ((status)) && echo " (exit $status)")"
    return "$status"
}
export -f timed

timed setup bash scripts/setup.sh

# The install matrix and SQLAlchemy's own suite mostly wait on pip and on PostgreSQL: they run
# beside the lints and pytest, niced so that the suite's own timing is not starved, each one's
# output held back and shown whole after pytest (not interleaved with it).
background=()
if [[ ${DROPSAFE_SKIP_INSTALL_MATRIX:-0} != 1 || ${CI:-} == true ]]; then
    # The built wheel in fresh venvs, each extra alone: what users get (scripts/install_matrix.py).
    background+=("timed install-matrix .venv/bin/python scripts/install_matrix.py")
fi
# SQLAlchemy's own tests, plain and hardened, compared (docs/sqlalchemy-compat.md), for the
# installed SQLAlchemy and the latest 2.0.x; full runs only (about 12 min on a fresh machine).
if [ "$#" -eq 0 ]; then
    background+=("timed sqlalchemy-compat .venv/bin/python scripts/sqlalchemy_compat.py")
    background+=("timed sqlalchemy-compat-2.0 .venv/bin/python scripts/sqlalchemy_compat.py --sqlalchemy '2.0.*'")
fi
logs=$(mktemp -d "${TMPDIR:-/tmp}/dropsafe-test-sh-XXXXXX")
background_pid=
if ((${#background[@]})); then
    # One after the other (each compat run already runs two pytest processes at once), in their
    # own process group (setsid): an interrupted or failed run ends them, servers included.
    script="status=0"
    for job in "${background[@]}"; do script+="; $job || status=1"; done
    setsid nice -n 10 bash -c "$script; exit \$status" >"$logs/background.log" 2>&1 &
    background_pid=$!
fi
finish() {
    [[ -z $background_pid ]] || kill -TERM -- "-$background_pid" 2>/dev/null || true
    rm -rf "$logs"
}
trap finish EXIT

timed ruff-check .venv/bin/ruff check src tests benchmarks scripts examples
timed ruff-format .venv/bin/ruff format --check src tests benchmarks scripts examples
timed mypy .venv/bin/mypy
# The documentation site, strict: a broken link, anchor or API reference fails the run (seconds).
NO_MKDOCS_2_WARNING=1 timed mkdocs .venv/bin/mkdocs build --strict --quiet --site-dir site
status=0
# --durations: the log names the slowest tests, where the suite's minutes go.
# -n: the suite mostly waits (timeouts, servers starting), so WORKERS processes, each with its
# own session server, share the cores. loadfile keeps a module on one worker, which starts its
# module's servers and clusters once (loadgroup would split finer, but pytest 9.2 broke its
# groups: pytest-xdist issue 1386). Each worker checks its own leftovers at its end
# (tests/conftest.py). DROPSAFE_TEST_WORKERS=0: one process, as plain pytest.
workers=${DROPSAFE_TEST_WORKERS:-4}
timed pytest .venv/bin/pytest -n "$workers" --dist loadfile --durations=20 "$@" || status=$?
if [[ -n $background_pid ]]; then
    background_status=0
    wait "$background_pid" || background_status=$?
    background_pid=
    echo "test.sh: the jobs that ran beside pytest:"
    cat "$logs/background.log"
    ((status)) || status=$background_status
fi
echo "test.sh: total: $SECONDS s"
exit "$status"
