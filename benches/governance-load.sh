#!/usr/bin/env bash
# The full request path with the governance filters against without, same binary,
# same run, on loopback: POST compile requests (the pgc policy's kind) through
# acge-proxy with [jwt (RS256, key loaded), policy (config/policies)] and through the
# same proxy with no filter. The token is signed here with openssl. Medians of the
# rounds; writes docs/performance.md. Bounded: about a minute.
#
#   benches/governance-load.sh
#   ROUNDS=5 DURATION=20 CONNS=64 benches/governance-load.sh
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-32}
WORKERS=${WORKERS:-2}
OUT=${OUT:-docs/performance.md}
MARK=governance-load.sh

. benches/lib.sh
need_tools wrk nginx openssl curl python3
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
bench_workdir governance
build_release

upstream_conf <<EOF
  server { listen 127.0.0.1:19081 backlog=4096;
    location / { default_type application/json; return 200 '{"compiled":true}'; } }
EOF
start upstream "$NGINX" -c "$work/upstream.conf" -p "$work"

# An RS256 key, its JWKS, and a token with the auth service's claims.
openssl genrsa -out "$work/key.pem" 2048 2>/dev/null
modulus=$(openssl rsa -in "$work/key.pem" -noout -modulus | cut -d= -f2)
python3 - "$modulus" "$work/jwks.json" "$work/signing-input" <<'EOF'
import base64, json, sys, time
modulus, jwks, signing = sys.argv[1:]
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
json.dump({"keys": [{"kty": "RSA", "kid": "bench", "alg": "RS256", "n": b64(bytes.fromhex(modulus)), "e": "AQAB"}]}, open(jwks, "w"))
now = int(time.time())
header = b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": "bench"}).encode())
claims = b64(json.dumps({"sub": "svc-pgc", "iss": "https://auth.acgs.bench", "aud": "acgs", "exp": now + 3600, "nbf": now,
                         "constitutional_hash": "cdd01ef066bc6cf2", "constitutional_compliance_level": 0.97,
                         "constitutional_principles_validated": ["privacy", "rule_of_law"]}).encode())
open(signing, "w").write(f"{header}.{claims}")
EOF
signature=$(openssl dgst -sha256 -sign "$work/key.pem" "$work/signing-input" | base64 -w0 | tr '+/' '-_' | tr -d '=')
TOKEN="$(cat "$work/signing-input").$signature"

proxy_config() { # port filters
  cat <<EOF
listener: {address: 127.0.0.1:$1}
admin: {address: 127.0.0.1:$(( $1 + 1 ))}
clusters:
  up: {endpoints: ["127.0.0.1:19081"]}
filters:
  jwt: {jwks_file: $work/jwks.json, issuer: "https://auth.acgs.bench", audiences: [acgs]}
  policy: {dir: $PWD/config/policies}
routes:
  - {name: pgc, match: {path_prefix: /}, blue: up, green: up, filters: [$2]}
EOF
}
proxy_config 19400 "" > "$work/plain.yaml"
proxy_config 19500 "jwt, policy" > "$work/governed.yaml"
RUST_LOG=warn start plain "$BIN" run --config "$work/plain.yaml" --workers "$WORKERS"
RUST_LOG=warn start governed "$BIN" run --config "$work/governed.yaml" --workers "$WORKERS"
wait_port 19400; wait_port 19500

cat > "$work/compile.lua" <<EOF
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.headers["x-user-roles"] = "reader,policy-compiler"
wrk.headers["authorization"] = "Bearer $TOKEN"
wrk.body = '{"constitutional_hash":"cdd01ef066bc6cf2","rules":[{"id":"r1","effect":"allow"},{"id":"r2","effect":"deny"}],"target":"policy-v7"}'
EOF
declare -A url=([without]=http://127.0.0.1:19400/api/v1/policy/acge/compile
  [jwt+policy]=http://127.0.0.1:19500/api/v1/policy/acge/compile)
for t in without jwt+policy; do
  code=$(curl -s -o "$work/probe.json" -w '%{http_code}' -X POST -H 'content-type: application/json' \
    -H 'x-user-roles: policy-compiler' -H "authorization: Bearer $TOKEN" \
    --data '{"constitutional_hash":"cdd01ef066bc6cf2","rules":[]}' "${url[$t]}")
  [ "$code" = 200 ] || { echo "governance-load.sh: $t answered $code: $(cat "$work/probe.json")" >&2; exit 1; }
done

results="$work/results.tsv"
: > "$results"
for round in $(seq "$ROUNDS"); do
  for t in without jwt+policy; do
    wrk -t1 -c"$CONNS" -d2s -s "$work/compile.lua" "${url[$t]}" > /dev/null
    out=$(wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -s "$work/compile.lua" "${url[$t]}")
    rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
    p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
    errors=$(awk '/Non-2xx or 3xx responses:/ {n += $5} /Socket errors:/ {gsub(",", ""); n += $4 + $6 + $8 + $10} END {print n + 0}' <<<"$out")
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$t" "$rps" "$p50" "$p99" "$errors" >> "$results"
    printf 'round %s  %-10s %10s req/s  p50 %-8s p99 %-8s failed %s\n' "$round" "$t" "$rps" "$p50" "$p99" "$errors"
  done
done

python3 - "$results" "$OUT" "$MARK" "$ROUNDS" "$DURATION" "$CONNS" "$WORKERS" <<'EOF'
import datetime, os, re, statistics, sys
results, out, mark, rounds, duration, conns, workers = sys.argv[1:]
def ms(s):
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", s)
    v = float(m.group(1))
    return {"us": v / 1000, "ms": v, "s": v * 1000}[m.group(2)]
rows = {}
for line in open(results):
    _, t, rps, p50, p99, errors = line.rstrip("\n").split("\t")
    rows.setdefault(t, []).append((float(rps), ms(p50), ms(p99), int(errors)))
base = statistics.median(r[0] for r in rows["without"])
lines = ["| filters | requests/s (median) | p50 ms | p99 ms | vs without | failed |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
for t in ["without", "jwt+policy"]:
    v = rows[t]
    rps, p50, p99 = (statistics.median(r[i] for r in v) for i in range(3))
    lines.append(f"| {t} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {rps / base:.2f}× | {sum(r[3] for r in v)} |")
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
block = (f"<!-- {mark}:begin -->\n"
         f"Run {datetime.date.today()} on {os.cpu_count()} × {cpu}: {rounds} rounds × {duration} s, wrk -t1 -c{conns}, "
         f"proxy with {workers} workers, RS256 token, config/policies, medians of the rounds.\n\n" + "\n".join(lines) + f"\n<!-- {mark}:end -->")
print("\n" + "\n".join(lines))
text = open(out).read() if os.path.exists(out) else "# Performance\n"
if f"<!-- {mark}:begin -->" not in text:
    text += f"\n<!-- {mark}:begin -->\n<!-- {mark}:end -->\n"
text = re.sub(f"<!-- {re.escape(mark)}:begin -->.*?<!-- {re.escape(mark)}:end -->", lambda _: block, text, flags=re.S)
open(out, "w").write(text)
print(f"\nwritten to {out}")
EOF
