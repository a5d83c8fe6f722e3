#!/usr/bin/env bash
# The main job: set up (idempotent), install the offline data, reproduce the non-local
# merging suite on real data (3 seeds, every number a mean with a 95% interval; one thread
# and pinned CPU kernels, so another machine gives the same numbers), and print where the
# report is with its headline table. Progress is one line per phase when not on a terminal.
# Extra arguments go to `mergelab reproduce` (e.g. --profile smoke for a one-seed plumbing
# run, --seeds 0 for one seed). Cache: $MERGELAB_CACHE (default ~/.cache/mergelab).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/mergelab data install
exec .venv/bin/mergelab reproduce nonlocal-vision --profile quick --out runs/nonlocal-vision "$@"
