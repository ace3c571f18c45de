#!/usr/bin/env bash
# Installs every build and test dependency from Debian 12's archive.
# Idempotent; safe to run on a fresh machine (needs root or sudo).
set -euo pipefail
SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; fi
# Build dependencies (the Dockerfile's build stage installs the same; the
# deploy validator checks that).
PKGS=(
  build-essential cmake ninja-build pkg-config git ca-certificates curl
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev prometheus-cpp-dev libgloo-dev libgtest-dev libgmock-dev
  libopenblas-dev nlohmann-json3-dev libpng-dev libgif-dev libssl-dev
)
# Test-only tools: the NumPy reference, promtool/Prometheus, clang with
# libFuzzer (tests/fuzz), openssl (certificates in the TLS tests).
TEST_PKGS=(
  python3 python3-numpy prometheus
  clang libclang-rt-14-dev openssl
)
missing=()
for p in "${PKGS[@]}" "${TEST_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Node.js + npm for deploy/validate.sh. Build machines often come with a newer
# Node (e.g. NodeSource's 20, which bundles npm); only install Debian's
# (nodejs 18 + npm 9) where there is none, never over it.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  missing+=(nodejs npm)
fi
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
