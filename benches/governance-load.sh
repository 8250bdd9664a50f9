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
    wrk_round "$round" "$t" "${url[$t]}" "$work/compile.lua"
  done
done

{
  echo "Run $(date +%F) on $(machine): $ROUNDS rounds × $DURATION s, wrk -t1 -c$CONNS, proxy with $WORKERS workers, RS256 token, config/policies, medians of the rounds."
  echo
  python3 benches/medians.py "$results" filters without jwt+policy
} > "$work/block.md"
cat "$work/block.md"
python3 benches/write_block.py "$OUT" "$MARK" "$work/block.md"
