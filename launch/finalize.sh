#!/usr/bin/env bash
# Finalize on one node with torchrun: one rank per local GPU (or NPROC ranks; CPU-only machines default to 1).
#
#   launch/finalize.sh [launcher options] SRC DEST [distfinalize options...]
#
#   launch/finalize.sh /ckpt/run1 /models/run1 --dtype bfloat16
#   launch/finalize.sh --nproc 4 --log-dir logs --local-ranks-filter 0 /ckpt/run1 /models/run1
#   NPROC=4 LOG_DIR=logs launch/finalize.sh /ckpt/run1 /models/run1
#
# Launcher options come first; each has an environment variable of the same meaning (the option wins):
#   --nproc N                  NPROC               ranks (default: the number of visible GPUs, else 1)
#   --log-dir DIR              LOG_DIR             also write each rank's stdout/stderr to files under DIR
#                                                  (torchrun --log-dir; one sub-directory per run)
#   --tee SPEC                 TEE                 which streams go to those files as well as the console
#                                                  (torchrun --tee; default 3 = both, when --log-dir is given)
#   --local-ranks-filter LIST  LOCAL_RANKS_FILTER  show only these local ranks on the console, e.g. 0 or 0,3
#                                                  (torchrun --local-ranks-filter; files still get every rank)
#   --port N                   MASTER_PORT         rendezvous port (default: a free port, torchrun --standalone)
#   --                         end of launcher options
# Multi-node (used by launch/finalize-multinode.sh): NNODES, RDZV_ENDPOINT (HOST:PORT), JOB_ID, RDZV_CONF.
# Other environment: PYTHON (default: python3, the interpreter distfinalize is installed in), TORCHRUN_ARGS
# (extra torchrun arguments, split on spaces).
#
# Everything after the launcher options is passed to distfinalize unchanged. The exit code is torchrun's:
# non-zero when any rank failed (each rank prints one line saying which rank failed during which step).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --nproc) NPROC="$2"; shift 2 ;;
    --log-dir) LOG_DIR="$2"; shift 2 ;;
    --tee) TEE="$2"; shift 2 ;;
    --local-ranks-filter) LOCAL_RANKS_FILTER="$2"; shift 2 ;;
    --port) MASTER_PORT="$2"; shift 2 ;;
    --nnodes) NNODES="$2"; shift 2 ;;
    --rdzv-endpoint) RDZV_ENDPOINT="$2"; shift 2 ;;
    --job-id) JOB_ID="$2"; shift 2 ;;
    --) shift; break ;;
    -h | --help) usage; exit 0 ;;
    *) break ;;
  esac
done
if [ $# -lt 2 ]; then
  echo "launch/finalize.sh: error: SRC and DEST are required (see --help)" >&2
  exit 2
fi

PYTHON="${PYTHON:-python3}"
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi

args=(--nproc-per-node="$NPROC")
if [ "${NNODES:-1}" != 1 ] || [ -n "${RDZV_ENDPOINT:-}" ]; then
  if [ -z "${RDZV_ENDPOINT:-}" ]; then
    echo "launch/finalize.sh: error: --nnodes ${NNODES} needs --rdzv-endpoint HOST:PORT (RDZV_ENDPOINT)" >&2
    exit 2
  fi
  args+=(--nnodes="${NNODES:-1}" --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT")
  args+=(--rdzv-id="${JOB_ID:-${SLURM_JOB_ID:-distfinalize}}")
  if [ -n "${RDZV_CONF:-}" ]; then args+=(--rdzv-conf="$RDZV_CONF"); fi
elif [ -n "${MASTER_PORT:-}" ]; then
  args+=(--nnodes=1 --rdzv-backend=c10d --rdzv-endpoint="localhost:$MASTER_PORT" --rdzv-id="${JOB_ID:-distfinalize}")
else
  args+=(--standalone)
fi
if [ -n "${LOG_DIR:-}" ]; then
  mkdir -p "$LOG_DIR"
  args+=(--log-dir="$LOG_DIR" --tee="${TEE:-3}")
elif [ -n "${TEE:-}" ]; then
  echo "launch/finalize.sh: error: --tee needs --log-dir DIR (LOG_DIR)" >&2
  exit 2
fi
if [ -n "${LOCAL_RANKS_FILTER:-}" ]; then args+=(--local-ranks-filter="$LOCAL_RANKS_FILTER"); fi
# shellcheck disable=SC2206  # TORCHRUN_ARGS is split on spaces on purpose
if [ -n "${TORCHRUN_ARGS:-}" ]; then args+=($TORCHRUN_ARGS); fi

exec "$PYTHON" -m torch.distributed.run "${args[@]}" -m distfinalize "$@"
