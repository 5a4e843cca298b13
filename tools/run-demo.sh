#!/usr/bin/env bash
# The main job: builds kvtier, starts kvtierd on its embedded defaults (the GPU where
# one is found, else the cpu device) with tiers smaller than the demo's KV, runs the
# example decode loop (tools/decode_loop.py) against it, prints what each tier holds
# (kvtierctl status, seqs, stats),
# and stops the daemon. Extra arguments go to the decode loop.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup-deps.sh
[ -x /usr/local/cuda/bin/nvcc ] && export PATH=/usr/local/cuda/bin:$PATH
[ -f build/build.ninja ] || meson setup build >/dev/null
ninja -C build >/dev/null
py=python3
$py -c 'import numpy' 2>/dev/null || py=/usr/bin/python3
run=$(mktemp -d /tmp/kvtier-demo-XXXXXX)
export KVTIER_SOCKET=$run/kvtierd.sock KVTIER_LIB=$PWD/build/libkvtier.so
export KVTIER_CTL=$PWD/build/tools/kvtierctl # the loop shows kvtierctl's view at its end
# 256 MiB of KV against a 32 MiB GPU pool and a 64 MiB host tier: most pages on disk.
./build/kvtierd -o ipc.socket="$KVTIER_SOCKET" -o tenant.gpu_bytes=32M -o tenant.host_bytes=64M \
	-o store.nvme_bytes=1G -o metrics.listen=127.0.0.1:0 2> "$run/kvtierd.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$run"' EXIT
for _ in $(seq 100); do [ -S "$KVTIER_SOCKET" ] && break; sleep 0.1; done
grep -h "ready" "$run/kvtierd.log" | sed 's/^<[0-9]>//' || true
$py tools/decode_loop.py "$@"
kill -TERM $pid
wait $pid && echo "kvtierd: stopped cleanly"
