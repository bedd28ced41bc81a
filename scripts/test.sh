#!/usr/bin/env bash
# The whole test suite, installing what it needs first.
#
# The suite runs twice: once with the optional compiled extensions (the C wire scanners, redaction's RE2
# binding) and once with SIDECAR_PURE_PYTHON=1 (their pure-Python twins, google-re2's binding), because
# both paths are the product (a slim image may not build the extensions).
# Arguments go to pytest on both passes; SIDECAR_TEST_PASSES=c (or =python) runs one pass only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
passes=${SIDECAR_TEST_PASSES:-c python}
for pass in $passes; do
  case "$pass" in
    c)
      .venv/bin/python -c "import sidecar._wire" 2>/dev/null \
        || { echo "error: the C wire scanner (sidecar._wire) is not built; run: bash scripts/setup.sh" >&2; exit 1; }
      echo "== test pass 1: compiled extensions (C wire scanners, RE2 binding) =="
      env -u SIDECAR_PURE_PYTHON .venv/bin/python -m pytest "$@" ;;
    python)
      echo "== test pass 2: pure-Python twins (SIDECAR_PURE_PYTHON=1) =="
      SIDECAR_PURE_PYTHON=1 .venv/bin/python -m pytest "$@" ;;
    *) echo "error: SIDECAR_TEST_PASSES: unknown pass '$pass' (expected c, python)" >&2; exit 2 ;;
  esac
done
