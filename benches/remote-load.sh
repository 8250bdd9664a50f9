#!/usr/bin/env bash
# In-process against remote inference, same model, same run, on loopback: POSTs with
# unique bodies (so the score cache never answers) through two acge-proxy processes
# running [acge (observe)], one scoring in process, one on a real MLServer (from PyPI,
# scripts/setup-mlserver.sh) serving the same TorchScript file over the Open Inference
# Protocol. The proxies, wrk, nginx and MLServer share this machine's cores, as a
# sidecar would share a node with nothing; the remote's figures therefore include the
# server's CPU. Medians of the rounds; writes docs/performance.md. Bounded: about 2
# minutes.
#
#   benches/remote-load.sh
#   ROUNDS=5 DURATION=20 CONNS=64 MODEL=models/acge-default benches/remote-load.sh
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-32}
WORKERS=${WORKERS:-2}
MODEL=${MODEL:-models/acge-default}
OUT=${OUT:-docs/performance.md}
MARK=remote-load.sh

. benches/lib.sh
need_tools wrk nginx curl python3
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
MODEL=$(cd "$MODEL" && pwd)
MLSERVER=$(scripts/setup-mlserver.sh | tail -1)
bench_workdir remote
build_release

upstream_conf <<EOF
  server { listen 127.0.0.1:19081 backlog=4096;
    location / { default_type application/json; return 200 '{"ok":true}'; } }
EOF
start upstream "$NGINX" -c "$work/upstream.conf" -p "$work"

mkdir -p "$work/mlserver"
cp tests/support/mlserver/acge_runtime.py "$work/mlserver/"
cat > "$work/mlserver/settings.json" <<EOF
{"host": "127.0.0.1", "http_port": 19090, "grpc_port": 19091, "metrics_port": 19092, "parallel_workers": 0, "debug": false}
EOF
cat > "$work/mlserver/model-settings.json" <<EOF
{"name": "acge", "implementation": "acge_runtime.TorchScriptRuntime", "parameters": {"uri": "$MODEL"}}
EOF
(cd "$work/mlserver" && exec "$MLSERVER" start .) > "$work/mlserver.log" 2>&1 &
pids+=($!)
for _ in $(seq 300); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:19090/v2/models/acge/ready)" = 200 ] && break
  sleep 0.2
done

proxy_config() { # port remote-section
  cat <<EOF
listener: {address: 127.0.0.1:$1}
admin: {address: 127.0.0.1:$(( $1 + 1 ))}
clusters:
  up: {endpoints: ["127.0.0.1:19081"]}
filters:
  acge: {model: $MODEL, mode: observe, on: [request], threads: 1, max_batch: 64, max_delay_us: 1000$2}
routes:
  - {name: scored, match: {path_prefix: /}, blue: up, green: up, filters: [acge]}
EOF
}
proxy_config 19600 "" > "$work/local.yaml"
proxy_config 19700 ", remote: {endpoint: \"http://127.0.0.1:19091\", model: acge, timeout_ms: 1000, max_in_flight: 4}" > "$work/remote.yaml"
RUST_LOG=warn start local "$BIN" run --config "$work/local.yaml" --workers "$WORKERS"
RUST_LOG=warn start remote "$BIN" run --config "$work/remote.yaml" --workers "$WORKERS"
wait_port 19600; wait_port 19700
for _ in $(seq 100); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:19701/ready)" = 200 ] && break
  sleep 0.2
done

cat > "$work/unique.lua" <<'EOF'
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
local note = string.rep("quarterly access review of the payments service accounts; ", 8)
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, nil, nil, string.format('{"operation":"review","batch":%d,"note":"%s"}', n, note))
end
EOF

declare -A url=([in-process]=http://127.0.0.1:19600/api/v1/auth/acge/validate
  [remote]=http://127.0.0.1:19700/api/v1/auth/acge/validate)
for t in in-process remote; do
  code=$(curl -s -o "$work/probe.json" -w '%{http_code}' -H 'content-type: application/json' --data '{"probe":1}' "${url[$t]}")
  [ "$code" = 200 ] || { echo "remote-load.sh: $t answered $code: $(cat "$work/probe.json")" >&2; exit 1; }
done

results="$work/results.tsv"
: > "$results"
for round in $(seq "$ROUNDS"); do
  for t in in-process remote; do
    wrk_round "$round" "$t" "${url[$t]}" "$work/unique.lua"
  done
done
metrics=$(curl -s http://127.0.0.1:19701/metrics)
calls=$(awk '/^acge_remote_seconds_count/ {print $2}' <<<"$metrics")
seconds=$(awk '/^acge_remote_seconds_sum/ {print $2}' <<<"$metrics")
items=$(awk '/^acge_inference_batch_size_sum/ {n += $2} END {print n + 0}' <<<"$metrics")

{
  echo "Run $(date +%F) on $(machine): $ROUNDS rounds × $DURATION s, wrk -t1 -c$CONNS, proxies with $WORKERS workers, model \`${MODEL#"$PWD"/}\` (acge observe, every body unique), MLServer 1.7.1 on the same machine, medians of the rounds."
  echo
  python3 benches/medians.py "$results" scoring in-process remote
  if [ -n "${calls:-}" ]; then
    echo
    awk -v c="$calls" -v s="$seconds" -v i="$items" 'BEGIN { printf "Remote, over the whole run: %d ModelInfer calls, %.1f items per call, %.2f ms per call.\n", c, i / c, s / c * 1000 }'
  fi
} > "$work/block.md"
cat "$work/block.md"
python3 benches/write_block.py "$OUT" "$MARK" "$work/block.md"
