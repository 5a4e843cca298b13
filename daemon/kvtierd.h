/* SPDX-License-Identifier: MIT */
#ifndef KVT_KVTIERD_H
#define KVT_KVTIERD_H

/*
 * kvtierd's private state: the server (socket, clients, rings: server.c) and the
 * engine (sequences, appends, selections: engine.c) over one page store and one
 * compute backend, all owned by one thread.
 */

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "config.h"
#include "daemon/json.h"
#include "daemon/list.h"
#include "daemon/loop.h"
#include "daemon/pool.h"
#include "ipc/wire.h"
#include "kernels/compute.h"
#include "tiers/device.h"
#include "tiers/store.h"

/* Why a client was disconnected (counted by reason). */
enum kvd_disc {
	KVD_DISC_CLOSED = 0,  /* the client closed its socket (or it died) */
	KVD_DISC_PROTOCOL,    /* a malformed control message */
	KVD_DISC_REFUSED,     /* HELLO refused: layout, limits, tenants */
	KVD_DISC_BAD_REQUEST, /* a malformed request or a corrupt ring index */
	KVD_DISC_ERROR,       /* an error on our side (memory, eventfd, socket) */
	KVD_DISC_STOPPING,    /* the daemon stopped */
	KVD_DISC_MAX
};
const char *kvd_disc_name(enum kvd_disc why);

struct kvd_tenant {
	uint32_t id;
	uid_t uid;
	char name[KVT_TENANT_NAME_MAX];
	bool used;
	bool reserved; /* the journal of named sequences holds this id for (uid, name) */
	unsigned clients;
	int pool_fd, host_fd;
	uint64_t pool_bytes, host_bytes;
	uint64_t disk_pages; /* pages of this tenant in the store (its disk quota) */
};

/*
 * A named sequence (names.c): its pages stay on NVMe when no client holds it and
 * across restarts (the journal beside the store keeps the name), until it is removed.
 */
struct kvd_named {
	uint64_t sseq;  /* store sequence: bit 63 set, never reused */
	uint32_t tenant; /* id, kept across restarts by the journal */
	uid_t uid;
	char tname[KVT_TENANT_NAME_MAX];
	char name[KVT_SEQ_NAME_MAX + 1];
	struct kvt_wire_layout layout;
	uint32_t pages;          /* full pages of every (layer, head) in the store */
	struct kvd_origin *open; /* while a sequence (or a fork of it) holds it */
	/* Where it was cut short, and the store's epoch then: a page on disk at or past
	 * `keep` written no later than `epoch` is a dropped one whose wipe may not have
	 * landed, never a page of what came after. */
	struct kvd_cut {
		uint32_t keep;
		uint64_t epoch;
	} *cuts;
	uint32_t ncuts;
};

/* A store-level sequence: the owner of pages, shared by forks of it. */
struct kvd_origin {
	uint64_t sseq;
	struct kvd_named *named; /* NULL: dropped with its last reference */
	bool building;           /* a named one being read back (SEQ_OPEN) */
	unsigned refs;
	int32_t *recs; /* summary records this origin's pages own */
	uint32_t nrecs, rcap;
	uint64_t pages;
};

struct kvd_layer {
	uint32_t ntok;    /* tokens appended */
	uint32_t stored;  /* full pages in the store; ntok / T unless a seal is pending */
	uint32_t cap;     /* capacity of owner and rec */
	struct kvd_origin **owner; /* [cap] */
	int32_t *rec;     /* [kv_heads][cap] summary record of (head, page) */
	uint8_t *fill;    /* [kv_heads][page_bytes] the page being filled */
	uint32_t sealed_heads; /* of a pending seal: heads already put */
	bool seal_queued;      /* its next page put, its summaries in the client's batch */
	struct page_key *pinned; /* pins of the last selection */
	uint32_t npinned, pincap;
	/* the prefetcher's memory of this layer, [kv_heads][cap] like rec */
	struct kvd_prev {
		float s;     /* the page's score when it was last a candidate */
		uint32_t at; /* at that selection (steps) */
	} *prev;
	uint32_t *pf_step; /* the selection after which a prefetch of it started (0: none) */
	uint32_t steps;    /* selections of this layer so far */
	/* the fast path (fast.c), [kv_heads][cap] like rec: the slot leased to the client
	 * (-1: none, -2: on its way) and the feedback that last selected the page, side by
	 * side (a report reads and writes both for each page it names); the leases as
	 * (head << 24 | page); feedbacks of this layer so far */
	struct kvd_lease {
		int32_t slot;
		uint32_t at;
	} *lease;
	uint32_t *leased;
	uint32_t nleased, leasecap;
	uint32_t fsteps;
};

struct kvd_seq {
	uint32_t id;
	uint64_t gen; /* unique per client: tells a later sequence of the same id apart */
	struct kvd_origin *own;
	struct kvd_origin **refs; /* every origin whose pages it reads, own first */
	uint32_t nrefs;
	struct kvtier_prefetch_stats st; /* its steps (no latencies: those are the client's) */
	uint32_t fb_mark; /* the client's fb_mark of the last report that named it */
	struct kvd_layer layer[];
};

/* A request that waits for page moves: the client takes no other until it ends. */
struct kvd_wait {
	struct kvd *d;
	struct kvd_client *c; /* NULL once the client is gone or the wait timed out */
	uint64_t user_data;
	uint64_t start_ns;
	unsigned pending; /* store callbacks outstanding */
	int err;
	void (*finish)(struct kvd_wait *w); /* posts the completion; frees nothing */
	void (*retry)(struct kvd_wait *w);  /* restarts moves the store refused (may be NULL) */
	void (*release)(struct kvd_wait *w); /* frees */
	void (*cancel)(struct kvd_wait *w);  /* undoes on a timeout, the client kept (may be NULL) */
};

struct kvd_zombie {
	struct kvt_list link;
	uint32_t tenant;
	uint64_t sseq;
};

/* The fast path's work, timed by part (fast.c) */
enum kvd_fast_ns {
	KVD_FAST_WAITS,      /* the pages a client waits for: leased, acked (fb_wait_pass) */
	KVD_FAST_READS,      /* a report read (over the pool): selections noted, the pages
			      * to lease found in the store, the leases to take back listed */
	KVD_FAST_LEASES,     /* then: leases taken back, leases started, host ones promoted */
	KVD_FAST_MAP,        /* the map writes into the client's GPU map (a device round trip) */
	KVD_FAST_ACKS,       /* acks whose pages came in */
	KVD_FAST_RELEASES,   /* taken-back slots whose reads are done (the read fence) */
	KVD_FAST_NS_MAX
};

struct kvd_client {
	struct kvd *d;
	struct kvt_list link;
	uint32_t id;
	int sock;
	pid_t pid;
	uid_t uid;
	gid_t gid;
	struct kvd_tenant *tenant;
	struct kvt_wire_layout layout;
	struct kvt_geom geom;
	uint32_t page_bytes;
	/* shared memory */
	int ring_fd, req_efd, cmp_efd;
	uint8_t *ring;
	uint64_t ring_bytes;
	struct kvt_ring_hdr *hdr;
	struct kvt_sqe *sqes;
	struct kvt_cqe *cqes;
	uint8_t *data;
	uint64_t data_bytes;
	uint32_t sq_head, cq_tail, sq_entries, cq_entries; /* our own copies */
	/* sequences */
	struct kvd_seq **seqs;
	uint32_t nseqs;
	/* summaries: records in backend memory, a free stack on the host */
	void *sum_pool;
	uint32_t sum_cap, sum_used;
	int32_t *sum_free;
	uint32_t sum_nfree;
	size_t rec_bytes;
	/* event loop */
	struct kvt_op sock_op, efd_op;
	uint64_t efd_val;
	unsigned ops_inflight;
	bool attached, dead, kicked;
	char why[160];
	struct kvd_wait *busy; /* a request waiting for page moves */
	/* pages put whose summaries are built together (engine.c kvd_seal_flush), and
	 * the appends answered then; their records, [kv_heads] each */
	struct kvd_seal {
		struct kvd_seq *q;
		uint32_t layer, idx;
		const uint8_t *src; /* head h's page at src + h * stride */
		size_t stride;
		uint64_t ud; /* the append answered once sealed */
		uint32_t accepted, ntok;
		bool answer;
		int res; /* once flushed: 0, or why it was not sealed */
		uint64_t t_in; /* when its append was read out of the ring */
	} *seals;
	int32_t *seal_recs;
	uint32_t nseals;
	/* their pages' bytes, copied into the store's host slots over the daemon's threads
	 * before the pages are sealed in the store (engine.c put_copies) */
	struct kvd_put_copy {
		void *dst;
		const uint8_t *src;
		struct page_key k;
	} *copies;
	uint32_t ncopies;
	uint64_t page_copy_ns; /* counter: those copies, wall time */
	uint64_t seal_batches, sealed; /* counters: flushes, seals made in them */
	uint64_t seal_ns, seal_lease_ns; /* in kvd_seal_flush; of it leasing the pages */
	/* appends of whole pages (KVT_APPEND_PAGES): their puts (the store's copies of the
	 * page, summed), and from each one read out of the ring to its answer */
	uint64_t page_appends, page_put_ns, page_answer_ns;
	bool data_pinned; /* the data area is registered with the device (copies from it) */
	/* its reads (engine.c): the fence it records behind them, the pins let go of
	 * while they may still run, and whether they may (this request) */
	struct kvt_fence *fence;
	struct page_key *deferred;
	uint32_t ndeferred, defcap;
	bool reads_busy;
	uint64_t pins_deferred; /* counter */
	/* the copy fence (wire.h): selects that answered before their copies into the GPU
	 * pool landed, and the pages so served */
	struct kvt_fence *copy_fence;
	uint64_t selects_early, pages_early;
	/* the fast path (fast.c): its region, the feedbacks waiting for the client's
	 * kernels (in order), the map writes not made yet and the leases they take back,
	 * and the leases taken back whose slots wait for the client's reads */
	struct kvt_dev_mem fast;
	uint32_t fast_pages, fast_seqs;
	uint64_t fast_map_off, fb_done, seq_gen;
	struct kvd_fb {
		struct kvt_sqe e;
		bool waits_done; /* its waited pages leased ahead (fb_waits_ahead) */
	} *fb;
	uint32_t nfb, fbcap;
	int32_t *pairs;
	uint32_t npairs, paircap;
	struct page_key *revoking;
	uint32_t nrevoking, revokingcap;
	struct kvd_revoked {
		struct page_key k;
		uint32_t snap; /* fence_seq once the map said -1 */
	} *revoked;
	uint32_t rv_head, nrevoked, revokedcap; /* a FIFO */
	uint64_t fast_feedbacks, fast_grants, fast_revokes, fast_refused;
	uint64_t fast_selected, fast_fresh; /* pages reported; of them not in the layer's last */
	uint64_t fast_fb_ns, fast_grant_ns; /* in fb_process; from lease start to grant, summed */
	/* where the fast path's time goes, summed (kvtierctl --json clients: a report's mean) */
	uint64_t fast_ns[KVD_FAST_NS_MAX];
	uint64_t fast_copied, fast_pressured; /* host leases moved to the GPU; sweeps at keep 1 */
	uint32_t fast_lag_max;		    /* most feedbacks waiting at once */
	uint32_t fast_promoting;	    /* host leases on their way to the GPU */
	uint32_t fast_reading;		    /* leases on their way from NVMe */
	bool fast_pressure; /* a lease found no room since the last tick */
	/* reports whose client waits (KVT_PAGE_WAIT) for pages still being read in, in
	 * order: the ack is written once none is; their ring bytes and those of every
	 * report after them are held until then (the client reuses them) */
	struct kvd_ack {
		uint64_t off;  /* the report's entry in the data area */
		uint64_t hold; /* fb_seen before it */
		uint64_t t0, wait_ns; /* the client waits from t0 (about) for wait_ns */
		uint32_t token, n, waited;
		struct kvd_ack_page {
			uint64_t gen;
			uint32_t seq, layer, h, p;
		} *pg; /* [n] still being read in */
	} *acks;
	uint32_t nacks, ackcap;
	struct kvd_fb_part *fb_parts; /* a report's first pass: one part a pool thread */
	unsigned fb_nparts;
	uint32_t fb_mark; /* reports read: a sequence named twice in one is read once */
	uint64_t fb_seen; /* ring bytes of the reports processed */
	uint64_t fast_waits, fast_waited, fast_wait_ns; /* reports, pages, report to ack */
	uint64_t fast_waits_late; /* acked after the client stopped waiting: pages left out */
	uint64_t fast_waits_ahead; /* of the reports, leased ahead of reports before them */
	uint64_t fast_superseded;  /* reports counted only: a later one of their layer was in */
	uint64_t fast_pooled;      /* reports read over the pool's threads (fast.threads) */
	uint64_t fast_wait_lat[KVT_HIST_BUCKETS];       /* report to ack, log2 us */
	uint64_t fast_wait_reads, fast_wait_read_ns;    /* their NVMe reads: lease to in */
	uint8_t rx[sizeof(struct kvt_msg_hdr) + KVT_MSG_MAX];
	size_t rx_len;
	/* counters */
	uint64_t requests, bad_requests, tokens, selects;
	struct kvtier_prefetch_stats pf;
	uint64_t sel_lat[KVT_HIST_BUCKETS];     /* select: request to answer, log2 us */
	uint64_t sel_compute[KVT_HIST_BUCKETS]; /* of which scoring and top-k */
	uint64_t sel_lat_sum_us, sel_compute_sum_us;
	uint64_t attn[KVT_HIST_BUCKETS], attn_sum_us; /* kvtier_attend, as the client timed it */
	uint64_t attach_ns;
	/* control connections (kvtierctl): no HELLO, CTL messages */
	bool ctl;
	enum kvd_disc disc;
	struct kvt_buf tx; /* answers not yet sent */
	size_t tx_off;
	struct kvt_op out_op; /* ops_inflight bit 2: waiting to send */
};

/* The phases of a select, in order (the device wait is part of SEL_DEVICE). */
enum kvd_sel_phase {
	SEL_INPUTS,  /* sequences, record index, queries staged */
	SEL_DEVICE,  /* copies up, score and top-k kernels, copies back */
	SEL_WAIT,    /* of SEL_DEVICE: waiting for the device after the launches */
	SEL_RANK,    /* pins; with substitution, the ranking and substitution */
	SEL_WHERE,   /* finding each selected page, starting the moves waited for */
	SEL_PLAN,    /* the plan's ranking (without substitution) and its prefetches:
		      * after the answer when the select waits for no move */
	SEL_ANSWER,  /* the table written back */
	SEL_PHASES
};

struct kvd_scratch {
	void *p;
	size_t bytes;
};

enum kvd_scratch_id {
	SCR_SUMIDX = 0, /* a select's inputs: record index, pages, tails, queries */
	SCR_SCORES,
	SCR_OUT,        /* its selection: n_out, then the table */
	SCR_CAND,       /* the plan's candidates: n per row, then the pages */
	SCR_PAGES,
	SCR_SLOTS,
	SCR_RECS,
	SCR_MAX
};

struct kvd {
	struct kvt_config cfg;
	const char *config_path;
	struct kvt_store *store;
	struct kvt_device *dev;
	struct kvt_compute *cc;
	struct kvd_pool *pool; /* fast.threads: the fast path's reports read over it */
	/* the loop's clock, read once a turn (before the store's completions) and once a
	 * report: when a lease started and its copy landed, early by up to a turn of the
	 * loop (a clock read each was ~5% of the loop's time at batch 32) */
	uint64_t now_ns;
	struct kvt_loop *loop;
	int lsock;
	struct kvt_op lsock_op;
	bool lsock_armed;
	struct kvt_list clients;
	struct kvt_list zombies; /* store sequences to drop once their pages are idle */
	unsigned nclients;
	uint32_t next_client_id;
	struct kvd_tenant tenants[256];
	uint64_t sseq_next;
	/* named sequences and their journal (names.c) */
	struct kvd_named **named;
	uint32_t nnamed, named_cap;
	int names_fd;
	char names_path[4200];
	struct kvd_recovery {
		uint64_t seqs, pages;      /* named sequences and their pages kept at start */
		uint64_t unnamed_pages;    /* pages of sequences nobody can reopen: dropped */
		uint64_t cut_pages;        /* pages past a gap (a write that never completed) */
		uint64_t journal_bad;      /* journal records failing their checksum */
		uint64_t opens, open_cut;  /* opens of a sequence with pages; pages found bad then */
	} recovery;
	struct kvd_scratch scr[SCR_MAX];
	void *pin[3]; /* pinned staging of a select's copies, [2] a seal batch's (engine.c) */
	/* where selects spend the daemon's time, ns in all (enum kvd_sel_phase) */
	uint64_t sel_phase_ns[SEL_PHASES], sel_phase_n;
	size_t pin_bytes[3];
	bool stopping;
	/* counters */
	uint64_t start_ns;
	uint64_t accepted, rejected, disconnects;
	uint64_t disc[KVD_DISC_MAX];
	uint64_t sel_lat[KVT_HIST_BUCKETS], sel_compute[KVT_HIST_BUCKETS];
	uint64_t sel_lat_sum_us, sel_compute_sum_us;
	uint64_t attn[KVT_HIST_BUCKETS], attn_sum_us;
	uint64_t ctl_requests;
	struct kvd_ctl *ctl;         /* control commands, jobs, bandwidth samples: ctl.c */
	struct kvd_metrics *metrics; /* the Prometheus endpoint: metrics.c */
	struct kvtier_prefetch_stats pf_gone; /* of clients that left */
	uint32_t pf_disk_inflight; /* prefetches reading from NVMe */
};

/* names.c */
/* Reads the journal: the count of named sequences, or -errno. */
int kvd_names_load(struct kvd *d);
/* After the store's scan: keeps each named sequence's longest complete prefix, drops
 * every other page, reserves the tenants' ids, rewrites the journal. 0 or -errno. */
int kvd_names_recover(struct kvd *d);
void kvd_names_close(struct kvd *d);
struct kvd_named *kvd_named_find(struct kvd *d, uint32_t tenant, const char *name);
/* A new name, journaled (fdatasync) before it is returned: 0 or -errno. */
int kvd_named_create(struct kvd *d, const struct kvd_tenant *t, const char *name,
		     const struct kvt_wire_layout *layout, struct kvd_named **out);
/* Journals the removal and forgets the name (its pages are the caller's to drop). */
int kvd_named_remove(struct kvd *d, struct kvd_named *n);
/* Drops the pages of index >= keep of every (layer, head), the cut journaled when
 * any was: the count dropped. */
uint64_t kvd_named_cut(struct kvd *d, struct kvd_named *n, uint32_t keep);

/* server.c */
/* daemon.c: store and backend opened, listening: 0 or -errno (logged) */
int kvd_start(struct kvd *d);
/* One turn of the event loop, waiting up to idle_ms when nothing is pending. */
int kvd_iterate(struct kvd *d, int idle_ms);
void kvd_stop(struct kvd *d);

int kvd_server_start(struct kvd *d);
void kvd_server_stop(struct kvd *d);
/* Accepts, reads sockets and rings, retires dead clients; call after each store run. */
void kvd_server_tick(struct kvd *d);
/* Posts a completion to a client's ring and wakes it if it sleeps. */
void kvd_complete(struct kvd_client *c, uint64_t user_data, int res, uint64_t aux0,
		  uint64_t aux1);
/* The same with flags (enum kvt_cqe_flags). */
void kvd_complete_flags(struct kvd_client *c, uint64_t user_data, int res, uint32_t flags,
			uint64_t aux0, uint64_t aux1);
/* Marks a client for disconnection with a logged reason. */
void kvd_client_kill(struct kvd_client *c, enum kvd_disc why, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

int kvd_send_msg(int fd, uint16_t type, int32_t status, const void *payload, uint32_t len,
		 const int *fds, unsigned nfds);

/* ctl.c: kvtierctl's commands */
int kvd_ctl_start(struct kvd *d);
void kvd_ctl_stop(struct kvd *d);
void kvd_ctl_request(struct kvd_client *c, const uint8_t *payload, uint32_t len);
void kvd_ctl_forget(struct kvd_client *c); /* frees what a connection had queued */
void kvd_ctl_tick(struct kvd *d);
bool kvd_ctl_busy(struct kvd *d); /* a job has pages it has not started */

/* metrics.c: the Prometheus text and its HTTP endpoint */
int kvd_metrics_start(struct kvd *d); /* a bind failure is logged, not fatal */
void kvd_metrics_stop(struct kvd *d);
void kvd_metrics_tick(struct kvd *d);
void kvd_metrics_render(struct kvd *d, struct kvt_buf *b);
/* "ADDR:PORT" the endpoint listens on; -ENOENT when there is none. */
int kvd_metrics_address(struct kvd *d, char *buf, size_t len);

/* engine.c */
int kvd_engine_attach(struct kvd_client *c);
void kvd_engine_detach(struct kvd_client *c);
/* Runs one request (a copy out of the ring); completes it now, sets c->busy, or (an
 * append of a whole page) queues its seal for kvd_seal_flush. */
void kvd_engine_request(struct kvd_client *c, const struct kvt_sqe *sqe);
/* The seals queued (c->nseals): their summaries built at once, their appends
 * answered in order. 0, or the first error (the failed seals are retried by the
 * layer's next append). Before anything else of the client runs. */
int kvd_seal_flush(struct kvd_client *c);
/* Retries pending work (promotions refused for lack of room, timeouts). */
void kvd_engine_tick(struct kvd *d);
void kvd_engine_stop(struct kvd *d);
/* CLOCK_MONOTONIC in ns: the tiers' clock (tiers/tier.h) */
static inline uint64_t kvd_now_ns(void)
{
	return tier_now_ns();
}
/* to += from, counter by counter */
void kvd_pf_add(struct kvtier_prefetch_stats *to, const struct kvtier_prefetch_stats *from);
struct kvd_seq *kvd_seq_get(struct kvd_client *c, uint32_t id);
struct kvd_client *kvd_client_by_id(struct kvd *d, uint32_t id);
/* Lets a pin of the client go, or keeps it until the client's reads have ended. */
void kvd_client_unpin(struct kvd_client *c, const struct page_key *k);
/* The store's key of page p of head h of a layer of q. */
struct page_key kvd_page_key(const struct kvd_client *c, const struct kvd_seq *q,
			     uint32_t layer, uint32_t h, uint32_t p);

/* Both the sequence's and the client's counters. */
#define PF_ADD(c, q, field, n)                                                                 \
	do {                                                                                   \
		(q)->st.field += (n);                                                          \
		(c)->pf.field += (n);                                                          \
	} while (0)

/* fast.c: the fast path (ipc/wire.h) */
/* Makes the client's region (HELLO asked for one): 0, or -errno (it then has none). */
int kvd_fast_attach(struct kvd_client *c, uint32_t pages, uint32_t seqs);
void kvd_fast_detach(struct kvd_client *c);
/* Where the record of page idx of a layer of q goes, or -1 (none: not covered). */
int64_t kvd_fast_pos(const struct kvd_client *c, const struct kvd_seq *q, uint32_t layer,
		     uint32_t h, uint32_t idx);
/* The lease arrays of a layer grown with its cap (layer_reserve). 0 or -ENOMEM. */
int kvd_fast_layer_grow(struct kvd_client *c, struct kvd_layer *L, uint32_t old_cap,
			uint32_t new_cap);
/* A sequence closing: its leases taken back (their slots wait for the client's reads). */
void kvd_fast_seq_free(struct kvd_client *c, struct kvd_seq *q);
/* Pages just sealed (n seals): leased at once (the window selects them next), in the
 * map before their appends are answered unless that takes promote_timeout_ms. */
void kvd_fast_sealed(struct kvd_client *c, const struct kvd_seal *s, uint32_t n);
void kvd_fast_feedback(struct kvd_client *c, const struct kvt_sqe *r);
/* Feedbacks now ready, map writes, leases whose reads have ended. */
void kvd_fast_tick(struct kvd_client *c);
/* Whether the loop should poll without sleeping (a feedback waits for kernels). */
bool kvd_fast_waiting(const struct kvd_client *c);

#endif
