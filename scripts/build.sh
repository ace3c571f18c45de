#!/usr/bin/env bash
# Configures and builds denoised. Usage: scripts/build.sh [BUILD_DIR] [extra cmake args]
# DENOISED_CUDA=AUTO (default) builds the CUDA parts when nvcc is found.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-build}; shift || true
if [[ ! -f $dir/build.ninja ]]; then
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@"
fi
cmake --build "$dir" -j"$(nproc)"
