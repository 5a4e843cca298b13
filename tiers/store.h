/* SPDX-License-Identifier: MIT */
#ifndef KVT_STORE_H
#define KVT_STORE_H

/*
 * The page store: every KV page of every sequence, in GPU HBM, pinned host RAM or on
 * NVMe, and the moves between them. Each page is written back to NVMe in the
 * background once complete, so the whole cache is always on disk and dropping a copy
 * from HBM or host RAM costs no write.
 *
 * Asynchronous: operations start work and return; completions run from
 * kvt_store_run, on the thread that calls it (the store is single-threaded: one
 * thread owns it). Callbacks may call back into the store. Functions return 0 or a
 * negative errno, and never lose a page on error.
 */

#include <stdbool.h>
#include <stdint.h>

#include "page_format.h"
#include "tier.h"

struct kvt_store;
struct kvt_device;

enum kvt_diskfull {
	KVT_DISKFULL_REFUSE = 0, /* put returns -ENOSPC, counted */
	KVT_DISKFULL_EVICT_SEQ,  /* drop the coldest unpinned sequences, counted */
};

/* When a complete page goes to disk. */
enum kvt_write_policy {
	/* at once, when it is sealed: every page has its NVMe slot from its put on, and
	 * the host tier only ever evicts clean copies (the default) */
	KVT_WRITE_THROUGH = 0,
	/* when the host tier needs its room: its coldest dirty pages are written once more
	 * than its low watermark's share of it are on no disk (the rest is kept for clean
	 * copies, which make way at once). A store whose host tier holds its pages writes
	 * nothing; pages only
	 * in host RAM are lost if the process dies (kvt_store_flush writes them all). The
	 * disk then need hold only what the host tier does not. */
	KVT_WRITE_BACK,
};

struct kvt_store_params {
	const char *device;    /* "auto" (default), "cuda", "cpu"; ignored if dev is set */
	struct kvt_device *dev; /* an open device to use (not closed by the store) */
	const char *nvme_path; /* file or block device (required) */
	uint64_t nvme_bytes;   /* payload capacity when the store is made */
	uint64_t host_bytes;   /* tenant 0's host arena */
	uint64_t gpu_bytes;    /* tenant 0's GPU arena (0: no GPU tier) */
	uint32_t page_bytes;   /* bytes of one page (K and V); default 32 KiB */
	unsigned queue_depth;  /* nvme in-flight I/Os; default 64 */
	/* of those, the most that are not hurried (kvt_store_hurry); default queue_depth */
	unsigned background_depth;
	unsigned writeback_max; /* write-backs in flight; default queue_depth / 2 */
	unsigned high_wm;      /* percent: background eviction starts above; default 90 */
	unsigned low_wm;       /* percent: and stops at; default 80 */
	enum kvt_diskfull disk_full;
	enum kvt_write_policy write_policy;
	bool durable;          /* write-backs with RWF_DSYNC */
	const struct tier_ops *nvme_ops; /* NULL: tier_nvme_ops, or tier_fault_ops with faults */
	const char *faults;              /* fault injection into the NVMe tier (tier_fault.h) */
};

enum kvt_page_state {
	KVT_PAGE_FILLING = 0, /* tokens still being appended: not written back */
	KVT_PAGE_DIRTY,       /* complete, not yet on disk */
	KVT_PAGE_CLEAN,       /* on disk */
};

struct kvt_page_info {
	enum kvt_page_state state;
	unsigned valid;    /* bit (1 << tier_id) per tier holding a valid copy */
	unsigned inflight; /* bit per tier a copy is being made into */
	unsigned queued;   /* of those, the GPU's when the device has its copy queued:
			    * slot[TIER_GPU] is then where it lands (kvt_store_promote_queued) */
	unsigned pins;
	uint32_t len;
	uint64_t epoch;
	tier_slot_t slot[TIER_MAX];
	float score;
};

/*
 * Histograms: counts[i] holds values in [2^i, 2^(i+1)) units (bucket 0 also below 1,
 * the last bucket open). Latencies in microseconds, lifetimes and reuse gaps in
 * milliseconds.
 */
#define KVT_HIST_BUCKETS 32

static inline unsigned kvt_hist_bucket(uint64_t v)
{
	unsigned b = v > 1 ? 63u - (unsigned)__builtin_clzll(v) : 0;
	return b < KVT_HIST_BUCKETS ? b : KVT_HIST_BUCKETS - 1;
}

/* Why a copy left a tier. */
enum kvt_evict_reason {
	KVT_EVICT_WATERMARK = 0, /* background eviction above the high watermark */
	KVT_EVICT_ROOM,          /* to make room for a page coming in */
	KVT_EVICT_REQUEST,       /* kvt_store_evict: an operator or the daemon asked */
	KVT_EVICT_STALE,         /* a GPU copy made stale by an append */
	KVT_EVICT_MAX
};
const char *kvt_evict_reason_name(enum kvt_evict_reason r);

struct kvt_store_stats {
	struct tier_usage tier[TIER_MAX];
	uint64_t pages, pages_filling, pages_dirty, seqs;
	uint64_t puts, appends, promotions[TIER_MAX], writebacks, evictions[TIER_MAX];
	uint64_t drops, pages_dropped;
	uint64_t enospc_refused, diskfull_seq_evictions;
	uint64_t writes_for_room; /* KVT_WRITE_BACK: write-backs started to free host slots */
	uint64_t read_errors;   /* disk copies found bad: counted misses */
	uint64_t write_errors;  /* write-backs that failed and were retried elsewhere */
	uint64_t pages_lost;    /* pages whose every copy was bad */
	uint64_t recovered_pages, recovered_bad;
	uint64_t backpressure;  /* operations refused with -EAGAIN: tier full of busy pages */
	uint64_t reads_hurried; /* NVMe reads moved ahead of the others (kvt_store_hurry) */
	/* those reads, from the hurry to done, and their last try's time on the disk
	 * (handed to it to done): log2 us */
	uint64_t hurried_lat[KVT_HIST_BUCKETS], hurried_disk[KVT_HIST_BUCKETS];
	uint64_t hurried_lat_sum_us, hurried_disk_sum_us;
	uint64_t meta_bytes;
	uint64_t evict_reason[TIER_MAX][KVT_EVICT_MAX];
	/* copies performed by each tier (TIER_READ: out of it, TIER_WRITE: into it),
	 * from queueing to completion, failed ones included: log2 us */
	uint64_t lat[TIER_MAX][2][KVT_HIST_BUCKETS];
	uint64_t lifetime[KVT_HIST_BUCKETS];  /* put to drop of a page: log2 ms */
	uint64_t reuse_gap[KVT_HIST_BUCKETS]; /* between two touches of a page: log2 ms */
	uint64_t lat_sum_us[TIER_MAX][2], lifetime_sum_ms, reuse_gap_sum_ms; /* exact sums */
};

/* Completion: res 0 or -errno. */
typedef void (*kvt_store_cb)(void *arg, int res);

/*
 * Opens (or makes) the store. An existing NVMe store is scanned: every page whose
 * write completed comes back CLEAN on disk, torn or corrupt ones are dropped.
 * Errors: -EBUSY (another process has the store), -EINVAL (bad params or a store made
 * with another page size), -ENOMEM, -ENODEV (device "cuda" and no GPU), -errno.
 */
int kvt_store_open(const struct kvt_store_params *p, struct kvt_store **out);
/* Waits for I/O in flight (it does not write back dirty pages: see flush). */
void kvt_store_close(struct kvt_store *s);

/* Gives tenant arenas of its own in host RAM and on the GPU. 0 or -errno. */
int kvt_store_add_tenant(struct kvt_store *s, uint32_t tenant, uint64_t host_bytes,
			 uint64_t gpu_bytes);

enum kvt_put_flags {
	KVT_PUT_GPU = 1u << 0,     /* also place the page on the GPU */
	KVT_PUT_FILLING = 1u << 1, /* incomplete: more tokens will be appended */
};

/*
 * Stores a new page: len bytes (at most page_bytes) copied from src into host RAM,
 * and onto the GPU with KVT_PUT_GPU; an NVMe slot is reserved for it at once
 * (KVT_WRITE_THROUGH; KVT_WRITE_BACK: when it is written). cb
 * (may be NULL) runs when the page is where it was asked to be.
 * Errors: -EEXIST, -EINVAL, -ENOSPC (disk full, policy refuse), -EAGAIN (host tier or
 * disk busy: run the store and retry), -ENOENT (tenant has no arenas).
 */
int kvt_store_put(struct kvt_store *s, const struct page_key *k, const void *src,
		  uint32_t len, unsigned flags, kvt_store_cb cb, void *arg);

/*
 * A put whose bytes the caller copies: a new page of len bytes in host RAM, at *dst,
 * which the caller writes (from any thread; the store neither reads nor writes them
 * meanwhile) before kvt_store_seal. Until then the page is FILLING: its one copy is
 * kept and never written back, and it must not be promoted or read. So kvtierd copies
 * a batch of appended pages over its threads. Errors as kvt_store_put's.
 */
int kvt_store_put_reserve(struct kvt_store *s, const struct page_key *k, uint32_t len,
			  void **dst);

/*
 * A FILLING page is complete as it is (its bytes written, kvt_store_put_reserve): it
 * goes to write-back as a put's. -ENOENT, -EINVAL (not filling).
 */
int kvt_store_seal(struct kvt_store *s, const struct page_key *k);

/*
 * Appends len bytes to a FILLING page (its host copy; a GPU copy is dropped). seal:
 * the page is complete and goes to write-back. -ENOENT, -EINVAL (not filling, or
 * past page_bytes), -EAGAIN (page busy: in flight).
 */
int kvt_store_append(struct kvt_store *s, const struct page_key *k, const void *src,
		     uint32_t len, bool seal);

/*
 * Brings a copy of the page to tier `to` (TIER_HOST or TIER_GPU) from wherever it
 * is (NVMe -> host -> GPU). cb runs once it is there, or with the error (a disk copy
 * found corrupt gives -EBADMSG/-ESTALE/-EIO, counted, never wrong data).
 */
int kvt_store_promote(struct kvt_store *s, const struct page_key *k, enum tier_id to,
		      kvt_store_cb cb, void *arg);

/*
 * promote to the GPU for a reader that orders its reads after the store's copies
 * (kvt_store_copy_fence): cb runs as soon as the page's copy into the GPU is queued on
 * the device, or it is there, without waiting for the copy to land; its page info then
 * shows slot[TIER_GPU], and `queued` while the copy is under way. Reads ordered after a
 * copy fence recorded from then on see the page. A queued copy does not fail (short of
 * a fault of the device itself).
 */
int kvt_store_promote_queued(struct kvt_store *s, const struct page_key *k, kvt_store_cb cb,
			     void *arg);
/* Records f (made with shared state: kvt_device_ops.fence_create) behind every copy into
 * the GPU queued so far. 0 or -errno. */
struct kvt_fence;
int kvt_store_copy_fence(struct kvt_store *s, struct kvt_fence *f);

/*
 * promote for pages that are only likely to be needed: starts only where every tier
 * on the way has room now (free, or by evicting a cold copy), and never waits for
 * room: -EAGAIN instead, nothing started.
 */
int kvt_store_prefetch(struct kvt_store *s, const struct page_key *k, enum tier_id to,
		       kvt_store_cb cb, void *arg);

/*
 * The page's read from NVMe into host RAM (started by a promote or prefetch), if it is
 * still waiting for the disk, goes before the reads and writes that are not hurried:
 * someone waits for this page now. A page still waiting for room in host RAM before
 * its read can start is the first to get it, and its read is hurried then. 0, or
 * -ENOENT (no such read under way or waiting).
 */
int kvt_store_hurry(struct kvt_store *s, const struct page_key *k);

/* Makes sure the page is on NVMe; cb runs when it is. */
int kvt_store_writeback(struct kvt_store *s, const struct page_key *k, kvt_store_cb cb,
			void *arg);

/*
 * Drops the page's copy in tier `from` at once. -ENOENT (no copy there), -EBUSY
 * (pinned or in flight), -EPERM (it is the only valid copy).
 */
int kvt_store_evict(struct kvt_store *s, const struct page_key *k, enum tier_id from);

/* Frees every page of a sequence in every tier. -ENOENT, -EBUSY (a page is pinned). */
int kvt_store_drop_seq(struct kvt_store *s, uint32_t tenant, uint64_t seq);

/* The epoch of the last write started (or found on disk at open): every later write
 * gets a higher one. */
uint64_t kvt_store_epoch(const struct kvt_store *s);

/* Frees one page in every tier (a sequence cut short). -ENOENT, -EBUSY (pinned). */
int kvt_store_drop_page(struct kvt_store *s, const struct page_key *k);

/* Copies the page's payload into dst (promoting it to host RAM first if needed). */
int kvt_store_read(struct kvt_store *s, const struct page_key *k, void *dst, uint32_t cap,
		   kvt_store_cb cb, void *arg);

/* Pins keep every copy of a page in place (a decode step reads it). */
int kvt_store_pin(struct kvt_store *s, const struct page_key *k);
int kvt_store_unpin(struct kvt_store *s, const struct page_key *k);
/* Records an access and the page's latest selection score (eviction keeps high ones). */
int kvt_store_touch(struct kvt_store *s, const struct page_key *k, float score);

/*
 * A hint, nothing else: k's hash bucket (page false) or, once that is cached, its page
 * into the CPU's cache, for a lookup of k a few lookups later. A lookup in a store of
 * millions of pages is two cache misses (the bucket, the page); a loop over many keys
 * that warms the bucket of the key 8 ahead and the page of the key 4 ahead has them
 * under way together (tools/bench_store.c measures it).
 */
void kvt_store_warm(struct kvt_store *s, const struct page_key *k, bool page);

int kvt_store_page_info(struct kvt_store *s, const struct page_key *k,
			struct kvt_page_info *out);

/*
 * A page found once, for the calls below that would look it up again. A reference
 * stays good while the store drops no page (kvt_store_drops unchanged) and does not
 * run (kvt_store_run, kvt_store_flush, ...): use it between those, on the store's
 * thread.
 */
struct kvt_page_ref;
/* Pages dropped so far: references taken before it last changed may be gone. */
uint64_t kvt_store_drops(const struct kvt_store *s);
/*
 * k's page and its info (out may be NULL), or NULL: none. Reads the store and writes
 * nothing: other threads may call it together while its own thread calls nothing of
 * the store (the daemon looks up a report's pages on several).
 */
struct kvt_page_ref *kvt_store_lookup(const struct kvt_store *s, const struct page_key *k,
				      struct kvt_page_info *out);
/* kvt_store_pin, kvt_store_prefetch and kvt_store_page_info of a page looked up. */
int kvt_store_pin_ref(struct kvt_store *s, struct kvt_page_ref *r);
int kvt_store_prefetch_ref(struct kvt_store *s, struct kvt_page_ref *r, enum tier_id to,
			   kvt_store_cb cb, void *arg);
void kvt_store_ref_info(const struct kvt_page_ref *r, struct kvt_page_info *out);
/* A hint: the page's first lines into this CPU's cache, for its use a few calls later. */
void kvt_store_ref_warm(const struct kvt_page_ref *r);
/*
 * Calls fn for every page of the tenant's sequence seq (every page of every sequence
 * with seq = UINT64_MAX; of every tenant with tenant = UINT32_MAX), until fn returns
 * non-zero, which is returned. fn must not add or drop pages.
 */
typedef int (*kvt_store_page_fn)(void *arg, const struct page_key *k,
				 const struct kvt_page_info *pi);
int kvt_store_foreach(struct kvt_store *s, uint32_t tenant, uint64_t seq,
		      kvt_store_page_fn fn, void *arg);
/* The page's address in a memory tier (device address for the GPU), or NULL. */
void *kvt_store_slot_ptr(struct kvt_store *s, const struct page_key *k, enum tier_id t);

/*
 * Runs completions and periodic work (write-back, eviction to the watermarks), waiting
 * up to timeout_ms for something to complete (0: do not wait). Returns the number of
 * completions handled or -errno.
 */
int kvt_store_run(struct kvt_store *s, int timeout_ms);
/* True while page moves are in flight or queued, completions wait to run, or the disk
 * has I/O of its own outstanding (wipes of freed slots). */
bool kvt_store_busy(struct kvt_store *s);
/* Writes back every complete dirty page and waits. 0 or the first error. */
int kvt_store_flush(struct kvt_store *s);

void kvt_store_stats(struct kvt_store *s, struct kvt_store_stats *out);
struct tier *kvt_store_tier(struct kvt_store *s, enum tier_id t);
struct kvt_device *kvt_store_device(struct kvt_store *s);
/* The store's event loop: a daemon adds its own operations (sockets, eventfds) to it;
 * their completions run from kvt_store_run. */
struct kvt_loop *kvt_store_loop(struct kvt_store *s);
uint32_t kvt_store_page_bytes(struct kvt_store *s);

#endif
