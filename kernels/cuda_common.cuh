/* SPDX-License-Identifier: MIT */
#ifndef KVT_KERNELS_CUDA_COMMON_CUH
#define KVT_KERNELS_CUDA_COMMON_CUH

/* Private to the cuda compute backend: vector loads, conversions, launchers. */

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <errno.h>
#include <stdint.h>

#include <type_traits>

#include "kernels/compute.h"

#define KVT_LOG2E 1.4426950408889634f
#define KVT_LN2 0.6931471805599453f

/* Raw 16-byte (or 32-byte) vectors, to issue loads before converting. */
template <typename T> struct kvt_raw8 {
	uint4 u;
	__device__ __forceinline__ void load(const T *p)
	{
		u = __ldg(reinterpret_cast<const uint4 *>(p));
	}
	__device__ __forceinline__ void zero()
	{
		u = make_uint4(0, 0, 0, 0);
	}
	__device__ __forceinline__ void to_float(float f[8]) const;
};

template <> __device__ __forceinline__ void kvt_raw8<__half>::to_float(float f[8]) const
{
	const __half2 *h = reinterpret_cast<const __half2 *>(&u);
#pragma unroll
	for (int i = 0; i < 4; i++) {
		float2 x = __half22float2(h[i]);
		f[2 * i] = x.x;
		f[2 * i + 1] = x.y;
	}
}

template <> __device__ __forceinline__ void kvt_raw8<__nv_bfloat16>::to_float(float f[8]) const
{
	const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&u);
#pragma unroll
	for (int i = 0; i < 4; i++) {
		float2 x = __bfloat1622float2(h[i]);
		f[2 * i] = x.x;
		f[2 * i + 1] = x.y;
	}
}

template <> struct kvt_raw8<float> {
	float4 a, b;
	__device__ __forceinline__ void load(const float *p)
	{
		a = __ldg(reinterpret_cast<const float4 *>(p));
		b = __ldg(reinterpret_cast<const float4 *>(p) + 1);
	}
	__device__ __forceinline__ void zero()
	{
		a = b = make_float4(0, 0, 0, 0);
	}
	__device__ __forceinline__ void to_float(float f[8]) const
	{
		f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w;
		f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
	}
};

/* Eight consecutive elements as floats; p is 16-byte aligned (32 for float). */
template <typename T> __device__ __forceinline__ void kvt_load8(const T *p, float f[8])
{
	kvt_raw8<T> r;
	r.load(p);
	r.to_float(f);
}

__device__ __forceinline__ void kvt_store8(__half *p, const float f[8])
{
	uint4 u;
	__half2 *h = reinterpret_cast<__half2 *>(&u);
#pragma unroll
	for (int i = 0; i < 4; i++)
		h[i] = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
	*reinterpret_cast<uint4 *>(p) = u;
}

__device__ __forceinline__ void kvt_store8(__nv_bfloat16 *p, const float f[8])
{
	uint4 u;
	__nv_bfloat162 *h = reinterpret_cast<__nv_bfloat162 *>(&u);
#pragma unroll
	for (int i = 0; i < 4; i++)
		h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
	*reinterpret_cast<uint4 *>(p) = u;
}

__device__ __forceinline__ void kvt_store8(float *p, const float f[8])
{
	reinterpret_cast<float4 *>(p)[0] = make_float4(f[0], f[1], f[2], f[3]);
	reinterpret_cast<float4 *>(p)[1] = make_float4(f[4], f[5], f[6], f[7]);
}

__device__ __forceinline__ void kvt_store1(__half *p, float v)
{
	*p = __float2half_rn(v);
}
__device__ __forceinline__ void kvt_store1(__nv_bfloat16 *p, float v)
{
	*p = __float2bfloat16_rn(v);
}
__device__ __forceinline__ void kvt_store1(float *p, float v)
{
	*p = v;
}

/* gn query heads from q (this lane's 8 dims of the first), pre-scaled for exp2;
 * zeros past gn. */
template <typename T, int D, int GM>
__device__ __forceinline__ void kvt_load_q(const T *q, int gn, float scale, float (&qf)[GM][8])
{
	const float qscale = scale * KVT_LOG2E;
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
}

/* Sum over groups of LPT consecutive lanes (xor shuffles; the whole warp takes part). */
template <int LPT> __device__ __forceinline__ float kvt_group_sum(float v)
{
#pragma unroll
	for (int o = LPT / 2; o; o >>= 1)
		v += __shfl_xor_sync(0xffffffffu, v, o);
	return v;
}

/* z[g] = q_g . k for each of GM heads: this lane's 8 dims of k against qf, summed over
 * the LPT lanes that hold the vector (every lane of the warp takes part). */
template <int LPT, int GM>
__device__ __forceinline__ void kvt_head_logits(const float (&qf)[GM][8], const float (&k)[8],
						float (&z)[GM])
{
#pragma unroll
	for (int g = 0; g < GM; g++) {
		float x = 0;
#pragma unroll
		for (int j = 0; j < 8; j++)
			x += qf[g][j] * k[j];
		z[g] = kvt_group_sum<LPT>(x);
	}
}

/* An empty online-softmax state of GM heads over a lane's 8 dims. */
template <int GM>
__device__ __forceinline__ void kvt_softmax_init(float (&m)[GM], float (&l)[GM], float (&acc)[GM][8])
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

/* Max over groups of LPT consecutive lanes (xor shuffles; the whole warp takes part). */
template <int LPT> __device__ __forceinline__ float kvt_group_max(float v)
{
#pragma unroll
	for (int o = LPT / 2; o; o >>= 1)
		v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
	return v;
}

/* Calls f with the element type of dtype as a template argument. */
template <typename F> static int kvt_dispatch_dtype(uint32_t dtype, F &&f)
{
	switch (dtype) {
	case KVT_F16:
		return f(__half());
	case KVT_BF16:
		return f(__nv_bfloat16());
	case KVT_F32:
		return f(float());
	default:
		return -EINVAL;
	}
}

/* Calls f(T(), std::integral_constant<int, D>()) for the element type of dtype and a head
 * dim D of 64, 128 or 256 (-EINVAL for others). */
template <typename F> static int kvt_dispatch_dtype_dim(uint32_t dtype, uint32_t head_dim, F &&f)
{
	return kvt_dispatch_dtype(dtype, [&](auto t) {
		switch (head_dim) {
		case 64:
			return f(t, std::integral_constant<int, 64>());
		case 128:
			return f(t, std::integral_constant<int, 128>());
		case 256:
			return f(t, std::integral_constant<int, 256>());
		default:
			return -EINVAL;
		}
	});
}

int kvt_cuda_errno(cudaError_t e, const char *what);

/* Workspace for split-K attention, owned by the backend object. */
struct kvt_cuda_ws {
	float *buf;
	size_t bytes;
	int *counters;
	size_t n_counters;
	int sms;
	int cc_major; /* compute capability: the cluster kernel needs 9 */
};

int kvt_cuda_summarize(const struct kvt_summarize_args *a, cudaStream_t s);
int kvt_cuda_score(const struct kvt_score_args *a, cudaStream_t s);
int kvt_cuda_select(const struct kvt_select_args *a, cudaStream_t s);
int kvt_cuda_attend(const struct kvt_attend_args *a, struct kvt_cuda_ws *ws, cudaStream_t s);
int kvt_cuda_resolve(const struct kvt_resolve_args *a, cudaStream_t s);
int kvt_cuda_put_rows(const struct kvt_put_rows_args *a, cudaStream_t s);
int kvt_cuda_scatter(int32_t *dst, const int32_t *pairs_dev, uint32_t n, cudaStream_t s);
int kvt_cuda_select_resolve(const struct kvt_select_args *a, const struct kvt_resolve_args *ra,
			    cudaStream_t s);
int kvt_cuda_put_words(uint32_t *dst, const uint32_t *src, size_t n, cudaStream_t s);
int kvt_cuda_estimate(const struct kvt_estimate_args *a, cudaStream_t s);

#endif
