#!/usr/bin/env bash
# libFuzzer over the daemon's control-socket and ring decoders and the config parsers
# (tests/fuzz), with ASan and UBSan: each target SECONDS (default 60) from the corpus in
# tests/fuzz/corpus. Prints per target the runs, coverage and what it found; a crash,
# leak or sanitizer report fails the run (its input is kept under build-fuzz/findings).
set -uo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
bash tools/setup-deps.sh >/dev/null
if ! command -v clang >/dev/null; then
	sudo=""
	[ "$(id -u)" -eq 0 ] || sudo="sudo"
	$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq clang >/dev/null
fi
dir=build-fuzz
if [ ! -f $dir/build.ninja ]; then
	CC=clang meson setup $dir -Dfuzz=true -Dcuda=disabled -Djemalloc=disabled \
		-Db_sanitize=address,undefined -Db_lundef=false >/dev/null || exit 1
fi
ninja -C $dir tests/fuzz/fuzz_wire tests/fuzz/fuzz_ring tests/fuzz/fuzz_config >/dev/null || exit 1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
rc=0
mkdir -p $dir/findings
for t in wire ring config; do
	work=$dir/corpus-$t
	mkdir -p "$work"
	log=$dir/fuzz-$t.log
	$dir/tests/fuzz/fuzz_$t -max_total_time="$secs" -print_final_stats=1 -timeout=20 \
		-artifact_prefix=$dir/findings/$t- "$work" tests/fuzz/corpus/$t >"$log" 2>&1
	r=$?
	runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
	cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1)
	if [ $r -eq 0 ]; then
		echo "fuzz: $t: ${runs:-0} runs in ${secs} s, ${cov:-cov: ?} edges, nothing found"
	else
		rc=1
		echo "fuzz: $t: FOUND after ${runs:-?} runs (exit $r):"
		grep -E "ERROR|runtime error|SUMMARY|^fuzz:" "$log" | head -5
		ls $dir/findings/$t-* 2>/dev/null
	fi
done
exit $rc
