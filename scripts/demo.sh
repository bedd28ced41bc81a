#!/usr/bin/env bash
# The main job: the sidecar with its default config, an instrumented torch service, traffic,
# and a report of what was kept, redacted and forwarded. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/run_demo.py "$@"
