/* SPDX-License-Identifier: MIT */
#ifndef KVT_KERNELS_COMPUTE_H
#define KVT_KERNELS_COMPUTE_H

/*
 * The compute that decides which pages a decode step needs, and the attention over
 * them: page summaries, page scores, top-k / top-p selection and paged decode
 * attention. Two backends implement it behind one ops table (compute_impl.h): "cpu"
 * (plain C, the oracle of the tests) and "cuda" (the kernels in kernels/, .cu files). All pointers in the
 * argument structs are in the backend's memory: host memory for cpu, device memory
 * (or mapped pinned host memory) for cuda; kvt_compute_alloc() and friends move data
 * there. Every function returns 0 or a negative errno.
 *
 * Layout (shared with the page store and with an engine's own kernels):
 *
 *   Row      one (sequence, KV head): row r = b * kv_heads + h for sequence b of a
 *            batch. Everything below is indexed by row.
 *   Query    q[r][g][d], g < group: the `group` query heads of KV head h are
 *            h*group .. h*group+group-1 of the model's query heads (the usual GQA
 *            mapping), so a batch's q[B][Hq][D] is exactly q[rows][group][D].
 *   Page     in a pool slot: K[page_tokens][head_dim] then V[page_tokens][head_dim],
 *            row-major in the KV dtype; slot s starts at pool + s * slot_bytes.
 *   Page table  int32 slots, table[r * stride + i] for i < n_pages[r]: the full pages
 *            row r attends to, in any order; plus, when tail_slot[r] >= 0, the page
 *            still filling, of which the first tail_len[r] tokens are valid. A slot
 *            with KVT_SLOT_HOST set names slot (s & ~KVT_SLOT_HOST) of host_pool
 *            instead (a page read in place from mapped pinned host memory).
 *   Summary  one record per page, in the KV dtype (f32 for f32 KV):
 *            [min][max] (head_dim each, Quest) then [rep 0]..[rep R-1] (head_dim each,
 *            the means of R equal sub-blocks of the page's keys, InfLLM), then [key
 *            mean][value mean] (the page's, for kvt_estimate), so (4 + R) * head_dim
 *            elements; record i at summaries + i * record bytes.
 *            sum_index[r * stride + p] names the record of page p of row r (NULL: the
 *            records of row r are contiguous from r * stride).
 *   Scores   float scores[r * stride + p] for p < n_pages[r].
 *
 * Thread-safety: a kvt_compute is used by one thread at a time.
 */

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum kvt_dtype {
	KVT_F16 = 0,
	KVT_BF16 = 1,
	KVT_F32 = 2,
	KVT_DTYPE_MAX
};

/* How a page is scored against a query. */
enum kvt_score_method {
	KVT_SCORE_QUEST = 0, /* sum_i max(q_i m_i, q_i M_i): an upper bound of q.k */
	KVT_SCORE_REPS = 1,  /* max over the representatives r of q.r */
	KVT_SCORE_MAX
};

/* How the query heads of one KV group are folded into one score per page. */
enum kvt_gqa_agg {
	KVT_GQA_MAX = 0,
	KVT_GQA_SUM = 1,
	KVT_GQA_MAX_
};

enum kvt_select_mode {
	KVT_SELECT_TOPK = 0, /* budget_pages pages */
	KVT_SELECT_TOPP = 1, /* smallest set reaching estimated mass top_p, at most budget_pages */
	KVT_SELECT_MAX
};

/* The shape of one layer's KV. */
struct kvt_geom {
	uint32_t head_dim;    /* D; the cuda backend takes 64, 128 and 256 */
	uint32_t page_tokens; /* T */
	uint32_t group;       /* query heads per KV head (GQA); 1 for MHA */
	uint32_t reps;        /* R representatives per page summary (0: none); divides T */
	uint32_t dtype;       /* enum kvt_dtype of K, V, q, summaries and output */
	uint32_t pad_;
};

/* Builds the summary records of freshly filled pages. */
struct kvt_summarize_args {
	struct kvt_geom g;
	const void *pool;       /* page pool */
	uint64_t slot_bytes;    /* pool stride; >= 2 * T * D * dtype size */
	const int32_t *slots;   /* [n] pool slot of each page */
	const int32_t *records; /* [n] summary record to write for each page */
	void *summaries;        /* record pool */
	uint32_t n;
	uint32_t pad_;
};

/* One score per page of every row, for one layer's query. */
struct kvt_score_args {
	struct kvt_geom g;
	uint32_t method; /* enum kvt_score_method */
	uint32_t agg;    /* enum kvt_gqa_agg */
	uint32_t rows;
	uint32_t stride;
	const void *q;             /* [rows][group][D] */
	const void *summaries;     /* record pool */
	const int32_t *sum_index;  /* [rows][stride] or NULL (contiguous records) */
	const int32_t *n_pages;    /* [rows] pages of each row, <= stride */
	float *scores;             /* [rows][stride] out */
	/* [rows] or NULL: without sum_index, the records of row r start at row_base[r]
	 * instead of r * stride (rows of a batch picked out of a larger array) */
	const int32_t *row_base;
};

/*
 * Picks the pages of every row: the sink pages (those holding the first sink_tokens
 * tokens) and the window pages (full pages holding any of the last window_tokens
 * tokens of the row, tail included) always, then the best-scored other pages: the
 * budget_pages best in all (top-k), or, top-p, the smallest set whose estimated
 * softmax mass reaches top_p (less a 1e-6 rounding slack, so 1.0 means every page of
 * non-negligible mass), capped at budget_pages. The mass of page p is
 * estimated as exp(logit_scale * score_p) normalised over the row (the scores of a
 * GQA_SUM layer are sums of `group` logits: pass logit_scale = scale / group). Ties
 * go to the lower page index. A row with no more pages than the budget gets them all.
 * Output: out[r * out_stride + i], i < n_out[r], in ascending page order: the page
 * index, or slot_map[r * stride + page] when slot_map is not NULL (the page table
 * attend() takes). out_stride >= budget_pages, and >= sinks + window pages.
 */
struct kvt_select_args {
	uint32_t mode; /* enum kvt_select_mode */
	uint32_t rows;
	uint32_t stride;
	uint32_t out_stride;
	uint32_t budget_pages;
	uint32_t page_tokens;
	uint32_t sink_tokens;
	uint32_t window_tokens;
	float top_p;
	float logit_scale;
	const float *scores;      /* [rows][stride] */
	const int32_t *n_pages;   /* [rows] */
	const int32_t *tail_len;  /* [rows] tokens in the filling page, or NULL (none) */
	const int32_t *slot_map;  /* [rows][stride] or NULL */
	int32_t *out;             /* [rows][out_stride] */
	int32_t *n_out;           /* [rows] */
};

/*
 * Paged decode attention for one layer: every query head of row r attends over the
 * n_pages[r] pages of table row r plus the first tail_len[r] tokens of tail_slot[r]
 * (when >= 0; of tail_pool when set). out[r][g][D] in the KV dtype, lse[r][g] = ln sum exp(scale * q.k)
 * (-inf and a zero output for a row with no token). Split-K with log-sum-exp merging
 * on cuda (flash-decoding).
 */
struct kvt_attend_args {
	struct kvt_geom g;
	uint32_t rows;
	uint32_t stride;
	float scale;   /* softmax scale, usually 1/sqrt(D) */
	uint32_t pad_;
	const void *q;             /* [rows][group][D] */
	const void *pool;
	uint64_t slot_bytes;
	const int32_t *table;      /* [rows][stride] pool slots */
	const int32_t *n_pages;    /* [rows] */
	const int32_t *tail_slot;  /* [rows] or NULL; -1: no tail */
	const int32_t *tail_len;   /* [rows] or NULL */
	void *out;                 /* [rows][group][D] */
	float *lse;                /* [rows][group] or NULL */
	/* where tail slots are (same slot_bytes), or NULL: in pool. A client keeps the
	 * page it is still filling in memory of its own. */
	const void *tail_pool;
	/* where KVT_SLOT_HOST slots are (device-visible mapped host memory), and their
	 * stride; NULL when the table names none */
	const void *host_pool;
	uint64_t host_slot_bytes;
	/* kvt_estimate's output for these rows, or NULL: the pages the table leaves out,
	 * estimated, are merged into out (lse stays the attended tokens' alone, so
	 * exp(lse - dense lse) is still the share of the mass the table covers) */
	const float *est;
};

/*
 * An estimate of the attention over the pages a table leaves out, from their summary
 * records (RetroInfer's estimation zone, at page granularity): every full page p <
 * n_full[r] of row r that is not among the row's entries sel[r * stride + i], i <
 * n_sel[r] (entry e names page e - sel_base - r * sel_row_stride: page indices with both
 * 0, or the slots of a slot_map that is base + r * stride + page), counts as
 * page_tokens tokens, each with the page's mean key and mean value. For each query head
 * g of row r, with z_p = scale * q_g . kmean_p, est[(r * group + g) * (head_dim + 2) + j]:
 *   j = 0: m = max z_p (-inf when no page is left out),
 *   j = 1: sum_p T exp(z_p - m),
 *   j = 2 + d: sum_p T exp(z_p - m) vmean_p[d].
 * A page's exp(mean logit) is at most its tokens' mean exp (Jensen): the estimate leans
 * low, never high. Records as kvt_score's without sum_index (row r's from row_base[r],
 * or r * sum_stride). work: kvt_estimate_work_bytes(g, rows, max_pages) bytes of the
 * backend's memory, 16-byte aligned, max_pages >= every n_full[r]; sync: rows * group
 * words of it, zero, that the call leaves zero. Both for one call at a time.
 *
 * With subtract set, est is input and output instead: an estimate over a set of pages
 * that includes the row's entries (which must then be distinct), such as a call with
 * stride 0 (every full page) made before the table was known, e.g. beside the
 * selection on another stream; the entries' terms (pages < n_full[r]) are taken out of
 * it, in its own m. What is left at or below 1e-6 of the sum before (rounding) counts as
 * nothing left out (m = -inf). One block a row; work, sync and max_pages are not used.
 */
struct kvt_estimate_args {
	struct kvt_geom g;
	uint32_t rows;
	uint32_t max_pages;
	float scale;
	uint32_t sum_stride;
	const void *q;            /* [rows][group][D] */
	const void *summaries;
	const int32_t *row_base;  /* [rows] or NULL */
	const int32_t *n_full;    /* [rows] */
	uint32_t stride;          /* of sel */
	uint32_t sel_row_stride;
	int64_t sel_base;
	const int32_t *sel;       /* [rows][stride] */
	const int32_t *n_sel;     /* [rows] */
	float *est;               /* [rows][group][D + 2] out (in and out: subtract) */
	float *work;
	uint32_t *sync;
	uint32_t subtract;
	uint32_t pad_;
};

/*
 * A page table from a selection, where the map of where pages are lives beside the
 * summaries (a client choosing its own pages): page p of row r is in pool slot
 * map[row_base[r] + p], or nowhere the attention can read it now (< 0). Writes
 * table[r * stride + i] / pages[r * stride + i] (the slots and page indices of the
 * selected pages that are in the pool, ascending page order) and n_table[r].
 *
 * With scores set, a page whose slot is in host RAM (KVT_SLOT_HOST: read over the bus
 * at every step) enters the table only if it may matter: a sink or window page (p <
 * sink_pages, or p >= n_full[r] - window_pages), or its score at most host_gap below
 * the row's best among the other selected pages. The rest count as missing this step.
 *
 * With report set, also the whole selection, for whoever keeps the map, in mapped host
 * memory: report[0..rows) n_sel, [rows..2 rows) n_table, [2 rows..3 rows) how many of
 * those are KVT_SLOT_HOST slots, then [rows][stride] the selected pages, each with
 * KVT_PAGE_MATTERS set if it passed that test (every page without scores); and once all
 * of it is written, *ready = token (release order: a reader that sees the token sees
 * the report). ready[1] is then how many pages that matter were missing.
 *
 * With ack set too (and report), a page that matters and is missing is waited for: it
 * is marked KVT_PAGE_WAIT in the report, and once the report is out the call waits
 * until *ack reaches token (the keeper of the map writes it once it has put those pages
 * in the map: (int32_t)(*ack - token) >= 0), or wait_ns has passed; then it makes the
 * table again from the map as it is then (the report stays the first one).
 */
#define KVT_PAGE_MATTERS 0x40000000
#define KVT_PAGE_WAIT	 0x20000000
struct kvt_resolve_args {
	uint32_t rows;
	uint32_t stride;           /* of sel, table and pages */
	const int32_t *sel;        /* [rows][stride] page indices (kvt_select without slot_map) */
	const int32_t *n_sel;      /* [rows] */
	const int32_t *map;        /* slot of each page, by row_base[r] + page */
	const int32_t *row_base;   /* [rows] */
	int32_t *table;            /* [rows][stride] out */
	int32_t *pages;            /* [rows][stride] out, or NULL */
	int32_t *n_table;          /* [rows] out */
	int32_t *report;           /* or NULL */
	uint32_t *ready;           /* with report */
	uint32_t token;
	uint32_t score_stride;     /* of scores */
	const float *scores;       /* [rows][score_stride] (kvt_score's), or NULL */
	const int32_t *n_full;     /* [rows] full pages, with scores */
	uint32_t sink_pages, window_pages;
	float host_gap;            /* in score units */
	uint32_t pad_;
	uint32_t *ack;             /* with report, or NULL: never wait */
	uint64_t wait_ns;          /* the longest wait for *ack */
	/* two words of device memory, zero, that the call leaves zero (the blocks of one
	 * call count themselves there), or NULL: one block (slower beyond a few rows) */
	uint32_t *sync;
};

/*
 * New tokens into the pages that are filling: ntok tokens of K and of V, each
 * [ntok][heads][D] (device memory, or host memory the device maps), go to rows
 * pos0 .. pos0 + ntok - 1 of the pages in slots slot0 + h * slot_stride of pool, h
 * < heads (slot_stride 0: 1, the heads' pages side by side; pos0 + ntok <=
 * page_tokens): what an engine's cache-write kernel does.
 *
 * With nseq > 0, the tokens of nseq sequences in one call (a batch's decode step): K
 * and V are [nseq][ntok][heads][D], and sequence i's go to rows seq_pos[i] .. seq_pos[i]
 * + ntok - 1 of the pages in slots seq_slot0[i] + h * slot_stride (pos0 and slot0
 * unused; seq_pos and seq_slot0 in host memory, read before the call returns).
 */
struct kvt_put_rows_args {
	struct kvt_geom g;
	uint32_t heads;
	uint32_t ntok;
	uint32_t pos0;
	uint32_t slot_stride;
	const void *k, *v;
	void *pool;
	uint64_t slot_bytes;
	uint64_t slot0;
	uint32_t nseq;
	const uint32_t *seq_pos;
	const uint64_t *seq_slot0;
};

/* A page-table entry with this bit is a slot of the host pool (attend's host_pool). */
#define KVT_SLOT_HOST 0x40000000

struct kvt_compute;

/* Bytes of one element of dtype (0 for a bad dtype). */
size_t kvt_dtype_size(uint32_t dtype);
/* Bytes of one summary record. */
size_t kvt_summary_record_bytes(const struct kvt_geom *g);
/* Bytes of kvt_estimate's work area for rows rows of at most max_pages full pages. */
size_t kvt_estimate_work_bytes(const struct kvt_geom *g, uint32_t rows, uint32_t max_pages);
/* 0 when the geometry is usable by any backend, else -EINVAL. */
int kvt_geom_check(const struct kvt_geom *g);

/*
 * Opens a backend by name ("cpu", "cuda"); NULL picks cuda where a GPU is usable,
 * else cpu. -ENODEV when the named backend cannot run here (no GPU, no driver, built
 * without CUDA), -ENOENT for an unknown name.
 */
int kvt_compute_open(const char *name, struct kvt_compute **out);
void kvt_compute_close(struct kvt_compute *c);
const char *kvt_compute_name(const struct kvt_compute *c);

/* Memory in the backend's space, for callers that have none of their own. */
int kvt_compute_alloc(struct kvt_compute *c, size_t bytes, void **out);
void kvt_compute_free(struct kvt_compute *c, void *p);
int kvt_compute_upload(struct kvt_compute *c, void *dst, const void *src, size_t bytes);
int kvt_compute_download(struct kvt_compute *c, void *dst, const void *src, size_t bytes);
int kvt_compute_memset(struct kvt_compute *c, void *dst, int byte, size_t bytes);
/*
 * A copy in either direction queued on stream (NULL: the backend's own) behind what was
 * issued there before, complete once kvt_compute_sync of that stream returns: several
 * copies and kernels then cost one synchronisation. cpu copies at once.
 */
int kvt_compute_copy_async(struct kvt_compute *c, void *dst, const void *src, size_t bytes,
			   void *stream);
/*
 * A few bytes from host memory into the backend's, queued on stream (NULL: the
 * backend's own) like kvt_compute_copy_async, but src is read before the call returns
 * (reusable at once) and no copy engine takes part: on cuda the bytes ride in the
 * parameters of a kernel (KVT_PUT_CHUNK bytes a launch), which costs a launch, where a
 * small copy between kernels costs the copy engine's turnaround on either side of it
 * (~10 us a copy on the H100 between kernels of one stream). bytes, dst and src: a
 * multiple of 4.
 */
#define KVT_PUT_CHUNK 4000u
int kvt_compute_put_async(struct kvt_compute *c, void *dst, const void *src, size_t bytes,
			  void *stream);
/* The backend's own stream, the one NULL names: a cudaStream_t on cuda, NULL on cpu
 * (to record a fence behind work queued there). */
void *kvt_compute_stream(struct kvt_compute *c);
/* Host memory for kvt_compute_copy_async: pinned on cuda (a pageable buffer would make
 * the copy synchronous and slow). */
int kvt_compute_host_alloc(struct kvt_compute *c, size_t bytes, void **out);
void kvt_compute_host_free(struct kvt_compute *c, void *p);

/*
 * The operations. stream: a cudaStream_t for cuda (NULL: the backend's own stream),
 * ignored by cpu, which completes before returning. -EINVAL for arguments that do
 * not describe a valid call (checked on the host side only: indices inside device
 * tables are trusted, the daemon builds them).
 */
int kvt_summarize(struct kvt_compute *c, const struct kvt_summarize_args *a, void *stream);
int kvt_score(struct kvt_compute *c, const struct kvt_score_args *a, void *stream);
int kvt_select(struct kvt_compute *c, const struct kvt_select_args *a, void *stream);
int kvt_attend(struct kvt_compute *c, const struct kvt_attend_args *a, void *stream);
int kvt_resolve(struct kvt_compute *c, const struct kvt_resolve_args *a, void *stream);
/*
 * kvt_select, then kvt_resolve of what it selected (r->sel and r->n_sel are s->out and
 * s->n_out, r->rows s->rows, r->stride s->out_stride; page indices: no s->slot_map), in
 * one launch on cuda where r->sync is given or there is one row (the launch and the
 * gap between two kernels are most of a small resolve's time).
 */
int kvt_select_resolve(struct kvt_compute *c, const struct kvt_select_args *s,
		       const struct kvt_resolve_args *r, void *stream);
int kvt_put_rows(struct kvt_compute *c, const struct kvt_put_rows_args *a, void *stream);
int kvt_estimate(struct kvt_compute *c, const struct kvt_estimate_args *a, void *stream);
/*
 * dst[pairs[2i]] = pairs[2i + 1] for i < n: pairs in host memory, dst in the backend's
 * (or mapped memory it writes); done when it returns, on the backend's own stream.
 */
int kvt_scatter_i32(struct kvt_compute *c, int32_t *dst, const int32_t *pairs, uint32_t n);
/* Waits for everything issued on stream (NULL: the backend's own). */
int kvt_compute_sync(struct kvt_compute *c, void *stream);

/*
 * Per-layer policy: which layers are dense (bypass selection) and how the others
 * score. kvt_layer_policy_default(): the first two layers dense, Quest, GQA max,
 * top-k.
 */
struct kvt_layer_policy {
	uint32_t dense_layers; /* layers 0 .. dense_layers-1 attend over every page */
	uint32_t method[256];  /* enum kvt_score_method of each layer */
	uint32_t agg;          /* enum kvt_gqa_agg */
	uint32_t mode;         /* enum kvt_select_mode */
};
void kvt_layer_policy_default(struct kvt_layer_policy *p);

/*
 * Selection for one layer under a policy: score + select for a sparse layer, every
 * page (ascending) for a dense one. sc->method is taken from the policy; sel->scores
 * must point at sc->scores' buffer.
 */
int kvt_select_layer(struct kvt_compute *c, const struct kvt_layer_policy *p, uint32_t layer,
		     struct kvt_score_args *sc, struct kvt_select_args *sel, void *stream);

#ifdef __cplusplus
}
#endif

#endif
