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
    wrk -t1 -c"$CONNS" -d2s -s "$work/unique.lua" "${url[$t]}" > /dev/null
    out=$(wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -s "$work/unique.lua" "${url[$t]}")
    rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
    p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
    errors=$(awk '/Non-2xx or 3xx responses:/ {n += $5} /Socket errors:/ {gsub(",", ""); n += $4 + $6 + $8 + $10} END {print n + 0}' <<<"$out")
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$t" "$rps" "$p50" "$p99" "$errors" >> "$results"
    printf 'round %s  %-10s %10s req/s  p50 %-8s p99 %-8s errors %s\n' "$round" "$t" "$rps" "$p50" "$p99" "$errors"
  done
done
curl -s http://127.0.0.1:19701/metrics | grep -E '^acge_remote_(requests_total|seconds_(sum|count))|^acge_inference_batch_size_(sum|count)' > "$work/remote-metrics.txt" || true

python3 - "$results" "$OUT" "$MARK" "$ROUNDS" "$DURATION" "$CONNS" "$WORKERS" "$MODEL" "$work/remote-metrics.txt" <<'EOF'
import datetime, os, re, statistics, sys
results, out, mark, rounds, duration, conns, workers, model, metrics = sys.argv[1:]
def ms(s):
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", s)
    v = float(m.group(1))
    return {"us": v / 1000, "ms": v, "s": v * 1000}[m.group(2)]
rows = {}
for line in open(results):
    _, t, rps, p50, p99, errors = line.rstrip("\n").split("\t")
    rows.setdefault(t, []).append((float(rps), ms(p50), ms(p99), int(errors)))
base = statistics.median(r[0] for r in rows["in-process"])
lines = ["| scoring | requests/s (median) | p50 ms | p99 ms | vs in-process | failed |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
for t in ["in-process", "remote"]:
    v = rows[t]
    rps, p50, p99 = (statistics.median(r[i] for r in v) for i in range(3))
    lines.append(f"| {t} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {rps / base:.2f}× | {sum(r[3] for r in v)} |")
m = {}
for line in open(metrics):
    k, val = line.rsplit(" ", 1)
    m[k] = float(val)
calls = m.get("acge_remote_seconds_count", 0)
extra = ""
if calls:
    items = next((v for k, v in m.items() if k.startswith("acge_inference_batch_size_sum")), 0)
    extra = (f"\n\nRemote, over the whole run: {calls:,.0f} ModelInfer calls, "
             f"{items / calls:.1f} items per call, {m.get('acge_remote_seconds_sum', 0) / calls * 1e3:.2f} ms per call.")
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
block = (f"<!-- {mark}:begin -->\n"
         f"Run {datetime.date.today()} on {os.cpu_count()} × {cpu}: {rounds} rounds × {duration} s, wrk -t1 -c{conns}, "
         f"proxies with {workers} workers, model `{os.path.relpath(model)}` (acge observe, every body unique), "
         f"MLServer 1.7.1 on the same machine, medians of the rounds.\n\n" + "\n".join(lines) + extra + f"\n<!-- {mark}:end -->")
print("\n" + "\n".join(lines) + extra)
text = open(out).read() if os.path.exists(out) else "# Performance\n"
if f"<!-- {mark}:begin -->" not in text:
    text += f"\n<!-- {mark}:begin -->\n<!-- {mark}:end -->\n"
text = re.sub(f"<!-- {re.escape(mark)}:begin -->.*?<!-- {re.escape(mark)}:end -->", lambda _: block, text, flags=re.S)
open(out, "w").write(text)
print(f"\nwritten to {out}")
EOF
