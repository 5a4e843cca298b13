// SPDX-License-Identifier: MIT
/*
 * The estimate of the attention over the pages a table leaves out (kvt_estimate): a
 * block per (chunk, row, chunk of GM query heads), a chunk being every chunks-th span of
 * KVT_EST_PPB pages (at most KVT_EST_MAX_CHUNKS chunks a row). D/8 lanes per
 * page, 16-byte loads of the page's mean key and mean value, all of a lane group's
 * pages loaded before any is used; an online softmax per lane group, merged over the
 * warp by shuffles and over the block in shared memory. Each block writes its partial
 * to the work area; the last block of a (row, head chunk) to finish (a counter in
 * sync) merges them into est, every chunk's loads in flight together.
 */
#include <errno.h>
#include <math.h>

#include "kernels/compute_impl.h"
#include "kernels/cuda_common.cuh"

#define EST_THREADS 128
#define EST_WARPS (EST_THREADS / 32)

/* One online-softmax state (log2 units) of GM heads over 8 dims. */
template <int GM> struct est_state {
	float m[GM], l[GM], acc[GM][8];
	__device__ __forceinline__ void init()
	{
		kvt_softmax_init<GM>(m, l, acc);
	}
	/* adds another state's head g: (om, ol, oacc) */
	__device__ __forceinline__ void merge(int g, float om, float ol, const float (&oacc)[8])
	{
		const float mm = fmaxf(m[g], om);
		if (mm == -INFINITY)
			return;
		const float a = exp2f(m[g] - mm), b = exp2f(om - mm);
		l[g] = l[g] * a + ol * b;
#pragma unroll
		for (int j = 0; j < 8; j++)
			acc[g][j] = acc[g][j] * a + oacc[j] * b;
		m[g] = mm;
	}
};

template <typename T, int D, int GM>
__global__ void __launch_bounds__(EST_THREADS) estimate_kernel(kvt_estimate_args a, uint32_t chunks)
{
	constexpr int LPT = D / 8, NG = EST_THREADS / LPT, U = KVT_EST_PPB / NG;
	static_assert(KVT_EST_PPB % NG == 0, "pages split evenly over the lane groups");
	const uint32_t chunk = blockIdx.x, r = blockIdx.y;
	const int G = a.g.group, R = a.g.reps, g0 = blockIdx.z * GM;
	const int gn = G - g0 < GM ? G - g0 : GM;
	const uint32_t lane = threadIdx.x % LPT, grp = threadIdx.x / LPT;
	const int warp = threadIdx.x / 32, wl = threadIdx.x % 32;
	const uint32_t n = a.n_full[r];
	uint32_t ns = a.stride ? (uint32_t)a.n_sel[r] : 0;
	ns = ns < a.stride ? ns : a.stride;

	float qf[GM][8];
	kvt_load_q<T, D, GM>(static_cast<const T *>(a.q) + ((size_t)r * G + g0) * D + lane * 8,
			     gn, a.scale, qf);
	const size_t rec = (size_t)(4 + R) * D;
	const size_t base = a.row_base ? (size_t)a.row_base[r] : (size_t)r * a.sum_stride;
	const T *sums = static_cast<const T *>(a.summaries) + (2 + R) * D + lane * 8;
	const float tok = (float)a.g.page_tokens;
	est_state<GM> st;
	st.init();
	/* this block's spans of KVT_EST_PPB pages: chunk, chunk + chunks, ... */
	__shared__ uint32_t taken[KVT_EST_PPB / 32]; /* the span's pages the table has */
	for (uint32_t p0 = chunk * KVT_EST_PPB; p0 < n; p0 += chunks * KVT_EST_PPB) {
		/* the span's pages loaded first, taken or not: their loads are in flight while
		 * the bitmap is made */
		kvt_raw8<T> kr[U], vr[U];
		bool use[U];
#pragma unroll
		for (int u = 0; u < U; u++) {
			const uint32_t p = p0 + grp + u * NG;
			if (p < n) {
				const T *s = sums + (base + p) * rec;
				kr[u].load(s);
				vr[u].load(s + D);
			} else {
				kr[u].zero();
				vr[u].zero();
			}
		}
		__syncthreads(); /* the last span's bitmap is read */
		if (threadIdx.x < KVT_EST_PPB / 32)
			taken[threadIdx.x] = 0;
		__syncthreads();
		for (uint32_t i = threadIdx.x; i < ns; i += EST_THREADS) {
			const int64_t p = (int64_t)a.sel[(size_t)r * a.stride + i] - a.sel_base -
					  (int64_t)r * a.sel_row_stride - p0;
			if (p >= 0 && p < KVT_EST_PPB)
				atomicOr(&taken[p / 32], 1u << (p % 32));
		}
		__syncthreads();
#pragma unroll
		for (int u = 0; u < U; u++) {
			const uint32_t pp = grp + u * NG;
			use[u] = p0 + pp < n && !((taken[pp / 32] >> (pp % 32)) & 1);
		}
#pragma unroll
		for (int u = 0; u < U; u++) {
			float k[8], v[8];
			kr[u].to_float(k);
			vr[u].to_float(v);
			float z[GM];
			kvt_head_logits<LPT, GM>(qf, k, z); /* log2 units */
#pragma unroll
			for (int j = 0; j < 8; j++)
				v[j] *= tok; /* the page's T tokens of one value */
#pragma unroll
			for (int g = 0; g < GM; g++)
				if (use[u] && g < gn)
					st.merge(g, z[g], tok, v);
		}
	}
	/* the lane groups of a warp merged: lane i of group 0 ends with the warp's state */
#pragma unroll
	for (int o = LPT; o < 32; o <<= 1) {
#pragma unroll
		for (int g = 0; g < GM; g++) {
			float oacc[8];
			const float om = __shfl_xor_sync(0xffffffffu, st.m[g], o),
				    ol = __shfl_xor_sync(0xffffffffu, st.l[g], o);
#pragma unroll
			for (int j = 0; j < 8; j++)
				oacc[j] = __shfl_xor_sync(0xffffffffu, st.acc[g][j], o);
			st.merge(g, om, ol, oacc);
		}
	}
	/* the warps merged in shared memory, into this block's partial */
	__shared__ float sm_m[EST_WARPS][GM], sm_l[EST_WARPS][GM];
	__shared__ __align__(16) float sm_acc[EST_WARPS][GM][D];
	if (wl < LPT) {
#pragma unroll
		for (int g = 0; g < GM; g++) {
			if (wl == 0) {
				sm_m[warp][g] = st.m[g];
				sm_l[warp][g] = st.l[g];
			}
#pragma unroll
			for (int j = 0; j < 8; j++)
				sm_acc[warp][g][lane * 8 + j] = st.acc[g][j];
		}
	}
	__syncthreads();
	/* the block's partial, four dims a thread: [M][S][-][-][A 0 .. D-1] a head */
	constexpr int PS = D + 4;
	float *work = a.work + (((size_t)r * chunks + chunk) * G + g0) * PS;
	for (int o = threadIdx.x; o < gn * D / 4; o += EST_THREADS) {
		const int g = o / (D / 4), d = (o % (D / 4)) * 4;
		float M = -INFINITY, S = 0;
		float4 A = make_float4(0, 0, 0, 0);
#pragma unroll
		for (int w = 0; w < EST_WARPS; w++)
			M = fmaxf(M, sm_m[w][g]);
		if (M > -INFINITY) {
#pragma unroll
			for (int w = 0; w < EST_WARPS; w++) {
				const float x = exp2f(sm_m[w][g] - M);
				const float4 v = *reinterpret_cast<const float4 *>(&sm_acc[w][g][d]);
				S += sm_l[w][g] * x;
				A.x += v.x * x, A.y += v.y * x, A.z += v.z * x, A.w += v.w * x;
			}
		}
		float *part = work + (size_t)g * PS;
		*reinterpret_cast<float4 *>(part + 4 + d) = A;
		if (d == 0)
			*reinterpret_cast<float2 *>(part) = make_float2(M, S);
	}

	/* the last block of this row's head chunk merges every chunk's partial */
	__shared__ bool last;
	__threadfence();
	__syncthreads();
	if (threadIdx.x == 0) {
		uint32_t *ctr = a.sync + (size_t)r * G + g0;
		last = atomicAdd(ctr, 1u) == chunks - 1;
		if (last)
			*ctr = 0; /* ready for the next call */
	}
	__syncthreads();
	if (!last)
		return;
	__threadfence();
	/* every chunk's max and sum into shared memory at once, then weights, then the
	 * outputs: loads in flight together, not one chunk after another */
	__shared__ float sm_w[KVT_EST_MAX_CHUNKS][GM];
	__shared__ float sm_s[GM], sm_mx[GM];
	const size_t cs = (size_t)G * PS; /* from one chunk's partial to the next */
	const float *w0 = a.work + ((size_t)r * chunks * G + g0) * PS;
	for (uint32_t i = threadIdx.x; i < chunks * gn; i += EST_THREADS) {
		const uint32_t c = i / gn, g = i % gn;
		sm_w[c][g] = __ldcg(w0 + c * cs + (size_t)g * PS);
	}
	__syncthreads();
	for (int g = warp; g < gn; g += EST_WARPS) { /* warp: the max, weights, sum of head g */
		float M = -INFINITY, S = 0;
		for (uint32_t c = wl; c < chunks; c += 32)
			M = fmaxf(M, sm_w[c][g]);
		M = kvt_group_max<32>(M);
		for (uint32_t c = wl; c < chunks; c += 32) {
			const float x = M > -INFINITY ? exp2f(sm_w[c][g] - M) : 0.0f;
			S += x * __ldcg(w0 + c * cs + (size_t)g * PS + 1);
			sm_w[c][g] = x;
		}
		S = kvt_group_sum<32>(S);
		if (wl == 0) {
			sm_mx[g] = M;
			sm_s[g] = S;
		}
	}
	__syncthreads();
	/* four dims a thread, every chunk's loads issued before they are summed */
	for (int o = threadIdx.x; o < gn * D / 4; o += EST_THREADS) {
		const int g = o / (D / 4), d = (o % (D / 4)) * 4;
		const float4 *pg = reinterpret_cast<const float4 *>(w0 + (size_t)g * PS + 4 + d);
		float4 A = make_float4(0, 0, 0, 0);
#pragma unroll 16
		for (uint32_t c = 0; c < chunks; c++) {
			const float4 v = __ldcg(pg + c * (cs / 4));
			const float x = sm_w[c][g];
			A.x += v.x * x, A.y += v.y * x, A.z += v.z * x, A.w += v.w * x;
		}
		float *e = a.est + ((size_t)r * G + g0 + g) * (D + 2);
		e[2 + d] = A.x, e[3 + d] = A.y, e[4 + d] = A.z, e[5 + d] = A.w;
		if (d == 0) {
			e[0] = sm_mx[g] > -INFINITY ? sm_mx[g] * KVT_LN2 : -INFINITY;
			e[1] = sm_s[g];
		}
	}
}

/*
 * subtract: the table entries' terms out of an estimate over every page, in its own m.
 * A block per (row, chunk of GM heads); the lane groups take the entries in turn.
 */
template <typename T, int D, int GM>
__global__ void __launch_bounds__(EST_THREADS) estimate_sub_kernel(kvt_estimate_args a)
{
	constexpr int LPT = D / 8, NG = EST_THREADS / LPT;
	const uint32_t r = blockIdx.x;
	const int G = a.g.group, R = a.g.reps, g0 = blockIdx.z * GM;
	const int gn = G - g0 < GM ? G - g0 : GM;
	const uint32_t lane = threadIdx.x % LPT, grp = threadIdx.x / LPT;
	const int warp = threadIdx.x / 32, wl = threadIdx.x % 32;
	const uint32_t n = a.n_full[r];
	uint32_t ns = (uint32_t)a.n_sel[r];
	ns = ns < a.stride ? ns : a.stride;
	float qf[GM][8], m[GM];
	kvt_load_q<T, D, GM>(static_cast<const T *>(a.q) + ((size_t)r * G + g0) * D + lane * 8,
			     gn, a.scale, qf);
	float *est = a.est + ((size_t)r * G + g0) * (D + 2);
#pragma unroll
	for (int g = 0; g < GM; g++)
		m[g] = g < gn ? est[(size_t)g * (D + 2)] * KVT_LOG2E : -INFINITY;
	const size_t rec = (size_t)(4 + R) * D;
	const size_t base = a.row_base ? (size_t)a.row_base[r] : (size_t)r * a.sum_stride;
	const T *sums = static_cast<const T *>(a.summaries) + (2 + R) * D + lane * 8;
	const float tok = (float)a.g.page_tokens;
	float l[GM], acc[GM][8];
#pragma unroll
	for (int g = 0; g < GM; g++) {
		l[g] = 0;
#pragma unroll
		for (int j = 0; j < 8; j++)
			acc[g][j] = 0;
	}
	for (uint32_t i0 = 0; i0 < ns; i0 += NG) { /* the same turns for every lane group */
		const uint32_t i = i0 + grp;
		int64_t p = -1;
		if (i < ns)
			p = (int64_t)a.sel[(size_t)r * a.stride + i] - a.sel_base -
			    (int64_t)r * a.sel_row_stride;
		const bool use = p >= 0 && p < n;
		kvt_raw8<T> kr, vr;
		if (use) {
			const T *s = sums + (base + (size_t)p) * rec;
			kr.load(s);
			vr.load(s + D);
		} else {
			kr.zero();
			vr.zero();
		}
		float k[8], v[8];
		kr.to_float(k);
		vr.to_float(v);
		float z[GM];
		kvt_head_logits<LPT, GM>(qf, k, z); /* log2 units */
#pragma unroll
		for (int g = 0; g < GM; g++) {
			if (use && g < gn && m[g] > -INFINITY) {
				const float w = tok * exp2f(z[g] - m[g]);
				l[g] += w;
#pragma unroll
				for (int j = 0; j < 8; j++)
					acc[g][j] += w * v[j];
			}
		}
	}
	/* sums over the lane groups: a warp's by shuffles, the block's in shared memory */
#pragma unroll
	for (int o = LPT; o < 32; o <<= 1)
#pragma unroll
		for (int g = 0; g < GM; g++) {
			l[g] += __shfl_xor_sync(0xffffffffu, l[g], o);
#pragma unroll
			for (int j = 0; j < 8; j++)
				acc[g][j] += __shfl_xor_sync(0xffffffffu, acc[g][j], o);
		}
	__shared__ float sm_l[EST_WARPS][GM];
	__shared__ __align__(16) float sm_acc[EST_WARPS][GM][D];
	if (wl < LPT) {
#pragma unroll
		for (int g = 0; g < GM; g++) {
			if (wl == 0)
				sm_l[warp][g] = l[g];
#pragma unroll
			for (int j = 0; j < 8; j++)
				sm_acc[warp][g][lane * 8 + j] = acc[g][j];
		}
	}
	__shared__ float sm_l0[GM];
	if (threadIdx.x < gn) /* the sums before, read before any is written */
		sm_l0[threadIdx.x] = est[(size_t)threadIdx.x * (D + 2) + 1];
	__syncthreads();
	for (int o = threadIdx.x; o < gn * D; o += EST_THREADS) {
		const int g = o / D, d = o % D;
		float *e = est + (size_t)g * (D + 2);
		float L = 0, A = 0;
#pragma unroll
		for (int w = 0; w < EST_WARPS; w++) {
			L += sm_l[w][g];
			A += sm_acc[w][g][d];
		}
		const float l0 = sm_l0[g], left = l0 - L;
		const bool none = !(left > 1e-6f * l0);
		e[2 + d] = none ? 0.0f : e[2 + d] - A;
		if (d == 0) {
			e[1] = none ? 0.0f : left;
			if (none)
				e[0] = -INFINITY;
		}
	}
}

template <typename T, int D>
static int est_launch(const kvt_estimate_args *a, cudaStream_t s)
{
	const uint32_t chunks = kvt_est_chunks(a->max_pages);
	const uint32_t G = a->g.group;
	if (G <= 4) {
		estimate_kernel<T, D, 4><<<dim3(chunks, a->rows, 1), EST_THREADS, 0, s>>>(*a, chunks);
	} else {
		constexpr int GM = D <= 128 ? 8 : 4; /* [warps][GM][D] floats in shared memory */
		estimate_kernel<T, D, GM>
			<<<dim3(chunks, a->rows, (G + GM - 1) / GM), EST_THREADS, 0, s>>>(*a, chunks);
	}
	return kvt_cuda_errno(cudaGetLastError(), "estimate");
}

template <typename T, int D>
static int est_sub_launch(const kvt_estimate_args *a, cudaStream_t s)
{
	const uint32_t G = a->g.group;
	if (G <= 4) {
		estimate_sub_kernel<T, D, 4><<<dim3(a->rows, 1, 1), EST_THREADS, 0, s>>>(*a);
	} else {
		constexpr int GM = D <= 128 ? 8 : 4;
		estimate_sub_kernel<T, D, GM>
			<<<dim3(a->rows, 1, (G + GM - 1) / GM), EST_THREADS, 0, s>>>(*a);
	}
	return kvt_cuda_errno(cudaGetLastError(), "estimate");
}

int kvt_cuda_estimate(const kvt_estimate_args *a, cudaStream_t s)
{
	if (a->rows > 65535 && !a->subtract)
		return -EINVAL;
	if (a->rows > INT32_MAX)
		return -EINVAL;
	return kvt_dispatch_dtype_dim(a->g.dtype, a->g.head_dim, [&](auto t, auto d) {
		return a->subtract ? est_sub_launch<decltype(t), decltype(d)::value>(a, s)
				   : est_launch<decltype(t), decltype(d)::value>(a, s);
	});
}
