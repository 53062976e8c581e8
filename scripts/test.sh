#!/usr/bin/env bash
# The test suite: unit tests, then real multi-rank runs (torchrun on CPU/gloo) on checkpoints the tests train.
# Tests that need hardware or services this machine lacks (GPU, SLURM) are reported as skipped, with the reason.
set -euo pipefail
source "$(dirname "$0")/setup-env.sh"
cd "$ROOT"
exec python -m pytest -ra "$@"
