#!/usr/bin/env bash
# The reliability suite at full length (tests/RELIABILITY.md): 1000 client kills, 1000
# clients churned, 100 daemon crash-restart cycles, 6000 pages corrupted ..., then the
# fuzzers for FUZZ_SECONDS each (default 600). Writes every "rel:" and "fuzz:" line to
# build-rel/reliability.txt. KVT_REL_SEED=N reruns a case's random choices.
set -uo pipefail
cd "$(dirname "$0")/.."
bash tools/setup-deps.sh >/dev/null
[ -x /usr/local/cuda/bin/nvcc ] && export PATH=/usr/local/cuda/bin:$PATH
dir=build-rel
if [ -f $dir/build.ninja ]; then
	meson configure $dir -Dreliability_long=true >/dev/null
else
	meson setup $dir -Dreliability_long=true >/dev/null || exit 1
fi
ninja -C $dir >/dev/null || exit 1
rc=0
meson test -C $dir --suite reliability --print-errorlogs --num-processes 1 || rc=1
out=$dir/reliability.txt
grep -h '^rel:' $dir/meson-logs/testlog.txt > $out
bash tools/fuzz.sh "${FUZZ_SECONDS:-600}" | tee -a $out || rc=1
echo "results: $out"
exit $rc
