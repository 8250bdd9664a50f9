#!/usr/bin/env bash
# Installs, idempotently, what building and testing acge-proxy needs on Debian:
#   tests:      curl with HTTP/2 (the real client the integration tests drive),
#               promtool (Debian's prometheus package: the alert rules' checks)
#   benchmarks: wrk, h2load, nginx and haproxy (the peers benches/load.sh measures)
# Usage: scripts/setup.sh [test|bench|all]   (default: all)
# Nothing is installed that is already there; run it as often as you like.
set -euo pipefail

what=${1:-all}
need=()
want() { command -v "$1" >/dev/null 2>&1 || need+=("$2"); }

want curl curl
want cc gcc
want promtool prometheus
if [ "$what" = bench ] || [ "$what" = all ]; then
  want wrk wrk
  want h2load nghttp2-client
  [ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || need+=(nginx-light)
  [ -x /usr/sbin/haproxy ] || command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
fi

if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # The benchmark starts its own nginx and haproxy, the tests their own Prometheus;
  # the packaged services stay off.
  for svc in nginx haproxy prometheus prometheus-node-exporter; do
    $sudo systemctl disable --now "$svc" >/dev/null 2>&1 || $sudo service "$svc" stop >/dev/null 2>&1 || true
  done
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is missing; install Rust with rustup (https://rustup.rs) first" >&2
  exit 1
fi
if command -v rustup >/dev/null 2>&1; then
  for c in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
  done
fi
echo "setup: ok ($what)"
