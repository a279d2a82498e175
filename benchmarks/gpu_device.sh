#!/usr/bin/env bash
# On a lent GPU machine, from the repo root, with .whl/ carried (benchmarks/gpu_wheels.sh made it):
# installs the wheels into /tmp/site, runs the GPU benchmark and writes everything under $OUT
# (gpu.json, the log, the GPU's name). Planned for under 8 minutes; give the call a 560 s limit.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed: run benchmarks/gpu_wheels.sh here and carry .whl"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$OUT/gpu.txt"
python3 -m benchmarks.gpu --out "$OUT" 2>&1 | tee "$OUT/gpu_benchmark.log"
exit "${PIPESTATUS[0]}"
