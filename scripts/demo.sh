#!/usr/bin/env bash
# The README's first command: installs dependencies, builds (CPU), and runs
# the main job on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh build -DDENOISED_CUDA=OFF
exec build/bin/denoised demo "$@"
