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
 *
 * Short rows (a sparse decode step: a few dozen pages per row) of 16-bit K/V take a
 * second kernel on sm_90, on tensor cores: a thread-block cluster per (row, head
 * chunk), up to 16 blocks of 256 threads, each taking an equal share of the row's
 * pages two at a time, staged through shared memory; the blocks merge through
 * distributed shared memory (st.async on an mbarrier), with no workspace, fence or
 * counter. See
 * attend_cluster_kernel.
 */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <cooperative_groups.h>
#include <type_traits>

#include "daemon/log.h"
#include "kernels/cuda_common.cuh"

namespace cg = cooperative_groups;

#define ATT_THREADS 128
#define CL_THREADS 256

struct att_launch {
	kvt_attend_args a;
	float *ws_o;   /* [rows][hchunks][splits][GM][D] */
	float *ws_lse; /* [rows][hchunks][splits][GM] */
	int *counters; /* [rows][hchunks] */
	uint32_t pps, splits, hchunks;
};

/*
 * One chunk of CH tokens per thread (loaded already; ok(c): token c is real) into a
 * thread's online softmax over GM query heads: all logits of the chunk first (they
 * are independent), then one rescale per head, then the values.
 */
template <typename T, int D, int GM, int CH, typename V>
__device__ __forceinline__ void att_chunk(const kvt_raw8<T> (&kr)[CH], const kvt_raw8<T> (&vr)[CH],
					  V ok, const float (&qf)[GM][8], float (&m)[GM],
					  float (&l)[GM], float (&acc)[GM][8])
{
	constexpr int LPT = D / 8;
	float sc[CH][GM];
#pragma unroll
	for (int c = 0; c < CH; c++) {
		float kf[8], z[GM];
		kr[c].to_float(kf);
		kvt_head_logits<LPT, GM>(qf, kf, z);
#pragma unroll
		for (int g = 0; g < GM; g++)
			sc[c][g] = ok(c) ? z[g] : -INFINITY;
	}
	float mx[GM];
#pragma unroll
	for (int g = 0; g < GM; g++) {
		mx[g] = m[g];
#pragma unroll
		for (int c = 0; c < CH; c++)
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
	for (int c = 0; c < CH; c++) {
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

/*
 * kvt_estimate's output for head g of row r (the pages the table leaves out) merged
 * into a finished state: M in log2 units, S and A scaled by exp2(-M), dim d.
 */
__device__ __forceinline__ void att_est_fold(const kvt_attend_args &a, uint32_t r, int g, int d,
					     float &M, float &S, float &A)
{
	if (!a.est)
		return;
	const float *e = a.est + ((size_t)r * a.g.group + g) * (a.g.head_dim + 2);
	const float em = e[0] * KVT_LOG2E, el = e[1];
	if (!(em > -INFINITY) || !(el > 0))
		return;
	const float mm = fmaxf(M, em);
	const float wa = S > 0 ? exp2f(M - mm) : 0.0f, we = exp2f(em - mm);
	S = S * wa + el * we;
	A = A * wa + e[2 + d] * we;
	M = mm;
}

/*
 * NG groups' states (sm_m, sm_l: [NG][GM]; sm_acc: [NG][GM][D], stored and synced)
 * merged: f(g, d, M, S, A) once for each of the block's outputs (head g < gn, dim d),
 * with S and A the sums scaled by exp2(-M).
 */
template <int D, int GM, int NT, typename F>
__device__ __forceinline__ void att_groups_merge(const float *sm_m, const float *sm_l,
						 const float *sm_acc, int NG, int gn, F f)
{
	for (int o = threadIdx.x; o < GM * D; o += NT) {
		const int g = o / D, d = o % D;
		if (g >= gn)
			continue;
		float M = -INFINITY;
		for (int t = 0; t < NG; t++)
			M = fmaxf(M, sm_m[t * GM + g]);
		float S = 0, A = 0;
		if (M > -INFINITY) {
			for (int t = 0; t < NG; t++) {
				float w = exp2f(sm_m[t * GM + g] - M);
				S += sm_l[t * GM + g] * w;
				A += sm_acc[(t * GM + g) * D + d] * w;
			}
		}
		f(g, d, M, S, A);
	}
}

/*
 * The block's token groups merged: each thread's state (m, l, acc over its 8 lanes'
 * dims) into shared memory, then att_groups_merge. sm_m, sm_l: [NT/LPT][GM]; sm_acc:
 * [NT/LPT][GM][D].
 */
template <int D, int GM, int NT, typename F>
__device__ __forceinline__ void att_block_merge(float *sm_m, float *sm_l, float *sm_acc, int gn,
						const float (&m)[GM], const float (&l)[GM],
						const float (&acc)[GM][8], F f)
{
	constexpr int LPT = D / 8, TPI = NT / LPT;
	const int lane = threadIdx.x % LPT, tg = threadIdx.x / LPT;
#pragma unroll
	for (int g = 0; g < GM; g++) {
		if (lane == 0) {
			sm_m[tg * GM + g] = m[g];
			sm_l[tg * GM + g] = l[g];
		}
#pragma unroll
		for (int j = 0; j < 8; j++)
			sm_acc[(tg * GM + g) * D + lane * 8 + j] = acc[g][j];
	}
	__syncthreads();
	att_groups_merge<D, GM, NT>(sm_m, sm_l, sm_acc, TPI, gn, f);
}

/*
 * The splits of row r's head chunk hc merged, once each has written its partial
 * (output, log2-sum-exp) to the workspace: the last block to finish (a per-row
 * counter) does it. sm_acc holds at least my_splits * GM floats; sm_m, sm_l GM.
 */
template <typename T, int D, int GM, int NT>
__device__ __forceinline__ void att_splits_merge(const att_launch &L, uint32_t r, uint32_t hc,
						 uint32_t my_splits, int gn, float *sm_m,
						 float *sm_l, float *sm_acc)
{
	const kvt_attend_args &a = L.a;
	const int G = a.g.group, g0 = hc * GM;
	const size_t part = ((size_t)r * L.hchunks + hc) * L.splits;
	__shared__ int last;
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
	float *w = sm_acc;
	for (uint32_t i = threadIdx.x; i < my_splits * GM; i += NT)
		w[i] = __ldcg(&L.ws_lse[part * GM + i]);
	__syncthreads();
	const int warp = threadIdx.x / 32, wl = threadIdx.x % 32;
	for (int g = warp; g < GM; g += NT / 32) {
		float M = -INFINITY, S = 0;
		for (uint32_t s = wl; s < my_splits; s += 32)
			M = fmaxf(M, w[s * GM + g]);
		M = kvt_group_max<32>(M);
		for (uint32_t s = wl; s < my_splits; s += 32) {
			float x = M > -INFINITY ? exp2f(w[s * GM + g] - M) : 0.0f;
			w[s * GM + g] = x;
			S += x;
		}
		S = kvt_group_sum<32>(S);
		if (wl == 0) {
			sm_m[g] = M;
			sm_l[g] = S;
		}
	}
	__syncthreads();
	/* splits outer, this thread's outputs inner: NO * 4 loads in flight */
	constexpr int NO = (GM * D + NT - 1) / NT;
	float A[NO];
#pragma unroll
	for (int i = 0; i < NO; i++)
		A[i] = 0;
	const float *po = L.ws_o + part * GM * D;
#pragma unroll 4
	for (uint32_t s = 0; s < my_splits; s++) {
#pragma unroll
		for (int i = 0; i < NO; i++) {
			const int o = threadIdx.x + i * NT;
			if (o < GM * D)
				A[i] += w[s * GM + o / D] * __ldcg(po + (size_t)s * GM * D + o);
		}
	}
#pragma unroll
	for (int i = 0; i < NO; i++) {
		const int o = threadIdx.x + i * NT, g = o / D, d = o % D;
		if (o >= GM * D || g >= gn)
			continue;
		const float S = sm_l[g];
		float M2 = sm_m[g], S2 = S, A2 = A[i];
		att_est_fold(a, r, g0 + g, d, M2, S2, A2);
		T *out = static_cast<T *>(a.out) + ((size_t)r * G + g0 + g) * D + d;
		kvt_store1(out, S2 > 0 ? A2 / S2 : 0.0f);
		if (d == 0 && a.lse)
			a.lse[(size_t)r * G + g0 + g] = S > 0 ? (sm_m[g] + log2f(S)) * KVT_LN2 : -INFINITY;
	}
}

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
	kvt_load_q<T, D, GM>(static_cast<const T *>(a.q) + ((size_t)r * G + g0) * D + lane * 8, gn,
			     a.scale, qf);
	float m[GM], l[GM], acc[GM][8];
	kvt_softmax_init<GM>(m, l, acc);
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
			att_chunk<T, D, GM, ATT_CHUNK>(
				kr, vr, [&](int c) { return t0 + c * TPI + tg < len; }, qf, m, l, acc);
		}
	}

	/* merge the token groups of this block */
	__shared__ float sm_m[TPI * GM], sm_l[TPI * GM];
	__shared__ __align__(16) float sm_acc[TPI * GM * D];
	const size_t part = ((size_t)r * L.hchunks + hc) * L.splits;
	att_block_merge<D, GM, ATT_THREADS>(sm_m, sm_l, sm_acc, gn, m, l, acc,
					    [&](int g, int d, float M, float S, float A) {
		const float o_val = S > 0 ? A / S : 0.0f;
		const float lse2 = S > 0 ? M + log2f(S) : -INFINITY;
		if (my_splits == 1) {
			float M2 = M, S2 = S, A2 = A;
			att_est_fold(a, r, g0 + g, d, M2, S2, A2);
			T *out = static_cast<T *>(a.out) + ((size_t)r * G + g0 + g) * D + d;
			kvt_store1(out, S2 > 0 ? A2 / S2 : 0.0f);
			if (d == 0 && a.lse)
				a.lse[(size_t)r * G + g0 + g] = lse2 * KVT_LN2;
		} else {
			L.ws_o[((part + split) * GM + g) * D + d] = o_val;
			if (d == 0)
				L.ws_lse[(part + split) * GM + g] = lse2;
		}
	});
	if (my_splits > 1)
		att_splits_merge<T, D, GM, ATT_THREADS>(L, r, hc, my_splits, gn, sm_m, sm_l, sm_acc);
}

/*
 * The cluster kernel: grid (C, rows, head chunks), one cluster of C blocks per (row,
 * head chunk), for 16-bit K/V and D of 64 or 128, on tensor cores (mma.m16n8k16,
 * fp32 accumulation). Block b takes entries [ent*b/C, ent*(b+1)/C) of its row as one
 * run of tokens; each warp takes 16 tokens a pass, a block 128 (two pages of 64).
 * The passes' K and V come into shared memory with cp.async, up to three passes
 * ahead (every load of a short row is in flight from the start: one memory latency,
 * not one per pass), and the fragments are read from there.
 *
 * A warp's pass, with g = lane/4 and c = lane%4 (the fragments' row and column
 * groups; the query heads are the rows, at most 8 of the 16):
 *  - scores S = Q K^T as two 16x8 tiles of 8 tokens, D/16 k-steps each. The sum over
 *    dims is free to take them in any order, so thread c holds dims [c*D/4, c*D/4 +
 *    D/4) of Q and of its token's K (16-byte loads), k-step s taking dims 4s..4s+3;
 *  - the online softmax over the 16 tokens of each head, its max over the quad;
 *  - O += P V as D/8 tiles of 16 heads x 8 dims: the P fragment is the score tiles'
 *    own registers (FlashAttention-2's layout), and V's fragment pairs two tokens of
 *    one dim in a register, built from 16-byte loads (thread g holds dims [g*D/8,
 *    g*D/8 + D/8)) by byte permutes.
 * Then the warps' states merge in shared memory, and each block's result goes into
 * the shared memory of the cluster's first block by st.async, which counts its bytes
 * on that block's mbarrier: the first block waits for them and merges the C results
 * (no cluster barrier at the end, so no GPU-wide memory barrier; one relaxed cluster
 * arrive at the start makes the mbarrier's set-up visible). Dynamic shared memory:
 * the stages (the warps' merge, [NW][GM][D+8] + 2 [NW][GM], takes one no pass used,
 * or the first once the passes end), then [C][GM][D] + 2 [C][GM] for the cluster's
 * results.
 */
#define CL_WARPS (CL_THREADS / 32)

#define CL_TPP (CL_WARPS * 16) /* tokens a block takes per pass */

/* A stage: one pass's K rows then its V rows (per warp: 16 of each), each row padded
 * by 16 bytes so that a warp's fragment loads spread over the banks. (An XOR swizzle
 * meant to leave no bank conflict at all, without the padding, measured slower:
 * 11.2 against 10.0 us, H100.) */
template <int D> __host__ __device__ constexpr uint32_t cl_row_bytes() { return D * 2 + 16; }
template <int D> __host__ __device__ constexpr size_t cl_stage_bytes()
{
	return 2 * CL_TPP * cl_row_bytes<D>();
}

/* The cluster's results, [C][GM][D] + 2 [C][GM] floats, after the stages (the warps'
 * merge, [NW][GM][D] + 2 [NW][GM], reuses the first stage once the passes end). */
template <int D, int GM> constexpr size_t cl_merge_bytes(unsigned c)
{
	return (size_t)c * (GM * D + 2 * GM) * sizeof(float);
}
static_assert(CL_WARPS * 4 * (8 * (64 + 8) + 2 * 8) <= 2 * CL_TPP * (64 * 2 + 16),
	      "the warps' merge fits in a stage (GM 8, D 64; larger D scale both alike)");

template <int D, int GM> constexpr size_t cl_smem_bytes(unsigned c, unsigned stages)
{
	return stages * cl_stage_bytes<D>() + cl_merge_bytes<D, GM>(c);
}

/* cp.async of 16 bytes, the missing bytes (all of them when !n) zero-filled */
__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool n)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
	const uint32_t d = (uint32_t)__cvta_generic_to_shared(dst);
	asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src),
		     "r"(n ? 16 : 0)
		     : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
	asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

/* Waits until at most `pending` of this thread's groups are still in flight (0..2). */
__device__ __forceinline__ void cp_async_wait(uint32_t pending)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
	if (pending == 0)
		asm volatile("cp.async.wait_group 0;" ::: "memory");
	else if (pending == 1)
		asm volatile("cp.async.wait_group 1;" ::: "memory");
	else
		asm volatile("cp.async.wait_group 2;" ::: "memory");
#endif
}

template <typename T> struct mma_ok : std::false_type {};
template <> struct mma_ok<__half> : std::true_type {};
template <> struct mma_ok<__nv_bfloat16> : std::true_type {};

/* d += a b, a 16x16 (rows g+8 zero: a1 = a3 = 0), b 16x8, fp32 accumulators */
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a2, uint32_t b0,
					  uint32_t b1)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
	const uint32_t z = 0;
	if constexpr (std::is_same<T, __half>::value)
		asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
			     "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
			     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
			     : "r"(a0), "r"(z), "r"(a2), "r"(z), "r"(b0), "r"(b1));
	else
		asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
			     "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
			     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
			     : "r"(a0), "r"(z), "r"(a2), "r"(z), "r"(b0), "r"(b1));
#endif
}

/* Two floats as one register of T pairs, x in the low half. */
template <typename T> __device__ __forceinline__ uint32_t pack2(float x, float y)
{
	uint32_t u;
	if constexpr (std::is_same<T, __half>::value) {
		__half2 h = __floats2half2_rn(x, y);
		memcpy(&u, &h, 4);
	} else {
		__nv_bfloat162 h = __floats2bfloat162_rn(x, y);
		memcpy(&u, &h, 4);
	}
	return u;
}

/* 2^x by the SFU alone (ex2.approx.ftz: relative error about 2^-22, -inf gives 0;
 * exp2f adds a range check and a scaling around it) */
__device__ __forceinline__ float ex2_fast(float x)
{
	float y;
	asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
	return y;
}

__device__ __forceinline__ uint32_t word(const uint4 &v, int i)
{
	return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

/*
 * The cluster's merge signals through an mbarrier in the first block's shared memory:
 * each other block sends its result there with st.async, whose bytes count down the
 * barrier's transaction count. (A cluster barrier after plain stores to distributed
 * shared memory costs a GPU-wide memory barrier, MEMBAR.ALL.GPU, in every thread.)
 */
__device__ __forceinline__ uint32_t smem_addr(const void *p)
{
	return (uint32_t)__cvta_generic_to_shared(p);
}

/* the address of the same shared memory in the cluster's block `rank` */
__device__ __forceinline__ uint32_t cl_map(uint32_t addr, uint32_t rank)
{
	uint32_t d = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
	asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(d) : "r"(addr), "r"(rank));
#endif
	return d;
}

__device__ __forceinline__ void cl_send(uint32_t addr, float v, uint32_t bar)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
	asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];" ::"r"(addr),
		     "r"(__float_as_uint(v)), "r"(bar)
		     : "memory");
#endif
}

__device__ __forceinline__ void mbar_init(uint64_t *bar, uint32_t count)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
	asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n\t"
		     "fence.mbarrier_init.release.cluster;" ::"r"(smem_addr(bar)),
		     "r"(count)
		     : "memory");
#endif
}

__device__ __forceinline__ void mbar_expect(uint64_t *bar, uint32_t bytes)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
	asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)),
		     "r"(bytes)
		     : "memory");
#endif
}

__device__ __forceinline__ void mbar_wait(uint64_t *bar, uint32_t parity)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
	asm volatile("{\n\t.reg .pred done;\n"
		     "kvt_mbar_wait:\n\t"
		     "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n\t"
		     "@!done bra kvt_mbar_wait;\n}" ::"r"(smem_addr(bar)),
		     "r"(parity)
		     : "memory");
#endif
}

/* barrier.cluster in two halves: arrive (relaxed: orders nothing) and wait (acquire) */
__device__ __forceinline__ void cl_arrive_relaxed()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
	asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
#endif
}

__device__ __forceinline__ void cl_wait()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
	asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
#endif
}

template <typename T, int D, int GM>
__global__ void __launch_bounds__(CL_THREADS, 1) attend_cluster_kernel(kvt_attend_args a,
									uint32_t nst)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
	if constexpr (mma_ok<T>::value && (D == 64 || D == 128)) {
	constexpr int KW = D / 8;  /* words of K (and Q) a thread holds per token */
	constexpr int VW = D / 16; /* words of V a thread holds per token */
	constexpr int NJ = D / 8;  /* output tiles of 8 dims */
	constexpr uint32_t RS = cl_row_bytes<D>();
	extern __shared__ __align__(16) float cl_smem[];
	cg::cluster_group cl = cg::this_cluster();
	const uint32_t C = cl.num_blocks(), b = cl.block_rank();
	const uint32_t lc = __ffs(C) - 1; /* C is a power of two (pick_cluster): shifts, not divisions */
	uint8_t *stage0 = reinterpret_cast<uint8_t *>(cl_smem);
	constexpr int PD = D + 8; /* a warp's result: a head's row, padded (see below) */
	float *cl_acc = reinterpret_cast<float *>(stage0 + nst * cl_stage_bytes<D>());
	float *cl_m = cl_acc + C * GM * D, *cl_l = cl_m + C * GM;
	__shared__ uint64_t cl_bar; /* the first block's: the other blocks' results landed */
	if (b == 0 && threadIdx.x == 0)
		mbar_init(&cl_bar, 1);
	cl_arrive_relaxed(); /* waited for before the first st.async into the first block */
	const uint32_t r = blockIdx.y, hc = blockIdx.z;
	const int G = a.g.group, T_ = a.g.page_tokens;
	const int g0 = hc * GM, gn = G - g0 < GM ? G - g0 : GM;
	const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, c = lane & 3;
	/*
	 * The page-table entry of this lane's first pass, loaded on the guess that the row
	 * is full (n_pages == stride, a tail page if there is a tail array) alongside
	 * n_pages instead of after it: one memory latency less before the first K/V loads.
	 */
	const uint32_t ent_g = a.stride + (a.tail_slot != nullptr);
	const uint32_t eg = (uint32_t)(((uint64_t)ent_g * b) >> lc) + (warp * 16 + (lane & 15)) / T_;
	const int32_t sg = eg < a.stride ? __ldg(&a.table[(size_t)r * a.stride + eg]) : 0;
	uint32_t n = a.n_pages[r];
	n = n < a.stride ? n : a.stride;
	const int32_t tslot = a.tail_slot ? a.tail_slot[r] : -1;
	int tlen = a.tail_slot && a.tail_len ? a.tail_len[r] : 0; /* loaded alongside */
	tlen = tslot < 0 ? 0 : tlen < T_ ? (tlen > 0 ? tlen : 0) : T_;
	/*
	 * The blocks share the row's actual entries: sharing its stride + 1 possible ones
	 * (so that the page-table loads need not wait for n_pages) measured slower, a
	 * 33rd entry costing a whole pass more.
	 */
	const uint32_t ent = n + (tlen > 0);
	const uint32_t e0 = (uint32_t)(((uint64_t)ent * b) >> lc);
	const uint32_t e1 = (uint32_t)(((uint64_t)ent * (b + 1)) >> lc);
	const uint32_t ntok = (e1 - e0) * (uint32_t)T_; /* the tail's missing tokens masked */
	const size_t vofs = (size_t)T_ * D;

	/*
	 * token i of this block's run: its row of K (V is T_*D further), or null. The
	 * split kernel resolves an entry the same way, once per page; a helper shared by
	 * both, called per token here, measured 12.1 us against 10.5 (H100, session 7).
	 */
	auto row = [&](uint32_t i) -> const T * {
		if (i >= ntok)
			return nullptr;
		const uint32_t k = i / T_, t = i - k * T_, e = e0 + k;
		const void *base = a.pool;
		uint64_t sb = a.slot_bytes;
		int32_t slot;
		if (e < n) {
			slot = e == eg ? sg : __ldg(&a.table[(size_t)r * a.stride + e]);
			if (slot & KVT_SLOT_HOST) { /* read in place from pinned host memory */
				base = a.host_pool;
				sb = a.host_slot_bytes;
				slot &= ~KVT_SLOT_HOST;
			}
		} else {
			if ((int)t >= tlen)
				return nullptr;
			slot = tslot;
			if (a.tail_pool)
				base = a.tail_pool;
		}
		return reinterpret_cast<const T *>(static_cast<const char *>(base) +
						   (uint64_t)slot * sb) +
		       (size_t)t * D;
	};
	/* token i is real: the run's whole pages, then the tail's tokens if it is the
	 * run's last entry (no division per token: this is asked four times a pass) */
	const uint32_t efull = e1 < n ? e1 : n;
	const uint32_t vend = (efull > e0 ? efull - e0 : 0) * (uint32_t)T_ + (e1 > n ? (uint32_t)tlen : 0);
	/*
	 * A warp's 16 tokens of pass p into its part of stage p % nst with cp.async, one
	 * group per pass: each warp loads what it computes on, so only warp barriers are
	 * needed, and it has up to nst passes in flight (a sparse step's block takes two
	 * or three: all of them start at once). Each lane finds one token's row; an
	 * instruction moves 32 / CPR whole rows.
	 */
	constexpr uint32_t CPR = D / 8, RPI = 32 / CPR; /* 16-byte chunks a row, rows a load */
	constexpr uint32_t WST = 2 * 16 * RS;           /* a warp's share of a stage */
	auto issue = [&](uint32_t p) {
		const uint32_t t0 = p * CL_TPP + warp * 16;
		if (t0 >= ntok) {
		} else if (T_ % 16 == 0) {
			/* the warp's 16 tokens lie in one page: one entry, the rows by arithmetic
			 * (no shuffles: a cluster of one block at 32K, 31.2 against 33.7 us,
			 * H100; the default launch unchanged) */
			const T *pg = row(t0);
			uint8_t *st = stage0 + ((p % nst) * CL_WARPS + warp) * WST;
#pragma unroll
			for (uint32_t j = 0; j < 32 / RPI; j++) {
				const uint32_t ri = j * RPI + lane / CPR, ch = lane % CPR, tok = ri & 15;
				const bool ok = pg && t0 + tok < vend;
				cp_async16(st + ri * RS + ch * 16,
					   ok ? pg + (size_t)tok * D + (ri >> 4) * vofs + ch * 8 : a.pool, ok);
			}
		} else {
			const T *mine = row(t0 + (lane & 15));
			uint8_t *st = stage0 + ((p % nst) * CL_WARPS + warp) * WST;
#pragma unroll
			for (uint32_t j = 0; j < 32 / RPI; j++) {
				const uint32_t ri = j * RPI + lane / CPR, ch = lane % CPR;
				const T *src = reinterpret_cast<const T *>(__shfl_sync(
					0xffffffffu, reinterpret_cast<unsigned long long>(mine), ri & 15));
				cp_async16(st + ri * RS + ch * 16,
					   src ? src + (ri >> 4) * vofs + ch * 8 : a.pool, src != nullptr);
			}
		}
		cp_async_commit(); /* empty past the run: the group count stays one a pass */
	};

	uint4 qa[KW / 4]; /* head g's dims [c*D/4, c*D/4 + D/4) */
	{
		const uint4 *q = reinterpret_cast<const uint4 *>(
			static_cast<const T *>(a.q) + ((size_t)r * G + g0 + g) * D + c * (D / 4));
#pragma unroll
		for (int x = 0; x < KW / 4; x++)
			qa[x] = g < gn ? __ldg(q + x) : make_uint4(0, 0, 0, 0);
	}
	float o[NJ][4], m = -INFINITY, l = 0;
#pragma unroll
	for (int j = 0; j < NJ; j++)
		o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0;
	const float sl2 = a.scale * KVT_LOG2E;

	/* (the first loads issued before Q's measured slower: 11.2 against 10.3 us) */
	const uint32_t npass = (ntok + CL_TPP - 1) / CL_TPP;
	uint32_t issued = 0;
	for (; issued < npass && issued < nst; issued++)
		issue(issued);
	for (uint32_t p = 0; p < npass; p++) {
		cp_async_wait(issued - p - 1); /* pass p's group has landed, for this lane */
		__syncwarp();                  /* and for every lane of the warp */
		const uint32_t t0 = p * CL_TPP + warp * 16;
		const uint8_t *st = stage0 + ((p % nst) * CL_WARPS + warp) * WST;
		if (t0 < ntok) {
		uint4 kr[2][KW / 4], vr[4][VW / 4];
		uint32_t ok = 0;
#pragma unroll
		for (int tile = 0; tile < 2; tile++) {
			const uint4 *s4 = reinterpret_cast<const uint4 *>(
				st + (tile * 8 + g) * RS + c * (D / 4) * 2);
#pragma unroll
			for (int x = 0; x < KW / 4; x++)
				kr[tile][x] = s4[x];
		}
#pragma unroll
		for (int u = 0; u < 4; u++) { /* tokens 2c, 2c+1, 2c+8, 2c+9 */
			const uint32_t lt = (u >> 1) * 8 + 2 * c + (u & 1);
			ok |= (uint32_t)(t0 + lt < vend) << u;
			const uint4 *s4 = reinterpret_cast<const uint4 *>(
				st + (16 + lt) * RS + g * (D / 8) * 2);
#pragma unroll
			for (int x = 0; x < VW / 4; x++)
				vr[u][x] = s4[x];
		}
		/* two accumulators a tile (even and odd k-steps): chains of D/32 dependent
		 * mma, not D/16 */
		float sc[2][2][4] = {};
#pragma unroll
		for (int tile = 0; tile < 2; tile++)
#pragma unroll
			for (int ks = 0; ks < D / 16; ks++)
				mma_16816<T>(sc[tile][ks % 2], word(qa[ks / 2], (ks % 2) * 2),
					     word(qa[ks / 2], (ks % 2) * 2 + 1),
					     word(kr[tile][ks / 2], (ks % 2) * 2),
					     word(kr[tile][ks / 2], (ks % 2) * 2 + 1));
		float x[4] = {sc[0][0][0] + sc[0][1][0], sc[0][0][1] + sc[0][1][1],
			      sc[1][0][0] + sc[1][1][0], sc[1][0][1] + sc[1][1][1]}; /* head g, its 4 tokens */
		float mx = m;
#pragma unroll
		for (int u = 0; u < 4; u++) {
			x[u] = ok >> u & 1 ? x[u] * sl2 : -INFINITY;
			mx = fmaxf(mx, x[u]);
		}
		mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
		mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
		const float base = mx == -INFINITY ? 0.0f : mx; /* nothing valid yet */
		const float corr = ex2_fast(m - base);
		m = mx;
		l *= corr;
#pragma unroll
		for (int j = 0; j < NJ; j++)
			o[j][0] *= corr, o[j][1] *= corr;
		float pr[4];
#pragma unroll
		for (int u = 0; u < 4; u++) {
			pr[u] = ex2_fast(x[u] - base);
			l += pr[u];
		}
		const uint32_t pa0 = pack2<T>(pr[0], pr[1]), pa2 = pack2<T>(pr[2], pr[3]);
#pragma unroll
		for (int j = 0; j < NJ; j++) {
			const uint32_t sel = j & 1 ? 0x7632 : 0x5410, w = j / 2;
			const uint32_t b0 = __byte_perm(word(vr[0][w / 4], w % 4), word(vr[1][w / 4], w % 4), sel);
			const uint32_t b1 = __byte_perm(word(vr[2][w / 4], w % 4), word(vr[3][w / 4], w % 4), sel);
			mma_16816<T>(o[j], pa0, pa2, b0, b1);
		}
		}
		__syncwarp(); /* every lane is done with the stage: it takes the next loads */
		if (issued < npass)
			issue(issued++);
	}
	/* The warps' results go into a stage no pass used, if there is one (then no
	 * warp waits for the slowest here), else into the first once every warp is done. */
	float *sm_acc = reinterpret_cast<float *>(stage0 + (npass < nst ? npass : 0) * cl_stage_bytes<D>());
	float *sm_m = sm_acc + CL_WARPS * GM * PD, *sm_l = sm_m + CL_WARPS * GM;
	if (npass >= nst)
		__syncthreads();
	l += __shfl_xor_sync(0xffffffffu, l, 1);
	l += __shfl_xor_sync(0xffffffffu, l, 2);
	/*
	 * Each warp's state into shared memory, a head's dims in the order the fragments
	 * hold them: index j*8 + e for dim e*D/8 + j (tile j, column e), thread c's two
	 * columns side by side, rows padded by 8 floats: one float2 store a tile and no
	 * bank conflict (dims in their own order cost a 16-way conflict on every store).
	 * The merges below keep this order up to the output.
	 */
	if (g < GM) {
		if (c == 0) {
			sm_m[warp * GM + g] = m;
			sm_l[warp * GM + g] = l;
		}
		float *acc = sm_acc + (warp * GM + g) * PD + 2 * c;
#pragma unroll
		for (int j = 0; j < NJ; j++)
			*reinterpret_cast<float2 *>(acc + j * 8) = make_float2(o[j][0], o[j][1]);
	}
	__syncthreads();
	/* the block's result: into the first block's shared memory (st.async, counted by
	 * its barrier) or, in the first block, its own */
	const uint32_t bar0 = cl_map(smem_addr(&cl_bar), 0), acc0 = cl_map(smem_addr(cl_acc), 0);
	const uint32_t m0 = cl_map(smem_addr(cl_m), 0), l0 = cl_map(smem_addr(cl_l), 0);
	if (b)
		cl_wait(); /* the first block's barrier is set up */
	for (int x = threadIdx.x; x < GM * D; x += CL_THREADS) {
		const int h = x / D, i = x % D;
		if (h >= gn)
			continue;
		float M = -INFINITY, S = 0, A = 0;
#pragma unroll
		for (int t = 0; t < CL_WARPS; t++)
			M = fmaxf(M, sm_m[t * GM + h]);
		if (M > -INFINITY) {
#pragma unroll
			for (int t = 0; t < CL_WARPS; t++) {
				const float w = exp2f(sm_m[t * GM + h] - M);
				S += sm_l[t * GM + h] * w;
				A += sm_acc[(t * GM + h) * PD + i] * w;
			}
		}
		const uint32_t k = b * GM + h;
		if (b) {
			cl_send(acc0 + (k * D + i) * 4, A, bar0);
			if (i == 0) {
				cl_send(m0 + k * 4, M, bar0);
				cl_send(l0 + k * 4, S, bar0);
			}
		} else {
			cl_acc[k * D + i] = A;
			if (i == 0) {
				cl_m[k] = M;
				cl_l[k] = S;
			}
		}
	}
	if (b)
		return; /* its st.async stores land on their own */
	if (threadIdx.x == 0)
		mbar_expect(&cl_bar, (C - 1) * gn * (D + 2) * 4);
	cl_wait();
	mbar_wait(&cl_bar, 0); /* every other block's result has landed */
	__syncthreads();       /* and this block's own */
	for (int x = threadIdx.x; x < GM * D; x += CL_THREADS) {
		const int h = x / D, i = x % D;
		if (h >= gn)
			continue;
		float M = -INFINITY, S = 0, A = 0;
		for (uint32_t t = 0; t < C; t++)
			M = fmaxf(M, cl_m[t * GM + h]);
		if (M > -INFINITY) {
			for (uint32_t t = 0; t < C; t++) {
				const float w = exp2f(cl_m[t * GM + h] - M);
				S += cl_l[t * GM + h] * w;
				A += cl_acc[(t * GM + h) * D + i] * w;
			}
		}
		const int d = (i % 8) * (D / 8) + i / 8;
		if (i == 0 && a.lse)
			a.lse[(size_t)r * G + g0 + h] = S > 0 ? (M + log2f(S)) * KVT_LN2 : -INFINITY;
		att_est_fold(a, r, g0 + h, d, M, S, A);
		T *out = static_cast<T *>(a.out) + ((size_t)r * G + g0 + h) * D + d;
		kvt_store1(out, S > 0 ? A / S : 0.0f);
	}
	}
#endif
}

/*
 * How many clusters of 2^i blocks can be resident at once (i = 0..4), 0 where that
 * size cannot run. Probed once per kernel (a process drives one GPU).
 */
struct cl_fit {
	int active[5];
	uint32_t stages[5]; /* stages that fit beside the merge's memory */
};

/* Stages (at most three: a sparse step's block takes two or three passes) that fit in
 * `optin` bytes of shared memory with a cluster of c blocks; 0: none. */
template <int D, int GM> static uint32_t cl_stages(unsigned c, size_t optin)
{
	const size_t m = cl_merge_bytes<D, GM>(c);
	const size_t n = optin > m ? (optin - m) / cl_stage_bytes<D>() : 0;
	return n < 3 ? (uint32_t)n : 3;
}

template <typename T, int D, int GM> static const cl_fit &cluster_fit()
{
	static const cl_fit fit = [] {
		cl_fit f = {};
		auto k = attend_cluster_kernel<T, D, GM>;
		/* the dynamic shared memory a block may have: the opt-in limit less the
		 * kernel's static shared memory (the workspace merge's flag) */
		int dev = 0, optin = 0;
		cudaFuncAttributes fa = {};
		if (cudaGetDevice(&dev) != cudaSuccess ||
		    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) !=
			    cudaSuccess ||
		    cudaFuncGetAttributes(&fa, k) != cudaSuccess ||
		    (optin -= (int)fa.sharedSizeBytes) <= 0 ||
		    cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, optin) !=
			    cudaSuccess) {
			cudaGetLastError();
			return f;
		}
		if (cudaFuncSetAttribute(k, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) !=
		    cudaSuccess)
			cudaGetLastError(); /* then 8 at most */
		for (int i = 0; i < 5; i++) {
			cudaLaunchAttribute at = {};
			at.id = cudaLaunchAttributeClusterDimension;
			at.val.clusterDim.x = 1u << i;
			at.val.clusterDim.y = at.val.clusterDim.z = 1;
			cudaLaunchConfig_t cfg = {};
			cfg.gridDim = dim3(1u << i, 1, 1);
			cfg.blockDim = dim3(CL_THREADS, 1, 1);
			f.stages[i] = cl_stages<D, GM>(1u << i, (size_t)optin);
			if (!f.stages[i])
				continue;
			cfg.dynamicSmemBytes = cl_smem_bytes<D, GM>(1u << i, f.stages[i]);
			cfg.attrs = &at;
			cfg.numAttrs = 1;
			if (cudaOccupancyMaxActiveClusters(&f.active[i], k, &cfg) != cudaSuccess) {
				cudaGetLastError();
				f.active[i] = 0;
			}
		}
		return f;
	}();
	return fit;
}

enum att_kernel { ATT_AUTO, ATT_SPLIT, ATT_CLUSTER };

/* KVT_ATTEND_KERNEL=split|cluster forces one kernel (tests and tuning), and with
 * cluster, KVT_ATTEND_CLUSTER=N a cluster size (up to what the GPU allows). */
static att_kernel forced_kernel()
{
	const char *k = getenv("KVT_ATTEND_KERNEL");
	if (k && !strcmp(k, "split"))
		return ATT_SPLIT;
	if (k && !strcmp(k, "cluster"))
		return ATT_CLUSTER;
	return ATT_AUTO;
}

/*
 * The cluster size for this launch, or 0 for the split kernel (-1: the cluster kernel
 * was forced and cannot launch). The cluster kernel serves 16-bit K/V with D of 64 or
 * 128 on sm_90. Auto takes it where every cluster is resident at once and a block's
 * share of a row is at most four passes (a sparse step at small batch); longer rows
 * or more of them are served better by the split kernel's many small blocks. The
 * size: the smallest power of two that takes a row in one pass, or the largest that
 * keeps every cluster resident. (Two to eight clusters a row, merged through a
 * workspace, so that a batch-1 step has every SM: slower at every split, 12.3 to
 * 19.6 us against 10.0, H100.)
 */
template <typename T, int D, int GM>
static int pick_cluster(const kvt_attend_args &a, uint32_t hchunks, const kvt_cuda_ws *ws)
{
	const att_kernel k = forced_kernel();
	if (k == ATT_SPLIT || ws->cc_major < 9 || !mma_ok<T>::value || D > 128)
		return 0;
	const cl_fit &fit = cluster_fit<T, D, GM>();
	constexpr uint64_t TPP = CL_TPP;
	const uint64_t ent = (uint64_t)a.stride + 1, clusters = (uint64_t)a.rows * hchunks;
	if (k == ATT_CLUSTER) {
		const char *f = getenv("KVT_ATTEND_CLUSTER");
		int i = 4;
		while (i > 0 && (!fit.active[i] || (f && atoi(f) > 0 && (1 << i) > atoi(f))))
			i--;
		return fit.active[i] ? 1 << i : -1;
	}
	int best = -1;
	for (int i = 0; i < 5; i++) {
		if (!fit.active[i] || clusters > (uint64_t)fit.active[i])
			continue;
		best = i;
		if ((ent + (1u << i) - 1) / (1u << i) * a.g.page_tokens <= TPP)
			break;
	}
	if (best < 0 || (ent + (1u << best) - 1) / (1u << best) * a.g.page_tokens > 4 * TPP)
		return 0;
	return 1 << best;
}

template <typename T, int D, int GM>
static int attend_cluster(const kvt_attend_args &a, uint32_t hchunks, unsigned c, cudaStream_t s)
{
	cudaLaunchAttribute at = {};
	at.id = cudaLaunchAttributeClusterDimension;
	at.val.clusterDim.x = c;
	at.val.clusterDim.y = at.val.clusterDim.z = 1;
	cudaLaunchConfig_t cfg = {};
	cfg.gridDim = dim3(c, a.rows, hchunks);
	cfg.blockDim = dim3(CL_THREADS, 1, 1);
	const uint32_t nst = cluster_fit<T, D, GM>().stages[__builtin_ctz(c)];
	cfg.dynamicSmemBytes = cl_smem_bytes<D, GM>(c, nst);
	cfg.stream = s;
	cfg.attrs = &at;
	cfg.numAttrs = 1;
	return kvt_cuda_errno(cudaLaunchKernelEx(&cfg, attend_cluster_kernel<T, D, GM>, a, nst),
			      "attend (cluster)");
}

/* The split kernel's sizes and workspace. */
static int split_setup(att_launch &L, uint32_t gm, kvt_cuda_ws *ws, cudaStream_t s)
{
	const kvt_attend_args *a = &L.a;
	const uint32_t D = a->g.head_dim;
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
	if (L.splits <= 1)
		return 0;
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
	return 0;
}

template <typename T, int D, int GM>
static int attend_gm(const kvt_attend_args *a, uint32_t hchunks, kvt_cuda_ws *ws, cudaStream_t s)
{
	const int c = pick_cluster<T, D, GM>(*a, hchunks, ws);
	if (c > 0)
		return attend_cluster<T, D, GM>(*a, hchunks, (unsigned)c, s);
	if (c < 0) {
		kvt_err("compute", "attend: the cluster kernel was asked for and cannot launch");
		return -ENOTSUP;
	}
	att_launch L = {};
	L.a = *a;
	L.hchunks = hchunks;
	int ret = split_setup(L, GM, ws, s);
	if (ret < 0)
		return ret;
	dim3 grid(L.splits, L.a.rows, L.hchunks);
	attend_kernel<T, D, GM><<<grid, ATT_THREADS, 0, s>>>(L);
	return kvt_cuda_errno(cudaGetLastError(), "attend");
}

template <typename T, int D>
static int attend_d(const kvt_attend_args *a, uint32_t hchunks, kvt_cuda_ws *ws, cudaStream_t s)
{
	const uint32_t G = a->g.group;
	if (G <= 1)
		return attend_gm<T, D, 1>(a, hchunks, ws, s);
	if (G <= 2)
		return attend_gm<T, D, 2>(a, hchunks, ws, s);
	if (G <= 4)
		return attend_gm<T, D, 4>(a, hchunks, ws, s);
	return attend_gm<T, D, 8>(a, hchunks, ws, s);
}

int kvt_cuda_attend(const kvt_attend_args *a, kvt_cuda_ws *ws, cudaStream_t s)
{
	const uint32_t D = a->g.head_dim, G = a->g.group;
	if ((D != 64 && D != 128 && D != 256) || a->rows > 65535)
		return -EINVAL;
	const uint32_t gm = G <= 1 ? 1 : G <= 2 ? 2 : G <= 4 ? 4 : 8;
	const uint32_t hchunks = (G + gm - 1) / gm;
	if (hchunks > 65535)
		return -EINVAL;
	return kvt_dispatch_dtype_dim(a->g.dtype, D, [&](auto t, auto d) {
		return attend_d<decltype(t), decltype(d)::value>(a, hchunks, ws, s);
	});
}
