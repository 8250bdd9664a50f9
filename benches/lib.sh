# Helpers the load scripts share; sourced by them, not run. They set and use `work`
# (a scratch directory, removed at exit unless KEEP is set), `pids` (processes to stop
# at exit) and `BIN` (the release binary).

# Exits with a hint when a tool is missing (nginx and haproxy may sit in /usr/sbin).
need_tools() {
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || {
      echo "$(basename "$0"): $tool is missing; run 'make setup'" >&2; exit 1; }
  done
}

bench_workdir() { # name
  work=$(mktemp -d "/tmp/acge-$1.XXXXXX")
  pids=()
  trap bench_cleanup EXIT
}

bench_cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$work"
}

build_release() {
  echo "building acge-proxy (release)…"
  scripts/cargo-torch build --release --quiet
  BIN=${CARGO_TARGET_DIR:-target}/release/acge-proxy
}

start() { # name cmd...: runs in the background, output in $work/name.log
  local name=$1; shift
  "$@" >"$work/$name.log" 2>&1 &
  pids+=($!)
}

wait_port() { # port
  for _ in $(seq 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "$(basename "$0"): nothing listens on $1; see $work" >&2; exit 1
}

# Writes $work/upstream.conf: one nginx worker, no access log, endless keep-alive,
# and the `http` block's content (server blocks) from stdin.
upstream_conf() {
  {
    cat <<EOF
worker_processes 1;
daemon off;
pid $work/upstream.pid;
error_log $work/upstream-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
EOF
    cat
    echo "}"
  } > "$work/upstream.conf"
}

# One wrk round (after a 2 s warm-up): appends "round target requests/s p50 p99 failed"
# to $results (failed: non-2xx answers and socket errors of any kind) and prints it.
# Uses CONNS and DURATION.
wrk_round() { # round target url script
  wrk -t1 -c"$CONNS" -d2s -s "$4" "$3" > /dev/null
  local out rps p50 p99 failed
  out=$(wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -s "$4" "$3")
  rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
  p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  failed=$(awk '/Non-2xx or 3xx responses:/ {n += $5}
    /Socket errors:/ {gsub(",", ""); n += $4 + $6 + $8 + $10} END {print n + 0}' <<<"$out")
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$rps" "$p50" "$p99" "$failed" >> "$results"
  printf 'round %s  %-12s %10s req/s  p50 %-8s p99 %-8s failed %s\n' "$1" "$2" "$rps" "$p50" "$p99" "$failed"
}

# The machine, for the line above a table.
machine() {
  echo "$(nproc) × $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
}
