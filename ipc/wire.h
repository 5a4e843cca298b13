/* SPDX-License-Identifier: MIT */
#ifndef KVT_IPC_WIRE_H
#define KVT_IPC_WIRE_H

/*
 * The wire format between kvtierd and its clients. Two channels:
 *
 *   Control  a Unix stream socket: framed messages (struct kvt_msg_hdr + payload).
 *            The client says HELLO with its model layout; the daemon answers WELCOME
 *            and hands over, with SCM_RIGHTS, the file descriptors listed in
 *            enum kvt_welcome_fd. The socket stays open: its EOF is how the daemon
 *            learns that a client died.
 *   Data     one shared-memory region per client (the ring memfd): a request ring
 *            (client produces, daemon consumes), a completion ring (the reverse)
 *            and a data area that requests point into with offsets. A request is a
 *            64-byte struct kvt_sqe; its completion a 32-byte struct kvt_cqe carrying
 *            the same user_data. Wake-ups go over two eventfds.
 *
 * Everything is little-endian, fixed-width, and size-checked below. The daemon copies
 * every request (and every array a request points at) out of shared memory once,
 * validates the copy against the client's own tables and uses only the copy.
 */

#include <stdint.h>

#include "ipc/kvtier.h"

#define KVT_WIRE_MAGIC	 0x3154564bu /* "KVT1" */
#define KVT_WIRE_VERSION 7

#define KVT_MSG_MAX (64u * 1024)

enum kvt_msg_type {
	KVT_MSG_HELLO = 1,   /* client -> daemon: struct kvt_hello */
	KVT_MSG_WELCOME = 2, /* daemon -> client: struct kvt_welcome + fds */
	KVT_MSG_ERROR = 3,   /* daemon -> client: a text reason; the daemon then hangs up */
	KVT_MSG_PING = 4,    /* either way, empty; answered with PONG */
	KVT_MSG_PONG = 5,
	KVT_MSG_STATS = 6,       /* either side of HELLO, empty; answered with STATS_REPLY */
	KVT_MSG_STATS_REPLY = 7, /* struct kvt_wire_stats */
	KVT_MSG_CTL = 8,         /* kvtierctl -> daemon, never after HELLO: a command (below) */
	KVT_MSG_CTL_REPLY = 9,   /* its answer, in one or more pieces (below) */
	KVT_MSG_TYPE_MAX
};

struct kvt_msg_hdr {
	uint32_t magic;
	uint16_t version;
	uint16_t type;   /* enum kvt_msg_type */
	uint32_t len;    /* payload bytes after this header, <= KVT_MSG_MAX */
	int32_t status;  /* 0 or -errno (ERROR) */
};
_Static_assert(sizeof(struct kvt_msg_hdr) == 16, "wire format");

/*
 * Control commands (kvtierctl). The payload of CTL is the command's words, each ended
 * by a NUL: the command ("status", "tiers", "clients", "seqs", "pages", "stats",
 * "metrics", "config", "evict", "drain", "flush", "job", "cancel"), then arguments as
 * "name=value" words ("client=3", "tier=gpu", "name=prefetch.enable"; "config" takes
 * "get" or "set" first). The answer is JSON ("metrics": Prometheus text), sent as CTL_REPLY
 * pieces of at most KVT_MSG_MAX bytes: status 1 on every piece but the last, whose
 * status is 0, or -errno with {"error": "why"}. Commands that change anything (config
 * set, evict, drain, flush, cancel) are for root and the daemon's own user only.
 */
#define KVT_CTL_MORE 1

/* The model a client attaches with. */
struct kvt_wire_layout {
	uint32_t layers;
	uint32_t kv_heads;
	uint32_t group;        /* query heads per KV head */
	uint32_t head_dim;
	uint32_t dtype;        /* enum kvt_dtype */
	uint32_t page_tokens;
	uint32_t dense_layers; /* layers 0 .. dense_layers-1 attend over every page */
	uint32_t reps;         /* representative keys per page summary */
};
_Static_assert(sizeof(struct kvt_wire_layout) == 32, "wire format");

#define KVT_TENANT_NAME_MAX 32

struct kvt_hello {
	uint32_t size; /* sizeof(struct kvt_hello): lets the struct grow */
	uint32_t flags;
	struct kvt_wire_layout layout;
	char tenant[KVT_TENANT_NAME_MAX]; /* "" for the caller's default tenant */
	uint32_t ring_entries;            /* requested; 0: the daemon's default */
	uint32_t fast_pages;              /* the fast path (below): pages per row, 0: none */
	uint64_t data_bytes;              /* requested data area; 0: default */
	uint32_t fast_seqs;               /* the fast path: sequence ids it covers */
	uint32_t pad_;
};
_Static_assert(sizeof(struct kvt_hello) == 96, "wire format");

enum kvt_welcome_fd {
	KVT_FD_RING = 0, /* the ring memfd (read-write) */
	KVT_FD_REQ,      /* eventfd: client -> daemon, "requests queued" */
	KVT_FD_CMP,      /* eventfd: daemon -> client, "completions posted" */
	KVT_FD_POOL,     /* the tenant's GPU pool (VMM POSIX fd, or a memfd on the cpu device) */
	KVT_FD_HOST,     /* the tenant's host arena (sealed memfd, read-only mappings) */
	KVT_FD_FAST,     /* with KVT_WELCOME_FAST: the fast path's region (like the pool) */
	KVT_FD_MAX
};

/*
 * The fast path: a client that picks its own pages. The daemon keeps, in device
 * memory both map (KVT_FD_FAST, fast_bytes), for every (layer, sequence id <
 * fast_seqs, KV head, page < fast_pages), at position
 *     pos = ((layer * fast_seqs + seq) * kv_heads + head) * fast_pages + page:
 *   - the page's summary record, at pos * record bytes (written when the page fills,
 *     before the append that filled it is answered);
 *   - int32 map[pos] at fast_map_off: the GPU pool slot where the page stays for the
 *     client's reads (a lease), or -1.
 * The client scores, selects and builds its table on its own stream from these, with
 * no round trip, and tells the daemon what it selected (KVT_OP_FEEDBACK); the daemon
 * leases what was missing, so that the next steps find it, and takes back leases of
 * pages not selected for a while: it writes -1 first, and lets the slot go only after
 * the client has recorded its read fence twice since (fence_seq) and the fence is
 * complete.
 */

enum kvt_wire_device {
	KVT_WIRE_DEV_CPU = 0,
	KVT_WIRE_DEV_CUDA = 1,
};

struct kvt_welcome {
	uint32_t size;
	uint32_t client_id;
	uint32_t tenant_id;
	uint32_t device;       /* enum kvt_wire_device */
	uint32_t sq_entries;   /* powers of two */
	uint32_t cq_entries;
	uint64_t ring_bytes;   /* size of the ring memfd */
	uint64_t data_off;     /* data area, within the ring memfd */
	uint64_t data_bytes;
	uint64_t pool_bytes;   /* GPU pool mapping size */
	uint64_t slot_bytes;   /* stride of a pool slot (the store's page size) */
	uint64_t host_bytes;   /* host arena mapping size */
	uint32_t max_seqs;     /* sequence ids are < max_seqs */
	uint32_t max_batch;    /* sequences in one batched request */
	uint32_t page_bytes;   /* bytes of this client's page: 2 * T * D * dtype size */
	int32_t device_ordinal;
	/* with KVT_WELCOME_FENCE: the client's read fence (a cudaIpcEventHandle_t on
	 * cuda), which the client records behind its kernels that read pages of the pool or
	 * the host arena; the daemon lets go of the slots a select unpins only once it is
	 * complete (and the ring header's reads_held is 0) */
	uint8_t fence[64];
	uint64_t host_stride;  /* host arena: slot i's page at i * host_stride + host_headroom */
	uint32_t host_headroom;
	uint32_t flags; /* enum kvt_welcome_flags */
	/* with KVT_WELCOME_COPY_FENCE: the copy fence, which the daemon records behind its
	 * copies into the GPU pool when a select answers before they have landed
	 * (KVT_CQE_COPIES); the client orders its reads of the table after it. Its state,
	 * on a device that keeps it in memory (cpu), is the ring header's copy_fence. */
	uint8_t copy_fence[64];
	/* with KVT_WELCOME_FAST (above) */
	uint64_t fast_bytes, fast_map_off;
	uint32_t fast_pages, fast_seqs;
};
enum kvt_welcome_flags {
	KVT_WELCOME_FENCE = 1u << 0,      /* fence holds a handle */
	KVT_WELCOME_COPY_FENCE = 1u << 1, /* copy_fence holds a handle */
	KVT_WELCOME_FAST = 1u << 2,       /* the fast path's region came (KVT_FD_FAST) */
};
_Static_assert(sizeof(struct kvt_welcome) == 256, "wire format");

/* The prefetcher's counters (struct kvtier_prefetch_stats) are the public header's. */
_Static_assert(sizeof(struct kvtier_prefetch_stats) == 128 + 2 * 8 * KVTIER_LAT_BUCKETS,
	       "wire format");

/* The daemon's counters, for tools and tests (kvtierctl has the full set). */
struct kvt_wire_stats {
	uint32_t size;
	uint32_t clients;
	uint64_t pages, seqs;
	uint64_t tier_used[3];  /* slots in use: gpu, host, nvme */
	uint64_t tier_slots[3];
	uint64_t accepted, rejected, disconnects;
	uint64_t requests, bad_requests;
	/* page moves of the store, by destination tier, and its write-backs */
	uint64_t promotions[3], writebacks, read_errors, backpressure;
	struct kvtier_prefetch_stats pf; /* every client's, those gone included */
};
_Static_assert(sizeof(struct kvt_wire_stats) == 160 + sizeof(struct kvtier_prefetch_stats),
	       "wire format");

/* ---- the shared region ---- */

#define KVT_RING_MAGIC 0x474e49525456564bull /* "KVVTRING" */

/*
 * At offset 0 of the ring memfd. Each index lives on its own cache line; the side
 * that writes an index is named beside it. The daemon never reads back what it wrote
 * (it keeps its own copies of sq_head and cq_tail), and checks what the client wrote
 * (sq_tail, cq_head) against the ring size before using it.
 */
struct kvt_ring_hdr {
	uint64_t magic;
	uint32_t version;
	uint32_t sq_entries, cq_entries;
	uint32_t sqe_off, cqe_off; /* arrays, from the region's start */
	uint32_t pad0;
	uint64_t data_off, data_bytes;
	uint8_t pad1[16];
	uint32_t sq_head; /* daemon */
	uint8_t pad2[60];
	uint32_t sq_tail; /* client */
	uint8_t pad3[60];
	uint32_t cq_head; /* client */
	uint8_t pad4[60];
	uint32_t cq_tail; /* daemon */
	uint8_t pad5[60];
	uint32_t cq_wait; /* client: set while it sleeps on the CMP eventfd */
	uint8_t pad6[60];
	/* client: nonzero while threads of the client read pages of its tables outside
	 * kvtier_attend (kvtier_reads_hold): the daemon keeps unpinned slots as they are */
	uint32_t reads_held;
	/* client: counts its records of the read fence, each counted after it is made */
	uint32_t fence_seq;
	uint8_t pad7[56];
	/* daemon (its device's worker): the copy fence's state on the cpu device */
	uint8_t copy_fence[64];
	/* daemon: bytes of the feedback ring (KVT_OP_FEEDBACK) it is done with */
	uint64_t fb_done;
	uint8_t pad8[56];
};
_Static_assert(sizeof(struct kvt_ring_hdr) == 9 * 64, "wire format");

enum kvt_op_code {
	KVT_OP_NOP = 0,
	KVT_OP_SEQ_CREATE, /* -> res: the new sequence id */
	KVT_OP_SEQ_CLOSE,  /* seq */
	KVT_OP_SEQ_FORK,   /* seq: parent, ntok: prefix tokens -> res: the new id */
	KVT_OP_APPEND,     /* seq, layer, ntok; off[0]: K, off[1]: V, each [ntok][kv_heads][D];
			    * with KVT_APPEND_PAGES (flags) a whole page instead (below) */
	KVT_OP_SELECT,     /* layer, nseq; see struct kvt_sqe */
	KVT_OP_SEQ_INFO,   /* seq -> res: tokens of layer `layer` */
	KVT_OP_STATS,      /* seq (or KVT_SEQ_ALL: the client's) -> struct
			    * kvtier_prefetch_stats at off[0] */
	KVT_OP_SEQ_OPEN,   /* name: ntok bytes at off[0]; flags: enum kvt_open_flags
			    * -> res: the sequence id, aux[0]: tokens it holds (every layer) */
	KVT_OP_SEQ_SYNC,   /* seq -> aux[0]: tokens on NVMe in every layer */
	KVT_OP_SEQ_REMOVE, /* name: ntok bytes at off[0] */
	/* the fast path: a selection the client made, answered by no completion. layer,
	 * seq: nseq, user_data: its token, out_stride: the report's stride, ntok: bytes of
	 * the feedback ring it takes (done with, they go to fb_done in order), off[0]: the
	 * sequence ids u32[nseq], off[1]: the entry: u32 ready, u32 missing, u32 ack, then
	 * at +64 the report (struct kvt_resolve_args). The daemon reads it once ready holds
	 * the token. Pages marked KVT_PAGE_WAIT hold the client's stream for up to budget
	 * microseconds, until the daemon writes the token into ack (release): once they are
	 * all in the map (or the time is up); the entry's ring bytes go to fb_done only
	 * after that. */
	KVT_OP_FEEDBACK,
	KVT_OP_MAX
};

/* Named sequences (SEQ_OPEN): kept on NVMe across detaches and restarts. */
#define KVT_SEQ_NAME_MAX 128
enum kvt_open_flags {
	KVT_OPEN_CREATE = 1u << 0, /* make it when there is none */
	KVT_OPEN_EXCL = 1u << 1,   /* with CREATE: -EEXIST when there is one */
};

#define KVT_SEQ_ALL 0xffffffffu

enum kvt_select_flags {
	KVT_SEL_TOPP = 1u << 0,  /* top-p (arg top_p) instead of top-k */
	KVT_SEL_HOST = 1u << 1,  /* the client reads the host arena: the answer may name
				  * host slots (KVT_SLOT_HOST) for pages not on the GPU */
	KVT_SEL_SUBST = 1u << 2, /* a page only on NVMe is replaced by the next-best page
				  * that is resident, counted, instead of read at once */
	KVT_SEL_FENCED = 1u << 3, /* the client orders its reads after the copy fence: the
				   * answer may name GPU slots whose copies are under way
				   * (KVT_CQE_COPIES) */
};

/*
 * APPEND of one whole page (flags): ntok is the page's tokens (page_tokens), the
 * layer's tokens so far a multiple of them; off[0]: head 0's page in the pool's slot
 * layout ([K: T rows][V: T rows]), head h's at off[0] + h * off[1] (off[1] >= the page's
 * bytes). The daemon reads the data area until it answers: several such appends in a
 * row are sealed (put, summarized) together, and answered in order once all are.
 */
enum kvt_append_flags {
	KVT_APPEND_PAGES = 1u << 0,
};

/*
 * One request. SELECT: ntok carries the client's last attention time in microseconds
 * (0: none since the last select), for the stats; seqs u32[nseq] at off[0]; queries [nseq * kv_heads][group][D]
 * at off[1]; the answer at off[2]: int32 table[rows][out_stride] (pool slots), then
 * int32 n_out[rows], then int32 tail_len[rows], then int32 pages[rows][out_stride] (the
 * page index of each table entry), rows = nseq * kv_heads. A slot with
 * KVT_SLOT_HOST (0x40000000, kernels/compute.h) set is a slot of the host arena.
 * The three offsets are multiples of 4 (a client sending others is cut off).
 */
struct kvt_sqe {
	uint8_t op;     /* enum kvt_op_code */
	uint8_t flags;  /* enum kvt_select_flags; APPEND: enum kvt_append_flags */
	uint16_t layer;
	uint32_t seq;   /* sequence id (or nseq for SELECT) */
	uint64_t user_data;
	uint32_t ntok;
	uint32_t budget;       /* SELECT: pages beside sinks and window */
	uint64_t off[3];
	uint32_t out_stride;   /* SELECT: >= budget + sink and window pages */
	uint32_t sink_tokens;
	uint32_t window_tokens;
	float top_p;
};
_Static_assert(sizeof(struct kvt_sqe) == 64, "wire format");

struct kvt_cqe {
	uint64_t user_data;
	int32_t res;    /* >= 0 or -errno */
	uint32_t flags; /* enum kvt_cqe_flags */
	uint64_t aux[2]; /* APPEND: aux[0] tokens accepted; SELECT: aux[0] pages already on
			  * the GPU, aux[1] pages the step had to wait for */
};
enum kvt_cqe_flags {
	/* SELECT: the table names GPU slots whose copies are still under way; the copy
	 * fence was recorded behind them: reads of the table must wait for it */
	KVT_CQE_COPIES = 1u << 0,
};
_Static_assert(sizeof(struct kvt_cqe) == 32, "wire format");

/* Acquire/release on indices shared with the other process. */
#define kvt_load_acquire(p)	 __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define kvt_store_release(p, v)	 __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define kvt_smp_mb()		 __atomic_thread_fence(__ATOMIC_SEQ_CST)

#endif
