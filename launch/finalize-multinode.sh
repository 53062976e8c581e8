#!/usr/bin/env bash
# Finalize on several nodes: run this same command on every node; `distfinalize run`'s c10d rendezvous (the one
# torchrun uses) forms one job.
#
#   launch/finalize-multinode.sh --nnodes N --rdzv-endpoint HOST:PORT [--job-id ID] [launcher options] \
#       SRC DEST [distfinalize options...]
#
#   # on node01 and on node02:
#   launch/finalize-multinode.sh --nnodes 2 --rdzv-endpoint node01:29500 --job-id run1-final /ckpt/run1 /models/run1
#   NNODES=2 RDZV_ENDPOINT=node01:29500 JOB_ID=run1-final launch/finalize-multinode.sh /ckpt/run1 /models/run1
#
# Options (each also an environment variable; the option wins):
#   --nnodes N                 NNODES         number of nodes, i.e. of copies of this command (required)
#   --rdzv-endpoint HOST:PORT  RDZV_ENDPOINT  where the rendezvous store listens: one of the nodes (required);
#                                             the node whose address it is hosts the store
#   --job-id ID                JOB_ID         rendezvous id, the same on every node (default: SLURM_JOB_ID, else
#                                             "distfinalize"); two jobs on the same endpoint need different ids
#   RDZV_CONF                                 rendezvous settings (distfinalize run --rdzv-conf, as torchrun's),
#                                             e.g. join_timeout=900 (default join timeout 600 s)
#   --nproc, --log-dir, --tee, --local-ranks-filter, PYTHON, RUN_ARGS: as in launch/finalize.sh
#
# SRC and DEST must be the same paths on every node (a shared file system). Ranks are numbered node by node in
# the order the nodes join. The exit code is non-zero on a node when any rank failed.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }
case "${1:-}" in -h | --help) usage; exit 0 ;; esac

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
pass=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nnodes) NNODES="$2"; shift 2 ;;
    --rdzv-endpoint) RDZV_ENDPOINT="$2"; shift 2 ;;
    --job-id) JOB_ID="$2"; shift 2 ;;
    --nproc | --log-dir | --tee | --local-ranks-filter) pass+=("$1" "$2"); shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
if [ -z "${NNODES:-}" ] || [ -z "${RDZV_ENDPOINT:-}" ]; then
  echo "launch/finalize-multinode.sh: error: --nnodes N and --rdzv-endpoint HOST:PORT are required (see --help)" >&2
  exit 2
fi
export NNODES RDZV_ENDPOINT
if [ -n "${JOB_ID:-}" ]; then export JOB_ID; fi
exec bash "$here/finalize.sh" ${pass[@]+"${pass[@]}"} -- "$@"
