#!/usr/bin/env bash
# The one-command GPU check (benchmarks/gpu_check.py): the `gpu` tests, a finalize + verify of each path, and
# the benchmark against the peers, with JSON and markdown figures in --out.
#
#   bash scripts/gpu-check.sh wheels              # here, with network: fill .whl/ for the GPU machine
#   bash scripts/gpu-check.sh [--out DIR] [--size-gib 8] [--ranks 8] [--verify-gib 1] [--skip-benchmark]
#
# On the GPU machine (python3 3.12 with torch, transformers, accelerate, peft, safetensors; no network), run it
# from the repository root with .whl/ beside it: the wheels of what that machine lacks (torchao, deepspeed,
# compressed-tensors and their needs) are installed into /tmp/site first, when that python lacks them. Without .whl/ it uses the python3
# (or $PYTHON) it finds, as is: on a machine with the project's .venv, `PYTHON=.venv/bin/python`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"

if [ "${1:-}" = "wheels" ]; then
  # Wheels for CPython 3.12 on x86-64 Linux; deepspeed has no wheel on PyPI, so one is built (pure Python).
  rm -rf .whl && mkdir -p .whl
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    torchao==0.18.0 compressed-tensors==0.20.1 loguru==0.7.3 pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 hjson==3.1.0
  DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
  du -sh .whl
  exit 0
fi

OUT="${OUT:-$ROOT/gpu-check-out}"
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
if ! "$PY" -c "import torchao, deepspeed, compressed_tensors" 2> /dev/null && ls .whl/*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
exec "$PY" benchmarks/gpu_check.py --out "$OUT" "${args[@]}"
