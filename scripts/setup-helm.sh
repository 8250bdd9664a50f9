#!/usr/bin/env bash
# Installs, idempotently, what the chart tests need: a Python venv with Helm's own Go
# SDK (helm-python-sdk: Helm v4 through a C library; no helm binary), Kubernetes'
# schemas (kubernetes-validate) and PyYAML, pinned, in the cache directory that
# survives between runs. Prints the venv's python on its last line.
#
#   scripts/setup-helm.sh
set -euo pipefail

CACHE=${ACGE_CACHE_DIR:-$HOME/.cache/acge-proxy}
VENV=$CACHE/helm-venv
PY=$VENV/bin/python
PINS=(helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 PyYAML==6.0.3)

have() {
  [ -x "$PY" ] && "$PY" - "${PINS[@]}" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if all(version(p.split("==")[0]) == p.split("==")[1] for p in sys.argv[1:]) else 1)
PYEOF
}

if ! have; then
  if ! python3 -m venv --help >/dev/null 2>&1; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-venv >/dev/null
  fi
  mkdir -p "$CACHE"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  echo "setup-helm: installing ${PINS[*]} into $VENV" >&2
  "$VENV/bin/pip" install --quiet --no-input --disable-pip-version-check "${PINS[@]}"
  have || { echo "setup-helm: the pinned packages did not install into $VENV" >&2; exit 1; }
fi
echo "$PY"
