// SPDX-License-Identifier: MIT
/*
 * A table from a selection and the map of where pages are: the device code of
 * kvt_resolve (resolve.cu) and of kvt_select_resolve's fused launch (select.cu).
 */
#ifndef KVT_KERNELS_RESOLVE_CUH
#define KVT_KERNELS_RESOLVE_CUH

#include "kernels/compute_impl.h"
#include "kernels/cuda_common.cuh"

/* The map as the keeper wrote it since (at L2: this block may hold older lines in L1). */
__device__ __forceinline__ int32_t map_at(const int32_t *map, size_t i, bool again)
{
	return again ? __ldcg(map + i) : map[i];
}

__device__ __forceinline__ uint32_t ld_acquire_sys(const uint32_t *p)
{
	uint32_t v;
	asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
	return v;
}

__device__ __forceinline__ uint64_t globaltimer(void)
{
	uint64_t t;
	asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
	return t;
}

/*
 * Row r's table, by one warp: the row's best score among pages not forced (a warp's
 * max), then the hits packed in page order with a ballot per 32 entries. The first
 * time (not again) it writes the row's report too. Returns the pages that matter and
 * are missing.
 */
__device__ __forceinline__ int32_t resolve_row(const kvt_resolve_args &a, uint32_t r, uint32_t lane, bool again)
{
	const size_t rows = a.rows;
	int32_t n = a.n_sel[r];
	n = n < 0 ? 0 : n > (int32_t)a.stride ? (int32_t)a.stride : n;
	const int32_t *sel = a.sel + (size_t)r * a.stride;
	const size_t base = (size_t)a.row_base[r];
	const float *sc = a.scores ? a.scores + (size_t)r * a.score_stride : NULL;
	const int32_t win = sc ? a.n_full[r] - (int32_t)a.window_pages : 0;
	int32_t *report = again ? NULL : a.report;
	float floor = -INFINITY;
	if (sc) {
		float best = -INFINITY;
		for (int32_t i = (int32_t)lane; i < n; i += 32) {
			const int32_t p = sel[i];
			if (p >= (int32_t)a.sink_pages && p < win)
				best = fmaxf(best, sc[p]);
		}
		best = kvt_group_max<32>(best);
		floor = best - a.host_gap;
	}
	int32_t k = 0, nh = 0, nw = 0;
	for (int32_t i0 = 0; i0 < n; i0 += 32) {
		const int32_t i = i0 + (int32_t)lane;
		int32_t p = 0, slot = -1;
		bool matters = false;
		if (i < n) {
			p = sel[i];
			slot = map_at(a.map, base + (size_t)p, again);
			matters = !sc || p < (int32_t)a.sink_pages || p >= win || sc[p] >= floor;
			if (slot >= 0 && (slot & KVT_SLOT_HOST) && !matters)
				slot = -1; /* not worth the bus this step */
			if (report)
				report[3 * rows + (size_t)r * a.stride + i] =
					p | (matters ? KVT_PAGE_MATTERS : 0) |
					(matters && slot < 0 && a.ack ? KVT_PAGE_WAIT : 0);
		}
		const unsigned hit = __ballot_sync(0xffffffffu, slot >= 0);
		if (slot >= 0) {
			const int32_t at = k + __popc(hit & ((1u << lane) - 1));
			a.table[(size_t)r * a.stride + at] = slot;
			if (a.pages)
				a.pages[(size_t)r * a.stride + at] = p;
		}
		k += __popc(hit);
		nh += __popc(__ballot_sync(0xffffffffu, slot >= 0 && (slot & KVT_SLOT_HOST)));
		nw += __popc(__ballot_sync(0xffffffffu, matters && slot < 0));
	}
	if (lane == 0) {
		a.n_table[r] = k;
		if (report) {
			report[r] = n;
			report[rows + r] = k;
			report[2 * rows + r] = nh;
		}
	}
	return nw;
}

/*
 * After every block of a call has made its rows' tables (*missing: this block's pages
 * that matter and are missing): a warp per row; several blocks when the caller gave the
 * scratch words (a.sync), else one. The report is in mapped host memory: every block's
 * stores are made visible to the system before it takes its ticket, and the block that
 * takes the last one writes the header and the ready token, the last store. A wait is
 * one thread of that block polling the ack word (mapped host memory too) while the
 * others hold at the barrier; then that block makes every row's table again (rare: a
 * slow path is fine). Every thread of the block calls it.
 */
__device__ __forceinline__ void resolve_complete(const kvt_resolve_args &a, uint32_t *missing, bool *last)
{
	const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
	__syncthreads(); /* every warp's count is in */
	if (gridDim.x > 1) {
		__threadfence_system();
		__syncthreads();
		if (threadIdx.x == 0) {
			if (*missing)
				atomicAdd(&a.sync[1], *missing);
			__threadfence();
			*last = atomicAdd(&a.sync[0], 1u) == gridDim.x - 1;
			if (*last) { /* every other block has added its count: left zero for the next */
				*missing = atomicExch(&a.sync[1], 0u);
				a.sync[0] = 0;
			}
		}
		__syncthreads();
		if (!*last)
			return;
	}
	if (!a.report)
		return;
	if (threadIdx.x == 0)
		((volatile uint32_t *)a.ready)[1] = *missing;
	__threadfence_system();
	__syncthreads();
	if (threadIdx.x == 0)
		*(volatile uint32_t *)a.ready = a.token;
	if (!a.ack || !*missing)
		return;
	if (threadIdx.x == 0) {
		const uint64_t t0 = globaltimer();
		while ((int32_t)(ld_acquire_sys(a.ack) - a.token) < 0 && globaltimer() - t0 < a.wait_ns)
			__nanosleep(2000);
	}
	__syncthreads();
	for (uint32_t r = warp; r < a.rows; r += warps)
		resolve_row(a, r, lane, true);
}

#endif
