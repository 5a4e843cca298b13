#!/usr/bin/env bash
# Installs what kvtier builds and runs with, from Debian/Ubuntu packages, where missing.
# The CUDA Toolkit is optional: found at /usr/local/cuda (or nvcc on PATH), it is used.
set -euo pipefail
pkgs=(meson ninja-build pkg-config gcc g++ liburing-dev libjemalloc-dev libnuma-dev
      libcmocka-dev libxxhash-dev libinih-dev libmicrohttpd-dev libjansson-dev gnuplot-nox
      fio python3 python3-numpy)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	sudo=""
	[ "$(id -u)" -eq 0 ] || sudo="sudo"
	echo "installing: ${missing[*]}"
	$sudo apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# promtool checks the metrics text in the tests where it can be had (Debian's prometheus)
if ! command -v promtool >/dev/null && [ "${KVT_NO_PROMTOOL:-}" != 1 ]; then
	sudo=""
	[ "$(id -u)" -eq 0 ] || sudo="sudo"
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
		prometheus >/dev/null 2>&1 || echo "promtool not available: its check is skipped"
fi
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
	echo 'export PATH=/usr/local/cuda/bin:$PATH  # to build the CUDA device'
fi
