// SPDX-License-Identifier: MIT
/*
 * The cpu compute backend: plain C over host memory, float accumulation. It serves the
 * cpu device and is the oracle the cuda backend is tested against.
 */
#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "daemon/alloc.h"
#include "kernels/compute_impl.h"
#include "kernels/dtype.h"

struct cpu_compute {
	struct kvt_compute base;
	float *tmp; /* scratch, grown on demand */
	size_t tmp_n;
};

static float *scratch(struct cpu_compute *c, size_t n)
{
	if (n > c->tmp_n) {
		float *p = kvt_realloc(c->tmp, n * sizeof(float));
		if (!p)
			return NULL;
		c->tmp = p;
		c->tmp_n = n;
	}
	return c->tmp;
}

static int cpu_open(struct kvt_compute **out)
{
	struct cpu_compute *c = kvt_calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	*out = &c->base;
	return 0;
}

static void cpu_close(struct kvt_compute *base)
{
	struct cpu_compute *c = (struct cpu_compute *)base;
	kvt_free(c->tmp);
	kvt_free(c);
}

static int cpu_alloc(struct kvt_compute *c, size_t bytes, void **out)
{
	void *p = aligned_alloc(64, (bytes + 63) & ~(size_t)63);
	if (!p)
		return -ENOMEM;
	*out = p;
	return 0;
}

static void cpu_free(struct kvt_compute *c, void *p)
{
	free(p);
}

static int cpu_copy(struct kvt_compute *c, void *dst, const void *src, size_t bytes)
{
	memmove(dst, src, bytes);
	return 0;
}

static int cpu_copy_async(struct kvt_compute *c, void *dst, const void *src, size_t bytes,
			  void *stream)
{
	memmove(dst, src, bytes);
	return 0;
}

static int cpu_memset(struct kvt_compute *c, void *dst, int byte, size_t bytes)
{
	memset(dst, byte, bytes);
	return 0;
}

/* n elements of p (dtype) as floats */
static void load_row(float *out, const void *p, size_t at, uint32_t n, uint32_t dtype)
{
	const uint16_t *h = (const uint16_t *)p + at;
	switch (dtype) { /* the loops apart: each one vectorizes */
	case 0:
		for (uint32_t i = 0; i < n; i++)
			out[i] = kvt_f16_to_f32(h[i]);
		break;
	case 1:
		for (uint32_t i = 0; i < n; i++)
			out[i] = kvt_bf16_to_f32(h[i]);
		break;
	default:
		memcpy(out, (const float *)p + at, n * sizeof(float));
	}
}

/* lo, hi and sum over one row of D floats. Blocks of 8 with restrict: gcc's -O2
 * vectorizes only loops it needs no scalar tail or alias check for. */
static void bounds_add_row(uint32_t D, const float *restrict x, float *restrict lo,
			   float *restrict hi, float *restrict sum)
{
	uint32_t d = 0;
	for (; d + 8 <= D; d += 8)
		for (uint32_t j = d; j < d + 8; j++) {
			lo[j] = x[j] < lo[j] ? x[j] : lo[j];
			hi[j] = x[j] > hi[j] ? x[j] : hi[j];
			sum[j] += x[j];
		}
	for (; d < D; d++) {
		lo[d] = x[d] < lo[d] ? x[d] : lo[d];
		hi[d] = x[d] > hi[d] ? x[d] : hi[d];
		sum[d] += x[d];
	}
}

static void add_row(uint32_t D, const float *restrict x, float *restrict sum)
{
	uint32_t d = 0;
	for (; d + 8 <= D; d += 8)
		for (uint32_t j = d; j < d + 8; j++)
			sum[j] += x[j];
	for (; d < D; d++)
		sum[d] += x[d];
}

/*
 * A page's summary, token row after token row: the per-channel loops run over
 * contiguous floats (vectorized; fminf/fmaxf would be libm calls here), and each sum
 * adds its tokens in the same order as a channel-by-channel pass would. A NaN element
 * is skipped by the bounds, as fminf/fmaxf skip it.
 */
static int cpu_summarize(struct kvt_compute *base, const struct kvt_summarize_args *a, void *stream)
{
	(void)stream;
	struct cpu_compute *c = (struct cpu_compute *)base;
	const uint32_t D = a->g.head_dim, T = a->g.page_tokens, R = a->g.reps, dt = a->g.dtype;
	const uint32_t per_rep = R ? T / R : 0;
	const size_t rec = kvt_summary_record_bytes(&a->g);
	/* lo, hi, the key and value sums, each representative's sum, a row */
	float *lo = scratch(c, (size_t)(5 + R) * D);
	if (!lo)
		return -ENOMEM;
	float *hi = lo + D, *ks = hi + D, *vs = ks + D, *rs = vs + D, *row = rs + (size_t)R * D;
	for (uint32_t i = 0; i < a->n; i++) {
		const uint8_t *k = (const uint8_t *)a->pool + (uint64_t)a->slots[i] * a->slot_bytes;
		uint8_t *out = (uint8_t *)a->summaries + (uint64_t)a->records[i] * rec;
		for (uint32_t d = 0; d < D; d++) {
			lo[d] = INFINITY;
			hi[d] = -INFINITY;
		}
		memset(ks, 0, (size_t)(2 + R) * D * sizeof(float));
		for (uint32_t t = 0; t < T; t++) {
			load_row(row, k, (size_t)t * D, D, dt);
			bounds_add_row(D, row, lo, hi, ks);
			if (per_rep && t / per_rep < R)
				add_row(D, row, rs + (size_t)(t / per_rep) * D);
			load_row(row, k, (size_t)(T + t) * D, D, dt);
			add_row(D, row, vs);
		}
		for (uint32_t d = 0; d < D; d++) {
			kvt_store_elem(out, d, dt, lo[d]);
			kvt_store_elem(out, D + d, dt, hi[d]);
			for (uint32_t r = 0; r < R; r++)
				kvt_store_elem(out, (size_t)(2 + r) * D + d, dt,
					       rs[(size_t)r * D + d] / (float)per_rep);
			kvt_store_elem(out, (size_t)(2 + R) * D + d, dt, ks[d] / (float)T);
			kvt_store_elem(out, (size_t)(3 + R) * D + d, dt, vs[d] / (float)T);
		}
	}
	return 0;
}

/* scale * q.kmean of the record s for one query head qg (floats) */
static float est_logit(const struct kvt_estimate_args *a, const float *qg, const uint8_t *s)
{
	const uint32_t D = a->g.head_dim;
	const size_t at = (size_t)(2 + a->g.reps) * D;
	float dot = 0;
	for (uint32_t d = 0; d < D; d++)
		dot += qg[d] * kvt_load_elem(s, at + d, a->g.dtype);
	return dot * a->scale;
}

/* kvt_estimate with subtract: the entries' terms out of est, in its m */
static int cpu_estimate_sub(struct kvt_compute *base, const struct kvt_estimate_args *a)
{
	struct cpu_compute *c = (struct cpu_compute *)base;
	const uint32_t D = a->g.head_dim, G = a->g.group, T = a->g.page_tokens, R = a->g.reps,
		       dt = a->g.dtype;
	const size_t rec = kvt_summary_record_bytes(&a->g);
	float *q = scratch(c, (size_t)G * D);
	if (!q)
		return -ENOMEM;
	for (uint32_t r = 0; r < a->rows; r++) {
		const uint32_t n = (uint32_t)a->n_full[r], ns = (uint32_t)a->n_sel[r];
		const size_t base_rec = a->row_base ? (size_t)a->row_base[r] : (size_t)r * a->sum_stride;
		for (size_t i = 0; i < (size_t)G * D; i++)
			q[i] = kvt_load_elem(a->q, (size_t)r * G * D + i, dt);
		for (uint32_t g = 0; g < G; g++) {
			float *e = a->est + ((size_t)r * G + g) * (D + 2);
			const float m = e[0], l0 = e[1];
			if (m == -INFINITY)
				continue;
			for (uint32_t i = 0; i < ns && i < a->stride; i++) {
				const int64_t p = (int64_t)a->sel[(size_t)r * a->stride + i] - a->sel_base -
						  (int64_t)r * a->sel_row_stride;
				if (p < 0 || p >= n)
					continue;
				const uint8_t *s = (const uint8_t *)a->summaries + (base_rec + p) * rec;
				const float w = (float)T * expf(est_logit(a, q + (size_t)g * D, s) - m);
				e[1] -= w;
				for (uint32_t d = 0; d < D; d++)
					e[2 + d] -= w * kvt_load_elem(s, (size_t)(3 + R) * D + d, dt);
			}
			if (!(e[1] > 1e-6f * l0)) { /* nothing left but rounding */
				memset(e, 0, (D + 2) * sizeof(float));
				e[0] = -INFINITY;
			}
		}
	}
	return 0;
}

static int cpu_estimate(struct kvt_compute *base, const struct kvt_estimate_args *a, void *stream)
{
	if (a->subtract)
		return cpu_estimate_sub(base, a);
	struct cpu_compute *c = (struct cpu_compute *)base;
	const uint32_t D = a->g.head_dim, G = a->g.group, T = a->g.page_tokens, R = a->g.reps,
		       dt = a->g.dtype;
	const size_t rec = kvt_summary_record_bytes(&a->g);
	uint32_t most = 0;
	for (uint32_t r = 0; r < a->rows; r++)
		most = (uint32_t)a->n_full[r] > most ? (uint32_t)a->n_full[r] : most;
	float *q = scratch(c, (size_t)G * D + (size_t)G * most + most);
	if (!q)
		return -ENOMEM;
	float *z = q + (size_t)G * D, *out = z + (size_t)G * most;
	uint8_t *left = (uint8_t *)out; /* [most]: 1 where the page is left out */
	for (uint32_t r = 0; r < a->rows; r++) {
		const uint32_t n = (uint32_t)a->n_full[r];
		for (size_t i = 0; i < (size_t)G * D; i++)
			q[i] = kvt_load_elem(a->q, (size_t)r * G * D + i, dt);
		memset(left, 1, n);
		const uint32_t ns = a->stride ? (uint32_t)a->n_sel[r] : 0;
		for (uint32_t i = 0; i < ns && i < a->stride; i++) {
			int64_t p = (int64_t)a->sel[(size_t)r * a->stride + i] - a->sel_base -
				    (int64_t)r * a->sel_row_stride;
			if (p >= 0 && p < n)
				left[p] = 0;
		}
		const size_t base_rec = a->row_base ? (size_t)a->row_base[r] : (size_t)r * a->sum_stride;
		for (uint32_t g = 0; g < G; g++) {
			float m = -INFINITY;
			for (uint32_t p = 0; p < n; p++) {
				if (!left[p])
					continue;
				const uint8_t *s = (const uint8_t *)a->summaries + (base_rec + p) * rec;
				z[(size_t)g * most + p] = est_logit(a, q + (size_t)g * D, s);
				m = fmaxf(m, z[(size_t)g * most + p]);
			}
			float *e = a->est + ((size_t)r * G + g) * (D + 2);
			memset(e, 0, (D + 2) * sizeof(float));
			e[0] = m;
			if (m == -INFINITY)
				continue;
			for (uint32_t p = 0; p < n; p++) {
				if (!left[p])
					continue;
				const uint8_t *s = (const uint8_t *)a->summaries + (base_rec + p) * rec;
				const float w = (float)T * expf(z[(size_t)g * most + p] - m);
				e[1] += w;
				for (uint32_t d = 0; d < D; d++)
					e[2 + d] += w * kvt_load_elem(s, (size_t)(3 + R) * D + d, dt);
			}
		}
	}
	return 0;
}

static int cpu_score(struct kvt_compute *base, const struct kvt_score_args *a, void *stream)
{
	struct cpu_compute *c = (struct cpu_compute *)base;
	const uint32_t D = a->g.head_dim, G = a->g.group, R = a->g.reps, dt = a->g.dtype;
	const size_t rec = kvt_summary_record_bytes(&a->g);
	float *q = scratch(c, (size_t)G * D);
	if (!q)
		return -ENOMEM;
	for (uint32_t r = 0; r < a->rows; r++) {
		for (size_t i = 0; i < (size_t)G * D; i++)
			q[i] = kvt_load_elem(a->q, (size_t)r * G * D + i, dt);
		uint32_t n = (uint32_t)a->n_pages[r];
		if (n > a->stride)
			n = a->stride;
		for (uint32_t p = 0; p < n; p++) {
			size_t idx = (size_t)r * a->stride + p;
			size_t recno = a->sum_index ? (size_t)a->sum_index[idx]
				       : a->row_base ? (size_t)a->row_base[r] + p : idx;
			const uint8_t *s = (const uint8_t *)a->summaries + recno * rec;
			float agg = a->agg == KVT_GQA_SUM ? 0.0f : -INFINITY;
			for (uint32_t g = 0; g < G; g++) {
				const float *qg = q + (size_t)g * D;
				float v;
				if (a->method == KVT_SCORE_QUEST) {
					v = 0;
					for (uint32_t d = 0; d < D; d++) {
						float lo = qg[d] * kvt_load_elem(s, d, dt);
						float hi = qg[d] * kvt_load_elem(s, D + d, dt);
						v += fmaxf(lo, hi);
					}
				} else {
					v = -INFINITY;
					for (uint32_t j = 0; j < R; j++) {
						float dot = 0;
						for (uint32_t d = 0; d < D; d++)
							dot += qg[d] *
							       kvt_load_elem(s, (size_t)(2 + j) * D + d, dt);
						v = fmaxf(v, dot);
					}
				}
				agg = a->agg == KVT_GQA_SUM ? agg + v : fmaxf(agg, v);
			}
			a->scores[idx] = agg;
		}
	}
	return 0;
}

struct rank {
	uint32_t key;
	uint32_t page;
};

static int rank_cmp(const void *x, const void *y)
{
	const struct rank *a = x, *b = y;
	if (a->key != b->key)
		return a->key > b->key ? -1 : 1;
	return a->page < b->page ? -1 : a->page > b->page;
}

static int cpu_select(struct kvt_compute *base, const struct kvt_select_args *a, void *stream)
{
	uint8_t *chosen = malloc(a->stride);
	struct rank *rk = malloc(sizeof(*rk) * a->stride);
	if (!chosen || !rk) {
		free(chosen);
		free(rk);
		return -ENOMEM;
	}
	for (uint32_t r = 0; r < a->rows; r++) {
		uint32_t n = (uint32_t)a->n_pages[r];
		if (n > a->stride)
			n = a->stride;
		uint32_t tail = a->tail_len ? (uint32_t)a->tail_len[r] : 0;
		const float *sc = a->scores ? a->scores + (size_t)r * a->stride : NULL;
		uint32_t sinks, win0, forced = 0, nr = 0;
		kvt_forced_pages(n, tail, a->page_tokens, a->sink_tokens, a->window_tokens, &sinks,
				 &win0);
		bool all = a->mode == KVT_SELECT_TOPK && n <= a->budget_pages;
		for (uint32_t p = 0; p < n; p++) {
			chosen[p] = all || p < sinks || p >= win0;
			if (chosen[p])
				forced++;
			else
				rk[nr++] = (struct rank){kvt_score_key(sc[p]), p};
		}
		qsort(rk, nr, sizeof(*rk), rank_cmp);
		uint32_t take = 0;
		if (a->mode == KVT_SELECT_TOPK) {
			take = a->budget_pages > forced ? a->budget_pages - forced : 0;
		} else if (nr) {
			float m = -INFINITY;
			for (uint32_t p = 0; p < n; p++)
				if (sc[p] == sc[p])
					m = fmaxf(m, a->logit_scale * sc[p]);
			float z = 0, mass = 0;
			for (uint32_t p = 0; p < n; p++) {
				float w = sc[p] == sc[p] ? expf(a->logit_scale * sc[p] - m) : 0.0f;
				z += w;
				if (chosen[p])
					mass += w;
			}
			float target = a->top_p * z * (1.0f - 1e-6f); /* rounding slack */
			if (!isfinite(m)) {
				take = nr; /* no usable estimate: best scores up to the cap */
			} else if (mass < target) {
				take = nr; /* rounding left the target out of reach: all */
				for (uint32_t i = 0; i < nr; i++) {
					float s = sc[rk[i].page];
					mass += s == s ? expf(a->logit_scale * s - m) : 0.0f;
					if (mass >= target) {
						take = i + 1;
						while (take < nr && rk[take].key == rk[i].key)
							take++;
						break;
					}
				}
			}
			uint32_t cap = a->budget_pages > forced ? a->budget_pages - forced : 0;
			if (take > cap)
				take = cap;
		}
		if (take > nr)
			take = nr;
		for (uint32_t i = 0; i < take; i++)
			chosen[rk[i].page] = 1;
		int32_t *out = a->out + (size_t)r * a->out_stride;
		uint32_t k = 0;
		for (uint32_t p = 0; p < n; p++)
			if (chosen[p])
				out[k++] = a->slot_map ? a->slot_map[(size_t)r * a->stride + p] : (int32_t)p;
		a->n_out[r] = (int32_t)k;
	}
	free(chosen);
	free(rk);
	return 0;
}

/* Row r's table (and its report the first time); the pages that matter and are missing. */
static int32_t cpu_resolve_row(const struct kvt_resolve_args *a, size_t r, bool again)
{
	const size_t rows = a->rows;
	int32_t *report = again ? NULL : a->report;
	int32_t n = a->n_sel[r], k = 0, nh = 0, nw = 0;
	if (n < 0)
		n = 0;
	if ((uint32_t)n > a->stride)
		n = (int32_t)a->stride;
	const int32_t *sel = a->sel + r * a->stride;
	const float *sc = a->scores ? a->scores + r * a->score_stride : NULL;
	const int32_t win = sc ? a->n_full[r] - (int32_t)a->window_pages : 0;
	float floor = -INFINITY;
	if (sc) {
		float best = -INFINITY;
		for (int32_t i = 0; i < n; i++)
			if (sel[i] >= (int32_t)a->sink_pages && sel[i] < win && sc[sel[i]] > best)
				best = sc[sel[i]];
		floor = best - a->host_gap;
	}
	for (int32_t i = 0; i < n; i++) {
		const int32_t p = sel[i];
		const bool matters = !sc || p < (int32_t)a->sink_pages || p >= win || sc[p] >= floor;
		int32_t slot = __atomic_load_n(&a->map[(size_t)a->row_base[r] + (size_t)p],
					       __ATOMIC_RELAXED);
		if (slot >= 0 && (slot & KVT_SLOT_HOST) && !matters)
			slot = -1; /* not worth the bus this step */
		nw += matters && slot < 0;
		if (report)
			report[3 * rows + r * a->stride + (size_t)i] =
				p | (matters ? KVT_PAGE_MATTERS : 0) |
				(matters && slot < 0 && a->ack ? KVT_PAGE_WAIT : 0);
		if (slot < 0)
			continue;
		a->table[r * a->stride + (size_t)k] = slot;
		nh += (slot & KVT_SLOT_HOST) != 0;
		if (a->pages)
			a->pages[r * a->stride + (size_t)k] = p;
		k++;
	}
	a->n_table[r] = k;
	if (report) {
		report[r] = n;
		report[rows + r] = k;
		report[2 * rows + r] = nh;
	}
	return nw;
}

static uint64_t mono_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int cpu_resolve(struct kvt_compute *base, const struct kvt_resolve_args *a, void *stream)
{
	(void)base;
	(void)stream;
	uint32_t missing = 0;
	for (size_t r = 0; r < a->rows; r++)
		missing += (uint32_t)cpu_resolve_row(a, r, false);
	if (!a->report)
		return 0;
	__atomic_store_n(&a->ready[1], missing, __ATOMIC_RELAXED);
	__atomic_store_n(a->ready, a->token, __ATOMIC_RELEASE);
	if (!a->ack || !missing)
		return 0;
	/* the keeper of the map runs in another process: it answers within microseconds
	 * to milliseconds (a read from disk) */
	const uint64_t t0 = mono_ns();
	for (uint32_t spins = 0; (int32_t)(__atomic_load_n(a->ack, __ATOMIC_ACQUIRE) - a->token) < 0 &&
				 mono_ns() - t0 < a->wait_ns;
	     spins++)
		if (spins > 64)
			nanosleep(&(struct timespec){.tv_nsec = 20000}, NULL);
	for (size_t r = 0; r < a->rows; r++)
		cpu_resolve_row(a, r, true);
	return 0;
}

static int cpu_put_rows(struct kvt_compute *base, const struct kvt_put_rows_args *a, void *stream)
{
	(void)base;
	(void)stream;
	const size_t row = (size_t)a->g.head_dim * kvt_dtype_size(a->g.dtype), T = a->g.page_tokens;
	const uint64_t stride = a->slot_stride ? a->slot_stride : 1;
	for (uint32_t i = 0; i < (a->nseq ? a->nseq : 1); i++) {
		const uint64_t slot0 = a->nseq ? a->seq_slot0[i] : a->slot0;
		const size_t pos0 = a->nseq ? a->seq_pos[i] : a->pos0;
		for (uint32_t t = 0; t < a->ntok; t++)
			for (uint32_t h = 0; h < a->heads; h++) {
				uint8_t *page = (uint8_t *)a->pool + (slot0 + h * stride) * a->slot_bytes;
				size_t src = (((size_t)i * a->ntok + t) * a->heads + h) * row, pos = pos0 + t;
				memcpy(page + pos * row, (const uint8_t *)a->k + src, row);
				memcpy(page + (T + pos) * row, (const uint8_t *)a->v + src, row);
			}
	}
	return 0;
}

static int cpu_scatter_i32(struct kvt_compute *base, int32_t *dst, const int32_t *pairs, uint32_t n)
{
	(void)base;
	/* the map another process's kernels read: whole words */
	for (uint32_t i = 0; i < n; i++)
		__atomic_store_n(&dst[pairs[2 * i]], pairs[2 * i + 1], __ATOMIC_RELEASE);
	return 0;
}

/* Entry e of row r (e == n: the tail): a pool slot, a host-pool slot or a tail slot. */
static const uint8_t *page_addr(const struct kvt_attend_args *a, uint32_t r, uint32_t e,
				uint32_t n, int32_t tslot)
{
	if (e == n)
		return (const uint8_t *)(a->tail_pool ? a->tail_pool : a->pool) +
		       (uint64_t)tslot * a->slot_bytes;
	int32_t s = a->table[(size_t)r * a->stride + e];
	if (s & KVT_SLOT_HOST)
		return (const uint8_t *)a->host_pool +
		       (uint64_t)(s & ~KVT_SLOT_HOST) * a->host_slot_bytes;
	return (const uint8_t *)a->pool + (uint64_t)s * a->slot_bytes;
}

static int cpu_attend(struct kvt_compute *base, const struct kvt_attend_args *a, void *stream)
{
	struct cpu_compute *c = (struct cpu_compute *)base;
	const uint32_t D = a->g.head_dim, G = a->g.group, T = a->g.page_tokens, dt = a->g.dtype;
	float *q = scratch(c, (size_t)D + (size_t)(a->stride + 1) * T + D);
	if (!q)
		return -ENOMEM;
	float *logit = q + D, *acc = logit + (size_t)(a->stride + 1) * T;
	for (uint32_t r = 0; r < a->rows; r++) {
		uint32_t n = (uint32_t)a->n_pages[r];
		if (n > a->stride)
			n = a->stride;
		int32_t tslot = a->tail_slot ? a->tail_slot[r] : -1;
		uint32_t tlen = tslot >= 0 ? (uint32_t)a->tail_len[r] : 0;
		if (tlen > T)
			tlen = T;
		for (uint32_t g = 0; g < G; g++) {
			size_t qo = ((size_t)r * G + g) * D;
			for (uint32_t d = 0; d < D; d++)
				q[d] = kvt_load_elem(a->q, qo + d, dt);
			uint32_t nt = 0;
			float m = -INFINITY;
			for (uint32_t e = 0; e <= n; e++) {
				uint32_t len = e < n ? T : tlen;
				const uint8_t *k = page_addr(a, r, e, n, tslot);
				for (uint32_t t = 0; t < len; t++) {
					float dot = 0;
					for (uint32_t d = 0; d < D; d++)
						dot += q[d] * kvt_load_elem(k, (size_t)t * D + d, dt);
					logit[nt] = dot * a->scale;
					m = fmaxf(m, logit[nt++]);
				}
			}
			float l = 0;
			memset(acc, 0, sizeof(float) * D);
			nt = 0;
			for (uint32_t e = 0; e <= n; e++) {
				uint32_t len = e < n ? T : tlen;
				const uint8_t *v = page_addr(a, r, e, n, tslot) +
						   (size_t)T * D * kvt_dtype_size(dt);
				for (uint32_t t = 0; t < len; t++) {
					float p = expf(logit[nt++] - m);
					l += p;
					for (uint32_t d = 0; d < D; d++)
						acc[d] += p * kvt_load_elem(v, (size_t)t * D + d, dt);
				}
			}
			if (a->lse)
				a->lse[(size_t)r * G + g] = nt ? m + logf(l) : -INFINITY;
			const float *e = a->est ? a->est + ((size_t)r * G + g) * (D + 2) : NULL;
			if (e && e[0] > -INFINITY && e[1] > 0) { /* the pages left out, estimated */
				const float mm = nt && m > e[0] ? m : e[0];
				const float wa = nt ? expf(m - mm) : 0.0f, we = expf(e[0] - mm);
				l = l * wa + e[1] * we;
				for (uint32_t d = 0; d < D; d++)
					acc[d] = acc[d] * wa + e[2 + d] * we;
				nt = 1;
			}
			for (uint32_t d = 0; d < D; d++)
				kvt_store_elem(a->out, qo + d, dt, nt ? acc[d] / l : 0.0f);
		}
	}
	return 0;
}

static int cpu_sync(struct kvt_compute *c, void *stream)
{
	return 0;
}

const struct kvt_compute_ops kvt_compute_cpu_ops = {
	.name = "cpu",
	.version = KVT_COMPUTE_OPS_VERSION,
	.open = cpu_open,
	.close = cpu_close,
	.alloc = cpu_alloc,
	.free = cpu_free,
	.upload = cpu_copy,
	.download = cpu_copy,
	.memset = cpu_memset,
	.summarize = cpu_summarize,
	.score = cpu_score,
	.select = cpu_select,
	.attend = cpu_attend,
	.sync = cpu_sync,
	.copy_async = cpu_copy_async,
	.host_alloc = cpu_alloc,
	.host_free = cpu_free,
	.resolve = cpu_resolve,
	.put_rows = cpu_put_rows,
	.scatter_i32 = cpu_scatter_i32,
	.estimate = cpu_estimate,
	.select_resolve = NULL, /* the two calls */
	.put_async = cpu_copy_async,
};
