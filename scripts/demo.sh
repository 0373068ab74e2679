#!/usr/bin/env bash
# Run the demo (the blog, plain and with dropsafe, through faults), installing only what it needs:
# PostgreSQL and openssl (apt-get, as root, when missing) and a venv with the `demo` extra. The
# full bench the tests use (Chromium, Patroni, etcd, HAProxy, PgBouncer, nftables) is
# scripts/setup.sh's, run by scripts/test.sh. Arguments go to `dropsafe demo` (--duration ...).
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/base_packages.sh
PYTHON=${PYTHON:-python3}
"$PYTHON" -c "import venv, ensurepip" 2>/dev/null || need_apt+=(python3-venv)
extras=demo
if ((${#need_apt[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "demo: apt-get install ${need_apt[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${need_apt[@]}" >/dev/null
    elif [[ " ${need_apt[*]} " == *" postgresql "* ]]; then
        # Not root: PostgreSQL comes from the pgserver wheel instead.
        echo "demo: no PostgreSQL here; using the embedded build (pip: pgserver)" >&2
        extras=demo,embedded
    fi
fi

if [[ ! -x .venv/bin/python ]]; then
    "$PYTHON" -m venv .venv
fi
# The dev venv (scripts/setup.sh) has the demo extra already: then this installs nothing.
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extras]" 2>&1 \
    | grep -v "^WARNING: Location" || true
exec .venv/bin/dropsafe demo "$@"
