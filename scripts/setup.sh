#!/usr/bin/env bash
# Install what dropsafe's demo and tests need on a fresh Debian/Ubuntu machine, then a venv.
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/base_packages.sh
command -v nft >/dev/null || need_apt+=(nftables)
command -v iptables >/dev/null || need_apt+=(iptables)
# idle_reaper lists the kernel's tracked flows with it.
command -v conntrack >/dev/null || need_apt+=(conntrack)
command -v pgbouncer >/dev/null || [[ -x /usr/sbin/pgbouncer ]] || need_apt+=(pgbouncer)
# The blog's end-to-end test drives Debian's Chromium (no browser download).
command -v chromium >/dev/null || need_apt+=(chromium)
command -v chromedriver >/dev/null || need_apt+=(chromium-driver)
# The high-availability bench (dropsafe.testing.PatroniCluster): Patroni, etcd as its store, HAProxy.
[[ -x /usr/bin/patroni ]] || need_apt+=(patroni)
[[ -x /usr/bin/etcd ]] || need_apt+=(etcd-server)
command -v etcdctl >/dev/null || need_apt+=(etcd-client)
command -v haproxy >/dev/null || [[ -x /usr/sbin/haproxy ]] || need_apt+=(haproxy)
if ((${#need_apt[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "setup: apt-get install ${need_apt[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
    else
        echo "setup: missing ${need_apt[*]}; install them (as root: apt-get install ${need_apt[*]})," \
             "or rely on the embedded PostgreSQL (pgserver, no TLS) that the venv brings" >&2
    fi
fi

# Patroni 4.1 from PyPI for PatroniCluster (it prefers it to Debian's 3.0.2, which loses
# acknowledged writes when a hung leader resumes: benchmarks/results/HA.md). Built with the system
# Python, outside the clone and readable by all: the `postgres` user runs it, and cannot run a
# Python under /root. Skipped when the right version is already there.
PATRONI_VENV=/opt/dropsafe-patroni
PATRONI_SPEC='patroni[etcd3,psycopg2-binary]==4.1.*'
if ! "$PATRONI_VENV/bin/patroni" --version 2>/dev/null | grep -q '^patroni 4\.1\.'; then
    if [[ $(id -u) -eq 0 ]] && [[ -x /usr/bin/python3 ]]; then
        echo "setup: $PATRONI_SPEC in $PATRONI_VENV"
        patroni_log=$(mktemp)
        if ! { rm -rf "$PATRONI_VENV" && /usr/bin/python3 -m venv "$PATRONI_VENV" \
                && "$PATRONI_VENV/bin/pip" install -q --no-cache-dir "$PATRONI_SPEC"; } >"$patroni_log" 2>&1 \
            || ! "$PATRONI_VENV/bin/patroni" --version 2>/dev/null | grep -q '^patroni 4\.1\.'; then
            cat "$patroni_log" >&2
            echo "setup: could not install $PATRONI_SPEC into $PATRONI_VENV" >&2
            rm -f "$patroni_log"
            exit 1
        fi
        rm -f "$patroni_log"
        chmod -R a+rX "$PATRONI_VENV"
    else
        echo "setup: no Patroni 4.1 in $PATRONI_VENV; PatroniCluster runs Debian's 3.0.2" \
             "(as root: bash scripts/setup.sh)" >&2
    fi
fi

# A localized server's errors are tested with German messages (lc_messages): needs the locale.
if ! locale -a 2>/dev/null | grep -qi '^de_DE\.utf-\?8$'; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        [[ -d /usr/share/i18n/locales ]] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq locales >/dev/null
        localedef -i de_DE -f UTF-8 de_DE.UTF-8
    else
        echo "setup: no de_DE.UTF-8 locale; the localized-server test will skip (as root: localedef -i de_DE -f UTF-8 de_DE.UTF-8)" >&2
    fi
fi

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    "$PYTHON" -m venv .venv 2>/dev/null || {
        [[ $(id -u) -eq 0 ]] && apt-get install -y -qq python3-venv >/dev/null && "$PYTHON" -m venv .venv
    }
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
# Fails loudly if the install did not work (mkdocstrings: test.sh builds the docs site).
.venv/bin/python -c "import dropsafe, dropsafe.testing, mkdocs, mkdocstrings_handlers.python"
