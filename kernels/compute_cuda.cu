// SPDX-License-Identifier: MIT
/*
 * The cuda compute backend: the ops table over the kernels of summary.cu, select.cu,
 * attend.cu, resolve.cu and estimate.cu. Device memory comes from cudaMalloc; work goes to the caller's
 * stream or to the backend's own non-blocking one. CUDA errors become errno here.
 */
#include <errno.h>
#include <stdlib.h>

#include "daemon/alloc.h"
#include "daemon/log.h"
#include "kernels/compute_impl.h"
#include "kernels/cuda_common.cuh"

struct cuda_compute {
	kvt_compute base;
	cudaStream_t stream;
	kvt_cuda_ws ws;
	int32_t *pairs; /* scatter_i32's pairs on the device */
	uint32_t pairs_cap;
};

int kvt_cuda_errno(cudaError_t e, const char *what)
{
	if (e == cudaSuccess)
		return 0;
	kvt_err("compute", "cuda %s: %s", what, cudaGetErrorString(e));
	switch (e) {
	case cudaErrorMemoryAllocation:
		return -ENOMEM;
	case cudaErrorNoDevice:
	case cudaErrorInsufficientDriver:
	case cudaErrorInvalidDevice:
		return -ENODEV;
	case cudaErrorInvalidValue:
	case cudaErrorInvalidConfiguration:
		return -EINVAL;
	default:
		return -EIO;
	}
}

static cudaStream_t pick(cuda_compute *c, void *stream)
{
	return stream ? static_cast<cudaStream_t>(stream) : c->stream;
}

static int cuda_open(kvt_compute **out)
{
	int count = 0;
	if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
		cudaGetLastError();
		return -ENODEV;
	}
	auto *c = static_cast<cuda_compute *>(kvt_calloc(1, sizeof(cuda_compute)));
	if (!c)
		return -ENOMEM;
	int dev = 0, ret;
	cudaGetDevice(&dev);
	if ((ret = kvt_cuda_errno(cudaDeviceGetAttribute(&c->ws.sms, cudaDevAttrMultiProcessorCount,
							 dev),
				  "device attribute")) < 0 ||
	    (ret = kvt_cuda_errno(cudaDeviceGetAttribute(&c->ws.cc_major,
							 cudaDevAttrComputeCapabilityMajor, dev),
				  "device attribute")) < 0 ||
	    (ret = kvt_cuda_errno(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking),
				  "stream")) < 0) {
		kvt_free(c);
		return ret;
	}
	*out = &c->base;
	return 0;
}

static void cuda_close(kvt_compute *base)
{
	auto *c = reinterpret_cast<cuda_compute *>(base);
	cudaStreamSynchronize(c->stream);
	cudaFree(c->ws.buf);
	cudaFree(c->ws.counters);
	cudaFree(c->pairs);
	cudaStreamDestroy(c->stream);
	kvt_free(c);
}

static int cuda_alloc(kvt_compute *, size_t bytes, void **out)
{
	return kvt_cuda_errno(cudaMalloc(out, bytes ? bytes : 1), "malloc");
}

static void cuda_free(kvt_compute *, void *p)
{
	cudaFree(p);
}

static int cuda_upload(kvt_compute *base, void *dst, const void *src, size_t bytes)
{
	auto *c = reinterpret_cast<cuda_compute *>(base);
	int ret = kvt_cuda_errno(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, c->stream),
				 "upload");
	return ret < 0 ? ret : kvt_cuda_errno(cudaStreamSynchronize(c->stream), "upload");
}

static int cuda_download(kvt_compute *base, void *dst, const void *src, size_t bytes)
{
	auto *c = reinterpret_cast<cuda_compute *>(base);
	int ret = kvt_cuda_errno(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, c->stream),
				 "download");
	return ret < 0 ? ret : kvt_cuda_errno(cudaStreamSynchronize(c->stream), "download");
}

static int cuda_copy_async(kvt_compute *base, void *dst, const void *src, size_t bytes,
			   void *stream)
{
	auto *c = reinterpret_cast<cuda_compute *>(base);
	return kvt_cuda_errno(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, pick(c, stream)),
			      "copy");
}

static int cuda_host_alloc(kvt_compute *, size_t bytes, void **out)
{
	return kvt_cuda_errno(cudaMallocHost(out, bytes ? bytes : 1), "host alloc");
}

static void *cuda_stream(kvt_compute *base)
{
	return reinterpret_cast<cuda_compute *>(base)->stream;
}

static void cuda_host_free(kvt_compute *, void *p)
{
	cudaFreeHost(p);
}

static int cuda_memset(kvt_compute *base, void *dst, int byte, size_t bytes)
{
	auto *c = reinterpret_cast<cuda_compute *>(base);
	int ret = kvt_cuda_errno(cudaMemsetAsync(dst, byte, bytes, c->stream), "memset");
	return ret < 0 ? ret : kvt_cuda_errno(cudaStreamSynchronize(c->stream), "memset");
}

static int cuda_summarize(kvt_compute *base, const kvt_summarize_args *a, void *stream)
{
	return kvt_cuda_summarize(a, pick(reinterpret_cast<cuda_compute *>(base), stream));
}

static int cuda_score(kvt_compute *base, const kvt_score_args *a, void *stream)
{
	return kvt_cuda_score(a, pick(reinterpret_cast<cuda_compute *>(base), stream));
}

static int cuda_select(kvt_compute *base, const kvt_select_args *a, void *stream)
{
	return kvt_cuda_select(a, pick(reinterpret_cast<cuda_compute *>(base), stream));
}

static int cuda_attend(kvt_compute *base, const kvt_attend_args *a, void *stream)
{
	auto *c = reinterpret_cast<cuda_compute *>(base);
	return kvt_cuda_attend(a, &c->ws, pick(c, stream));
}

static int cuda_resolve(kvt_compute *base, const kvt_resolve_args *a, void *stream)
{
	return kvt_cuda_resolve(a, pick(reinterpret_cast<cuda_compute *>(base), stream));
}

static int cuda_put_rows(kvt_compute *base, const kvt_put_rows_args *a, void *stream)
{
	return kvt_cuda_put_rows(a, pick(reinterpret_cast<cuda_compute *>(base), stream));
}

static int cuda_estimate(kvt_compute *base, const kvt_estimate_args *a, void *stream)
{
	return kvt_cuda_estimate(a, pick(reinterpret_cast<cuda_compute *>(base), stream));
}

static int cuda_scatter_i32(kvt_compute *base, int32_t *dst, const int32_t *pairs, uint32_t n)
{
	auto *c = reinterpret_cast<cuda_compute *>(base);
	if (n > c->pairs_cap) {
		uint32_t cap = n < 4096 ? 4096 : n;
		cudaFree(c->pairs);
		c->pairs = NULL;
		c->pairs_cap = 0;
		int ret = kvt_cuda_errno(cudaMalloc(&c->pairs, (size_t)cap * 2 * sizeof(int32_t)),
					 "malloc");
		if (ret < 0)
			return ret;
		c->pairs_cap = cap;
	}
	int ret = kvt_cuda_errno(cudaMemcpyAsync(c->pairs, pairs, (size_t)n * 2 * sizeof(int32_t),
						 cudaMemcpyHostToDevice, c->stream), "scatter");
	if (ret == 0)
		ret = kvt_cuda_scatter(dst, c->pairs, n, c->stream);
	int sret = kvt_cuda_errno(cudaStreamSynchronize(c->stream), "scatter");
	return ret < 0 ? ret : sret;
}

static int cuda_select_resolve(kvt_compute *base, const kvt_select_args *s,
			       const kvt_resolve_args *r, void *stream)
{
	return kvt_cuda_select_resolve(s, r, pick(reinterpret_cast<cuda_compute *>(base), stream));
}

static int cuda_put_async(kvt_compute *base, void *dst, const void *src, size_t bytes,
			  void *stream)
{
	return kvt_cuda_put_words(static_cast<uint32_t *>(dst), static_cast<const uint32_t *>(src),
				  bytes / 4, pick(reinterpret_cast<cuda_compute *>(base), stream));
}

static int cuda_sync(kvt_compute *base, void *stream)
{
	auto *c = reinterpret_cast<cuda_compute *>(base);
	return kvt_cuda_errno(cudaStreamSynchronize(pick(c, stream)), "sync");
}

extern "C" const kvt_compute_ops kvt_compute_cuda_ops = {
	"cuda",
	KVT_COMPUTE_OPS_VERSION,
	cuda_open,
	cuda_close,
	cuda_alloc,
	cuda_free,
	cuda_upload,
	cuda_download,
	cuda_memset,
	cuda_summarize,
	cuda_score,
	cuda_select,
	cuda_attend,
	cuda_sync,
	cuda_copy_async,
	cuda_host_alloc,
	cuda_host_free,
	cuda_stream,
	cuda_resolve,
	cuda_put_rows,
	cuda_scatter_i32,
	cuda_estimate,
	cuda_select_resolve,
	cuda_put_async,
};
