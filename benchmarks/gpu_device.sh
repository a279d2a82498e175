#!/usr/bin/env bash
# On a lent GPU machine, from the repo root, with .whl/ carried (benchmarks/gpu_wheels.sh made it):
# installs the wheels into /tmp/site, runs the GPU benchmark and writes everything under $OUT
# (gpu.json, the log, the GPU's name). Planned for under 8 minutes; give the call a 560 s limit.
# Then the FSDP2 check (about 2 more minutes): with little device time left, run it alone, FSDP_ONLY=1.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed: run benchmarks/gpu_wheels.sh here and carry .whl"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$OUT/gpu.txt"
status=0
if [ -z "${FSDP_ONLY:-}" ]; then  # FSDP_ONLY=1: only the FSDP2 check below (about 2 min)
  python3 -m benchmarks.gpu --out "$OUT" 2>&1 | tee "$OUT/gpu_benchmark.log"
  status=${PIPESTATUS[0]}
fi

# FSDP2 on CUDA with NCCL, world size 1 (the sharded code paths with one shard; issue 17), about 2 min:
# float32 so that it must equal the plain run (compare_runs, rtol 1e-5), then bf16 through the
# MixedPrecisionPolicy (must train to a finite loss). Run dirs stay in /tmp; only JSON/logs go to $OUT.
FSDP_ARGS="--width 256 --depth 4 --seq-len 64 --batch-size 8 --steps 20 --eval-every 10 --checkpoint-every 10 \
  --log-every 5 --probe-every 4 --eps 1e-8 --device cuda --no-report --quiet"
rm -rf /tmp/fsdp_plain /tmp/fsdp_nccl /tmp/fsdp_bf16
python3 -m diagnose run $FSDP_ARGS --dtype float32 --out /tmp/fsdp_plain > "$OUT/fsdp.log" 2>&1 \
  && python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m diagnose run $FSDP_ARGS --dtype float32 \
       --dist fsdp --out /tmp/fsdp_nccl >> "$OUT/fsdp.log" 2>&1 \
  && python3 -m benchmarks.compare_runs /tmp/fsdp_plain /tmp/fsdp_nccl > "$OUT/fsdp_vs_plain.json" 2>> "$OUT/fsdp.log"
fsdp_status=$?
python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m diagnose run $FSDP_ARGS --dtype bfloat16 \
  --dist fsdp --out /tmp/fsdp_bf16 >> "$OUT/fsdp.log" 2>&1 && cp /tmp/fsdp_bf16/metrics.jsonl "$OUT/fsdp_bf16_metrics.jsonl"
echo "fsdp float32 vs plain: exit $fsdp_status; bf16: exit $?" | tee -a "$OUT/fsdp.log"
exit "$status"
