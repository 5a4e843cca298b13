#!/usr/bin/env bash
# The main job: builds kvtier and runs the page store demo (GPU where one is found,
# else the cpu device), printing what each tier holds.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup-deps.sh
[ -x /usr/local/cuda/bin/nvcc ] && export PATH=/usr/local/cuda/bin:$PATH
[ -f build/build.ninja ] || meson setup build >/dev/null
ninja -C build >/dev/null
exec ./build/tools/kvtier-store-demo "$@"
