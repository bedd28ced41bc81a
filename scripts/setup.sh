#!/usr/bin/env bash
# Installs everything the demo and the tests need into .venv (and Debian's promtool when missing).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
mkdir -p var
# pip's output goes to var/setup.log (build warnings are not errors); the terminal gets one progress
# line per step, and the log's tail only when a step fails.
pip_step() {
  local what=$1; shift
  local n=0 t0=$SECONDS line
  echo "== install: $what (log: var/setup.log)"
  if ! "$@" 2>&1 | tee -a var/setup.log | while IFS= read -r line; do
      case "$line" in Collecting*|Processing*|Downloading*|Building*|Installing*)
        n=$((n + 1))
        if [ -t 1 ]; then printf '\r   %3d steps, %4ss  %-60.60s' "$n" "$((SECONDS - t0))" "$line"
        elif [ $((n % 25)) = 0 ]; then echo "   $n steps, $((SECONDS - t0))s: $line"; fi ;;
      esac
    done; then
    if [ -t 1 ]; then echo; fi
    echo "error: $what failed; the last lines of var/setup.log:" >&2
    tail -20 var/setup.log >&2
    exit 1
  fi
  if [ -t 1 ]; then printf '\r%-80s\r' ''; fi
  echo "   done in $((SECONDS - t0))s"
}
# Debian packages, one apt-get run per call, whichever of "$@" are given (none: nothing to do). In CI
# (CI=true) a failure is an error: what needs them would otherwise be skipped and the run pass without it.
debian_step() {
  local without=$1; shift
  [ $# -gt 0 ] || return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== install: Debian packages $* (log: var/setup.log)"
    local t0=$SECONDS
    if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@") \
        >>var/setup.log 2>&1; then
      echo "   done in $((SECONDS - t0))s"
    elif [ "${CI:-}" = true ]; then
      echo "error: could not install $*; the last lines of var/setup.log:" >&2
      tail -20 var/setup.log >&2
      exit 1
    else
      echo "warning: could not install $*; $without" >&2
    fi
  elif [ "${CI:-}" = true ]; then
    echo "error: $* missing and this is not root with apt-get: CI cannot run every test" >&2
    exit 1
  else
    echo "note: $* missing and not root; $without" >&2
  fi
}
# libre2-dev builds redaction's RE2 binding (redaction/_re2_gil.cpp), before pip builds the extensions.
re2_dev=()
[ -f /usr/include/re2/re2.h ] || re2_dev+=(libre2-dev)
command -v g++ >/dev/null 2>&1 || re2_dev+=(g++)
debian_step "redaction uses google-re2's binding (slower beside busy threads, same answers)" "${re2_dev[@]}"
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
  : > var/setup.log
  set -o pipefail
  pip_step "pip" .venv/bin/python -m pip install --upgrade pip
  # torch is pinned to the CPU build available locally; installing it first keeps pip from
  # resolving a CUDA build for anything that depends on torch.
  pip_step "torch (CPU build)" .venv/bin/python -m pip install "torch==2.13.0"
  pip_step "the project and its dev extra" .venv/bin/python -m pip install -e ".[dev]"
  .venv/bin/python -W ignore -c "import sidecar, instrumentation, redaction, contract, torch, opentelemetry.sdk"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
# The demo needs neither checkov nor promtool (scripts/demo.sh sets SETUP_DEMO_ONLY=1).
[ "${SETUP_DEMO_ONLY:-0}" = 1 ] && exit 0
# checkov (the Kubernetes policy scan in tests/deploy) pins packaging<24, which pytest cannot share: its own venv.
if [ ! -x .venv-checkov/bin/checkov ]; then
  "$PY" -m venv .venv-checkov
  pip_step "checkov (own venv)" .venv-checkov/bin/python -m pip install "checkov==3.3.30"
fi
# Debian packages the tests start for real: promtool (prometheus) checks the alert rules and scrapes a
# sidecar, PostgreSQL backs the audit store tests, rsyslogd receives the syslog exporter's messages.
need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
{ ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; } || need+=(postgresql)
{ command -v rsyslogd >/dev/null 2>&1 || [ -x /usr/sbin/rsyslogd ]; } || need+=(rsyslog rsyslog-gnutls)
debian_step "the tests that need them will be skipped" "${need[@]}"
