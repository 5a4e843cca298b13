// SPDX-License-Identifier: MIT
/*
 * kvtier-bench: end-to-end decode steps, four ways, in one run.
 *
 *   dense    all KV in device memory, attention over every page (kvtier's paged
 *            decode kernel: 0.94 of flash attention's bandwidth, tools/BENCHMARKS.md);
 *   reload   all KV in pinned host memory, each layer's KV copied to the device in one
 *            large copy before its attention (what whole-prefix offload does at decode);
 *   sparse   all KV in device memory, Quest selection (page min/max bounds, top-k,
 *            sinks and window) then attention over the selected pages, in-process;
 *   kvtier   a kvtierd of its own holds the KV across its GPU pool (--gpu-budget of the
 *            KV), pinned host RAM (--host-budget) and NVMe; per layer the client
 *            appends the step's token, selects (the daemon scores, picks, brings up what
 *            is missing, and prefetches for the next step) and attends.
 *
 * Every method reads the same KV and queries, made by one deterministic generator with
 * the structure real attention shows: attention sinks (the first 4 tokens, small
 * values), decay with distance (16 rotary-like frequency pairs from 32 to 32768
 * tokens), topical pages that a slowly drifting query moves between, planted needle
 * pages (4 per head; the query looks for one of them, a new one every 8 steps), two
 * outlier channels, and values with a per-channel mean. Per method: step time
 * p50/p99/mean (all layers of one decode step, every sequence of the batch),
 * tokens/s (from the mean step), equivalent bandwidth (the whole context's KV bytes over the step time),
 * bytes over PCIe and from NVMe per step, the prefetch hit rate; for the sparse ones,
 * the share of the true softmax mass their pages cover, the output's relative error
 * against dense attention over the whole context, and needle recall.
 *
 *   kvtier-bench [--model NAME] [--context 32K,128K] [--batch 1,8] [--budget 2048] ...
 *   kvtier-bench --cpu --small        (the CI smoke run)
 *
 * Output: a table (last), optional CSV (--csv) and PNG plots (--plot DIR, gnuplot).
 */
#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ipc/kvtier.h"
#include "kernels/compute.h"
#include "tiers/device.h"

/* ---- options ---- */

struct shape {
	const char *name;
	uint32_t layers, kv_heads, group, head_dim;
};

static const struct shape models[] = {
	{"llama-3.1-8b", 32, 8, 4, 128},
	{"llama-3.1-70b", 80, 8, 8, 128},
	{"mistral-7b", 32, 8, 4, 128},
	{"qwen2.5-7b", 28, 4, 7, 128},
	{"small", 4, 2, 2, 64},
};

enum method { M_DENSE, M_RELOAD, M_SPARSE, M_KVTIER, M_N };
static const char *const mname[M_N] = {"dense", "reload", "sparse", "kvtier"};

#define MAXLIST 16

struct opts {
	struct shape m;
	uint32_t dtype, page, budget, sink, window, dense_layers;
	uint32_t ctx[MAXLIST], nctx, batch[MAXLIST], nbatch;
	uint32_t steps, warmup, threads;
	double gpu_frac, host_frac, host_gap;
	int32_t wait_us;
	unsigned methods, estimate;
	const char *device, *kvtierd, *socket, *dir, *csv, *plot, *daemon_stats;
	bool progress, keep, substitute, sync_select, write_back;
	uint32_t subst_gap;
	const char *dopt[32];
	uint32_t ndopt;
	uint64_t seed;
};

static struct opts O = {
	.m = {"llama-3.1-8b", 32, 8, 4, 128},
	.dtype = KVTIER_BF16,
	.page = 64,
	.budget = 2048,
	.sink = 64,
	.window = 256,
	.ctx = {32768, 131072},
	.nctx = 2,
	.batch = {1},
	.nbatch = 1,
	.steps = 32,
	.warmup = 8,
	.gpu_frac = 0.10,
	.host_frac = 0.50,
	.methods = (1u << M_N) - 1,
	.estimate = (1u << M_SPARSE) | (1u << M_KVTIER),
	.device = "auto",
	.seed = 1,
};

/* ---- time, progress ---- */

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double last_bar;

static void bar(const char *what, uint64_t done, uint64_t total)
{
	if (!O.progress)
		return;
	double t = now();
	if (done < total && t - last_bar < 0.1)
		return;
	last_bar = t;
	const int w = 30;
	int fill = total ? (int)((double)done / (double)total * w) : w;
	fprintf(stderr, "\r%-34s [%.*s%*s] %3d%%", what, fill, "##############################",
		w - fill, "", total ? (int)(100.0 * (double)done / (double)total) : 100);
	if (done >= total)
		fputs("\r\033[K", stderr);
	fflush(stderr);
}

static void fmt_tokens(char *b, size_t n, uint32_t t)
{
	if (t >= 1024 * 1024 && t % (1024 * 1024) == 0)
		snprintf(b, n, "%uM", t >> 20);
	else if (t >= 1024 && t % 1024 == 0)
		snprintf(b, n, "%uK", t >> 10);
	else
		snprintf(b, n, "%u", t);
}

/* ---- the generator ---- */

#define NC 64 /* topics */
#define NN 4  /* needle pages per head */
#define NF 16 /* position frequency pairs: dims 0 .. 2*NF-1 */
#define NSINK 4
#define NEEDLE_EVERY 8 /* steps between the query's needle changes */
#define ERR_TARGET 2e-2 /* issue #7's bound on the output's relative error */

/* logits (scale * q.k) each part of the structure adds */
#define A_SINK 13.0f
#define A_NEEDLE 11.0f
#define A_TOPIC 8.0f
#define A_POS 5.0f
#define NOISE_K 0.3f
#define NOISE_Q 0.3f
#define OUTLIER_K 5.0f
#define OUTLIER_Q 0.5f

static inline uint64_t mix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

/* uniform, mean 0, variance 1 */
static inline float unoise(uint64_t h)
{
	return ((float)(h >> 40) * (1.0f / 16777216.0f) - 0.5f) * 3.4641016f;
}

/* One run: a context length and a batch size. */
struct run {
	uint32_t N, B, S; /* context, batch, steps in all (warm-up included) */
	uint32_t L, H, G, D, T, rows, P, Pc, K;
	size_t esz, slot_bytes, layer_bytes, page_bytes;
	double scale, omega[NF];
	void *q;          /* [S][L][rows][G][D], host */
	void *ref_out;    /* [steps][L][rows][G][D], host: dense attention's answers */
	float *ref_lse;   /* [steps][L][rows][G] */
	bool have_ref;
};

/* The constant parts of one head of one sequence (a "row" of one layer). */
struct grow {
	uint64_t seed;
	uint32_t topic_a, topic_b, needle[NN], out_d[2];
	float *dir; /* [1 + NC + NN + 1][D]: sink, topics, needles, value mean */
};

#define DIR_SINK 0
#define DIR_TOPIC 1
#define DIR_NEEDLE (1 + NC)
#define DIR_VMEAN (1 + NC + NN)
#define NDIR (2 + NC + NN)

static int page_topic(const struct grow *g, uint32_t p)
{
	if (p == 0)
		return -1;
	for (int j = 0; j < NN; j++)
		if (g->needle[j] == p)
			return -1;
	uint64_t h = mix(g->seed ^ 0x70706c ^ ((uint64_t)p << 20));
	return (h & 7) ? -1 : (int)((h >> 8) % NC);
}

static int page_needle(const struct grow *g, uint32_t p)
{
	for (int j = 0; j < NN; j++)
		if (g->needle[j] == p)
			return j;
	return -1;
}

static uint64_t row_seed(uint32_t l, uint32_t b, uint32_t h)
{
	return mix(O.seed ^ mix(((uint64_t)l << 40) | ((uint64_t)b << 20) | h));
}

/* Needle j of a row: spread over the middle of the context, away from sinks and window. */
static uint32_t needle_page(const struct run *r, uint64_t seed, uint32_t j)
{
	const uint32_t span = r->Pc > O.window / r->T + 3 ? r->Pc - O.window / r->T - 2 : 1;
	const uint32_t cell = span / NN ? span / NN : 1;
	return 1 + j * cell + (uint32_t)(mix(seed ^ 0x6e6565 ^ j) % cell);
}

static void grow_init(const struct run *r, struct grow *g, float *dir, uint32_t l, uint32_t b,
		      uint32_t h)
{
	const uint32_t D = r->D, c0 = 2 * NF;
	g->seed = row_seed(l, b, h);
	g->dir = dir;
	for (uint32_t i = 0; i < NDIR; i++) {
		float *v = dir + (size_t)i * D, n2 = 0;
		for (uint32_t d = 0; d < D; d++) {
			v[d] = d < c0 ? 0.0f : unoise(mix(g->seed ^ ((uint64_t)(i + 1) << 32) ^ d));
			n2 += v[d] * v[d];
		}
		if (i == DIR_VMEAN)
			continue; /* a mean of variance 1 per channel */
		for (uint32_t d = 0; d < D; d++)
			v[d] /= sqrtf(n2);
	}
	for (uint32_t j = 0; j < NN; j++)
		g->needle[j] = needle_page(r, g->seed, j);
	/* the query's two topics: ones that some page early and late in the context has */
	g->topic_a = g->topic_b = (uint32_t)(mix(g->seed ^ 0xab) % NC);
	for (uint32_t p = r->Pc / 3, f = 0; p < r->Pc && !f; p++)
		if (page_topic(g, p) >= 0)
			g->topic_a = (uint32_t)page_topic(g, p), f = 1;
	for (uint32_t p = 2 * r->Pc / 3, f = 0; p < r->Pc && !f; p++)
		if (page_topic(g, p) >= 0 && (uint32_t)page_topic(g, p) != g->topic_a)
			g->topic_b = (uint32_t)page_topic(g, p), f = 1;
	g->out_d[0] = c0 + (uint32_t)(mix(O.seed ^ l ^ 0x0d1) % (D - c0));
	g->out_d[1] = c0 + (uint32_t)(mix(O.seed ^ l ^ 0x0d2) % (D - c0));
}

static void gen_kv(const struct run *r, const struct grow *g, uint32_t t, float *k, float *v)
{
	const uint32_t D = r->D, p = t / r->T;
	const int tp = page_topic(g, p), nd = page_needle(g, p);
	const float *us = g->dir + (size_t)DIR_SINK * D, *vm = g->dir + (size_t)DIR_VMEAN * D;
	const float *ut = tp >= 0 ? g->dir + (size_t)(DIR_TOPIC + tp) * D : NULL;
	const float *un = nd >= 0 ? g->dir + (size_t)(DIR_NEEDLE + nd) * D : NULL;
	const uint64_t base = g->seed ^ ((uint64_t)t << 24);
	for (uint32_t i = 0; i < NF; i++) {
		double s, c;
		sincos(r->omega[i] * t, &s, &c);
		k[2 * i] = (float)c + 0.1f * unoise(mix(base ^ (2 * i)));
		k[2 * i + 1] = (float)s + 0.1f * unoise(mix(base ^ (2 * i + 1)));
	}
	for (uint32_t d = 2 * NF; d < D; d++) {
		float x = NOISE_K * unoise(mix(base ^ d));
		if (t < NSINK)
			x += A_SINK * us[d];
		if (ut)
			x += A_TOPIC * ut[d];
		if (un)
			x += A_NEEDLE * un[d];
		if (d == g->out_d[0] || d == g->out_d[1])
			x += OUTLIER_K;
		k[d] = x;
	}
	for (uint32_t d = 0; d < D; d++) {
		float x = vm[d] + unoise(mix(base ^ 0x5a5a0000 ^ d));
		v[d] = t < NSINK ? 0.1f * x : x;
	}
}

/* The needle the query of step s looks for. */
static uint32_t query_needle(uint64_t seed, uint32_t s)
{
	return (uint32_t)(mix(seed ^ 0x9e ^ ((uint64_t)(s / NEEDLE_EVERY) << 8)) % NN);
}

static void gen_q(const struct run *r, const struct grow *g, uint32_t s, uint32_t gi, float *q)
{
	const uint32_t D = r->D;
	const double n = (double)r->N + s; /* the position of the step's token */
	const float rt = sqrtf((float)D), Q = A_POS * rt / NF;
	const float th = (float)(M_PI / 2 * s / r->S), ca = cosf(th), sa = sinf(th);
	const float *us = g->dir + (size_t)DIR_SINK * D;
	const float *ua = g->dir + (size_t)(DIR_TOPIC + g->topic_a) * D;
	const float *ub = g->dir + (size_t)(DIR_TOPIC + g->topic_b) * D;
	const float *un = g->dir + (size_t)(DIR_NEEDLE + query_needle(g->seed, s)) * D;
	const uint64_t base = g->seed ^ 0x7177 ^ ((uint64_t)s << 24) ^ ((uint64_t)gi << 16);
	for (uint32_t i = 0; i < NF; i++) {
		double sn, cs;
		sincos(r->omega[i] * n, &sn, &cs);
		q[2 * i] = Q * (float)cs;
		q[2 * i + 1] = Q * (float)sn;
	}
	for (uint32_t d = 2 * NF; d < D; d++) {
		float x = rt * (us[d] + ca * ua[d] + sa * ub[d] + un[d]) + NOISE_Q * unoise(mix(base ^ d));
		if (d == g->out_d[0] || d == g->out_d[1])
			x += OUTLIER_Q;
		q[d] = x;
	}
}

/* ---- dtypes ---- */

static inline uint16_t f2bf(float f)
{
	uint32_t u;
	memcpy(&u, &f, 4);
	u += 0x7fff + ((u >> 16) & 1);
	return (uint16_t)(u >> 16);
}

static inline float bf2f(uint16_t h)
{
	uint32_t u = (uint32_t)h << 16;
	float f;
	memcpy(&f, &u, 4);
	return f;
}

static void put(void *dst, size_t i, float x)
{
	switch (O.dtype) {
	case KVTIER_BF16:
		((uint16_t *)dst)[i] = f2bf(x);
		break;
	case KVTIER_F16:
		((_Float16 *)dst)[i] = (_Float16)x;
		break;
	default:
		((float *)dst)[i] = x;
	}
}

static float get(const void *src, size_t i)
{
	switch (O.dtype) {
	case KVTIER_BF16:
		return bf2f(((const uint16_t *)src)[i]);
	case KVTIER_F16:
		return (float)((const _Float16 *)src)[i];
	default:
		return ((const float *)src)[i];
	}
}

/* ---- a parallel for ---- */

struct pfor {
	void (*fn)(void *arg, uint64_t i);
	void *arg;
	uint64_t n, next;
	pthread_mutex_t lock;
};

static void *pfor_worker(void *a)
{
	struct pfor *p = a;
	for (;;) {
		pthread_mutex_lock(&p->lock);
		uint64_t i = p->next++;
		pthread_mutex_unlock(&p->lock);
		if (i >= p->n)
			return NULL;
		p->fn(p->arg, i);
	}
}

static void parallel_for(uint64_t n, void (*fn)(void *, uint64_t), void *arg)
{
	struct pfor p = {.fn = fn, .arg = arg, .n = n, .lock = PTHREAD_MUTEX_INITIALIZER};
	uint32_t nt = O.threads ? O.threads : (uint32_t)sysconf(_SC_NPROCESSORS_ONLN);
	if (nt > 64)
		nt = 64;
	if (nt < 1)
		nt = 1;
	pthread_t th[64];
	uint32_t started = 0;
	for (uint32_t i = 1; i < nt; i++)
		if (pthread_create(&th[started], NULL, pfor_worker, &p) == 0)
			started++;
	pfor_worker(&p);
	for (uint32_t i = 0; i < started; i++)
		pthread_join(th[i], NULL);
}

/* A row's generator, with room for one token's K and V (or one query, in k). */
struct gen {
	struct grow g;
	float *k, *v;
};

static void gen_open(const struct run *r, struct gen *x, uint32_t l, uint32_t b, uint32_t h)
{
	float *dir = malloc(((size_t)NDIR + 2) * r->D * sizeof(float));
	if (!dir)
		abort();
	grow_init(r, &x->g, dir, l, b, h);
	x->k = dir + (size_t)NDIR * r->D;
	x->v = x->k + r->D;
}

static void gen_close(struct gen *x)
{
	free(x->g.dir);
}

/* One layer's KV in page layout: row r's page p in slot r * P + p of dst. */
struct fill_pages {
	const struct run *r;
	uint32_t l;
	uint8_t *dst;
};

#define PAGES_PER_ITEM 32

static void fill_pages_item(void *a, uint64_t it)
{
	const struct fill_pages *f = a;
	const struct run *r = f->r;
	const uint32_t chunks = (r->P + PAGES_PER_ITEM - 1) / PAGES_PER_ITEM;
	const uint32_t row = (uint32_t)(it / chunks), p0 = (uint32_t)(it % chunks) * PAGES_PER_ITEM;
	struct gen x;
	gen_open(r, &x, f->l, row / r->H, row % r->H);
	const uint32_t end = r->N + r->S;
	for (uint32_t p = p0; p < p0 + PAGES_PER_ITEM && p < r->P; p++) {
		uint8_t *slot = f->dst + ((size_t)row * r->P + p) * r->slot_bytes;
		memset(slot, 0, r->slot_bytes);
		for (uint32_t i = 0; i < r->T && p * r->T + i < end; i++) {
			gen_kv(r, &x.g, p * r->T + i, x.k, x.v);
			for (uint32_t d = 0; d < r->D; d++) {
				put(slot, (size_t)i * r->D + d, x.k[d]);
				put(slot, (size_t)(r->T + i) * r->D + d, x.v[d]);
			}
		}
	}
	gen_close(&x);
}

static void fill_layer_pages(const struct run *r, uint32_t l, void *dst)
{
	struct fill_pages f = {r, l, dst};
	parallel_for((uint64_t)r->rows * ((r->P + PAGES_PER_ITEM - 1) / PAGES_PER_ITEM),
		     fill_pages_item, &f);
}

/* Tokens [t0, t0 + n) of sequence b, layer l, token-major: K/V [n][H][D]. */
struct fill_tok {
	const struct run *r;
	uint32_t l, b, t0, n;
	uint8_t *k, *v;
};

#define TOK_PER_ITEM 256

static void fill_tok_item(void *a, uint64_t it)
{
	const struct fill_tok *f = a;
	const struct run *r = f->r;
	const uint32_t chunks = (f->n + TOK_PER_ITEM - 1) / TOK_PER_ITEM;
	const uint32_t h = (uint32_t)(it / chunks), i0 = (uint32_t)(it % chunks) * TOK_PER_ITEM;
	struct gen x;
	gen_open(r, &x, f->l, f->b, h);
	for (uint32_t i = i0; i < i0 + TOK_PER_ITEM && i < f->n; i++) {
		gen_kv(r, &x.g, f->t0 + i, x.k, x.v);
		size_t o = ((size_t)i * r->H + h) * r->D;
		for (uint32_t d = 0; d < r->D; d++) {
			put(f->k, o + d, x.k[d]);
			put(f->v, o + d, x.v[d]);
		}
	}
	gen_close(&x);
}

static void fill_tokens(const struct run *r, uint32_t l, uint32_t b, uint32_t t0, uint32_t n,
			void *k, void *v)
{
	struct fill_tok f = {r, l, b, t0, n, k, v};
	const uint64_t items = (uint64_t)r->H * ((n + TOK_PER_ITEM - 1) / TOK_PER_ITEM);
	if (n < TOK_PER_ITEM) /* a few tokens: threads would cost more than they save */
		for (uint64_t i = 0; i < items; i++)
			fill_tok_item(&f, i);
	else
		parallel_for(items, fill_tok_item, &f);
}

/* One chunk of kvtier's prefill: chunk i of (layer, sequence, tokens), generated into k
 * and v (on a thread of its own while the one before goes through kvtierd). */
struct prefill_chunk {
	const struct run *r;
	uint32_t l, b, t, n;
	uint8_t *k, *v;
	double s; /* seconds it took */
};

static void chunk_at(struct prefill_chunk *c, const struct run *r, uint64_t i, uint32_t chunk)
{
	const uint64_t per_seq = (r->N + chunk - 1) / chunk;
	c->r = r;
	c->l = (uint32_t)(i / (r->B * per_seq));
	c->b = (uint32_t)(i / per_seq % r->B);
	c->t = (uint32_t)(i % per_seq) * chunk;
	c->n = r->N - c->t < chunk ? r->N - c->t : chunk;
}

static void *chunk_fill(void *arg)
{
	struct prefill_chunk *c = arg;
	const double t0 = now();
	fill_tokens(c->r, c->l, c->b, c->t, c->n, c->k, c->v);
	c->s = now() - t0;
	return NULL;
}

/* A parallel fill of the run's queries or its steps' tokens into dst. */
struct fill_dst {
	const struct run *r;
	uint8_t *dst;
};

/* Every query: [S][L][rows][G][D]. */
static void fill_q_item(void *a, uint64_t it)
{
	const struct fill_dst *f = a;
	const struct run *r = f->r;
	const uint32_t l = (uint32_t)(it / r->rows), row = (uint32_t)(it % r->rows);
	struct gen x;
	gen_open(r, &x, l, row / r->H, row % r->H);
	for (uint32_t s = 0; s < r->S; s++)
		for (uint32_t gi = 0; gi < r->G; gi++) {
			gen_q(r, &x.g, s, gi, x.k);
			size_t o = ((((size_t)s * r->L + l) * r->rows + row) * r->G + gi) * r->D;
			for (uint32_t d = 0; d < r->D; d++)
				put(f->dst, o + d, x.k[d]);
		}
	gen_close(&x);
}

/* The steps' tokens, one cache write a layer: [S][L] x (K [rows][D], V [rows][D]). */
static void fill_step_item(void *a, uint64_t it)
{
	const struct fill_dst *f = a;
	const struct run *r = f->r;
	const uint32_t l = (uint32_t)(it / r->rows), row = (uint32_t)(it % r->rows);
	struct gen x;
	gen_open(r, &x, l, row / r->H, row % r->H);
	for (uint32_t s = 0; s < r->S; s++) {
		gen_kv(r, &x.g, r->N + s, x.k, x.v);
		const size_t o = ((size_t)s * r->L + l) * 2 * r->rows * r->D + (size_t)row * r->D;
		for (uint32_t d = 0; d < r->D; d++) {
			put(f->dst, o + d, x.k[d]);
			put(f->dst, o + (size_t)r->rows * r->D + d, x.v[d]);
		}
	}
	gen_close(&x);
}

/* ---- results ---- */

struct result {
	bool ran;
	char why[256];
	double p50, p99, mean;
	double pcie, nvme; /* bytes per step */
	double hit;        /* < 0: not applicable */
	double ahead;      /* selected pages on the GPU or on their way (late): < 0 n/a */
	double cover, err_mean, err_max, recall; /* < 0: not measured */
	uint64_t n_err, n_rec, n_found;
	uint64_t err_over;              /* layer-steps whose error is above ERR_TARGET */
	uint32_t err_max_ts, err_max_l; /* where the largest was: timed step, layer */
	double cover_sum, err_sum;
	uint64_t n_cover;
	double prefill_s, flush_s, gen_s; /* gen_s: the prefill's KV generation, alongside */
	char extra[768];
};

static int cmp_d(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static void times_done(struct result *res, double *t, uint32_t n)
{
	double sum = 0;
	for (uint32_t i = 0; i < n; i++)
		sum += t[i];
	qsort(t, n, sizeof(*t), cmp_d);
	res->p50 = t[n / 2];
	res->p99 = t[(uint32_t)((n - 1) * 0.99 + 0.5)];
	res->mean = sum / n;
	res->ran = true;
}

static void acc_init(struct result *res)
{
	res->hit = res->ahead = res->cover = res->err_mean = res->err_max = res->recall = -1;
}

/*
 * Compares one timed step's outputs (layer after layer, [L][rows][G][D] and
 * [L][rows][G], host) with the reference, and, when this method is the reference,
 * keeps them.
 */
static void check_step(struct run *r, struct result *res, uint32_t ts, const void *out,
		       const float *lse, bool keep)
{
	const size_t per = (size_t)r->rows * r->G * r->D, lper = (size_t)r->rows * r->G;
	if (keep) {
		memcpy((uint8_t *)r->ref_out + (size_t)ts * r->L * per * r->esz, out,
		       r->L * per * r->esz);
		memcpy(r->ref_lse + (size_t)ts * r->L * lper, lse, r->L * lper * sizeof(float));
		return;
	}
	if (!r->have_ref)
		return;
	const uint8_t *ro = (const uint8_t *)r->ref_out + (size_t)ts * r->L * per * r->esz;
	const float *rl = r->ref_lse + (size_t)ts * r->L * lper;
	for (uint32_t l = 0; l < r->L; l++) {
		double num = 0, den = 0;
		for (size_t i = 0; i < per; i++) {
			double a = get(out, l * per + i), b = get(ro, l * per + i);
			num += (a - b) * (a - b);
			den += b * b;
		}
		double e = den > 0 ? sqrt(num / den) : 0;
		res->err_sum += e;
		res->n_err++;
		res->err_over += e > ERR_TARGET;
		if (e > res->err_max) {
			res->err_max = e;
			res->err_max_ts = ts;
			res->err_max_l = l;
		}
		for (size_t i = 0; i < lper; i++) {
			double c = exp((double)lse[l * lper + i] - (double)rl[l * lper + i]);
			res->cover_sum += c > 1 ? 1 : c;
			res->n_cover++;
		}
	}
}

/* Was the page the query of step s looks for among the row's pages? */
static void check_needle(const struct run *r, struct result *res, uint32_t s, uint32_t l,
			 uint32_t row, const int32_t *pages, int32_t n, int32_t base)
{
	const uint64_t seed = row_seed(l, row / r->H, row % r->H);
	const int32_t want = (int32_t)needle_page(r, seed, query_needle(seed, s));
	res->n_rec++;
	for (int32_t i = 0; i < n; i++)
		if (pages[i] - base == want) {
			res->n_found++;
			return;
		}
}

static void acc_done(struct result *res)
{
	if (res->n_err) {
		res->err_mean = res->err_sum / (double)res->n_err;
		res->cover = res->cover_sum / (double)res->n_cover;
	} else {
		res->err_max = -1;
	}
	if (res->n_rec)
		res->recall = (double)res->n_found / (double)res->n_rec;
}

/* ---- the in-process methods ---- */

struct gpu {
	struct kvt_compute *cc;
	struct kvt_device *dev;
};

static void *dalloc(struct gpu *g, size_t n)
{
	void *p = NULL;
	return kvt_compute_alloc(g->cc, n, &p) < 0 ? NULL : p;
}

/* Device arrays every in-process method uses: tables and per-step row metadata. */
struct meta {
	int32_t *table;   /* [L][rows][P]: slot (l * rows + r) * P + p */
	int32_t *npg, *tlen, *tail; /* [rows], [rows], [L][rows] */
	void *q;          /* [S][L][rows][G][D] */
	void *tok;        /* the steps' tokens, fill_step_item's layout */
	int32_t *sum_ids; /* [L][rows]: the slots of the pages a step fills */
	void *out;        /* [L][rows][G][D] */
	float *lse;       /* [L][rows][G] */
	void *h_out;      /* host copies */
	float *h_lse;
};

static void meta_free(struct gpu *g, struct meta *m)
{
	kvt_compute_free(g->cc, m->table);
	kvt_compute_free(g->cc, m->npg);
	kvt_compute_free(g->cc, m->q);
	kvt_compute_free(g->cc, m->tok);
	kvt_compute_free(g->cc, m->sum_ids);
	kvt_compute_free(g->cc, m->out);
	kvt_compute_free(g->cc, m->lse);
	free(m->h_out);
	free(m->h_lse);
	memset(m, 0, sizeof(*m));
}

static int meta_init(struct gpu *g, struct run *r, struct meta *m, uint32_t layers_in_table)
{
	const size_t cells = (size_t)layers_in_table * r->rows * r->P;
	const size_t qb = (size_t)r->S * r->L * r->rows * r->G * r->D * r->esz;
	const size_t ob = (size_t)r->L * r->rows * r->G * r->D * r->esz;
	const size_t lb = (size_t)r->L * r->rows * r->G * sizeof(float);
	const size_t tb = (size_t)r->S * r->L * 2 * r->rows * r->D * r->esz;
	memset(m, 0, sizeof(*m));
	m->table = dalloc(g, cells * sizeof(int32_t));
	m->npg = dalloc(g, ((size_t)2 + r->L) * r->rows * sizeof(int32_t));
	m->q = dalloc(g, qb);
	m->tok = dalloc(g, tb);
	m->sum_ids = dalloc(g, (size_t)r->L * r->rows * sizeof(int32_t));
	m->out = dalloc(g, ob);
	m->lse = dalloc(g, lb);
	m->h_out = malloc(ob);
	m->h_lse = malloc(lb);
	int32_t *t = malloc(cells * sizeof(int32_t));
	uint8_t *tok = malloc(tb);
	if (!m->table || !m->npg || !m->q || !m->tok || !m->sum_ids || !m->out || !m->lse ||
	    !m->h_out || !m->h_lse || !t || !tok) {
		free(t);
		free(tok);
		meta_free(g, m);
		return -ENOMEM;
	}
	struct fill_dst fs = {r, tok};
	parallel_for((uint64_t)r->L * r->rows, fill_step_item, &fs);
	m->tlen = m->npg + r->rows;
	m->tail = m->tlen + r->rows;
	for (size_t i = 0; i < cells; i++)
		t[i] = (int32_t)i;
	int ret = kvt_compute_upload(g->cc, m->table, t, cells * sizeof(int32_t));
	free(t);
	if (ret == 0)
		ret = kvt_compute_upload(g->cc, m->q, r->q, qb);
	if (ret == 0)
		ret = kvt_compute_upload(g->cc, m->tok, tok, tb);
	free(tok);
	if (ret < 0)
		meta_free(g, m);
	return ret;
}

/* Row metadata of step s: every row holds N + s + 1 tokens. */
static int meta_step(struct gpu *g, struct run *r, struct meta *m, uint32_t s, uint32_t layers)
{
	const uint32_t ntok = r->N + s + 1;
	int32_t *h = malloc(((size_t)2 + r->L) * r->rows * sizeof(int32_t));
	if (!h)
		return -ENOMEM;
	for (uint32_t row = 0; row < r->rows; row++) {
		h[row] = (int32_t)(ntok / r->T);
		h[r->rows + row] = (int32_t)(ntok % r->T);
		for (uint32_t l = 0; l < layers; l++)
			h[(2 + l) * r->rows + row] =
				ntok % r->T ? (int32_t)(((size_t)l * r->rows + row) * r->P + ntok / r->T)
					    : -1;
	}
	int ret = kvt_compute_upload(g->cc, m->npg, h, ((size_t)2 + layers) * r->rows * sizeof(int32_t));
	if (ret == 0 && ntok % r->T == 0) { /* the step fills a page: its summary is due */
		for (size_t i = 0; i < (size_t)layers * r->rows; i++)
			h[i] = (int32_t)(i * r->P + ntok / r->T - 1);
		ret = kvt_compute_upload(g->cc, m->sum_ids, h, (size_t)layers * r->rows * sizeof(int32_t));
	}
	free(h);
	return ret;
}

/*
 * The cache write of step s's token into layer l's pages (the pool's table tl, an
 * engine's [rows][pages] layout): what every method's step does before its attention,
 * kvtier's through kvtier_append_async. The pages already hold it (the same bytes are
 * written again); sums, when the step fills a page, gets the page's summary as well
 * (Quest's pages are scored once full).
 */
static int write_token(struct gpu *g, struct run *r, struct meta *m, void *pool, uint32_t l,
		       uint32_t tl, uint32_t s, void *sums)
{
	const uint32_t pos = r->N + s, page = pos / r->T;
	const size_t half = (size_t)r->rows * r->D * r->esz;
	const uint8_t *k = (const uint8_t *)m->tok + ((size_t)s * r->L + l) * 2 * half;
	const struct kvt_geom geo = {.head_dim = r->D, .page_tokens = r->T, .group = r->G,
				     .dtype = O.dtype};
	struct kvt_put_rows_args a = {
		.g = geo, .heads = r->rows, .ntok = 1, .pos0 = pos % r->T, .slot_stride = r->P,
		.k = k, .v = k + half, .pool = pool, .slot_bytes = r->slot_bytes,
		.slot0 = (uint64_t)tl * r->rows * r->P + page};
	int ret = kvt_put_rows(g->cc, &a, NULL);
	if (ret == 0 && sums && (pos + 1) % r->T == 0) {
		const int32_t *ids = m->sum_ids + (size_t)tl * r->rows;
		struct kvt_summarize_args sa = {.g = geo, .pool = pool, .slot_bytes = r->slot_bytes,
						.slots = ids, .records = ids, .summaries = sums,
						.n = r->rows};
		ret = kvt_summarize(g->cc, &sa, NULL);
	}
	return ret;
}

static void attend_args(struct run *r, struct meta *m, const void *pool, uint32_t l,
			uint32_t tl, uint32_t s, struct kvt_attend_args *a)
{
	const size_t qper = (size_t)r->rows * r->G * r->D;
	*a = (struct kvt_attend_args){
		.g = {.head_dim = r->D, .page_tokens = r->T, .group = r->G, .dtype = O.dtype},
		.rows = r->rows, .stride = r->P, .scale = (float)r->scale,
		.q = (const uint8_t *)m->q + ((size_t)s * r->L + l) * qper * r->esz,
		.pool = pool, .slot_bytes = r->slot_bytes,
		.table = m->table + (size_t)tl * r->rows * r->P, .n_pages = m->npg,
		.tail_slot = m->tail + (size_t)tl * r->rows, .tail_len = m->tlen,
		.out = (uint8_t *)m->out + l * qper * r->esz,
		.lse = m->lse + (size_t)l * r->rows * r->G,
	};
}

static int fetch_out(struct gpu *g, struct run *r, struct meta *m)
{
	const size_t ob = (size_t)r->L * r->rows * r->G * r->D * r->esz;
	int ret = kvt_compute_download(g->cc, m->h_out, m->out, ob);
	if (ret == 0)
		ret = kvt_compute_download(g->cc, m->h_lse, m->lse,
					   (size_t)r->L * r->rows * r->G * sizeof(float));
	return ret;
}

static void label(char *b, size_t n, const struct run *r, enum method k, const char *what)
{
	char c[16];
	fmt_tokens(c, sizeof(c), r->N);
	snprintf(b, n, "%s %s b%u: %s", mname[k], c, r->B, what);
}

/* dense and sparse: the KV in device memory, filled once, both timed over it. */
static void run_resident(struct gpu *g, struct run *r, struct result *res_dense,
			 struct result *res_sparse)
{
	const bool want_dense = O.methods & (1u << M_DENSE), want_sparse = O.methods & (1u << M_SPARSE);
	char lb[96];
	struct meta m;
	void *pool = NULL, *sums = NULL, *host = NULL;
	float *scores = NULL, *est = NULL, *est_work = NULL;
	uint32_t *est_sync = NULL;
	/* the estimate over every page runs on a stream of its own beside the selection
	 * (as libkvtier's), the selected pages taken out once it is known */
	struct kvt_compute *side_cc = NULL;
	struct kvt_fence *f_up = NULL, *f_est = NULL;
	void *main_s = kvt_compute_stream(g->cc), *side_s = NULL;
	int32_t *sel = NULL, *ids = NULL;
	double *times = calloc(r->S, sizeof(double));
	const size_t rec = kvt_summary_record_bytes(&(struct kvt_geom){
		.head_dim = r->D, .page_tokens = r->T, .group = r->G, .dtype = O.dtype});
	if (!times || meta_init(g, r, &m, r->L) < 0) {
		snprintf(res_dense->why, sizeof(res_dense->why), "out of device memory (tables)");
		snprintf(res_sparse->why, sizeof(res_sparse->why), "%s", res_dense->why);
		free(times);
		return;
	}
	pool = dalloc(g, r->L * r->layer_bytes);
	host = malloc(r->layer_bytes);
	if (!pool || !host) {
		snprintf(res_dense->why, sizeof(res_dense->why), "the KV (%.1f GiB) does not fit in %s memory",
			 (double)(r->L * r->layer_bytes) / (1 << 30), kvt_compute_name(g->cc));
		snprintf(res_sparse->why, sizeof(res_sparse->why), "%s", res_dense->why);
		goto out;
	}
	for (uint32_t l = 0; l < r->L; l++) {
		label(lb, sizeof(lb), r, M_DENSE, "KV to device");
		bar(lb, l, r->L);
		fill_layer_pages(r, l, host);
		if (kvt_compute_upload(g->cc, (uint8_t *)pool + l * r->layer_bytes, host, r->layer_bytes) < 0) {
			snprintf(res_dense->why, sizeof(res_dense->why), "upload failed");
			snprintf(res_sparse->why, sizeof(res_sparse->why), "upload failed");
			goto out;
		}
	}
	bar(lb, 1, 1);
	for (int k = 0; k < 2; k++) {
		enum method mk = k ? M_SPARSE : M_DENSE;
		struct result *res = k ? res_sparse : res_dense;
		if (!(k ? want_sparse : want_dense))
			continue;
		acc_init(res);
		if (k) { /* Quest summaries of every page, scores, selections */
			const size_t cells = (size_t)r->L * r->rows * r->P;
			sums = dalloc(g, cells * rec);
			scores = dalloc(g, (size_t)r->rows * r->P * sizeof(float));
			sel = dalloc(g, ((size_t)r->K + 1) * r->L * r->rows * sizeof(int32_t));
			ids = malloc(cells * sizeof(int32_t));
			int32_t *dids = dalloc(g, cells * sizeof(int32_t));
			int ret = !sums || !scores || !sel || !ids || !dids ? -ENOMEM : 0;
			if (!ret && (O.estimate & (1u << M_SPARSE))) { /* the pages left out, estimated */
				const struct kvt_geom eg = {.head_dim = r->D, .page_tokens = r->T,
							    .group = r->G, .dtype = O.dtype};
				est = dalloc(g, (size_t)r->rows * r->G * (r->D + 2) * sizeof(float));
				est_work = dalloc(g, kvt_estimate_work_bytes(&eg, r->rows, r->P));
				est_sync = dalloc(g, (size_t)r->rows * r->G * sizeof(uint32_t));
				ret = !est || !est_work || !est_sync ? -ENOMEM
				      : kvt_compute_memset(g->cc, est_sync, 0,
							   (size_t)r->rows * r->G * sizeof(uint32_t));
				if (!ret && main_s &&
				    kvt_compute_open(kvt_compute_name(g->cc), &side_cc) == 0 &&
				    g->dev->ops->fence_create(g->dev, NULL, NULL, &f_up) == 0 &&
				    g->dev->ops->fence_create(g->dev, NULL, NULL, &f_est) == 0)
					side_s = kvt_compute_stream(side_cc);
			}
			uint32_t n = 0; /* pages full by the last step */
			for (size_t i = 0; !ret && i < cells; i++)
				if ((i % r->P + 1) * r->T <= r->N + r->S)
					ids[n++] = (int32_t)i;
			if (!ret)
				ret = kvt_compute_upload(g->cc, dids, ids, n * sizeof(int32_t));
			struct kvt_summarize_args sa = {
				.g = {.head_dim = r->D, .page_tokens = r->T, .group = r->G, .dtype = O.dtype},
				.pool = pool, .slot_bytes = r->slot_bytes, .slots = dids, .records = dids,
				.summaries = sums, .n = n};
			if (!ret)
				ret = kvt_summarize(g->cc, &sa, NULL);
			if (!ret)
				ret = kvt_compute_sync(g->cc, NULL);
			kvt_compute_free(g->cc, dids);
			if (ret) {
				snprintf(res->why, sizeof(res->why), "summaries: %s", strerror(-ret));
				continue;
			}
		}
		int32_t *h_sel = k ? malloc(((size_t)r->K + 1) * r->L * r->rows * sizeof(int32_t)) : NULL;
		int ret = k && !h_sel ? -ENOMEM : 0;
		uint32_t nt = 0;
		/* KVTIER_TIMING=2 (as libkvtier's): each call waited for, its time kept */
		const bool tsync = getenv("KVTIER_TIMING") && atoi(getenv("KVTIER_TIMING")) > 1;
		double tsel = 0, tatt = 0;
		label(lb, sizeof(lb), r, mk, "steps");
		for (uint32_t s = 0; s < r->S && !ret; s++) {
			bar(lb, s, r->S);
			if ((ret = meta_step(g, r, &m, s, r->L)) < 0 || (ret = kvt_compute_sync(g->cc, NULL)) < 0)
				break;
			double t0 = now();
			for (uint32_t l = 0; l < r->L && !ret; l++) {
				struct kvt_attend_args a;
				attend_args(r, &m, pool, l, l, s, &a);
				if ((ret = write_token(g, r, &m, pool, l, l, s, k ? sums : NULL)) < 0)
					break;
				if (k) {
					int32_t *so = sel + (size_t)l * r->rows * r->K;
					int32_t *sn = sel + (size_t)r->L * r->rows * r->K + (size_t)l * r->rows;
					struct kvt_score_args sc = {
						.g = a.g, .method = KVT_SCORE_QUEST, .agg = KVT_GQA_MAX,
						.rows = r->rows, .stride = r->P, .q = a.q,
						.summaries = (uint8_t *)sums + (size_t)l * r->rows * r->P * rec,
						.n_pages = m.npg, .scores = scores};
					struct kvt_select_args se = {
						.mode = KVT_SELECT_TOPK, .rows = r->rows, .stride = r->P,
						.out_stride = r->K, .budget_pages = O.budget / r->T,
						.page_tokens = r->T, .sink_tokens = O.sink,
						.window_tokens = O.window, .logit_scale = (float)r->scale,
						.scores = scores, .n_pages = m.npg, .tail_len = m.tlen,
						.slot_map = a.table, .out = so, .n_out = sn};
					struct kvt_estimate_args ea = {
						.g = a.g, .rows = r->rows, .max_pages = r->P,
						.scale = (float)r->scale, .sum_stride = r->P, .q = a.q,
						.summaries = sc.summaries, .n_full = m.npg,
						.sel_row_stride = r->P, .sel_base = (int64_t)l * r->rows * r->P,
						.sel = so, .n_sel = sn, .est = est, .work = est_work,
						.sync = est_sync};
					struct kvt_estimate_args es = ea; /* the selected pages out */
					es.stride = r->K;
					es.subtract = 1;
					const struct kvt_device_ops *dv = g->dev->ops;
					double u0 = tsync ? now() : 0;
					if (est && side_s && /* every page, beside the selection */
					    ((ret = dv->fence_record(g->dev, f_up, main_s)) < 0 ||
					     (ret = dv->fence_stream_wait(g->dev, f_up, side_s)) < 0 ||
					     (ret = kvt_estimate(g->cc, &ea, side_s)) < 0 ||
					     (ret = dv->fence_record(g->dev, f_est, side_s)) < 0))
						break;
					if (est && !side_s && (ret = kvt_estimate(g->cc, &ea, NULL)) < 0)
						break;
					if ((ret = kvt_score(g->cc, &sc, NULL)) < 0 ||
					    (ret = kvt_select(g->cc, &se, NULL)) < 0 ||
					    (est && side_s && (ret = dv->fence_stream_wait(g->dev, f_est, main_s)) < 0) ||
					    (est && (ret = kvt_estimate(g->cc, &es, NULL)) < 0))
						break;
					a.est = est;
					if (tsync && (ret = kvt_compute_sync(g->cc, NULL)) == 0 && s >= O.warmup)
						tsel += now() - u0;
					a.table = so;
					a.n_pages = sn;
					a.stride = r->K;
				}
				double u1 = tsync ? now() : 0;
				ret = kvt_attend(g->cc, &a, NULL);
				if (tsync && ret == 0 && (ret = kvt_compute_sync(g->cc, NULL)) == 0 && s >= O.warmup)
					tatt += now() - u1;
			}
			if (!ret)
				ret = kvt_compute_sync(g->cc, NULL);
			double t1 = now();
			if (ret || s < O.warmup)
				continue;
			times[nt++] = t1 - t0;
			if ((ret = fetch_out(g, r, &m)) < 0)
				break;
			check_step(r, res, s - O.warmup, m.h_out, m.h_lse, !k);
			if (k && (ret = kvt_compute_download(g->cc, h_sel, sel,
							     ((size_t)r->K + 1) * r->L * r->rows * sizeof(int32_t))) == 0)
				for (uint32_t l = 0; l < r->L; l++)
					for (uint32_t row = 0; row < r->rows; row++)
						check_needle(r, res, s, l, row,
							     h_sel + ((size_t)l * r->rows + row) * r->K,
							     h_sel[(size_t)r->L * r->rows * r->K + (size_t)l * r->rows + row],
							     (int32_t)(((size_t)l * r->rows + row) * r->P));
		}
		bar(lb, 1, 1);
		free(h_sel);
		if (ret) {
			snprintf(res->why, sizeof(res->why), "failed: %s", strerror(-ret));
			continue;
		}
		if (!k)
			r->have_ref = true;
		if (tsync && nt && k)
			snprintf(res->extra, sizeof(res->extra),
				 "each call waited for (KVTIER_TIMING=2), per layer: selection %.1f us, "
				 "attention %.1f us", tsel * 1e6 / nt / r->L, tatt * 1e6 / nt / r->L);
		else if (tsync && nt)
			snprintf(res->extra, sizeof(res->extra),
				 "each call waited for (KVTIER_TIMING=2): attention %.1f us per layer",
				 tatt * 1e6 / nt / r->L);
		times_done(res, times, nt);
		acc_done(res);
	}
out:
	free(times);
	free(host);
	free(ids);
	kvt_compute_free(g->cc, sums);
	kvt_compute_free(g->cc, scores);
	kvt_compute_free(g->cc, sel);
	kvt_compute_free(g->cc, est);
	kvt_compute_free(g->cc, est_work);
	kvt_compute_free(g->cc, est_sync);
	if (side_cc)
		kvt_compute_sync(side_cc, NULL);
	if (f_up)
		g->dev->ops->fence_destroy(g->dev, f_up);
	if (f_est)
		g->dev->ops->fence_destroy(g->dev, f_est);
	kvt_compute_close(side_cc);
	kvt_compute_free(g->cc, pool);
	meta_free(g, &m);
}

/* reload: the KV in pinned host memory; every layer copied up before its attention. */
static void run_reload(struct gpu *g, struct run *r, struct result *res)
{
	char lb[96];
	struct meta m;
	acc_init(res);
	double *times = calloc(r->S, sizeof(double));
	const size_t hb = r->L * r->layer_bytes;
	uint8_t *host = mmap(NULL, hb, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	void *buf = NULL;
	bool pinned = false;
	if (!times || host == MAP_FAILED || meta_init(g, r, &m, 1) < 0) {
		snprintf(res->why, sizeof(res->why), "out of memory (%.1f GiB of host memory)",
			 (double)hb / (1 << 30));
		if (host != MAP_FAILED)
			munmap(host, hb);
		free(times);
		return;
	}
	label(lb, sizeof(lb), r, M_RELOAD, "KV to pinned memory");
	for (uint32_t l = 0; l < r->L; l++) {
		bar(lb, l, r->L);
		fill_layer_pages(r, l, host + l * r->layer_bytes);
	}
	bar(lb, 1, 1);
	int ret = g->dev->ops->host_register(g->dev, host, hb);
	if (ret < 0) {
		snprintf(res->why, sizeof(res->why), "pinning %.1f GiB: %s", (double)hb / (1 << 30),
			 strerror(-ret));
		goto out;
	}
	pinned = true;
	if (!(buf = dalloc(g, r->layer_bytes))) {
		snprintf(res->why, sizeof(res->why), "out of device memory");
		goto out;
	}
	uint32_t nt = 0;
	label(lb, sizeof(lb), r, M_RELOAD, "steps");
	for (uint32_t s = 0; s < r->S && !ret; s++) {
		bar(lb, s, r->S);
		if ((ret = meta_step(g, r, &m, s, 1)) < 0 || (ret = kvt_compute_sync(g->cc, NULL)) < 0)
			break;
		double t0 = now();
		for (uint32_t l = 0; l < r->L && !ret; l++) {
			struct kvt_attend_args a;
			attend_args(r, &m, buf, l, 0, s, &a);
			/* the copy runs on the device's own stream: the last layer's attention
			 * must be done with the buffer first */
			if ((ret = kvt_compute_sync(g->cc, NULL)) < 0 ||
			    (ret = g->dev->ops->memcpy(g->dev, buf, host + l * r->layer_bytes,
						       r->layer_bytes, KVT_H2D)) < 0 ||
			    (ret = write_token(g, r, &m, buf, l, 0, s, NULL)) < 0)
				break;
			ret = kvt_attend(g->cc, &a, NULL);
		}
		if (!ret)
			ret = kvt_compute_sync(g->cc, NULL);
		double t1 = now();
		if (ret || s < O.warmup)
			continue;
		times[nt++] = t1 - t0;
		if ((ret = fetch_out(g, r, &m)) == 0) {
			bool keep = !r->have_ref;
			check_step(r, res, s - O.warmup, m.h_out, m.h_lse, keep);
		}
	}
	bar(lb, 1, 1);
	if (ret) {
		snprintf(res->why, sizeof(res->why), "failed: %s", strerror(-ret));
		goto out;
	}
	/* the reference is ours where dense could not run */
	bool was_ref = !r->have_ref;
	r->have_ref = true;
	times_done(res, times, nt);
	res->pcie = (double)hb;
	acc_done(res);
	if (was_ref)
		snprintf(res->extra, sizeof(res->extra), "the reference (dense did not run)");
out:
	if (pinned)
		g->dev->ops->host_unregister(g->dev, host);
	kvt_compute_free(g->cc, buf);
	munmap(host, hb);
	meta_free(g, &m);
	free(times);
}

/* ---- kvtier ---- */

static char self_dir[PATH_MAX - 32];

static const char *find_kvtierd(char *buf, size_t n)
{
	if (O.kvtierd)
		return O.kvtierd;
	const char *e = getenv("KVTIERD");
	if (e && *e)
		return e;
	snprintf(buf, n, "%s/../kvtierd", self_dir); /* the build tree: build/tools/.. */
	if (access(buf, X_OK) == 0)
		return buf;
	snprintf(buf, n, "%s/../sbin/kvtierd", self_dir); /* installed: bin/../sbin */
	if (access(buf, X_OK) == 0)
		return buf;
	return "kvtierd";
}

static void rm_rf(const char *path)
{
	DIR *d = opendir(path);
	if (d) {
		struct dirent *e;
		while ((e = readdir(d))) {
			if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
				continue;
			char p[PATH_MAX];
			snprintf(p, sizeof(p), "%s/%s", path, e->d_name);
			rm_rf(p);
		}
		closedir(d);
		rmdir(path);
	} else {
		unlink(path);
	}
}

struct daemon {
	pid_t pid;
	char dir[PATH_MAX - 64], sock[PATH_MAX], log[PATH_MAX];
	uint64_t host_bytes; /* its host tier's arena */
};

/*
 * The client's data area: the pages a step fills in every layer (a page of each KV head
 * of each sequence, all layers in flight until their next append: libkvtier's
 * flush_pages), and a third more (the fast path's reports take a quarter of it); 64 MiB at least, 1 GiB
 * at most (the daemon started here allows it). 256 MiB of pages at batch 32 of the
 * 8B model, where 64 MiB held six layers' and the seventh waited for the first's answers.
 */
static uint64_t data_bytes_for(const struct run *r)
{
	uint64_t b = (uint64_t)r->L * r->B * r->H * ((r->page_bytes + 4095) & ~4095ull);
	b += b / 3;
	b = (b + (1u << 20) - 1) & ~((1ull << 20) - 1);
	return b < (64ull << 20) ? 64ull << 20 : b > (1ull << 30) ? 1ull << 30 : b;
}

/* Starts kvtierd for r; on failure, why says what the user can do about it. */
static int daemon_start(struct daemon *dm, const struct run *r, const char *device, char *why,
			size_t whylen)
{
	const char *base = O.dir ? O.dir : getenv("TMPDIR") ? getenv("TMPDIR") : "/var/tmp";
	if (strlen(base) > sizeof(dm->dir) - 64) {
		snprintf(why, whylen, "--dir: a path too long");
		return -ENAMETOOLONG;
	}
	snprintf(dm->dir, sizeof(dm->dir), "%s/kvtier-bench-XXXXXX", base);
	if (!mkdtemp(dm->dir)) {
		snprintf(why, whylen, "kvtierd's directory in %s: %s", base, strerror(errno));
		return -errno;
	}
	snprintf(dm->sock, sizeof(dm->sock), "%s/kvtierd.sock", dm->dir);
	snprintf(dm->log, sizeof(dm->log), "%s/kvtierd.log", dm->dir);
	const uint64_t kv = (uint64_t)r->B * r->L * r->H * ((uint64_t)r->N + r->S + r->T) * r->page_bytes / r->T;
	const uint64_t pages = (uint64_t)r->B * r->L * r->H * r->P;
	const size_t rec = kvt_summary_record_bytes(&(struct kvt_geom){
		.head_dim = r->D, .page_tokens = r->T, .group = r->G, .dtype = O.dtype});
	/* the tiers hold pages of the store's size (the model's, rounded up to 4 KiB) */
	const uint64_t store_page = (r->page_bytes + 4095) & ~4095ull;
	const uint64_t kv_slots = kv / r->page_bytes * store_page;
	/* each tier holds at least what the selections pin: a layer's pages stay pinned
	 * until that layer's next select, so every layer's, and one more */
	const uint64_t pin = ((uint64_t)r->L + 1) * r->rows * (r->K + 1) * store_page;
	uint64_t gpu = (uint64_t)(O.gpu_frac * (double)kv_slots),
		 host = (uint64_t)(O.host_frac * (double)kv_slots);
	if (gpu < pin)
		gpu = pin;
	if (host < pin)
		host = pin;
	dm->host_bytes = host;
	char a[10][PATH_MAX + 64];
	snprintf(a[0], sizeof(a[0]), "ipc.socket=%s", dm->sock);
	snprintf(a[1], sizeof(a[1]), "store.state_dir=%s", dm->dir);
	snprintf(a[2], sizeof(a[2]), "store.device=%s", device);
	snprintf(a[3], sizeof(a[3]), "tenant.gpu_bytes=%llu", (unsigned long long)gpu);
	snprintf(a[4], sizeof(a[4]), "tenant.host_bytes=%llu", (unsigned long long)host);
	/*
	 * The NVMe tier holds every page (a slot each: the page, rounded to 4 KiB, and a
	 * 4 KiB header); it must fit the disk under dir, or the run cannot be made here.
	 * With --write-back it holds what the host tier does not: the store takes pages
	 * while they fit the disk and the host tier below its low watermark (80%; a host
	 * slot is the page alone).
	 */
	uint64_t nvme = kv_slots + kv_slots / 64 + (256ull << 20);
	if (O.write_back) {
		const uint64_t in_host = (uint64_t)(0.8 * (double)(host / store_page)) * store_page;
		nvme = nvme > in_host + (1ull << 30) ? nvme - in_host : 1ull << 30;
	}
	const uint64_t disk = nvme / store_page * (store_page + 4096) + (1ull << 20);
	struct statvfs vs;
	if (statvfs(dm->dir, &vs) == 0 && disk > (uint64_t)vs.f_bavail * vs.f_frsize) {
		snprintf(why, whylen, "its NVMe tier needs %.1f GiB in %s, %.1f GiB free there "
				      "(--dir: a larger disk)",
			 (double)disk / (1 << 30), base,
			 (double)vs.f_bavail * vs.f_frsize / (1 << 30));
		return -ENOSPC;
	}
	snprintf(a[5], sizeof(a[5]), "store.nvme_bytes=%llu", (unsigned long long)nvme);
	snprintf(a[6], sizeof(a[6]), "tenant.summary_bytes=%llu",
		 (unsigned long long)(pages * rec + pages * rec / 4 + (64ull << 20)));
	snprintf(a[7], sizeof(a[7]), "ipc.max_batch=%u", r->B < 256 ? 256 : r->B);
	snprintf(a[8], sizeof(a[8]), "ipc.max_seqs=%u", r->B < 1024 ? 1024 : r->B);
	/* the store's page is this model's (a larger one would waste the pool) */
	snprintf(a[9], sizeof(a[9]), "store.page_bytes=%llu", (unsigned long long)store_page);
	char bin[PATH_MAX];
	const char *exe = find_kvtierd(bin, sizeof(bin));
	const char *argv[2 * (10 + 5 + 32) + 2]; /* ours, the fixed ones, the user's */
	int na = 0;
	argv[na++] = exe;
	for (int i = 0; i < 10; i++)
		argv[na++] = "-o", argv[na++] = a[i];
	argv[na++] = "-o", argv[na++] = "ipc.data_bytes_max=1G"; /* data_bytes_for() */
	argv[na++] = "-o", argv[na++] = "daemon.promote_timeout_ms=120000";
	argv[na++] = "-o", argv[na++] = "metrics.listen=off";
	if (O.write_back)
		argv[na++] = "-o", argv[na++] = "store.write_policy=back";
	char gap[64];
	snprintf(gap, sizeof(gap), "select.substitute_gap=%u", O.subst_gap);
	argv[na++] = "-o", argv[na++] = gap;
	for (uint32_t i = 0; i < O.ndopt; i++) /* the user's last */
		argv[na++] = "-o", argv[na++] = O.dopt[i];
	argv[na] = NULL;
	pid_t pid = fork();
	if (pid < 0) {
		snprintf(why, whylen, "kvtierd did not start: fork: %s", strerror(errno));
		return -errno;
	}
	if (pid == 0) {
		FILE *f = freopen(dm->log, "w", stderr);
		(void)f;
		dup2(2, 1);
		execvp(exe, (char *const *)argv);
		fprintf(stderr, "exec %s: %s\n", exe, strerror(errno));
		_exit(127);
	}
	dm->pid = pid;
	for (int i = 0; i < 1200; i++) { /* 120 s: a large pool takes a while to map */
		struct stat st;
		if (stat(dm->sock, &st) == 0)
			return 0;
		int status;
		if (waitpid(pid, &status, WNOHANG) == pid) {
			dm->pid = 0;
			if (WIFSIGNALED(status))
				snprintf(why, whylen, "kvtierd died at start (signal %d): its log on stderr",
					 WTERMSIG(status));
			else
				snprintf(why, whylen, "kvtierd exited at start (status %d): its log on stderr",
					 WEXITSTATUS(status));
			return -ECHILD;
		}
		usleep(100000);
	}
	snprintf(why, whylen, "kvtierd did not listen within 120 s: its log on stderr");
	return -ETIMEDOUT;
}

static void daemon_stop(struct daemon *dm, bool failed)
{
	if (dm->pid > 0) {
		kill(dm->pid, SIGTERM);
		int status;
		for (int i = 0; i < 300 && waitpid(dm->pid, &status, WNOHANG) != dm->pid; i++)
			usleep(100000);
		if (waitpid(dm->pid, &status, WNOHANG) == 0) {
			kill(dm->pid, SIGKILL);
			waitpid(dm->pid, &status, 0);
		}
	}
	/* the daemon's last words: all of them after a failure, else where its time went */
	FILE *f = dm->log[0] ? fopen(dm->log, "r") : NULL;
	char line[1024];
	if (f) {
		if (failed)
			fprintf(stderr, "kvtier-bench: kvtierd's log (%s):\n", dm->log);
		while (fgets(line, sizeof(line), f))
			if (failed || strstr(line, "per select"))
				fprintf(stderr, "  kvtierd: %s", line);
		fclose(f);
	}
	if (!O.keep && dm->dir[0])
		rm_rf(dm->dir);
}

/* The needles found in a step's table of layer l. */
static void needles(const struct run *r, struct result *res, uint32_t s, uint32_t l,
		    const struct kvtier_table *t)
{
	struct kvtier_table_view v;
	kvtier_table_view(t, &v);
	for (uint32_t row = 0; row < v.rows; row++)
		check_needle(r, res, s, l, row, v.pages + (size_t)row * v.stride, v.n_pages[row], 0);
}

static void run_kvtier(struct gpu *g, struct run *r, struct result *res, bool cuda)
{
	char lb[96];
	acc_init(res);
	struct daemon dm = {0};
	struct kvtier_client *c = NULL;
	struct kvtier_table *tab = NULL, **tabs = NULL;
	uint8_t *dnk = NULL;
	uint32_t *seqs = calloc(r->B, sizeof(uint32_t));
	double *times = calloc(r->S, sizeof(double));
	const size_t qper = (size_t)r->rows * r->G * r->D;
	const size_t tokb = (size_t)r->H * r->D * r->esz; /* one token of one layer, K or V */
	const uint32_t chunk = 8192;
	uint8_t *pk = malloc(4 * chunk * tokb); /* two chunks' K and V */
	/* the steps' tokens: [L][B] x (K [S][H][D], V [S][H][D]) */
	const size_t stepb = (size_t)r->S * tokb;
	uint8_t *nk = malloc((size_t)r->L * r->B * 2 * stepb);
	void *q = NULL, *out = NULL;
	float *lse = NULL;
	void *h_out = malloc((size_t)r->L * qper * r->esz);
	float *h_lse = malloc((size_t)r->L * r->rows * r->G * sizeof(float));
	int ret = 0;
	bool failed = false;
	if (!seqs || !times || !pk || !nk || !h_out || !h_lse) {
		snprintf(res->why, sizeof(res->why), "out of host memory");
		goto out;
	}
	label(lb, sizeof(lb), r, M_KVTIER, "the steps' tokens");
	for (uint32_t l = 0; l < r->L; l++)
		for (uint32_t b = 0; b < r->B; b++) {
			uint8_t *k = nk + ((size_t)l * r->B + b) * 2 * stepb;
			fill_tokens(r, l, b, r->N, r->S, k, k + stepb);
		}
	if (!O.socket) {
		if ((ret = daemon_start(&dm, r, cuda ? "cuda" : "cpu", res->why, sizeof(res->why))) < 0) {
			failed = true;
			goto out;
		}
	}
	struct kvtier_layout lo = {.layers = r->L, .kv_heads = r->H, .group = r->G, .head_dim = r->D,
				   .dtype = O.dtype, .page_tokens = r->T,
				   .dense_layers = O.dense_layers, .reps = 0};
	struct kvtier_attach_opts ao = {.socket = O.socket ? O.socket : dm.sock,
					.data_bytes = data_bytes_for(r),
					.max_live_seqs = r->B < 64 ? 64 : r->B};
	/* the fast path: selection on our stream, appends kept until a page is full */
	const bool fast = !O.sync_select;
	if (fast) {
		ao.max_context = r->N + r->S + r->T;
		ao.max_live_seqs = r->B;
	}
	if ((ret = kvtier_attach(&lo, &ao, &c)) < 0) {
		snprintf(res->why, sizeof(res->why), "attach: %s", strerror(-ret));
		failed = true;
		goto out;
	}
	if (strcmp(kvtier_backend(c), kvt_compute_name(g->cc))) {
		snprintf(res->why, sizeof(res->why), "the daemon's device is %s, ours %s",
			 kvtier_backend(c), kvt_compute_name(g->cc));
		goto out;
	}
	for (uint32_t b = 0; b < r->B; b++)
		if ((ret = kvtier_seq_create(c, &seqs[b])) < 0) {
			snprintf(res->why, sizeof(res->why), "seq_create: %s", strerror(-ret));
			goto out;
		}
	/* prefill: the context of every sequence, layer after layer */
	/* The next chunk's KV is generated while this one goes through kvtierd: the prefill
	 * times kvtierd's ingest, unless the generator is the slower. */
	double p0 = now();
	label(lb, sizeof(lb), r, M_KVTIER, "prefill through kvtierd");
	struct prefill_chunk ch[2];
	const uint64_t nch = (uint64_t)r->L * r->B * ((r->N + chunk - 1) / chunk);
	for (int i = 0; i < 2; i++) {
		ch[i].k = pk + (size_t)i * 2 * chunk * tokb;
		ch[i].v = ch[i].k + chunk * tokb;
	}
	chunk_at(&ch[0], r, 0, chunk);
	chunk_fill(&ch[0]);
	res->gen_s = ch[0].s;
	for (uint64_t i = 0; i < nch && !ret; i++) {
		struct prefill_chunk *cur = &ch[i & 1], *next = &ch[(i + 1) & 1];
		pthread_t th;
		bool ahead = false;
		if (i + 1 < nch) {
			chunk_at(next, r, i + 1, chunk);
			ahead = pthread_create(&th, NULL, chunk_fill, next) == 0;
		}
		bar(lb, i, nch);
		ret = kvtier_append(c, seqs[cur->b], cur->l, cur->k, cur->v, cur->n, KVT_MEM_HOST);
		if (ahead)
			pthread_join(th, NULL);
		else if (i + 1 < nch) /* no thread: here, after this one */
			chunk_fill(next);
		if (i + 1 < nch)
			res->gen_s += next->s;
	}
	bar(lb, 1, 1);
	res->prefill_s = now() - p0;
	if (ret < 0) {
		snprintf(res->why, sizeof(res->why), "prefill: %s", strerror(-ret));
		failed = true;
		goto out;
	}
	/*
	 * The prefill's write-back to NVMe goes on after the appends return: let it finish
	 * (kvtierctl flush waits for it), so that the steps measure decoding, not decoding
	 * beside a disk busy with gigabytes of writes.
	 */
	if (!O.socket) {
		char cmd[2 * PATH_MAX + 512], ctl[PATH_MAX];
		snprintf(ctl, sizeof(ctl), "%s/kvtierctl", self_dir);
		if (!O.write_back)
			snprintf(cmd, sizeof(cmd), "'%s' --socket '%s' flush >/dev/null", ctl, dm.sock);
		else /* write-back: the pages written for room until the counts stand still */
			snprintf(cmd, sizeof(cmd),
				 "p=; for i in $(seq 3000); do n=$('%s' --socket '%s' --json stats | "
				 "grep -o '\"write\\(backs\\|s_for_room\\)\": *[0-9]*' | tr -d ' \\n'); "
				 "[ -n \"$n\" ] && [ \"$n\" = \"$p\" ] && exit 0; p=$n; sleep 0.2; "
				 "done; exit 1", ctl, dm.sock);
		double f0 = now();
		if (access(ctl, X_OK) < 0 || system(cmd) != 0)
			fprintf(stderr, "kvtier-bench: no write-back wait (%s failed or missing)\n", ctl);
		res->flush_s = now() - f0;
	}
	tab = kvtier_table_create(c, r->B);
	/* the fast path: a table per layer (a layer's is read by its attention while the
	 * next layer selects), the steps' tokens on the device */
	tabs = fast ? calloc(r->L, sizeof(*tabs)) : NULL;
	for (uint32_t l = 0; tabs && l < r->L; l++)
		if (!(tabs[l] = kvtier_table_create(c, r->B)))
			ret = -ENOMEM;
	/* on the device as a batch's step writes them: [L][S][K, V][B][H][D] */
	dnk = fast ? dalloc(g, (size_t)r->L * r->B * 2 * stepb) : NULL;
	uint8_t *bk = fast ? malloc((size_t)r->L * r->B * 2 * stepb) : NULL;
	for (uint32_t l = 0; bk && l < r->L; l++)
		for (uint32_t b = 0; b < r->B; b++)
			for (uint32_t s = 0; s < r->S; s++)
				for (int kv = 0; kv < 2; kv++)
					memcpy(bk + ((((size_t)l * r->S + s) * 2 + kv) * r->B + b) * tokb,
					       nk + (((size_t)l * r->B + b) * 2 + kv) * stepb + s * tokb, tokb);
	if (fast && (!tabs || ret || !dnk || !bk ||
		     kvt_compute_upload(g->cc, dnk, bk, (size_t)r->L * r->B * 2 * stepb) < 0)) {
		free(bk);
		snprintf(res->why, sizeof(res->why), "out of memory (fast-path tables)");
		goto out;
	}
	free(bk);
	void *stream = kvt_compute_stream(g->cc);
	q = dalloc(g, (size_t)r->S * r->L * qper * r->esz);
	out = dalloc(g, (size_t)r->L * qper * r->esz);
	lse = dalloc(g, (size_t)r->L * r->rows * r->G * sizeof(float));
	if (!tab || !q || !out || !lse ||
	    kvt_compute_upload(g->cc, q, r->q, (size_t)r->S * r->L * qper * r->esz) < 0) {
		snprintf(res->why, sizeof(res->why), "out of memory (queries, outputs)");
		goto out;
	}
	struct kvtier_select_params sp = {.budget_pages = O.budget / r->T, .sink_tokens = O.sink,
					  .window_tokens = O.window,
					  .flags = (O.substitute ? KVTIER_SEL_SUBSTITUTE : 0) |
						   (O.estimate & (1u << M_KVTIER) ? KVTIER_SEL_ESTIMATE : 0),
					  .host_gap = (float)O.host_gap, .wait_us = O.wait_us};
	struct kvtier_prefetch_stats st0 = {0}, st1 = {0};
	uint32_t nt = 0;
	/* of the timed steps: in kvtier_append, kvtier_select; all layers queued (fast path);
	 * those whose token fills a page (the daemon seals it: puts it, summarizes it) */
	double t_app = 0, t_sel = 0, t_iss = 0, t_fill = 0, t_fill_app = 0, t_fill_max = 0;
	uint32_t n_fill = 0;
	label(lb, sizeof(lb), r, M_KVTIER, "steps");
	for (uint32_t s = 0; s < r->S && !ret; s++) {
		bar(lb, s, r->S);
		if (fast && s == O.warmup) {
			/* the daemon leases what the warm-up selected (a ramp of thousands of
			 * pages at 128K, once per sequence): the timed steps start once it has
			 * caught up (no copy started or landed for 50 ms), so they measure
			 * decoding, not the ramp */
			struct kvtier_prefetch_stats a = {0}, b;
			for (int i = 0; i < 500 && (ret = kvtier_stats(c, UINT32_MAX, &b)) == 0; i++) {
				if (i && b.prefetch_gpu == a.prefetch_gpu &&
				    b.prefetch_host == a.prefetch_host && b.bytes_h2d == a.bytes_h2d &&
				    b.bytes_nvme == a.bytes_nvme && b.steps == a.steps)
					break;
				a = b;
				usleep(50000);
			}
			if (ret < 0)
				break;
		}
		if (s == O.warmup && (ret = kvtier_stats(c, UINT32_MAX, &st0)) < 0)
			break;
		double t0 = now(), ta = 0, tsel = 0;
		for (uint32_t l = 0; l < r->L && !ret; l++) {
			/* an engine's layer: its token's K/V, selection and attention (the fast
			 * path: queued on one stream, waited for once a step) */
			struct kvtier_table *tl = fast ? tabs[l] : tab;
			double u0 = now();
			if (fast) { /* the batch's tokens in one call, as an engine's cache write */
				const uint8_t *k = dnk + (((size_t)l * r->S + s) * 2) * r->B * tokb;
				ret = kvtier_append_batch_async(c, seqs, r->B, l, k, k + r->B * tokb, stream);
			}
			for (uint32_t b = 0; b < r->B && !fast && !ret; b++) {
				size_t at = ((size_t)l * r->B + b) * 2 * stepb + s * tokb;
				ret = kvtier_append(c, seqs[b], l, nk + at, nk + at + stepb, 1, KVT_MEM_HOST);
			}
			const uint8_t *ql = (const uint8_t *)q + ((size_t)s * r->L + l) * qper * r->esz;
			double u1 = now();
			if (ret || (ret = fast ? kvtier_select_async(c, seqs, r->B, l, ql, &sp, tl, stream)
					       : kvtier_select(c, seqs, r->B, l, ql, KVT_MEM_DEVICE, &sp, tl)) < 0)
				break;
			ta += u1 - u0;
			tsel += now() - u1;
			if (!fast && s >= O.warmup) /* the host side is there: no wait */
				needles(r, res, s, l, tl);
			void *ol = (uint8_t *)out + l * qper * r->esz;
			float *ll = lse + (size_t)l * r->rows * r->G;
			ret = fast ? kvtier_attend_async(c, tl, ql, ol, ll, (float)r->scale, stream)
				   : kvtier_attend(c, tl, ql, ol, ll, (float)r->scale, KVT_MEM_DEVICE);
		}
		double ti = now();
		if (fast && !ret)
			ret = kvt_compute_sync(g->cc, stream);
		double t1 = now();
		for (uint32_t l = 0; fast && !ret && s >= O.warmup && l < r->L; l++)
			needles(r, res, s, l, tabs[l]); /* after the step's time: its tables waited for */
		if (ret || s < O.warmup)
			continue;
		times[nt++] = t1 - t0;
		t_app += ta;
		t_sel += tsel;
		t_iss += ti - t0;
		if ((r->N + s + 1) % r->T == 0) { /* every sequence's token fills its last page */
			t_fill += t1 - t0;
			t_fill_app += ta;
			t_fill_max = t1 - t0 > t_fill_max ? t1 - t0 : t_fill_max;
			n_fill++;
		}
		if ((ret = kvt_compute_download(g->cc, h_out, out, (size_t)r->L * qper * r->esz)) < 0 ||
		    (ret = kvt_compute_download(g->cc, h_lse, lse,
						(size_t)r->L * r->rows * r->G * sizeof(float))) < 0)
			break;
		check_step(r, res, s - O.warmup, h_out, h_lse, false);
	}
	bar(lb, 1, 1);
	if (!ret)
		ret = kvtier_stats(c, UINT32_MAX, &st1);
	if (ret < 0) {
		snprintf(res->why, sizeof(res->why), "step: %s", strerror(-ret));
		failed = true;
		goto out;
	}
	times_done(res, times, nt);
	acc_done(res);
	const double sel = (double)(st1.selected - st0.selected), steps = nt;
	const double pb = (double)r->page_bytes;
	res->hit = sel > 0 ? (double)(st1.hit - st0.hit) / sel : -1;
	res->ahead = sel > 0 ? (double)(st1.hit - st0.hit + st1.late - st0.late) / sel : -1;
	res->pcie = ((double)(st1.bytes_h2d - st0.bytes_h2d) +
		     pb * (double)(st1.fetched - st0.fetched + st1.host - st0.host)) / steps;
	res->nvme = ((double)(st1.bytes_nvme - st0.bytes_nvme) + pb * (double)(st1.disk - st0.disk)) / steps;
	double sum = 0;
	for (uint32_t i = 0; i < nt; i++)
		sum += times[i];
	snprintf(res->extra, sizeof(res->extra),
		 "prefill %.1f s (+%.1f s write-back; its KV generated alongside in %.1f s); a step: %.0f%% append, %.0f%% select, %.0f%% attend%s, queued in %.0f%%; %.0f pages "
		 "selected, %.1f missed, %.1f read from host in place, %.1f waited for, %.1f read from disk",
		 res->prefill_s, res->flush_s, res->gen_s, 100 * t_app / sum, 100 * t_sel / sum, 100 * (sum - t_app - t_sel) / sum,
		 fast ? " and waiting" : "", 100 * t_iss / sum,
		 sel / steps, (double)(st1.missed - st0.missed) / steps, (double)(st1.host - st0.host) / steps,
		 (double)(st1.fetched - st0.fetched + st1.late - st0.late) / steps,
		 (double)(st1.disk - st0.disk) / steps);
	/* what --host-budget bought: slots of a page, kept below 90% full by the store's
	 * background eviction (down to 80%) */
	struct kvtier_memory mem;
	kvtier_memory(c, &mem);
	if (mem.host_slot_bytes) {
		const double hp = (double)(dm.host_bytes / mem.host_slot_bytes);
		const double all = (double)r->B * r->L * r->H * r->P;
		const size_t len = strlen(res->extra);
		if (O.write_back) /* pages on no disk: up to the low watermark */
			snprintf(res->extra + len, sizeof(res->extra) - len,
				 "; host tier %.0f pages, write-back: %.0f%% of the KV's %.0f on no disk at most",
				 hp, fmin(100, 80 * hp / all), all);
		else if (0.9 * hp >= all)
			snprintf(res->extra + len, sizeof(res->extra) - len,
				 "; host tier %.0f pages: all %.0f of the KV's fit", hp, all);
		else
			snprintf(res->extra + len, sizeof(res->extra) - len,
				 "; host tier %.0f pages: %.0f-%.0f%% of the KV's %.0f", hp,
				 80 * hp / all, 90 * hp / all, all);
	}
	if (n_fill && n_fill < nt) {
		const size_t len = strlen(res->extra);
		snprintf(res->extra + len, sizeof(res->extra) - len,
			 "; the %u steps whose token fills a page: mean %.3f ms (max %.3f; appends %.3f), "
			 "the others %.3f", n_fill, 1e3 * t_fill / n_fill, 1e3 * t_fill_max,
			 1e3 * t_fill_app / n_fill, 1e3 * (sum - t_fill) / (nt - n_fill));
	}
	if (O.daemon_stats) { /* the daemon's own view of the run, through kvtierctl */
		char cmd[5 * PATH_MAX + 160], c2[16];
		fmt_tokens(c2, sizeof(c2), r->N);
		snprintf(cmd, sizeof(cmd), "{ echo '== kvtier %s batch %u'; '%s/kvtierctl' --socket '%s' "
			 "stats; '%s/kvtierctl' --socket '%s' --json clients; } >>'%s' 2>&1", c2, r->B, self_dir, ao.socket,
			 self_dir, ao.socket, O.daemon_stats);
		if (system(cmd) != 0)
			fprintf(stderr, "kvtier-bench: kvtierctl stats failed (see %s)\n", O.daemon_stats);
	}
out:
	for (uint32_t l = 0; tabs && l < r->L; l++)
		kvtier_table_destroy(tabs[l]);
	free(tabs);
	kvt_compute_free(g->cc, dnk);
	if (tab)
		kvtier_table_destroy(tab);
	if (c)
		kvtier_detach(c);
	daemon_stop(&dm, failed);
	kvt_compute_free(g->cc, q);
	kvt_compute_free(g->cc, out);
	kvt_compute_free(g->cc, lse);
	free(seqs);
	free(times);
	free(pk);
	free(nk);
	free(h_out);
	free(h_lse);
}

/* ---- output ---- */

struct row {
	uint32_t N, B;
	uint64_t kv_bytes;
	struct result res[M_N];
};

static void print_table(FILE *f, const struct row *rows, uint32_t n, const char *devdesc)
{
	fprintf(f, "\nkvtier-bench: %s, %u layers x %u KV heads x %u query heads each x D %u, %s, "
		   "page %u tokens, budget %u tokens (sinks %u, window %u), kvtier GPU pool %.0f%% "
		   "of the KV, host %.0f%%; %u timed steps after %u warm-up; pages left out "
		   "estimated from their summaries: %s\n",
		devdesc, O.m.layers, O.m.kv_heads, O.m.group, O.m.head_dim,
		O.dtype == KVTIER_BF16 ? "bf16" : O.dtype == KVTIER_F16 ? "f16" : "f32", O.page,
		O.budget, O.sink, O.window, O.gpu_frac * 100, O.host_frac * 100, O.steps, O.warmup,
		(O.estimate & (1u << M_SPARSE)) && (O.estimate & (1u << M_KVTIER)) ? "sparse, kvtier"
		: O.estimate & (1u << M_SPARSE) ? "sparse" : O.estimate & (1u << M_KVTIER) ? "kvtier"
		: "none");
	fprintf(f, "%-7s %-5s %-7s %10s %10s %10s %10s %10s %9s %9s %6s %7s %17s %7s\n", "context",
		"batch", "method", "p50 ms", "p99 ms", "mean ms", "tok/s", "equiv GB/s", "PCIe MB", "NVMe MB", "hit",
		"mass", "rel err mean/max", "needle");
	for (uint32_t i = 0; i < n; i++) {
		char c[16];
		fmt_tokens(c, sizeof(c), rows[i].N);
		for (int k = 0; k < M_N; k++) {
			const struct result *x = &rows[i].res[k];
			if (!(O.methods & (1u << k)))
				continue;
			if (!x->ran) {
				fprintf(f, "%-7s %-5u %-7s n/a: %s\n", c, rows[i].B, mname[k], x->why);
				continue;
			}
			char hit[16] = "-", mass[16] = "-", err[32] = "-", nd[16] = "-";
			if (x->hit >= 0)
				snprintf(hit, sizeof(hit), "%.3f", x->hit);
			if (x->cover >= 0)
				snprintf(mass, sizeof(mass), "%.4f", x->cover);
			if (x->err_mean >= 0)
				snprintf(err, sizeof(err), "%.1e/%.1e", x->err_mean, x->err_max);
			if (x->recall >= 0)
				snprintf(nd, sizeof(nd), "%.3f", x->recall);
			fprintf(f, "%-7s %-5u %-7s %10.3f %10.3f %10.3f %10.1f %10.1f %9.1f %9.1f %6s %7s %17s %7s\n",
				c, rows[i].B, mname[k], x->p50 * 1e3, x->p99 * 1e3, x->mean * 1e3, rows[i].B / x->mean,
				(double)rows[i].kv_bytes / x->p50 / 1e9, x->pcie / 1e6, x->nvme / 1e6, hit,
				mass, err, nd);
			if (x->extra[0])
				fprintf(f, "%-21s %s\n", "", x->extra);
			if (x->err_over) {
				const uint32_t s = O.warmup + x->err_max_ts;
				fprintf(f, "%-21s error above %.0e in %llu of %llu layer-steps; the largest at "
					   "timed step %u, layer %u%s\n", "", ERR_TARGET,
					(unsigned long long)x->err_over, (unsigned long long)x->n_err,
					x->err_max_ts, x->err_max_l,
					(rows[i].N + s + 1) % O.page == 0 ? " (its token fills a page)" : "");
			}
		}
	}
	for (uint32_t i = 0; i < n; i++) {
		const struct result *kv = &rows[i].res[M_KVTIER];
		if (!kv->ran)
			continue;
		char c[16];
		fmt_tokens(c, sizeof(c), rows[i].N);
		fprintf(f, "%s batch %u: kvtier step %.3f ms", c, rows[i].B, kv->p50 * 1e3);
		if (rows[i].res[M_RELOAD].ran)
			fprintf(f, "; speed-up over full reload %.1fx", rows[i].res[M_RELOAD].p50 / kv->p50);
		if (rows[i].res[M_DENSE].ran)
			fprintf(f, ", over dense %.2fx", rows[i].res[M_DENSE].p50 / kv->p50);
		if (rows[i].res[M_SPARSE].ran)
			fprintf(f, "; time against sparse all on the device %.2fx",
				kv->p50 / rows[i].res[M_SPARSE].p50);
		fprintf(f, "\n");
	}
}

static int write_csv(const char *path, const struct row *rows, uint32_t n)
{
	FILE *f = fopen(path, "w");
	if (!f)
		return -errno;
	fprintf(f, "context,batch,method,status,step_p50_ms,step_p99_ms,step_mean_ms,tokens_per_s,"
		   "equiv_GBps,pcie_MB_per_step,nvme_MB_per_step,hit_rate,mass_covered,rel_err_mean,"
		   "rel_err_max,needle_recall,prefill_s,prefetched\n");
	for (uint32_t i = 0; i < n; i++)
		for (int k = 0; k < M_N; k++) {
			const struct result *x = &rows[i].res[k];
			if (!(O.methods & (1u << k)))
				continue;
			if (!x->ran) {
				fprintf(f, "%u,%u,%s,\"n/a: %s\",,,,,,,,,,,,,,\n", rows[i].N, rows[i].B, mname[k],
					x->why);
				continue;
			}
			fprintf(f, "%u,%u,%s,ok,%.4f,%.4f,%.4f,%.2f,%.2f,%.3f,%.3f,", rows[i].N, rows[i].B,
				mname[k], x->p50 * 1e3, x->p99 * 1e3, x->mean * 1e3, rows[i].B / x->mean,
				(double)rows[i].kv_bytes / x->p50 / 1e9, x->pcie / 1e6, x->nvme / 1e6);
			if (x->hit >= 0)
				fprintf(f, "%.4f", x->hit);
			fputc(',', f);
			if (x->cover >= 0)
				fprintf(f, "%.5f", x->cover);
			fputc(',', f);
			if (x->err_mean >= 0)
				fprintf(f, "%.3e,%.3e", x->err_mean, x->err_max);
			else
				fputc(',', f);
			fputc(',', f);
			if (x->recall >= 0)
				fprintf(f, "%.4f", x->recall);
			fputc(',', f);
			if (x->prefill_s > 0)
				fprintf(f, "%.2f", x->prefill_s);
			fputc(',', f);
			if (x->ahead >= 0)
				fprintf(f, "%.4f", x->ahead);
			fputc('\n', f);
		}
	return fclose(f) ? -errno : 0;
}

/* PNG plots through gnuplot: step time and error against context, a line per method
 * (and batch). DIR/bench.gp and its data are kept: where gnuplot is missing (the GPU
 * machine), `cd DIR && gnuplot bench.gp` draws them elsewhere. */
static int plot(const char *dir, const struct row *rows, uint32_t n)
{
	if (mkdir(dir, 0755) < 0 && errno != EEXIST)
		return -errno;
	char dat[PATH_MAX + 32];
	snprintf(dat, sizeof(dat), "%s/bench.dat", dir);
	FILE *f = fopen(dat, "w");
	if (!f)
		return -errno;
	/* one gnuplot data block per (method, batch): context, p50 ms, err mean */
	uint32_t blocks = 0;
	char titles[64][32];
	for (int k = 0; k < M_N; k++)
		for (uint32_t bi = 0; bi < O.nbatch; bi++) {
			bool any = false;
			for (uint32_t i = 0; i < n; i++) {
				const struct result *x = &rows[i].res[k];
				if (rows[i].B != O.batch[bi] || !x->ran)
					continue;
				if (!any && blocks < 64)
					snprintf(titles[blocks], sizeof(titles[0]), "%s, batch %u", mname[k],
						 O.batch[bi]);
				any = true;
				fprintf(f, "%u %.5f %.4e\n", rows[i].N, x->p50 * 1e3,
					x->err_mean >= 0 ? x->err_mean : NAN);
			}
			if (any && blocks < 64) {
				fprintf(f, "\n\n");
				blocks++;
			}
		}
	fclose(f);
	char gp[PATH_MAX + 32];
	snprintf(gp, sizeof(gp), "%s/bench.gp", dir);
	if (!(f = fopen(gp, "w")))
		return -errno;
	fprintf(f, "set terminal pngcairo size 960,600 noenhanced\nset logscale xy\nset grid\n"
		   "set key outside right\nset xlabel 'context (tokens)'\n");
	const char *what[2][3] = {{"step_time.png", "decode step, p50 (ms)", "2"},
				  {"error.png", "output relative error against dense", "3"}};
	for (int p = 0; p < 2; p++) {
		fprintf(f, "set output '%s'\nset ylabel '%s'\nset title 'kvtier-bench: %s'\nplot ",
			what[p][0], what[p][1], O.m.name);
		for (uint32_t i = 0; i < blocks; i++)
			fprintf(f, "%s'bench.dat' index %u using 1:%s with linespoints title '%s'",
				i ? ", " : "", i, what[p][2], titles[i]);
		fprintf(f, "\n");
	}
	fclose(f);
	if (system("command -v gnuplot >/dev/null 2>&1") != 0) {
		fprintf(stderr, "kvtier-bench: no gnuplot here: `cd %s && gnuplot bench.gp` draws the "
				"plots elsewhere\n", dir);
		return 0;
	}
	char cmd[2 * PATH_MAX + 64];
	snprintf(cmd, sizeof(cmd), "cd '%s' && gnuplot bench.gp 2>&1", dir);
	int rc = system(cmd);
	return rc == 0 ? 0 : -ENOEXEC;
}

/* ---- main ---- */

static int parse_list(const char *s, uint32_t *out, uint32_t max, bool tokens)
{
	uint32_t n = 0;
	char *dup = strdup(s), *save = NULL;
	for (char *t = strtok_r(dup, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
		char *end;
		unsigned long long v = strtoull(t, &end, 10);
		if (tokens && (*end == 'K' || *end == 'k'))
			v <<= 10, end++;
		else if (tokens && (*end == 'M' || *end == 'm'))
			v <<= 20, end++;
		if (*end || !v || v > UINT32_MAX / 2 || n == max) {
			free(dup);
			return -1;
		}
		out[n++] = (uint32_t)v;
	}
	free(dup);
	return (int)n;
}

static void usage(FILE *f)
{
	fprintf(f,
		"usage: kvtier-bench [options]\n"
		"Decode steps timed four ways in one run: dense (all KV on the device), reload (KV\n"
		"in pinned host memory, copied up every step), sparse (Quest top-k, all KV on the\n"
		"device) and kvtier (a kvtierd of its own: GPU pool, host RAM, NVMe).\n\n"
		"  --model NAME        llama-3.1-8b (default), llama-3.1-70b, mistral-7b, qwen2.5-7b, small\n"
		"  --layers N --kv-heads N --group N --head-dim N   the shape, overriding the model's\n"
		"  --dtype bf16|f16|f32   (bf16)\n"
		"  --context LIST      context lengths, e.g. 32K,128K (default 32K,128K)\n"
		"  --batch LIST        batch sizes (default 1)\n"
		"  --budget TOKENS     tokens each head attends to, sinks and window included (2048)\n"
		"  --sink TOKENS --window TOKENS   always kept (64, 256)\n"
		"  --page TOKENS       tokens per page (64)\n"
		"  --gpu-budget FRAC   kvtier's GPU pool as a share of the KV (0.10)\n"
		"  --host-budget FRAC  kvtier's host tier (its arena) as a share of the KV's bytes\n"
		"                      (0.50; up to 4): the store keeps the tier below 90%% full\n"
		"                      (evicting to 80%%; 98%% under --write-back), so it holds\n"
		"                      less of the KV (the summary line says how much; 1.15 holds\n"
		"                      all of it)\n"
		"  --write-back        kvtierd's store.write_policy=back: pages go to disk only when\n"
		"                      the host tier needs their room, and its NVMe tier holds only\n"
		"                      what the host tier does not (a KV larger than the disk fits\n"
		"                      where host RAM holds most of it); no write-back after the\n"
		"                      prefill to wait for\n"
		"  --dense-layers N    first layers that attend over every page (0)\n"
		"  --steps N --warmup N   timed decode steps, and untimed ones before (32, 8)\n"
		"  --methods LIST      dense,reload,sparse,kvtier (all); mass, error and needle\n"
		"                      columns need dense or reload in the run (the reference)\n"
		"  --estimate LIST     sparse,kvtier (default) or none: these add an estimate of\n"
		"                      the pages they leave out, from their summaries' mean key\n"
		"                      and value (kvt_estimate, KVTIER_SEL_ESTIMATE: kvtier's fast\n"
		"                      path only); the mass column stays the attended pages' own\n"
		"  --device cpu|cuda|auto, --cpu   where attention runs and kvtierd keeps its pool\n"
		"  --small             a small shape for a quick run: model small, contexts 2K,4K,\n"
		"                      batch 1,2, budget 512, window 128, 4 timed steps\n"
		"  --kvtierd PATH      the daemon to start ($KVTIERD; default: beside this program)\n"
		"  --socket PATH       use a running kvtierd instead of starting one\n"
		"  --dir DIR           where the started kvtierd keeps its store ($TMPDIR or /var/tmp)\n"
		"  --keep              keep that directory (store, kvtierd.log)\n"
		"  --csv FILE          the results as CSV\n"
		"  --plot DIR          PNG plots (gnuplot): DIR/step_time.png, DIR/error.png\n"
		"  --daemon-stats FILE append `kvtierctl stats` of each kvtier run to FILE\n"
		"  --daemon-opt K=V    a kvtierd setting for the started daemon (repeatable)\n"
		"  --substitute[=GAP]  kvtier selects with KVTIER_SEL_SUBSTITUTE: a page only on\n"
		"                      NVMe is replaced by the best resident one, if its score\n"
		"                      bound is GAP nats or more below the row's best (0: any)\n"
		"  --sync-select       kvtier selects through the daemon (kvtier_select, a round\n"
		"                      trip per layer) instead of on the bench's stream\n"
		"                      (kvtier_select_async, the fast path)\n"
		"  --host-gap NATS     the fast path reads a page in host RAM in place only within\n"
		"                      NATS of the row's best score (0: libkvtier's default; < 0:\n"
		"                      every one)\n"
		"  --wait-us US        the fast path waits (on the stream) up to US for selected\n"
		"                      pages that may matter and are not leased yet (0: libkvtier's\n"
		"                      default; < 0: never)\n"
		"  --threads N         KV generation threads (all cores)\n"
		"  --seed N            the generator's seed (1)\n"
		"  --no-progress       no progress bar (default when stderr is not a terminal)\n");
}

int main(int argc, char **argv)
{
	enum { O_LAYERS = 256, O_HEADS, O_GROUP, O_HDIM, O_DTYPE, O_CTX, O_BATCH, O_BUDGET, O_SINK,
	       O_WINDOW, O_PAGE, O_GPUF, O_HOSTF, O_DENSE, O_STEPS, O_WARM, O_METHODS, O_DEVICE,
	       O_CPU, O_SMALL, O_KVTIERD, O_SOCKET, O_DIR, O_KEEP, O_CSV, O_PLOT, O_THREADS,
	       O_SEED, O_NOPROG, O_MODEL, O_HELP, O_DSTATS, O_DOPT, O_SUBST, O_SYNCSEL, O_HOSTGAP, O_WAITUS,
	       O_EST, O_WBACK };
	static const struct option lo[] = {
		{"model", 1, 0, O_MODEL}, {"layers", 1, 0, O_LAYERS}, {"kv-heads", 1, 0, O_HEADS},
		{"group", 1, 0, O_GROUP}, {"head-dim", 1, 0, O_HDIM}, {"dtype", 1, 0, O_DTYPE},
		{"context", 1, 0, O_CTX}, {"batch", 1, 0, O_BATCH}, {"budget", 1, 0, O_BUDGET},
		{"sink", 1, 0, O_SINK}, {"window", 1, 0, O_WINDOW}, {"page", 1, 0, O_PAGE},
		{"gpu-budget", 1, 0, O_GPUF}, {"host-budget", 1, 0, O_HOSTF},
		{"dense-layers", 1, 0, O_DENSE}, {"steps", 1, 0, O_STEPS}, {"warmup", 1, 0, O_WARM},
		{"methods", 1, 0, O_METHODS}, {"device", 1, 0, O_DEVICE}, {"cpu", 0, 0, O_CPU},
		{"small", 0, 0, O_SMALL}, {"kvtierd", 1, 0, O_KVTIERD}, {"socket", 1, 0, O_SOCKET},
		{"dir", 1, 0, O_DIR}, {"keep", 0, 0, O_KEEP}, {"csv", 1, 0, O_CSV},
		{"plot", 1, 0, O_PLOT}, {"threads", 1, 0, O_THREADS}, {"seed", 1, 0, O_SEED},
		{"no-progress", 0, 0, O_NOPROG}, {"help", 0, 0, O_HELP},
		{"daemon-stats", 1, 0, O_DSTATS}, {"daemon-opt", 1, 0, O_DOPT},
		{"substitute", 2, 0, O_SUBST}, {"sync-select", 0, 0, O_SYNCSEL},
		{"host-gap", 1, 0, O_HOSTGAP}, {"wait-us", 1, 0, O_WAITUS},
		{"estimate", 1, 0, O_EST}, {"write-back", 0, 0, O_WBACK}, {0, 0, 0, 0}};
	O.progress = isatty(2);
	/* --small first: explicit options after it still win */
	for (int i = 1; i < argc; i++)
		if (!strcmp(argv[i], "--small")) {
			O.m = models[4];
			O.ctx[0] = 2048, O.ctx[1] = 4096, O.nctx = 2;
			O.batch[0] = 1, O.batch[1] = 2, O.nbatch = 2;
			O.budget = 512, O.window = 128, O.steps = 4, O.warmup = 2;
		}
	int ch, n, li = 0;
	uint32_t v;
	while ((ch = getopt_long(argc, argv, "h", lo, &li)) != -1) {
		char *end = NULL;
		unsigned long long u = optarg ? strtoull(optarg, &end, 10) : 0;
		v = (uint32_t)u;
		bool num_ok = optarg && end != optarg && !*end && u <= UINT32_MAX;
		switch (ch) {
		case O_MODEL: {
			size_t i;
			for (i = 0; i < sizeof(models) / sizeof(models[0]); i++)
				if (!strcmp(optarg, models[i].name))
					break;
			if (i == sizeof(models) / sizeof(models[0])) {
				fprintf(stderr, "kvtier-bench: unknown model %s\n", optarg);
				return 2;
			}
			O.m = models[i];
			continue;
		}
		case O_DTYPE:
			if (!strcmp(optarg, "bf16"))
				O.dtype = KVTIER_BF16;
			else if (!strcmp(optarg, "f16"))
				O.dtype = KVTIER_F16;
			else if (!strcmp(optarg, "f32"))
				O.dtype = KVTIER_F32;
			else {
				fprintf(stderr, "kvtier-bench: --dtype bf16, f16 or f32\n");
				return 2;
			}
			continue;
		case O_CTX:
		case O_BATCH:
			n = parse_list(optarg, ch == O_CTX ? O.ctx : O.batch, MAXLIST, ch == O_CTX);
			if (n <= 0) {
				fprintf(stderr, "kvtier-bench: bad list '%s'\n", optarg);
				return 2;
			}
			*(ch == O_CTX ? &O.nctx : &O.nbatch) = (uint32_t)n;
			continue;
		case O_GPUF:
		case O_HOSTF: {
			double f = strtod(optarg, &end);
			if (*end || !(f > 0 && f <= (ch == O_GPUF ? 1 : 4))) {
				fprintf(stderr, "kvtier-bench: %s takes a share in (0, %d]\n",
					ch == O_GPUF ? "--gpu-budget" : "--host-budget", ch == O_GPUF ? 1 : 4);
				return 2;
			}
			*(ch == O_GPUF ? &O.gpu_frac : &O.host_frac) = f;
			continue;
		}
		case O_METHODS: {
			O.methods = 0;
			char *dup = strdup(optarg), *save = NULL;
			for (char *t = strtok_r(dup, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
				int k;
				for (k = 0; k < M_N && strcmp(t, mname[k]); k++)
					;
				if (k == M_N) {
					fprintf(stderr, "kvtier-bench: unknown method %s\n", t);
					free(dup);
					return 2;
				}
				O.methods |= 1u << k;
			}
			free(dup);
			continue;
		}
		case O_EST: {
			O.estimate = 0;
			if (!strcmp(optarg, "none"))
				continue;
			char *dup = strdup(optarg), *save = NULL;
			for (char *t = strtok_r(dup, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
				if (strcmp(t, "sparse") && strcmp(t, "kvtier")) {
					fprintf(stderr, "kvtier-bench: --estimate takes sparse, kvtier or none, not %s\n", t);
					free(dup);
					return 2;
				}
				O.estimate |= 1u << (strcmp(t, "sparse") ? M_KVTIER : M_SPARSE);
			}
			free(dup);
			continue;
		}
		case O_DEVICE: O.device = optarg; continue;
		case O_CPU: O.device = "cpu"; continue;
		case O_SMALL: continue;
		case O_KVTIERD: O.kvtierd = optarg; continue;
		case O_SOCKET: O.socket = optarg; continue;
		case O_DIR: O.dir = optarg; continue;
		case O_KEEP: O.keep = true; continue;
		case O_CSV: O.csv = optarg; continue;
		case O_PLOT: O.plot = optarg; continue;
		case O_DSTATS: O.daemon_stats = optarg; continue;
		case O_SYNCSEL: O.sync_select = true; continue;
		case O_HOSTGAP: {
			char *e2;
			O.host_gap = strtod(optarg, &e2);
			if (*e2 || e2 == optarg) {
				fprintf(stderr, "kvtier-bench: --host-gap takes nats (< 0: every page)\n");
				return 2;
			}
			continue;
		}
		case O_WAITUS: {
			char *e2;
			const long w = strtol(optarg, &e2, 10);
			if (*e2 || e2 == optarg || w > INT32_MAX || w < INT32_MIN) {
				fprintf(stderr, "kvtier-bench: --wait-us takes microseconds (< 0: never)\n");
				return 2;
			}
			O.wait_us = (int32_t)w;
			continue;
		}
		case O_SUBST:
			O.substitute = true;
			if (optarg) {
				if (!num_ok || u > 1000) {
					fprintf(stderr, "kvtier-bench: --substitute=GAP takes nats, 0-1000\n");
					return 2;
				}
				O.subst_gap = v;
			}
			continue;
		case O_DOPT:
			if (O.ndopt == sizeof(O.dopt) / sizeof(O.dopt[0]) || !strchr(optarg, '=')) {
				fprintf(stderr, "kvtier-bench: --daemon-opt KEY=VALUE, at most 32\n");
				return 2;
			}
			O.dopt[O.ndopt++] = optarg;
			continue;
		case O_NOPROG: O.progress = false; continue;
		case O_WBACK: O.write_back = true; continue;
		case 'h':
		case O_HELP: usage(stdout); return 0;
		case '?': usage(stderr); return 2;
		default: break;
		}
		if (!num_ok) {
			fprintf(stderr, "kvtier-bench: --%s needs a number, not '%s'\n", lo[li].name, optarg);
			return 2;
		}
		switch (ch) {
		case O_LAYERS: O.m.layers = v; break;
		case O_HEADS: O.m.kv_heads = v; break;
		case O_GROUP: O.m.group = v; break;
		case O_HDIM: O.m.head_dim = v; break;
		case O_BUDGET: O.budget = v; break;
		case O_SINK: O.sink = v; break;
		case O_WINDOW: O.window = v; break;
		case O_PAGE: O.page = v; break;
		case O_DENSE: O.dense_layers = v; break;
		case O_STEPS: O.steps = v; break;
		case O_WARM: O.warmup = v; break;
		case O_THREADS: O.threads = v; break;
		case O_SEED: O.seed = u; break;
		}
	}
	if (optind < argc) {
		fprintf(stderr, "kvtier-bench: unexpected argument '%s'\n", argv[optind]);
		return 2;
	}
	if (!O.m.layers || !O.m.kv_heads || !O.m.group || O.m.head_dim < 2 * NF + 8 || !O.page ||
	    !O.steps || O.budget < O.page || O.m.layers > 256) {
		fprintf(stderr, "kvtier-bench: a shape needs layers (1-256), KV heads, a group, head "
				"dim >= %d, a page, steps and a budget of at least a page\n", 2 * NF + 8);
		return 2;
	}
	{
		ssize_t k = readlink("/proc/self/exe", self_dir, sizeof(self_dir) - 1);
		if (k > 0) {
			self_dir[k] = 0;
			char *sl = strrchr(self_dir, '/');
			if (sl)
				*sl = 0;
		}
	}
	struct gpu g = {0};
	const char *cname = !strcmp(O.device, "auto") ? NULL : O.device;
	int ret = kvt_compute_open(cname, &g.cc);
	if (ret < 0) {
		fprintf(stderr, "kvtier-bench: no %s compute backend: %s\n", O.device, strerror(-ret));
		return 1;
	}
	const bool cuda = !strcmp(kvt_compute_name(g.cc), "cuda");
	if ((ret = kvt_device_open(cuda ? "cuda" : "cpu", 0, &g.dev)) < 0) {
		fprintf(stderr, "kvtier-bench: no %s device: %s\n", kvt_compute_name(g.cc), strerror(-ret));
		return 1;
	}
	char devdesc[160];
	snprintf(devdesc, sizeof(devdesc), "%s (%s)", kvt_compute_name(g.cc),
		 g.dev->ops->describe(g.dev));
	struct row *rows = calloc((size_t)O.nctx * O.nbatch, sizeof(*rows));
	uint32_t nrows = 0;
	int failures = 0;
	for (uint32_t bi = 0; bi < O.nbatch; bi++)
		for (uint32_t ci = 0; ci < O.nctx; ci++) {
			struct row *w = &rows[nrows++];
			struct run r = {.N = O.ctx[ci], .B = O.batch[bi], .S = O.warmup + O.steps,
					.L = O.m.layers, .H = O.m.kv_heads, .G = O.m.group,
					.D = O.m.head_dim, .T = O.page};
			r.rows = r.B * r.H;
			r.esz = kvt_dtype_size(O.dtype);
			r.slot_bytes = 2ull * r.T * r.D * r.esz;
			r.page_bytes = r.slot_bytes;
			r.P = (r.N + r.S + r.T - 1) / r.T;
			r.Pc = r.N / r.T;
			r.layer_bytes = (size_t)r.rows * r.P * r.slot_bytes;
			r.scale = 1.0 / sqrt((double)r.D);
			uint32_t forced = (O.sink + r.T - 1) / r.T + O.window / r.T + 1;
			r.K = O.budget / r.T > forced ? O.budget / r.T : forced;
			for (uint32_t i = 0; i < NF; i++)
				r.omega[i] = 2 * M_PI / (32.0 * pow(1024.0, (double)i / (NF - 1)));
			w->N = r.N;
			w->B = r.B;
			w->kv_bytes = (uint64_t)r.B * r.L * r.H * r.N * 2ull * r.D * r.esz;
			if (r.N < 4 * r.T + O.window || r.N / r.T < O.budget / r.T + 2 * NN) {
				for (int k = 0; k < M_N; k++)
					snprintf(w->res[k].why, sizeof(w->res[k].why),
						 "context too short for the budget");
				continue;
			}
			const size_t qb = (size_t)r.S * r.L * r.rows * r.G * r.D * r.esz;
			r.q = malloc(qb);
			r.ref_out = malloc((size_t)O.steps * r.L * r.rows * r.G * r.D * r.esz);
			r.ref_lse = malloc((size_t)O.steps * r.L * r.rows * r.G * sizeof(float));
			if (!r.q || !r.ref_out || !r.ref_lse) {
				fprintf(stderr, "kvtier-bench: out of memory\n");
				return 1;
			}
			struct fill_dst fq = {&r, r.q};
			parallel_for((uint64_t)r.L * r.rows, fill_q_item, &fq);
			if (O.methods & ((1u << M_DENSE) | (1u << M_SPARSE)))
				run_resident(&g, &r, &w->res[M_DENSE], &w->res[M_SPARSE]);
			if (O.methods & (1u << M_RELOAD))
				run_reload(&g, &r, &w->res[M_RELOAD]);
			if (O.methods & (1u << M_KVTIER))
				run_kvtier(&g, &r, &w->res[M_KVTIER], cuda);
			for (int k = 0; k < M_N; k++)
				if ((O.methods & (1u << k)) && !w->res[k].ran) {
					char c[16];
					fmt_tokens(c, sizeof(c), r.N);
					fprintf(stderr, "kvtier-bench: %s at %s, batch %u: %s\n", mname[k], c,
						r.B, w->res[k].why);
					/* a method that cannot hold the KV is a result, not a failure */
					if (!strstr(w->res[k].why, "does not fit") &&
					    !strstr(w->res[k].why, "out of") && !strstr(w->res[k].why, "pinning"))
						failures++;
				}
			free(r.q);
			free(r.ref_out);
			free(r.ref_lse);
		}
	print_table(stdout, rows, nrows, devdesc);
	if (O.csv && (ret = write_csv(O.csv, rows, nrows)) < 0) {
		fprintf(stderr, "kvtier-bench: %s: %s\n", O.csv, strerror(-ret));
		failures++;
	}
	if (O.plot && (ret = plot(O.plot, rows, nrows)) < 0) {
		fprintf(stderr, "kvtier-bench: plots in %s: gnuplot failed\n", O.plot);
		failures++;
	}
	free(rows);
	kvt_device_close(g.dev);
	kvt_compute_close(g.cc);
	return failures ? 1 : 0;
}
