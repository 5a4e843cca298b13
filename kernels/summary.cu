// SPDX-License-Identifier: MIT
/*
 * Page summaries (per-channel key min/max, R pooled representative keys, the page's
 * mean key and mean value) and page
 * scores against a decode step's queries. The score kernel is a stream over the
 * summary records: D/8 lanes per page, each with 16-byte loads, four pages per
 * lane group in flight, the group's queries in registers.
 */
#include <errno.h>
#include <math.h>

#include "kernels/cuda_common.cuh"

template <typename T> __global__ void __launch_bounds__(128) summarize_kernel(kvt_summarize_args a)
{
	const int D = a.g.head_dim, T_ = a.g.page_tokens, R = a.g.reps, lpt = D / 8;
	const int gpb = 128 / lpt;
	const uint32_t i = blockIdx.x * gpb + threadIdx.x / lpt;
	const int lane = threadIdx.x % lpt;
	if (i >= a.n)
		return;
	const T *k = reinterpret_cast<const T *>(static_cast<const char *>(a.pool) +
						 (uint64_t)a.slots[i] * a.slot_bytes) +
		     lane * 8;
	T *out = reinterpret_cast<T *>(static_cast<char *>(a.summaries) +
				       (uint64_t)a.records[i] * (4 + R) * D * sizeof(T)) +
		 lane * 8;
	float lo[8], hi[8], sum[8], v[8], all[8];
#pragma unroll
	for (int j = 0; j < 8; j++)
		lo[j] = INFINITY, hi[j] = -INFINITY, all[j] = 0;
	const int blocks = R ? R : 1, per = T_ / blocks;
	for (int r = 0; r < blocks; r++) {
#pragma unroll
		for (int j = 0; j < 8; j++)
			sum[j] = 0;
		for (int t = r * per; t < (r + 1) * per; t++) {
			kvt_load8(k + (size_t)t * D, v);
#pragma unroll
			for (int j = 0; j < 8; j++) {
				lo[j] = fminf(lo[j], v[j]);
				hi[j] = fmaxf(hi[j], v[j]);
				sum[j] += v[j];
			}
		}
#pragma unroll
		for (int j = 0; j < 8; j++)
			all[j] += sum[j];
		if (R) {
#pragma unroll
			for (int j = 0; j < 8; j++)
				sum[j] /= (float)per;
			kvt_store8(out + (size_t)(2 + r) * D, sum);
		}
	}
	kvt_store8(out, lo);
	kvt_store8(out + D, hi);
	/* the page's mean key and mean value (kvt_estimate) */
#pragma unroll
	for (int j = 0; j < 8; j++)
		all[j] /= (float)T_, sum[j] = 0;
	kvt_store8(out + (size_t)(2 + R) * D, all);
	for (int t = 0; t < T_; t++) {
		kvt_load8(k + (size_t)(T_ + t) * D, v);
#pragma unroll
		for (int j = 0; j < 8; j++)
			sum[j] += v[j];
	}
#pragma unroll
	for (int j = 0; j < 8; j++)
		sum[j] /= (float)T_;
	kvt_store8(out + (size_t)(3 + R) * D, sum);
}

int kvt_cuda_summarize(const kvt_summarize_args *a, cudaStream_t s)
{
	const uint32_t D = a->g.head_dim;
	if (D % 8 || D > 1024 || 128 % (D / 8))
		return -EINVAL;
	const uint32_t gpb = 128 / (D / 8);
	return kvt_dispatch_dtype(a->g.dtype, [&](auto t) {
		using T = decltype(t);
		summarize_kernel<T><<<(a->n + gpb - 1) / gpb, 128, 0, s>>>(*a);
		return kvt_cuda_errno(cudaGetLastError(), "summarize");
	});
}

template <typename T, int D, int GM>
__global__ void __launch_bounds__(256) score_kernel(kvt_score_args a)
{
	constexpr int LPT = D / 8, PG = 256 / LPT, U = 4;
	const int G = a.g.group, R = a.g.reps;
	const uint32_t r = blockIdx.y, lane = threadIdx.x % LPT, pg = threadIdx.x / LPT;
	uint32_t n = a.n_pages[r];
	n = n < a.stride ? n : a.stride;
	const uint32_t base = blockIdx.x * PG * U;
	if (base >= n)
		return;
	float qf[GM][8];
	const T *q = static_cast<const T *>(a.q) + (size_t)r * G * D + lane * 8;
#pragma unroll
	for (int g = 0; g < GM; g++) {
		if (g < G)
			kvt_load8(q + (size_t)g * D, qf[g]);
		else
#pragma unroll
			for (int j = 0; j < 8; j++)
				qf[g][j] = 0;
	}
	const size_t rec = (size_t)(4 + R) * D;
	const T *sum = static_cast<const T *>(a.summaries) + lane * 8;
	const T *recp[U];
	bool valid[U];
#pragma unroll
	for (int u = 0; u < U; u++) {
		uint32_t p = base + u * PG + pg;
		valid[u] = p < n;
		size_t idx = (size_t)r * a.stride + (valid[u] ? p : 0);
		size_t recno = a.sum_index ? (size_t)a.sum_index[idx]
			       : a.row_base ? (size_t)a.row_base[r] + (valid[u] ? p : 0) : idx;
		recp[u] = sum + recno * rec;
	}
	float score[U];
	const bool agg_sum = a.agg == KVT_GQA_SUM;
	if (a.method == KVT_SCORE_QUEST) {
		kvt_raw8<T> mn[U], mx[U];
#pragma unroll
		for (int u = 0; u < U; u++) {
			if (valid[u]) {
				mn[u].load(recp[u]);
				mx[u].load(recp[u] + D);
			} else {
				mn[u].zero();
				mx[u].zero();
			}
		}
#pragma unroll
		for (int u = 0; u < U; u++) {
			float m[8], M[8];
			mn[u].to_float(m);
			mx[u].to_float(M);
			float part[GM];
#pragma unroll
			for (int g = 0; g < GM; g++) {
				part[g] = 0;
#pragma unroll
				for (int j = 0; j < 8; j++)
					part[g] += fmaxf(qf[g][j] * m[j], qf[g][j] * M[j]);
			}
			if (agg_sum) {
				float t = 0;
#pragma unroll
				for (int g = 0; g < GM; g++)
					t += part[g]; /* padding heads add 0 */
				score[u] = kvt_group_sum<LPT>(t);
			} else {
				float best = -INFINITY;
#pragma unroll
				for (int g = 0; g < GM; g++) {
					float t = kvt_group_sum<LPT>(part[g]);
					if (g < G)
						best = fmaxf(best, t);
				}
				score[u] = best;
			}
		}
	} else {
		float best[U][GM];
#pragma unroll
		for (int u = 0; u < U; u++)
#pragma unroll
			for (int g = 0; g < GM; g++)
				best[u][g] = -INFINITY;
		for (int j = 0; j < R; j++) {
			kvt_raw8<T> rv[U];
#pragma unroll
			for (int u = 0; u < U; u++) {
				if (valid[u])
					rv[u].load(recp[u] + (size_t)(2 + j) * D);
				else
					rv[u].zero();
			}
#pragma unroll
			for (int u = 0; u < U; u++) {
				float v[8], z[GM];
				rv[u].to_float(v);
				kvt_head_logits<LPT, GM>(qf, v, z);
#pragma unroll
				for (int g = 0; g < GM; g++)
					best[u][g] = fmaxf(best[u][g], z[g]);
			}
		}
#pragma unroll
		for (int u = 0; u < U; u++) {
			float t = agg_sum ? 0.0f : -INFINITY;
#pragma unroll
			for (int g = 0; g < GM; g++)
				if (g < G)
					t = agg_sum ? t + best[u][g] : fmaxf(t, best[u][g]);
			score[u] = t;
		}
	}
	if (lane == 0) {
#pragma unroll
		for (int u = 0; u < U; u++)
			if (valid[u])
				a.scores[(size_t)r * a.stride + base + u * PG + pg] = score[u];
	}
}

template <typename T, int D> static int score_gm(const kvt_score_args *a, cudaStream_t s)
{
	constexpr int LPT = D / 8, PG = 256 / LPT, U = 4;
	dim3 grid((a->stride + PG * U - 1) / (PG * U), a->rows);
	uint32_t G = a->g.group;
	if (G <= 1)
		score_kernel<T, D, 1><<<grid, 256, 0, s>>>(*a);
	else if (G <= 2)
		score_kernel<T, D, 2><<<grid, 256, 0, s>>>(*a);
	else if (G <= 4)
		score_kernel<T, D, 4><<<grid, 256, 0, s>>>(*a);
	else if (G <= 8)
		score_kernel<T, D, 8><<<grid, 256, 0, s>>>(*a);
	else if (G <= 16)
		score_kernel<T, D, 16><<<grid, 256, 0, s>>>(*a);
	else
		return -EINVAL;
	return kvt_cuda_errno(cudaGetLastError(), "score");
}

int kvt_cuda_score(const kvt_score_args *a, cudaStream_t s)
{
	if (a->rows > 65535)
		return -EINVAL;
	return kvt_dispatch_dtype_dim(a->g.dtype, a->g.head_dim, [&](auto t, auto d) {
		return score_gm<decltype(t), decltype(d)::value>(a, s);
	});
}
