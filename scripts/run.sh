#!/usr/bin/env bash
# The main job: set up (idempotent), install the offline data, reproduce the non-local
# merging suite on real data, and print where the report is with its headline table.
# Extra arguments go to `mergelab reproduce` (e.g. --profile smoke for a 3-minute run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/mergelab data install
exec .venv/bin/mergelab reproduce nonlocal-vision --profile quick --out runs/nonlocal-vision "$@"
