#!/usr/bin/env bash
# Set up (see setup.sh), then run the demo: the blog, plain and with dropsafe, through faults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/dropsafe demo "$@"
