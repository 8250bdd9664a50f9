#!/usr/bin/env bash
# The Open Inference Protocol server the remote-inference tests and benchmark run:
# Seldon's MLServer from PyPI, pinned, in a venv cached under ~/.cache/acge-proxy, with
# the torch venv's PyTorch (scripts/setup-libtorch.sh) made visible to it by a .pth
# file rather than installed twice. Prints the venv's `mlserver` executable.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${ACGE_CACHE_DIR:-$HOME/.cache/acge-proxy}
VERSION=1.7.1
VENV=$CACHE/mlserver-$VERSION
TORCH_PY=$(scripts/setup-libtorch.sh | tail -1)
# Tests call this in parallel: one installs, the others wait for it.
mkdir -p "$CACHE"
exec 9>"$CACHE/mlserver-$VERSION.lock"
flock 9
if [ ! -x "$VENV/bin/mlserver" ] || [ ! -f "$VENV/.complete" ]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -c scripts/mlserver-constraints.txt "mlserver==$VERSION" >&2
  touch "$VENV/.complete"
fi
site=$("$TORCH_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
own=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$site" > "$own/acge-torch.pth"
echo "$VENV/bin/mlserver"
