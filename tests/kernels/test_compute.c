// SPDX-License-Identifier: MIT
/*
 * The compute backends against float64 references written here: summaries, scores,
 * top-k/top-p selection and paged decode attention, on random inputs of odd sizes,
 * with outputs poisoned beforehand to prove full coverage (and no stray writes).
 * Built twice: test_kernels runs the cpu backend; test_kernels_gpu runs cuda (exit
 * 77 without a GPU) and also checks cuda against cpu.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/compute.h"
#include "kernels/compute_impl.h"
#include "kernels/dtype.h"

#ifndef BACKEND
#define BACKEND "cpu"
#endif

static struct kvt_compute *C;   /* backend under test */
static struct kvt_compute *CPU; /* oracle twin (same as C for the cpu build) */

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static double urand(void) /* [0, 1) */
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return (double)(rng >> 11) * (1.0 / 9007199254740992.0);
}
static double srand1(void)
{
	return 2 * urand() - 1;
}

static double tol_of(uint32_t dt)
{
	return dt == KVT_F32 ? 1e-5 : dt == KVT_F16 ? 2e-3 : 1e-2;
}

/* Random elements in dtype; returns the buffer, values exactly representable. */
static void *rand_elems(size_t n, uint32_t dt, double amp)
{
	void *p = malloc(n * kvt_dtype_size(dt) + 64);
	assert_non_null(p);
	for (size_t i = 0; i < n; i++)
		kvt_store_elem(p, i, dt, (float)(amp * srand1()));
	return p;
}

static void *dev_dup(struct kvt_compute *c, const void *h, size_t bytes)
{
	void *d;
	assert_int_equal(kvt_compute_alloc(c, bytes ? bytes : 1, &d), 0);
	if (bytes)
		assert_int_equal(kvt_compute_upload(c, d, h, bytes), 0);
	return d;
}

static void fetch(struct kvt_compute *c, void *h, void *d, size_t bytes)
{
	assert_int_equal(kvt_compute_sync(c, NULL), 0);
	assert_int_equal(kvt_compute_download(c, h, d, bytes), 0);
	kvt_compute_free(c, d);
}

/* ---- summaries ---- */

static void run_summarize(struct kvt_compute *c, const struct kvt_geom *g, const void *pool,
			  size_t pool_bytes, uint64_t slot_bytes, const int32_t *slots,
			  const int32_t *recs, uint32_t n, void *sums, size_t sum_bytes)
{
	struct kvt_summarize_args a = {
		.g = *g,
		.pool = dev_dup(c, pool, pool_bytes),
		.slot_bytes = slot_bytes,
		.slots = dev_dup(c, slots, n * 4),
		.records = dev_dup(c, recs, n * 4),
		.summaries = dev_dup(c, sums, sum_bytes),
		.n = n,
	};
	assert_int_equal(kvt_summarize(c, &a, NULL), 0);
	fetch(c, sums, a.summaries, sum_bytes);
	kvt_compute_free(c, (void *)a.pool);
	kvt_compute_free(c, (void *)a.slots);
	kvt_compute_free(c, (void *)a.records);
}

static void summaries_case(uint32_t D, uint32_t T, uint32_t R, uint32_t dt)
{
	struct kvt_geom g = {.head_dim = D, .page_tokens = T, .group = 1, .reps = R, .dtype = dt};
	const uint32_t n = 37, nslots = 53, nrec = 61;
	const size_t es = kvt_dtype_size(dt);
	const uint64_t slot_bytes = 2ull * T * D * es + 256; /* a padded stride */
	size_t pool_bytes = nslots * slot_bytes;
	void *pool = rand_elems(pool_bytes / es, dt, 2.0);
	int32_t slots[37], recs[37];
	for (uint32_t i = 0; i < n; i++) {
		slots[i] = (int32_t)((i * 17 + 5) % nslots);
		recs[i] = (int32_t)((i * 23 + 3) % nrec);
	}
	const size_t rec = kvt_summary_record_bytes(&g);
	void *sums = malloc(nrec * rec);
	memset(sums, 0xff, nrec * rec);
	run_summarize(C, &g, pool, pool_bytes, slot_bytes, slots, recs, n, sums, nrec * rec);
	uint8_t *written = calloc(nrec, 1);
	for (uint32_t i = 0; i < n; i++) {
		written[recs[i]] = 1;
		const uint8_t *k = (const uint8_t *)pool + slots[i] * slot_bytes;
		const uint8_t *s = (const uint8_t *)sums + recs[i] * rec;
		for (uint32_t d = 0; d < D; d++) {
			double lo = INFINITY, hi = -INFINITY;
			for (uint32_t t = 0; t < T; t++) {
				double v = kvt_load_elem(k, (size_t)t * D + d, dt);
				lo = fmin(lo, v);
				hi = fmax(hi, v);
			}
			assert_true(kvt_load_elem(s, d, dt) == lo);
			assert_true(kvt_load_elem(s, D + d, dt) == hi);
			for (uint32_t r = 0; r < R; r++) {
				double m = 0;
				for (uint32_t t = r * (T / R); t < (r + 1) * (T / R); t++)
					m += kvt_load_elem(k, (size_t)t * D + d, dt);
				m /= T / R;
				double got = kvt_load_elem(s, (size_t)(2 + r) * D + d, dt);
				assert_true(fabs(got - m) <= tol_of(dt) * fmax(1.0, fabs(m)));
			}
			double km = 0, vm = 0; /* the page's mean key and mean value */
			for (uint32_t t = 0; t < T; t++) {
				km += kvt_load_elem(k, (size_t)t * D + d, dt);
				vm += kvt_load_elem(k, (size_t)(T + t) * D + d, dt);
			}
			km /= T;
			vm /= T;
			assert_true(fabs(kvt_load_elem(s, (size_t)(2 + R) * D + d, dt) - km) <=
				    tol_of(dt) * fmax(1.0, fabs(km)));
			assert_true(fabs(kvt_load_elem(s, (size_t)(3 + R) * D + d, dt) - vm) <=
				    tol_of(dt) * fmax(1.0, fabs(vm)));
		}
	}
	for (uint32_t i = 0; i < nrec; i++) /* untouched records keep the poison */
		if (!written[i])
			for (size_t b = 0; b < rec; b++)
				assert_int_equal(((uint8_t *)sums)[i * rec + b], 0xff);
	free(written);
	free(sums);
	free(pool);
}

static void test_summaries(void **state)
{
	summaries_case(64, 16, 4, KVT_F16);
	summaries_case(128, 64, 4, KVT_BF16);
	summaries_case(256, 48, 3, KVT_F32);
	summaries_case(128, 32, 0, KVT_BF16);
	summaries_case(64, 17, 1, KVT_F32);
}

/* ---- scores ---- */

struct score_case {
	uint32_t D, R, G, dt, method, agg, rows, stride;
	int indexed;
};

static void run_score(struct kvt_compute *c, const struct kvt_score_args *h, size_t nrec,
		      float *scores)
{
	const size_t es = kvt_dtype_size(h->g.dtype), rs = (size_t)h->rows * h->stride;
	struct kvt_score_args a = *h;
	a.q = dev_dup(c, h->q, (size_t)h->rows * h->g.group * h->g.head_dim * es);
	a.summaries = dev_dup(c, h->summaries, nrec * kvt_summary_record_bytes(&h->g));
	a.sum_index = h->sum_index ? dev_dup(c, h->sum_index, rs * 4) : NULL;
	a.n_pages = dev_dup(c, h->n_pages, h->rows * 4);
	a.scores = dev_dup(c, scores, rs * 4);
	assert_int_equal(kvt_score(c, &a, NULL), 0);
	fetch(c, scores, a.scores, rs * 4);
	kvt_compute_free(c, (void *)a.q);
	kvt_compute_free(c, (void *)a.summaries);
	kvt_compute_free(c, (void *)a.sum_index);
	kvt_compute_free(c, (void *)a.n_pages);
}

static void score_case(const struct score_case *sc)
{
	const uint32_t D = sc->D, R = sc->R, G = sc->G, dt = sc->dt, rows = sc->rows;
	struct kvt_geom g = {.head_dim = D, .page_tokens = 16, .group = G, .reps = R, .dtype = dt};
	const size_t rs = (size_t)rows * sc->stride, nrec = rs + 7;
	const size_t es = kvt_dtype_size(dt), rec = kvt_summary_record_bytes(&g);
	void *q = rand_elems((size_t)rows * G * D, dt, 1.0);
	void *sums = malloc(nrec * rec);
	for (size_t i = 0; i < nrec; i++)
		for (uint32_t d = 0; d < D; d++) {
			double a = srand1(), b = srand1();
			uint8_t *s = (uint8_t *)sums + i * rec;
			kvt_store_elem(s, d, dt, (float)fmin(a, b));
			kvt_store_elem(s, D + d, dt, (float)fmax(a, b));
			for (uint32_t r = 0; r < R; r++)
				kvt_store_elem(s, (size_t)(2 + r) * D + d, dt, (float)srand1());
		}
	int32_t *idx = malloc(rs * 4), *np = malloc(rows * 4);
	for (size_t i = 0; i < rs; i++)
		idx[i] = (int32_t)((i * 7919 + 11) % nrec);
	for (uint32_t r = 0; r < rows; r++)
		np[r] = r == 0 ? 0 : r == 1 ? 1 : r == 2 ? (int32_t)sc->stride : (int32_t)(sc->stride * 2 / 3 + r);
	float *scores = malloc(rs * 4);
	memset(scores, 0xff, rs * 4);
	struct kvt_score_args a = {.g = g, .method = sc->method, .agg = sc->agg, .rows = rows,
				   .stride = sc->stride, .q = q, .summaries = sums,
				   .sum_index = sc->indexed ? idx : NULL, .n_pages = np,
				   .scores = scores};
	run_score(C, &a, nrec, scores);
	for (uint32_t r = 0; r < rows; r++)
		for (uint32_t p = 0; p < sc->stride; p++) {
			size_t i = (size_t)r * sc->stride + p;
			if (p >= (uint32_t)np[r]) {
				assert_true(isnan(scores[i])); /* past the row: untouched */
				continue;
			}
			const uint8_t *s = (const uint8_t *)sums + (sc->indexed ? (size_t)idx[i] : i) * rec;
			double agg = sc->agg == KVT_GQA_SUM ? 0 : -INFINITY, mag = 0;
			for (uint32_t h = 0; h < G; h++) {
				double v = sc->method == KVT_SCORE_QUEST ? 0 : -INFINITY;
				for (uint32_t j = 0; j < (sc->method == KVT_SCORE_QUEST ? 1 : R); j++) {
					double dot = 0;
					for (uint32_t d = 0; d < D; d++) {
						double qd = kvt_load_elem(q, ((size_t)r * G + h) * D + d, dt);
						if (sc->method == KVT_SCORE_QUEST) {
							double lo = qd * kvt_load_elem(s, d, dt);
							double hi = qd * kvt_load_elem(s, D + d, dt);
							dot += fmax(lo, hi);
							mag += fabs(fmax(lo, hi));
						} else {
							double x = qd * kvt_load_elem(s, (size_t)(2 + j) * D + d, dt);
							dot += x;
							mag += fabs(x);
						}
					}
					v = sc->method == KVT_SCORE_QUEST ? dot : fmax(v, dot);
				}
				agg = sc->agg == KVT_GQA_SUM ? agg + v : fmax(agg, v);
			}
			assert_false(isnan(scores[i]));
			if (fabs(scores[i] - agg) > 1e-5 * mag + 1e-6)
				fail_msg("row %u page %u: %g vs %g", r, p, scores[i], agg);
		}
	(void)es;
	free(q);
	free(sums);
	free(idx);
	free(np);
	free(scores);
}

static void test_scores(void **state)
{
	static const struct score_case cases[] = {
		{128, 4, 4, KVT_BF16, KVT_SCORE_QUEST, KVT_GQA_MAX, 5, 41, 1},
		{128, 4, 4, KVT_BF16, KVT_SCORE_QUEST, KVT_GQA_SUM, 5, 41, 0},
		{128, 4, 3, KVT_F16, KVT_SCORE_REPS, KVT_GQA_MAX, 3, 77, 1},
		{64, 2, 5, KVT_F32, KVT_SCORE_REPS, KVT_GQA_SUM, 4, 129, 1},
		{256, 1, 1, KVT_BF16, KVT_SCORE_QUEST, KVT_GQA_MAX, 6, 33, 1},
		{128, 2, 12, KVT_F16, KVT_SCORE_QUEST, KVT_GQA_MAX, 3, 19, 0},
		{64, 4, 8, KVT_BF16, KVT_SCORE_REPS, KVT_GQA_MAX, 4, 300, 1},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		score_case(&cases[i]);
}

/* Summaries and Quest scores of real pages: the bound holds for every token. */
static void test_quest_bound(void **state)
{
	const uint32_t D = 128, T = 32, G = 4, n = 29, dt = KVT_BF16;
	struct kvt_geom g = {.head_dim = D, .page_tokens = T, .group = G, .reps = 4, .dtype = dt};
	const uint64_t slot_bytes = 2ull * T * D * 2;
	void *pool = rand_elems(n * slot_bytes / 2, dt, 1.0);
	int32_t ids[29];
	for (uint32_t i = 0; i < n; i++)
		ids[i] = (int32_t)i;
	const size_t rec = kvt_summary_record_bytes(&g);
	void *sums = malloc(n * rec);
	run_summarize(C, &g, pool, n * slot_bytes, slot_bytes, ids, ids, n, sums, n * rec);
	void *q = rand_elems(G * D, dt, 1.0);
	float scores[29];
	int32_t np = (int32_t)n;
	for (uint32_t method = 0; method < KVT_SCORE_MAX; method++) {
		struct kvt_score_args a = {.g = g, .method = method, .agg = KVT_GQA_MAX, .rows = 1,
					   .stride = n, .q = q, .summaries = sums, .n_pages = &np,
					   .scores = scores};
		run_score(C, &a, n, scores);
		for (uint32_t p = 0; p < n; p++) {
			double best = -INFINITY;
			const uint8_t *k = (const uint8_t *)pool + p * slot_bytes;
			for (uint32_t h = 0; h < G; h++)
				for (uint32_t t = 0; t < T; t++) {
					double dot = 0;
					for (uint32_t d = 0; d < D; d++)
						dot += kvt_load_elem(q, h * D + d, dt) *
						       kvt_load_elem(k, (size_t)t * D + d, dt);
					best = fmax(best, dot);
				}
			if (method == KVT_SCORE_QUEST)
				assert_true(scores[p] >= best - 1e-4);
			else /* a mean of keys never beats the best key */
				assert_true(scores[p] <= best + 0.05);
		}
	}
	free(pool);
	free(sums);
	free(q);
}

/* ---- selection ---- */

static void run_select(struct kvt_compute *c, const struct kvt_select_args *h, int32_t *out,
		       int32_t *n_out)
{
	struct kvt_select_args a = *h;
	size_t rs = (size_t)h->rows * h->stride;
	a.scores = h->scores ? dev_dup(c, h->scores, rs * 4) : NULL;
	a.n_pages = dev_dup(c, h->n_pages, h->rows * 4);
	a.tail_len = h->tail_len ? dev_dup(c, h->tail_len, h->rows * 4) : NULL;
	a.slot_map = h->slot_map ? dev_dup(c, h->slot_map, rs * 4) : NULL;
	a.out = dev_dup(c, out, (size_t)h->rows * h->out_stride * 4);
	a.n_out = dev_dup(c, n_out, h->rows * 4);
	assert_int_equal(kvt_select(c, &a, NULL), 0);
	fetch(c, out, a.out, (size_t)h->rows * h->out_stride * 4);
	fetch(c, n_out, a.n_out, h->rows * 4);
	kvt_compute_free(c, (void *)a.scores);
	kvt_compute_free(c, (void *)a.n_pages);
	kvt_compute_free(c, (void *)a.tail_len);
	kvt_compute_free(c, (void *)a.slot_map);
}

/* Reference: forced pages, then the rest by (score desc, page asc). */
static int ref_cmp_scores(const float *sc, uint32_t a, uint32_t b)
{
	if (sc[a] != sc[b])
		return sc[a] > sc[b] ? -1 : 1;
	return a < b ? -1 : 1;
}

static void check_selection(const struct kvt_select_args *a, const int32_t *out,
			    const int32_t *n_out, uint32_t r)
{
	const uint32_t n = (uint32_t)a->n_pages[r], T = a->page_tokens;
	const uint32_t tail = a->tail_len ? (uint32_t)a->tail_len[r] : 0;
	const float *sc = a->scores + (size_t)r * a->stride;
	const int32_t *o = out + (size_t)r * a->out_stride;
	uint32_t k = (uint32_t)n_out[r];
	assert_true(k <= n);
	uint8_t *in = calloc(n + 1, 1);
	for (uint32_t i = 0; i < k; i++) {
		int32_t v = o[i];
		uint32_t p = a->slot_map ? (uint32_t)(v - 1000000) : (uint32_t)v;
		if (a->slot_map)
			assert_int_equal(a->slot_map[(size_t)r * a->stride + p], v);
		assert_true(p < n);
		if (i)
			assert_true(p > (uint32_t)(a->slot_map ? o[i - 1] - 1000000 : o[i - 1]));
		in[p] = 1;
	}
	for (uint32_t i = k; i < a->out_stride; i++)
		assert_int_equal(o[i], -7); /* nothing past n_out */
	/* forced: sinks and every full page holding one of the last W tokens */
	uint32_t forced = 0;
	uint64_t total = (uint64_t)n * T + tail;
	for (uint32_t p = 0; p < n; p++) {
		bool sink = (uint64_t)p * T < a->sink_tokens;
		bool win = (uint64_t)(p + 1) * T + a->window_tokens > total;
		if (sink || win) {
			assert_true(in[p]);
			forced++;
		}
	}
	if (a->mode == KVT_SELECT_TOPK) {
		uint32_t want = n <= a->budget_pages ? n : a->budget_pages > forced ? a->budget_pages : forced;
		assert_int_equal(k, want);
	}
	/* selected non-forced pages are the best: nothing left out beats one taken */
	for (uint32_t p = 0; p < n; p++) {
		bool sink = (uint64_t)p * T < a->sink_tokens;
		bool win = (uint64_t)(p + 1) * T + a->window_tokens > total;
		if (sink || win || !in[p])
			continue;
		for (uint32_t x = 0; x < n; x++) {
			bool xs = (uint64_t)x * T < a->sink_tokens;
			bool xw = (uint64_t)(x + 1) * T + a->window_tokens > total;
			if (!xs && !xw && !in[x])
				assert_true(ref_cmp_scores(sc, p, x) < 0);
		}
	}
	if (a->mode == KVT_SELECT_TOPP && n) {
		double m = -INFINITY, z = 0, mass = 0, low = INFINITY;
		for (uint32_t p = 0; p < n; p++)
			m = fmax(m, (double)a->logit_scale * sc[p]);
		for (uint32_t p = 0; p < n; p++) {
			double w = exp((double)a->logit_scale * sc[p] - m);
			z += w;
			if (in[p])
				mass += w;
		}
		uint32_t cap = a->budget_pages > forced ? a->budget_pages : forced;
		if (k < cap && k < n)
			assert_true(mass >= a->top_p * z * (1 - 1e-4));
		/* minimal: dropping the lowest-scored chosen (non-forced) key misses p */
		for (uint32_t p = 0; p < n; p++) {
			bool sink = (uint64_t)p * T < a->sink_tokens;
			bool win = (uint64_t)(p + 1) * T + a->window_tokens > total;
			if (in[p] && !sink && !win)
				low = fmin(low, sc[p]);
		}
		if (low < INFINITY) {
			double without = mass;
			for (uint32_t p = 0; p < n; p++) {
				bool sink = (uint64_t)p * T < a->sink_tokens;
				bool win = (uint64_t)(p + 1) * T + a->window_tokens > total;
				if (in[p] && !sink && !win && sc[p] == low)
					without -= exp((double)a->logit_scale * sc[p] - m);
			}
			assert_true(without < a->top_p * z * (1 + 1e-4));
		}
	}
	free(in);
}

static void select_case(uint32_t mode, uint32_t rows, uint32_t stride, uint32_t budget, float p,
			bool mapped, bool ties, uint32_t needles)
{
	const uint32_t T = 16, out_stride = budget + 12;
	size_t rs = (size_t)rows * stride;
	float *sc = malloc(rs * 4);
	int32_t *np = malloc(rows * 4), *tl = malloc(rows * 4), *map = malloc(rs * 4);
	int32_t *out = malloc((size_t)rows * out_stride * 4), *n_out = malloc(rows * 4);
	for (size_t i = 0; i < rs; i++) {
		sc[i] = ties ? (float)(int)(urand() * 8) : (float)srand1();
		map[i] = (int32_t)(1000000 + i % stride);
	}
	for (uint32_t r = 0; r < rows; r++) {
		np[r] = r == 0 ? (int32_t)stride : r == 1 ? (int32_t)(budget / 2) : r == 2 ? 0
			: (int32_t)(stride - 1 - r % 5);
		tl[r] = (int32_t)(r * 5 % T);
		for (uint32_t j = 0; j < needles && np[r] > 40; j++) /* planted high scorers */
			sc[(size_t)r * stride + 10 + (j * 37) % ((uint32_t)np[r] - 30)] = 50.0f + 0.01f * (float)j;
	}
	for (size_t i = 0; i < (size_t)rows * out_stride; i++)
		out[i] = -7;
	for (uint32_t r = 0; r < rows; r++)
		n_out[r] = -1;
	struct kvt_select_args a = {
		.mode = mode, .rows = rows, .stride = stride, .out_stride = out_stride,
		.budget_pages = budget, .page_tokens = T, .sink_tokens = 20, .window_tokens = 70,
		.top_p = p, .logit_scale = 2.0f, .scores = sc, .n_pages = np, .tail_len = tl,
		.slot_map = mapped ? map : NULL, .out = out, .n_out = n_out,
	};
	run_select(C, &a, out, n_out);
	/* planted needles share nearly all the mass: a top-p of 0.99 needs every one */
	if (mode == KVT_SELECT_TOPP && p < 0.99f)
		needles = 0;
	for (uint32_t r = 0; r < rows; r++) {
		check_selection(&a, out, n_out, r);
		for (uint32_t j = 0; j < needles && np[r] > 40; j++) {
			uint32_t pg = 10 + (j * 37) % ((uint32_t)np[r] - 30);
			bool found = false;
			for (int32_t i = 0; i < n_out[r]; i++)
				found |= (uint32_t)(out[(size_t)r * out_stride + i] - (mapped ? 1000000 : 0)) == pg;
			assert_true(found);
		}
	}
	if (CPU != C) { /* the same scores give the very same pages on cpu */
		int32_t *out2 = malloc((size_t)rows * out_stride * 4), *n2 = malloc(rows * 4);
		for (size_t i = 0; i < (size_t)rows * out_stride; i++)
			out2[i] = -7;
		a.out = out2;
		a.n_out = n2;
		run_select(CPU, &a, out2, n2);
		assert_memory_equal(n2, n_out, rows * 4);
		if (mode == KVT_SELECT_TOPK)
			assert_memory_equal(out2, out, (size_t)rows * out_stride * 4);
		free(out2);
		free(n2);
	}
	free(sc);
	free(np);
	free(tl);
	free(map);
	free(out);
	free(n_out);
}

static void test_select_topk(void **state)
{
	select_case(KVT_SELECT_TOPK, 5, 200, 16, 0, false, false, 6);
	select_case(KVT_SELECT_TOPK, 4, 1001, 64, 0, true, false, 20);
	select_case(KVT_SELECT_TOPK, 3, 333, 40, 0, false, true, 0);   /* ties: lower page wins */
	select_case(KVT_SELECT_TOPK, 3, 90, 3, 0, false, false, 0);    /* forced over budget */
	select_case(KVT_SELECT_TOPK, 2, 40000, 128, 0, false, false, 30); /* past the smem cache */
}

static void test_select_topp(void **state)
{
	const float ps[] = {0.0f, 0.3f, 0.9f, 0.99f, 1.0f};
	for (size_t i = 0; i < 5; i++) {
		select_case(KVT_SELECT_TOPP, 5, 257, 200, ps[i], false, false, 4);
		select_case(KVT_SELECT_TOPP, 3, 500, 20, ps[i], true, false, 0); /* capped */
	}
	select_case(KVT_SELECT_TOPP, 3, 300, 280, 0.8f, false, true, 0);
}

/* ---- attention ---- */

struct att_case {
	uint32_t D, T, G, dt, rows, stride;
	float qamp;
};

static void run_attend(struct kvt_compute *c, const struct kvt_attend_args *h, size_t pool_bytes,
		       void *out, float *lse)
{
	struct kvt_attend_args a = *h;
	const size_t es = kvt_dtype_size(h->g.dtype);
	const size_t qn = (size_t)h->rows * h->g.group * h->g.head_dim;
	a.q = dev_dup(c, h->q, qn * es);
	a.pool = dev_dup(c, h->pool, pool_bytes);
	a.table = dev_dup(c, h->table, (size_t)h->rows * h->stride * 4);
	a.n_pages = dev_dup(c, h->n_pages, h->rows * 4);
	a.tail_slot = dev_dup(c, h->tail_slot, h->rows * 4);
	a.tail_len = dev_dup(c, h->tail_len, h->rows * 4);
	a.out = dev_dup(c, out, qn * es);
	a.lse = dev_dup(c, lse, (size_t)h->rows * h->g.group * 4);
	if (h->tail_pool)
		a.tail_pool = dev_dup(c, h->tail_pool, (size_t)h->rows * h->slot_bytes);
	if (h->host_pool)
		a.host_pool = dev_dup(c, h->host_pool, pool_bytes / h->slot_bytes * h->host_slot_bytes);
	if (h->est)
		a.est = dev_dup(c, h->est, (size_t)h->rows * h->g.group * (h->g.head_dim + 2) * 4);
	for (int rep = 0; rep < 2; rep++) /* twice: the split counters must reset */
		assert_int_equal(kvt_attend(c, &a, NULL), 0);
	fetch(c, out, a.out, qn * es);
	fetch(c, lse, a.lse, (size_t)h->rows * h->g.group * 4);
	kvt_compute_free(c, (void *)a.q);
	kvt_compute_free(c, (void *)a.pool);
	kvt_compute_free(c, (void *)a.table);
	kvt_compute_free(c, (void *)a.n_pages);
	kvt_compute_free(c, (void *)a.tail_slot);
	kvt_compute_free(c, (void *)a.tail_len);
	if (a.tail_pool)
		kvt_compute_free(c, (void *)a.tail_pool);
	if (a.host_pool)
		kvt_compute_free(c, (void *)a.host_pool);
	if (a.est)
		kvt_compute_free(c, (void *)a.est);
}

static void att_case(const struct att_case *ac)
{
	const uint32_t D = ac->D, T = ac->T, G = ac->G, dt = ac->dt, rows = ac->rows;
	struct kvt_geom g = {.head_dim = D, .page_tokens = T, .group = G, .reps = 0, .dtype = dt};
	const size_t es = kvt_dtype_size(dt);
	const uint64_t slot_bytes = 2ull * T * D * es;
	const uint32_t nslots = ac->stride * 2 + 9;
	const size_t pool_bytes = nslots * slot_bytes, qn = (size_t)rows * G * D;
	void *pool = rand_elems(pool_bytes / es, dt, 1.0);
	void *q = rand_elems(qn, dt, ac->qamp);
	int32_t *table = malloc((size_t)rows * ac->stride * 4), *np = malloc(rows * 4);
	int32_t *ts = malloc(rows * 4), *tl = malloc(rows * 4);
	for (uint32_t r = 0; r < rows; r++) {
		np[r] = r % 4 == 0 ? (int32_t)ac->stride : r % 4 == 1 ? 0 : r % 4 == 2 ? 5 : 0;
		ts[r] = r % 4 == 3 ? -1 : (int32_t)((r * 13 + 1) % nslots);
		tl[r] = r % 4 == 2 ? 0 : (int32_t)(1 + r * 7 % T);
		if (r % 4 == 3)
			np[r] = (int32_t)(ac->stride / 3); /* no tail */
		for (uint32_t i = 0; i < ac->stride; i++)
			table[(size_t)r * ac->stride + i] = (int32_t)((i * 31 + r * 3 + 2) % nslots);
	}
	if (rows > 5)
		np[5] = 0, ts[5] = -1; /* an empty row */
	void *out = malloc(qn * es);
	float *lse = malloc(rows * G * 4);
	memset(out, 0xff, qn * es);
	memset(lse, 0xff, rows * G * 4);
	const float scale = 1.0f / sqrtf((float)D);
	struct kvt_attend_args a = {.g = g, .rows = rows, .stride = ac->stride, .scale = scale,
				    .q = q, .pool = pool, .slot_bytes = slot_bytes, .table = table,
				    .n_pages = np, .tail_slot = ts, .tail_len = tl, .out = out,
				    .lse = lse};
	run_attend(C, &a, pool_bytes, out, lse);
	/* the same tails from a pool of their own (a client's filling pages): same result */
	{
		uint8_t *tp = malloc((size_t)rows * slot_bytes);
		int32_t *ts2 = malloc(rows * 4);
		void *out2 = malloc(qn * es);
		float *lse2 = malloc(rows * G * 4);
		for (uint32_t r = 0; r < rows; r++) {
			ts2[r] = ts[r] >= 0 ? (int32_t)r : -1;
			memcpy(tp + r * slot_bytes, (uint8_t *)pool + (ts[r] >= 0 ? ts[r] : 0) * slot_bytes,
			       slot_bytes);
		}
		struct kvt_attend_args a2 = a;
		a2.tail_slot = ts2;
		a2.tail_pool = tp;
		run_attend(C, &a2, pool_bytes, out2, lse2);
		assert_memory_equal(out2, out, qn * es);
		assert_memory_equal(lse2, lse, rows * G * 4);
		free(tp);
		free(ts2);
		free(out2);
		free(lse2);
	}
	/* every third page read from a host pool of another stride (the miss path): same */
	{
		const uint64_t hsb = slot_bytes + 4096 + 64;
		uint8_t *hp = calloc(nslots, hsb);
		int32_t *t2 = malloc((size_t)rows * ac->stride * 4);
		void *out2 = malloc(qn * es);
		float *lse2 = malloc(rows * G * 4);
		for (uint32_t i = 0; i < nslots; i++)
			memcpy(hp + i * hsb, (uint8_t *)pool + i * slot_bytes, slot_bytes);
		for (size_t i = 0; i < (size_t)rows * ac->stride; i++)
			t2[i] = table[i] | (i % 3 == 1 ? KVT_SLOT_HOST : 0);
		struct kvt_attend_args a2 = a;
		a2.table = t2;
		a2.host_pool = hp;
		a2.host_slot_bytes = hsb;
		run_attend(C, &a2, pool_bytes, out2, lse2);
		assert_memory_equal(out2, out, qn * es);
		assert_memory_equal(lse2, lse, rows * G * 4);
		free(hp);
		free(t2);
		free(out2);
		free(lse2);
	}
	double *w = malloc(sizeof(double) * (ac->stride + 1) * T), acc[256];
	/* each head's reference state (max logit, sum, normalised output), for the estimate */
	double *ref_m = malloc(sizeof(double) * rows * G), *ref_l = malloc(sizeof(double) * rows * G);
	double *ref_o = malloc(sizeof(double) * qn);
	for (uint32_t r = 0; r < rows; r++)
		for (uint32_t h = 0; h < G; h++) {
			const size_t qo = ((size_t)r * G + h) * D;
			uint32_t nt = 0;
			double m = -INFINITY;
			uint32_t ent = (uint32_t)np[r] + (ts[r] >= 0 && tl[r] > 0);
			for (uint32_t e = 0; e < ent; e++) {
				int32_t slot = e < (uint32_t)np[r] ? table[(size_t)r * ac->stride + e] : ts[r];
				uint32_t len = e < (uint32_t)np[r] ? T : (uint32_t)tl[r];
				const uint8_t *k = (const uint8_t *)pool + slot * slot_bytes;
				for (uint32_t t = 0; t < len; t++) {
					double dot = 0;
					for (uint32_t d = 0; d < D; d++)
						dot += (double)kvt_load_elem(q, qo + d, dt) *
						       kvt_load_elem(k, (size_t)t * D + d, dt);
					w[nt] = dot * scale;
					m = fmax(m, w[nt++]);
				}
			}
			double l = 0, amax = 0;
			memset(acc, 0, sizeof(acc));
			nt = 0;
			for (uint32_t e = 0; e < ent; e++) {
				int32_t slot = e < (uint32_t)np[r] ? table[(size_t)r * ac->stride + e] : ts[r];
				uint32_t len = e < (uint32_t)np[r] ? T : (uint32_t)tl[r];
				const uint8_t *v = (const uint8_t *)pool + slot * slot_bytes + (size_t)T * D * es;
				for (uint32_t t = 0; t < len; t++) {
					double p = exp(w[nt++] - m);
					l += p;
					for (uint32_t d = 0; d < D; d++)
						acc[d] += p * kvt_load_elem(v, (size_t)t * D + d, dt);
				}
			}
			for (uint32_t d = 0; d < D; d++) {
				acc[d] = nt ? acc[d] / l : 0;
				amax = fmax(amax, fabs(acc[d]));
				ref_o[qo + d] = acc[d];
			}
			ref_m[(size_t)r * G + h] = nt ? m : -INFINITY;
			ref_l[(size_t)r * G + h] = nt ? l : 0;
			const double tol = tol_of(dt);
			for (uint32_t d = 0; d < D; d++) {
				double got = kvt_load_elem(out, qo + d, dt);
				if (!(fabs(got - acc[d]) <= tol * (fabs(acc[d]) + amax) + 1e-7))
					fail_msg("D%u T%u G%u dt%u row %u head %u d %u: %g vs %g", D, T,
						 G, dt, r, h, d, got, acc[d]);
			}
			double ref_lse = nt ? m + log(l) : -INFINITY;
			float got = lse[(size_t)r * G + h];
			if (!nt)
				assert_true(isinf(got) && got < 0);
			else if (!(fabs(got - ref_lse) <= 1e-4 * fmax(1.0, fabs(ref_lse))))
				fail_msg("lse row %u head %u: %g vs %g", r, h, got, ref_lse);
		}
	if (CPU != C) { /* and cuda against cpu */
		void *out2 = malloc(qn * es);
		float *lse2 = malloc(rows * G * 4);
		a.out = out2;
		a.lse = lse2;
		run_attend(CPU, &a, pool_bytes, out2, lse2);
		for (size_t i = 0; i < qn; i++) {
			double x = kvt_load_elem(out, i, dt), y = kvt_load_elem(out2, i, dt);
			assert_true(fabs(x - y) <= 2 * tol_of(dt) * fmax(1.0, fabs(y)));
		}
		free(out2);
		free(lse2);
	}
	/* with an estimate of pages left out merged in (kvt_estimate's output): every kind
	 * of head, a larger or smaller max than the table's, none (-inf), an empty row */
	{
		const size_t ge = (size_t)D + 2;
		float *est = malloc(sizeof(float) * rows * G * ge);
		void *out2 = malloc(qn * es);
		float *lse2 = malloc(rows * G * 4);
		for (uint32_t i = 0; i < rows * G; i++) {
			float *e = est + i * ge;
			e[0] = i % 5 == 4 ? -INFINITY : (float)(ref_m[i] > -INFINITY ? ref_m[i] : 0) +
								 (float)(3 * srand1());
			e[1] = e[0] > -INFINITY ? (float)(1 + 40 * urand()) : 0.0f;
			for (uint32_t d = 0; d < D; d++)
				e[2 + d] = e[0] > -INFINITY ? e[1] * (float)srand1() : 0.0f;
		}
		memset(out2, 0xff, qn * es);
		memset(lse2, 0xff, rows * G * 4);
		struct kvt_attend_args a2 = a;
		a2.out = out2;
		a2.lse = lse2;
		a2.est = est;
		run_attend(C, &a2, pool_bytes, out2, lse2);
		assert_memory_equal(lse2, lse, rows * G * 4); /* the attended tokens' alone */
		for (uint32_t i = 0; i < rows * G; i++) {
			const float *e = est + i * ge;
			const double mm = fmax(ref_m[i], e[0]);
			const double wa = ref_l[i] > 0 ? ref_l[i] * exp(ref_m[i] - mm) : 0;
			const double we = e[0] > -INFINITY ? exp(e[0] - mm) : 0;
			double amax = 0, want[256];
			for (uint32_t d = 0; d < D; d++) {
				want[d] = wa + we * e[1] > 0
						  ? (ref_o[(size_t)i * D + d] * wa + e[2 + d] * we) / (wa + we * e[1])
						  : 0;
				amax = fmax(amax, fabs(want[d]));
			}
			for (uint32_t d = 0; d < D; d++) {
				double got = kvt_load_elem(out2, (size_t)i * D + d, dt);
				if (!(fabs(got - want[d]) <= tol_of(dt) * (fabs(want[d]) + amax) + 1e-6))
					fail_msg("estimate merged: D%u G%u row %u head %u d %u: %g vs %g",
						 D, G, i / G, i % G, d, got, want[d]);
			}
		}
		free(est);
		free(out2);
		free(lse2);
	}
	free(ref_m);
	free(ref_l);
	free(ref_o);
	free(w);
	free(pool);
	free(q);
	free(table);
	free(np);
	free(ts);
	free(tl);
	free(out);
	free(lse);
}

static void test_attend(void **state)
{
	static const struct att_case cases[] = {
		{128, 64, 4, KVT_BF16, 6, 37, 3.0f},
		{128, 16, 1, KVT_F32, 5, 131, 1.0f},
		{64, 48, 3, KVT_F16, 7, 23, 4.0f},
		{256, 32, 8, KVT_BF16, 4, 19, 2.0f},
		{128, 16, 12, KVT_F32, 3, 11, 2.0f}, /* two head chunks */
		{64, 64, 2, KVT_BF16, 9, 300, 3.0f}, /* many splits per row */
		{128, 64, 5, KVT_F16, 6, 7, 8.0f},
	};
	/* cuda has two kernels (many splits per row on CUDA cores; one cluster per row on
	 * tensor cores, sm_90): each forced in turn (a forced cluster kernel that cannot
	 * launch fails the case; its largest size, then clusters of one and two blocks:
	 * the first block merges alone, or with one other), then the automatic choice */
	static const char *const kernels[][2] = {
		{"split", NULL}, {"cluster", NULL}, {"cluster", "1"}, {"cluster", "2"}, {NULL, NULL}};
	for (size_t k = 0; k < (C == CPU ? 1 : sizeof(kernels) / sizeof(kernels[0])); k++) {
		if (C != CPU && kernels[k][0])
			setenv("KVT_ATTEND_KERNEL", kernels[k][0], 1);
		else
			unsetenv("KVT_ATTEND_KERNEL");
		if (C != CPU && kernels[k][1])
			setenv("KVT_ATTEND_CLUSTER", kernels[k][1], 1);
		else
			unsetenv("KVT_ATTEND_CLUSTER");
		for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
			att_case(&cases[i]);
	}
	unsetenv("KVT_ATTEND_KERNEL");
	unsetenv("KVT_ATTEND_CLUSTER");
}

/* ---- the estimate of the pages a table leaves out ---- */

struct est_case {
	uint32_t D, T, G, R, dt, rows, max_pages, stride;
	int row_base; /* records through row_base (else r * sum_stride) */
	int slots;    /* entries are slots base + r * row_stride + page */
};

static void est_case(const struct est_case *ec)
{
	const uint32_t D = ec->D, T = ec->T, G = ec->G, R = ec->R, dt = ec->dt, rows = ec->rows;
	const struct kvt_geom g = {.head_dim = D, .page_tokens = T, .group = G, .reps = R, .dtype = dt};
	const size_t es = kvt_dtype_size(dt), rec = kvt_summary_record_bytes(&g), ge = (size_t)D + 2;
	const uint32_t sum_stride = ec->max_pages + 3, row_stride = ec->max_pages + 11;
	const int64_t sel_base = ec->slots ? 1000 : 0;
	const size_t nrec = (size_t)rows * sum_stride + 17;
	void *q = rand_elems((size_t)rows * G * D, dt, 2.0);
	void *sums = malloc(nrec * rec);
	for (size_t i = 0; i < nrec * rec / es; i++)
		kvt_store_elem(sums, i, dt, (float)srand1());
	int32_t *nf = malloc(rows * 4), *base = malloc(rows * 4), *ns = malloc(rows * 4);
	int32_t *sel = malloc((size_t)rows * ec->stride * 4);
	uint8_t *in = calloc((size_t)rows * ec->max_pages, 1);
	for (uint32_t r = 0; r < rows; r++) {
		/* rows: full, none, one page, all taken, and others */
		nf[r] = r % 5 == 1 ? 0 : r % 5 == 2 ? 1 : (int32_t)(ec->max_pages - (r % 5 == 0 ? 0 : r % 7));
		base[r] = (int32_t)((rows - 1 - r) * sum_stride + 5); /* reversed, offset */
		uint32_t k = 0;
		if (r % 5 == 3 && (uint32_t)nf[r] <= ec->stride) { /* every page in the table */
			for (int32_t p = nf[r] - 1; p >= 0; p--)
				sel[(size_t)r * ec->stride + k++] = p;
		} else {
			for (uint32_t i = 0; i < ec->stride && nf[r]; i++) {
				uint32_t p = (uint32_t)((i * 37 + r * 11) % (uint32_t)nf[r]);
				sel[(size_t)r * ec->stride + k++] = (int32_t)p; /* repeats allowed */
			}
			if (k < ec->stride) /* an entry past the row's full pages: ignored */
				sel[(size_t)r * ec->stride + k++] = nf[r] + 2;
		}
		ns[r] = (int32_t)k;
		for (uint32_t i = 0; i < k; i++) {
			int32_t p = sel[(size_t)r * ec->stride + i];
			if (p < nf[r])
				in[(size_t)r * ec->max_pages + p] = 1;
			if (ec->slots)
				sel[(size_t)r * ec->stride + i] = (int32_t)(p + sel_base + (int64_t)r * row_stride);
		}
	}
	const float scale = 0.7f / sqrtf((float)D);
	float *est = malloc(sizeof(float) * rows * G * ge);
	struct kvt_estimate_args a = {
		.g = g, .rows = rows, .max_pages = ec->max_pages, .scale = scale,
		.sum_stride = sum_stride, .stride = ec->stride,
		.sel_row_stride = ec->slots ? row_stride : 0, .sel_base = sel_base};
	a.q = dev_dup(C, q, (size_t)rows * G * D * es);
	a.summaries = dev_dup(C, sums, nrec * rec);
	a.row_base = ec->row_base ? dev_dup(C, base, rows * 4) : NULL;
	a.n_full = dev_dup(C, nf, rows * 4);
	a.sel = dev_dup(C, sel, (size_t)rows * ec->stride * 4);
	a.n_sel = dev_dup(C, ns, rows * 4);
	assert_int_equal(kvt_compute_alloc(C, sizeof(float) * rows * G * ge, (void **)&a.est), 0);
	assert_int_equal(kvt_compute_memset(C, a.est, 0xff, sizeof(float) * rows * G * ge), 0);
	const size_t wb = kvt_estimate_work_bytes(&g, rows, ec->max_pages);
	assert_int_equal(kvt_compute_alloc(C, wb, (void **)&a.work), 0);
	assert_int_equal(kvt_compute_memset(C, a.work, 0xff, wb), 0); /* need not be zero */
	assert_int_equal(kvt_compute_alloc(C, (size_t)rows * G * 4, (void **)&a.sync), 0);
	assert_int_equal(kvt_compute_memset(C, a.sync, 0, (size_t)rows * G * 4), 0);
	/* three times: the counters must be zero again after each call, also after one
	 * over fewer rows */
	assert_int_equal(kvt_estimate(C, &a, NULL), 0);
	struct kvt_estimate_args a1 = a;
	a1.rows = rows > 1 ? rows - 1 : 1;
	assert_int_equal(kvt_estimate(C, &a1, NULL), 0);
	assert_int_equal(kvt_estimate(C, &a, NULL), 0);
	uint32_t *sync = malloc((size_t)rows * G * 4);
	assert_int_equal(kvt_compute_sync(C, NULL), 0);
	assert_int_equal(kvt_compute_download(C, sync, a.sync, (size_t)rows * G * 4), 0);
	for (uint32_t i = 0; i < rows * G; i++)
		assert_int_equal(sync[i], 0);
	free(sync);
	assert_int_equal(kvt_compute_download(C, est, a.est, sizeof(float) * rows * G * ge), 0);
	for (uint32_t r = 0; r < rows; r++) {
		const size_t b = ec->row_base ? (size_t)base[r] : (size_t)r * sum_stride;
		for (uint32_t h = 0; h < G; h++) {
			double m = -INFINITY, l = 0, o[256] = {0}, omax = 0;
			for (int pass = 0; pass < 2; pass++)
				for (int32_t p = 0; p < nf[r]; p++) {
					if (in[(size_t)r * ec->max_pages + p])
						continue;
					const uint8_t *sr = (const uint8_t *)sums + (b + p) * rec;
					double z = 0;
					for (uint32_t d = 0; d < D; d++)
						z += (double)kvt_load_elem(q, ((size_t)r * G + h) * D + d, dt) *
						     kvt_load_elem(sr, (size_t)(2 + R) * D + d, dt);
					z *= scale;
					if (!pass) {
						m = fmax(m, z);
						continue;
					}
					const double x = T * exp(z - m);
					l += x;
					for (uint32_t d = 0; d < D; d++)
						o[d] += x * kvt_load_elem(sr, (size_t)(3 + R) * D + d, dt);
				}
			const float *e = est + ((size_t)r * G + h) * ge;
			if (m == -INFINITY) {
				if (!(isinf(e[0]) && e[0] < 0))
					fail_msg("row %u head %u: nothing left out, m %g", r, h, e[0]);
				continue;
			}
			/* m itself may differ by rounding: compare the sums at the reference's m */
			const double c = exp((double)e[0] - m);
			if (!(fabs(e[0] - m) <= 1e-3 * fmax(1.0, fabs(m))) ||
			    !(fabs(e[1] * c - l) <= 1e-3 * l))
				fail_msg("row %u head %u: m %g l %g vs %g %g", r, h, e[0], e[1] * c, m, l);
			for (uint32_t d = 0; d < D; d++)
				omax = fmax(omax, fabs(o[d]));
			for (uint32_t d = 0; d < D; d++)
				if (!(fabs(e[2 + d] * c - o[d]) <= 1e-3 * (fabs(o[d]) + omax)))
					fail_msg("row %u head %u d %u: %g vs %g", r, h, d, e[2 + d] * c, o[d]);
		}
	}
	/* the same from an estimate over every page (stride 0), the entries (made distinct)
	 * taken out afterwards (subtract): what a stream beside the selection does */
	{
		int32_t *sd = malloc((size_t)rows * ec->stride * 4), *nsd = malloc(rows * 4);
		for (uint32_t r = 0; r < rows; r++) {
			uint32_t k = 0;
			for (uint32_t i = 0; i < (uint32_t)ns[r]; i++) {
				const int32_t x = sel[(size_t)r * ec->stride + i];
				uint32_t j = 0;
				while (j < k && sd[(size_t)r * ec->stride + j] != x)
					j++;
				if (j == k)
					sd[(size_t)r * ec->stride + k++] = x;
			}
			nsd[r] = (int32_t)k;
		}
		float *est2 = malloc(sizeof(float) * rows * G * ge);
		struct kvt_estimate_args all = a;
		all.stride = 0;
		assert_int_equal(kvt_compute_memset(C, a.est, 0xff, sizeof(float) * rows * G * ge), 0);
		assert_int_equal(kvt_estimate(C, &all, NULL), 0);
		struct kvt_estimate_args sub = a;
		sub.subtract = 1;
		sub.work = NULL;
		sub.sync = NULL;
		sub.sel = dev_dup(C, sd, (size_t)rows * ec->stride * 4);
		sub.n_sel = dev_dup(C, nsd, rows * 4);
		assert_int_equal(kvt_estimate(C, &sub, NULL), 0);
		assert_int_equal(kvt_compute_sync(C, NULL), 0);
		assert_int_equal(kvt_compute_download(C, est2, a.est, sizeof(float) * rows * G * ge), 0);
		for (uint32_t i = 0; i < rows * G; i++) {
			const float *x = est + i * ge, *y = est2 + i * ge;
			if (x[0] == -INFINITY) {
				if (!(y[0] == -INFINITY && y[1] == 0))
					fail_msg("subtract: row %u head %u: nothing left out, m %g l %g", i / G,
						 i % G, y[0], y[1]);
				continue;
			}
			const double c = exp((double)y[0] - x[0]); /* y's sums in x's m */
			double omax = 0;
			for (uint32_t d = 0; d < D; d++)
				omax = fmax(omax, fabs(x[2 + d]));
			if (!(fabs(y[1] * c - x[1]) <= 1e-3 * x[1]))
				fail_msg("subtract: row %u head %u: l %g vs %g", i / G, i % G, y[1] * c, x[1]);
			for (uint32_t d = 0; d < D; d++)
				if (!(fabs(y[2 + d] * c - x[2 + d]) <= 2e-3 * (fabs(x[2 + d]) + omax)))
					fail_msg("subtract: row %u head %u d %u: %g vs %g", i / G, i % G, d,
						 y[2 + d] * c, x[2 + d]);
		}
		kvt_compute_free(C, (void *)sub.sel);
		kvt_compute_free(C, (void *)sub.n_sel);
		free(sd);
		free(nsd);
		free(est2);
	}
	kvt_compute_free(C, (void *)a.q);
	kvt_compute_free(C, (void *)a.summaries);
	kvt_compute_free(C, (void *)a.row_base);
	kvt_compute_free(C, (void *)a.n_full);
	kvt_compute_free(C, (void *)a.sel);
	kvt_compute_free(C, (void *)a.n_sel);
	kvt_compute_free(C, a.est);
	kvt_compute_free(C, a.work);
	kvt_compute_free(C, a.sync);
	free(q);
	free(sums);
	free(nf);
	free(base);
	free(ns);
	free(sel);
	free(in);
	free(est);
}

static void test_estimate(void **state)
{
	static const struct est_case cases[] = {
		{128, 64, 4, 0, KVT_BF16, 10, 300, 33, 1, 0}, /* three chunks of pages */
		{128, 64, 4, 4, KVT_BF16, 5, 2048, 32, 0, 1}, /* 128K tokens, slots */
		{64, 16, 1, 2, KVT_F32, 6, 129, 7, 0, 0},
		{256, 32, 5, 0, KVT_F16, 5, 77, 40, 1, 1},     /* two head chunks of 4 */
		{128, 16, 12, 1, KVT_F32, 5, 200, 9, 0, 0},    /* two head chunks of 8 */
		{64, 64, 8, 0, KVT_BF16, 7, 5, 64, 1, 0},
		{64, 16, 2, 0, KVT_BF16, 3, 9000, 20, 0, 1},  /* more spans than chunks */
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		est_case(&cases[i]);
}

/* ---- policy and arguments ---- */

static void test_policy(void **state)
{
	struct kvt_layer_policy p;
	kvt_layer_policy_default(&p);
	p.method[3] = KVT_SCORE_REPS;
	const uint32_t D = 64, G = 2, stride = 90, rows = 2;
	struct kvt_geom g = {.head_dim = D, .page_tokens = 16, .group = G, .reps = 2, .dtype = KVT_F32};
	const size_t rec = kvt_summary_record_bytes(&g), rs = (size_t)rows * stride;
	void *sums = rand_elems(rs * rec / 4, KVT_F32, 1.0), *q = rand_elems(rows * G * D, KVT_F32, 1.0);
	int32_t np[2] = {90, 61};
	void *dsum = dev_dup(C, sums, rs * rec), *dq = dev_dup(C, q, rows * G * D * 4);
	void *dnp = dev_dup(C, np, 8);
	float *dsc;
	int32_t *dout, *dn;
	assert_int_equal(kvt_compute_alloc(C, rs * 4, (void **)&dsc), 0);
	assert_int_equal(kvt_compute_alloc(C, rs * 4, (void **)&dout), 0);
	assert_int_equal(kvt_compute_alloc(C, 8, (void **)&dn), 0);
	struct kvt_score_args sc = {.g = g, .rows = rows, .stride = stride, .q = dq, .summaries = dsum,
				    .n_pages = dnp, .scores = dsc};
	struct kvt_select_args sel = {.rows = rows, .stride = stride, .out_stride = stride,
				      .budget_pages = 10, .page_tokens = 16, .sink_tokens = 16,
				      .window_tokens = 32, .logit_scale = 1, .scores = dsc,
				      .n_pages = dnp, .out = dout, .n_out = dn};
	int32_t n_out[2], out[180];
	/* dense layer: every page */
	assert_int_equal(kvt_select_layer(C, &p, 1, &sc, &sel, NULL), 0);
	assert_int_equal(kvt_compute_sync(C, NULL), 0);
	assert_int_equal(kvt_compute_download(C, n_out, dn, 8), 0);
	assert_int_equal(kvt_compute_download(C, out, dout, sizeof(out)), 0);
	assert_int_equal(n_out[0], 90);
	assert_int_equal(n_out[1], 61);
	for (int i = 0; i < 61; i++)
		assert_int_equal(out[stride + i], i);
	/* sparse layers: the budget, with the layer's method */
	for (uint32_t layer = 2; layer < 4; layer++) {
		assert_int_equal(kvt_select_layer(C, &p, layer, &sc, &sel, NULL), 0);
		assert_int_equal(sc.method, layer == 3 ? KVT_SCORE_REPS : KVT_SCORE_QUEST);
		assert_int_equal(kvt_compute_sync(C, NULL), 0);
		assert_int_equal(kvt_compute_download(C, n_out, dn, 8), 0);
		assert_int_equal(n_out[0], 10);
		assert_int_equal(n_out[1], 10);
	}
	struct kvt_select_args bad = sel;
	bad.scores = NULL;
	assert_int_equal(kvt_select_layer(C, &p, 2, &sc, &bad, NULL), -EINVAL);
	assert_int_equal(kvt_select_layer(C, &p, 300, &sc, &sel, NULL), -EINVAL);
	kvt_compute_free(C, dsum);
	kvt_compute_free(C, dq);
	kvt_compute_free(C, dnp);
	kvt_compute_free(C, dsc);
	kvt_compute_free(C, dout);
	kvt_compute_free(C, dn);
	free(sums);
	free(q);
}

/* Queued copies through pinned host memory, both ways, then one sync: what a select
 * does. The bytes come back as they went. */
static void test_copy_async(void **state)
{
	const size_t n = 3 << 20; /* not a multiple of any page size */
	uint8_t *up, *down;
	void *dev;
	assert_int_equal(kvt_compute_host_alloc(C, n, (void **)&up), 0);
	assert_int_equal(kvt_compute_host_alloc(C, n, (void **)&down), 0);
	assert_int_equal(kvt_compute_alloc(C, n, &dev), 0);
	for (size_t i = 0; i < n; i++)
		up[i] = (uint8_t)(i * 131 + 7);
	memset(down, 0, n);
	assert_int_equal(kvt_compute_copy_async(C, dev, up, n, NULL), 0);
	assert_int_equal(kvt_compute_copy_async(C, down, dev, n / 2, NULL), 0);
	assert_int_equal(kvt_compute_copy_async(C, down + n / 2, (uint8_t *)dev + n / 2, n - n / 2,
						 NULL), 0);
	assert_int_equal(kvt_compute_copy_async(C, down, dev, 0, NULL), 0); /* nothing */
	assert_int_equal(kvt_compute_sync(C, NULL), 0);
	assert_memory_equal(up, down, n);
	kvt_compute_free(C, dev);
	kvt_compute_host_free(C, up);
	kvt_compute_host_free(C, down);
	kvt_compute_host_free(C, NULL);
}

/*
 * The fast path's kernels against what they must do, on the backend under test:
 * resolve (the table from a selection and a map: pages missing, on the GPU, in host
 * RAM; host ones only where they may matter; the report and its ready token), scatter
 * (the daemon's map writes) and put_rows (tokens into a page still filling).
 */
static void *dz(size_t bytes)
{
	void *d;
	assert_int_equal(kvt_compute_alloc(C, bytes, &d), 0);
	return d;
}

/* fetch() without the free: the buffer is used again */
static void dget(void *h, const void *d, size_t bytes)
{
	assert_int_equal(kvt_compute_sync(C, NULL), 0);
	assert_int_equal(kvt_compute_download(C, h, d, bytes), 0);
}

/*
 * put_async: words from host memory that may be reused as soon as the call returns,
 * in every size class and across launches (KVT_PUT_CHUNK), at an offset, in stream
 * order with the copies around it.
 */
static void test_put_async(void **state)
{
	const uint32_t sizes[] = {1, 64, 65, 256, 257, KVT_PUT_CHUNK / 4, KVT_PUT_CHUNK / 4 + 1, 2600};
	const uint32_t max = 2600, base = 3;
	uint32_t src[2600], *got = malloc((max + 2 * base) * 4), *want = malloc((max + 2 * base) * 4);
	void *dev;
	assert_non_null(got);
	assert_non_null(want);
	assert_int_equal(kvt_compute_alloc(C, (max + 2 * base) * 4, &dev), 0);
	for (size_t k = 0; k < sizeof(sizes) / sizeof(sizes[0]); k++) {
		const uint32_t n = sizes[k];
		for (uint32_t i = 0; i < max + 2 * base; i++)
			want[i] = 0xa5a5a5a5u;
		assert_int_equal(kvt_compute_upload(C, dev, want, (max + 2 * base) * 4), 0);
		for (uint32_t i = 0; i < n; i++)
			src[i] = want[base + i] = (uint32_t)(k * 100003u + i * 2654435761u);
		assert_int_equal(kvt_compute_put_async(C, (uint32_t *)dev + base, src, n * 4, NULL), 0);
		for (uint32_t i = 0; i < n; i++) /* the staging again at once: already read */
			src[i] = ~src[i];
		dget(got, dev, (max + 2 * base) * 4);
		assert_memory_equal(got, want, (max + 2 * base) * 4);
	}
	assert_int_equal(kvt_compute_put_async(C, dev, src, 0, NULL), 0); /* nothing */
	assert_int_equal(kvt_compute_put_async(C, dev, src, 6, NULL), -EINVAL);
	assert_int_equal(kvt_compute_put_async(C, (uint8_t *)dev + 2, src, 8, NULL), -EINVAL);
	assert_int_equal(kvt_compute_put_async(C, NULL, src, 8, NULL), -EINVAL);
	kvt_compute_free(C, dev);
	free(got);
	free(want);
}

static void test_resolve(void **state)
{
	(void)state;
	enum { R = 3, S = 8, P = 40 };
	const int32_t sel[R][S] = {{0, 3, 7, 9, 12, 20, 38, 39},
				   {0, 1, 2, 3, 4, 5, 6, 7},
				   {0, 5, 30, 31, 32, 33, 34, 35}};
	const int32_t n_sel[R] = {8, 5, 8}, n_full[R] = {40, 30, 36}, row_base[R] = {0, P, 2 * P};
	int32_t map[R * P];
	float sc[R][P];
	for (int r = 0; r < R; r++)
		for (int p = 0; p < P; p++) {
			/* a third missing, a third on the GPU, a third in host RAM */
			int kind = (int)((p * 7 + r) % 3);
			map[r * P + p] = kind == 0 ? -1 : kind == 1 ? 100 * r + p
								   : (100 * r + p) | KVT_SLOT_HOST;
			sc[r][p] = (float)((p * 13 + r * 5) % 17);
		}
	const float gap = 5.0f;
	int32_t *d_sel = dev_dup(C, sel, sizeof(sel)), *d_nsel = dev_dup(C, n_sel, sizeof(n_sel));
	int32_t *d_full = dev_dup(C, n_full, sizeof(n_full)), *d_base = dev_dup(C, row_base, sizeof(row_base));
	int32_t *d_map = dev_dup(C, map, sizeof(map));
	float *d_sc = dev_dup(C, sc, sizeof(sc));
	int32_t *d_tab = dz(R * S * 4), *d_pages = dz(R * S * 4);
	int32_t *d_nt = dz(R * 4);
	int32_t *rep;
	assert_int_equal(kvt_compute_host_alloc(C, 64 + (3 * R + R * S) * 4, (void **)&rep), 0);
	memset(rep, 0xee, 64 + (3 * R + R * S) * 4);
	*(uint32_t *)rep = 0;
	for (int gated = 0; gated < 2; gated++) {
		struct kvt_resolve_args a = {.rows = R, .stride = S, .sel = d_sel, .n_sel = d_nsel,
					     .map = d_map, .row_base = d_base, .table = d_tab,
					     .pages = d_pages, .n_table = d_nt, .report = rep + 16,
					     .ready = (uint32_t *)rep, .token = 77u + (uint32_t)gated};
		if (gated) {
			a.scores = d_sc;
			a.score_stride = P;
			a.n_full = d_full;
			a.sink_pages = 1;
			a.window_pages = 2;
			a.host_gap = gap;
		}
		assert_int_equal(kvt_resolve(C, &a, NULL), 0);
		assert_int_equal(kvt_compute_sync(C, NULL), 0);
		int32_t tab[R * S], pages[R * S], nt[R];
		dget(tab, d_tab, sizeof(tab));
		dget(pages, d_pages, sizeof(pages));
		dget(nt, d_nt, sizeof(nt));
		assert_int_equal(__atomic_load_n((uint32_t *)rep, __ATOMIC_ACQUIRE), 77u + (uint32_t)gated);
		const int32_t *report = rep + 16;
		for (int r = 0; r < R; r++) {
			float best = -INFINITY;
			for (int i = 0; i < n_sel[r]; i++) {
				int p = sel[r][i];
				if (p >= 1 && p < n_full[r] - 2 && sc[r][p] > best)
					best = sc[r][p];
			}
			int k = 0, host = 0;
			for (int i = 0; i < n_sel[r]; i++) {
				int p = sel[r][i], slot = map[r * P + p];
				bool matters = !gated || p < 1 || p >= n_full[r] - 2 || sc[r][p] >= best - gap;
				assert_int_equal(report[3 * R + r * S + i], p | (matters ? KVT_PAGE_MATTERS : 0));
				if (slot < 0 || ((slot & KVT_SLOT_HOST) && !matters))
					continue;
				assert_int_equal(tab[r * S + k], slot);
				assert_int_equal(pages[r * S + k], p);
				host += (slot & KVT_SLOT_HOST) != 0;
				k++;
			}
			assert_int_equal(nt[r], k);
			assert_int_equal(report[r], n_sel[r]);
			assert_int_equal(report[R + r], k);
			assert_int_equal(report[2 * R + r], host);
		}
	}
	/* the map written from host pairs */
	int32_t pairs[] = {5, 1234, 41, -1, 119, 7 | KVT_SLOT_HOST};
	assert_int_equal(kvt_scatter_i32(C, d_map, pairs, 3), 0);
	int32_t m2[R * P];
	dget(m2, d_map, sizeof(m2));
	map[5] = 1234, map[41] = -1, map[119] = 7 | KVT_SLOT_HOST;
	assert_memory_equal(m2, map, sizeof(map));
	/* tokens 3..4 of 2 heads into slots 4 and 5 of a pool of 6 (f32, D 8, T 4) */
	struct kvt_geom g = {.head_dim = 8, .page_tokens = 4, .group = 1, .reps = 1, .dtype = KVT_F32};
	const size_t slot_bytes = 2 * 4 * 8 * 4;
	float kv[2][2][2][8], *pool = calloc(6, slot_bytes), *out = malloc(6 * slot_bytes);
	for (int i = 0; i < 2 * 2 * 2 * 8; i++)
		((float *)kv)[i] = (float)i + 0.5f;
	void *d_pool = dev_dup(C, pool, 6 * slot_bytes);
	float *d_k = dev_dup(C, kv[0], sizeof(kv[0])), *d_v = dev_dup(C, kv[1], sizeof(kv[1]));
	struct kvt_put_rows_args pr = {.g = g, .heads = 2, .ntok = 2, .pos0 = 2, .k = d_k, .v = d_v,
				       .pool = d_pool, .slot_bytes = slot_bytes, .slot0 = 4};
	assert_int_equal(kvt_put_rows(C, &pr, NULL), 0);
	assert_int_equal(kvt_compute_sync(C, NULL), 0);
	dget(out, d_pool, 6 * slot_bytes);
	for (int t = 0; t < 2; t++)
		for (int h = 0; h < 2; h++) {
			float *page = pool + (4 + h) * slot_bytes / 4;
			memcpy(page + (2 + t) * 8, kv[0][t][h], 32);	     /* K rows */
			memcpy(page + (4 + 2 + t) * 8, kv[1][t][h], 32); /* V rows after T of K */
		}
	assert_memory_equal(out, pool, 6 * slot_bytes);
	/* the heads' pages 3 slots apart (an engine's [heads][pages] layout): 1 and 4 */
	pr.slot0 = 1;
	pr.slot_stride = 3;
	pr.pos0 = 0;
	pr.ntok = 1;
	assert_int_equal(kvt_put_rows(C, &pr, NULL), 0);
	assert_int_equal(kvt_compute_sync(C, NULL), 0);
	dget(out, d_pool, 6 * slot_bytes);
	for (int h = 0; h < 2; h++) {
		float *page = pool + (1 + 3 * h) * slot_bytes / 4;
		memcpy(page, kv[0][0][h], 32);
		memcpy(page + 4 * 8, kv[1][0][h], 32);
	}
	assert_memory_equal(out, pool, 6 * slot_bytes);
	pr.ntok = 2;
	pr.pos0 = 3; /* past the page */
	assert_int_equal(kvt_put_rows(C, &pr, NULL), -EINVAL);
	free(pool);
	free(out);
	kvt_compute_free(C, d_pool);
	kvt_compute_free(C, d_k);
	kvt_compute_free(C, d_v);
	kvt_compute_host_free(C, rep);
	void *ds[] = {d_sel, d_nsel, d_full, d_base, d_map, d_sc, d_tab, d_pages, d_nt};
	for (size_t i = 0; i < sizeof(ds) / sizeof(ds[0]); i++)
		kvt_compute_free(C, ds[i]);
}

/*
 * put_rows for a batch (nseq): each sequence's token into its own row of its own pages,
 * as one call per sequence would, for 1, 5 and 300 sequences (past one launch's 256),
 * bf16 and D 128 as the model's; a row past the page refused, nothing written.
 */
static void test_put_rows_batch(void **state)
{
	(void)state;
	struct kvt_geom g = {.head_dim = 128, .page_tokens = 16, .group = 1, .reps = 1, .dtype = KVT_BF16};
	enum { H = 2, N = 300 };
	const size_t row = 128 * 2, slot_bytes = 2 * 16 * row, nslots = 2 * N * H + 3;
	const size_t tok = (size_t)N * H * row;
	uint8_t *kv = malloc(2 * tok), *want = calloc(nslots, slot_bytes), *got = malloc(nslots * slot_bytes);
	uint32_t pos[N];
	uint64_t slot0[N];
	for (size_t i = 0; i < 2 * tok; i++)
		kv[i] = (uint8_t)(i * 7 + i / 251);
	for (uint32_t i = 0; i < N; i++) {
		pos[i] = (i * 5) % 16;
		slot0[i] = 3 + (uint64_t)((i * 37) % N) * H * 2; /* scattered, heads 2 apart */
	}
	void *d_pool = dev_dup(C, want, nslots * slot_bytes);
	void *d_k = dev_dup(C, kv, tok), *d_v = dev_dup(C, kv + tok, tok);
	const uint32_t counts[] = {1, 5, N};
	for (int c = 0; c < 3; c++) {
		const uint32_t n = counts[c];
		struct kvt_put_rows_args pr = {.g = g, .heads = H, .ntok = 1, .slot_stride = 2,
					       .k = d_k, .v = d_v, .pool = d_pool,
					       .slot_bytes = slot_bytes, .nseq = n, .seq_pos = pos,
					       .seq_slot0 = slot0};
		assert_int_equal(kvt_put_rows(C, &pr, NULL), 0);
		for (uint32_t i = 0; i < n; i++)
			for (uint32_t h = 0; h < H; h++) {
				uint8_t *page = want + (slot0[i] + 2 * h) * slot_bytes;
				const size_t src = ((size_t)i * H + h) * row;
				memcpy(page + pos[i] * row, kv + src, row);
				memcpy(page + (16 + pos[i]) * row, kv + tok + src, row);
			}
		assert_int_equal(kvt_compute_sync(C, NULL), 0);
		dget(got, d_pool, nslots * slot_bytes);
		assert_memory_equal(got, want, nslots * slot_bytes);
		for (uint32_t i = 0; i < N; i++) /* the next call: other rows */
			pos[i] = (pos[i] + 3) % 16;
	}
	pos[7] = 16; /* past the page: refused, nothing written */
	struct kvt_put_rows_args bad = {.g = g, .heads = H, .ntok = 1, .slot_stride = 2,
					.k = d_k, .v = d_v, .pool = d_pool, .slot_bytes = slot_bytes,
					.nseq = 9, .seq_pos = pos, .seq_slot0 = slot0};
	assert_int_equal(kvt_put_rows(C, &bad, NULL), -EINVAL);
	pos[7] = 15;
	bad.ntok = 2; /* 15 + 2 */
	assert_int_equal(kvt_put_rows(C, &bad, NULL), -EINVAL);
	bad.ntok = 1;
	bad.seq_pos = NULL;
	assert_int_equal(kvt_put_rows(C, &bad, NULL), -EINVAL);
	assert_int_equal(kvt_compute_sync(C, NULL), 0);
	dget(got, d_pool, nslots * slot_bytes);
	assert_memory_equal(got, want, nslots * slot_bytes);
	free(kv);
	free(want);
	free(got);
	kvt_compute_free(C, d_pool);
	kvt_compute_free(C, d_k);
	kvt_compute_free(C, d_v);
}

/*
 * kvt_select_resolve against kvt_select then kvt_resolve: the same tables, pages,
 * counts and report, over enough rows for several blocks to count themselves (the
 * words left zero), with one row and no words, and with several rows and none (two
 * calls on cuda); arguments that do not describe one selection and its table refused.
 */
static void test_select_resolve(void **state)
{
	(void)state;
	enum { R = 13, P = 90, S = 12 };
	float sc[R * P];
	int32_t n_pages[R], tail[R], base[R], map[R * P];
	for (int r = 0; r < R; r++) {
		n_pages[r] = P - 7 * (r % 4); /* some rows shorter */
		tail[r] = r % 3 ? 17 : 0;
		base[r] = r * P;
		for (int p = 0; p < P; p++) {
			sc[r * P + p] = (float)((p * 37 + r * 11) % 101) * 0.25f;
			int kind = (int)((p * 5 + r) % 3);
			map[r * P + p] = kind == 0 ? -1 : kind == 1 ? 1000 + r * P + p
								   : (1000 + r * P + p) | KVT_SLOT_HOST;
		}
	}
	float *d_sc = dev_dup(C, sc, sizeof(sc));
	int32_t *d_np = dev_dup(C, n_pages, sizeof(n_pages)), *d_tail = dev_dup(C, tail, sizeof(tail));
	int32_t *d_base = dev_dup(C, base, sizeof(base)), *d_map = dev_dup(C, map, sizeof(map));
	uint32_t zero2[2] = {0, 0}, *d_sync = dev_dup(C, zero2, sizeof(zero2));
	const size_t rep_bytes = 64 + (3 * R + R * S) * 4;
	int32_t *rep[2];
	int32_t tab[2][R * S], pages[2][R * S], nt[2][R], sel[2][R * S], nsel[2][R];
	for (int rows = 1; rows <= R; rows += R - 1)
		for (int with_sync = 0; with_sync < 2; with_sync++) {
			for (int v = 0; v < 2; v++) { /* 0: two calls, 1: one */
				int32_t *d_sel = dz(R * S * 4), *d_nsel = dz(R * 4), *d_tab = dz(R * S * 4);
				int32_t *d_pages = dz(R * S * 4), *d_nt = dz(R * 4);
				assert_int_equal(kvt_compute_host_alloc(C, rep_bytes, (void **)&rep[v]), 0);
				memset(rep[v], 0, rep_bytes);
				struct kvt_select_args se = {
					.mode = KVT_SELECT_TOPK, .rows = (uint32_t)rows, .stride = P,
					.out_stride = S, .budget_pages = S, .page_tokens = 64,
					.sink_tokens = 64, .window_tokens = 128, .logit_scale = 1.0f,
					.scores = d_sc, .n_pages = d_np, .tail_len = d_tail,
					.out = d_sel, .n_out = d_nsel};
				struct kvt_resolve_args ra = {
					.rows = (uint32_t)rows, .stride = S, .sel = d_sel, .n_sel = d_nsel,
					.map = d_map, .row_base = d_base, .table = d_tab, .pages = d_pages,
					.n_table = d_nt, .report = rep[v] + 16, .ready = (uint32_t *)rep[v],
					.token = 5, .scores = d_sc, .score_stride = P, .n_full = d_np,
					.sink_pages = 1, .window_pages = 2, .host_gap = 6.0f,
					.sync = with_sync ? d_sync : NULL};
				if (v) {
					assert_int_equal(kvt_select_resolve(C, &se, &ra, NULL), 0);
				} else {
					assert_int_equal(kvt_select(C, &se, NULL), 0);
					assert_int_equal(kvt_resolve(C, &ra, NULL), 0);
				}
				assert_int_equal(kvt_compute_sync(C, NULL), 0);
				dget(sel[v], d_sel, sizeof(sel[v]));
				dget(nsel[v], d_nsel, sizeof(nsel[v]));
				dget(tab[v], d_tab, sizeof(tab[v]));
				dget(pages[v], d_pages, sizeof(pages[v]));
				dget(nt[v], d_nt, sizeof(nt[v]));
				dget(zero2, d_sync, sizeof(zero2));
				assert_int_equal(zero2[0], 0);
				assert_int_equal(zero2[1], 0);
				assert_int_equal(__atomic_load_n((uint32_t *)rep[v], __ATOMIC_ACQUIRE), 5u);
				if (v == 1) { /* refused: not the selection's own arrays, a slot map */
					ra.sel = d_tab;
					assert_int_equal(kvt_select_resolve(C, &se, &ra, NULL), -EINVAL);
					ra.sel = d_sel;
					ra.stride = S - 1;
					assert_int_equal(kvt_select_resolve(C, &se, &ra, NULL), -EINVAL);
					ra.stride = S;
					se.slot_map = d_map;
					assert_int_equal(kvt_select_resolve(C, &se, &ra, NULL), -EINVAL);
				}
				int32_t *ds[] = {d_sel, d_nsel, d_tab, d_pages, d_nt};
				for (size_t i = 0; i < sizeof(ds) / sizeof(ds[0]); i++)
					kvt_compute_free(C, ds[i]);
			}
			for (int r = 0; r < rows; r++) {
				assert_true(nsel[0][r] > 0 && nsel[0][r] <= S);
				assert_true(nt[0][r] >= 0 && nt[0][r] <= nsel[0][r]);
				assert_memory_equal(sel[0] + r * S, sel[1] + r * S, (size_t)nsel[0][r] * 4);
				assert_memory_equal(tab[0] + r * S, tab[1] + r * S, (size_t)nt[0][r] * 4);
				assert_memory_equal(pages[0] + r * S, pages[1] + r * S, (size_t)nt[0][r] * 4);
			}
			assert_memory_equal(nsel[0], nsel[1], (size_t)rows * 4);
			assert_memory_equal(nt[0], nt[1], (size_t)rows * 4);
			/* the report: header, counts, every selected entry with its flags */
			assert_memory_equal(rep[0], rep[1], 64 + 3 * (size_t)rows * 4);
			for (int r = 0; r < rows; r++)
				assert_memory_equal(rep[0] + 16 + 3 * rows + r * S, rep[1] + 16 + 3 * rows + r * S,
						    (size_t)nsel[0][r] * 4);
			kvt_compute_host_free(C, rep[0]);
			kvt_compute_host_free(C, rep[1]);
		}
	void *ds[] = {d_sc, d_np, d_tail, d_base, d_map, d_sync};
	for (size_t i = 0; i < sizeof(ds) / sizeof(ds[0]); i++)
		kvt_compute_free(C, ds[i]);
}

/*
 * A resolve that waits: the pages that matter and are missing are marked KVT_PAGE_WAIT
 * and counted in the header (ready[1]); the call holds (on the device: its kernel) until
 * the keeper of the map, here a thread of this test, has put them in the map and
 * written the token into the ack word, then the table has them. With no ack, the wait
 * ends at wait_ns and the table goes without them. The map lives in host memory the
 * device maps, so the thread can write it while the kernel waits.
 */
struct keeper {
	uint32_t *hdr;     /* ready, missing, ack */
	int32_t *map;
	const int32_t *fill; /* [n] map index, slot */
	uint32_t n, token, missing;
};

static void *keeper_fn(void *arg)
{
	struct keeper *k = arg;
	while (__atomic_load_n(&k->hdr[0], __ATOMIC_ACQUIRE) != k->token)
		sched_yield();
	k->missing = __atomic_load_n(&k->hdr[1], __ATOMIC_RELAXED);
	for (uint32_t i = 0; i < k->n; i++)
		__atomic_store_n(&k->map[k->fill[2 * i]], k->fill[2 * i + 1], __ATOMIC_RELAXED);
	__atomic_store_n(&k->hdr[2], k->token, __ATOMIC_RELEASE);
	return NULL;
}

static void test_resolve_wait(void **state)
{
	(void)state;
	/* 18 rows: several blocks where the backend uses them (sync words given) */
	enum { R = 18, S = 6, P = 16 };
	const int32_t pat[2][S] = {{0, 2, 5, 9, 14, 15}, {0, 1, 4, 6, 7, 15}};
	int32_t sel[R][S], n_sel[R], n_full[R], row_base[R], map0[R * P], fill[2 * R * S];
	float sc[R][P];
	uint32_t nfill = 0;
	for (int r = 0; r < R; r++) {
		memcpy(sel[r], pat[r % 2], sizeof(pat[0]));
		n_sel[r] = S;
		n_full[r] = P;
		row_base[r] = r * P;
		for (int p = 0; p < P; p++) {
			map0[r * P + p] = p % 2 ? -1 : 10 * r + p; /* odd pages missing */
			sc[r][p] = p == 9 || p == 7 ? 10.0f : 1.0f; /* 9 and 7 the best; 1 nat gap */
		}
		/* missing and mattering: sinks and window always (p 0, 15), 9 and 7 by score */
		for (int i = 0; i < S; i++) {
			const int p = sel[r][i];
			if (map0[r * P + p] < 0 && (p == 0 || p == 15 || sc[r][p] >= 9.0f)) {
				fill[2 * nfill] = r * P + p;
				fill[2 * nfill++ + 1] = 5000 + r * P + p;
			}
		}
	}
	assert_int_equal(nfill, 2 * R);
	int32_t *d_sel = dev_dup(C, sel, sizeof(sel)), *d_nsel = dev_dup(C, n_sel, sizeof(n_sel));
	int32_t *d_full = dev_dup(C, n_full, sizeof(n_full)), *d_base = dev_dup(C, row_base, sizeof(row_base));
	float *d_sc = dev_dup(C, sc, sizeof(sc));
	const uint32_t zero2[2] = {0, 0};
	int32_t *d_tab = dz(R * S * 4), *d_nt = dz(R * 4), *map, *rep;
	uint32_t *d_sync = dev_dup(C, zero2, sizeof(zero2));
	assert_int_equal(kvt_compute_host_alloc(C, sizeof(map0), (void **)&map), 0);
	assert_int_equal(kvt_compute_host_alloc(C, 64 + (3 * R + R * S) * 4, (void **)&rep), 0);
	for (int run = 0; run < 5; run++) { /* the last: nothing missing, no wait */
		const bool acked = run < 2, blocks = run % 2 || run == 4, full = run == 4;
		memcpy(map, map0, sizeof(map0));
		for (uint32_t i = 0; full && i < nfill; i++)
			map[fill[2 * i]] = fill[2 * i + 1];
		memset(rep, 0, 64 + (3 * R + R * S) * 4);
		uint32_t *hdr = (uint32_t *)rep;
		hdr[2] = 40;
		struct kvt_resolve_args a = {.rows = R, .stride = S, .sel = d_sel, .n_sel = d_nsel,
					     .map = map, .row_base = d_base, .table = d_tab,
					     .n_table = d_nt, .report = rep + 16, .ready = hdr,
					     .token = 41, .score_stride = P, .scores = d_sc,
					     .n_full = d_full, .sink_pages = 1, .window_pages = 1,
					     .host_gap = 1.0f, .ack = hdr + 2,
					     .wait_ns = acked ? 20000000000ull : 2000000ull,
					     .sync = blocks ? d_sync : NULL};
		struct keeper k = {.hdr = hdr, .map = map, .fill = fill, .n = nfill, .token = 41};
		pthread_t th;
		if (acked)
			assert_int_equal(pthread_create(&th, NULL, keeper_fn, &k), 0);
		assert_int_equal(kvt_resolve(C, &a, NULL), 0);
		assert_int_equal(kvt_compute_sync(C, NULL), 0);
		if (acked) {
			pthread_join(th, NULL);
			assert_int_equal(k.missing, nfill);
		}
		assert_int_equal(hdr[0], 41);
		assert_int_equal(hdr[1], full ? 0 : nfill);
		int32_t tab[R * S], nt[R], sync[2];
		dget(tab, d_tab, sizeof(tab));
		dget(nt, d_nt, sizeof(nt));
		dget(sync, d_sync, sizeof(sync));
		assert_true(sync[0] == 0 && sync[1] == 0); /* left zero for the next call */
		const int32_t *report = rep + 16;
		for (int r = 0; r < R; r++) {
			int k2 = 0;
			for (int i = 0; i < S; i++) {
				const int p = sel[r][i];
				const bool matters = p == 0 || p == 15 || sc[r][p] >= 9.0f;
				const bool absent = map0[r * P + p] < 0, missing = absent && !full;
				assert_int_equal(report[3 * R + r * S + i],
						 p | (matters ? KVT_PAGE_MATTERS : 0) |
							 (matters && missing ? KVT_PAGE_WAIT : 0));
				if (missing && !(matters && acked))
					continue;
				if (absent && !matters)
					continue; /* never filled */
				const int32_t slot = absent ? 5000 + r * P + p : map0[r * P + p];
				assert_int_equal(tab[r * S + k2], slot);
				k2++;
			}
			assert_int_equal(nt[r], k2);
			assert_int_equal(report[r], S);
			assert_int_equal(report[R + r], full ? 5 : 3); /* the first pass */
			assert_int_equal(report[2 * R + r], 0);
		}
	}
	kvt_compute_host_free(C, map);
	kvt_compute_host_free(C, rep);
	void *ds[] = {d_sel, d_nsel, d_full, d_base, d_sc, d_tab, d_nt, d_sync};
	for (size_t i = 0; i < sizeof(ds) / sizeof(ds[0]); i++)
		kvt_compute_free(C, ds[i]);
}

static void test_bad_args(void **state)
{
	struct kvt_geom g = {.head_dim = 128, .page_tokens = 64, .group = 4, .reps = 3, .dtype = KVT_BF16};
	assert_int_equal(kvt_geom_check(&g), -EINVAL); /* 3 does not divide 64 */
	g.reps = 4;
	assert_int_equal(kvt_geom_check(&g), 0);
	g.dtype = 9;
	assert_int_equal(kvt_geom_check(&g), -EINVAL);
	g.dtype = KVT_BF16;
	int32_t x = 0;
	float f = 0;
	struct kvt_score_args sc = {.g = g, .method = 7, .rows = 1, .stride = 1, .q = &x,
				    .summaries = &x, .n_pages = &x, .scores = &f};
	assert_int_equal(kvt_score(C, &sc, NULL), -EINVAL);
	sc.method = KVT_SCORE_REPS;
	sc.g.reps = 0;
	assert_int_equal(kvt_score(C, &sc, NULL), -EINVAL);
	struct kvt_select_args sel = {.rows = 1, .stride = 100, .out_stride = 8, .budget_pages = 16,
				      .page_tokens = 16, .scores = &f, .n_pages = &x, .out = &x,
				      .n_out = &x};
	assert_int_equal(kvt_select(C, &sel, NULL), -EINVAL); /* out_stride < budget */
	sel.out_stride = 16;
	sel.window_tokens = 4096;
	assert_int_equal(kvt_select(C, &sel, NULL), -EINVAL); /* window cannot fit */
	sel.window_tokens = 0;
	sel.mode = KVT_SELECT_TOPP;
	sel.top_p = 1.5f;
	assert_int_equal(kvt_select(C, &sel, NULL), -EINVAL);
	struct kvt_attend_args at = {.g = g, .rows = 1, .stride = 1, .q = &x, .pool = &x,
				     .slot_bytes = 1024, .table = &x, .n_pages = &x, .out = &x};
	assert_int_equal(kvt_attend(C, &at, NULL), -EINVAL); /* slot smaller than a page */
	struct kvt_compute *none;
	assert_int_equal(kvt_compute_open("tpu", &none), -ENOENT);
}

int main(void)
{
	int ret = kvt_compute_open(BACKEND, &C);
	if (ret == -ENODEV) {
		fprintf(stderr, "no %s backend here: skipped\n", BACKEND);
		return 77;
	}
	if (ret < 0 || kvt_compute_open("cpu", &CPU) < 0) {
		fprintf(stderr, "cannot open the %s backend: %s\n", BACKEND, strerror(-ret));
		return 1;
	}
	if (!strcmp(BACKEND, "cpu")) {
		kvt_compute_close(CPU);
		CPU = C;
	}
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_summaries),   cmocka_unit_test(test_scores),
		cmocka_unit_test(test_quest_bound), cmocka_unit_test(test_select_topk),
		cmocka_unit_test(test_select_topp), cmocka_unit_test(test_attend),
		cmocka_unit_test(test_policy),      cmocka_unit_test(test_bad_args),
		cmocka_unit_test(test_copy_async),  cmocka_unit_test(test_put_async), cmocka_unit_test(test_resolve),
		cmocka_unit_test(test_select_resolve), cmocka_unit_test(test_put_rows_batch),
		cmocka_unit_test(test_resolve_wait), cmocka_unit_test(test_estimate),
	};
	ret = cmocka_run_group_tests_name(BACKEND, tests, NULL, NULL);
	if (CPU != C)
		kvt_compute_close(CPU);
	kvt_compute_close(C);
	return ret;
}
