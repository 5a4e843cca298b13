// SPDX-License-Identifier: MIT
/*
 * kvtier-bench-select: the time of one layer's selection kernels, alone and together,
 * at a batch-1 Llama-3.1-8B layer (8 rows, 4 query heads each, D 128, bf16, page 64):
 * Quest scores, top-k, and the estimate of the pages left out (kvt_estimate; also over
 * rows of no page, the same launch: its fixed cost), at 512,
 * 2048 and 8192 pages a row (32K, 128K, 512K tokens). "queued": N calls back to back,
 * one synchronisation (the device's time once launches keep up); "waited": each call
 * synchronised (what one costs with its launch and the wait).
 *
 *   kvtier-bench-select [-d cpu|cuda] [-n CALLS]
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kernels/compute.h"

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

struct bufs {
	void *sums, *q;
	int32_t *nf, *sel, *ns, *out, *nout, *zero;
	float *est, *work, *scores;
	uint32_t *sync;
};

static void *dev(struct kvt_compute *c, size_t n)
{
	void *p = NULL;
	if (kvt_compute_alloc(c, n, &p) < 0) {
		fprintf(stderr, "kvtier-bench-select: out of %s memory\n", kvt_compute_name(c));
		exit(1);
	}
	return p;
}

enum { E_SCORE, E_SELECT, E_EST, E_EST0, E_ALL2, E_ALL3, E_N };
static const char *const ename[E_N] = {"score", "select (top-k)", "estimate",
				       "estimate, rows empty", "score + select",
				       "score + select + estimate"};

static int run(struct kvt_compute *c, int which, struct kvt_score_args *s,
	       struct kvt_select_args *se, struct kvt_estimate_args *e, const int32_t *zero)
{
	int ret = 0;
	if (which == E_EST0) { /* the same launch over rows of no page: its fixed cost */
		struct kvt_estimate_args e0 = *e;
		e0.n_full = zero;
		return kvt_estimate(c, &e0, NULL);
	}
	if (which == E_SCORE || which == E_ALL2 || which == E_ALL3)
		ret = kvt_score(c, s, NULL);
	if (!ret && (which == E_SELECT || which == E_ALL2 || which == E_ALL3))
		ret = kvt_select(c, se, NULL);
	if (!ret && (which == E_EST || which == E_ALL3))
		ret = kvt_estimate(c, e, NULL);
	return ret;
}

int main(int argc, char **argv)
{
	const char *name = NULL;
	int n = 300, o;
	while ((o = getopt(argc, argv, "d:n:h")) != -1) {
		if (o == 'd')
			name = optarg;
		else if (o == 'n' && atoi(optarg) > 0)
			n = atoi(optarg);
		else {
			fprintf(o == 'h' ? stdout : stderr, "usage: kvtier-bench-select [-d cpu|cuda] [-n CALLS]\n");
			return o == 'h' ? 0 : 2;
		}
	}
	struct kvt_compute *c;
	int ret = kvt_compute_open(name, &c);
	if (ret < 0) {
		fprintf(stderr, "kvtier-bench-select: no compute backend: %s\n", strerror(-ret));
		return 1;
	}
	const uint32_t D = 128, G = 4, T = 64, rows = 8, budget = 32;
	const struct kvt_geom g = {.head_dim = D, .page_tokens = T, .group = G, .dtype = KVT_BF16};
	const size_t rec = kvt_summary_record_bytes(&g);
	printf("kvtier-bench-select: %s, %u rows x %u query heads, D %u, bf16, page %u, top %u\n",
	       kvt_compute_name(c), rows, G, D, T, budget);
	for (uint32_t P = 512; P <= 8192; P *= 4) {
		struct bufs b;
		const size_t sb = (size_t)rows * P * rec;
		uint16_t *h = malloc(sb);
		int32_t hn[8], hs[8 * 32], hns[8];
		if (!h)
			return 1;
		srand(1);
		for (size_t i = 0; i < sb / 2; i++) /* bf16 around 1 */
			h[i] = (uint16_t)(0x3f80 ^ (rand() & 0x7f));
		for (uint32_t r = 0; r < rows; r++) {
			hn[r] = (int32_t)P;
			hns[r] = (int32_t)budget;
			for (uint32_t i = 0; i < budget; i++)
				hs[r * budget + i] = (int32_t)(i * P / budget);
		}
		b.sums = dev(c, sb);
		b.q = dev(c, (size_t)rows * G * D * 2);
		b.nf = dev(c, sizeof(hn));
		b.ns = dev(c, sizeof(hns));
		b.sel = dev(c, sizeof(hs));
		b.est = dev(c, (size_t)rows * G * (D + 2) * 4);
		b.work = dev(c, kvt_estimate_work_bytes(&g, rows, P));
		b.sync = dev(c, (size_t)rows * G * 4);
		b.scores = dev(c, (size_t)rows * P * 4);
		b.out = dev(c, (size_t)rows * budget * 4);
		b.nout = dev(c, rows * 4);
		b.zero = dev(c, rows * 4);
		if (kvt_compute_upload(c, b.sums, h, sb) < 0 || kvt_compute_upload(c, b.nf, hn, sizeof(hn)) < 0 ||
		    kvt_compute_upload(c, b.ns, hns, sizeof(hns)) < 0 ||
		    kvt_compute_upload(c, b.sel, hs, sizeof(hs)) < 0 ||
		    kvt_compute_memset(c, b.q, 0x3c, (size_t)rows * G * D * 2) < 0 ||
		    kvt_compute_memset(c, b.sync, 0, (size_t)rows * G * 4) < 0 ||
		    kvt_compute_memset(c, b.zero, 0, rows * 4) < 0)
			return 1;
		free(h);
		struct kvt_score_args s = {.g = g, .method = KVT_SCORE_QUEST, .agg = KVT_GQA_MAX,
					   .rows = rows, .stride = P, .q = b.q, .summaries = b.sums,
					   .n_pages = b.nf, .scores = b.scores};
		struct kvt_select_args se = {
			.mode = KVT_SELECT_TOPK, .rows = rows, .stride = P, .out_stride = budget,
			.budget_pages = budget, .page_tokens = T, .sink_tokens = 64, .window_tokens = 256,
			.logit_scale = 0.088f, .scores = b.scores, .n_pages = b.nf, .out = b.out,
			.n_out = b.nout};
		struct kvt_estimate_args e = {
			.g = g, .rows = rows, .max_pages = P, .scale = 0.088f, .sum_stride = P, .q = b.q,
			.summaries = b.sums, .n_full = b.nf, .stride = budget, .sel = b.sel,
			.n_sel = b.ns, .est = b.est, .work = b.work, .sync = b.sync};
		for (int w = 0; w < 20; w++)
			if ((ret = run(c, E_ALL3, &s, &se, &e, b.zero)) < 0) {
				fprintf(stderr, "kvtier-bench-select: %s\n", strerror(-ret));
				return 1;
			}
		kvt_compute_sync(c, NULL);
		for (int k = 0; k < E_N; k++) {
			double us[2]; /* queued back to back, one sync; each waited for */
			for (int each = 0; each < 2; each++) {
				double t0 = now();
				for (int i = 0; i < n; i++)
					if (run(c, k, &s, &se, &e, b.zero) == 0 && each)
						kvt_compute_sync(c, NULL);
				kvt_compute_sync(c, NULL);
				us[each] = (now() - t0) / n * 1e6;
			}
			printf("%5u pages/row  %-26s queued %8.2f us  waited %8.2f us\n", P, ename[k],
			       us[0], us[1]);
		}
		void *bufs[] = {b.sums, b.q, b.nf, b.ns, b.sel, b.est,
				b.work, b.sync, b.scores, b.out, b.nout, b.zero};
		for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++)
			kvt_compute_free(c, bufs[i]);
	}
	kvt_compute_close(c);
	return 0;
}
