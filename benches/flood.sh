#!/usr/bin/env bash
# Overload: the demo (every route runs the hash check, ACGE scoring and the sync audit
# log) first at a normal concurrency, then under a flood of concurrent clients. Aim:
# under the flood the proxy keeps serving what the machine can serve, answers the rest
# with a fast 503, and its memory stays bounded.
#
#   benches/flood.sh                        # 64 then 5,000 connections, 20 s each
#   CONNS_FLOOD=10000 DURATION=30 benches/flood.sh
#
# Reports, per phase: 2xx/s, 503/s, other answers, socket errors, wrk's p50/p99 over all
# answers, and the demo process's peak resident memory (sampled every 200 ms). The demo
# is pinned to CPU 0, wrk to CPU 1; the demo's fixed loopback ports (15000, 15001,
# 18000-18106). Bounded in time; writes its table into docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."

CONNS_NORMAL=${CONNS_NORMAL:-64}
CONNS_FLOOD=${CONNS_FLOOD:-5000}
DURATION=${DURATION:-20}
OUT=${OUT:-docs/performance.md}
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

. benches/lib.sh
need_tools wrk taskset python3
bench_workdir flood
build_release
RUST_LOG=error start demo taskset -c 0 "$BIN" demo --dir "$work/demo" --traffic 0 --workers 1
wait_port 15001
demo_pid=$(pgrep -f -- "--dir $work/demo" | head -1)

cat > "$work/count.lua" <<'EOF'
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
local n = 0
local threads = {}
setup = function(thread) table.insert(threads, thread) end
init = function(args) counts = {} end
request = function()
  n = n + 1
  return wrk.format(nil, nil, nil, '{"actor":"user-' .. (n % 5000) .. '","action":"read","target":"own profile","n":' .. n .. '}')
end
response = function(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
end
done = function(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    for s, c in pairs(t:get("counts")) do total[s] = (total[s] or 0) + c end
  end
  io.write("STATUS")
  for s, c in pairs(total) do io.write(string.format(" %d=%d", s, c)) end
  io.write("\n")
end
EOF

peak_rss() { # pid seconds: the peak VmRSS (KiB) over that time
  local pid=$1 until=$(( $(date +%s) + $2 )) peak=0 rss
  while [ "$(date +%s)" -lt "$until" ]; do
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    [ "$rss" -gt "$peak" ] && peak=$rss
    sleep 0.2
  done
  echo "$peak"
}

results="$work/results.tsv"
: > "$results"
for phase in normal flood; do
  conns=$CONNS_NORMAL; [ "$phase" = flood ] && conns=$CONNS_FLOOD
  peak_rss "$demo_pid" "$(( DURATION + 2 ))" > "$work/rss-$phase" &
  sampler=$!
  out=$(taskset -c 1 wrk -t1 -c"$conns" -d"${DURATION}s" --timeout 10s --latency -s "$work/count.lua" \
    http://127.0.0.1:15001/api/v1/auth/acge/validate)
  wait $sampler
  echo "$out"
  status=$(grep '^STATUS' <<<"$out")
  ok=$(grep -o ' 200=[0-9]*' <<<"$status" | cut -d= -f2 || true); ok=${ok:-0}
  busy=$(grep -o ' 503=[0-9]*' <<<"$status" | cut -d= -f2 || true); busy=${busy:-0}
  total=$(awk '/requests in/ {print $1}' <<<"$out")
  other=$(( total - ok - busy ))
  socket=$(awk '/Socket errors:/ {print $3 $4 " " $5 $6 " " $7 $8 " " $9 $10}' <<<"$out")
  p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$phase" "$conns" "$ok" "$busy" "$other" \
    "${socket:-none}" "$p50" "$p99" "$(cat "$work/rss-$phase")" >> "$results"
done
rss_idle=$(awk '/^VmRSS:/ {print $2}' "/proc/$demo_pid/status")

python3 - "$results" "$OUT" "$DURATION" "$rss_idle" <<'EOF'
import re, sys, datetime
results, out, duration, rss_idle = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
rows = [l.rstrip("\n").split("\t") for l in open(results)]
lines = ["| phase | connections | 2xx/s | 503/s | other answers | socket errors | p50 | p99 | peak RSS |",
         "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
served = {}
for phase, conns, ok, busy, other, socket, p50, p99, rss in rows:
    served[phase] = int(ok) / duration
    lines.append(f"| {phase} | {int(conns):,} | {int(ok) / duration:,.0f} | {int(busy) / duration:,.0f} | {other} | {socket} | {p50} | {p99} | {int(rss) / 1024:.0f} MiB |")
share = served["flood"] / served["normal"] if served.get("normal") else 0
block = (f"<!-- flood.sh:begin -->\nRun {datetime.date.today()}: the demo (hash stamp, acge observe on requests and "
         f"responses, sync audit) on one core with one worker, wrk on the other, {duration:.0f} s per phase, "
         f"POST to the auth route.\n\n" + "\n".join(lines) +
         f"\n\nUnder the flood the proxy served {share:.2f}× what it served at normal concurrency; "
         f"resident memory after the run: {rss_idle / 1024:.0f} MiB.\n<!-- flood.sh:end -->")
print("\n" + block)
text = open(out).read()
pattern = re.compile(r"<!-- flood.sh:begin -->.*?<!-- flood.sh:end -->", re.S)
text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
open(out, "w").write(text)
print(f"written to {out}")
EOF
