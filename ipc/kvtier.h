/* SPDX-License-Identifier: MIT */
#ifndef KVTIER_H
#define KVTIER_H

/*
 * libkvtier: the client library of kvtierd.
 *
 * An inference process attaches with its model's layout, creates a sequence per
 * request, appends the K and V of every new token for every layer, and at each decode
 * step asks, per layer, for the page table of the pages its query needs
 * (kvtier_select): every page the table names is in GPU memory for the work the caller
 * queues after the call (the daemon brings it up from host RAM or NVMe first; on a
 * GPU the last copies may still be under way, with the backend's stream ordered after
 * them: kvtier_table_ready). kvtier_attend then runs sparse
 * attention over that table in the caller's process, reading the pages straight from
 * the GPU pool the daemon shares with it, and the page still filling from the
 * library's own copy. Results equal dense attention over the same pages.
 *
 * Errors: every function returns 0 (or a count) or a negative errno. -ECONNRESET
 * means the daemon is gone; the handle must then be detached.
 * Thread safety: calls on one client are serialized by the library (one request in
 * flight at a time); use one client per thread for parallelism.
 * Memory: pointers marked "host or device" are host memory unless KVT_MEM_DEVICE is
 * passed, then memory of the compute backend (a CUDA device pointer on a GPU).
 */

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KVTIER_API_VERSION 1

enum kvt_dtype_pub {
	KVTIER_F16 = 0,
	KVTIER_BF16 = 1,
	KVTIER_F32 = 2,
};

/* A model's KV layout. */
struct kvtier_layout {
	uint32_t layers;
	uint32_t kv_heads;
	uint32_t group;        /* query heads per KV head (GQA); 1 for MHA */
	uint32_t head_dim;     /* 64, 128 or 256 on a GPU */
	uint32_t dtype;        /* enum kvt_dtype_pub, of K, V, queries and outputs */
	uint32_t page_tokens;  /* tokens per page, e.g. 64 */
	uint32_t dense_layers; /* the first dense_layers layers attend over every page */
	uint32_t reps;         /* representative keys per page summary (0: Quest only) */
};

enum kvtier_attach_flags {
	/* Never read pages in place from the host arena: every selected page is brought
	 * to the GPU pool before kvtier_select returns. */
	KVTIER_ATTACH_NO_HOST_READS = 1u << 0,
};

struct kvtier_attach_opts {
	const char *socket;   /* NULL: $KVTIER_SOCKET, else the daemon's default path */
	const char *tenant;   /* NULL or "": the caller's default tenant (per uid) */
	/* shared data area; 0: the daemon's default (16 MiB). With max_context (the fast path:
	 * a quarter of it for reports), the pages a decode step fills in every layer are in
	 * flight in it at once where it holds 4/3 x layers x batch x kv_heads x page bytes;
	 * a smaller one makes an append wait for an earlier layer's answers. */
	uint64_t data_bytes;
	uint32_t ring_entries;
	uint32_t max_live_seqs; /* sequences open at once; 0: 64 */
	uint32_t flags;         /* enum kvtier_attach_flags */
	/* the fast path (kvtier_select_async): tokens per sequence it covers, for the first
	 * max_live_seqs sequence ids; 0: none (every select is a round trip to the daemon).
	 * Costs GPU memory of the daemon's: per (layer, sequence, KV head, page) a summary
	 * and a map entry, about 2.5% of the KV it covers at head_dim 128. */
	uint32_t max_context;
};

struct kvtier_client;

/*
 * Attaches to the daemon. -ENOENT/-ECONNREFUSED (no daemon), -EACCES (uid not
 * allowed), -EINVAL/-EMSGSIZE (layout refused: the reason is logged to stderr),
 * -EPROTO (wire version mismatch), -ENOMEM, -ENODEV (the daemon's device cannot be
 * used here). *out is owned by the caller until kvtier_detach.
 */
int kvtier_attach(const struct kvtier_layout *layout, const struct kvtier_attach_opts *opts,
		  struct kvtier_client **out);
/* Detaches: the daemon frees this client's sequences. NULL is a no-op. */
void kvtier_detach(struct kvtier_client *c);

/* "cpu" or "cuda": where kvtier_attend runs and KVT_MEM_DEVICE memory lives. */
const char *kvtier_backend(const struct kvtier_client *c);

/* Sequences. Ids are small integers, valid on this client only. */
int kvtier_seq_create(struct kvtier_client *c, uint32_t *out);
/* Frees the sequence's pages (pages a fork still reads stay until it closes). A named
 * sequence's full pages stay in the store, for the next kvtier_seq_open. */
int kvtier_seq_close(struct kvtier_client *c, uint32_t seq);

/*
 * Named sequences: the daemon keeps them on NVMe when no client holds them, across
 * its restarts and crashes, until kvtier_seq_remove. Names are per tenant, 1 to
 * KVTIER_SEQ_NAME_MAX bytes of printable text; a name is held by one open at a time.
 *
 * kvtier_seq_open opens the sequence called name (with KVTIER_SEQ_CREATE: makes it
 * when there is none; with KVTIER_SEQ_EXCL too: only makes it). *tokens (may be NULL)
 * is the tokens it holds, the same in every layer: its full pages that were written
 * to NVMe and read back intact (the daemon reads them all and rebuilds their
 * summaries before returning). Append from there. Tokens of a page still filling
 * when it was closed, or when the daemon died, are not kept; nor is a page past one
 * that never reached the disk or came back corrupt: the sequence ends before it.
 * Errors: -ENOENT (no such name), -EEXIST, -EBUSY (open elsewhere, or a fork of it
 * is), -EINVAL (bad name or flags, or a layout other than the one it was made with:
 * layers, kv_heads, head_dim, dtype, page_tokens), -EMFILE, -EIO (the journal could
 * not be written: nothing was made), -ENOBUFS (reading it back timed out).
 */
#define KVTIER_SEQ_NAME_MAX 128
enum kvtier_open_flags {
	KVTIER_SEQ_CREATE = 1u << 0,
	KVTIER_SEQ_EXCL = 1u << 1,
};
int kvtier_seq_open(struct kvtier_client *c, const char *name, uint32_t flags, uint32_t *seq,
		    uint32_t *tokens);
/*
 * Waits until every full page of seq is on NVMe (of any sequence: a fork's shared
 * pages included): what a crash of the daemon cannot take from a named sequence
 * (with store.durable, nor a crash of the machine). *tokens (may be NULL): the tokens
 * so covered in every layer. -ENOENT, -EIO (a page could not be written anywhere).
 */
int kvtier_seq_sync(struct kvtier_client *c, uint32_t seq, uint32_t *tokens);
/* Drops a named sequence that no one holds open: its pages and its name. -ENOENT,
 * -EBUSY, -EIO (the journal could not be written: nothing was dropped). */
int kvtier_seq_remove(struct kvtier_client *c, const char *name);
/*
 * A new sequence that shares the first prefix_tokens tokens of parent (every layer
 * must hold that many): full pages are shared, not copied. -ERANGE, -ENOENT, -EMFILE.
 */
int kvtier_seq_fork(struct kvtier_client *c, uint32_t parent, uint32_t prefix_tokens,
		    uint32_t *out);
/* Tokens appended to layer of seq. */
int kvtier_seq_tokens(struct kvtier_client *c, uint32_t seq, uint32_t layer, uint32_t *out);

enum kvtier_mem {
	KVT_MEM_HOST = 0,
	KVT_MEM_DEVICE = 1u << 0,
};

/*
 * Appends ntok tokens to one layer of seq: k and v are [ntok][kv_heads][head_dim]
 * (host or device). Large appends are split to fit the data area. Returns 0; on an
 * error (-EDQUOT: the tenant's disk quota; -ENOSPC: disk or summaries full; -EAGAIN)
 * the tokens before the failing one are kept (kvtier_seq_tokens tells how many).
 */
int kvtier_append(struct kvtier_client *c, uint32_t seq, uint32_t layer, const void *k,
		  const void *v, uint32_t ntok, unsigned mem);

enum kvtier_select_flags {
	/* A selected page found only on NVMe is replaced by the best-scored page not
	 * selected that is resident (counted in kvtier_prefetch_stats.substituted), so
	 * the step never waits for the disk. Sink and window pages are never replaced. */
	KVTIER_SEL_SUBSTITUTE = 1u << 0,
	/* The fast path (kvtier_select_async): the attention over the table (kvtier_attend,
	 * kvtier_attend_async) adds an estimate of the pages the table leaves out (not
	 * selected, or selected and not leased yet) from their summaries: each counts as
	 * page_tokens tokens of its mean key and mean value (kvt_estimate). At a budget of a
	 * few percent of a long context this cuts the output's error several times over.
	 * The select starts the estimate over every page on a stream of the library's own
	 * (cuda), beside the selection, reading two head_dim vectors a page; the attend
	 * waits for it there and takes the table's pages out, in q's scale of
	 * 1/sqrt(head_dim) (another scale: the attend makes the whole estimate itself). The
	 * lse stays the attended tokens' own. No effect on a table made through the daemon. */
	KVTIER_SEL_ESTIMATE = 1u << 1,
};

struct kvtier_select_params {
	uint32_t budget_pages;  /* top-k: pages in all, sinks and window included */
	uint32_t sink_tokens;   /* e.g. 64 */
	uint32_t window_tokens; /* e.g. 256 */
	uint32_t top_p_mode;    /* 1: top-p (capped at budget_pages) instead of top-k */
	float top_p;
	uint32_t flags;         /* enum kvtier_select_flags */
	/*
	 * kvtier_select_async: a page leased in host RAM is read in place (over the bus,
	 * every step until it is on the GPU) only if its score bound lies at most host_gap
	 * nats below the row's best (sinks and window always); the others wait for their
	 * copy to the GPU. 0: KVTIER_HOST_GAP; < 0: every one.
	 */
	float host_gap;
	/*
	 * kvtier_select_async: a selected page that may matter (a sink or window page, or
	 * one within host_gap of the row's best) and is not leased yet holds the stream
	 * (on the device, no host thread waits) until the daemon has leased it, read from
	 * NVMe if it must be, for at most wait_us; then the table is made again. Pages of
	 * lower score never wait: they are left out of that step. 0: KVTIER_WAIT_US (long
	 * enough for the first step of a context read back from disk: ~1800 reads a layer
	 * at batch 32); < 0: never wait.
	 */
	int32_t wait_us;
};
#define KVTIER_HOST_GAP 3.0f
#define KVTIER_WAIT_US	200000

/* A step's page tables for a batch of sequences, reused across steps and layers. */
struct kvtier_table;

/* A table for batches of up to max_seqs sequences. NULL on failure. */
struct kvtier_table *kvtier_table_create(struct kvtier_client *c, uint32_t max_seqs);
void kvtier_table_destroy(struct kvtier_table *t);
/*
 * The table's content for host inspection, valid until the next select into it:
 * rows = nseq * kv_heads; slots[r * stride + i] for i < n_pages[r] (the selected full
 * pages in ascending page order: a GPU pool slot, or, with KVTIER_SLOT_HOST set, a
 * slot of the host arena), pages[r * stride + i] the page index of that entry (page p
 * holds tokens p * page_tokens ..); tail_len[r] tokens in the page still filling.
 */
#define KVTIER_SLOT_HOST 0x40000000
struct kvtier_table_view {
	uint32_t rows, stride, layer;
	const int32_t *slots, *n_pages, *tail_len;
	const int32_t *tail_slot; /* [rows] slot in kvtier_memory.tail_pool, or -1 */
	const int32_t *pages;     /* [rows][stride] page index of each slot */
};
void kvtier_table_view(const struct kvtier_table *t, struct kvtier_table_view *out);

/*
 * Selects the pages of layer for the sequences seqs[0..nseq) against the step's
 * queries q [nseq * kv_heads][group][head_dim] (host or device), and makes them
 * readable by kvtier_attend, pinned until the next select of that layer of the
 * sequence (and past it until the reads queued by kvtier_attend_async or marked by
 * kvtier_reads_fence/_hold have ended): in the GPU pool, or read in place from the
 * pinned host arena where a page is there and not (yet) on the GPU. Meanwhile the
 * daemon starts bringing up
 * the pages the next step is likely to need (its prefetcher: kvtier_stats).
 * -ENOENT (a sequence), -EINVAL, -ENOBUFS (the GPU pool cannot hold the pinned pages,
 * or a dense layer's pages do not fit the table), -EIO/-EBADMSG (a page could not be
 * read: never served wrong).
 */
int kvtier_select(struct kvtier_client *c, const uint32_t *seqs, uint32_t nseq, uint32_t layer,
		  const void *q, unsigned mem, const struct kvtier_select_params *p,
		  struct kvtier_table *t);

/*
 * The fast path: the same selection as kvtier_select, made on stream by the caller's
 * own device, with no round trip to the daemon: scores over the page summaries the
 * daemon keeps in memory both map, top-k (sinks and window included), and the table
 * from the daemon's map of pages it keeps for this client (leases: on the GPU, or in
 * host RAM, read in place only within p->host_gap of the row's best score). q is
 * device memory. A selected page not leased yet (or in host RAM and below that) is left
 * out of this table (counted in kvtier_prefetch_stats.missed); the daemon, told of the selection afterwards, leases
 * it for the next steps, and takes leases back from pages not selected for a while
 * (fast.lease_steps). kvtier_attend_async on the same stream then attends over the
 * table; the host side of the table (kvtier_table_view) waits for the kernels.
 * Needs an attach with max_context; a layer below dense_layers, a sequence the fast
 * path does not cover (a fork, a sequence opened by name, a longer context, an id past
 * max_live_seqs), a client attached with KVTIER_ATTACH_NO_HOST_READS (the map names
 * pages in host RAM too) or a daemon without it make this a kvtier_select (synchronous).
 * 0, -EINVAL, -ENOENT, -ENOMEM, -errno of the device.
 */
int kvtier_select_async(struct kvtier_client *c, const uint32_t *seqs, uint32_t nseq,
			uint32_t layer, const void *q, const struct kvtier_select_params *p,
			struct kvtier_table *t, void *stream);

/*
 * Appends ntok tokens to one layer of seq from device memory, queued on stream (k and
 * v [ntok][kv_heads][head_dim], read when the stream gets there), like an engine's
 * cache-write kernel: the page still filling stays on the device until it is full, and
 * only then goes to the daemon (a round trip every page_tokens tokens). Until then the
 * daemon's count of the sequence's tokens is behind (every request that needs them
 * sends them first); as with any page still filling, those tokens are not kept if the
 * daemon dies. Use one stream for a client's appends, selects and attends. Without the
 * fast path it is kvtier_append. 0 or -errno as kvtier_append; also the error of a page
 * that kvtier_append_batch_async handed over without waiting (below), before anything
 * is appended.
 */
int kvtier_append_async(struct kvtier_client *c, uint32_t seq, uint32_t layer, const void *k,
			const void *v, uint32_t ntok, void *stream);

/*
 * A batch's decode step in one call: one token to one layer of each of nseq sequences,
 * k and v [nseq][kv_heads][head_dim] in device memory (row i: seqs[i]'s), queued on
 * stream as kvtier_append_async would queue each (one kernel for them all on the fast
 * path, as an engine's cache write with its slot mapping). Every sequence must be
 * known and named once: else -ENOENT or -EINVAL and nothing is appended. The pages the
 * tokens fill go to the daemon together, as they are on the device (the daemon seals
 * them in one batch), without a wait: copied into the data area behind the call's work
 * on the stream, handed over once the copies have landed, and answered by the layer's
 * next append (or any call that goes through the daemon). Until then each stays the
 * sequence's page still filling, attended from where it is (a select's table has one
 * full page fewer and a tail of page_tokens tokens). A page the daemon refuses (its
 * quota or its disk full, the daemon gone) loses its tokens as kvtier_append_async would
 * (kvtier_seq_tokens says where each layer ends), the other sequences keep theirs, and
 * the next kvtier_append_batch_async or kvtier_append_async returns the error before it
 * appends anything. Without the fast path it is kvtier_append for each. 0 or -errno.
 */
int kvtier_append_batch_async(struct kvtier_client *c, const uint32_t *seqs, uint32_t nseq,
			      uint32_t layer, const void *k, const void *v, void *stream);

/*
 * For an engine that reads the pages of a table with kernels of its own: work queued
 * on stream after this call runs after the table's pages are in their slots. On the
 * cuda backend kvtier_select may return while the daemon's copies of pages into the
 * GPU pool are under way (ordered by a CUDA IPC event it records behind them; the
 * backend's own stream, where kvtier_attend runs, already waits for them, and
 * kvtier_attend_async orders its stream itself). On cpu they have landed when
 * kvtier_select returns, and this does nothing. 0 or -errno.
 */
int kvtier_table_ready(struct kvtier_client *c, const struct kvtier_table *t, void *stream);

/*
 * Attention of the queries q (the same as selected with, host or device) over the
 * table's pages plus each sequence's filling page: out [rows][group][head_dim], lse
 * [rows][group] (may be NULL), both host or device as q. scale: usually
 * 1/sqrt(head_dim).
 */
int kvtier_attend(struct kvtier_client *c, const struct kvtier_table *t, const void *q,
		  void *out, float *lse, float scale, unsigned mem);

/*
 * kvtier_attend queued on stream without waiting for it, the way an engine queues a
 * layer's attention and goes on to the next: stream is a cudaStream_t on the cuda
 * backend (NULL: the legacy default stream); q, out and lse are in the backend's memory
 * (device memory on cuda; on cpu, where it completes before returning, host memory).
 * Behind the kernel the library records the daemon's read fence, so the pages the table
 * names stay in their slots until it has run, even past the next select of their
 * layer. The kernel reads the table and the layer's tail pages too: a select into the
 * same table, and an append to the same layer, first wait for it (one table per layer
 * keeps a pipeline of layers apart). With a daemon that gave no fence it synchronises
 * before returning. 0, -EINVAL, -errno.
 */
int kvtier_attend_async(struct kvtier_client *c, struct kvtier_table *t, const void *q,
			void *out, float *lse, float scale, void *stream);

/*
 * For an engine that reads the pages of its tables with kernels of its own (see
 * kvtier_memory): marks the end of the reads queued on stream so far; until they have
 * run, no slot a later select lets go of is reused. (The tail pages are the library's:
 * order their reads before the next append of their layer.) 0 or -errno.
 */
int kvtier_reads_fence(struct kvtier_client *c, void *stream);

/*
 * For an engine whose own threads read the pages of its tables in host-visible memory
 * (the cpu backend's pool, the host arena): from hold to release, no slot a select lets
 * go of is reused. Holds nest. Safe from any thread, also while another is inside a
 * call of this client.
 */
void kvtier_reads_hold(struct kvtier_client *c);
void kvtier_reads_release(struct kvtier_client *c);

/*
 * Where the pages are, for an engine that runs its own attention kernel over a table:
 * slot s of the GPU pool is at pool + s * slot_bytes (K[page_tokens][head_dim] then
 * V), read-only; the page still filling of row r is slot tail_slot of tail_pool (the
 * library's copy, same stride). Both in the backend's memory. Valid until detach.
 */
struct kvtier_memory {
	const void *pool;
	uint64_t pool_bytes, slot_bytes;
	const void *tail_pool;
	/* KVTIER_SLOT_HOST slot s is at host_pool + s * host_slot_bytes (an address the
	 * backend's kernels read: mapped pinned host memory); NULL when this client does
	 * not read host pages in place */
	const void *host_pool;
	uint64_t host_slot_bytes;
};
void kvtier_memory(const struct kvtier_client *c, struct kvtier_memory *out);

/*
 * Where a decode step's pages were found and what the daemon's prefetcher did. A step
 * is one select of one (sequence, layer). Latencies: the prefetcher's fetches from
 * issue to arrival, lat_*[i] counting those of [2^i, 2^(i+1)) microseconds (the last
 * bucket open); bytes and latencies are kept per client only.
 */
#define KVTIER_LAT_BUCKETS 24

struct kvtier_prefetch_stats {
	uint64_t steps;       /* selections of one (sequence, layer) */
	uint64_t selected;    /* pages selected */
	uint64_t hit;         /* on the GPU when the selection was made */
	uint64_t late;        /* on their way then (a prefetch): the answer waited for them */
	uint64_t host;        /* read in place from host RAM */
	uint64_t disk;        /* only on NVMe: read during the step */
	uint64_t fetched;     /* in host RAM, brought to the GPU during the step (no host reads) */
	uint64_t substituted; /* only on NVMe, replaced (KVTIER_SEL_SUBSTITUTE) */
	uint64_t prefetch_gpu, prefetch_host; /* prefetches started, by destination */
	uint64_t prefetch_used;    /* prefetched pages selected within prefetch.wasted_steps */
	uint64_t prefetch_wasted;  /* ... and not */
	uint64_t prefetch_refused; /* the store had no room to start them */
	uint64_t bytes_h2d, bytes_nvme; /* prefetched into the GPU, and read from NVMe */
	/* kvtier_select_async: selected pages the step went without (not leased on the GPU
	 * when its table was made, or waited for past the wait's end; leased since, for the
	 * next steps) */
	uint64_t missed;
	uint64_t lat_gpu[KVTIER_LAT_BUCKETS];  /* host RAM -> GPU */
	uint64_t lat_host[KVTIER_LAT_BUCKETS]; /* NVMe -> host RAM */
};

/* The counters of one sequence (no bytes or latencies), or with seq = UINT32_MAX the
 * client's. 0, -ENOENT. */
int kvtier_stats(struct kvtier_client *c, uint32_t seq, struct kvtier_prefetch_stats *out);

/* A round trip through the request ring that does nothing (for benchmarks). */
int kvtier_nop(struct kvtier_client *c);
/* A round trip over the control socket (PING/PONG). */
int kvtier_ping(struct kvtier_client *c);

#ifdef __cplusplus
}
#endif

#endif
