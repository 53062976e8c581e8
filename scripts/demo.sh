#!/usr/bin/env bash
# The main job on an embedded default: install, train a tiny Llama for 3 FSDP2 steps on 2 CPU ranks (a real
# DCP checkpoint with optimizer state), finalize it with 2 ranks, then load and generate with transformers.
set -euo pipefail
# shellcheck source=scripts/setup-env.sh
source "$(dirname "$0")/setup-env.sh"
WORK="${WORK:-$ROOT/demo-work}"
rm -rf "$WORK"
export OMP_NUM_THREADS=1
echo "== 1/3 training a tiny Llama with FSDP2 (torchrun, 2 ranks, gloo) -> $WORK/run"
torchrun --standalone --nproc_per_node=2 "$ROOT/examples/trainers/fsdp2.py" "$WORK" --variant untied-optim
RUN="$WORK/untied-optim"
echo "== 2/3 finalizing with 2 ranks: distfinalize run --nproc-per-node 2 $RUN $WORK/final"
distfinalize run --nproc-per-node 2 "$RUN" "$WORK/final" --max-shard-size 200KB
ls -l "$WORK/final"
echo "== 3/3 loading with transformers"
python "$ROOT/examples/load_and_generate.py" "$WORK/final" "$RUN"
