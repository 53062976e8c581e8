#!/usr/bin/env bash
# The test suite: lint (ruff check, ruff format --check), then pytest: unit tests, then real multi-rank runs
# (torchrun on CPU/gloo) on checkpoints the tests train.
# Tests that need hardware or services this machine lacks (GPU, SLURM) are reported as skipped, with the reason;
# tests/slurm starts its own SLURM where slurm is installed and we are root (.ci/run installs it).
set -euo pipefail
# shellcheck disable=SC1091  # setup-env.sh is checked on its own
source "$(dirname "$0")/setup-env.sh"
cd "$ROOT"
ruff check distfinalize tests benchmarks examples scripts
ruff format --check distfinalize tests benchmarks examples scripts
exec python -m pytest -ra "$@"
