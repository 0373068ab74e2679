#!/usr/bin/env bash
# Set up (see setup.sh), then show the problem dropsafe solves on a throwaway server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/dropsafe reproduce "$@"
