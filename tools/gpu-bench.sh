#!/usr/bin/env bash
# On the GPU machine: build, then kvtier-bench's comparison (tools/BENCHMARKS.md, issue
# #7): dense, full reload, sparse all on the GPU and kvtier, the summary table last.
#   source .devsys/env.sh && bash tools/gpu-bench.sh [main|batch|batch8|batch32|batch32-24k|disk|all|trace]
# main: Llama-3.1-8B shape, batch 1, 32K and 128K; batch8: batch 8 at 32K (32 GiB of KV;
# the 2048-token selection, 6.25% of the pages, fits the 10% pool), every method with
# kvtier's host tier holding all of the KV (--host-budget 1.3: past the store's 90%
# watermark, with room; the GPU pool stays 10%: the issue's budget), then dense
# and kvtier with the host tier at 50% (-disk: ~60% of the pages new to a step's
# selection only on NVMe); batch32: batch 32 at 12K, the same two ways (48 GiB of KV,
# 56 GiB of NVMe slots: the machine's 64 GiB disk holds no more, 16K's would need 74; at
# batch 32 no context fits dense in HBM and has a selection below the pool, 16.7% of the
# pages here); both append the daemon's `kvtierctl stats` (hurried reads' latency,
# waits) to $OUT/<name>-daemon.txt. disk: kvtier alone at 256K with a host tier of 20% of the KV
# (70% of the KV only on NVMe). Logs, CSV and plots go to $OUT
# (or ./gpu-out). trace: sparse and kvtier at 128K with every device op recorded
# (tools/cupti_trace.c, CUPTI's activity records), tools/trace_steps.py's summary of
# where a step's device time goes, and the records in trace.tar.gz. store:
# kvtier-bench-store, a lease's cost to the daemon's thread in a store of 1M pages, its
# lookups plain and warmed (kvt_store_warm) side by side. NODISK=1: batchN without its
# -disk run. all: main, batch8, batch32 (batch32-24k instead on a GPU of 130 GB or more,
# which holds dense's KV at 24K: the H200), store and disk; an hour or more.
set -uo pipefail
what=${1:-all}
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
export PATH=/usr/local/cuda/bin:$PATH
if [ ! -x build-gpu/tools/kvtier-bench ] || [ -n "${REBUILD:-}" ]; then
	meson setup build-gpu -Dcuda=enabled >"$out/build.log" 2>&1 || meson setup --reconfigure build-gpu >>"$out/build.log" 2>&1
fi
ninja -C build-gpu >>"$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$out/machine.txt" 2>&1
bench=./build-gpu/tools/kvtier-bench
# Two processes share the GPU (the bench, kvtierd): without MPS their contexts take
# turns, and the daemon's copies into the GPU pool wait for its turn (copy p50 3.8-16 ms
# against 0.77 ms with MPS, H100, session 16). MPS=0 runs without it.
mps=off
if [ "${MPS:-1}" = 1 ] && command -v nvidia-cuda-mps-control >/dev/null; then
	export CUDA_MPS_PIPE_DIRECTORY=${CUDA_MPS_PIPE_DIRECTORY:-/tmp/kvtier-mps-pipe}
	export CUDA_MPS_LOG_DIRECTORY=${CUDA_MPS_LOG_DIRECTORY:-/tmp/kvtier-mps-log}
	mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
	if nvidia-cuda-mps-control -d; then
		mps=on
		trap 'echo quit | nvidia-cuda-mps-control' EXIT
	fi
fi
run() { # name, args...
	local name=$1
	shift
	echo "== kvtier-bench $*"
	$bench --dir build-gpu --no-progress --csv "$out/$name.csv" --plot "$out/plots-$name" "$@" \
		>"$out/$name.txt" 2>"$out/$name.err"
	echo "rc $?"
	cat "$out/$name.err" | grep -v "^$" | tail -5
}
case $what in main | all) run main --context 32K,128K --batch 1 ;; esac
# all: batch 32 at 24K where the GPU holds dense's 96 GiB of KV (H200), else at 12K
mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
big=0
[ "${mib:-0}" -ge 130000 ] 2>/dev/null && big=1
for b in 8:32K 32:12K; do
	case $what in batch | batch${b%%:*}) ;; all) [ "$b" = 32:12K ] && [ $big = 1 ] && continue ;; *) continue ;; esac
	run batch${b%%:*} --context ${b#*:} --batch ${b%%:*} --host-budget 1.3 \
		--daemon-stats "$out/batch${b%%:*}-daemon.txt"
	[ -n "${NODISK:-}" ] && continue
	run batch${b%%:*}-disk --methods dense,kvtier --context ${b#*:} --batch ${b%%:*} \
		--daemon-stats "$out/batch${b%%:*}-disk-daemon.txt"
done
# batch32-24k: batch 32 at 24K (96 GiB of KV, the selection fits the 10% pool) on a GPU that
# holds dense's KV (H200), kvtier with the write-back policy (its NVMe tier 33 GiB: the
# disk holds only what 92 GiB of pinned host RAM does not), 200 timed steps (64 leave
# the write-back's tail in: session 28); reload alone, 6 steps. Part of all on such a GPU.
if [ "$what" = batch32-24k ] || { [ "$what" = all ] && [ $big = 1 ]; }; then
	run batch32-24k --methods dense,sparse,kvtier --context 24K --batch 32 --write-back \
		--host-budget 0.95 --warmup 64 --steps 200 --daemon-stats "$out/batch32-24k-daemon.txt"
	run batch32-24k-reload --methods reload --context 24K --batch 32 --warmup 1 --steps 6
fi
case $what in store | all)
	echo "== kvtier-bench-store -d cuda -n 1048576"
	./build-gpu/tools/kvtier-bench-store -d cuda -n 1048576 -D build-gpu >"$out/store.txt" 2>&1
	echo "rc $?"
	;;
esac
case $what in disk | all) run disk --methods kvtier --context 256K --batch 1 --host-budget 0.2 ;; esac
if [ "$what" = trace ]; then
	inc=$(dirname "$(find /usr/local/cuda/ -name cupti.h 2>/dev/null | head -1)")
	lib=$(dirname "$(find /usr/local/cuda/ -name 'libcupti.so' 2>/dev/null | head -1)")
	newest() { grep -o "} $1[0-9]*;" "$inc/cupti_activity.h" | tr -d '}; ' | sort -V | tail -1; }
	so=build-gpu/libkvt_cupti_trace.so
	if ! gcc -O2 -shared -fPIC -I"$inc" -DKREC="$(newest CUpti_ActivityKernel)" \
		-DMREC="$(newest CUpti_ActivityMemcpy)" -DSREC="$(newest CUpti_ActivityMemset)" \
		tools/cupti_trace.c -o $so -L"$lib" -lcupti -Wl,-rpath,"$lib" >"$out/trace-build.log" 2>&1; then
		echo "no CUPTI tracer (CUPTI in '$inc', '$lib'):"
		tail -20 "$out/trace-build.log"
	else
		mkdir -p "$out/trace"
		KVT_TRACE_DIR=$out/trace LD_PRELOAD=$PWD/$so run trace --methods sparse,kvtier --context 128K \
			--batch 1 --steps 24 ${TRACE_ARGS:-}
		python3 tools/trace_steps.py "$out/trace" >"$out/trace-summary.txt" 2>&1
		find "$out/trace" -size 0 -delete
		tar -czf "$out/trace.tar.gz" -C "$out" trace && rm -rf "$out/trace"
	fi
fi
echo "== machine (MPS $mps)"; cat "$out/machine.txt"
for f in store main batch8 batch8-disk batch32 batch32-disk batch32-24k batch32-24k-reload disk trace trace-summary; do
	[ -f "$out/$f.txt" ] && cat "$out/$f.txt"
done
exit 0
