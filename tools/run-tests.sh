#!/usr/bin/env bash
# The whole test suite: builds kvtier in BUILD (default build) and runs every test.
# Extra arguments go to `meson setup` (e.g. -Db_sanitize=address,undefined).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup-deps.sh
[ -x /usr/local/cuda/bin/nvcc ] && export PATH=/usr/local/cuda/bin:$PATH
dir=${BUILD:-build}
if [ -f "$dir/build.ninja" ]; then
	[ $# -eq 0 ] || meson configure "$dir" "$@" >/dev/null
else
	meson setup "$dir" "$@" >/dev/null
fi
ninja -C "$dir"
meson test -C "$dir" --print-errorlogs --num-processes "$(nproc)"
