#!/usr/bin/env bash
# Finalize on one node: `distfinalize run` starts one rank per local GPU (or NPROC ranks; CPU-only machines default
# to 1) through torch.distributed's elastic agent, as torchrun does, and a failure is one error line.
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
#                                                  (one sub-directory per run, as torchrun --log-dir)
#   --tee SPEC                 TEE                 which streams reach the console as well as those files:
#                                                  0 none, 1 stdout, 2 stderr, 3 both (default, with --log-dir)
#   --local-ranks-filter LIST  LOCAL_RANKS_FILTER  show only these local ranks on the console, e.g. 0 or 0,3
#                                                  (files still get every rank)
#   --port N                   MASTER_PORT         rendezvous port (default: a free port)
#   --                         end of launcher options
# Multi-node (used by launch/finalize-multinode.sh): NNODES, RDZV_ENDPOINT (HOST:PORT), JOB_ID, RDZV_CONF.
# Other environment: PYTHON (default: python3, the interpreter distfinalize is installed in), RUN_ARGS (extra
# `distfinalize run` arguments, split on spaces).
#
# Everything after the launcher options is passed to distfinalize unchanged. When a rank fails the console gets
# one line saying which rank failed during which step, and the exit code is that rank's (1, 2, 70 or 130).
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
args=()
if [ -n "${NPROC:-}" ]; then args+=(--nproc-per-node "$NPROC"); fi
if [ "${NNODES:-1}" != 1 ] || [ -n "${RDZV_ENDPOINT:-}" ]; then
  if [ -z "${RDZV_ENDPOINT:-}" ]; then
    echo "launch/finalize.sh: error: --nnodes ${NNODES} needs --rdzv-endpoint HOST:PORT (RDZV_ENDPOINT)" >&2
    exit 2
  fi
  args+=(--nnodes "${NNODES:-1}" --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${JOB_ID:-${SLURM_JOB_ID:-distfinalize}}")
  if [ -n "${RDZV_CONF:-}" ]; then args+=(--rdzv-conf "$RDZV_CONF"); fi
elif [ -n "${MASTER_PORT:-}" ]; then
  args+=(--rdzv-endpoint "localhost:$MASTER_PORT" --rdzv-id "${JOB_ID:-distfinalize}")
fi
if [ -n "${LOG_DIR:-}" ]; then
  mkdir -p "$LOG_DIR"
  args+=(--log-dir "$LOG_DIR" --tee "${TEE:-3}")
elif [ -n "${TEE:-}" ]; then
  echo "launch/finalize.sh: error: --tee needs --log-dir DIR (LOG_DIR)" >&2
  exit 2
fi
if [ -n "${LOCAL_RANKS_FILTER:-}" ]; then args+=(--local-ranks-filter "$LOCAL_RANKS_FILTER"); fi
# shellcheck disable=SC2206  # RUN_ARGS is split on spaces on purpose
if [ -n "${RUN_ARGS:-}" ]; then args+=($RUN_ARGS); fi

exec "$PYTHON" -m distfinalize run ${args[@]+"${args[@]}"} "$@"
