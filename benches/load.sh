#!/usr/bin/env bash
# Load benchmark: acge-proxy against nginx and haproxy doing the same 95/5 blue/green
# split, and against the upstream measured directly, in one run, on loopback.
#
#   benches/load.sh                       # 3 rounds of 10 s each, writes docs/performance.md
#   ROUNDS=5 DURATION=20 CONNS=128 benches/load.sh
#   BASELINE_BIN=/path/to/older/acge-proxy benches/load.sh   # adds it as `baseline`
#
# Placement (2-core machine): the proxy under test, whichever it is, runs pinned to CPU 0
# with WORKERS threads/processes (default 1); wrk and the upstream nginx share CPU 1.
# Every peer gets the same core, the same worker count, keep-alive to the upstream, and
# the same upstream. Each round runs the four targets in a rotated order; the report
# gives the median of the rounds. Traffic stays on 127.0.0.1 and every run is bounded.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
WORKERS=${WORKERS:-1}
WARMUP=${WARMUP:-2}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
OUT=${OUT:-docs/performance.md}
# The block of $OUT this run replaces (`<!-- $MARK:begin -->` … `:end -->`).
MARK=${MARK:-load.sh}

. benches/lib.sh
need_tools wrk nginx haproxy taskset python3
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)

bench_workdir bench
build_release

# Ports: upstream blue 19081, green 19082; proxies listen on 19100 (nginx), 19200
# (haproxy), 19300 (acge-proxy); acge-proxy admin on 19301.
upstream_conf <<EOF
  server { listen 127.0.0.1:19081 reuseport backlog=4096;
    location / { add_header x-acge-backend blue; default_type application/json;
      return 200 '{"service":"auth","backend":"blue","result":{"status":"ok"}}'; } }
  server { listen 127.0.0.1:19082 reuseport backlog=4096;
    location / { add_header x-acge-backend green; default_type application/json;
      return 200 '{"service":"auth","backend":"green","result":{"status":"ok"}}'; } }
EOF

cat > "$work/nginx.conf" <<EOF
worker_processes $WORKERS;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream blue  { server 127.0.0.1:19081; keepalive 256; }
  upstream green { server 127.0.0.1:19082; keepalive 256; }
  split_clients "\${request_id}" \$version { 5% green; * blue; }
  server { listen 127.0.0.1:19100 backlog=4096;
    location / { proxy_pass http://\$version; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for; } }
}
EOF

cat > "$work/haproxy.cfg" <<EOF
global
  nbthread $WORKERS
  maxconn 4096
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
  option forwardfor
  http-reuse always
frontend fe
  bind 127.0.0.1:19200
  default_backend be
backend be
  balance random
  server blue 127.0.0.1:19081 weight 95
  server green 127.0.0.1:19082 weight 5
EOF

cat > "$work/acge.yaml" <<EOF
listener: {address: 127.0.0.1:19300}
admin: {address: 127.0.0.1:19301}
clusters:
  blue:  {endpoints: ["127.0.0.1:19081"]}
  green: {endpoints: ["127.0.0.1:19082"]}
routes:
  - {name: auth, match: {path_prefix: /}, blue: blue, green: green, green_weight: 5}
EOF

sed 's/19300/19400/; s/19301/19401/' "$work/acge.yaml" > "$work/baseline.yaml"

start upstream taskset -c "$LOAD_CPU" "$NGINX" -c "$work/upstream.conf" -p "$work"
wait_port 19081; wait_port 19082
start nginx taskset -c "$PROXY_CPU" "$NGINX" -c "$work/nginx.conf" -p "$work"
start haproxy taskset -c "$PROXY_CPU" "$HAPROXY" -f "$work/haproxy.cfg"
RUST_LOG=warn start acge taskset -c "$PROXY_CPU" "$BIN" run --config "$work/acge.yaml" --workers "$WORKERS"
wait_port 19100; wait_port 19200; wait_port 19300
if [ -n "${BASELINE_BIN:-}" ]; then
  RUST_LOG=warn start baseline taskset -c "$PROXY_CPU" "$BASELINE_BIN" run --config "$work/baseline.yaml" --workers "$WORKERS"
  wait_port 19400
fi

declare -A url=(
  [direct]=http://127.0.0.1:19081/api/v1/auth/acge/validate
  [nginx]=http://127.0.0.1:19100/api/v1/auth/acge/validate
  [haproxy]=http://127.0.0.1:19200/api/v1/auth/acge/validate
  [acge-proxy]=http://127.0.0.1:19300/api/v1/auth/acge/validate
  [baseline]=http://127.0.0.1:19400/api/v1/auth/acge/validate
)
targets=(direct nginx haproxy acge-proxy)
[ -z "${BASELINE_BIN:-}" ] || targets+=(baseline)

# Every target must answer 200 before anything is measured.
for t in "${targets[@]}"; do
  code=$(curl -s -o /dev/null -w '%{http_code}' "${url[$t]}")
  [ "$code" = 200 ] || { echo "load.sh: $t answered $code" >&2; exit 1; }
done

# CPU seconds (user + system) used so far by the processes of a target, from /proc.
declare -A pattern=([nginx]="$work/nginx.conf" [haproxy]="$work/haproxy.cfg" [acge-proxy]="$work/acge.yaml" [baseline]="$work/baseline.yaml")
cpu_ticks() {
  local t=$1 total=0 pid
  [ -n "${pattern[$t]:-}" ] || { echo 0; return; }
  for pid in $(pgrep -f -- "${pattern[$t]}"; pgrep -P "$(pgrep -f -- "${pattern[$t]}" | head -1)" 2>/dev/null); do
    [ -r "/proc/$pid/stat" ] || continue
    total=$(( total + $(awk '{print $14 + $15}' "/proc/$pid/stat") ))
  done
  echo "$total"
}
HZ=$(getconf CLK_TCK)

results="$work/results.tsv"
: > "$results"
for round in $(seq "$ROUNDS"); do
  for i in "${!targets[@]}"; do
    t=${targets[$(( (i + round - 1) % ${#targets[@]} ))]}
    taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${WARMUP}s" "${url[$t]}" >/dev/null
    before=$(cpu_ticks "$t")
    out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "${url[$t]}")
    after=$(cpu_ticks "$t")
    total=$(awk '/requests in/ {print $1}' <<<"$out")
    # CPU time per request of the proxy under test: steadier than requests/s on a
    # shared machine, since it does not depend on how much CPU the peer was given.
    cpu_us=$(awk -v d=$(( after - before )) -v n="$total" -v hz="$HZ" 'BEGIN { if (d > 0 && n > 0) printf "%.1f", d * 1e6 / hz / n; else print "-" }')
    rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
    p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
    errors=$(awk '/Non-2xx or 3xx responses:/ {print $5} /Socket errors:/ {print "socket"}' <<<"$out" | tr '\n' ' ')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$t" "$rps" "$p50" "$p99" "$cpu_us" "${errors:-none}" >> "$results"
    printf 'round %s  %-10s %10s req/s  p50 %-8s p99 %-8s cpu %-6s µs/req  errors: %s\n' "$round" "$t" "$rps" "$p50" "$p99" "$cpu_us" "${errors:-none}"
  done
done

python3 - "$results" "$OUT" "$ROUNDS" "$DURATION" "$CONNS" "$WORKERS" "$MARK" "$PROXY_CPU" <<'EOF'
import re, statistics, sys, datetime, platform, subprocess
results, out, rounds, duration, conns, workers, mark, proxy_cpu = sys.argv[1:]
def ms(s):
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", s)
    v = float(m.group(1))
    return {"us": v / 1000, "ms": v, "s": v * 1000}[m.group(2)]
rows = {}
for line in open(results):
    rnd, t, rps, p50, p99, cpu, errors = line.rstrip("\n").split("\t")
    rows.setdefault(t, []).append((float(rps), ms(p50), ms(p99), None if cpu == "-" else float(cpu), errors))
def med_cpu(v):
    xs = [r[3] for r in v if r[3] is not None]
    return statistics.median(xs) if xs else None
med = {t: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v),
           statistics.median(r[2] for r in v), sorted({r[4] for r in v}), med_cpu(v)) for t, v in rows.items()}
acge = med["acge-proxy"]
lines = [
    "| target | requests/s (median) | p50 ms | p99 ms | proxy CPU µs/request | acge-proxy req/s ratio | errors |",
    "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
]
for t in [t for t in ["direct", "nginx", "haproxy", "acge-proxy", "baseline"] if t in med]:
    rps, p50, p99, errs, cpu = med[t]
    ratio = acge[0] / rps
    cpu_s = "–" if cpu is None else f"{cpu:.1f}"
    lines.append(f"| {t} | {rps:,.0f} | {p50:.3f} | {p99:.3f} | {cpu_s} | {ratio:.2f}× | {', '.join(errs)} |")
cpu = ""
try:
    cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
except Exception:
    pass
summary = (f"acge/nginx = {acge[0] / med['nginx'][0]:.2f}× requests/s, "
           f"acge/haproxy = {acge[0] / med['haproxy'][0]:.2f}× requests/s; "
           f"p99 {acge[2]:.3f} ms vs nginx {med['nginx'][2]:.3f} ms, haproxy {med['haproxy'][2]:.3f} ms; "
           f"CPU per request {acge[4]} µs vs nginx {med['nginx'][4]} µs, haproxy {med['haproxy'][4]} µs")
if "baseline" in med:
    summary += (f"; against the baseline binary: {acge[0] / med['baseline'][0]:.2f}× requests/s, "
                f"CPU per request {acge[4]} vs {med['baseline'][4]} µs")
table = "\n".join(lines)
block = (f"<!-- {mark}:begin -->\n"
         f"Run {datetime.date.today()} on {cpu or platform.machine()}: {rounds} rounds × {duration} s, "
         f"wrk -t1 -c{conns}, each proxy with {workers} worker(s) on CPU {proxy_cpu}, "
         f"95/5 blue/green, medians of the rounds.\n\n{table}\n\n{summary}\n"
         f"<!-- {mark}:end -->")
print("\n" + table + "\n\n" + summary)
try:
    text = open(out).read()
except FileNotFoundError:
    text = "# Performance\n"
pattern = re.compile(rf"<!-- {re.escape(mark)}:begin -->.*?<!-- {re.escape(mark)}:end -->", re.S)
text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
open(out, "w").write(text)
print(f"\nwritten to {out}")
EOF
