// SPDX-License-Identifier: MIT
/*
 * The estimate of the attention over the pages a table leaves out (kvt_estimate): a
 * block per (chunk of KVT_EST_PPB pages, row, chunk of GM query heads). D/8 lanes per
 * page, 16-byte loads of the page's mean key and mean value, all of a lane group's
 * pages loaded before any is used; an online softmax per lane group, merged over the
 * warp by shuffles and over the block in shared memory. Each block writes its partial
 * to the work area; the last block of a (row, head chunk) to finish (a counter in
 * sync) merges them into est.
 */
#include <errno.h>
#include <math.h>

#include "kernels/compute_impl.h"
#include "kernels/cuda_common.cuh"

#define EST_THREADS 256
#define EST_WARPS (EST_THREADS / 32)

/* One online-softmax state (log2 units) of GM heads over 8 dims. */
template <int GM> struct est_state {
	float m[GM], l[GM], acc[GM][8];
	__device__ __forceinline__ void init()
	{
#pragma unroll
		for (int g = 0; g < GM; g++) {
			m[g] = -INFINITY;
			l[g] = 0;
#pragma unroll
			for (int j = 0; j < 8; j++)
				acc[g][j] = 0;
		}
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
	const uint32_t n = a.n_full[r], p0 = chunk * KVT_EST_PPB;

	/* the chunk's pages the table has: a bitmap */
	__shared__ uint32_t taken[KVT_EST_PPB / 32];
	if (threadIdx.x < KVT_EST_PPB / 32)
		taken[threadIdx.x] = 0;
	__syncthreads();
	uint32_t ns = a.stride ? (uint32_t)a.n_sel[r] : 0;
	ns = ns < a.stride ? ns : a.stride;
	for (uint32_t i = threadIdx.x; i < ns; i += EST_THREADS) {
		const int64_t p = (int64_t)a.sel[(size_t)r * a.stride + i] - a.sel_base -
				  (int64_t)r * a.sel_row_stride - p0;
		if (p >= 0 && p < KVT_EST_PPB)
			atomicOr(&taken[p / 32], 1u << (p % 32));
	}
	/* the queries, scaled to log2 units */
	float qf[GM][8];
	const T *q = static_cast<const T *>(a.q) + (size_t)r * G * D + lane * 8;
	const float qs = a.scale * KVT_LOG2E;
#pragma unroll
	for (int g = 0; g < GM; g++) {
		if (g < gn)
			kvt_load8(q + (size_t)(g0 + g) * D, qf[g]);
#pragma unroll
		for (int j = 0; j < 8; j++)
			qf[g][j] = g < gn ? qf[g][j] * qs : 0.0f;
	}
	__syncthreads();

	const size_t rec = (size_t)(4 + R) * D;
	const size_t base = a.row_base ? (size_t)a.row_base[r] : (size_t)r * a.sum_stride;
	const T *sums = static_cast<const T *>(a.summaries) + (2 + R) * D + lane * 8;
	kvt_raw8<T> kr[U], vr[U];
	bool use[U];
#pragma unroll
	for (int u = 0; u < U; u++) {
		const uint32_t pp = grp + u * NG, p = p0 + pp;
		use[u] = p < n && !((taken[pp / 32] >> (pp % 32)) & 1);
		if (use[u]) {
			const T *s = sums + (base + p) * rec;
			kr[u].load(s);
			vr[u].load(s + D);
		} else {
			kr[u].zero();
			vr[u].zero();
		}
	}
	est_state<GM> st;
	st.init();
	const float tok = (float)a.g.page_tokens;
#pragma unroll
	for (int u = 0; u < U; u++) {
		float k[8], v[8];
		kr[u].to_float(k);
		vr[u].to_float(v);
#pragma unroll
		for (int g = 0; g < GM; g++) {
			float z = 0;
#pragma unroll
			for (int j = 0; j < 8; j++)
				z += qf[g][j] * k[j];
			z = kvt_group_sum<LPT>(z); /* every lane of the warp takes part */
			if (use[u] && g < gn) {
				const float mm = fmaxf(st.m[g], z), c = exp2f(st.m[g] - mm),
					    w = tok * exp2f(z - mm);
				st.l[g] = st.l[g] * c + w;
#pragma unroll
				for (int j = 0; j < 8; j++)
					st.acc[g][j] = st.acc[g][j] * c + w * v[j];
				st.m[g] = mm;
			}
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
	const int warp = threadIdx.x / 32, wl = threadIdx.x % 32;
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
	float *work = a.work + (((size_t)r * chunks + chunk) * G + g0) * (D + 2);
	for (int o = threadIdx.x; o < gn * D; o += EST_THREADS) {
		const int g = o / D, d = o % D;
		float M = -INFINITY, S = 0, A = 0;
#pragma unroll
		for (int w = 0; w < EST_WARPS; w++)
			M = fmaxf(M, sm_m[w][g]);
		if (M > -INFINITY) {
#pragma unroll
			for (int w = 0; w < EST_WARPS; w++) {
				const float x = exp2f(sm_m[w][g] - M);
				S += sm_l[w][g] * x;
				A += sm_acc[w][g][d] * x;
			}
		}
		float *part = work + (size_t)g * (D + 2);
		part[2 + d] = A;
		if (d == 0) {
			part[0] = M;
			part[1] = S;
		}
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
	const float *w0 = a.work + ((size_t)r * chunks * G + g0) * (D + 2);
	const size_t cs = (size_t)G * (D + 2); /* from one chunk's partial to the next */
	for (int o = threadIdx.x; o < gn * D; o += EST_THREADS) {
		const int g = o / D, d = o % D;
		const float *pg = w0 + (size_t)g * (D + 2);
		float M = -INFINITY, S = 0, A = 0;
		for (uint32_t c = 0; c < chunks; c++)
			M = fmaxf(M, __ldcg(pg + c * cs));
		if (M > -INFINITY) {
			for (uint32_t c = 0; c < chunks; c++) {
				const float x = exp2f(__ldcg(pg + c * cs) - M);
				S += __ldcg(pg + c * cs + 1) * x;
				A += __ldcg(pg + c * cs + 2 + d) * x;
			}
		}
		float *e = a.est + ((size_t)r * G + g0 + g) * (D + 2);
		e[2 + d] = A;
		if (d == 0) {
			e[0] = M > -INFINITY ? M * KVT_LN2 : -INFINITY;
			e[1] = S;
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

int kvt_cuda_estimate(const kvt_estimate_args *a, cudaStream_t s)
{
	if (a->rows > 65535)
		return -EINVAL;
	return kvt_dispatch_dtype(a->g.dtype, [&](auto t) {
		using T = decltype(t);
		switch (a->g.head_dim) {
		case 64:
			return est_launch<T, 64>(a, s);
		case 128:
			return est_launch<T, 128>(a, s);
		case 256:
			return est_launch<T, 256>(a, s);
		default:
			return -EINVAL;
		}
	});
}
