#!/usr/bin/env bash
# The Python binding end to end: a real kvtierd, tools/decode_loop.py through ctypes,
# with a budget that covers every page so that sparse attention must equal the dense
# reference (up to fp16 rounding); then a budget that does not (must stay close on this
# clustered workload).
set -euo pipefail
build=$1 src=$2
py=python3
$py -c 'import numpy' 2>/dev/null || py=/usr/bin/python3
$py -c 'import numpy' 2>/dev/null || { echo "numpy missing: skip"; exit 77; }
run=$(mktemp -d /tmp/kvtier-bind-XXXXXX)
dir="${KVT_TEST_DIR:-.}/kvt-test-binding-$$"
mkdir -p "$dir"
export KVTIER_SOCKET=$run/s.sock KVTIER_LIB=$build/libkvtier.so
"$build/kvtierd" -o ipc.socket="$KVTIER_SOCKET" -o store.state_dir="$dir" -o store.device="${KVT_TEST_DEVICE:-cpu}" \
	-o tenant.gpu_bytes=16M -o tenant.host_bytes=48M -o store.nvme_bytes=256M &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$run" "$dir"' EXIT
for _ in $(seq 100); do [ -S "$KVTIER_SOCKET" ] && break; sleep 0.05; done
# A sanitized libkvtier inside python: its runtimes must be loaded first (and python's
# own allocations are not ours to report).
san=$(ldd "$build/libkvtier.so" | awk '/libasan|libubsan/ {print $3}' | paste -sd: -)
if [ -n "$san" ]; then
	py="env LD_PRELOAD=$san ASAN_OPTIONS=detect_leaks=0 $py"
fi
$py "$src/tools/decode_loop.py" --layers 2 --kv-heads 2 --group 2 --head-dim 64 \
	--context 2000 --steps 9 --budget 64 --max-error 0.01
$py "$src/tools/decode_loop.py" --layers 2 --kv-heads 2 --group 2 --head-dim 64 \
	--context 4000 --steps 9 --budget 16 --max-error 0.2
# a batch of 3 on the fast path (append_batch_async, select_async, attend_async): every
# page covered and waited for (host gap < 0), then not (with the estimate of the pages
# left out)
$py "$src/tools/decode_loop.py" --layers 2 --kv-heads 2 --group 2 --head-dim 64 \
	--context 2000 --steps 9 --budget 64 --batch 3 --fast --host-gap -1 --max-error 0.01
$py "$src/tools/decode_loop.py" --layers 2 --kv-heads 2 --group 2 --head-dim 64 \
	--context 4000 --steps 9 --budget 16 --batch 3 --fast --estimate --max-error 0.2
# a named sequence from Python: made, filled, synced, closed, found again with its tokens
$py - "$src/ipc/python" <<'PY'
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import kvtier
c = kvtier.Client(2, 2, 2, 64, dtype="f16", page_tokens=16, dense_layers=0)
s, n = c.seq_open("py/doc", create=True)
assert n == 0, n
rng = np.random.default_rng(1)
k = rng.standard_normal((50, 2, 64)).astype(np.float16)
v = rng.standard_normal((50, 2, 64)).astype(np.float16)
q = rng.standard_normal((4, 64)).astype(np.float16)
for layer in range(2):
    c.append(s, layer, k[:48], v[:48])
# every page selected: the output before and after the reopen must be the same
before = [c.attend(c.select([s], layer, q, budget_pages=8, sink_tokens=0, window_tokens=0),
                   q).astype(np.float32) for layer in range(2)]
for layer in range(2):
    c.append(s, layer, k[48:], v[48:])
assert c.seq_sync(s) == 48
c.seq_close(s)
s, n = c.seq_open("py/doc")
assert n == 48 and c.seq_tokens(s, 1) == 48, n
for layer in range(2):
    after = c.attend(c.select([s], layer, q, budget_pages=8, sink_tokens=0, window_tokens=0),
                     q).astype(np.float32)
    assert np.array_equal(before[layer], after), np.abs(before[layer] - after).max()
c.seq_close(s)
c.seq_remove("py/doc")
try:
    c.seq_open("py/doc")
    raise SystemExit("removed name still opens")
except OSError as e:
    assert e.errno == 2, e
c.close()
print("named sequences from python: ok")
PY
# torch CUDA tensors end to end (device appends, queries and outputs): on a GPU only
rc=0
$py "$src/tests/ipc/test_torch.py" || rc=$?
[ $rc -eq 0 ] || [ $rc -eq 77 ] || exit $rc
# copies into the GPU pool ordered by the copy fence (a CUDA IPC event): a daemon of
# its own whose copies start 20 ms late, so that a read not ordered after them is wrong
if [ "${KVT_TEST_DEVICE:-cpu}" = cuda ]; then
	mkdir -p "$dir/copies"
	KVT_CUDA_COPY_DELAY_US=20000 "$build/kvtierd" -o ipc.socket="$run/copies.sock" \
		-o store.state_dir="$dir/copies" -o store.device=cuda -o tenant.gpu_bytes=16M \
		-o tenant.host_bytes=48M -o store.nvme_bytes=256M -o metrics.listen=off &
	pid2=$!
	for _ in $(seq 100); do [ -S "$run/copies.sock" ] && break; sleep 0.05; done
	rc=0
	KVTIER_SOCKET=$run/copies.sock KVT_CUDA_COPY_DELAY_US=20000 \
		$py "$src/tests/ipc/test_copy_order.py" "$build" || rc=$?
	kill -TERM $pid2
	wait $pid2
	[ $rc -eq 0 ] || [ $rc -eq 77 ] || exit $rc
fi
kill -TERM $pid
wait $pid
