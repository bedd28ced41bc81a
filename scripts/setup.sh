#!/usr/bin/env bash
# Installs everything the demo and the tests need into .venv (and Debian's promtool when missing).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v -i warning || true
  # torch is pinned to the CPU build available locally; installing it first keeps pip from
  # resolving a CUDA build for anything that depends on torch.
  .venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v -i warning || true
  .venv/bin/python -m pip install -q -e ".[dev]" 2>&1 | grep -v -i warning || true
  .venv/bin/python -W ignore -c "import sidecar, instrumentation, redaction, torch, opentelemetry.sdk"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
# promtool (Debian's prometheus package) checks the shipped alert rules.
if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's prometheus package for promtool..."
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null) \
      || echo "warning: could not install prometheus; alert-rule tests will be skipped" >&2
  else
    echo "note: promtool not found and not root; alert-rule tests will be skipped" >&2
  fi
fi
