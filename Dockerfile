# syntax=docker/dockerfile:1
# The acge-proxy image: the release binary, libtorch's libraries and the default
# models, run as a non-root user. Both stages use the repository's own scripts (the
# ones `make build` and CI run), so the build here is the build CI exercises.
#
#   docker build -t acge-proxy:0.1.0 .
#
# Size: libtorch comes from the PyPI torch wheel, which is the CUDA build. The runtime
# stage copies torch/lib (about 950 MB: the CPU and CUDA kernels) and the wheel's
# nvidia/ libraries (about 2.7 GB, needed by libtorch_cuda.so, which libtorch loads
# when a GPU is present), plus the binary (about 100 MB) and the models (about 50 MB):
# an image of about 3.8 GB. A CPU-only image would need a CPU build of libtorch,
# which this project does not build yet.

FROM debian:bookworm AS build
# The cache the scripts use, at a path the runtime stage keeps: the binary finds
# libtorch by its RUNPATH, which points into it.
ENV ACGE_CACHE_DIR=/opt/acge/cache
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends \
      ca-certificates curl gcc g++ make python3 python3-venv sudo git \
    && rm -rf /var/lib/apt/lists/*
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.95.0
ENV PATH=/root/.cargo/bin:$PATH
WORKDIR /src
COPY . .
# What `make build` runs: libtorch into the cache (scripts/setup-libtorch.sh, through
# scripts/cargo-torch), then the release build.
RUN scripts/setup-libtorch.sh >/dev/null && scripts/cargo-torch build --release --locked

FROM debian:bookworm-slim
ENV ACGE_CACHE_DIR=/opt/acge/cache
COPY --from=build /opt/acge/cache/torch-2.13.0/lib/python3.11/site-packages/torch/lib \
                  /opt/acge/cache/torch-2.13.0/lib/python3.11/site-packages/torch/lib
COPY --from=build /opt/acge/cache/torch-2.13.0/lib/python3.11/site-packages/nvidia \
                  /opt/acge/cache/torch-2.13.0/lib/python3.11/site-packages/nvidia
COPY --from=build /src/target/release/acge-proxy /usr/local/bin/acge-proxy
COPY --from=build /src/models /opt/acge/models
COPY --from=build /src/config /opt/acge/config
# The uid and gid the chart's securityContext runs as.
RUN groupadd --gid 65532 acge && useradd --uid 65532 --gid 65532 --no-create-home acge
USER 65532:65532
EXPOSE 15001 15000
ENTRYPOINT ["/usr/local/bin/acge-proxy"]
CMD ["run", "--config", "/opt/acge/config/seven-services.yaml"]
