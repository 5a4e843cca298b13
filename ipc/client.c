// SPDX-License-Identifier: MIT
/*
 * libkvtier: attach, the request ring, and the client side of select and attend.
 */
#include "kvtier.h"
#include "paths.h"
#include "wire.h"
#include "daemon/log.h"
#include "kernels/compute.h"

_Static_assert(KVTIER_SLOT_HOST == KVT_SLOT_HOST, "one host-slot bit");
_Static_assert(KVTIER_SEQ_NAME_MAX == KVT_SEQ_NAME_MAX && (int)KVTIER_SEQ_CREATE == (int)KVT_OPEN_CREATE &&
		       (int)KVTIER_SEQ_EXCL == (int)KVT_OPEN_EXCL,
	       "named sequences: one wire");
#include "tiers/device.h"

#include <errno.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

struct live_seq {
	uint32_t id;     /* the daemon's sequence id */
	bool used;
	bool fast_ok;    /* every page's summary is where the fast path reads it (not a fork
			  * or a sequence opened by name) */
	uint32_t *ntok;  /* [layers] tokens appended */
	uint32_t *sent;  /* [layers] of which the daemon has (kvtier_append_async keeps the
			  * page still filling here until it is full) */
	uint32_t mark;   /* kvtier_append_batch_async: the call that saw it last */
};

/*
 * Filled pages handed to the daemon and not waited for (flush_pages): their copies into a
 * region of the data area queued on the append stream, then their requests (one a page,
 * submitted once the copies have landed), answered in order.
 */
#define PEND_MAX   64u /* batches in flight */
#define PEND_PAGES 64u /* pages a batch */
struct pend_batch {
	struct kvt_fence *copied; /* behind the batch's copies (made once, kept) */
	uint64_t off, bytes;      /* its region of the data area */
	uint64_t ud0;             /* the first request's user_data */
	uint32_t layer, n, sub;   /* pages, requests submitted */
	bool submitted;
	int err;                  /* queueing the copies or submitting failed */
	uint32_t seq[PEND_PAGES];
};

struct kvtier_client {
	pthread_mutex_t lock;
	int sock, fds[KVT_FD_MAX];
	struct kvt_welcome w;
	struct kvtier_layout layout;
	struct kvt_geom geom;
	size_t row;      /* bytes of one token's K (or V) of one head */
	uint8_t *ring;
	struct kvt_ring_hdr *hdr;
	struct kvt_sqe *sqes;
	struct kvt_cqe *cqes;
	uint8_t *data;
	uint32_t sq_tail, cq_head;
	uint32_t attend_us; /* the last kvtier_attend, told to the daemon with the next select */
	uint64_t next_ud;
	bool dead;
	struct kvt_device *dev;
	struct kvt_dev_mem pool;
	void *host;
	void *host_dev;  /* the host arena as the backend's kernels address it, or NULL */
	struct kvt_compute *cc;
	/* KVTIER_SEL_ESTIMATE's stream beside the caller's (a compute object of its own: no
	 * synchronous call of the library waits behind it); NULL until needed, or on cpu */
	struct kvt_compute *est_cc;
	bool gpu; /* the backend's memory is not host memory: host q/out are staged */
	/* the pages still filling: a host copy and the backend's, slot (live, layer, head) */
	uint32_t max_live;
	struct live_seq *live;
	int32_t *live_of;   /* [max_seqs] live index of a sequence id, or -1 */
	uint32_t batch_mark;   /* kvtier_append_batch_async's calls */
	uint32_t *batch_pos;   /* [max_live] its rows and slots (kvt_put_rows' nseq) */
	uint64_t *batch_slot;
	struct live_seq **batch_full; /* [max_live] the sequences whose page it filled */
	uint8_t *tail_host;
	uint8_t *stage; /* pinned: one page per KV head, what an append sends to tail_dev */
	bool data_pinned; /* the data area is registered with the device */
	void *tail_dev;
	void *q_dev, *out_dev;
	size_t q_dev_bytes, out_dev_bytes;
	float *lse_dev;
	size_t lse_dev_bytes;
	/* reads queued and not waited for (kvtier_attend_async): the daemon's fence,
	 * recorded behind each (once: a later record of it is behind an earlier one's work
	 * too, so every wait for such a read waits for this fence); per layer, whether an
	 * attend reads its tail pages, which an append of that layer must not rewrite
	 * before, and the stream it was queued on (an append there is behind it anyway) */
	struct kvt_fence *fence;
	bool *layer_queued;   /* [layers] */
	void **layer_stream;  /* [layers] */
	/* the daemon's copy fence: behind its copies into the pool that a select's answer
	 * names before they have landed (KVT_CQE_COPIES); NULL: selects wait for them */
	struct kvt_fence *copy_fence;
	/* the fast path (wire.h): the daemon's region, the data area's part the requests
	 * use (the rest is the feedback ring), the ring's bytes handed out, the next token,
	 * the stream of kvtier_append_async */
	struct kvt_dev_mem fast;
	uint64_t req_bytes, fb_off, fb_bytes, fb_head;
	uint32_t fb_token;
	uint64_t fb_dropped;
	void *append_stream;
	/* KVTIER_TIMING=1: where kvtier_select's time goes, printed at detach */
	bool timing;
	bool timing_sync; /* KVTIER_TIMING=2: the fast path's calls wait for their work */
	uint64_t sel_n, sel_ns[3]; /* the query staged, the round trip, the table up */
	/* the fast path's calls, host time: append_async, select_async (staging, the
	 * report posted, the kernels queued), attend_async */
	uint64_t fast_n[3], fast_ns[5];
	/* flush_pages: batches answered, their pages, waiting for their copies (behind what
	 * was queued on the stream), for the daemon's answers */
	uint64_t pf_n, pf_pages, pf_ns[2];
	/* the batches of filled pages in flight, oldest first (a ring of PEND_MAX); their
	 * requests submitted and not reaped; the first error of a page answered since an
	 * append call last returned one (the next returns it, before it appends) */
	struct pend_batch *pend;
	uint32_t pend_head, pend_n, pend_reqs;
	int pend_err;
};

static uint64_t mono_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

struct kvtier_table {
	struct kvtier_client *c;
	uint32_t max_seqs, rows, stride, layer, cap_cells;
	int32_t *slots, *pages, *n_pages, *tail_len, *tail_slot; /* host (slots, n_pages: pinned) */
	int32_t *d_slots, *d_n_pages, *d_tail_len, *d_tail_slot; /* backend (cuda) */
	/* made by kvtier_select_async (on stream, not yet seen by the host side): its
	 * selection, the page index of each entry, scores, and the inputs staged up:
	 * [n full pages | row base | tail_len | tail_slot | n selected] of max rows */
	bool fast, fast_seen;
	void *stream;
	int32_t *d_sel, *d_pages, *fin, *d_fin;
	bool sync_zeroed;
	float *d_scores;
	size_t sel_bytes, page_bytes, score_bytes;
	/* KVTIER_SEL_ESTIMATE: the estimate of the pages left out (kvt_estimate), its
	 * work area and counters (zero between calls), and the largest row it spans. The
	 * select starts one over every page on the client's estimate stream, beside the
	 * selection (est_all, for est_scale; done at est_done); the attend waits for it
	 * and takes the table's pages out. */
	bool estimate, est_all, est_pending, est_taken;
	float est_scale;
	void *est_stream; /* where the table's pages were taken out (est_taken) */
	struct kvt_fence *est_done;
	void *est_joined; /* the stream that last waited for est_done (NULL: none yet) */
	uint32_t smax;
	float *d_est, *d_est_work;
	uint32_t *d_est_sync;
	size_t est_bytes, est_work_bytes, est_sync_bytes;
	/* an attend queued on it (kvtier_attend_async) reads it until the client's fence,
	 * recorded behind it on done_stream */
	bool queued;
	void *done_stream;
	/* the select's copies of slots and n_pages to the backend, queued on its own stream
	 * and not waited for: an attend there runs after them, one on another stream waits
	 * for this fence, and the next select waits for it before it rewrites the host side */
	struct kvt_fence *up;
	bool up_pending;
};

/* ---- the ring ---- */

static int wait_cqe(struct kvtier_client *c)
{
	for (int spin = 0; spin < 4000; spin++) {
		if (kvt_load_acquire(&c->hdr->cq_tail) != c->cq_head)
			return 0;
		__builtin_ia32_pause();
	}
	for (;;) {
		__atomic_store_n(&c->hdr->cq_wait, 1, __ATOMIC_RELAXED);
		/* Pairs with the daemon's barrier between publishing cq_tail and reading cq_wait. */
		kvt_smp_mb();
		if (kvt_load_acquire(&c->hdr->cq_tail) != c->cq_head)
			break;
		struct pollfd p[2] = {{c->fds[KVT_FD_CMP], POLLIN, 0},
				      {c->sock, POLLIN | POLLRDHUP, 0}};
		int n = poll(p, 2, 1000);
		if (n < 0 && errno != EINTR)
			return -errno;
		if (p[0].revents & POLLIN) {
			uint64_t v;
			ssize_t r = read(c->fds[KVT_FD_CMP], &v, sizeof(v));
			(void)r;
		}
		if (p[1].revents & (POLLHUP | POLLRDHUP | POLLERR)) {
			c->dead = true;
			return -ECONNRESET;
		}
		if (p[1].revents & POLLIN) {
			char b[256];
			ssize_t r = recv(c->sock, b, sizeof(b), MSG_DONTWAIT);
			if (r == 0) {
				c->dead = true;
				return -ECONNRESET;
			}
		}
	}
	__atomic_store_n(&c->hdr->cq_wait, 0, __ATOMIC_RELAXED);
	return 0;
}

/*
 * One turn of waiting for the daemon: spin a while, then check that it is still there
 * and sleep 20 us. 0, or -ECONNRESET when it is gone.
 */
static int daemon_wait_turn(struct kvtier_client *c, unsigned spin)
{
	if (c->dead)
		return -ECONNRESET;
	if (spin < 1000) {
		__builtin_ia32_pause();
		return 0;
	}
	struct pollfd p = {c->sock, POLLRDHUP, 0};
	if (poll(&p, 1, 0) > 0 && (p.revents & (POLLHUP | POLLRDHUP | POLLERR))) {
		c->dead = true;
		return -ECONNRESET;
	}
	struct timespec ts = {0, 20000};
	nanosleep(&ts, NULL);
	return 0;
}

/*
 * The copies a select's answer named, landed, waited for on the host (the cpu device,
 * whose worker lands them while the daemon goes on): 0, or -ECONNRESET when the daemon
 * is gone first.
 */
static int copies_wait(struct kvtier_client *c)
{
	for (unsigned spin = 0;; spin++) {
		int ret = c->dev->ops->fence_query(c->dev, c->copy_fence);
		if (ret != -EAGAIN || (ret = daemon_wait_turn(c, spin)) < 0)
			return ret;
	}
}

/*
 * Room in the request ring: requests posted without a completion (the fast path's
 * reports) may fill it while the daemon is behind. 0, or -ECONNRESET when the daemon
 * is gone.
 */
static int sq_room_wait(struct kvtier_client *c)
{
	for (unsigned spin = 0;
	     c->sq_tail - kvt_load_acquire(&c->hdr->sq_head) >= c->w.sq_entries; spin++) {
		int ret = daemon_wait_turn(c, spin);
		if (ret < 0)
			return ret;
	}
	return 0;
}

/* The daemon told that requests are in the ring. 0, or -errno (the client is dead). */
static int kick(struct kvtier_client *c)
{
	uint64_t one = 1;
	if (write(c->fds[KVT_FD_REQ], &one, sizeof(one)) < 0) {
		c->dead = true; /* requests are in the ring: the client cannot go on */
		return -errno;
	}
	return 0;
}

/*
 * A request into the ring (its user_data set), told to the daemon when tell: several
 * submitted and then told once are read by the daemon in one go. Called with c->lock
 * held; every request submitted is reaped (reap) in order before another call.
 */
static int submit(struct kvtier_client *c, struct kvt_sqe *r, bool tell)
{
	if (c->dead)
		return -ECONNRESET;
	if (c->sq_tail - kvt_load_acquire(&c->hdr->sq_head) >= c->w.sq_entries) {
		int ret = kick(c); /* what is in the ring may be ours, not told yet */
		if (ret < 0 || (ret = sq_room_wait(c)) < 0)
			return ret;
	}
	r->user_data = ++c->next_ud;
	memcpy(&c->sqes[c->sq_tail & (c->w.sq_entries - 1)], r, sizeof(*r));
	/* The entry must be visible before the index that hands it over. */
	kvt_store_release(&c->hdr->sq_tail, ++c->sq_tail);
	return tell ? kick(c) : 0;
}

/* The completion of r, the oldest request submitted and not reaped. */
static int reap(struct kvtier_client *c, const struct kvt_sqe *r, struct kvt_cqe *out)
{
	if (c->dead)
		return -ECONNRESET;
	int ret = wait_cqe(c);
	if (ret < 0)
		return ret;
	memcpy(out, &c->cqes[c->cq_head & (c->w.cq_entries - 1)], sizeof(*out));
	kvt_store_release(&c->hdr->cq_head, ++c->cq_head);
	if (out->user_data != r->user_data) {
		c->dead = true;
		return -EPROTO;
	}
	return out->res;
}

static void pend_drain(struct kvtier_client *c);

/* One request, one completion (the pages in flight answered first); called with
 * c->lock held. */
static int call(struct kvtier_client *c, struct kvt_sqe *r, struct kvt_cqe *out)
{
	pend_drain(c);
	int ret = submit(c, r, true);
	return ret < 0 ? ret : reap(c, r, out);
}

/*
 * A request that takes no completion (KVT_OP_FEEDBACK), posted without waiting; false
 * when the ring has no room (the daemon is behind: the request is dropped).
 */
static bool post(struct kvtier_client *c, struct kvt_sqe *r)
{
	if (c->dead || c->sq_tail - kvt_load_acquire(&c->hdr->sq_head) >= c->w.sq_entries)
		return false;
	r->user_data = r->user_data ? r->user_data : ++c->next_ud;
	memcpy(&c->sqes[c->sq_tail & (c->w.sq_entries - 1)], r, sizeof(*r));
	kvt_store_release(&c->hdr->sq_tail, ++c->sq_tail);
	uint64_t one = 1;
	if (write(c->fds[KVT_FD_REQ], &one, sizeof(one)) < 0)
		c->dead = true;
	return true;
}

/* ---- attach ---- */

static int connect_to(const char *path)
{
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	if (strlen(path) >= sizeof(a.sun_path))
		return -ENAMETOOLONG;
	snprintf(a.sun_path, sizeof(a.sun_path), "%s", path);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
		int e = -errno;
		close(fd);
		return e;
	}
	return fd;
}

static int recv_welcome(struct kvtier_client *c)
{
	struct kvt_msg_hdr h;
	uint8_t payload[512];
	struct iovec iov = {&h, sizeof(h)};
	union {
		char buf[CMSG_SPACE(sizeof(int) * KVT_FD_MAX)];
		struct cmsghdr align;
	} u;
	struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
			   .msg_controllen = sizeof(u.buf)};
	ssize_t n = recvmsg(c->sock, &m, MSG_CMSG_CLOEXEC | MSG_WAITALL);
	if (n == 0)
		return -ECONNRESET;
	if (n < 0)
		return -errno;
	for (struct cmsghdr *cm = CMSG_FIRSTHDR(&m); cm; cm = CMSG_NXTHDR(&m, cm)) {
		if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
			size_t k = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
			int fds[KVT_FD_MAX];
			memcpy(fds, CMSG_DATA(cm), (k < KVT_FD_MAX ? k : KVT_FD_MAX) * sizeof(int));
			for (size_t i = 0; i < k && i < KVT_FD_MAX; i++)
				c->fds[i] = fds[i];
		}
	}
	if ((size_t)n < sizeof(h) || h.magic != KVT_WIRE_MAGIC || h.len > sizeof(payload))
		return -EPROTO;
	if (h.len && recv(c->sock, payload, h.len, MSG_WAITALL) != (ssize_t)h.len)
		return -EPROTO;
	if (h.type == KVT_MSG_ERROR) {
		payload[h.len ? h.len - 1 : 0] = 0;
		kvt_err("kvtier", "daemon refused the attach: %s", h.len ? (char *)payload : "?");
		return h.status < 0 ? h.status : -EPROTO;
	}
	if (h.type != KVT_MSG_WELCOME || h.len < sizeof(c->w))
		return -EPROTO;
	memcpy(&c->w, payload, sizeof(c->w));
	if (!c->w.slot_bytes || c->w.host_stride < c->w.page_bytes ||
	    c->w.host_headroom >= c->w.host_stride)
		return -EPROTO;
	for (int i = 0; i < KVT_FD_MAX; i++)
		if (c->fds[i] < 0 && (i != KVT_FD_FAST || (c->w.flags & KVT_WELCOME_FAST)))
			return -EPROTO;
	return 0;
}

static int alloc_tails(struct kvtier_client *c)
{
	size_t slots = (size_t)c->max_live * c->layout.layers * c->layout.kv_heads;
	size_t bytes = slots * c->w.slot_bytes;
	c->tail_host = calloc(1, bytes);
	c->live = calloc(c->max_live, sizeof(*c->live));
	c->live_of = malloc(c->w.max_seqs * sizeof(int32_t));
	c->batch_pos = malloc(c->max_live * sizeof(*c->batch_pos));
	c->batch_slot = malloc(c->max_live * sizeof(*c->batch_slot));
	c->batch_full = malloc(c->max_live * sizeof(*c->batch_full));
	if (!c->tail_host || !c->live || !c->live_of || !c->batch_pos || !c->batch_slot ||
	    !c->batch_full ||
	    kvt_compute_host_alloc(c->cc, (size_t)c->layout.kv_heads * c->w.slot_bytes,
				   (void **)&c->stage) < 0)
		return -ENOMEM;
	for (uint32_t i = 0; i < c->w.max_seqs; i++)
		c->live_of[i] = -1;
	for (uint32_t i = 0; i < c->max_live; i++)
		if (!(c->live[i].ntok = calloc(2 * (size_t)c->layout.layers, sizeof(uint32_t))))
			return -ENOMEM;
		else
			c->live[i].sent = c->live[i].ntok + c->layout.layers;
	if (!(c->pend = calloc(PEND_MAX, sizeof(*c->pend))))
		return -ENOMEM;
	return kvt_compute_alloc(c->cc, bytes, &c->tail_dev);
}

int kvtier_attach(const struct kvtier_layout *layout, const struct kvtier_attach_opts *opts,
		  struct kvtier_client **out)
{
	struct kvtier_attach_opts o = {0};
	if (opts)
		o = *opts;
	if (!layout || !out)
		return -EINVAL;
	char path[256];
	if (o.socket && *o.socket)
		snprintf(path, sizeof(path), "%s", o.socket);
	else if (getenv("KVTIER_SOCKET") && *getenv("KVTIER_SOCKET"))
		snprintf(path, sizeof(path), "%s", getenv("KVTIER_SOCKET"));
	else
		kvt_default_socket(path, sizeof(path));
	struct kvtier_client *c = calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	pthread_mutex_init(&c->lock, NULL);
	for (int i = 0; i < KVT_FD_MAX; i++)
		c->fds[i] = -1;
	c->timing = getenv("KVTIER_TIMING") && atoi(getenv("KVTIER_TIMING")) > 0;
	c->timing_sync = c->timing && atoi(getenv("KVTIER_TIMING")) > 1;
	c->pool.fd = -1;
	c->layout = *layout;
	c->max_live = o.max_live_seqs ? o.max_live_seqs : 64;
	int ret;
	c->sock = connect_to(path);
	if (c->sock < 0) {
		ret = c->sock;
		free(c);
		return ret;
	}
	struct kvt_hello h = {.size = sizeof(h),
			      .layout = {layout->layers, layout->kv_heads, layout->group,
					 layout->head_dim, layout->dtype, layout->page_tokens,
					 layout->dense_layers, layout->reps},
			      .ring_entries = o.ring_entries, .data_bytes = o.data_bytes};
	if (o.max_context && layout->page_tokens) {
		/* a report per layer and step goes without waiting: room for a few steps */
		if (!h.ring_entries)
			h.ring_entries = 1024;
		h.fast_pages = (uint32_t)(((uint64_t)o.max_context + layout->page_tokens - 1) /
					  layout->page_tokens);
		h.fast_seqs = c->max_live;
	}
	if (o.tenant)
		memcpy(h.tenant, o.tenant, strnlen(o.tenant, sizeof(h.tenant)));
	struct kvt_msg_hdr mh = {.magic = KVT_WIRE_MAGIC, .version = KVT_WIRE_VERSION,
				 .type = KVT_MSG_HELLO, .len = sizeof(h)};
	struct iovec iov[2] = {{&mh, sizeof(mh)}, {&h, sizeof(h)}};
	struct msghdr m = {.msg_iov = iov, .msg_iovlen = 2};
	if (sendmsg(c->sock, &m, MSG_NOSIGNAL) != (ssize_t)(sizeof(mh) + sizeof(h))) {
		ret = -errno ? -errno : -EIO;
		goto fail;
	}
	if ((ret = recv_welcome(c)) < 0)
		goto fail;
	c->geom = (struct kvt_geom){.head_dim = layout->head_dim, .page_tokens = layout->page_tokens,
				    .group = layout->group, .reps = layout->reps,
				    .dtype = layout->dtype};
	c->row = (size_t)layout->head_dim * kvt_dtype_size(layout->dtype);
	c->ring = mmap(NULL, c->w.ring_bytes, PROT_READ | PROT_WRITE, MAP_SHARED,
		       c->fds[KVT_FD_RING], 0);
	if (c->ring == MAP_FAILED) {
		c->ring = NULL;
		ret = -errno;
		goto fail;
	}
	c->hdr = (struct kvt_ring_hdr *)c->ring;
	if (c->hdr->magic != KVT_RING_MAGIC || c->hdr->sq_entries != c->w.sq_entries) {
		ret = -EPROTO;
		goto fail;
	}
	c->sqes = (struct kvt_sqe *)(c->ring + c->hdr->sqe_off);
	c->cqes = (struct kvt_cqe *)(c->ring + c->hdr->cqe_off);
	c->data = c->ring + c->w.data_off;
	c->sq_tail = kvt_load_acquire(&c->hdr->sq_tail);
	c->cq_head = kvt_load_acquire(&c->hdr->cq_head);
	const char *dev = c->w.device == KVT_WIRE_DEV_CUDA ? "cuda" : "cpu";
	if ((ret = kvt_device_open(dev, c->w.device_ordinal, &c->dev)) < 0 ||
	    (ret = c->dev->ops->mem_import(c->dev, c->fds[KVT_FD_POOL], c->w.pool_bytes, &c->pool)) < 0 ||
	    (ret = kvt_compute_open(dev, &c->cc)) < 0)
		goto fail;
	c->gpu = c->w.device == KVT_WIRE_DEV_CUDA;
	c->fast.fd = -1;
	c->req_bytes = c->w.data_bytes;
	if ((c->w.flags & KVT_WELCOME_FAST) && c->fds[KVT_FD_FAST] >= 0) {
		/* the fast path's feedback ring: the last quarter of the data area */
		c->fb_bytes = (c->w.data_bytes / 4) & ~63ull;
		c->fb_off = c->w.data_bytes - c->fb_bytes;
		c->req_bytes = c->fb_off;
		if (c->w.fast_map_off >= c->w.fast_bytes || !c->w.fast_pages ||
		    c->w.fast_seqs > c->max_live ||
		    (ret = c->dev->ops->mem_import(c->dev, c->fds[KVT_FD_FAST], c->w.fast_bytes,
						   &c->fast)) < 0) {
			ret = ret < 0 ? ret : -EPROTO;
			goto fail;
		}
	}
	c->host = mmap(NULL, c->w.host_bytes, PROT_READ, MAP_SHARED, c->fds[KVT_FD_HOST], 0);
	if (c->host == MAP_FAILED) {
		c->host = NULL;
		ret = -errno;
		goto fail;
	}
	/* Pages in the host arena are read in place where the backend can map it
	 * read-only; without that, every selected page comes to the GPU pool first. */
	if (!(o.flags & KVTIER_ATTACH_NO_HOST_READS) &&
	    c->dev->ops->host_map_ro(c->dev, c->host, c->w.host_bytes, &c->host_dev) < 0)
		c->host_dev = NULL;
	/* The data area pinned, so that queries and K/V in device memory come and go by DMA
	 * (best effort: unpinned, the copies are slower, not wrong). */
	c->data_pinned = c->dev->ops->host_register(c->dev, c->data, c->w.data_bytes) == 0;
	/* the read fence; without one (an older daemon, or none could be made) an async
	 * attend synchronises before it returns */
	if ((c->w.flags & KVT_WELCOME_FENCE) &&
	    c->dev->ops->fence_open(c->dev, c->w.fence, NULL, &c->fence) < 0)
		c->fence = NULL;
	/* the copy fence; without one selects wait for their copies (slower, not wrong) */
	const char *cf = getenv("KVTIER_COPY_FENCE");
	if ((c->w.flags & KVT_WELCOME_COPY_FENCE) && !(cf && !strcmp(cf, "0")) &&
	    c->dev->ops->fence_open(c->dev, c->w.copy_fence, c->hdr->copy_fence,
				    &c->copy_fence) < 0)
		c->copy_fence = NULL;
	c->layer_stream = calloc(layout->layers, sizeof(*c->layer_stream));
	c->layer_queued = calloc(layout->layers, sizeof(*c->layer_queued));
	if (!c->layer_stream || !c->layer_queued) {
		ret = -ENOMEM;
		goto fail;
	}
	if ((ret = alloc_tails(c)) < 0)
		goto fail;
	*out = c;
	return 0;
fail:
	kvtier_detach(c);
	return ret;
}

void kvtier_detach(struct kvtier_client *c)
{
	if (!c)
		return;
	if (c->pend) { /* the pages in flight: sealed before the client goes */
		pend_drain(c);
		for (uint32_t i = 0; i < PEND_MAX; i++)
			if (c->pend[i].copied)
				c->dev->ops->fence_destroy(c->dev, c->pend[i].copied);
	}
	if (c->timing && c->sel_n)
		fprintf(stderr, "libkvtier: %llu selects, per select: query staged %.1f us, round trip "
				"to the daemon %.1f us, table to the device %.1f us\n",
			(unsigned long long)c->sel_n, c->sel_ns[0] / 1e3 / c->sel_n,
			c->sel_ns[1] / 1e3 / c->sel_n, c->sel_ns[2] / 1e3 / c->sel_n);
	if (c->timing && c->fb_token) {
		fprintf(stderr, "libkvtier: fast path: %u selects, %llu reports dropped (ring full)\n",
			c->fb_token, (unsigned long long)c->fb_dropped);
		const double n0 = c->fast_n[0] ? (double)c->fast_n[0] : 1,
			     n1 = c->fast_n[1] ? (double)c->fast_n[1] : 1,
			     n2 = c->fast_n[2] ? (double)c->fast_n[2] : 1;
		fprintf(stderr, "libkvtier: fast path, %s per call: append %.1f us; select %.1f "
				"us (staging %.1f, report posted %.1f, kernels queued %.1f); attend %.1f us\n",
			c->timing_sync ? "host and device time (each call waited for)" : "host time",
			c->fast_ns[0] / 1e3 / n0,
			(c->fast_ns[1] + c->fast_ns[2] + c->fast_ns[3]) / 1e3 / n1, c->fast_ns[1] / 1e3 / n1,
			c->fast_ns[2] / 1e3 / n1, c->fast_ns[3] / 1e3 / n1, c->fast_ns[4] / 1e3 / n2);
	}
	if (c->timing && c->pf_n)
		fprintf(stderr, "libkvtier: %llu batches of whole pages (%llu pages), per batch: "
				"waited for its copies %.1f us, for the daemon's answers %.1f us\n",
			(unsigned long long)c->pf_n, (unsigned long long)c->pf_pages,
			c->pf_ns[0] / 1e3 / c->pf_n, c->pf_ns[1] / 1e3 / c->pf_n);
	bool queued = false;
	for (uint32_t l = 0; c->layer_queued && l < c->layout.layers; l++)
		queued |= c->layer_queued[l];
	if (queued && c->fence)
		c->dev->ops->fence_wait(c->dev, c->fence);
	free(c->layer_stream);
	free(c->layer_queued);
	if (c->fence)
		c->dev->ops->fence_destroy(c->dev, c->fence);
	if (c->copy_fence)
		c->dev->ops->fence_destroy(c->dev, c->copy_fence);
	kvt_compute_close(c->est_cc); /* waits for its stream */
	if (c->cc) {
		kvt_compute_host_free(c->cc, c->stage);
		kvt_compute_free(c->cc, c->tail_dev);
		kvt_compute_free(c->cc, c->q_dev);
		kvt_compute_free(c->cc, c->out_dev);
		kvt_compute_free(c->cc, c->lse_dev);
		kvt_compute_close(c->cc);
	}
	if (c->dev) {
		if (c->host_dev)
			c->dev->ops->host_unregister(c->dev, c->host);
		if (c->data_pinned)
			c->dev->ops->host_unregister(c->dev, c->ring + c->w.data_off);
		if (c->pool.ptr)
			c->dev->ops->mem_destroy(c->dev, &c->pool);
		if (c->fast.ptr)
			c->dev->ops->mem_destroy(c->dev, &c->fast);
		kvt_device_close(c->dev);
	}
	if (c->host)
		munmap(c->host, c->w.host_bytes);
	if (c->ring)
		munmap(c->ring, c->w.ring_bytes);
	for (int i = 0; i < KVT_FD_MAX; i++)
		if (c->fds[i] >= 0)
			close(c->fds[i]);
	close(c->sock);
	for (uint32_t i = 0; c->live && i < c->max_live; i++)
		free(c->live[i].ntok);
	free(c->pend);
	free(c->live);
	free(c->live_of);
	free(c->batch_pos);
	free(c->batch_slot);
	free(c->batch_full);
	free(c->tail_host);
	pthread_mutex_destroy(&c->lock);
	free(c);
}

const char *kvtier_backend(const struct kvtier_client *c)
{
	return kvt_compute_name(c->cc);
}

/* ---- sequences ---- */

static struct live_seq *live_get(struct kvtier_client *c, uint32_t seq)
{
	if (seq >= c->w.max_seqs || c->live_of[seq] < 0)
		return NULL;
	return &c->live[c->live_of[seq]];
}

static int live_add(struct kvtier_client *c, uint32_t seq)
{
	if (seq >= c->w.max_seqs)
		return -EPROTO;
	for (uint32_t i = 0; i < c->max_live; i++) {
		if (c->live[i].used)
			continue;
		c->live[i].used = true;
		c->live[i].id = seq;
		c->live[i].fast_ok = true;
		memset(c->live[i].ntok, 0, 2 * (size_t)c->layout.layers * sizeof(uint32_t));
		c->live_of[seq] = (int32_t)i;
		return (int)i;
	}
	return -EMFILE;
}

static void live_del(struct kvtier_client *c, uint32_t seq)
{
	struct live_seq *l = live_get(c, seq);
	if (l) {
		l->used = false;
		c->live_of[seq] = -1;
	}
}

static size_t tail_slot(const struct kvtier_client *c, uint32_t live, uint32_t layer, uint32_t h)
{
	return ((size_t)live * c->layout.layers + layer) * c->layout.kv_heads + h;
}

int kvtier_seq_create(struct kvtier_client *c, uint32_t *out)
{
	struct kvt_sqe r = {.op = KVT_OP_SEQ_CREATE};
	struct kvt_cqe e;
	pthread_mutex_lock(&c->lock);
	int ret = call(c, &r, &e);
	if (ret >= 0) {
		int li = live_add(c, (uint32_t)ret);
		if (li < 0) {
			struct kvt_sqe cl = {.op = KVT_OP_SEQ_CLOSE, .seq = (uint32_t)ret};
			call(c, &cl, &e);
			ret = li;
		} else {
			*out = (uint32_t)ret;
			ret = 0;
		}
	}
	pthread_mutex_unlock(&c->lock);
	return ret;
}

int kvtier_seq_close(struct kvtier_client *c, uint32_t seq)
{
	struct kvt_sqe r = {.op = KVT_OP_SEQ_CLOSE, .seq = seq};
	struct kvt_cqe e;
	pthread_mutex_lock(&c->lock);
	int ret = call(c, &r, &e);
	if (ret >= 0)
		live_del(c, seq);
	pthread_mutex_unlock(&c->lock);
	return ret < 0 ? ret : 0;
}

/* A name into the data area (the ring is serialized by c->lock). */
static int put_name(struct kvtier_client *c, const char *name, struct kvt_sqe *r)
{
	size_t n = name ? strlen(name) : 0;
	if (!n || n > KVTIER_SEQ_NAME_MAX || n > c->w.data_bytes)
		return -EINVAL;
	pend_drain(c); /* their regions of the data area */
	memcpy(c->data, name, n);
	r->off[0] = 0;
	r->ntok = (uint32_t)n;
	return 0;
}

int kvtier_seq_open(struct kvtier_client *c, const char *name, uint32_t flags, uint32_t *seq,
		    uint32_t *tokens)
{
	struct kvt_sqe r = {.op = KVT_OP_SEQ_OPEN, .flags = (uint8_t)flags};
	struct kvt_cqe e;
	if (flags > 0xff)
		return -EINVAL;
	pthread_mutex_lock(&c->lock);
	int ret = put_name(c, name, &r);
	if (ret == 0)
		ret = call(c, &r, &e);
	if (ret >= 0) {
		int li = live_add(c, (uint32_t)ret);
		if (li < 0 || e.aux[0] > UINT32_MAX) {
			struct kvt_sqe cl = {.op = KVT_OP_SEQ_CLOSE, .seq = (uint32_t)ret};
			struct kvt_cqe ce;
			call(c, &cl, &ce);
			if (li >= 0)
				live_del(c, (uint32_t)ret);
			ret = li < 0 ? li : -EPROTO;
		} else {
			for (uint32_t l = 0; l < c->layout.layers; l++)
				c->live[li].ntok[l] = c->live[li].sent[l] = (uint32_t)e.aux[0];
			c->live[li].fast_ok = false; /* its summaries are the daemon's only */
			*seq = (uint32_t)ret;
			if (tokens)
				*tokens = (uint32_t)e.aux[0];
			ret = 0;
		}
	}
	pthread_mutex_unlock(&c->lock);
	return ret;
}

int kvtier_seq_sync(struct kvtier_client *c, uint32_t seq, uint32_t *tokens)
{
	struct kvt_sqe r = {.op = KVT_OP_SEQ_SYNC, .seq = seq};
	struct kvt_cqe e;
	pthread_mutex_lock(&c->lock);
	int ret = live_get(c, seq) ? call(c, &r, &e) : -ENOENT;
	if (ret >= 0 && tokens)
		*tokens = (uint32_t)e.aux[0];
	pthread_mutex_unlock(&c->lock);
	return ret < 0 ? ret : 0;
}

int kvtier_seq_remove(struct kvtier_client *c, const char *name)
{
	struct kvt_sqe r = {.op = KVT_OP_SEQ_REMOVE};
	struct kvt_cqe e;
	pthread_mutex_lock(&c->lock);
	int ret = put_name(c, name, &r);
	if (ret == 0)
		ret = call(c, &r, &e);
	pthread_mutex_unlock(&c->lock);
	return ret < 0 ? ret : 0;
}

static int flush_seq(struct kvtier_client *c, struct live_seq *l);

int kvtier_seq_fork(struct kvtier_client *c, uint32_t parent, uint32_t prefix, uint32_t *out)
{
	const uint32_t L = c->layout.layers, H = c->layout.kv_heads, T = c->layout.page_tokens;
	const size_t pb = 2 * (size_t)T * c->row;
	struct kvt_sqe r = {.op = KVT_OP_SEQ_FORK, .seq = parent, .ntok = prefix, .off = {0}};
	struct kvt_cqe e;
	if ((uint64_t)L * H * pb > c->req_bytes)
		return -EMSGSIZE;
	pthread_mutex_lock(&c->lock);
	struct live_seq *pl = live_get(c, parent);
	int ret = !pl ? -ENOENT : flush_seq(c, pl);
	if (ret == 0)
		ret = call(c, &r, &e);
	if (ret < 0)
		goto out;
	int li = live_add(c, (uint32_t)ret);
	if (li < 0) {
		struct kvt_sqe cl = {.op = KVT_OP_SEQ_CLOSE, .seq = (uint32_t)ret};
		call(c, &cl, &e);
		ret = li;
		goto out;
	}
	*out = (uint32_t)ret;
	ret = 0;
	/* the daemon wrote the child's partial page, [layer][head][page], at offset 0 */
	const uint32_t part = prefix % T;
	c->live[li].fast_ok = false; /* its parent's pages' summaries are where the parent's are */
	for (uint32_t l = 0; l < L; l++) {
		c->live[li].ntok[l] = c->live[li].sent[l] = prefix;
		for (uint32_t h = 0; h < H && part && !ret; h++) {
			const uint8_t *src = c->data + ((size_t)l * H + h) * pb;
			size_t s = tail_slot(c, (uint32_t)li, l, h) * c->w.slot_bytes;
			memcpy(c->tail_host + s, src, part * c->row);
			memcpy(c->tail_host + s + T * c->row, src + T * c->row, part * c->row);
			uint8_t *dev = (uint8_t *)c->tail_dev + s;
			if ((ret = kvt_compute_upload(c->cc, dev, c->tail_host + s, part * c->row)) == 0)
				ret = kvt_compute_upload(c->cc, dev + T * c->row,
							 c->tail_host + s + T * c->row, part * c->row);
		}
	}
out:
	pthread_mutex_unlock(&c->lock);
	return ret < 0 ? ret : 0;
}

int kvtier_seq_tokens(struct kvtier_client *c, uint32_t seq, uint32_t layer, uint32_t *out)
{
	pthread_mutex_lock(&c->lock);
	struct live_seq *l = live_get(c, seq);
	int ret = !l ? -ENOENT : layer >= c->layout.layers ? -EINVAL : 0;
	if (!ret)
		*out = l->ntok[layer];
	pthread_mutex_unlock(&c->lock);
	return ret;
}

/* ---- append ---- */

/* The accepted tokens of the chunk now in the data area go to the tail copy. */
static int mirror_tail(struct kvtier_client *c, uint32_t li, uint32_t layer, uint32_t n0,
		       uint32_t acc, uint64_t voff)
{
	const uint32_t H = c->layout.kv_heads, T = c->layout.page_tokens;
	uint32_t n1 = n0 + acc, first = n1 / T * T;
	if (first < n0)
		first = n0;
	if (first == n1)
		return 0;
	/* each head's new rows into its page here and into the pinned staging, from which
	 * they go up queued: one synchronisation for every head of the append */
	const size_t p0 = first % T, np = n1 - first;
	int ret = 0;
	for (uint32_t h = 0; h < H && ret == 0; h++) {
		size_t s = tail_slot(c, li, layer, h) * c->w.slot_bytes;
		uint8_t *page = c->tail_host + s, *st = c->stage + (size_t)h * c->w.slot_bytes;
		for (uint32_t t = first; t < n1; t++) {
			size_t i = (size_t)(t - n0) * H + h, pos = t % T;
			memcpy(page + pos * c->row, c->data + i * c->row, c->row);
			memcpy(page + (T + pos) * c->row, c->data + voff + i * c->row, c->row);
		}
		memcpy(st + p0 * c->row, page + p0 * c->row, np * c->row);
		memcpy(st + (T + p0) * c->row, page + (T + p0) * c->row, np * c->row);
		uint8_t *dev = (uint8_t *)c->tail_dev + s;
		if ((ret = kvt_compute_copy_async(c->cc, dev + p0 * c->row, st + p0 * c->row,
						  np * c->row, NULL)) == 0)
			ret = kvt_compute_copy_async(c->cc, dev + (T + p0) * c->row, st + (T + p0) * c->row,
						     np * c->row, NULL);
	}
	int sret = kvt_compute_sync(c->cc, NULL); /* the staging is reused by the next append */
	return ret < 0 ? ret : sret;
}

/* ---- filled pages in flight ---- */

/*
 * Whether the layer's page is full and in flight (handed to the daemon, not answered
 * yet): it is then still in its tail slot, attended from there. Outside a call a full
 * page the daemon does not have is one in flight (any other is sent when it fills).
 */
static bool in_flight(const struct kvtier_client *c, const struct live_seq *l, uint32_t layer)
{
	const uint32_t T = c->layout.page_tokens;
	return l->ntok[layer] - l->sent[layer] == T && l->ntok[layer] % T == 0;
}

static struct pend_batch *pend_at(struct kvtier_client *c, uint32_t i)
{
	return &c->pend[(c->pend_head + i) % PEND_MAX];
}

/*
 * A batch's requests into the ring once its copies have landed (wait: waited for).
 * -EAGAIN: not yet, or the answers not reaped would leave no room in the completion
 * ring for its own (the daemon would stop reading requests). A failure is the batch's:
 * its pages not submitted lose their tokens when it is reaped.
 */
static int pend_submit(struct kvtier_client *c, struct pend_batch *b, bool wait)
{
	if (b->submitted)
		return 0;
	if (c->pend_reqs && c->pend_reqs + b->n > c->w.cq_entries / 2)
		return -EAGAIN;
	if (b->err == 0) {
		const uint64_t t0 = c->timing ? mono_ns() : 0;
		int ret = wait ? c->dev->ops->fence_wait(c->dev, b->copied)
			       : c->dev->ops->fence_query(c->dev, b->copied);
		if (ret == -EAGAIN && !wait)
			return ret;
		b->err = ret;
		if (c->timing)
			c->pf_ns[0] += mono_ns() - t0;
	}
	const size_t pg = (size_t)c->layout.kv_heads * c->w.slot_bytes;
	for (uint32_t j = 0; j < b->n && b->err == 0; j++) {
		struct kvt_sqe r = {.op = KVT_OP_APPEND, .flags = KVT_APPEND_PAGES, .seq = b->seq[j],
				    .layer = (uint16_t)b->layer, .ntok = c->layout.page_tokens,
				    .off = {b->off + j * pg, c->w.slot_bytes}};
		if ((b->err = submit(c, &r, j + 1 == b->n)) == 0) {
			if (!b->sub++)
				b->ud0 = r.user_data;
		}
	}
	if (b->sub < b->n && b->sub && !c->dead)
		kick(c); /* those submitted are answered: they are reaped */
	b->submitted = true;
	c->pend_reqs += b->sub;
	return 0;
}

/* The batches whose copies have landed, oldest first, into the ring; none waited for. */
static void pend_kick(struct kvtier_client *c)
{
	for (uint32_t i = 0; i < c->pend_n; i++)
		if (pend_submit(c, pend_at(c, i), false) < 0)
			return;
}

/*
 * The oldest batch answered: each page's tokens now the daemon's, or, refused (or never
 * sent), dropped with any after them, as a failed append drops them; the first error
 * kept for the next append call to return.
 */
static void pend_reap(struct kvtier_client *c)
{
	struct pend_batch *b = pend_at(c, 0);
	pend_submit(c, b, true); /* the oldest: room for its answers */
	const uint32_t T = c->layout.page_tokens;
	const uint64_t t0 = c->timing ? mono_ns() : 0;
	for (uint32_t j = 0; j < b->n; j++) {
		struct kvt_sqe r = {.user_data = b->ud0 + j};
		struct kvt_cqe e = {0};
		int rr = j < b->sub ? reap(c, &r, &e) : b->err < 0 ? b->err : -EIO;
		uint32_t acc = rr == -ECONNRESET || rr == -EPROTO || j >= b->sub || e.aux[0] > T
				       ? 0 : (uint32_t)e.aux[0];
		if (rr >= 0 && acc < T)
			rr = -EPROTO;
		struct live_seq *l = live_get(c, b->seq[j]);
		if (l && in_flight(c, l, b->layer)) {
			l->sent[b->layer] += acc;
			if (acc < T)
				l->ntok[b->layer] = l->sent[b->layer];
		}
		if (rr < 0 && c->pend_err == 0)
			c->pend_err = rr;
	}
	if (c->timing) {
		c->pf_ns[1] += mono_ns() - t0;
		c->pf_n++;
		c->pf_pages += b->n;
	}
	c->pend_reqs -= b->sub;
	c->pend_head = (c->pend_head + 1) % PEND_MAX;
	c->pend_n--;
}

/* Every batch in flight answered (before the data area is used for anything else). */
static void pend_drain(struct kvtier_client *c)
{
	while (c->pend_n)
		pend_reap(c);
}

/* The batches of a layer answered (and those before them): its pages in the daemon's
 * map, its tail slots free to take the next page's tokens. */
static void pend_drain_layer(struct kvtier_client *c, uint32_t layer)
{
	uint32_t last = 0;
	for (uint32_t i = 0; i < c->pend_n; i++)
		if (pend_at(c, i)->layer == layer)
			last = i + 1;
	while (last--)
		pend_reap(c);
}

/* The error of a page answered since the last call that returned one, once. */
static int pend_error(struct kvtier_client *c)
{
	int ret = c->pend_err;
	c->pend_err = 0;
	return ret;
}

/* A region of bytes (at most req_bytes) in the data area for a new batch; older
 * batches reaped until one is clear of every region in flight. */
static uint64_t pend_region(struct kvtier_client *c, uint64_t bytes)
{
	for (;;) {
		uint64_t off = 0;
		if (c->pend_n) {
			const struct pend_batch *nb = pend_at(c, c->pend_n - 1);
			off = nb->off + nb->bytes;
			if (off + bytes > c->req_bytes)
				off = 0;
		}
		bool clear = c->pend_n < PEND_MAX;
		for (uint32_t i = 0; i < c->pend_n && clear; i++) {
			const struct pend_batch *b = pend_at(c, i);
			clear = off + bytes <= b->off || b->off + b->bytes <= off;
		}
		if (clear)
			return off;
		pend_reap(c);
	}
}

/*
 * The pages that sequences filled in one layer, each all kept here (sent at the page's
 * start), to the daemon as they are on the device (KVT_APPEND_PAGES): copied into a
 * region of the data area behind the appends on the stream, their appends submitted
 * together once the copies have landed (the daemon seals them together). Not waited
 * for unless wait: each page stays in its tail slot (in_flight), attended from there, until
 * its answer is reaped, at the latest before the layer's next append. A sequence whose
 * append fails loses that page's tokens, as in flush_layer; the others go on. 0 or the
 * first error (with wait: of these pages' answers; without: of their copies).
 */
static int flush_pages(struct kvtier_client *c, uint32_t layer, struct live_seq *const *ls,
		       uint32_t n, bool wait)
{
	const uint32_t H = c->layout.kv_heads;
	const size_t pg = (size_t)H * c->w.slot_bytes;
	uint64_t g = c->req_bytes / pg;
	if (g > c->w.sq_entries / 2)
		g = c->w.sq_entries / 2;
	if (g > c->w.cq_entries / 2)
		g = c->w.cq_entries / 2;
	if (g > PEND_PAGES)
		g = PEND_PAGES;
	if (!g)
		return -EMSGSIZE;
	int first = 0;
	for (uint32_t i0 = 0; i0 < n; i0 += (uint32_t)g) {
		const uint32_t m = n - i0 < g ? n - i0 : (uint32_t)g;
		const uint64_t off = pend_region(c, m * pg); /* m * pg <= req_bytes: g */
		struct pend_batch *b = pend_at(c, c->pend_n);
		struct kvt_fence *f = b->copied;
		*b = (struct pend_batch){.copied = f, .off = off, .bytes = m * pg, .layer = layer,
					 .n = m};
		int ret = 0;
		if (!b->copied)
			ret = c->dev->ops->fence_create(c->dev, NULL, NULL, &b->copied);
		for (uint32_t j = 0; j < m; j++) {
			struct live_seq *l = ls[i0 + j];
			b->seq[j] = l->id;
			const size_t s0 = tail_slot(c, (uint32_t)c->live_of[l->id], layer, 0) * c->w.slot_bytes;
			if (ret == 0)
				ret = kvt_compute_copy_async(c->cc, c->data + b->off + j * pg,
							     (uint8_t *)c->tail_dev + s0, pg, c->append_stream);
		}
		if (ret == 0)
			ret = c->dev->ops->fence_record(c->dev, b->copied, c->append_stream);
		b->err = ret;
		c->pend_n++;
		if (ret < 0 && first == 0)
			first = ret;
	}
	if (wait) { /* this call's answers alone: an earlier error stays for later */
		const int earlier = c->pend_err;
		c->pend_err = 0;
		pend_drain(c);
		first = first ? first : c->pend_err;
		c->pend_err = earlier;
	} else {
		pend_kick(c);
	}
	return first;
}

/*
 * The tokens kvtier_append_async kept of the page still filling of one layer go to the
 * daemon (from the device's copy of the page): when the page is full, and before any
 * request that needs the daemon to have every token. On an error the tokens the daemon
 * did not take are dropped here too (the sequence ends where the daemon's does).
 */
static int flush_layer(struct kvtier_client *c, struct live_seq *l, uint32_t layer)
{
	pend_drain(c); /* pages in flight: the daemon's first (their errors kept for later) */
	const uint32_t n = l->ntok[layer] - l->sent[layer];
	if (!n)
		return 0;
	if (n == c->layout.page_tokens && l->sent[layer] % n == 0)
		return flush_pages(c, layer, &l, 1, true); /* a whole page: as it is on the device */
	const uint32_t H = c->layout.kv_heads, T = c->layout.page_tokens;
	const size_t tok = c->row * H;
	const uint64_t voff = ((uint64_t)n * tok + 63) & ~63ull;
	const uint32_t li = (uint32_t)c->live_of[l->id];
	const size_t s0 = tail_slot(c, li, layer, 0) * c->w.slot_bytes;
	int ret = kvt_compute_sync(c->cc, c->append_stream);
	if (ret == 0)
		ret = kvt_compute_download(c->cc, c->tail_host + s0, (uint8_t *)c->tail_dev + s0,
					   H * c->w.slot_bytes);
	if (ret == 0 && 2 * voff > c->req_bytes)
		ret = -EMSGSIZE;
	if (ret < 0) {
		l->ntok[layer] = l->sent[layer];
		return ret;
	}
	for (uint32_t t = l->sent[layer]; t < l->ntok[layer]; t++)
		for (uint32_t h = 0; h < H; h++) {
			const uint8_t *page = c->tail_host + s0 + (size_t)h * c->w.slot_bytes;
			size_t i = (size_t)(t - l->sent[layer]) * H + h, pos = t % T;
			memcpy(c->data + i * c->row, page + pos * c->row, c->row);
			memcpy(c->data + voff + i * c->row, page + (T + pos) * c->row, c->row);
		}
	struct kvt_sqe r = {.op = KVT_OP_APPEND, .seq = l->id, .layer = (uint16_t)layer,
			    .ntok = n, .off = {0, voff}};
	struct kvt_cqe e = {0};
	ret = call(c, &r, &e);
	uint32_t acc = ret == -ECONNRESET || ret == -EPROTO || e.aux[0] > n ? 0 : (uint32_t)e.aux[0];
	if (ret >= 0 && acc < n)
		ret = -EPROTO;
	l->sent[layer] += acc;
	l->ntok[layer] = l->sent[layer];
	return ret < 0 ? ret : 0;
}

static int flush_seq(struct kvtier_client *c, struct live_seq *l)
{
	int ret = 0;
	for (uint32_t layer = 0; layer < c->layout.layers && ret == 0; layer++)
		ret = flush_layer(c, l, layer);
	return ret;
}

int kvtier_append(struct kvtier_client *c, uint32_t seq, uint32_t layer, const void *k,
		  const void *v, uint32_t ntok, unsigned mem)
{
	if (!k || !v || layer >= c->layout.layers)
		return -EINVAL;
	const size_t tok = c->row * c->layout.kv_heads;
	const uint64_t chunk_max = c->req_bytes / (2 * tok);
	if (!chunk_max)
		return -EMSGSIZE;
	pthread_mutex_lock(&c->lock);
	struct live_seq *l = live_get(c, seq);
	int ret = l ? flush_layer(c, l, layer) : -ENOENT;
	/* an attend still queued may read the tail pages this append rewrites */
	if (ret == 0 && c->layer_queued[layer]) {
		ret = c->dev->ops->fence_wait(c->dev, c->fence);
		c->layer_queued[layer] = false;
	}
	for (uint32_t done = 0; done < ntok && ret == 0;) {
		uint32_t n = ntok - done < chunk_max ? ntok - done : (uint32_t)chunk_max;
		uint64_t voff = ((uint64_t)n * tok + 63) & ~63ull;
		const uint8_t *ks = (const uint8_t *)k + (size_t)done * tok;
		const uint8_t *vs = (const uint8_t *)v + (size_t)done * tok;
		if (mem & KVT_MEM_DEVICE) {
			if ((ret = kvt_compute_download(c->cc, c->data, ks, n * tok)) < 0 ||
			    (ret = kvt_compute_download(c->cc, c->data + voff, vs, n * tok)) < 0)
				break;
		} else {
			memcpy(c->data, ks, n * tok);
			memcpy(c->data + voff, vs, n * tok);
		}
		struct kvt_sqe r = {.op = KVT_OP_APPEND, .seq = seq, .layer = (uint16_t)layer,
				    .ntok = n, .off = {0, voff}};
		struct kvt_cqe e = {0};
		ret = call(c, &r, &e);
		if (ret < 0 && ret != -ECONNRESET && ret != -EPROTO && e.aux[0] > n)
			ret = -EPROTO;
		uint32_t acc = ret == -ECONNRESET || ret == -EPROTO ? 0 : (uint32_t)e.aux[0];
		int mr = mirror_tail(c, (uint32_t)c->live_of[seq], layer, l->ntok[layer], acc, voff);
		l->ntok[layer] += acc;
		l->sent[layer] = l->ntok[layer];
		if (ret >= 0)
			ret = mr;
		done += n;
	}
	pthread_mutex_unlock(&c->lock);
	return ret < 0 ? ret : 0;
}

/* Before an append on stream (under the lock): the pages still filling follow the
 * client's stream, and a queued attend that reads the layer's tails goes first. */
static int append_begin(struct kvtier_client *c, uint32_t layer, void *stream)
{
	int ret = 0;
	/* the layer's pages in flight answered: their tail slots take the next tokens; a
	 * page the daemon refused (its tokens dropped) fails this call before it appends */
	pend_kick(c);
	pend_drain_layer(c, layer);
	if ((ret = pend_error(c)) < 0)
		return ret;
	if (c->append_stream != stream) {
		/* the pages kept so far were written on the other stream */
		for (uint32_t i = 0; i < c->max_live && ret == 0; i++)
			if (c->live[i].used)
				ret = flush_seq(c, &c->live[i]);
		c->append_stream = stream;
	}
	if (ret == 0 && c->layer_queued[layer]) { /* an attend on another stream reads the tail */
		if (c->layer_stream[layer] != stream)
			ret = c->dev->ops->fence_stream_wait(c->dev, c->fence, stream);
		c->layer_queued[layer] = false;
	}
	return ret;
}

static void append_end(struct kvtier_client *c, void *stream, uint64_t t0)
{
	if (!c->timing)
		return;
	if (c->timing_sync)
		kvt_compute_sync(c->cc, stream);
	c->fast_n[0]++;
	c->fast_ns[0] += mono_ns() - t0;
}

int kvtier_append_async(struct kvtier_client *c, uint32_t seq, uint32_t layer, const void *k,
			const void *v, uint32_t ntok, void *stream)
{
	if (!c || !k || !v || layer >= c->layout.layers)
		return -EINVAL;
	if (!c->fast.ptr) { /* no fast path: through the daemon at once */
		int ret = kvt_compute_sync(c->cc, stream);
		return ret < 0 ? ret : kvtier_append(c, seq, layer, k, v, ntok, KVT_MEM_DEVICE);
	}
	const uint32_t H = c->layout.kv_heads, T = c->layout.page_tokens;
	const size_t tok = c->row * H;
	const uint64_t t0 = c->timing ? mono_ns() : 0;
	pthread_mutex_lock(&c->lock);
	struct live_seq *l = live_get(c, seq);
	int ret = l ? append_begin(c, layer, stream) : -ENOENT;
	const uint32_t li = l ? (uint32_t)c->live_of[seq] : 0;
	for (uint32_t done = 0; done < ntok && ret == 0;) {
		const uint32_t pos = l->ntok[layer] % T;
		const uint32_t n = ntok - done < T - pos ? ntok - done : T - pos;
		struct kvt_put_rows_args a = {
			.g = c->geom, .heads = H, .ntok = n, .pos0 = pos,
			.k = (const uint8_t *)k + (size_t)done * tok,
			.v = (const uint8_t *)v + (size_t)done * tok, .pool = c->tail_dev,
			.slot_bytes = c->w.slot_bytes, .slot0 = tail_slot(c, li, layer, 0)};
		if ((ret = kvt_put_rows(c->cc, &a, stream)) < 0)
			break;
		l->ntok[layer] += n;
		done += n;
		if (l->ntok[layer] % T == 0) /* full: the daemon seals it and summarizes it */
			ret = flush_layer(c, l, layer);
	}
	append_end(c, stream, t0);
	pthread_mutex_unlock(&c->lock);
	return ret;
}

int kvtier_append_batch_async(struct kvtier_client *c, const uint32_t *seqs, uint32_t nseq,
			      uint32_t layer, const void *k, const void *v, void *stream)
{
	if (!c || (nseq && (!seqs || !k || !v)) || layer >= c->layout.layers)
		return -EINVAL;
	const uint32_t H = c->layout.kv_heads, T = c->layout.page_tokens;
	const size_t tok = c->row * H;
	const uint64_t t0 = c->timing ? mono_ns() : 0;
	pthread_mutex_lock(&c->lock);
	/* every sequence live and named once, or nothing appended */
	int ret = 0;
	const uint32_t mark = ++c->batch_mark;
	for (uint32_t i = 0; i < nseq && ret == 0; i++) {
		struct live_seq *l = live_get(c, seqs[i]);
		if (!l)
			ret = -ENOENT;
		else if (l->mark == mark)
			ret = -EINVAL;
		else
			l->mark = mark;
	}
	if (ret < 0 || !nseq) {
		pthread_mutex_unlock(&c->lock);
		return ret;
	}
	if (!c->fast.ptr) { /* no fast path: through the daemon at once */
		pthread_mutex_unlock(&c->lock);
		ret = kvt_compute_sync(c->cc, stream);
		for (uint32_t i = 0; i < nseq && ret == 0; i++)
			ret = kvtier_append(c, seqs[i], layer, (const uint8_t *)k + i * tok,
					   (const uint8_t *)v + i * tok, 1, KVT_MEM_DEVICE);
		return ret;
	}
	ret = append_begin(c, layer, stream);
	for (uint32_t i = 0; i < nseq && ret == 0; i++) {
		const struct live_seq *l = live_get(c, seqs[i]);
		c->batch_pos[i] = l->ntok[layer] % T;
		c->batch_slot[i] = tail_slot(c, (uint32_t)c->live_of[seqs[i]], layer, 0);
	}
	struct kvt_put_rows_args a = {.g = c->geom, .heads = H, .ntok = 1, .k = k, .v = v,
				      .pool = c->tail_dev, .slot_bytes = c->w.slot_bytes,
				      .nseq = nseq, .seq_pos = c->batch_pos, .seq_slot0 = c->batch_slot};
	if (ret == 0 && (ret = kvt_put_rows(c->cc, &a, stream)) == 0) {
		/* queued: each sequence has its token; the pages filled go to the daemon
		 * together (a sequence whose page cannot loses that page's tokens, as
		 * kvtier_append_async; the others go on) */
		uint32_t nfull = 0;
		for (uint32_t i = 0; i < nseq; i++) {
			struct live_seq *l = live_get(c, seqs[i]);
			if (++l->ntok[layer] % T)
				continue;
			if (l->ntok[layer] - l->sent[layer] == T) {
				c->batch_full[nfull++] = l;
			} else {
				int r = flush_layer(c, l, layer);
				ret = ret < 0 ? ret : r;
			}
		}
		if (nfull) { /* not waited for: answered by the layer's next append */
			int r = flush_pages(c, layer, c->batch_full, nfull, false);
			ret = ret < 0 ? ret : r;
		}
	}
	append_end(c, stream, t0);
	pthread_mutex_unlock(&c->lock);
	return ret;
}

/* ---- tables ---- */

struct kvtier_table *kvtier_table_create(struct kvtier_client *c, uint32_t max_seqs)
{
	if (!max_seqs || max_seqs > c->w.max_batch)
		return NULL;
	struct kvtier_table *t = calloc(1, sizeof(*t));
	if (!t)
		return NULL;
	t->c = c;
	t->max_seqs = max_seqs;
	size_t rows = (size_t)max_seqs * c->layout.kv_heads;
	if (kvt_compute_host_alloc(c->cc, rows * 3 * sizeof(int32_t), (void **)&t->n_pages) < 0 ||
	    kvt_compute_alloc(c->cc, rows * 3 * sizeof(int32_t), (void **)&t->d_n_pages) < 0 ||
	    c->dev->ops->fence_create(c->dev, NULL, NULL, &t->up) < 0 ||
	    c->dev->ops->fence_create(c->dev, NULL, NULL, &t->est_done) < 0) {
		kvtier_table_destroy(t);
		return NULL;
	}
	memset(t->n_pages, 0, rows * 3 * sizeof(int32_t));
	t->tail_len = t->n_pages + rows;
	t->tail_slot = t->tail_len + rows;
	t->d_tail_len = t->d_n_pages + rows;
	t->d_tail_slot = t->d_tail_len + rows;
	return t;
}

void kvtier_table_destroy(struct kvtier_table *t)
{
	if (!t)
		return;
	struct kvt_device *dev = t->c->dev;
	if (t->queued)
		dev->ops->fence_wait(dev, t->c->fence);
	if (t->up) {
		if (t->up_pending)
			dev->ops->fence_wait(dev, t->up);
		dev->ops->fence_destroy(dev, t->up);
	}
	if (t->est_done) {
		if (t->est_pending)
			dev->ops->fence_wait(dev, t->est_done);
		dev->ops->fence_destroy(dev, t->est_done);
	}
	if (t->fast && !t->fast_seen)
		kvt_compute_sync(t->c->cc, t->stream);
	kvt_compute_free(t->c->cc, t->d_n_pages);
	kvt_compute_free(t->c->cc, t->d_slots);
	kvt_compute_free(t->c->cc, t->d_sel);
	kvt_compute_free(t->c->cc, t->d_pages);
	kvt_compute_free(t->c->cc, t->d_fin);
	kvt_compute_free(t->c->cc, t->d_scores);
	kvt_compute_free(t->c->cc, t->d_est);
	kvt_compute_free(t->c->cc, t->d_est_work);
	kvt_compute_free(t->c->cc, t->d_est_sync);
	kvt_compute_host_free(t->c->cc, t->fin);
	kvt_compute_host_free(t->c->cc, t->n_pages);
	kvt_compute_host_free(t->c->cc, t->slots);
	free(t->pages);
	free(t);
}

/* A table kvtier_select_async made: its device side, once its kernels have run. */
static void fast_fetch(struct kvtier_table *t)
{
	struct kvtier_client *c = t->c;
	const size_t rows = t->rows, cells = rows * t->stride;
	pthread_mutex_lock(&c->lock);
	int ret = kvt_compute_sync(c->cc, t->stream);
	if (ret == 0)
		ret = kvt_compute_download(c->cc, t->slots, t->d_slots, cells * sizeof(int32_t));
	if (ret == 0)
		ret = kvt_compute_download(c->cc, t->pages, t->d_pages, cells * sizeof(int32_t));
	if (ret == 0)
		ret = kvt_compute_download(c->cc, t->n_pages, t->d_n_pages, rows * sizeof(int32_t));
	if (ret < 0) /* an empty view rather than a wrong one */
		memset(t->n_pages, 0, rows * sizeof(int32_t));
	memcpy(t->tail_len, t->fin + 2 * (size_t)t->max_seqs * c->layout.kv_heads,
	       rows * sizeof(int32_t));
	memcpy(t->tail_slot, t->fin + 3 * (size_t)t->max_seqs * c->layout.kv_heads,
	       rows * sizeof(int32_t));
	t->fast_seen = true;
	pthread_mutex_unlock(&c->lock);
}

void kvtier_table_view(const struct kvtier_table *t, struct kvtier_table_view *out)
{
	if (t->fast && !t->fast_seen)
		fast_fetch((struct kvtier_table *)t);
	*out = (struct kvtier_table_view){.rows = t->rows, .stride = t->stride, .layer = t->layer,
					  .slots = t->slots, .pages = t->pages,
					  .n_pages = t->n_pages,
					  .tail_len = t->tail_len, .tail_slot = t->tail_slot};
}

void kvtier_memory(const struct kvtier_client *c, struct kvtier_memory *out)
{
	*out = (struct kvtier_memory){.pool = c->pool.ptr, .pool_bytes = c->w.pool_bytes,
				      .slot_bytes = c->w.slot_bytes, .tail_pool = c->tail_dev};
	if (c->host_dev) {
		out->host_pool = (const uint8_t *)c->host_dev + c->w.host_headroom;
		out->host_slot_bytes = c->w.host_stride;
	}
}

int kvtier_stats(struct kvtier_client *c, uint32_t seq, struct kvtier_prefetch_stats *out)
{
	if (!c || !out)
		return -EINVAL;
	struct kvt_sqe r = {.op = KVT_OP_STATS, .seq = seq == UINT32_MAX ? KVT_SEQ_ALL : seq};
	struct kvt_cqe e;
	pthread_mutex_lock(&c->lock);
	int ret = call(c, &r, &e);
	if (ret == 0)
		memcpy(out, c->data, sizeof(*out));
	pthread_mutex_unlock(&c->lock);
	return ret;
}

static int ensure_dev(struct kvtier_client *c, void **p, size_t *have, size_t need)
{
	if (*have >= need)
		return 0;
	kvt_compute_free(c->cc, *p);
	*p = NULL;
	*have = 0;
	int ret = kvt_compute_alloc(c->cc, need, p);
	if (ret == 0)
		*have = need;
	return ret;
}

/* Room for a table of rows x stride entries: host and device sides. */
static int table_cells(struct kvtier_client *c, struct kvtier_table *t, size_t cells)
{
	if (cells <= t->cap_cells)
		return 0;
	int32_t *s = NULL;
	if (kvt_compute_host_alloc(c->cc, cells * sizeof(int32_t), (void **)&s) == 0) {
		kvt_compute_host_free(c->cc, t->slots);
		t->slots = s;
	}
	int32_t *pg = realloc(t->pages, cells * sizeof(int32_t));
	if (pg)
		t->pages = pg;
	kvt_compute_free(c->cc, t->d_slots);
	t->d_slots = NULL;
	t->cap_cells = 0;
	if (!s || !pg || kvt_compute_alloc(c->cc, cells * sizeof(int32_t), (void **)&t->d_slots) < 0)
		return -ENOMEM;
	t->cap_cells = (uint32_t)cells;
	return 0;
}

int kvtier_select(struct kvtier_client *c, const uint32_t *seqs, uint32_t nseq, uint32_t layer,
		  const void *q, unsigned mem, const struct kvtier_select_params *p,
		  struct kvtier_table *t)
{
	if (!seqs || !q || !p || !t || t->c != c || !nseq || nseq > t->max_seqs ||
	    layer >= c->layout.layers)
		return -EINVAL;
	const uint32_t H = c->layout.kv_heads, T = c->layout.page_tokens;
	const size_t rows = (size_t)nseq * H;
	const size_t qbytes = rows * c->layout.group * c->row;
	pthread_mutex_lock(&c->lock);
	int ret = 0;
	uint32_t max_pages = 0;
	for (uint32_t b = 0; b < nseq && !ret; b++) {
		struct live_seq *l = live_get(c, seqs[b]);
		if (!l)
			ret = -ENOENT;
		else if ((ret = flush_layer(c, l, layer)) < 0)
			break;
		else if (l->ntok[layer] / T > max_pages)
			max_pages = l->ntok[layer] / T;
	}
	/* room for whatever the daemon may pick: budget, forced pages, a dense layer */
	uint32_t stride = p->budget_pages;
	uint32_t forced = (p->sink_tokens + T - 1) / T + p->window_tokens / T + 1;
	if (stride < forced)
		stride = forced;
	if (layer < c->layout.dense_layers && stride < max_pages)
		stride = max_pages;
	if (!stride)
		stride = 1;
	uint64_t qoff = ((uint64_t)nseq * 4 + 63) & ~63ull;
	uint64_t ooff = (qoff + qbytes + 63) & ~63ull;
	uint64_t obytes = rows * (2 * (uint64_t)stride + 2) * sizeof(int32_t);
	if (!ret && ooff + obytes > c->req_bytes)
		ret = -EMSGSIZE;
	if (!ret && t->queued) { /* an attend queued on the table still reads it */
		ret = c->dev->ops->fence_wait(c->dev, c->fence);
		t->queued = false;
	}
	if (!ret && t->up_pending) { /* the last select's copies still read the host side */
		ret = c->dev->ops->fence_wait(c->dev, t->up);
		t->up_pending = false;
	}
	if (!ret)
		ret = table_cells(c, t, rows * stride);
	if (ret)
		goto out;
	const uint64_t t0 = c->timing ? mono_ns() : 0;
	memcpy(c->data, seqs, nseq * sizeof(uint32_t));
	if (mem & KVT_MEM_DEVICE)
		ret = kvt_compute_download(c->cc, c->data + qoff, q, qbytes);
	else
		memcpy(c->data + qoff, q, qbytes);
	if (ret)
		goto out;
	unsigned fl = (p->top_p_mode ? KVT_SEL_TOPP : 0) | (c->host_dev ? KVT_SEL_HOST : 0) |
		      ((p->flags & KVTIER_SEL_SUBSTITUTE) ? KVT_SEL_SUBST : 0) |
		      (c->copy_fence ? KVT_SEL_FENCED : 0);
	struct kvt_sqe r = {.op = KVT_OP_SELECT, .flags = (uint8_t)fl,
			    .layer = (uint16_t)layer, .seq = nseq, .budget = p->budget_pages,
			    .off = {0, qoff, ooff}, .out_stride = stride,
			    .sink_tokens = p->sink_tokens, .window_tokens = p->window_tokens,
			    .top_p = p->top_p, .ntok = c->attend_us};
	c->attend_us = 0;
	struct kvt_cqe e;
	const uint64_t t1 = c->timing ? mono_ns() : 0;
	if ((ret = call(c, &r, &e)) < 0)
		goto out;
	const uint64_t t2 = c->timing ? mono_ns() : 0;
	const int32_t *tab = (const int32_t *)(c->data + ooff);
	const int32_t *n_out = tab + rows * stride, *tail = n_out + rows;
	const int32_t *pages = tail + rows;
	const uint64_t nslots = c->w.pool_bytes / c->w.slot_bytes;
	const uint64_t nhost = c->w.host_bytes / c->w.host_stride;
	for (size_t row = 0; row < rows && !ret; row++) {
		struct live_seq *l = live_get(c, seqs[row / H]);
		uint32_t want_tail = l->ntok[layer] % T;
		if (n_out[row] < 0 || (uint32_t)n_out[row] > stride || tail[row] != (int32_t)want_tail)
			ret = -EPROTO;
		for (int32_t j = 0; j < n_out[row] && !ret; j++) {
			int32_t v = tab[row * stride + j], pg = pages[row * stride + j];
			if (pg < 0 || (uint32_t)pg >= l->ntok[layer] / T || v < 0 ||
			    ((v & KVT_SLOT_HOST) ? !c->host_dev ||
						   (uint64_t)(v & ~KVT_SLOT_HOST) >= nhost
						 : (uint64_t)v >= nslots))
				ret = -EPROTO;
		}
		t->n_pages[row] = n_out[row];
		t->tail_len[row] = (int32_t)want_tail;
		t->tail_slot[row] = want_tail ? (int32_t)tail_slot(c, (uint32_t)c->live_of[seqs[row / H]],
								      layer, (uint32_t)(row % H))
					      : -1;
	}
	/*
	 * Slots whose copies are under way: on a GPU the backend's stream waits for them
	 * (the table's copies and kvtier_attend queue behind, kvtier_attend_async and
	 * kvtier_table_ready wait for t->up, recorded after); on cpu, here.
	 */
	if (!ret && (e.flags & KVT_CQE_COPIES))
		ret = !c->copy_fence ? -EPROTO
		      : c->gpu	     ? c->dev->ops->fence_stream_wait(c->dev, c->copy_fence,
								 kvt_compute_stream(c->cc))
				     : copies_wait(c);
	if (ret)
		goto out;
	memcpy(t->slots, tab, rows * stride * sizeof(int32_t));
	memcpy(t->pages, pages, rows * stride * sizeof(int32_t));
	t->fast = false;
	t->rows = (uint32_t)rows;
	t->stride = stride;
	t->layer = layer;
	/*
	 * Host and backend arrays are both n_pages | tail_len | tail_slot of max_seqs rows.
	 * Queued, not waited for: a synchronous copy here waited ~200 us on the H100 while the
	 * daemon's work held the device (kvtier-bench at 128K, KVTIER_TIMING).
	 */
	ret = kvt_compute_copy_async(c->cc, t->d_slots, t->slots, rows * stride * sizeof(int32_t),
				     NULL);
	if (ret == 0)
		ret = kvt_compute_copy_async(c->cc, t->d_n_pages, t->n_pages,
					     (size_t)t->max_seqs * H * 3 * sizeof(int32_t), NULL);
	if (ret == 0)
		ret = c->dev->ops->fence_record(c->dev, t->up, kvt_compute_stream(c->cc));
	if (ret == 0)
		t->up_pending = true;
	else
		kvt_compute_sync(c->cc, NULL); /* nothing queued may still read the host side */
	if (c->timing) {
		c->sel_n++;
		c->sel_ns[0] += t1 - t0;
		c->sel_ns[1] += t2 - t1;
		c->sel_ns[2] += mono_ns() - t2;
	}
out:
	pthread_mutex_unlock(&c->lock);
	return ret < 0 ? ret : 0;
}

/* An entry of the feedback ring (wire.h, KVT_OP_FEEDBACK): its offset in the data area
 * and the ring bytes it takes, or -1 while the daemon has not caught up. */
static int64_t fb_alloc(struct kvtier_client *c, uint64_t size, uint32_t *taken)
{
	size = (size + 63) & ~63ull;
	if (size > c->fb_bytes / 2)
		return -1;
	const uint64_t done = kvt_load_acquire(&c->hdr->fb_done);
	const uint64_t at = c->fb_head % c->fb_bytes;
	const uint64_t skip = at + size > c->fb_bytes ? c->fb_bytes - at : 0;
	if (c->fb_head + skip + size - done > c->fb_bytes)
		return -1;
	c->fb_head += skip + size;
	*taken = (uint32_t)(skip + size);
	return (int64_t)(c->fb_off + (skip ? 0 : at));
}

/*
 * KVTIER_SEL_ESTIMATE: the estimate over every full page, on the client's estimate
 * stream once the staging copy (t->up) has run, so that it runs beside the selection;
 * the attend takes the table's pages out of it (estimate_queue). On the caller's stream
 * where there is no other (cpu: at once).
 */
static int estimate_all(struct kvtier_client *c, struct kvtier_table *t, const void *q,
			uint32_t rows, uint32_t smax, float scale, void *stream)
{
	const size_t mr = (size_t)t->max_seqs * c->layout.kv_heads;
	if (!c->est_cc && !strcmp(kvt_compute_name(c->cc), "cuda") &&
	    kvt_compute_open("cuda", &c->est_cc) < 0)
		c->est_cc = NULL; /* then on the caller's stream */
	void *side = c->est_cc ? kvt_compute_stream(c->est_cc) : NULL;
	struct kvt_estimate_args e = {
		.g = c->geom, .rows = rows, .max_pages = smax, .scale = scale, .q = q,
		.summaries = c->fast.ptr, .row_base = t->d_fin + mr, .n_full = t->d_fin,
		.est = t->d_est, .work = t->d_est_work, .sync = t->d_est_sync};
	int ret;
	t->est_all = t->est_taken = false;
	if (side == stream || !side)
		ret = kvt_estimate(c->cc, &e, stream);
	else if ((ret = c->dev->ops->fence_stream_wait(c->dev, t->up, side)) == 0 &&
		 (ret = kvt_estimate(c->cc, &e, side)) == 0 &&
		 (ret = c->dev->ops->fence_record(c->dev, t->est_done, side)) == 0) {
		t->est_pending = true;
		t->est_joined = NULL;
	}
	if (ret == 0) {
		t->est_all = true;
		t->est_scale = scale;
	}
	return ret;
}

int kvtier_select_async(struct kvtier_client *c, const uint32_t *seqs, uint32_t nseq,
			uint32_t layer, const void *q, const struct kvtier_select_params *p,
			struct kvtier_table *t, void *stream)
{
	if (!c || !seqs || !q || !p || !t || t->c != c || !nseq || nseq > t->max_seqs ||
	    layer >= c->layout.layers)
		return -EINVAL;
	const uint32_t H = c->layout.kv_heads, T = c->layout.page_tokens;
	const size_t rows = (size_t)nseq * H, mr = (size_t)t->max_seqs * H;
	const uint64_t t0 = c->timing ? mono_ns() : 0;
	pthread_mutex_lock(&c->lock);
	pend_kick(c); /* pages in flight whose copies have landed: to the daemon */
	/* the map names host slots too: read in place, so the host arena must be mapped */
	bool fast = c->fast.ptr && c->host_dev && layer >= c->layout.dense_layers;
	uint32_t smax = 1;
	int ret = 0;
	for (uint32_t b = 0; b < nseq && !ret; b++) {
		struct live_seq *l = live_get(c, seqs[b]);
		if (!l) {
			ret = -ENOENT;
			break;
		}
		uint32_t n = l->ntok[layer] / T;
		if (!l->fast_ok || seqs[b] >= c->w.fast_seqs || n > c->w.fast_pages)
			fast = false;
		smax = n > smax ? n : smax;
	}
	if (!ret && !fast) { /* through the daemon, the queries as the stream leaves them */
		pthread_mutex_unlock(&c->lock);
		ret = kvt_compute_sync(c->cc, stream);
		return ret < 0 ? ret : kvtier_select(c, seqs, nseq, layer, q, KVT_MEM_DEVICE, p, t);
	}
	uint32_t stride = p->budget_pages;
	uint32_t forced = (p->sink_tokens + T - 1) / T + p->window_tokens / T + 1;
	stride = stride < forced ? forced : stride ? stride : 1;
	/* no row has more full pages than the fast path covers (the daemon's bound on a
	 * report): a budget past them selects them all */
	if (stride > c->w.fast_pages)
		stride = c->w.fast_pages ? c->w.fast_pages : 1;
	const uint32_t budget = p->budget_pages < stride ? p->budget_pages : stride;
	if (!ret && t->queued && t->done_stream != stream) /* an attend queued on it reads it */
		ret = c->dev->ops->fence_stream_wait(c->dev, c->fence, stream);
	t->queued = false;
	/* a select through the daemon before: its copies may still read the host side (a
	 * fast one's staging was read when it was queued) */
	if (!ret && t->up_pending && !t->fast) {
		ret = c->dev->ops->fence_wait(c->dev, t->up);
		t->up_pending = false;
	}
	if (ret || (ret = table_cells(c, t, rows * stride)) < 0 ||
	    (ret = ensure_dev(c, (void **)&t->d_sel, &t->sel_bytes, rows * stride * 4)) < 0 ||
	    (ret = ensure_dev(c, (void **)&t->d_pages, &t->page_bytes, rows * stride * 4)) < 0 ||
	    (ret = ensure_dev(c, (void **)&t->d_scores, &t->score_bytes, rows * smax * 4)) < 0)
		goto out;
	const bool est = p->flags & KVTIER_SEL_ESTIMATE;
	if (est) {
		const size_t ge = (size_t)c->layout.group * (c->layout.head_dim + 2);
		const size_t sync_bytes = mr * c->layout.group * sizeof(uint32_t);
		if ((ret = ensure_dev(c, (void **)&t->d_est, &t->est_bytes, rows * ge * 4)) < 0 ||
		    (ret = ensure_dev(c, (void **)&t->d_est_work, &t->est_work_bytes,
				      kvt_estimate_work_bytes(&c->geom, (uint32_t)rows, smax))) < 0)
			goto out;
		if (!t->d_est_sync) { /* for the most rows this table takes, zeroed once */
			if ((ret = ensure_dev(c, (void **)&t->d_est_sync, &t->est_sync_bytes,
					      sync_bytes)) < 0 ||
			    (ret = kvt_compute_memset(c->cc, t->d_est_sync, 0, sync_bytes)) < 0) {
				kvt_compute_free(c->cc, t->d_est_sync);
				t->d_est_sync = NULL;
				t->est_sync_bytes = 0;
				goto out;
			}
		}
	}
	if (!t->fin && (ret = kvt_compute_host_alloc(c->cc, 5 * mr * sizeof(int32_t),
						     (void **)&t->fin)) < 0)
		goto out;
	/* the device's copy, then two words for resolve's blocks (zero between calls) */
	if (!t->d_fin && (ret = kvt_compute_alloc(c->cc, (5 * mr + 2) * sizeof(int32_t),
						  (void **)&t->d_fin)) < 0)
		goto out;
	if (!t->sync_zeroed) {
		if ((ret = kvt_compute_memset(c->cc, t->d_fin + 5 * mr, 0, 2 * sizeof(int32_t))) < 0)
			goto out;
		t->sync_zeroed = true;
	}
	/* [n full pages | row base | tail_len | tail_slot | n selected] */
	for (size_t row = 0; row < rows; row++) {
		struct live_seq *l = live_get(c, seqs[row / H]);
		/* a full page in flight is still the tail: attended from its tail slot */
		const bool fl = in_flight(c, l, layer);
		const uint32_t h = (uint32_t)(row % H), tl = fl ? T : l->ntok[layer] % T;
		t->fin[row] = (int32_t)(l->ntok[layer] / T - fl);
		t->fin[mr + row] = (int32_t)((((size_t)layer * c->w.fast_seqs + seqs[row / H]) * H + h) *
					     c->w.fast_pages);
		t->fin[2 * mr + row] = (int32_t)tl;
		t->fin[3 * mr + row] = tl ? (int32_t)tail_slot(c, (uint32_t)c->live_of[seqs[row / H]],
							       layer, h)
					  : -1;
	}
	/* the report of what was selected, for the daemon's leases */
	const uint64_t t1 = c->timing ? mono_ns() : 0;
	uint32_t taken = 0;
	const uint64_t seq_at = 64 + (3 * rows + rows * stride) * sizeof(int32_t);
	int64_t fb = fb_alloc(c, seq_at + nseq * sizeof(uint32_t), &taken);
	const uint32_t token = ++c->fb_token ? c->fb_token : ++c->fb_token;
	uint32_t *entry = fb >= 0 ? (uint32_t *)(c->data + fb) : NULL;
	if (entry) {
		/* posted before the kernels: a wait for pages (on the cpu device, inside the
		 * resolve call) needs the daemon to have the entry; it reads it once the token
		 * is in */
		__atomic_store_n(&entry[0], 0, __ATOMIC_RELAXED);
		__atomic_store_n(&entry[2], token - 1, __ATOMIC_RELAXED); /* the ack: not yet */
		memcpy(c->data + fb + seq_at, seqs, nseq * sizeof(uint32_t));
		struct kvt_sqe r = {.op = KVT_OP_FEEDBACK, .layer = (uint16_t)layer, .seq = nseq,
				    .user_data = token, .ntok = taken, .out_stride = stride,
				    .budget = p->wait_us < 0 ? 0 : p->wait_us ? (uint32_t)p->wait_us
									: KVTIER_WAIT_US,
				    .off = {(uint64_t)fb + seq_at, (uint64_t)fb}};
		if (!post(c, &r)) {
			c->fb_head -= taken; /* the last entry handed out: taken back */
			entry = NULL;
		}
	}
	c->fb_dropped += !entry;
	const uint64_t t2 = c->timing ? mono_ns() : 0;
	const size_t in = 5 * mr * sizeof(int32_t);
	struct kvt_score_args sc = {.g = c->geom, .method = KVT_SCORE_QUEST, .agg = KVT_GQA_MAX,
				    .rows = (uint32_t)rows, .stride = smax, .q = q,
				    .summaries = c->fast.ptr, .n_pages = t->d_fin,
				    .scores = t->d_scores, .row_base = t->d_fin + mr};
	struct kvt_select_args se = {
		.mode = p->top_p_mode ? KVT_SELECT_TOPP : KVT_SELECT_TOPK, .rows = (uint32_t)rows,
		.stride = smax, .out_stride = stride, .budget_pages = budget,
		.page_tokens = T, .sink_tokens = p->sink_tokens, .window_tokens = p->window_tokens,
		.top_p = p->top_p, .logit_scale = 1.0f / sqrtf((float)c->layout.head_dim),
		.scores = t->d_scores, .n_pages = t->d_fin, .tail_len = t->d_fin + 2 * mr,
		.out = t->d_sel, .n_out = t->d_fin + 4 * mr};
	struct kvt_resolve_args rs = {
		.rows = (uint32_t)rows, .stride = stride, .sel = t->d_sel, .n_sel = t->d_fin + 4 * mr,
		.map = (const int32_t *)((const uint8_t *)c->fast.ptr + c->w.fast_map_off),
		.row_base = t->d_fin + mr, .table = t->d_slots, .pages = t->d_pages,
		.n_table = t->d_n_pages, .report = entry ? (int32_t *)(entry + 16) : NULL,
		.ready = entry, .token = token, .sync = (uint32_t *)(t->d_fin + 5 * mr)};
	if (entry && p->wait_us >= 0) { /* pages that matter and are missing: waited for */
		rs.ack = entry + 2;
		rs.wait_ns = (uint64_t)(p->wait_us ? p->wait_us : KVTIER_WAIT_US) * 1000u;
	}
	if (p->host_gap >= 0) { /* host pages read in place only where they may matter */
		rs.scores = t->d_scores;
		rs.score_stride = smax;
		rs.n_full = t->d_fin;
		rs.sink_pages = (p->sink_tokens + T - 1) / T;
		rs.window_pages = p->window_tokens / T;
		rs.host_gap = (p->host_gap > 0 ? p->host_gap : KVTIER_HOST_GAP) /
			      se.logit_scale; /* nats to q.k */
	}
	/* the last select's estimate beside it may still read the device's copy, unless
	 * this stream waited for it already (the attend of that select, as a rule) */
	void *ds = stream ? stream : kvt_compute_stream(c->cc);
	if (t->est_pending && stream != kvt_compute_stream(c->est_cc) && t->est_joined != ds &&
	    (ret = c->dev->ops->fence_stream_wait(c->dev, t->est_done, ds)) == 0)
		t->est_joined = ds;
	/* the staging in a kernel's parameters: a copy here cost ~10 us a layer on the H100
	 * (the copy engine's turnaround either side of it, tools/trace_steps.py) */
	if (ret < 0 || (ret = kvt_compute_put_async(c->cc, t->d_fin, t->fin, in, stream)) < 0 ||
	    (ret = c->dev->ops->fence_record(c->dev, t->up, stream)) < 0 ||
	    (est && (ret = estimate_all(c, t, q, (uint32_t)rows, smax, se.logit_scale, stream)) < 0) ||
	    (ret = kvt_score(c->cc, &sc, stream)) < 0 ||
	    (ret = kvt_select_resolve(c->cc, &se, &rs, stream)) < 0) {
		kvt_compute_sync(c->cc, stream); /* nothing queued may still read the staging */
		if (entry) { /* the daemon waits for the report: an empty one (nothing selected) */
			memset(entry + 16, 0, 3 * rows * sizeof(int32_t));
			__atomic_store_n(&entry[1], 0, __ATOMIC_RELAXED);
			__atomic_store_n(&entry[0], token, __ATOMIC_RELEASE);
		}
	} else {
		t->up_pending = true;
	}
	if (c->timing) {
		if (c->timing_sync && ret == 0)
			kvt_compute_sync(c->cc, stream);
		c->fast_n[1]++;
		c->fast_ns[1] += t1 - t0;
		c->fast_ns[2] += t2 - t1;
		c->fast_ns[3] += mono_ns() - t2;
	}
	if (ret == 0) {
		t->fast = true;
		t->fast_seen = false;
		t->estimate = est;
		t->smax = smax;
		t->stream = stream;
		t->rows = (uint32_t)rows;
		t->stride = stride;
		t->layer = layer;
	}
out:
	pthread_mutex_unlock(&c->lock);
	return ret;
}

/* The read fence recorded, then counted (wire.h: the fast path's leases wait for two). */
static int fence_record(struct kvtier_client *c, void *stream)
{
	int ret = c->dev->ops->fence_record(c->dev, c->fence, stream);
	if (ret == 0)
		__atomic_add_fetch(&c->hdr->fence_seq, 1, __ATOMIC_RELEASE);
	return ret;
}

/*
 * KVTIER_SEL_ESTIMATE: the pages a fast table leaves out, estimated from the summaries
 * on stream before the attention, which merges t->d_est (a->est).
 */
static int estimate_queue(struct kvtier_client *c, struct kvtier_table *t, const void *q,
			  float scale, struct kvt_attend_args *a, void *stream)
{
	if (!t->fast || !t->estimate)
		return 0;
	const size_t mr = (size_t)t->max_seqs * c->layout.kv_heads;
	struct kvt_estimate_args e = {
		.g = c->geom, .rows = t->rows, .max_pages = t->smax, .scale = scale, .q = q,
		.summaries = c->fast.ptr, .row_base = t->d_fin + mr, .n_full = t->d_fin,
		.stride = t->stride, .sel = t->d_pages, .n_sel = t->d_n_pages, .est = t->d_est,
		.work = t->d_est_work, .sync = t->d_est_sync};
	int ret = 0;
	/* NULL: the backend's own stream, which the device names by its handle */
	void *ds = stream ? stream : kvt_compute_stream(c->cc);
	/* the estimate over every page the select started: the table's pages taken out
	 * (distinct, ascending) once; another scale than the select's needs a whole one */
	const bool sub = t->est_all && t->est_scale == scale;
	if (sub && t->est_taken) { /* a second attend: behind the first's (its fence) */
		if (stream != t->est_stream && c->fence)
			ret = c->dev->ops->fence_stream_wait(c->dev, c->fence, ds);
		if (ret == 0)
			a->est = t->d_est;
		return ret;
	}
	/* either way behind the select's estimate (its buffers are the same), and a whole
	 * one behind an attend of this table on another stream */
	if (t->est_pending && t->est_joined != ds &&
	    (ret = c->dev->ops->fence_stream_wait(c->dev, t->est_done, ds)) == 0)
		t->est_joined = ds;
	if (ret == 0 && !sub && t->queued && t->done_stream != stream && c->fence)
		ret = c->dev->ops->fence_stream_wait(c->dev, c->fence, ds);
	e.subtract = sub;
	if (ret == 0)
		ret = kvt_estimate(c->cc, &e, stream);
	if (ret == 0 && e.subtract) {
		t->est_taken = true;
		t->est_stream = stream;
	}
	if (ret == 0)
		a->est = t->d_est;
	return ret;
}

/* The attention over a table: the backend's copies of it and of the tails. */
static void attend_args(const struct kvtier_client *c, const struct kvtier_table *t,
			const void *q, void *out, float *lse, float scale,
			struct kvt_attend_args *a)
{
	size_t mr = (size_t)t->max_seqs * c->layout.kv_heads;
	*a = (struct kvt_attend_args){
		.g = c->geom, .rows = t->rows, .stride = t->stride, .scale = scale, .q = q,
		.pool = c->pool.ptr, .slot_bytes = c->w.slot_bytes, .table = t->d_slots,
		.n_pages = t->d_n_pages, .tail_slot = t->fast ? t->d_fin + 3 * mr : t->d_n_pages + 2 * mr,
		.tail_len = t->fast ? t->d_fin + 2 * mr : t->d_n_pages + mr, .out = out, .lse = lse,
		.tail_pool = c->tail_dev,
		.host_pool = c->host_dev ? (const uint8_t *)c->host_dev + c->w.host_headroom : NULL,
		.host_slot_bytes = c->w.host_stride,
	};
}

int kvtier_attend(struct kvtier_client *c, const struct kvtier_table *t, const void *q, void *out,
		  float *lse, float scale, unsigned mem)
{
	if (!t || t->c != c || !q || !out || !t->rows)
		return -EINVAL;
	const size_t qbytes = (size_t)t->rows * c->layout.group * c->row;
	const size_t lbytes = (size_t)t->rows * c->layout.group * sizeof(float);
	const bool host_io = !(mem & KVT_MEM_DEVICE) && c->gpu;
	pthread_mutex_lock(&c->lock);
	int ret = 0;
	const void *qd = q;
	void *od = out;
	float *ld = lse;
	if (host_io) {
		if ((ret = ensure_dev(c, &c->q_dev, &c->q_dev_bytes, qbytes)) < 0 ||
		    (ret = ensure_dev(c, &c->out_dev, &c->out_dev_bytes, qbytes)) < 0 ||
		    (lse && (ret = ensure_dev(c, (void **)&c->lse_dev, &c->lse_dev_bytes, lbytes)) < 0) ||
		    (ret = kvt_compute_upload(c->cc, c->q_dev, q, qbytes)) < 0)
			goto out;
		qd = c->q_dev;
		od = c->out_dev;
		ld = lse ? c->lse_dev : NULL;
	}
	struct kvt_attend_args a;
	attend_args(c, t, qd, od, ld, scale, &a);
	const uint64_t t0 = mono_ns();
	/* the table's own: the estimate's pages are taken out of it once */
	if ((ret = estimate_queue(c, (struct kvtier_table *)t, qd, scale, &a, NULL)) < 0 ||
	    (ret = kvt_attend(c->cc, &a, NULL)) < 0 || (ret = kvt_compute_sync(c->cc, NULL)) < 0)
		goto out;
	uint64_t us = (mono_ns() - t0) / 1000;
	c->attend_us = us < 1 ? 1 : us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
	if (host_io && ((ret = kvt_compute_download(c->cc, out, c->out_dev, qbytes)) < 0 ||
			(lse && (ret = kvt_compute_download(c->cc, lse, c->lse_dev, lbytes)) < 0)))
		goto out;
out:
	pthread_mutex_unlock(&c->lock);
	return ret;
}

int kvtier_attend_async(struct kvtier_client *c, struct kvtier_table *t, const void *q, void *out,
			float *lse, float scale, void *stream)
{
	if (!t || t->c != c || !q || !out || !t->rows)
		return -EINVAL;
	const uint64_t t0 = c->timing ? mono_ns() : 0;
	pthread_mutex_lock(&c->lock);
	struct kvt_device *dev = c->dev;
	int ret = 0;
	struct kvt_attend_args a;
	attend_args(c, t, q, out, lse, scale, &a);
	/* the table's copies: the select's stream (fast path) or the backend's; on that
	 * stream the attend runs after them anyway */
	if (t->up_pending && stream != (t->fast ? t->stream : kvt_compute_stream(c->cc)))
		ret = dev->ops->fence_stream_wait(dev, t->up, stream);
	if (ret == 0)
		ret = estimate_queue(c, t, q, scale, &a, stream);
	if (ret == 0)
		ret = kvt_attend(c->cc, &a, stream);
	if (ret == 0 && !c->fence) { /* no fence: the daemon must not find it running */
		ret = kvt_compute_sync(c->cc, stream);
	} else if (ret == 0 && (ret = fence_record(c, stream)) == 0) {
		t->queued = true;
		t->done_stream = stream;
		c->layer_queued[t->layer] = true;
		c->layer_stream[t->layer] = stream;
	}
	if (c->timing) {
		if (c->timing_sync)
			kvt_compute_sync(c->cc, stream);
		c->fast_n[2]++;
		c->fast_ns[4] += mono_ns() - t0;
	}
	pthread_mutex_unlock(&c->lock);
	return ret;
}

int kvtier_table_ready(struct kvtier_client *c, const struct kvtier_table *t, void *stream)
{
	if (!c || !t || t->c != c)
		return -EINVAL;
	pthread_mutex_lock(&c->lock);
	/* t->up follows the copy fence's wait on the backend's stream (kvtier_select) */
	int ret = t->up_pending ? c->dev->ops->fence_stream_wait(c->dev, t->up, stream) : 0;
	pthread_mutex_unlock(&c->lock);
	return ret;
}

int kvtier_reads_fence(struct kvtier_client *c, void *stream)
{
	if (!c)
		return -EINVAL;
	pthread_mutex_lock(&c->lock);
	int ret = c->fence ? fence_record(c, stream) : kvt_compute_sync(c->cc, stream);
	pthread_mutex_unlock(&c->lock);
	return ret;
}

void kvtier_reads_hold(struct kvtier_client *c)
{
	__atomic_add_fetch(&c->hdr->reads_held, 1, __ATOMIC_SEQ_CST);
}

void kvtier_reads_release(struct kvtier_client *c)
{
	__atomic_sub_fetch(&c->hdr->reads_held, 1, __ATOMIC_SEQ_CST);
}

int kvtier_nop(struct kvtier_client *c)
{
	struct kvt_sqe r = {.op = KVT_OP_NOP};
	struct kvt_cqe e;
	pthread_mutex_lock(&c->lock);
	int ret = call(c, &r, &e);
	pthread_mutex_unlock(&c->lock);
	return ret;
}

int kvtier_ping(struct kvtier_client *c)
{
	struct kvt_msg_hdr h = {.magic = KVT_WIRE_MAGIC, .version = KVT_WIRE_VERSION,
				.type = KVT_MSG_PING};
	pthread_mutex_lock(&c->lock);
	int ret = 0;
	if (send(c->sock, &h, sizeof(h), MSG_NOSIGNAL) != sizeof(h))
		ret = -ECONNRESET;
	else if (recv(c->sock, &h, sizeof(h), MSG_WAITALL) != sizeof(h) || h.type != KVT_MSG_PONG)
		ret = -ECONNRESET;
	pthread_mutex_unlock(&c->lock);
	return ret;
}
