#!/usr/bin/env bash
# The GPU benchmark of issue 7 in one command, from the repo root:
#   bash bench/gpu.sh                 # full sizes, appends a section to BENCHMARKS.md
#   bash bench/gpu.sh --only ab       # extra arguments go to python -m bench.run
# Uses .venv (or $PYTHON) as it is; only a missing .venv is created and installed.
# Data: data/fashion-mnist (or $BENCH_DATA_DIR), prepared from $DIPDDPM_DATA (an IDX folder;
# torchvision's download when unset) if its manifest.json is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
else
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
    .venv/bin/python -m pip install -q -c constraints.txt -e ".[test,bench]"
  fi
  PY=.venv/bin/python
fi

command -v nvidia-smi >/dev/null || { echo "error: nvidia-smi not found: no NVIDIA GPU here" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"error: torch {torch.__version__} sees no CUDA device")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
PY
"$PY" -c "import diffusers" 2>/dev/null || {
  echo "error: diffusers is missing: $PY -m pip install -c constraints.txt -e '.[bench]'" >&2
  exit 1
}

DATA_DIR="${BENCH_DATA_DIR:-data/fashion-mnist}"
if [ ! -f "$DATA_DIR/manifest.json" ]; then
  "$PY" -m jobs.prepare_data --source "${DIPDDPM_DATA:-torchvision}" --out "$DATA_DIR"
fi

# Full sizes: training batch 128 and 512, DIP 256/1024/2048 nets, sampling batch 1000, and
# 2,048 priors at 100 iterations, extrapolated to all 70,000 (the whole run is minutes).
mkdir -p runs/bench
"$PY" -m bench.run --device cuda --data "$DATA_DIR" --append BENCHMARKS.md \
  --out "runs/bench/gpu-$(date -u +%Y%m%dT%H%M%SZ).json" "$@"
