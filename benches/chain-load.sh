#!/usr/bin/env bash
# End-to-end benchmark of the full filter chain: POST ~1 KB JSON bodies through
# acge-proxy with [constitutional_hash (enforce), acge (observe, requests, CPU),
# audit (sync group commit)], against the same proxy binary passing the same requests
# straight through, in one run, on loopback.
#
#   benches/chain-load.sh                 # 3 rounds of 10 s, writes docs/performance.md
#   ROUNDS=5 DURATION=20 CONNS=64 MODEL=models/acge-default-int8 benches/chain-load.sh
#   SECOND=models/acge-encoder BAND=0.3,0.995 BODIES=models/eval/independent-v2.jsonl \
#     MARK=chain-load.sh-cascade benches/chain-load.sh      # the cascade, on written requests
#
# Targets, each round in a rotated order:
#   passthrough   the same requests, no filters
#   chain-unique  the full chain; every body differs (a counter), so every request is
#                 scored by the model: the score cache never hits
#   chain-cached  the full chain; one body repeated, so the score cache answers
# acge runs in observe mode: every request is scored and annotated whatever the
# verdict, so the figures measure the chain's cost, not the model's opinion of the
# load's body. Placement: nothing pinned; the proxy, wrk (one thread) and the upstream nginx (one
# worker) share the machine's cores, as a sidecar shares its pod's. Bounded in time;
# traffic stays on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
WORKERS=${WORKERS:-2}
WARMUP=${WARMUP:-2}
MODEL=${MODEL:-models/acge-default}
# A second model makes the chain's acge a cascade (band BAND); BODIES takes the
# requests from an eval-format set (each body made unique by a `nonce` field), in
# place of the generated integrity appends; MARK names the block written in OUT.
SECOND=${SECOND:-}
BAND=${BAND:-0.3,0.995}
BODIES=${BODIES:-}
MARK=${MARK:-chain-load.sh}
OUT=${OUT:-docs/performance.md}

. benches/lib.sh
need_tools wrk nginx python3 curl
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
MODEL=$(cd "$MODEL" && pwd)
cascade=""
if [ -n "$SECOND" ]; then
  SECOND=$(cd "$SECOND" && pwd)
  cascade=", second: {model: $SECOND, band: [$BAND], max_queue: ${SECOND_QUEUE:-4}, max_batch: 4, timeout_ms: 100, threads: 1}"
fi

bench_workdir chain
build_release

upstream_conf <<EOF
  client_body_buffer_size 16k;
  server { listen 127.0.0.1:19081 reuseport backlog=4096;
    location / { add_header x-constitutional-hash cdd01ef066bc6cf2; default_type application/json;
      return 200 '{"service":"integrity","backend":"blue","result":{"status":"ok"}}'; } }
EOF

proxy_config() { # port filters...
  local port=$1; shift
  cat <<EOF
listener: {address: 127.0.0.1:$port}
admin: {address: 127.0.0.1:$((port + 1))}
clusters:
  blue:  {endpoints: ["127.0.0.1:19081"]}
  green: {endpoints: ["127.0.0.1:19081"]}
filters:
  constitutional_hash: {mode: enforce}
  acge: {model: $MODEL, mode: observe, on: [request], threads: 1, max_batch: 64, max_delay_us: 1000$cascade}
  audit: {dir: $work/audit-$port, commit: sync}
routes:
  - {name: integrity, match: {path_prefix: /}, blue: blue, green: green, green_weight: 0, filters: [$*]}
EOF
}
proxy_config 19400 > "$work/passthrough.yaml"
proxy_config 19500 constitutional_hash, acge, audit > "$work/chain.yaml"

if [ -n "$BODIES" ]; then
# The requests of an eval-format set (its responses left out), in turn, each body
# made unique by a leading `nonce` field; their own paths and headers.
python3 - "$BODIES" "$work/unique.lua" <<'EOF'
import json, sys
cases = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
cases = [c for c in cases if "status" not in c and isinstance(c.get("body"), dict) and c["body"]]
out = ['wrk.method = "POST"', "local cases = {"]
for c in cases:
    rest = json.dumps(c["body"], ensure_ascii=False, separators=(",", ":"))[1:]
    headers = {k.lower(): v for k, v in c.get("headers", {}).items()}
    headers["content-type"] = "application/json"
    headers["x-constitutional-hash"] = "cdd01ef066bc6cf2"
    h = ", ".join(f'["{k}"] = [==[{v}]==]' for k, v in headers.items())
    out.append(f'  {{path = [==[{c["path"]}]==], headers = {{{h}}}, rest = [==[{rest}]==]}},')
out += ["}", "local n = 0", "request = function()", "  n = n + 1",
        "  local c = cases[(n % #cases) + 1]",
        "  return wrk.format(nil, c.path, c.headers, '{\"nonce\":' .. n .. ',' .. c.rest)", "end"]
open(sys.argv[2], "w").write("\n".join(out) + "\n")
print(f"{len(cases)} requests from {sys.argv[1]}", file=sys.stderr)
EOF
else
# Bodies of about 1 KB: an integrity append with a counter (unique) or without (cached).
cat > "$work/unique.lua" <<'EOF'
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.headers["x-constitutional-hash"] = "cdd01ef066bc6cf2"
local note = string.rep("nightly reconciliation of ledger entries against the bank statement; ", 11)
local n = 0
request = function()
  n = n + 1
  local body = string.format('{"operation":"append","entry":{"actor":"svc-batch","action":"reconciled","batch":%d,"entries":[%d,%d,%d]},"ticket":"OPS-%d","note":"%s"}', n, n * 3, n * 5, n * 7, n % 9973, note)
  return wrk.format(nil, nil, nil, body)
end
EOF
fi
sed -e 's/n = n + 1/n = 1/' "$work/unique.lua" > "$work/cached.lua"

start upstream "$NGINX" -c "$work/upstream.conf" -p "$work"
wait_port 19081
RUST_LOG=warn start passthrough "$BIN" run --config "$work/passthrough.yaml" --workers "$WORKERS"
RUST_LOG=warn start chain "$BIN" run --config "$work/chain.yaml" --workers "$WORKERS"
wait_port 19400; wait_port 19500

declare -A url=([passthrough]=http://127.0.0.1:19400/api/v1/integrity/acge/audit
  [chain-unique]=http://127.0.0.1:19500/api/v1/integrity/acge/audit
  [chain-cached]=http://127.0.0.1:19500/api/v1/integrity/acge/audit)
declare -A script=([passthrough]=unique.lua [chain-unique]=unique.lua [chain-cached]=cached.lua)
declare -A config=([passthrough]=passthrough.yaml [chain-unique]=chain.yaml [chain-cached]=chain.yaml)
targets=(passthrough chain-unique chain-cached)

# The body the load sends must pass the chain (else the figures would be of errors).
if [ -n "$BODIES" ]; then
  body=$(python3 - "$BODIES" <<'EOF'
import json, sys
c = next(c for c in (json.loads(l) for l in open(sys.argv[1]) if l.strip()) if "status" not in c and isinstance(c.get("body"), dict) and c["body"])
print('{"nonce":1,' + json.dumps(c["body"], ensure_ascii=False, separators=(",", ":"))[1:])
EOF
)
else
body=$(python3 - "$work/unique.lua" <<'EOF'
import re, sys
lua = open(sys.argv[1]).read()
note = "nightly reconciliation of ledger entries against the bank statement; " * 11
fmt = re.search(r"string.format\('(.*?)', n", lua).group(1)
print(fmt.replace("%d", "1", 5).replace("%s", note))
EOF
)
fi
for t in "${targets[@]}"; do
  code=$(curl -s -o "$work/probe.json" -w '%{http_code}' -H 'content-type: application/json' \
    -H 'x-constitutional-hash: cdd01ef066bc6cf2' --data-binary "$body" "${url[$t]}")
  [ "$code" = 200 ] || { echo "chain-load.sh: $t answered $code: $(cat "$work/probe.json")" >&2; exit 1; }
done
echo "body: ${#body} bytes"

cpu_ticks() { # config file name -> CPU ticks of that proxy so far
  local pid
  pid=$(pgrep -f -- "$work/$1" | head -1)
  awk '{print $14 + $15}' "/proc/$pid/stat"
}
HZ=$(getconf CLK_TCK)

results="$work/results.tsv"
: > "$results"
for round in $(seq "$ROUNDS"); do
  for i in "${!targets[@]}"; do
    t=${targets[$(( (i + round - 1) % ${#targets[@]} ))]}
    wrk -t1 -c"$CONNS" -d"${WARMUP}s" -s "$work/${script[$t]}" "${url[$t]}" >/dev/null
    before=$(cpu_ticks "${config[$t]}")
    out=$(wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -s "$work/${script[$t]}" "${url[$t]}")
    after=$(cpu_ticks "${config[$t]}")
    total=$(awk '/requests in/ {print $1}' <<<"$out")
    cpu_us=$(awk -v d=$(( after - before )) -v n="$total" -v hz="$HZ" 'BEGIN { printf "%.1f", d * 1e6 / hz / n }')
    rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
    p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
    errors=$(awk '/Non-2xx or 3xx responses:/ {print "non-2xx:" $5} /Socket errors:/ {print "socket"}' <<<"$out" | tr '\n' ' ')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$t" "$rps" "$p50" "$p99" "$cpu_us" "${errors:-none}" >> "$results"
    printf 'round %s  %-13s %10s req/s  p50 %-8s p99 %-8s cpu %-6s µs/req  errors: %s\n' "$round" "$t" "$rps" "$p50" "$p99" "$cpu_us" "${errors:-none}"
  done
done

# What the model did meanwhile, from the chain proxy's own metrics.
curl -s http://127.0.0.1:19501/metrics | grep -E '^acge_inference_(batch_size|seconds|queue_seconds)_(sum|count)|^acge_inference_cache_total|^acge_inference_errors_total|^acge_cascade_total' > "$work/inference.txt" || true

python3 - "$results" "$OUT" "$ROUNDS" "$DURATION" "$CONNS" "$WORKERS" "$MODEL" "${#body}" "$work/inference.txt" "$MARK" "$SECOND" "$BAND" "$BODIES" <<'EOF'
import re, statistics, sys, datetime, os
results, out, rounds, duration, conns, workers, model, body_len, inference, mark, second, band, bodies = sys.argv[1:]
def ms(s):
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", s)
    v = float(m.group(1))
    return {"us": v / 1000, "ms": v, "s": v * 1000}[m.group(2)]
rows = {}
for line in open(results):
    rnd, t, rps, p50, p99, cpu, errors = line.rstrip("\n").split("\t")
    rows.setdefault(t, []).append((float(rps), ms(p50), ms(p99), float(cpu), errors))
med = {t: [statistics.median(r[i] for r in v) for i in range(4)] + [sorted({r[4] for r in v})] for t, v in rows.items()}
base = med["passthrough"][0]
lines = ["| target | requests/s (median) | p50 ms | p99 ms | proxy CPU µs/request | vs passthrough | errors |",
         "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
for t in ["passthrough", "chain-unique", "chain-cached"]:
    rps, p50, p99, cpu, errs = med[t]
    lines.append(f"| {t} | {rps:,.0f} | {p50:.3f} | {p99:.3f} | {cpu:.1f} | {rps / base:.2f}× | {', '.join(errs)} |")
m = {}
for line in open(inference):
    k, v = line.rsplit(" ", 1)
    m[k] = float(v)
def get(prefix):
    return next((v for k, v in m.items() if k.startswith(prefix)), 0.0)
batches = get('acge_inference_batch_size_count{stage="fast"}') or get("acge_inference_batch_size_count")
extra = ""
if batches:
    extra = (f"\n\nModel, over the whole run: {get('acge_inference_batch_size_sum') / batches:.1f} items per batch, "
             f"{get('acge_inference_seconds_sum') / batches * 1e3:.2f} ms per batch, "
             f"{get('acge_inference_queue_seconds_sum') / max(get('acge_inference_queue_seconds_count'), 1) * 1e3:.2f} ms queued per item.")
stages = {}
for k, v in m.items():
    g = re.match(r'acge_cascade_total\{.*stage="(\w+)"', k)
    if g:
        stages[g.group(1)] = stages.get(g.group(1), 0) + v
if stages:
    total = sum(stages.values())
    extra += " Decided by: " + ", ".join(f"{s} {v / total * 100:.1f} %" for s, v in sorted(stages.items())) + "."
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
what = f"model `{os.path.relpath(model)}`"
if second:
    what += f", second `{os.path.relpath(second)}` for band [{band}]"
what += f", bodies from `{os.path.relpath(bodies)}` (each made unique)" if bodies else f", POST bodies of {body_len} bytes"
block = (f"<!-- {mark}:begin -->\n"
         f"Run {datetime.date.today()} on {os.cpu_count()} × {cpu}: {rounds} rounds × {duration} s, wrk -t1 -c{conns}, "
         f"proxy with {workers} workers, {what}, "
         f"nothing pinned, medians of the rounds.\n\n" + "\n".join(lines) + extra + f"\n<!-- {mark}:end -->")
print("\n" + "\n".join(lines) + extra)
text = open(out).read() if os.path.exists(out) else "# Performance\n"
if f"<!-- {mark}:begin -->" not in text:
    text += f"\n<!-- {mark}:begin -->\n<!-- {mark}:end -->\n"
text = re.sub(f"<!-- {re.escape(mark)}:begin -->.*?<!-- {re.escape(mark)}:end -->", lambda _: block, text, flags=re.S)
open(out, "w").write(text)
print(f"\nwritten to {out}")
EOF
