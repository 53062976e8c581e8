# shellcheck shell=bash
# Sourced by demo.sh and test.sh: create .venv (once) with torch first, then distfinalize and its extras.
# Override the interpreter with PYTHON=..., the torch pin with TORCH_SPEC=... (e.g. "torch==2.11.0").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
EXTRAS="${EXTRAS:-dev,deepspeed,quant,lora}"
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.distfinalize-installed-$(sha256sum < "$ROOT/pyproject.toml" | cut -c1-16)-$TORCH_SPEC-$EXTRAS"
if [ ! -f "$stamp" ]; then
  "$PY" -m pip install --quiet --upgrade pip
  "$PY" -m pip install --quiet "$TORCH_SPEC"
  "$PY" -m pip install --quiet -e "${ROOT}[${EXTRAS}]"
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
