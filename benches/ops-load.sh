#!/usr/bin/env bash
# Zero-downtime operations under load: while wrk (HTTP/1.1) or h2load (HTTP/2 over
# TLS) drives the full chain [constitutional_hash, acge (observe), audit (sync)]
# through acge-proxy, on loopback:
#   reloads    20 config reloads through the three triggers in turn (a ConfigMap-style
#              `..data` swap seen by the directory watch, SIGHUP, POST /reload): one a
#              broken file (refused), one adding a route, one moving a cluster to
#              other endpoints, the rest moving a weight
#   rotation   the listener's certificate rotated 3 times (and once to a broken pair,
#              refused) under h2load over TLS
#   drain      SIGTERM inside a run: /ready 503, answers go on through the drain delay
#   takeover   a second process started with --takeover under load; the first drains
#              and exits
#   restart    for comparison: stop the process, then start a new one (no takeover)
# Counts every failed request (non-2xx, socket errors; h2load's failed and errored)
# and writes the table to docs/performance.md. Bounded: about 2 minutes.
#
#   benches/ops-load.sh
#   CONNS=16 CASES="takeover restart" benches/ops-load.sh   # some cases only
set -euo pipefail
cd "$(dirname "$0")/.."

CONNS=${CONNS:-32}
WORKERS=${WORKERS:-2}
MODEL=${MODEL:-models/acge-default}
OUT=${OUT:-docs/performance.md}
MARK=ops-load.sh

. benches/lib.sh
need_tools wrk h2load nginx openssl curl python3
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
MODEL=$(cd "$MODEL" && pwd)
bench_workdir ops
build_release
TOKEN=ops-load-token
export ACGE_ADMIN_TOKEN=$TOKEN

# Two upstreams, so that a reload can move a cluster from one to the other.
upstream_conf <<EOF
  server { listen 127.0.0.1:19081 backlog=4096; listen 127.0.0.1:19082 backlog=4096;
    location / { add_header x-constitutional-hash cdd01ef066bc6cf2; default_type application/json;
      return 200 '{"service":"integrity","result":{"status":"ok"}}'; } }
EOF
start upstream "$NGINX" -c "$work/upstream.conf" -p "$work"
wait_port 19081

cat > "$work/post.lua" <<'EOF'
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.headers["x-constitutional-hash"] = "cdd01ef066bc6cf2"
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, nil, nil, string.format('{"operation":"append","entry":{"actor":"svc-batch","batch":%d}}', n))
end
EOF

config() { # port endpoint green_weight extra_routes listener_extra
  cat <<EOF
listener: {address: 127.0.0.1:$1, drain_delay_ms: 3000$5}
admin: {address: 127.0.0.1:$(( $1 + 1 )), reload: {debounce_ms: 600}}
clusters:
  blue:  {endpoints: ["127.0.0.1:$2"]}
  green: {endpoints: ["127.0.0.1:19081"]}
filters:
  constitutional_hash: {mode: enforce}
  acge: {model: $MODEL, mode: observe, on: [request], threads: 1, max_batch: 64, max_delay_us: 1000}
  audit: {dir: $work/audit-$1, commit: sync}
routes:
  - {name: integrity, match: {path_prefix: /}, blue: blue, green: green, green_weight: $3, filters: [constitutional_hash, acge, audit]}
$4
EOF
}

# wrk's failures: non-2xx answers plus socket errors (connect, read, write, timeout).
wrk_failures() { # wrk output file
  awk '/Non-2xx or 3xx responses:/ {n += $5}
       /Socket errors:/ {gsub(",", ""); n += $4 + $6 + $8 + $10}
       END {print n + 0}' "$1"
}
wrk_requests() { awk '/requests in/ {print $1}' "$1"; }
metric() { # port series
  curl -s "http://127.0.0.1:$1/metrics" | awk -v s="$2" 'index($0, s) == 1 {print $NF; f = 1} END {if (!f) print 0}'
}
results="$work/results.tsv"
: > "$results"
want() { [[ " ${CASES:-reloads rotation drain takeover restart} " == *" $1 "* ]]; }
row() { printf '%s\t%s\t%s\t%s\n' "$@" >> "$results"; printf '%-9s %8s requests  %s failed  %s\n' "$@"; }

# --- reloads --------------------------------------------------------------------
if want reloads; then
  # The config lives in a ConfigMap-shaped directory: config.yaml -> ..data/config.yaml.
  cm="$work/configmap"; mkdir -p "$cm"
  swap_n=0
  swap() { # file: writes it the way the kubelet updates a ConfigMap volume
    swap_n=$(( swap_n + 1 ))
    local stamp="..2026_12_01_00_00_$(printf %02d $swap_n)"
    mkdir "$cm/$stamp"; cp "$1" "$cm/$stamp/config.yaml"
    local old; old=$(readlink "$cm/..data" 2>/dev/null || true)
    ln -s "$stamp" "$cm/..data_tmp"; mv -T "$cm/..data_tmp" "$cm/..data"
    [ -z "$old" ] || rm -rf "${cm:?}/$old"
  }
  write_in_place() { # file: what an operator's editor does to the mounted file's target
    cp "$1" "$cm/$(readlink "$cm/..data")/config.yaml.tmp"
    mv "$cm/$(readlink "$cm/..data")/config.yaml.tmp" "$cm/$(readlink "$cm/..data")/config.yaml"
  }
  config 19500 19081 0 "" "" > "$work/c0.yaml"
  swap "$work/c0.yaml"; ln -s ..data/config.yaml "$cm/config.yaml"
  RUST_LOG=warn start reloads "$BIN" run --config "$cm/config.yaml" --workers "$WORKERS"
  pid_reloads=${pids[-1]}
  wait_port 19500
  wrk -t1 -c"$CONNS" -d34s -s "$work/post.lua" http://127.0.0.1:19500/api/v1/integrity/acge/audit > "$work/wrk-reloads.txt" &
  wrk_pid=$!
  sleep 1
  extra=""
  endpoint=19081
  for i in $(seq 1 20); do
    weight=$(( (i * 7) % 50 ))
    case $i in
      8) extra="  - {name: added, match: {path_prefix: /added}, blue: blue, green: green}" ;;
      12) endpoint=19082 ;;
    esac
    config 19500 "$endpoint" "$weight" "$extra" "" > "$work/c$i.yaml"
    if [ "$i" = 5 ]; then echo "routes: [broken" > "$work/c$i.yaml"; fi
    case $(( i % 3 )) in
      0) write_in_place "$work/c$i.yaml"
         code=$(curl -s -o "$work/reload-$i.json" -w '%{http_code}' -X POST -H "authorization: Bearer $TOKEN" http://127.0.0.1:19501/reload)
         echo "reload $i (POST /reload): $code $(head -c 160 "$work/reload-$i.json")" ;;
      1) write_in_place "$work/c$i.yaml"; kill -HUP "$pid_reloads"; echo "reload $i (SIGHUP)" ;;
      2) swap "$work/c$i.yaml"; echo "reload $i (..data swap)" ;;
    esac
    sleep 1.5
  done
  wait "$wrk_pid"
  gen=$(metric 19501 acge_config_generation)
  loaded=$(curl -s http://127.0.0.1:19501/metrics | awk '/^acge_config_reloads_total\{result="loaded"/ {n += $NF} END {print n + 0}')
  refused=$(curl -s http://127.0.0.1:19501/metrics | awk '/^acge_config_reloads_total\{result="refused"/ {n += $NF} END {print n + 0}')
  by_trigger=$(curl -s http://127.0.0.1:19501/metrics \
    | sed -n 's/^acge_config_reloads_total{result="loaded",trigger="\([a-z]*\)"} \([0-9]*\)$/\1 \2/p' \
    | awk '{printf "%s%s %s", sep, $2, $1; sep = ", "}')
  added=$(curl -s -o /dev/null -w '%{http_code}' -X POST -H 'content-type: application/json' -H 'x-constitutional-hash: cdd01ef066bc6cf2' --data '{"a":1}' http://127.0.0.1:19500/added)
  row reloads "$(wrk_requests "$work/wrk-reloads.txt")" "$(wrk_failures "$work/wrk-reloads.txt")" \
    "20 reloads (a ConfigMap \`..data\` swap, SIGHUP, POST /reload in turn; weights moved, a route added, the blue cluster moved to another port): $loaded loaded ($by_trigger), $refused refused (the broken file), generation $gen; the added route answered $added"
  kill -TERM "$pid_reloads"; wait "$pid_reloads" 2>/dev/null || true
fi

# --- listener certificate rotation under HTTP/2 over TLS -------------------------
if want rotation; then
  tls="$work/tls"; mkdir -p "$tls"
  new_pair() { # dir
    openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost \
      -keyout "$1/key.pem.new" -out "$1/cert.pem.new" >/dev/null 2>&1
    mv "$1/key.pem.new" "$1/key.pem"; mv "$1/cert.pem.new" "$1/cert.pem"
  }
  new_pair "$tls"
  config 19600 19081 0 "" ", tls: {cert: $tls/cert.pem, key: $tls/key.pem, reload_ms: 500}" > "$work/tls.yaml"
  RUST_LOG=warn start rotation "$BIN" run --config "$work/tls.yaml" --workers "$WORKERS"
  pid_rotation=${pids[-1]}
  wait_port 19600
  printf '{"operation":"append","entry":{"actor":"svc-batch"}}' > "$work/body.json"
  h2load -D 12 -c "$CONNS" -m 4 -d "$work/body.json" -H 'content-type: application/json' \
    -H 'x-constitutional-hash: cdd01ef066bc6cf2' https://127.0.0.1:19600/api/v1/integrity/acge/audit > "$work/h2load.txt" 2>&1 &
  h2_pid=$!
  for r in 1 2 3; do sleep 2.5; new_pair "$tls"; echo "rotation $r"; done
  sleep 1; echo "not a key" > "$tls/key.pem"; echo "rotation to a broken pair"
  wait "$h2_pid"
  h2_total=$(awk '/^requests:/ {print $2}' "$work/h2load.txt")
  h2_failed=$(awk '/^requests:/ {print $10 + $12 + $14}' "$work/h2load.txt")
  tls_loaded=$(metric 19601 'acge_tls_reloads_total{result="loaded"}')
  tls_refused=$(metric 19601 'acge_tls_reloads_total{result="refused"}')
  row rotation "$h2_total" "$h2_failed" "h2load over TLS; $tls_loaded rotations loaded, $tls_refused refused (the broken pair)"
  kill -TERM "$pid_rotation"; wait "$pid_rotation" 2>/dev/null || true
fi

# --- SIGTERM drain ---------------------------------------------------------------
if want drain; then
  config 19700 19081 0 "" "" > "$work/drain.yaml"
  RUST_LOG=warn start drain "$BIN" run --config "$work/drain.yaml" --workers "$WORKERS"
  pid_drain=${pids[-1]}
  wait_port 19700
  wrk -t1 -c"$CONNS" -d3s -s "$work/post.lua" http://127.0.0.1:19700/api/v1/integrity/acge/audit > "$work/wrk-drain.txt" &
  wrk_pid=$!
  sleep 1
  kill -TERM "$pid_drain"
  sleep 0.2
  ready=$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:19701/ready)
  wait "$wrk_pid"
  drain_exit=0; wait "$pid_drain" 2>/dev/null || drain_exit=$?
  row drain "$(wrk_requests "$work/wrk-drain.txt")" "$(wrk_failures "$work/wrk-drain.txt")" \
    "SIGTERM 1 s into a 3 s run, drain delay 3 s: /ready answered $ready, answers went on (Connection: close), exit $drain_exit"
fi

# --- takeover ----------------------------------------------------------------------
if want takeover; then
  sock="$work/takeover.sock"
  config 19800 19081 0 "" "" > "$work/takeover.yaml"
  RUST_LOG=warn start takeover-old "$BIN" run --config "$work/takeover.yaml" --workers "$WORKERS" --takeover "$sock"
  pid_old=${pids[-1]}
  wait_port 19800
  wrk -t1 -c"$CONNS" -d8s -s "$work/post.lua" http://127.0.0.1:19800/api/v1/integrity/acge/audit > "$work/wrk-takeover.txt" &
  wrk_pid=$!
  # And a client that opens a new connection for every request.
  wrk -t1 -c4 -d8s -H 'connection: close' -s "$work/post.lua" http://127.0.0.1:19800/api/v1/integrity/acge/audit > "$work/wrk-takeover-new.txt" &
  wrk_new=$!
  sleep 2
  RUST_LOG=warn start takeover-new "$BIN" run --config "$work/takeover.yaml" --workers "$WORKERS" --takeover "$sock"
  started=$(date +%s.%N)
  old_exit=0; wait "$pid_old" 2>/dev/null || old_exit=$?
  handover_s=$(python3 -c "import time; print(f'{time.time() - $started:.1f}')")
  wait "$wrk_pid" "$wrk_new"
  requests=$(( $(wrk_requests "$work/wrk-takeover.txt") + $(wrk_requests "$work/wrk-takeover-new.txt") ))
  failures=$(( $(wrk_failures "$work/wrk-takeover.txt") + $(wrk_failures "$work/wrk-takeover-new.txt") ))
  verify=$("$BIN" audit verify "$work/audit-19800" >/dev/null 2>&1 && echo passes || echo FAILS)
  row takeover "$requests" "$failures" "the old process exited $old_exit ${handover_s} s after the new one started; audit verify $verify"
  kill -TERM "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
fi

# --- restart without takeover, for comparison ---------------------------------------
if want restart; then
  config 19900 19081 0 "" "" | sed 's/drain_delay_ms: 3000/drain_delay_ms: 0/' > "$work/restart.yaml"
  RUST_LOG=warn start restart-old "$BIN" run --config "$work/restart.yaml" --workers "$WORKERS"
  pid_old=${pids[-1]}
  wait_port 19900
  wrk -t1 -c"$CONNS" -d6s -s "$work/post.lua" http://127.0.0.1:19900/api/v1/integrity/acge/audit > "$work/wrk-restart.txt" &
  wrk_pid=$!
  sleep 2
  kill -TERM "$pid_old"; wait "$pid_old" 2>/dev/null || true
  RUST_LOG=warn start restart-new "$BIN" run --config "$work/restart.yaml" --workers "$WORKERS"
  wait "$wrk_pid"
  row restart "$(wrk_requests "$work/wrk-restart.txt")" "$(wrk_failures "$work/wrk-restart.txt")" \
    "stop, then start (no --takeover): the gap while nothing listens, for comparison"
fi

python3 - "$results" "$OUT" "$MARK" "$CONNS" "$WORKERS" <<'EOF'
import datetime, os, re, sys
results, out, mark, conns, workers = sys.argv[1:]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
lines = ["| case | requests | failed | what happened |", "| --- | ---: | ---: | --- |"]
for line in open(results):
    case, requests, failed, what = line.rstrip("\n").split("\t")
    lines.append(f"| {case} | {int(requests):,} | {failed} | {what} |")
block = (f"<!-- {mark}:begin -->\n"
         f"Run {datetime.date.today()} on {os.cpu_count()} × {cpu}: wrk -t1 -c{conns} (and h2load -c{conns} -m4 over TLS), "
         f"proxy with {workers} workers running the full chain, upstream nginx on loopback.\n\n"
         + "\n".join(lines) + f"\n<!-- {mark}:end -->")
print("\n" + "\n".join(lines))
text = open(out).read() if os.path.exists(out) else "# Performance\n"
if f"<!-- {mark}:begin -->" not in text:
    text += f"\n<!-- {mark}:begin -->\n<!-- {mark}:end -->\n"
text = re.sub(f"<!-- {re.escape(mark)}:begin -->.*?<!-- {re.escape(mark)}:end -->", lambda _: block, text, flags=re.S)
open(out, "w").write(text)
print(f"\nwritten to {out}")
EOF
