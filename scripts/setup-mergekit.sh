#!/usr/bin/env bash
# Create .venv-mergekit with mergekit 0.1.5 (its own venv: mergekit pins its own dependency
# ranges; torch==2.13.0 goes in first so nothing pulls a CUDA build).  Idempotent.  Used by
# CI so that tests/test_mergekit_reference.py and the mergekit cases of test_vocab_slices.py
# compare mergelab with the real mergekit-yaml; without it those tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(command -v python3.11 || command -v python3)
[ -x .venv-mergekit/bin/python ] || "$PY" -m venv .venv-mergekit
pipi() {
    .venv-mergekit/bin/python -m pip install -q --disable-pip-version-check "$@" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
pipi torch==2.13.0
pipi mergekit==0.1.5 torch==2.13.0
.venv-mergekit/bin/mergekit-yaml --help >/dev/null
