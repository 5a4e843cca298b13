// SPDX-License-Identifier: MIT
/*
 * Top-k / top-p page selection: one 1024-thread block per row, radix select over
 * orderable 32-bit keys (four 8-bit digits, most significant first), the row's keys
 * kept in shared memory when they fit. Sink and window pages get the largest key so
 * they are always in. Top-p first finds, with the same digit walk over per-bin
 * estimated softmax mass, the largest key whose upper set reaches the target mass,
 * which fixes k. The selected pages are then written in ascending page order with
 * two block scans (ties at the k-th key go to the lower page index).
 */
#include <errno.h>
#include <math.h>

#include "kernels/compute_impl.h"
#include "kernels/cuda_common.cuh"
#include "kernels/resolve.cuh"

#define SEL_THREADS 1024
#define SEL_WARPS (SEL_THREADS / 32)
#define SEL_CACHE_MAX 32768u /* keys kept in shared memory (128 KiB) */

struct sel_shared {
	unsigned hist[256];
	union {
		float mass[SEL_WARPS][256];     /* per-warp histograms: no cross-warp contention */
		unsigned count[SEL_WARPS][256];
	};
	unsigned scan[SEL_WARPS];
	float red[SEL_WARPS];
	unsigned digit, above, remaining, found;
	float fabove;
};

__device__ __forceinline__ uint32_t dev_key(float f)
{
	uint32_t u = __float_as_uint(f);
	if (f != f)
		return 0;
	return (u & 0x80000000u) ? ~u : u | 0x80000000u;
}

struct row_view {
	const float *sc;
	uint32_t n, sinks, win0;
	const uint32_t *cache; /* NULL: computed from sc */
	__device__ __forceinline__ uint32_t key(uint32_t p) const
	{
		if (cache)
			return cache[p];
		return (p < sinks || p >= win0) ? KVT_KEY_FORCED : dev_key(sc[p]);
	}
};

/* Exclusive block scan of one value per thread; returns the total through *total. */
__device__ unsigned block_scan(unsigned v, unsigned *total, sel_shared &sh)
{
	const unsigned lane = threadIdx.x & 31, w = threadIdx.x >> 5;
	unsigned x = v;
#pragma unroll
	for (int o = 1; o < 32; o <<= 1) {
		unsigned y = __shfl_up_sync(0xffffffffu, x, o);
		if (lane >= o)
			x += y;
	}
	if (lane == 31)
		sh.scan[w] = x;
	__syncthreads();
	if (w == 0) {
		unsigned s = sh.scan[lane], t = s;
#pragma unroll
		for (int o = 1; o < 32; o <<= 1) {
			unsigned y = __shfl_up_sync(0xffffffffu, t, o);
			if (lane >= o)
				t += y;
		}
		sh.scan[lane] = t - s;
		if (lane == 31)
			sh.red[0] = __uint_as_float(t);
	}
	__syncthreads();
	unsigned r = sh.scan[w] + x - v;
	*total = __float_as_uint(sh.red[0]);
	__syncthreads();
	return r;
}

__device__ float block_reduce(float v, bool is_max, sel_shared &sh)
{
	const unsigned lane = threadIdx.x & 31, w = threadIdx.x >> 5;
#pragma unroll
	for (int o = 16; o; o >>= 1) {
		float y = __shfl_xor_sync(0xffffffffu, v, o);
		v = is_max ? fmaxf(v, y) : v + y;
	}
	if (lane == 0)
		sh.red[w] = v;
	__syncthreads();
	v = sh.red[lane];
#pragma unroll
	for (int o = 16; o; o >>= 1) {
		float y = __shfl_xor_sync(0xffffffffu, v, o);
		v = is_max ? fmaxf(v, y) : v + y;
	}
	__syncthreads();
	return v;
}

/*
 * Warp 0 finds the digit whose bin holds the target: walking bins from 255 down,
 * the first where above + (sum of bins >= d) reaches need. Counts in sh.hist.
 */
__device__ void find_digit_count(unsigned need, sel_shared &sh)
{
	if (threadIdx.x < 32) {
		const unsigned lane = threadIdx.x;
		/* lane l owns bins 255-8l .. 248-8l (descending) */
		unsigned own = 0;
		for (int b = 0; b < 8; b++)
			own += sh.hist[255 - lane * 8 - b];
		unsigned incl = own;
#pragma unroll
		for (int o = 1; o < 32; o <<= 1) {
			unsigned y = __shfl_up_sync(0xffffffffu, incl, o);
			if (lane >= o)
				incl += y;
		}
		unsigned excl = incl - own;
		bool mine = excl < need && incl >= need;
		unsigned ball = __ballot_sync(0xffffffffu, mine);
		if (mine) {
			unsigned acc = excl;
			for (int b = 0; b < 8; b++) {
				unsigned d = 255 - lane * 8 - b, c = sh.hist[d];
				if (acc + c >= need) {
					sh.digit = d;
					sh.above = acc;
					break;
				}
				acc += c;
			}
		}
		if (lane == 0 && !ball)
			sh.digit = 0x100; /* not reached */
	}
	__syncthreads();
}

/* The same over float mass per bin (summed from the per-warp histograms into mass[0]). */
__device__ void find_digit_mass(float need, sel_shared &sh)
{
	if (threadIdx.x < 32) {
		const unsigned lane = threadIdx.x;
		float own = 0;
		unsigned cown = 0;
		for (int b = 0; b < 8; b++) {
			own += sh.mass[0][255 - lane * 8 - b];
			cown += sh.hist[255 - lane * 8 - b];
		}
		float incl = own;
		unsigned cincl = cown;
#pragma unroll
		for (int o = 1; o < 32; o <<= 1) {
			float y = __shfl_up_sync(0xffffffffu, incl, o);
			unsigned cy = __shfl_up_sync(0xffffffffu, cincl, o);
			if (lane >= o)
				incl += y, cincl += cy;
		}
		float excl = incl - own;
		unsigned cexcl = cincl - cown;
		bool mine = !(excl >= need) && incl >= need;
		/* several lanes may claim it through rounding: the first (highest bins) wins */
		unsigned ball = __ballot_sync(0xffffffffu, mine);
		if (ball && lane == (unsigned)(__ffs(ball) - 1)) {
			float acc = excl;
			unsigned cacc = cexcl;
			unsigned d = 255 - lane * 8 - 7;
			for (int b = 0; b < 8; b++) {
				unsigned dd = 255 - lane * 8 - b;
				if (acc + sh.mass[0][dd] >= need || b == 7) {
					d = dd;
					break;
				}
				acc += sh.mass[0][dd];
				cacc += sh.hist[dd];
			}
			sh.digit = d;
			sh.fabove = acc;
			sh.above = cacc;
		}
		if (lane == 0 && !ball)
			sh.digit = 0x100;
	}
	__syncthreads();
}

/* Row blockIdx.x's selection, by the whole block. */
__device__ __forceinline__ void select_row(const kvt_select_args &a, bool cached, uint32_t *cache,
					   sel_shared &sh)
{
	const uint32_t r = blockIdx.x, tid = threadIdx.x;
	uint32_t n = a.n_pages[r];
	n = n < a.stride ? n : a.stride;
	const uint32_t tail = a.tail_len ? a.tail_len[r] : 0;
	int32_t *out = a.out + (size_t)r * a.out_stride;
	const int32_t *map = a.slot_map ? a.slot_map + (size_t)r * a.stride : NULL;
	uint32_t sinks, win0;
	kvt_forced_pages(n, tail, a.page_tokens, a.sink_tokens, a.window_tokens, &sinks, &win0);
	const uint32_t forced = sinks + (n - (win0 > sinks ? win0 : sinks));
	const uint32_t nr = n - forced;

	if (a.mode == KVT_SELECT_TOPK && n <= a.budget_pages) {
		for (uint32_t p = tid; p < n; p += SEL_THREADS)
			out[p] = map ? map[p] : (int32_t)p;
		if (tid == 0)
			a.n_out[r] = n;
		return;
	}
	row_view v = {a.scores + (size_t)r * a.stride, n, sinks, win0, NULL};
	if (cached) {
		for (uint32_t p = tid; p < n; p += SEL_THREADS)
			cache[p] = v.key(p);
		__syncthreads();
		v.cache = cache;
	}
	const uint32_t cap = a.budget_pages > forced ? a.budget_pages - forced : 0;
	uint32_t take;
	if (a.mode == KVT_SELECT_TOPK) {
		take = cap < nr ? cap : nr;
	} else {
		float m = -INFINITY;
		for (uint32_t p = tid; p < n; p += SEL_THREADS) {
			float s = v.sc[p];
			if (s == s)
				m = fmaxf(m, a.logit_scale * s);
		}
		m = block_reduce(m, true, sh);
		if (!isfinite(m)) {
			take = cap < nr ? cap : nr;
		} else {
			float z = 0;
			for (uint32_t p = tid; p < n; p += SEL_THREADS) {
				float s = v.sc[p];
				z += s == s ? __expf(a.logit_scale * s - m) : 0.0f;
			}
			z = block_reduce(z, false, sh);
			const float need = a.top_p * z * (1.0f - 1e-6f); /* rounding slack */
			uint32_t prefix = 0, mask = 0;
			float fabove = 0;
			unsigned above = 0, reached = 1;
			for (int shift = 24; shift >= 0 && need > 0; shift -= 8) {
				for (uint32_t i = tid; i < 256 * SEL_WARPS; i += SEL_THREADS)
					(&sh.mass[0][0])[i] = 0;
				if (tid < 256)
					sh.hist[tid] = 0;
				__syncthreads();
				for (uint32_t p = tid; p < n; p += SEL_THREADS) {
					uint32_t k = v.key(p);
					if ((k & mask) != prefix)
						continue;
					unsigned d = (k >> shift) & 255;
					float s = v.sc[p];
					atomicAdd(&sh.mass[tid >> 5][d],
						  s == s ? __expf(a.logit_scale * s - m) : 0.0f);
					atomicAdd(&sh.hist[d], 1u);
				}
				__syncthreads();
				if (tid < 256) {
					float t = 0;
					for (int w = 0; w < SEL_WARPS; w++)
						t += sh.mass[w][tid];
					sh.mass[0][tid] = t;
				}
				__syncthreads();
				find_digit_mass(need - fabove, sh);
				if (sh.digit == 0x100) {
					reached = 0;
					break;
				}
				unsigned d = sh.digit;
				fabove += sh.fabove;
				above += sh.above;
				prefix |= d << shift;
				mask |= 255u << shift;
				if (shift == 0)
					above += sh.hist[d];
				__syncthreads();
			}
			/* above: pages with key >= the threshold, forced ones included */
			uint32_t k = !(need > 0) ? 0 : reached ? above : n;
			take = k > forced ? k - forced : 0;
			if (take > nr)
				take = nr;
			if (take > cap)
				take = cap;
		}
	}
	const uint32_t K = forced + take;
	/* radix select of the K-th largest key */
	uint32_t prefix = 0, mask = 0, remaining = K;
	if (K) {
		for (int shift = 24; shift >= 0; shift -= 8) {
			for (uint32_t i = tid; i < 256 * SEL_WARPS; i += SEL_THREADS)
				(&sh.count[0][0])[i] = 0;
			__syncthreads();
			for (uint32_t p = tid; p < n; p += SEL_THREADS) {
				uint32_t k = v.key(p);
				if ((k & mask) == prefix)
					atomicAdd(&sh.count[tid >> 5][(k >> shift) & 255], 1u);
			}
			__syncthreads();
			if (tid < 256) {
				unsigned t = 0;
				for (int w = 0; w < SEL_WARPS; w++)
					t += sh.count[w][tid];
				sh.hist[tid] = t;
			}
			__syncthreads();
			find_digit_count(remaining, sh);
			unsigned d = sh.digit;
			remaining -= sh.above;
			prefix |= d << shift;
			mask |= 255u << shift;
			__syncthreads();
		}
	}
	/* pages with key > kth, and the first `remaining` with key == kth, in page order */
	const uint32_t kth = prefix;
	const uint32_t chunk = (n + SEL_THREADS - 1) / SEL_THREADS;
	const uint32_t p0 = tid * chunk < n ? tid * chunk : n, p1 = p0 + chunk < n ? p0 + chunk : n;
	unsigned eq = 0, total;
	if (K)
		for (uint32_t p = p0; p < p1; p++)
			eq += v.key(p) == kth;
	unsigned eq_before = block_scan(eq, &total, sh);
	unsigned sel = 0;
	if (K) {
		unsigned e = eq_before;
		for (uint32_t p = p0; p < p1; p++) {
			uint32_t k = v.key(p);
			sel += k > kth || (k == kth && e++ < remaining);
		}
	}
	unsigned pos = block_scan(sel, &total, sh);
	if (K) {
		unsigned e = eq_before;
		for (uint32_t p = p0; p < p1; p++) {
			uint32_t k = v.key(p);
			if (k > kth || (k == kth && e++ < remaining))
				out[pos++] = map ? map[p] : (int32_t)p;
		}
	}
	if (tid == 0)
		a.n_out[r] = K ? total : 0;
}

/*
 * A block per row. With RESOLVE (kvt_select_resolve), the block's first warp then makes
 * the row's table from what the block selected, as resolve_kernel's warps do, and the
 * blocks complete the call together (resolve_complete): one launch instead of two.
 */
template <bool RESOLVE>
__global__ void __launch_bounds__(SEL_THREADS) select_kernel(kvt_select_args a, bool cached,
							     kvt_resolve_args ra)
{
	extern __shared__ uint32_t cache[];
	__shared__ sel_shared sh;
	select_row(a, cached, cache, sh);
	if (!RESOLVE)
		return;
	__shared__ uint32_t missing;
	__shared__ bool last;
	__syncthreads(); /* the row's selection, written by the whole block, is visible */
	if (threadIdx.x < 32) {
		const int32_t nw = resolve_row(ra, blockIdx.x, threadIdx.x, false);
		if (threadIdx.x == 0)
			missing = (uint32_t)nw;
	}
	resolve_complete(ra, &missing, &last);
}

template <bool RESOLVE>
static int select_launch(const kvt_select_args *a, const kvt_resolve_args *ra, cudaStream_t s)
{
	static bool attr_set;
	if (!attr_set) {
		cudaError_t e = cudaFuncSetAttribute(select_kernel<RESOLVE>,
						     cudaFuncAttributeMaxDynamicSharedMemorySize,
						     SEL_CACHE_MAX * sizeof(uint32_t));
		if (e != cudaSuccess)
			return kvt_cuda_errno(e, "select smem");
		attr_set = true;
	}
	bool cached = a->stride <= SEL_CACHE_MAX;
	size_t smem = cached ? a->stride * sizeof(uint32_t) : 0;
	select_kernel<RESOLVE><<<a->rows, SEL_THREADS, smem, s>>>(*a, cached, ra ? *ra : kvt_resolve_args{});
	return kvt_cuda_errno(cudaGetLastError(), "select");
}

int kvt_cuda_select(const kvt_select_args *a, cudaStream_t s)
{
	return select_launch<false>(a, NULL, s);
}

/* One launch when the blocks can count themselves (ra->sync) or there is one row. */
int kvt_cuda_select_resolve(const kvt_select_args *a, const kvt_resolve_args *ra, cudaStream_t s)
{
	if (!ra->sync && a->rows > 1) {
		int ret = select_launch<false>(a, NULL, s);
		return ret < 0 ? ret : kvt_cuda_resolve(ra, s);
	}
	return select_launch<true>(a, ra, s);
}
