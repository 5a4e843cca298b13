/* SPDX-License-Identifier: MIT */
#ifndef KVT_KERNELS_COMPUTE_IMPL_H
#define KVT_KERNELS_COMPUTE_IMPL_H

/* For backend implementers: the ops table behind kernels/compute.h. */

#include "kernels/compute.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KVT_COMPUTE_OPS_VERSION 5

struct kvt_compute_ops {
	const char *name;
	unsigned version;
	int (*open)(struct kvt_compute **out);
	void (*close)(struct kvt_compute *c);
	int (*alloc)(struct kvt_compute *c, size_t bytes, void **out);
	void (*free)(struct kvt_compute *c, void *p);
	int (*upload)(struct kvt_compute *c, void *dst, const void *src, size_t bytes);
	int (*download)(struct kvt_compute *c, void *dst, const void *src, size_t bytes);
	int (*memset)(struct kvt_compute *c, void *dst, int byte, size_t bytes);
	int (*summarize)(struct kvt_compute *c, const struct kvt_summarize_args *a, void *stream);
	int (*score)(struct kvt_compute *c, const struct kvt_score_args *a, void *stream);
	int (*select)(struct kvt_compute *c, const struct kvt_select_args *a, void *stream);
	int (*attend)(struct kvt_compute *c, const struct kvt_attend_args *a, void *stream);
	int (*sync)(struct kvt_compute *c, void *stream);
	/* ordered with the stream's kernels; done when a sync of the stream returns */
	int (*copy_async)(struct kvt_compute *c, void *dst, const void *src, size_t bytes,
			  void *stream);
	/* host memory the device copies to and from at full speed (pinned) */
	int (*host_alloc)(struct kvt_compute *c, size_t bytes, void **out);
	void (*host_free)(struct kvt_compute *c, void *p);
	/* the backend's own stream (NULL on cpu) */
	void *(*stream)(struct kvt_compute *c);
	int (*resolve)(struct kvt_compute *c, const struct kvt_resolve_args *a, void *stream);
	int (*put_rows)(struct kvt_compute *c, const struct kvt_put_rows_args *a, void *stream);
	int (*scatter_i32)(struct kvt_compute *c, int32_t *dst, const int32_t *pairs, uint32_t n);
	int (*estimate)(struct kvt_compute *c, const struct kvt_estimate_args *a, void *stream);
	/* kvt_select_resolve in one call, or NULL: the two calls */
	int (*select_resolve)(struct kvt_compute *c, const struct kvt_select_args *s,
			      const struct kvt_resolve_args *r, void *stream);
	/* kvt_compute_put_async: src read before it returns */
	int (*put_async)(struct kvt_compute *c, void *dst, const void *src, size_t bytes,
			 void *stream);
};

/* Every backend's object starts with this. */
struct kvt_compute {
	const struct kvt_compute_ops *ops;
};

extern const struct kvt_compute_ops kvt_compute_cpu_ops;
#if defined(HAVE_CUDA) && HAVE_CUDA
extern const struct kvt_compute_ops kvt_compute_cuda_ops;
#endif

/* Host-side argument checks shared by the backends (0 or -EINVAL). */
int kvt_check_summarize(const struct kvt_summarize_args *a);
int kvt_check_score(const struct kvt_score_args *a);
int kvt_check_select(const struct kvt_select_args *a);
int kvt_check_attend(const struct kvt_attend_args *a);

/* kvt_estimate's work area: [rows][chunks][group][D + 4] floats of block partials; a
 * chunk is every chunks-th span of KVT_EST_PPB pages of a row. */
#define KVT_EST_PPB 64u
#define KVT_EST_MAX_CHUNKS 64u
static inline uint32_t kvt_est_chunks(uint32_t max_pages)
{
	uint32_t c = max_pages ? (max_pages + KVT_EST_PPB - 1) / KVT_EST_PPB : 1;
	return c < KVT_EST_MAX_CHUNKS ? c : KVT_EST_MAX_CHUNKS;
}

#ifdef __CUDACC__
#define KVT_HD __host__ __device__
#else
#define KVT_HD
#endif

/* Window and sink page ranges of a row: pages [0, sinks) and [win0, n). */
static inline KVT_HD void kvt_forced_pages(uint32_t n, uint32_t tail, uint32_t T, uint32_t sink_tokens,
				    uint32_t window_tokens, uint32_t *sinks, uint32_t *win0)
{
	uint32_t s = (sink_tokens + T - 1) / T;
	*sinks = s < n ? s : n;
	uint64_t total = (uint64_t)n * T + tail;
	uint64_t first = total > window_tokens ? total - window_tokens : 0; /* first window token */
	uint64_t w = first / T;
	*win0 = w < n ? (uint32_t)w : n;
}

/* Orderable key of a float score: larger score, larger key; NaN lowest. */
static inline uint32_t kvt_score_key(float f)
{
	union {
		float f;
		uint32_t u;
	} v = {.f = f};
	if (f != f)
		return 0;
	return (v.u & 0x80000000u) ? ~v.u : v.u | 0x80000000u;
}

#define KVT_KEY_FORCED 0xffffffffu

#ifdef __cplusplus
}
#endif

#endif
