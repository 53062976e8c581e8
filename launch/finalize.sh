#!/usr/bin/env bash
# Finalize on one node with every local GPU (or NPROC ranks; CPU-only machines default to 1).
#
#   launch/finalize.sh SRC DEST [distfinalize options...]
#   NPROC=4 launch/finalize.sh SRC DEST --dtype bfloat16
#
# Environment: NPROC (ranks; default: the number of GPUs, else 1), PYTHON (default: python3).
set -euo pipefail
PYTHON="${PYTHON:-python3}"
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m distfinalize "$@"
