#!/usr/bin/env bash
# The prepared GPU check (see benchmarks/gpu_check.py).
#   bash benchmarks/gpu_check.sh            on a lent GPU machine: installs the carried wheels (.gpu-wheels/,
#                                           made here by `make gpu-wheels`) into .gpu-deps/, runs every step,
#                                           appends dated rows to benchmarks/RESULTS.md
#   bash benchmarks/gpu_check.sh --dry-run  every step on this CPU with tiny shapes (part of `make test`)
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
for a in "$@"; do [ "$a" = "--dry-run" ] && DRY=1; done
if [ "$DRY" = 1 ] && [ -z "${PY:-}" ] && [ -n "${VIRTUAL_ENV:-}" ]; then PY="$VIRTUAL_ENV/bin/python"; fi
if [ "$DRY" = 1 ] && [ -z "${PY:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
PY=${PY:-python3}
if [ "$DRY" = 0 ] && [ -d .gpu-wheels ]; then
  # The lent machine reaches no registry: everything it lacks was carried as wheels.
  if [ ! -f .gpu-deps/.done ]; then
    "$PY" -m pip install -q --no-deps --no-index --target .gpu-deps .gpu-wheels/*.whl
    touch .gpu-deps/.done
  fi
  if [ -d .gpu-wheels/refstack ] && [ ! -f .gpu-refstack/.done ]; then
    "$PY" -m pip install -q --no-deps --no-index --target .gpu-refstack .gpu-wheels/refstack/*.whl
    touch .gpu-refstack/.done
  fi
  export PYTHONPATH="$PWD/.gpu-deps${PYTHONPATH:+:$PYTHONPATH}"
  export X2I_REFSTACK="$PWD/.gpu-refstack"
  [ -d .gpu-wheels/qwen25_tokenizer ] && export X2I_QWEN25_TOKENIZER="$PWD/.gpu-wheels/qwen25_tokenizer"
fi
exec "$PY" benchmarks/gpu_check.py "$@"
