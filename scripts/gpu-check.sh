#!/usr/bin/env bash
# GPU check, for a machine with an NVIDIA GPU (the device tool runs it there). Builds,
# then for every model in models/ (each directory with a model.json) and for a
# MiniLM-L6-shaped encoder the script writes (random weights: speed only):
#   - `acge-proxy model eval` of the independent test sets on CUDA in bf16 and in fp32
#     (the default models; the MiniLM shape has no accuracy to measure), and
#   - `acge-proxy model bench` sweeps on CUDA bf16, CUDA fp32 and the CPU,
# and prints items/s. Meant to finish within 5 minutes on one GPU; results go to $OUT
# (default /tmp/gpu-check) and standard output. Every step is bounded by `timeout`.
#
#   scripts/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
MIN_MS=${MIN_MS:-300}
mkdir -p "$OUT"
t0=$(date +%s)
say() { printf '[%3ss] %s\n' "$(( $(date +%s) - t0 ))" "$*"; }

say "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'none found by nvidia-smi')"
py=$(scripts/setup-libtorch.sh | tail -n 1)
say "torch: $("$py" -c 'import torch; print(torch.__version__, "cuda", torch.cuda.is_available())')"
CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-$(nproc)} timeout 240 scripts/cargo-torch build --release --quiet
BIN=${CARGO_TARGET_DIR:-target}/release/acge-proxy
say "built $BIN"

MINILM="$OUT/minilm-shaped"
timeout 60 "$py" tests/support/make_test_model.py "$MINILM" --kind tokens \
  --width 384 --layers 6 --heads 12 --max-tokens 128 --max-len 4096
say "wrote a MiniLM-L6-shaped tokens model (128 tokens)"

models=()
for m in models/*/; do [ -f "$m/model.json" ] && models+=("${m%/}"); done
models+=("$MINILM")

for model in "${models[@]}"; do
  name=$(basename "$model")
  if [ "$model" != "$MINILM" ]; then
    for data in models/eval/independent-v2.jsonl models/eval/independent.jsonl; do
      [ -f "$data" ] || continue
      for precision in bf16 fp32; do
        timeout 60 "$BIN" model eval --model "$model" --data "$data" --device cuda \
          --precision "$precision" --json > "$OUT/eval-$name-$(basename "$data" .jsonl)-$precision.json"
        say "eval $name $(basename "$data") cuda $precision: $(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(f"accuracy {r[\"accuracy\"]*100:.1f} %, false denies {r[\"false_deny_rate\"]*100:.1f} %, {r[\"items_per_second\"]:.0f} items/s")' "$OUT/eval-$name-$(basename "$data" .jsonl)-$precision.json")"
      done
    done
  fi
  for run in "cuda bf16" "cuda fp32" "cpu fp32"; do
    set -- $run
    batches=1,8,32,128,256,512,1024
    [ "$1" = cpu ] && batches=1,8,32,128
    # A MiniLM-shaped item costs ~25 ms on one CPU core: two small batches fit the budget.
    [ "$1" = cpu ] && [ "$model" = "$MINILM" ] && batches=1,4
    timeout 60 "$BIN" model bench --model "$model" --device "$1" --precision "$2" \
      --batches "$batches" --len 1024 --min-ms "$MIN_MS" | tee "$OUT/bench-$name-$1-$2.md"
    say "bench $name on $1 $2 done"
  done
done
say "gpu-check finished"
