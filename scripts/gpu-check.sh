#!/usr/bin/env bash
# GPU check, for a machine with an NVIDIA GPU (the device tool runs it there): builds,
# scores the shared eval set on CUDA through `acge-proxy model eval`, and sweeps batch
# sizes with `acge-proxy model bench` on CUDA and on the CPU. Meant to finish within
# 5 minutes; results go to $OUT (default /tmp/gpu-check) and standard output.
#
#   scripts/gpu-check.sh
#
# Until the default model exists (models/acge-default), the tiny test model stands in,
# which checks the CUDA wiring but says nothing of accuracy.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
t0=$(date +%s)
say() { printf '[%3ss] %s\n' "$(( $(date +%s) - t0 ))" "$*"; }

say "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'none found by nvidia-smi')"
py=$(scripts/setup-libtorch.sh | tail -n 1)
say "torch: $("$py" -c 'import torch; print(torch.__version__, "cuda", torch.cuda.is_available())')"
CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-$(nproc)} scripts/cargo-torch build --release --quiet
BIN=${CARGO_TARGET_DIR:-target}/release/acge-proxy
say "built $BIN"

MODEL=models/acge-default
if [ ! -f "$MODEL/model.json" ]; then
  MODEL="$OUT/test-model"
  "$py" tests/support/make_test_model.py "$MODEL"
  say "models/acge-default is missing: using the tiny test model"
fi

DATA=../shared/eval/sample.jsonl
if [ -f "$DATA" ]; then
  "$BIN" model eval --model "$MODEL" --data "$DATA" --json | tee "$OUT/eval.json"
  say "eval done (device auto: CUDA when present)"
fi
for device in cuda cpu; do
  "$BIN" model bench --model "$MODEL" --device "$device" --min-ms 300 | tee "$OUT/sweep-$device.md"
  say "sweep on $device done"
done
say "gpu-check finished"
