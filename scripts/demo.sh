#!/usr/bin/env bash
# The main job: the sidecar with its default config, an instrumented torch service (a stable and a
# canary model version), traffic, and a report of what was measured, kept, dropped and redacted, and
# where to look at it. Installs what it needs first (progress on screen, pip's output in var/setup.log).
#   bash scripts/demo.sh [--work-dir DIR] [--otlp-grpc-port N] [--otlp-http-port N]
set -euo pipefail
cd "$(dirname "$0")/.."
SETUP_DEMO_ONLY=1 bash scripts/setup.sh
PYTHONWARNINGS=ignore exec .venv/bin/python examples/run_demo.py "$@"
