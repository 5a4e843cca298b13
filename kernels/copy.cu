// SPDX-License-Identifier: MIT
#include "copy.h"
#include "tiers/device.h"

#include <cerrno>
#include <cuda_runtime.h>

namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

/*
 * One block per page (grid-strided). 16-byte accesses when the page allows it, with
 * kUnroll loads in flight per thread before the first store: reads of mapped host
 * memory cross PCIe, and only many outstanding requests fill the link.
 */
__global__ void __launch_bounds__(kThreads) copy_pages(const kvt_copy *descs, unsigned n)
{
	for (unsigned i = blockIdx.x; i < n; i += gridDim.x) {
		kvt_copy c = descs[i];
		const char *src = static_cast<const char *>(c.src);
		char *dst = static_cast<char *>(c.dst);
		uint64_t len = c.len;
		bool vec = ((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst)) &
			    15) == 0;
		uint64_t head = 0;
		if (vec) {
			const uint4 *s4 = reinterpret_cast<const uint4 *>(src);
			uint4 *d4 = reinterpret_cast<uint4 *>(dst);
			uint64_t n4 = len / 16;
			uint64_t step = (uint64_t)kThreads * kUnroll;
			uint64_t j = threadIdx.x;
			for (; j + (kUnroll - 1) * kThreads < n4; j += step) {
				uint4 v[kUnroll];
#pragma unroll
				for (int u = 0; u < kUnroll; u++)
					v[u] = __ldcs(s4 + j + u * kThreads);
#pragma unroll
				for (int u = 0; u < kUnroll; u++)
					__stcs(d4 + j + u * kThreads, v[u]);
			}
			for (; j < n4; j += kThreads)
				d4[j] = s4[j];
			head = n4 * 16;
		}
		for (uint64_t j = head + threadIdx.x; j < len; j += kThreads)
			dst[j] = src[j];
	}
}

__global__ void spin(uint64_t ns)
{
	uint64_t t0, t;
	asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
	do {
		__nanosleep(1000);
		asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
	} while (t - t0 < ns);
}

} // namespace

extern "C" int kvt_cuda_delay(uint64_t ns, void *stream)
{
	spin<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(ns);
	return cudaGetLastError() == cudaSuccess ? 0 : -EIO;
}

extern "C" int kvt_cuda_copy_pages(const struct kvt_copy *descs, unsigned n, void *stream)
{
	if (!n)
		return 0;
	unsigned grid = n < 65535 ? n : 65535;
	copy_pages<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(descs, n);
	cudaError_t e = cudaGetLastError();
	if (e == cudaSuccess)
		return 0;
	return e == cudaErrorMemoryAllocation ? -ENOMEM : -EIO;
}
