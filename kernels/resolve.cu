// SPDX-License-Identifier: MIT
/*
 * The small kernels of a client that picks its own pages (ipc/client.c, the fast
 * path): a table from a selection and the map of where pages are (resolve), the new
 * tokens into the pages still filling (put_rows), and the daemon's writes of that
 * map (scatter).
 */
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
__device__ int32_t resolve_row(const kvt_resolve_args &a, uint32_t r, uint32_t lane, bool again)
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
 * A warp per row; several blocks when the caller gave the scratch words (a.sync), else
 * one. The report is in mapped host memory: every block's stores are made visible to the
 * system before it takes its ticket, and the block that takes the last one writes the
 * header and the ready token, the last store. A wait is one thread of that block polling
 * the ack word (mapped host memory too) while the others hold at the barrier; then that
 * block makes every row's table again (rare: a slow path is fine).
 */
__global__ void __launch_bounds__(256) resolve_kernel(kvt_resolve_args a)
{
	const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
	__shared__ uint32_t missing;
	__shared__ bool last;
	if (threadIdx.x == 0)
		missing = 0;
	__syncthreads();
	for (uint32_t r = blockIdx.x * warps + warp; r < a.rows; r += gridDim.x * warps) {
		const int32_t nw = resolve_row(a, r, lane, false);
		if (lane == 0 && nw)
			atomicAdd(&missing, (uint32_t)nw);
	}
	if (gridDim.x > 1) {
		__threadfence_system();
		__syncthreads();
		if (threadIdx.x == 0) {
			if (missing)
				atomicAdd(&a.sync[1], missing);
			__threadfence();
			last = atomicAdd(&a.sync[0], 1u) == gridDim.x - 1;
			if (last) { /* every other block has added its count: left zero for the next */
				missing = atomicExch(&a.sync[1], 0u);
				a.sync[0] = 0;
			}
		}
		__syncthreads();
		if (!last)
			return;
	}
	if (!a.report)
		return;
	if (threadIdx.x == 0)
		((volatile uint32_t *)a.ready)[1] = missing;
	__threadfence_system();
	__syncthreads();
	if (threadIdx.x == 0)
		*(volatile uint32_t *)a.ready = a.token;
	if (!a.ack || !missing)
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

int kvt_cuda_resolve(const kvt_resolve_args *a, cudaStream_t s)
{
	const uint32_t blocks = a->sync ? (a->rows + 7) / 8 : 1;
	resolve_kernel<<<blocks, 256, 0, s>>>(*a);
	return kvt_cuda_errno(cudaGetLastError(), "resolve");
}

/* 16-byte pieces: a block per (token, head), a thread per piece of K and of V. */
__global__ void put_rows_kernel(kvt_put_rows_args a, uint32_t pieces)
{
	const uint32_t t = blockIdx.x / a.heads, h = blockIdx.x % a.heads;
	const size_t row = (size_t)pieces * 16, T = a.g.page_tokens;
	const size_t src = ((size_t)t * a.heads + h) * row;
	uint8_t *page = static_cast<uint8_t *>(a.pool) + (a.slot0 + h) * a.slot_bytes;
	const size_t pos = a.pos0 + t;
	for (uint32_t i = threadIdx.x; i < 2 * pieces; i += blockDim.x) {
		const bool v = i >= pieces;
		const uint32_t j = v ? i - pieces : i;
		const uint8_t *from = static_cast<const uint8_t *>(v ? a.v : a.k) + src + (size_t)j * 16;
		uint8_t *to = page + ((v ? T : 0) + pos) * row + (size_t)j * 16;
		*reinterpret_cast<uint4 *>(to) = *reinterpret_cast<const uint4 *>(from);
	}
}

int kvt_cuda_put_rows(const kvt_put_rows_args *a, cudaStream_t s)
{
	const size_t row = (size_t)a->g.head_dim * kvt_dtype_size(a->g.dtype);
	const uint32_t pieces = (uint32_t)(row / 16);
	if (row % 16 || ((uintptr_t)a->k | (uintptr_t)a->v | (uintptr_t)a->pool | a->slot_bytes) % 16)
		return -EINVAL;
	put_rows_kernel<<<a->ntok * a->heads, pieces * 2 < 256 ? pieces * 2 : 256, 0, s>>>(*a, pieces);
	return kvt_cuda_errno(cudaGetLastError(), "put_rows");
}

__global__ void scatter_kernel(int32_t *dst, const int32_t *pairs, uint32_t n)
{
	for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
		dst[pairs[2 * i]] = pairs[2 * i + 1];
}

int kvt_cuda_scatter(int32_t *dst, const int32_t *pairs_dev, uint32_t n, cudaStream_t s)
{
	uint32_t blocks = (n + 255) / 256;
	scatter_kernel<<<blocks < 128 ? blocks : 128, 256, 0, s>>>(dst, pairs_dev, n);
	return kvt_cuda_errno(cudaGetLastError(), "scatter");
}
