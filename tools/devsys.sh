#!/usr/bin/env bash
# Prepares .devsys for the GPU machine (which has CUDA, gcc, meson and ninja but not
# our libraries and no package registry): the shared sysroot script's packages plus
# libxxhash, libinih (the daemon's config) and jansson (kvtierctl); with --perf, perf
# too (30 MB more). Run here, from the project root; carry .devsys; source
# .devsys/env.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ../shared/tools/device-sysroot.sh .devsys >/dev/null
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download libxxhash0 libxxhash-dev libinih1 libinih-dev libjansson4 libjansson-dev >/dev/null 2>&1) || {
	apt-get update -qq >/dev/null; (cd "$tmp" && apt-get download libxxhash0 libxxhash-dev libinih1 libinih-dev libjansson4 libjansson-dev >/dev/null); }
for d in "$tmp"/*.deb; do dpkg-deb -x "$d" .devsys; done
for pc in .devsys/usr/lib/x86_64-linux-gnu/pkgconfig/{libxxhash,inih,jansson}.pc; do
	sed -i -e 's|^prefix=.*|prefix=${pcfiledir}/../../..|' -e 's|=/usr/|=${prefix}/|' "$pc"
done
# perf (Debian's linux-perf, with the libraries it needs but libc and libm): the GPU
# machine has no profiler. There: LD_LIBRARY_PATH=$PWD/.devsys/perf .devsys/perf/perf
if [ "${1:-}" = --perf ] && command -v perf >/dev/null; then
	mkdir -p .devsys/perf
	cp -L "$(command -v perf)" .devsys/perf/
	for l in $(ldd "$(command -v perf)" | awk '/=>/ {print $3}'); do
		case $l in */libc.so.6 | */libm.so.6) ;; *) cp -L "$l" .devsys/perf/ ;; esac
	done
fi
du -sh .devsys
