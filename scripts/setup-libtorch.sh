#!/usr/bin/env bash
# Installs, idempotently, libtorch for the `tch` crate: a Python venv holding the PyPI
# torch wheel, in a cache directory that survives between runs (and between CI runs on
# the same machine). The build then uses LIBTORCH_USE_PYTORCH=1 with this venv's
# python. The wheel is the CUDA build: it runs on CPU where no GPU is present.
#
#   scripts/setup-libtorch.sh          # prints the venv's python on its last line
set -euo pipefail

TORCH_VERSION=${TORCH_VERSION:-2.13.0}
CACHE=${ACGE_CACHE_DIR:-$HOME/.cache/acge-proxy}
VENV=$CACHE/torch-$TORCH_VERSION
PY=$VENV/bin/python

# The Python side of the model contract (models/acge_input.py, the tests' model
# writer) tokenises with the same library the proxy links: Hugging Face tokenizers.
TOKENIZERS_VERSION=${TOKENIZERS_VERSION:-0.23.3}

have_torch() {
  [ -x "$PY" ] && "$PY" - "$TORCH_VERSION" <<'PYEOF' 2>/dev/null
import sys, torch
sys.exit(0 if torch.__version__.split("+")[0] == sys.argv[1] else 1)
PYEOF
}

have_tokenizers() {
  "$PY" -c "import sys, tokenizers; sys.exit(0 if tokenizers.__version__ == '$TOKENIZERS_VERSION' else 1)" 2>/dev/null
}

if ! have_torch; then
  if ! python3 -m venv --help >/dev/null 2>&1; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-venv >/dev/null
  fi
  mkdir -p "$CACHE"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  echo "setup-libtorch: installing torch==$TORCH_VERSION into $VENV (a large download, once)" >&2
  "$VENV/bin/pip" install --quiet --no-input --disable-pip-version-check "torch==$TORCH_VERSION" numpy
  have_torch || { echo "setup-libtorch: torch $TORCH_VERSION did not import from $VENV" >&2; exit 1; }
fi
if ! have_tokenizers; then
  "$VENV/bin/pip" install --quiet --no-input --disable-pip-version-check "tokenizers==$TOKENIZERS_VERSION"
  have_tokenizers || { echo "setup-libtorch: tokenizers $TOKENIZERS_VERSION did not import from $VENV" >&2; exit 1; }
fi
echo "$PY"
