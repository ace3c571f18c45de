# syntax=docker/dockerfile:1
#
# The denoised container image: one `denoised` binary that runs as the
# coordinator (the default command), a worker group (`worker ...`), the demo
# or the CLI client. See docs/DEPLOY.md.
#
# Default: the CUDA build. A CUDA 13 devel image (Ubuntu 24.04) compiles with
# DENOISED_CUDA=ON for sm_90 (H100); the runtime stage is the matching slim
# CUDA runtime image with cuDNN (NCCL comes with NVIDIA's runtime images).
#
#   docker build -t denoised:cuda .
#
# CPU-only variant (Debian 12 for both stages; what deploy/container-test.sh
# builds and runs with podman):
#
#   docker build -t denoised:cpu --build-arg BUILD_IMAGE=debian:12 \
#     --build-arg RUNTIME_IMAGE=debian:12 --build-arg DENOISED_CUDA=OFF .
#
# The runtime stage carries only what the binary needs: the shared libraries
# that `ldd` reports for it (gRPC, protobuf, absl, prometheus-cpp, Gloo,
# OpenBLAS, libpng16 and giflib's libgif7 for the demo's PNG and GIF, ...),
# copied from the build stage, less those the runtime base already provides
# (glibc, libstdc++, and on CUDA the CUDA, cuBLAS, cuDNN and NCCL libraries),
# and the demo model (tools/demo_model) where `denoised demo` looks for it.
# No compilers, headers or package lists.

ARG BUILD_IMAGE=nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04
ARG RUNTIME_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------------------
FROM ${BUILD_IMAGE} AS build
# ON: require nvcc (CUDA backend + NCCL); OFF: CPU only (Gloo + OpenBLAS).
ARG DENOISED_CUDA=ON
ARG CUDA_ARCHITECTURES=90
# Parallel compile jobs; empty = all cores.
ARG BUILD_JOBS=
ENV DEBIAN_FRONTEND=noninteractive

# The build dependencies of scripts/install-deps.sh (deploy/validate.sh checks
# they agree); these names exist in Debian 12 (main) and Ubuntu 24.04
# (universe). python3: the test tree's CMake looks it up.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      build-essential cmake ninja-build pkg-config ca-certificates \
      libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler \
      libabsl-dev prometheus-cpp-dev libgloo-dev libgtest-dev libgmock-dev \
      libopenblas-dev nlohmann-json3-dev libpng-dev libgif-dev libssl-dev python3 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY CMakeLists.txt ./
COPY base/ base/
COPY proto/ proto/
COPY comm/ comm/
COPY worker/ worker/
COPY server/ server/
COPY bench/ bench/
COPY cmd/ cmd/
COPY tests/ tests/
RUN cmake -S . -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DDENOISED_CUDA="${DENOISED_CUDA}" \
      -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHITECTURES}" \
 && cmake --build /build --target denoised -j"${BUILD_JOBS:-$(nproc)}" \
 && /build/bin/denoised version

# Collect the binary's shared libraries, except those the runtime base has.
RUN set -eu; mkdir -p /out/bin /out/lib; \
    cp /build/bin/denoised /out/bin/; \
    ldd /build/bin/denoised | awk '$2 == "=>" && $3 ~ /^\// { print $3 }' | sort -u | \
    while read -r lib; do \
      case "$(basename "$lib")" in \
        ld-linux*|libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*) ;; \
        libstdc++.so*|libgcc_s.so*) ;; \
        libcuda.so*|libcudart.so*|libcublas*|libcudnn*|libnccl*|libnvrtc*|libnvJitLink*) ;; \
        *) cp -L "$lib" /out/lib/ ;; \
      esac; \
    done; \
    ls /out/lib

# ---------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime
LABEL org.opencontainers.image.title="denoised" \
      org.opencontainers.image.description="Wan2.1 DiT denoising over gRPC, sharded across GPUs (Ulysses sequence parallelism)"

COPY --from=build /out/lib/ /opt/denoised/lib/
COPY --from=build /out/bin/denoised /opt/denoised/bin/denoised
# The demo model: `denoised demo` finds it at ../share/denoised/demo_model
# next to its binary (server/demo_model.h).
COPY tools/demo_model/ /opt/denoised/share/denoised/demo_model/
# Register the libraries, fail the build if anything is still unresolved
# (libcuda.so.1 comes from the host's driver at run time; libgif.so.7 and
# libpng16.so.16 come from the build stage like the rest), and add the
# unprivileged user the image runs as.
RUN set -eu; \
    echo /opt/denoised/lib > /etc/ld.so.conf.d/denoised.conf; ldconfig; \
    ln -s /opt/denoised/bin/denoised /usr/local/bin/denoised; \
    if ldd /opt/denoised/bin/denoised | grep 'not found' | grep -v 'libcuda\.so'; then \
      echo "denoised: unresolved shared libraries" >&2; exit 1; \
    fi; \
    groupadd --system --gid 10001 denoised; \
    useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent \
      --no-create-home --shell /usr/sbin/nologin denoised; \
    denoised version

USER 10001:10001
WORKDIR /tmp
# 50051: public gRPC (Denoiser, grpc.health.v1, reflection)
# 50052: internal worker port (ranks attach here)
# 9400: Prometheus /metrics (a worker group's rank r serves 9400 + r)
EXPOSE 50051 50052 9400
# The coordinator's health, through grpc.health.v1 (worker containers serve
# no gRPC: run them with --no-healthcheck, or rely on Kubernetes probes).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["denoised", "health", "--target", "127.0.0.1:50051", "--timeout", "3"]
ENTRYPOINT ["denoised"]
CMD ["coordinator", "--listen", "0.0.0.0:50051", "--worker-listen", "0.0.0.0:50052", "--metrics-listen", "0.0.0.0:9400"]
