# acge-proxy: the commands a developer and CI need.
#   make demo    build and run the seven-service demo on loopback
#   make test    fmt, clippy (warnings denied), then every test
#   make bench   load benchmark against nginx and haproxy (writes docs/performance.md)
#   make model   retrain the default ACGE models (encoder, then the fast model distilled from it, int8) and calibrate them (~25 min)
# cargo with libtorch set up (scripts/setup-libtorch.sh, cached) for the default `torch` feature.
CARGO ?= scripts/cargo-torch

.PHONY: setup setup-test build demo test bench model clean

setup:
	scripts/setup.sh all
	scripts/setup-libtorch.sh >/dev/null

setup-test:
	scripts/setup.sh test
	scripts/setup-helm.sh >/dev/null

build:
	$(CARGO) build --release

demo: setup-test
	$(CARGO) run --release -- demo

test: setup-test
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) test --workspace

bench:
	scripts/setup.sh bench
	benches/load.sh
	benches/chain-load.sh
	benches/migration-load.sh
	benches/flood.sh
	$(CARGO) bench --bench chain
	$(CARGO) bench --bench audit_append

# Retrain the default ACGE model (seeded; about 2 minutes on 2 cores).
model:
	"$$(scripts/setup-libtorch.sh | tail -n 1)" models/train_encoder.py --base "$$(models/fetch-minilm.sh | tail -n 1)" --out models/acge-encoder
	"$$(scripts/setup-libtorch.sh | tail -n 1)" models/train.py --out models/acge-default --teacher models/acge-encoder
	"$$(scripts/setup-libtorch.sh | tail -n 1)" models/calibrate.py

clean:
	$(CARGO) clean
