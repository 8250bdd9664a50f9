#!/usr/bin/env bash
# Zero downtime under load: wrk drives the demo's auth route while the migration
# controller walks it from shadow to 100 % green, then an operator rolls it back.
# Counts every answer that was not 2xx and every socket error; the demo backends have
# no faults set, so any failure would be the proxy's.
#
#   benches/migration-load.sh            # 45 s; rollback at 35 s
#   DURATION=60 ROLLBACK_AT=50 CONNS=32 benches/migration-load.sh
#
# Uses the demo's fixed loopback ports (15000, 15001, 18000-18106); bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-45}
ROLLBACK_AT=${ROLLBACK_AT:-35}
CONNS=${CONNS:-16}
TOKEN=bench-token

. benches/lib.sh
need_tools wrk curl
bench_workdir migration
build_release
ACGE_ADMIN_TOKEN=$TOKEN RUST_LOG=warn start demo "$BIN" demo --dir "$work/demo" --traffic 0
wait_port 15001

cat > "$work/post.lua" <<'EOF'
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
local n = 0
request = function()
  n = n + 1
  wrk.headers["x-user-id"] = "user-" .. (n % 500)
  return wrk.format(nil, nil, nil, '{"actor":"user-' .. (n % 500) .. '","action":"read","target":"own profile"}')
end
EOF

wrk -t1 -c"$CONNS" -d"${DURATION}s" -s "$work/post.lua" http://127.0.0.1:15001/api/v1/auth/acge/validate >"$work/wrk.txt" &
load=$!
sleep "$((ROLLBACK_AT - 1))"
before=$("$BIN" migration status | grep -A0 '^auth ')
curl -s -X POST -H "Authorization: Bearer $TOKEN" http://127.0.0.1:15000/migration/auth/rollback >/dev/null
sleep 1
after=$("$BIN" migration status | grep -A0 '^auth ')
wait $load
cat "$work/wrk.txt"
total=$(awk '/requests in/ {print $1}' "$work/wrk.txt")
non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $5}' "$work/wrk.txt")
socket=$(awk '/Socket errors:/ {print $0}' "$work/wrk.txt")
echo
echo "before the rollback: $before"
echo "after the rollback:  $after"
echo "requests: $total; non-2xx: ${non2xx:-0}; ${socket:-socket errors: none}"
[ -z "$non2xx" ] && [ -z "$socket" ]
