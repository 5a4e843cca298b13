// SPDX-License-Identifier: MIT
/*
 * Paged decode attention (flash-decoding). A block of 128 threads takes one row
 * (sequence, KV head), up to 8 query heads of its group and a run of page-table
 * entries; D/8 lanes share a token (16-byte loads of K and V), so a block streams
 * 128/(D/8) tokens at a time with up to 8 tokens per thread in flight, and keeps an
 * online softmax per thread. The token groups of a block merge through shared
 * memory; the splits of a row write (output, log2-sum-exp) partials to a workspace
 * and the last split to finish (a per-row counter) merges them, so one launch does
 * all of it.
 */
#include <errno.h>
#include <math.h>
#include <stdlib.h>

#include "kernels/cuda_common.cuh"

#define ATT_THREADS 128

struct att_launch {
	kvt_attend_args a;
	float *ws_o;   /* [rows][hchunks][splits][GM][D] */
	float *ws_lse; /* [rows][hchunks][splits][GM] */
	int *counters; /* [rows][hchunks] */
	uint32_t pps, splits, hchunks;
};

template <typename T, int D, int GM>
__global__ void __launch_bounds__(ATT_THREADS, GM >= 8 ? 2 : 4) attend_kernel(att_launch L)
{
	constexpr int LPT = D / 8, TPI = ATT_THREADS / LPT;
	constexpr int ATT_CHUNK = GM >= 8 ? 4 : 8; /* tokens per thread in flight */
	const kvt_attend_args &a = L.a;
	const uint32_t split = blockIdx.x, r = blockIdx.y, hc = blockIdx.z;
	const int G = a.g.group, T_ = a.g.page_tokens;
	const int g0 = hc * GM, gn = G - g0 < GM ? G - g0 : GM;
	uint32_t n = a.n_pages[r];
	n = n < a.stride ? n : a.stride;
	const int32_t tslot = a.tail_slot ? a.tail_slot[r] : -1;
	int tlen = tslot >= 0 ? a.tail_len[r] : 0;
	tlen = tlen < T_ ? (tlen > 0 ? tlen : 0) : T_;
	const uint32_t ent = n + (tlen > 0);
	uint32_t my_splits = (ent + L.pps - 1) / L.pps;
	my_splits = my_splits ? my_splits : 1;
	if (split >= my_splits)
		return;
	const uint32_t e0 = split * L.pps, e1 = e0 + L.pps < ent ? e0 + L.pps : ent;
	const int lane = threadIdx.x % LPT, tg = threadIdx.x / LPT;

	float qf[GM][8];
	const T *q = static_cast<const T *>(a.q) + ((size_t)r * G + g0) * D + lane * 8;
	const float qscale = a.scale * KVT_LOG2E;
#pragma unroll
	for (int g = 0; g < GM; g++) {
		if (g < gn) {
			kvt_load8(q + (size_t)g * D, qf[g]);
#pragma unroll
			for (int j = 0; j < 8; j++)
				qf[g][j] *= qscale;
		} else {
#pragma unroll
			for (int j = 0; j < 8; j++)
				qf[g][j] = 0;
		}
	}
	float m[GM], l[GM], acc[GM][8];
#pragma unroll
	for (int g = 0; g < GM; g++) {
		m[g] = -INFINITY;
		l[g] = 0;
#pragma unroll
		for (int j = 0; j < 8; j++)
			acc[g][j] = 0;
	}
	const size_t vofs = (size_t)T_ * D;
	for (uint32_t e = e0; e < e1; e++) {
		int32_t slot = e < n ? a.table[(size_t)r * a.stride + e] : tslot;
		const int len = e < n ? T_ : tlen;
		const void *base = e < n || !a.tail_pool ? a.pool : a.tail_pool;
		uint64_t sb = a.slot_bytes;
		if (e < n && (slot & KVT_SLOT_HOST)) { /* read in place from pinned host memory */
			base = a.host_pool;
			sb = a.host_slot_bytes;
			slot &= ~KVT_SLOT_HOST;
		}
		const T *kp = reinterpret_cast<const T *>(static_cast<const char *>(base) +
							  (uint64_t)slot * sb) +
			      lane * 8;
		for (int t0 = 0; t0 < len; t0 += TPI * ATT_CHUNK) {
			kvt_raw8<T> kr[ATT_CHUNK], vr[ATT_CHUNK];
#pragma unroll
			for (int c = 0; c < ATT_CHUNK; c++) {
				int t = t0 + c * TPI + tg;
				if (t < len) {
					kr[c].load(kp + (size_t)t * D);
					vr[c].load(kp + vofs + (size_t)t * D);
				} else {
					kr[c].zero();
					vr[c].zero();
				}
			}
			/* all logits of the chunk first (independent), then one rescale per head */
			float sc[ATT_CHUNK][GM];
#pragma unroll
			for (int c = 0; c < ATT_CHUNK; c++) {
				const bool ok = t0 + c * TPI + tg < len;
				float kf[8];
				kr[c].to_float(kf);
#pragma unroll
				for (int g = 0; g < GM; g++) {
					float x = 0;
#pragma unroll
					for (int j = 0; j < 8; j++)
						x += qf[g][j] * kf[j];
					x = kvt_group_sum<LPT>(x);
					sc[c][g] = ok ? x : -INFINITY;
				}
			}
			float mx[GM];
#pragma unroll
			for (int g = 0; g < GM; g++) {
				mx[g] = m[g];
#pragma unroll
				for (int c = 0; c < ATT_CHUNK; c++)
					mx[g] = fmaxf(mx[g], sc[c][g]);
				/* nothing valid yet: keep the state, exponents of -inf give 0 */
				const float base = mx[g] == -INFINITY ? 0.0f : mx[g];
				const float corr = exp2f(m[g] - base);
				l[g] *= corr;
#pragma unroll
				for (int j = 0; j < 8; j++)
					acc[g][j] *= corr;
				m[g] = mx[g];
				mx[g] = base;
			}
#pragma unroll
			for (int c = 0; c < ATT_CHUNK; c++) {
				float vf[8];
				vr[c].to_float(vf); /* once per token, for every head */
#pragma unroll
				for (int g = 0; g < GM; g++) {
					const float p = exp2f(sc[c][g] - mx[g]);
					l[g] += p;
#pragma unroll
					for (int j = 0; j < 8; j++)
						acc[g][j] += p * vf[j];
				}
			}
		}
	}

	/* merge the token groups of this block */
	__shared__ float sm_m[TPI][GM], sm_l[TPI][GM];
	__shared__ __align__(16) float sm_acc[TPI][GM][D];
	__shared__ int last;
#pragma unroll
	for (int g = 0; g < GM; g++) {
		if (lane == 0) {
			sm_m[tg][g] = m[g];
			sm_l[tg][g] = l[g];
		}
#pragma unroll
		for (int j = 0; j < 8; j++)
			sm_acc[tg][g][lane * 8 + j] = acc[g][j];
	}
	__syncthreads();
	const size_t part = ((size_t)r * L.hchunks + hc) * L.splits;
	for (int o = threadIdx.x; o < GM * D; o += ATT_THREADS) {
		const int g = o / D, d = o % D;
		if (g >= gn)
			continue;
		float M = -INFINITY;
		for (int t = 0; t < TPI; t++)
			M = fmaxf(M, sm_m[t][g]);
		float S = 0, A = 0;
		if (M > -INFINITY) {
			for (int t = 0; t < TPI; t++) {
				float w = exp2f(sm_m[t][g] - M);
				S += sm_l[t][g] * w;
				A += sm_acc[t][g][d] * w;
			}
		}
		const float o_val = S > 0 ? A / S : 0.0f;
		const float lse2 = S > 0 ? M + log2f(S) : -INFINITY;
		if (my_splits == 1) {
			T *out = static_cast<T *>(a.out) + ((size_t)r * G + g0 + g) * D + d;
			kvt_store1(out, o_val);
			if (d == 0 && a.lse)
				a.lse[(size_t)r * G + g0 + g] = lse2 * KVT_LN2;
		} else {
			L.ws_o[((part + split) * GM + g) * D + d] = o_val;
			if (d == 0)
				L.ws_lse[(part + split) * GM + g] = lse2;
		}
	}
	if (my_splits == 1)
		return;
	__threadfence();
	__syncthreads();
	if (threadIdx.x == 0) {
		int *ctr = L.counters + (size_t)r * L.hchunks + hc;
		last = atomicAdd(ctr, 1) == (int)my_splits - 1;
		if (last)
			*ctr = 0; /* ready for the next launch */
	}
	__syncthreads();
	if (!last)
		return;
	__threadfence();
	/*
	 * Merge the splits: their log2-sum-exps into weights in shared memory (reusing
	 * sm_acc: splits * GM <= TPI * GM * D), then every output a weighted sum whose
	 * loads are independent, so they overlap.
	 */
	float *w = &sm_acc[0][0][0];
	for (uint32_t i = threadIdx.x; i < my_splits * GM; i += ATT_THREADS)
		w[i] = __ldcg(&L.ws_lse[part * GM + i]);
	__syncthreads();
	const int warp = threadIdx.x / 32, wl = threadIdx.x % 32;
	for (int g = warp; g < GM; g += ATT_THREADS / 32) {
		float M = -INFINITY, S = 0;
		for (uint32_t s = wl; s < my_splits; s += 32)
			M = fmaxf(M, w[s * GM + g]);
#pragma unroll
		for (int o = 16; o; o >>= 1)
			M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
		for (uint32_t s = wl; s < my_splits; s += 32) {
			float x = M > -INFINITY ? exp2f(w[s * GM + g] - M) : 0.0f;
			w[s * GM + g] = x;
			S += x;
		}
#pragma unroll
		for (int o = 16; o; o >>= 1)
			S += __shfl_xor_sync(0xffffffffu, S, o);
		if (wl == 0) {
			sm_m[0][g] = M;
			sm_l[0][g] = S;
		}
	}
	__syncthreads();
	/* splits outer, this thread's outputs inner: NO * 4 loads in flight */
	constexpr int NO = (GM * D + ATT_THREADS - 1) / ATT_THREADS;
	float A[NO];
#pragma unroll
	for (int i = 0; i < NO; i++)
		A[i] = 0;
	const float *po = L.ws_o + part * GM * D;
#pragma unroll 4
	for (uint32_t s = 0; s < my_splits; s++) {
#pragma unroll
		for (int i = 0; i < NO; i++) {
			const int o = threadIdx.x + i * ATT_THREADS;
			if (o < GM * D)
				A[i] += w[s * GM + o / D] * __ldcg(po + (size_t)s * GM * D + o);
		}
	}
#pragma unroll
	for (int i = 0; i < NO; i++) {
		const int o = threadIdx.x + i * ATT_THREADS, g = o / D, d = o % D;
		if (o >= GM * D || g >= gn)
			continue;
		const float S = sm_l[0][g];
		T *out = static_cast<T *>(a.out) + ((size_t)r * G + g0 + g) * D + d;
		kvt_store1(out, S > 0 ? A[i] / S : 0.0f);
		if (d == 0 && a.lse)
			a.lse[(size_t)r * G + g0 + g] = S > 0 ? (sm_m[0][g] + log2f(S)) * KVT_LN2 : -INFINITY;
	}
}

template <typename T, int D> static int attend_gm(att_launch &L, cudaStream_t s)
{
	dim3 grid(L.splits, L.a.rows, L.hchunks);
	uint32_t G = L.a.g.group;
	if (G <= 1)
		attend_kernel<T, D, 1><<<grid, ATT_THREADS, 0, s>>>(L);
	else if (G <= 2)
		attend_kernel<T, D, 2><<<grid, ATT_THREADS, 0, s>>>(L);
	else if (G <= 4)
		attend_kernel<T, D, 4><<<grid, ATT_THREADS, 0, s>>>(L);
	else
		attend_kernel<T, D, 8><<<grid, ATT_THREADS, 0, s>>>(L);
	return kvt_cuda_errno(cudaGetLastError(), "attend");
}

int kvt_cuda_attend(const kvt_attend_args *a, kvt_cuda_ws *ws, cudaStream_t s)
{
	const uint32_t D = a->g.head_dim, G = a->g.group;
	if ((D != 64 && D != 128 && D != 256) || a->rows > 65535)
		return -EINVAL;
	att_launch L = {};
	L.a = *a;
	const uint32_t gm = G <= 1 ? 1 : G <= 2 ? 2 : G <= 4 ? 4 : 8;
	L.hchunks = (G + gm - 1) / gm;
	if (L.hchunks > 65535)
		return -EINVAL;
	/* Enough blocks to fill the GPU about four times over, sized on the widest row. */
	const uint64_t ent = (uint64_t)a->stride + 1, target = (uint64_t)ws->sms * 4;
	uint64_t units = (uint64_t)a->rows * L.hchunks * ent;
	uint64_t pps = (units + target - 1) / target;
	L.pps = (uint32_t)(pps ? pps : 1);
	const char *force = getenv("KVT_ATTEND_PPS"); /* pages per split, for tuning */
	if (force && atoi(force) > 0)
		L.pps = (uint32_t)atoi(force);
	L.splits = (uint32_t)((ent + L.pps - 1) / L.pps);
	if (L.splits > ATT_THREADS * 8) { /* the merge keeps splits * GM weights in sm_acc */
		L.pps = (uint32_t)((ent + ATT_THREADS * 8 - 1) / (ATT_THREADS * 8));
		L.splits = (uint32_t)((ent + L.pps - 1) / L.pps);
	}
	if (L.splits > 1) {
		size_t slots = (size_t)a->rows * L.hchunks * L.splits;
		size_t need = slots * gm * (D + 1) * sizeof(float);
		size_t nctr = (size_t)a->rows * L.hchunks;
		if (need > ws->bytes) {
			cudaFree(ws->buf);
			ws->buf = NULL;
			ws->bytes = 0;
			int ret = kvt_cuda_errno(cudaMalloc(&ws->buf, need), "attend workspace");
			if (ret < 0)
				return ret;
			ws->bytes = need;
		}
		if (nctr > ws->n_counters) {
			cudaFree(ws->counters);
			ws->counters = NULL;
			ws->n_counters = 0;
			int ret = kvt_cuda_errno(cudaMalloc(&ws->counters, nctr * sizeof(int)),
						 "attend counters");
			if (ret < 0)
				return ret;
			ret = kvt_cuda_errno(cudaMemsetAsync(ws->counters, 0, nctr * sizeof(int), s),
					     "attend counters");
			if (ret < 0)
				return ret;
			ws->n_counters = nctr;
		}
		L.ws_o = ws->buf;
		L.ws_lse = ws->buf + slots * gm * D;
		L.counters = ws->counters;
	}
	return kvt_dispatch_dtype(a->g.dtype, [&](auto t) {
		using T = decltype(t);
		switch (D) {
		case 64:
			return attend_gm<T, 64>(L, s);
		case 128:
			return attend_gm<T, 128>(L, s);
		default:
			return attend_gm<T, 256>(L, s);
		}
	});
}
