#!/usr/bin/env bash
# On the GPU machine: build, run the whole suite (GPU tests included), the promotion
# benchmark (gather kernel and cudaMemcpyBatchAsync), the nvme benchmark and the demo.
# Logs go to $OUT (or ./gpu-out); a short table comes last.
#   source .devsys/env.sh && bash tools/gpu-check.sh [all|kernels|daemon|prefetch|ctl]
# "kernels": build, tests and the kernel benchmark only. "daemon": build, tests, then
# kvtierd on the GPU with the Python binding test, the decode loop and the IPC bench.
# "prefetch": build, tests, the binding test on cuda, then tools/bench_prefetch.py
# (a small run first, then the Llama-3.1-8B shape at 128K). "ctl": build, tests, the
# kvtierctl test against a kvtierd on the GPU, the decode loop with kvtierctl's view.
set -uo pipefail
what=${1:-all}
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
export PATH=/usr/local/cuda/bin:$PATH
{
	nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
	uname -r; nvcc --version | tail -1
} >"$out/machine.txt" 2>&1
meson setup build-gpu -Dcuda=enabled >"$out/build.log" 2>&1 && ninja -C build-gpu >>"$out/build.log" 2>&1 ||
	{ tail -30 "$out/build.log"; exit 1; }
meson test -C build-gpu --print-errorlogs --num-processes 4 >"$out/tests.log" 2>&1
tests_rc=$?
grep -E "^ *[0-9]+/[0-9]+ |Ok:|Fail:|Skipped:" "$out/tests.log" | tail -12
grep -h "gpu:" build-gpu/meson-logs/testlog.txt | head -2
if [ "$what" = prefetch ]; then
	KVT_TEST_DEVICE=cuda KVT_TEST_DIR=$PWD/build-gpu bash tests/ipc/test_binding.sh "$PWD/build-gpu" "$PWD" \
		>"$out/binding-cuda.txt" 2>&1
	echo "== binding test on cuda: rc $?"; grep -E "attached|decode:|sparse|copy order|FAIL" "$out/binding-cuda.txt"
	echo "== bench_prefetch, small"
	python3 tools/bench_prefetch.py --build build-gpu --dir build-gpu --layers 4 --context 16384 \
		--steps 16 --pool-frac 0.5 >"$out/prefetch-small.txt" 2>&1
	echo "rc $?"; tail -12 "$out/prefetch-small.txt"
	echo "== bench_prefetch, small, no host reads: the copy fence against waiting for copies"
	python3 tools/bench_prefetch.py --build build-gpu --dir build-gpu --layers 4 --context 16384 \
		--steps 16 --pool-frac 0.5 --no-host-reads --compare-fence >"$out/prefetch-fence.txt" 2>&1
	echo "rc $?"; grep -E "step |hit|ratio" "$out/prefetch-fence.txt"
	echo "== bench_prefetch, Llama-3.1-8B shape, 128K"
	python3 tools/bench_prefetch.py --build build-gpu --dir build-gpu ${PF_ARGS:-} >"$out/prefetch.txt" 2>&1
	echo "rc $?"; tail -14 "$out/prefetch.txt"
	grep -E "^<[34]>" build-gpu/bench-prefetch-kvtierd.log | sort | uniq -c | sort -rn | head -10
	echo "tests rc $tests_rc"
	exit 0
fi
if [ "$what" = ctl ]; then
	KVT_TEST_DEVICE=cuda KVT_TEST_DIR=$PWD/build-gpu python3 tests/tools/test_kvtierctl.py \
		"$PWD/build-gpu" "$PWD" >"$out/kvtierctl-cuda.txt" 2>&1
	echo "== kvtierctl test on cuda: rc $?"; grep -E "^FAIL|failures|skipped" "$out/kvtierctl-cuda.txt"
	d=$(mktemp -d -p "$PWD/build-gpu")
	export KVTIER_SOCKET=$d/s.sock KVTIER_LIB=$PWD/build-gpu/libkvtier.so
	export KVTIER_CTL=$PWD/build-gpu/tools/kvtierctl
	./build-gpu/kvtierd -o ipc.socket="$KVTIER_SOCKET" -o store.state_dir="$d" -o tenant.gpu_bytes=32M \
		-o tenant.host_bytes=64M -o store.nvme_bytes=1G -o metrics.listen=off 2>"$out/kvtierd.log" &
	pid=$!
	for _ in $(seq 100); do [ -S "$KVTIER_SOCKET" ] && break; sleep 0.1; done
	python3 tools/decode_loop.py >"$out/decode-loop.txt" 2>&1
	echo "== decode loop on cuda: rc $?"; tail -40 "$out/decode-loop.txt"
	$KVTIER_CTL stats --prometheus >"$out/metrics.txt"
	$KVTIER_CTL plan --model llama-3.1-8b --context 128K --sessions 4 >"$out/plan.txt"; cat "$out/plan.txt"
	kill -TERM $pid; wait $pid; echo "kvtierd exit $?"
	grep -E "^<[34]>" "$out/kvtierd.log" | head -20
	echo "tests rc $tests_rc"
	exit 0
fi
if [ "$what" = daemon ]; then
	KVT_TEST_DEVICE=cuda KVT_TEST_DIR=$PWD/build-gpu bash tests/ipc/test_binding.sh "$PWD/build-gpu" "$PWD" \
		>"$out/binding-cuda.txt" 2>&1
	echo "== binding test on cuda: rc $?"; grep -E "attached|decode:|sparse|gpu |copy order|ordering|FAIL" "$out/binding-cuda.txt"
	d=$(mktemp -d -p "$PWD/build-gpu")
	export KVTIER_SOCKET=$d/s.sock KVTIER_LIB=$PWD/build-gpu/libkvtier.so
	./build-gpu/kvtierd -o ipc.socket="$KVTIER_SOCKET" -o store.state_dir="$d" -o tenant.gpu_bytes=32M \
		-o tenant.host_bytes=64M -o store.nvme_bytes=1G 2>"$out/kvtierd.log" &
	pid=$!
	for _ in $(seq 100); do [ -S "$KVTIER_SOCKET" ] && break; sleep 0.1; done
	python3 tools/decode_loop.py >"$out/decode-loop.txt" 2>&1
	echo "== decode loop on cuda: rc $?"; cat "$out/decode-loop.txt" | tail -8
	./build-gpu/tools/kvtier-bench-ipc "$KVTIER_SOCKET" 100000 >"$out/ipc.txt" 2>&1
	echo "== ipc"; cat "$out/ipc.txt"
	kill -TERM $pid; wait $pid; echo "kvtierd exit $?"
	grep -E "^<[34]>" "$out/kvtierd.log" | head -20
	echo "tests rc $tests_rc"
	exit 0
fi
# jemalloc's static TLS cannot come with a dlopen()ed library: preload it.
je=$(ldd build-gpu/libkvtier.so | awk '/libjemalloc/ {print $3}')
LD_PRELOAD=$je python3 tools/bench_kernels.py --lib build-gpu/libkvtier.so >"$out/kernels.txt" 2>&1
echo "== kernels (selection, sparse attention, recall)"; cat "$out/kernels.txt" | tail -20
if [ -x build-gpu/tools/kvtier-bench-ingest ]; then
	./build-gpu/tools/kvtier-bench-ingest >"$out/ingest.txt" 2>&1
	echo "== scattered pages into shared memory (the attention's load floor)"; cat "$out/ingest.txt"
fi
if [ "$what" = kernels ]; then
	echo "tests rc $tests_rc"
	exit 0
fi
./build-gpu/tools/kvtier-bench-promote -d cuda >"$out/promote-kernel.txt" 2>&1
KVT_CUDA_COPY=memcpy ./build-gpu/tools/kvtier-bench-promote -d cuda >"$out/promote-memcpy.txt" 2>&1
./build-gpu/tools/kvtier-bench-promote -d cuda -p 256 -n 1024 >"$out/promote-256k.txt" 2>&1
./build-gpu/tools/kvtier-store-demo -d cuda -f build-gpu/demo.store -t 131072 >"$out/demo.txt" 2>&1
demo_rc=$?
./build-gpu/tools/kvtier-bench-nvme -f build-gpu/bench.store -s 8192 -t 3 >"$out/nvme.txt" 2>&1
echo "== machine"; cat "$out/machine.txt"
echo "== promotion (32 KiB pages, gather kernel)"; tail -3 "$out/promote-kernel.txt"
echo "== promotion (32 KiB pages, cudaMemcpyBatchAsync)"; tail -2 "$out/promote-memcpy.txt"
echo "== promotion (256 KiB pages, gather kernel)"; tail -2 "$out/promote-256k.txt"
echo "== demo (rc $demo_rc)"; grep -E "device|prefill|decode:|restart" "$out/demo.txt"
echo "== nvme"; cat "$out/nvme.txt" | tail -30
echo "tests rc $tests_rc"
