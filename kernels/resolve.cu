// SPDX-License-Identifier: MIT
/*
 * The small kernels of a client that picks its own pages (ipc/client.c, the fast
 * path): a table from a selection and the map of where pages are (resolve), the new
 * tokens into the pages still filling (put_rows), and the daemon's writes of that
 * map (scatter).
 */
#include "kernels/resolve.cuh"

/* A warp per row, then resolve_complete. */
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
	resolve_complete(a, &missing, &last);
}

int kvt_cuda_resolve(const kvt_resolve_args *a, cudaStream_t s)
{
	const uint32_t blocks = a->sync ? (a->rows + 7) / 8 : 1;
	resolve_kernel<<<blocks, 256, 0, s>>>(*a);
	return kvt_cuda_errno(cudaGetLastError(), "resolve");
}

/* The sequences of one launch: where each one's tokens go, in the launch's parameters
 * (size classes, so that one sequence does not carry 3 KB of them). */
template <uint32_t N> struct put_seqs {
	uint32_t pos[N];
	uint64_t slot0[N];
};

/* 16-byte pieces: a block per (sequence, token, head), a thread per piece of K and of V. */
template <uint32_t N>
__global__ void put_rows_kernel(const kvt_put_rows_args a, uint32_t pieces, const put_seqs<N> sq)
{
	const uint32_t per = a.ntok * a.heads;
	const uint32_t i = blockIdx.x / per, t = blockIdx.x % per / a.heads, h = blockIdx.x % a.heads;
	const size_t row = (size_t)pieces * 16, T = a.g.page_tokens;
	const size_t src = (((size_t)i * a.ntok + t) * a.heads + h) * row;
	const uint64_t slot = sq.slot0[i] + (uint64_t)h * (a.slot_stride ? a.slot_stride : 1);
	uint8_t *page = static_cast<uint8_t *>(a.pool) + slot * a.slot_bytes;
	const size_t pos = sq.pos[i] + t;
	for (uint32_t x = threadIdx.x; x < 2 * pieces; x += blockDim.x) {
		const bool v = x >= pieces;
		const uint32_t j = v ? x - pieces : x;
		const uint8_t *from = static_cast<const uint8_t *>(v ? a.v : a.k) + src + (size_t)j * 16;
		uint8_t *to = page + ((v ? T : 0) + pos) * row + (size_t)j * 16;
		*reinterpret_cast<uint4 *>(to) = *reinterpret_cast<const uint4 *>(from);
	}
}

template <uint32_t N>
static void put_rows_launch(const kvt_put_rows_args &a, uint32_t pieces, uint32_t i0, uint32_t n,
			    cudaStream_t s)
{
	put_seqs<N> sq;
	for (uint32_t i = 0; i < n; i++) {
		sq.pos[i] = a.nseq ? a.seq_pos[i0 + i] : a.pos0;
		sq.slot0[i] = a.nseq ? a.seq_slot0[i0 + i] : a.slot0;
	}
	kvt_put_rows_args b = a;
	const size_t skip = (size_t)i0 * a.ntok * a.heads * pieces * 16;
	b.k = static_cast<const uint8_t *>(a.k) + skip;
	b.v = static_cast<const uint8_t *>(a.v) + skip;
	put_rows_kernel<N><<<n * a.ntok * a.heads, pieces * 2 < 256 ? pieces * 2 : 256, 0, s>>>(b, pieces, sq);
}

int kvt_cuda_put_rows(const kvt_put_rows_args *a, cudaStream_t s)
{
	const size_t row = (size_t)a->g.head_dim * kvt_dtype_size(a->g.dtype);
	const uint32_t pieces = (uint32_t)(row / 16);
	if (row % 16 || ((uintptr_t)a->k | (uintptr_t)a->v | (uintptr_t)a->pool | a->slot_bytes) % 16)
		return -EINVAL;
	const uint32_t nseq = a->nseq ? a->nseq : 1;
	for (uint32_t i0 = 0; i0 < nseq;) {
		const uint32_t n = nseq - i0 < 256 ? nseq - i0 : 256;
		if (n == 1)
			put_rows_launch<1>(*a, pieces, i0, n, s);
		else if (n <= 16)
			put_rows_launch<16>(*a, pieces, i0, n, s);
		else
			put_rows_launch<256>(*a, pieces, i0, n, s);
		i0 += n;
	}
	return kvt_cuda_errno(cudaGetLastError(), "put_rows");
}

/* kvt_compute_put_async: the words in the launch's parameters, in size classes so that
 * a small put does not carry a 4 KB parameter block */
template <uint32_t N> struct put_words {
	uint32_t *dst;
	uint32_t n;
	uint32_t w[N];
};

template <uint32_t N> __global__ void put_words_kernel(const put_words<N> p)
{
	for (uint32_t i = threadIdx.x; i < p.n; i += blockDim.x)
		p.dst[i] = p.w[i];
}

template <uint32_t N> static int put_words_launch(uint32_t *dst, const uint32_t *src, uint32_t n,
						  cudaStream_t s)
{
	put_words<N> p;
	p.dst = dst;
	p.n = n;
	memcpy(p.w, src, (size_t)n * 4);
	put_words_kernel<N><<<1, n < 256 ? (n + 31) / 32 * 32 : 256, 0, s>>>(p);
	return kvt_cuda_errno(cudaGetLastError(), "put");
}

int kvt_cuda_put_words(uint32_t *dst, const uint32_t *src, size_t n, cudaStream_t s)
{
	static_assert(sizeof(put_words<KVT_PUT_CHUNK / 4>) <= 4096, "a launch's parameters");
	int ret = 0;
	for (size_t done = 0; done < n && ret == 0;) {
		const uint32_t k = n - done < KVT_PUT_CHUNK / 4 ? (uint32_t)(n - done) : KVT_PUT_CHUNK / 4;
		ret = k <= 64    ? put_words_launch<64>(dst + done, src + done, k, s)
		      : k <= 256 ? put_words_launch<256>(dst + done, src + done, k, s)
				 : put_words_launch<KVT_PUT_CHUNK / 4>(dst + done, src + done, k, s);
		done += k;
	}
	return ret;
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
