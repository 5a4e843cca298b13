// SPDX-License-Identifier: MIT
/*
 * The engine: a client's sequences, the pages they append, the summaries of those
 * pages and the selections over them. Requests arrive here already copied out of the
 * client's ring; every id and length in them is checked against that client's own
 * tables before it is used.
 */
#include "kvtierd.h"
#include "daemon/alloc.h"
#include "daemon/log.h"
#include "tiers/device.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static size_t esize(const struct kvd_client *c)
{
	return kvt_dtype_size(c->layout.dtype);
}

/* ---- scratch memory in the compute backend ---- */

static void *scratch(struct kvd *d, enum kvd_scratch_id id, size_t bytes)
{
	struct kvd_scratch *s = &d->scr[id];
	if (s->bytes >= bytes)
		return s->p;
	if (s->p)
		kvt_compute_free(d->cc, s->p);
	size_t n = bytes < 4096 ? 4096 : bytes + bytes / 2;
	if (kvt_compute_alloc(d->cc, n, &s->p) < 0) {
		s->p = NULL;
		s->bytes = 0;
		return NULL;
	}
	s->bytes = n;
	return s->p;
}

/* Pinned host staging of the select's copies: [0] what goes up, [1] what comes back. */
static void *pinned(struct kvd *d, int i, size_t bytes)
{
	if (d->pin_bytes[i] >= bytes)
		return d->pin[i];
	kvt_compute_host_free(d->cc, d->pin[i]);
	d->pin[i] = NULL;
	d->pin_bytes[i] = 0;
	size_t n = bytes < 65536 ? 65536 : bytes + bytes / 2;
	if (kvt_compute_host_alloc(d->cc, n, &d->pin[i]) < 0)
		return d->pin[i] = NULL;
	d->pin_bytes[i] = n;
	return d->pin[i];
}

/* ---- summary records ---- */

static int rec_alloc(struct kvd_client *c, uint32_t n, int32_t *out)
{
	struct kvd *d = c->d;
	uint64_t avail = c->sum_nfree + (uint64_t)(c->sum_cap - c->sum_used);
	if (avail < n) {
		/* 0: a record for every page the disk holds (a page anywhere is on the disk
		 * or on its way there) */
		uint64_t limit = d->cfg.summary_bytes ? d->cfg.summary_bytes / c->rec_bytes
						      : d->cfg.nvme_bytes / d->cfg.page_bytes + 1024;
		uint64_t ncap = c->sum_cap ? (uint64_t)c->sum_cap * 2 : 1024;
		if (ncap < (uint64_t)c->sum_used + n)
			ncap = (uint64_t)c->sum_used + n;
		if (ncap > limit)
			ncap = limit;
		if (ncap > INT32_MAX)
			ncap = INT32_MAX;
		if (ncap < (uint64_t)c->sum_used + n - c->sum_nfree) {
			kvt_warn("engine", "client %u: summary pool full (%u records of %zu bytes; "
				 "tenant.summary_bytes %llu)", c->id, c->sum_cap, c->rec_bytes,
				 (unsigned long long)d->cfg.summary_bytes);
			return -ENOSPC;
		}
		void *np;
		int ret = kvt_compute_alloc(d->cc, ncap * c->rec_bytes, &np);
		if (ret < 0)
			return ret;
		int32_t *nf = kvt_realloc(c->sum_free, ncap * sizeof(int32_t));
		if (!nf) {
			kvt_compute_free(d->cc, np);
			return -ENOMEM;
		}
		c->sum_free = nf;
		/* the records so far, device to device (through the host, a pool of 2^20 records
		 * of 2 KiB held a decode step for a second, H100) */
		if (c->sum_used &&
		    (kvt_compute_copy_async(d->cc, np, c->sum_pool, (size_t)c->sum_used * c->rec_bytes,
					    NULL) < 0 ||
		     kvt_compute_sync(d->cc, NULL) < 0)) {
			kvt_compute_free(d->cc, np);
			return -ENOMEM;
		}
		if (c->sum_pool)
			kvt_compute_free(d->cc, c->sum_pool);
		c->sum_pool = np;
		c->sum_cap = (uint32_t)ncap;
	}
	for (uint32_t i = 0; i < n; i++)
		out[i] = c->sum_nfree ? c->sum_free[--c->sum_nfree] : (int32_t)c->sum_used++;
	return 0;
}

static void rec_release(struct kvd_client *c, const int32_t *r, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++)
		c->sum_free[c->sum_nfree++] = r[i];
}

/* ---- origins (store sequences) ---- */

static struct kvd_origin *origin_new(struct kvd *d)
{
	struct kvd_origin *o = kvt_calloc(1, sizeof(*o));
	if (!o)
		return NULL;
	o->sseq = d->sseq_next++;
	o->refs = 1;
	return o;
}

static int origin_add_recs(struct kvd_origin *o, const int32_t *r, uint32_t n)
{
	if (o->nrecs + n > o->rcap) {
		uint32_t nc = o->rcap ? o->rcap * 2 : 256;
		while (nc < o->nrecs + n)
			nc *= 2;
		int32_t *p = kvt_realloc(o->recs, nc * sizeof(int32_t));
		if (!p)
			return -ENOMEM;
		o->recs = p;
		o->rcap = nc;
	}
	memcpy(o->recs + o->nrecs, r, n * sizeof(int32_t));
	o->nrecs += n;
	return 0;
}

static void drop_store_seq(struct kvd *d, uint32_t tenant, uint64_t sseq)
{
	int ret = kvt_store_drop_seq(d->store, tenant, sseq);
	if (ret == -EBUSY) {
		struct kvd_zombie *z = kvt_calloc(1, sizeof(*z));
		if (z) {
			z->tenant = tenant;
			z->sseq = sseq;
			kvt_list_add_tail(&d->zombies, &z->link);
		}
	} else if (ret < 0 && ret != -ENOENT) {
		kvt_warn("engine", "drop of sequence %llu: %s", (unsigned long long)sseq,
			 strerror(-ret));
	}
}

static void origin_put(struct kvd_client *c, struct kvd_origin *o)
{
	if (--o->refs)
		return;
	rec_release(c, o->recs, o->nrecs);
	if (o->named) {
		o->named->open = NULL; /* its pages stay, for the next open */
	} else if (o->pages) {
		drop_store_seq(c->d, c->tenant->id, o->sseq);
		c->tenant->disk_pages -= o->pages;
	}
	kvt_free(o->recs);
	kvt_free(o);
}

/* ---- the client's reads ---- */

/*
 * A select lets go of the previous step's pins, but the client's kernels may still be
 * reading those pages: an engine queues attention on its stream and selects the next
 * layer without waiting for it. Its fence (wire.h) marks the end of those reads, and
 * reads_held the reads of its own threads; until both say done, the pins let go of
 * are kept here, so no slot is reused under a running read. Only the client itself
 * could be hurt by a lie (its reads would see other pages of its tenant), so what it
 * writes is bounded, not trusted further.
 */
#define DEFERRED_MAX (1u << 20)

static bool reads_running(struct kvd_client *c)
{
	if (c->dead)
		return false; /* gone, or cut off: nothing of it left to protect */
	if (kvt_load_acquire(&c->hdr->reads_held))
		return true;
	if (!c->fence)
		return false;
	struct kvt_device *dev = kvt_store_device(c->d->store);
	int ret = dev->ops->fence_query(dev, c->fence);
	if (ret < 0 && ret != -EAGAIN) {
		kvd_client_kill(c, KVD_DISC_ERROR, "its read fence: %s", strerror(-ret));
		return false;
	}
	return ret == -EAGAIN;
}

static void deferred_release(struct kvd_client *c)
{
	for (uint32_t i = 0; i < c->ndeferred; i++)
		kvt_store_unpin(c->d->store, &c->deferred[i]);
	c->ndeferred = 0;
}

/* Before a request lets pins go: whether they wait for the client's reads. */
static void reads_check(struct kvd_client *c)
{
	c->reads_busy = reads_running(c);
	if (!c->reads_busy)
		deferred_release(c);
}

/* Each round of the loop: the pins kept for a client whose reads have ended go. */
static void reads_tick(struct kvd_client *c)
{
	if (c->ndeferred && !reads_running(c))
		deferred_release(c);
}

void kvd_client_unpin(struct kvd_client *c, const struct page_key *k)
{
	if (c->reads_busy && !c->dead) {
		if (c->ndeferred == c->defcap && c->defcap < DEFERRED_MAX) {
			uint32_t nc = c->defcap ? c->defcap * 2 : 256;
			struct page_key *p = kvt_realloc(c->deferred, nc * sizeof(*p));
			if (p) {
				c->deferred = p;
				c->defcap = nc;
			}
		}
		if (c->ndeferred < c->defcap) {
			c->deferred[c->ndeferred++] = *k;
			c->pins_deferred++;
			return;
		}
		kvd_client_kill(c, KVD_DISC_ERROR, "%u pins kept for reads that do not end "
				"(fence never complete, or reads held)", c->ndeferred);
	}
	kvt_store_unpin(c->d->store, k);
}

/* ---- sequences ---- */

static void unpin_layer(struct kvd_client *c, struct kvd_layer *L)
{
	for (uint32_t i = 0; i < L->npinned; i++)
		kvd_client_unpin(c, &L->pinned[i]);
	L->npinned = 0;
}

/* Records a pin of L's selection: taken now, or already held (kept from the last). */
static int pin_key(struct kvd *d, struct kvd_layer *L, const struct page_key *k, bool held)
{
	if (L->npinned == L->pincap) {
		uint32_t nc = L->pincap ? L->pincap * 2 : 64;
		struct page_key *p = kvt_realloc(L->pinned, nc * sizeof(*p));
		if (!p)
			return -ENOMEM;
		L->pinned = p;
		L->pincap = nc;
	}
	int ret = held ? 0 : kvt_store_pin(d->store, k);
	if (ret == -ENOENT)
		ret = -EIO; /* the store lost the page (every copy bad) */
	if (ret == 0)
		L->pinned[L->npinned++] = *k;
	return ret;
}

/*
 * The previous step's pins of one layer of a sequence, taken over by a select: the
 * pages selected again keep their pin, the others are unpinned as each row is
 * settled, before any move starts (they may make room), and what was not reached
 * (an error) at the end.
 */
struct old_pins {
	struct page_key *p;
	uint32_t n, at;
};

static void old_pins_take(struct kvd_layer *L, struct old_pins *o)
{
	*o = (struct old_pins){L->pinned, L->npinned, 0};
	L->pinned = NULL;
	L->npinned = L->pincap = 0;
}

static void old_pins_done(struct kvd_client *c, struct old_pins *o)
{
	for (; o->at < o->n; o->at++)
		kvd_client_unpin(c, &o->p[o->at]);
	kvt_free(o->p);
	o->p = NULL;
}

static bool same_key(const struct page_key *a, const struct page_key *b)
{
	return a->index == b->index && a->seq == b->seq && a->kv_head == b->kv_head &&
	       a->layer == b->layer && a->tenant == b->tenant;
}

/* Pins k, or keeps the old pin when the old pins of its head hold it; unpins the old
 * pins of the head below it. Keys come in ascending page order per head. */
static int repin(struct kvd_client *c, struct kvd_layer *L, struct old_pins *o,
		 const struct page_key *k)
{
	while (o->at < o->n && o->p[o->at].kv_head == k->kv_head && o->p[o->at].index < k->index)
		kvd_client_unpin(c, &o->p[o->at++]);
	if (o->at < o->n && same_key(&o->p[o->at], k)) {
		int ret = pin_key(c->d, L, k, true); /* the store's pin stays as it is */
		if (ret == 0)
			o->at++;
		return ret;
	}
	return pin_key(c->d, L, k, false);
}

/* The old pins of head h not selected again: unpinned once its row is settled. */
static void old_pins_head_done(struct kvd_client *c, struct old_pins *o, uint16_t h)
{
	while (o->at < o->n && o->p[o->at].kv_head == h)
		kvd_client_unpin(c, &o->p[o->at++]);
}

static int layer_reserve(struct kvd_client *c, struct kvd_layer *L, uint32_t need)
{
	if (need <= L->cap)
		return 0;
	uint32_t H = c->layout.kv_heads;
	uint32_t nc = L->cap ? L->cap * 2 : 16;
	while (nc < need)
		nc *= 2;
	struct kvd_origin **ow = kvt_realloc(L->owner, nc * sizeof(*ow));
	if (!ow)
		return -ENOMEM;
	L->owner = ow;
	int32_t *rec = kvt_malloc((size_t)H * nc * sizeof(int32_t));
	struct kvd_prev *prev = kvt_malloc((size_t)H * nc * sizeof(*prev));
	uint32_t *pfs = kvt_calloc((size_t)H * nc, sizeof(uint32_t));
	if (!rec || !prev || !pfs) {
		kvt_free(rec);
		kvt_free(prev);
		kvt_free(pfs);
		return -ENOMEM;
	}
	for (size_t i = 0; i < (size_t)H * nc; i++)
		prev[i] = (struct kvd_prev){NAN, 0};
	for (uint32_t h = 0; h < H && L->cap; h++) {
		memcpy(rec + (size_t)h * nc, L->rec + (size_t)h * L->cap, L->cap * sizeof(int32_t));
		memcpy(prev + (size_t)h * nc, L->prev + (size_t)h * L->cap, L->cap * sizeof(*prev));
		memcpy(pfs + (size_t)h * nc, L->pf_step + (size_t)h * L->cap,
		       L->cap * sizeof(uint32_t));
	}
	if (kvd_fast_layer_grow(c, L, L->cap, nc) < 0) {
		kvt_free(rec);
		kvt_free(prev);
		kvt_free(pfs);
		return -ENOMEM;
	}
	kvt_free(L->rec);
	kvt_free(L->prev);
	kvt_free(L->pf_step);
	L->rec = rec;
	L->prev = prev;
	L->pf_step = pfs;
	L->cap = nc;
	return 0;
}

static int seq_ref(struct kvd_seq *q, struct kvd_origin *o)
{
	for (uint32_t i = 0; i < q->nrefs; i++)
		if (q->refs[i] == o)
			return 0;
	struct kvd_origin **r = kvt_realloc(q->refs, (q->nrefs + 1) * sizeof(*r));
	if (!r)
		return -ENOMEM;
	q->refs = r;
	q->refs[q->nrefs++] = o;
	o->refs++;
	return 0;
}

static struct kvd_seq *seq_new(struct kvd_client *c)
{
	if (c->nseqs >= c->d->cfg.max_seqs)
		return NULL;
	uint32_t id = 0;
	while (c->seqs[id])
		id++;
	struct kvd_seq *q = kvt_calloc(1, sizeof(*q) + c->layout.layers * sizeof(struct kvd_layer));
	if (!q)
		return NULL;
	q->own = origin_new(c->d);
	q->refs = kvt_malloc(sizeof(*q->refs));
	if (!q->own || !q->refs) {
		kvt_free(q->own);
		kvt_free(q->refs);
		kvt_free(q);
		return NULL;
	}
	q->refs[0] = q->own;
	q->nrefs = 1;
	q->id = id;
	q->gen = ++c->seq_gen;
	c->seqs[id] = q;
	c->nseqs++;
	return q;
}

static int flush_pending(struct kvd_client *c, struct kvd_seq *q, uint32_t layer);

/*
 * A named sequence let go of: what the next open finds is every layer cut to the full
 * pages all of them have (the tokens of a page still filling are not kept).
 */
static void named_close(struct kvd_client *c, struct kvd_seq *q)
{
	struct kvd_named *n = q->own->named;
	uint32_t keep = UINT32_MAX;
	for (uint32_t l = 0; l < c->layout.layers; l++) {
		flush_pending(c, q, l); /* what fails here is not kept */
		if (q->layer[l].stored < keep)
			keep = q->layer[l].stored;
	}
	uint64_t cut = kvd_named_cut(c->d, n, keep);
	q->own->pages -= cut;
	c->tenant->disk_pages -= cut;
	n->pages = keep;
}

static void seq_free(struct kvd_client *c, struct kvd_seq *q)
{
	kvd_fast_seq_free(c, q);
	for (uint32_t l = 0; l < c->layout.layers; l++)
		unpin_layer(c, &q->layer[l]);
	if (q->own->named && !q->own->building)
		named_close(c, q);
	for (uint32_t l = 0; l < c->layout.layers; l++) {
		struct kvd_layer *L = &q->layer[l];
		kvt_free(L->pinned);
		kvt_free(L->owner);
		kvt_free(L->rec);
		kvt_free(L->prev);
		kvt_free(L->pf_step);
		kvt_free(L->fill);
	}
	for (uint32_t i = 0; i < q->nrefs; i++)
		origin_put(c, q->refs[i]);
	kvt_free(q->refs);
	c->seqs[q->id] = NULL;
	c->nseqs--;
	kvt_free(q);
}

struct kvd_seq *kvd_seq_get(struct kvd_client *c, uint32_t id)
{
	return id < c->d->cfg.max_seqs && c->seqs ? c->seqs[id] : NULL;
}

#define seq_get kvd_seq_get

struct page_key kvd_page_key(const struct kvd_client *c, const struct kvd_seq *q,
			     uint32_t layer, uint32_t h, uint32_t p)
{
	return (struct page_key){.tenant = c->tenant->id, .layer = (uint16_t)layer,
				 .kv_head = (uint16_t)h, .seq = q->layer[layer].owner[p]->sseq,
				 .index = p};
}

/* ---- appends ---- */

/*
 * Clients whose sockets closed are retired by the server between requests. A request
 * that waits here for room frees their sequences and pins now instead: they may be
 * what holds the room (a tenant's host arena full of pages pinned by clients just
 * killed), and the server cannot retire them until this request returns. Detaching
 * twice is harmless: client_free detaches again, finding nothing left.
 */
static void detach_dead(struct kvd *d, const struct kvd_client *self)
{
	struct kvd_client *o;
	kvt_list_for_each_entry(o, &d->clients, link)
		if (o != self && o->dead && o->seqs)
			kvd_engine_detach(o);
}

/* At most this many seals in one batch (kvd_seal_flush). */
#define SEAL_BATCH_MAX 64u

struct copy_run {
	const struct kvd_put_copy *cp;
	uint32_t bytes;
};

static void copy_one(void *arg, unsigned w, uint32_t i)
{
	const struct copy_run *r = arg;
	(void)w;
	memcpy(r->cp[i].dst, r->cp[i].src, r->bytes);
}

/*
 * The bytes of the pages seal_put reserved, into their host slots over the daemon's
 * threads (one page an item), then each page sealed in the store: written back from
 * now on. Before anything reads those pages or their sources go.
 */
static void put_copies(struct kvd_client *c)
{
	if (!c->ncopies)
		return;
	struct kvd *d = c->d;
	const uint64_t t0 = kvd_now_ns();
	struct copy_run r = {.cp = c->copies, .bytes = c->page_bytes};
	kvd_pool_run(d->pool, c->ncopies, copy_one, &r);
	for (uint32_t i = 0; i < c->ncopies; i++) {
		int ret = kvt_store_seal(d->store, &c->copies[i].k);
		if (ret < 0) /* not dropped while reserved: nothing in between runs the store's work */
			kvt_err("engine", "client %u: a page put is not sealed: %s", c->id,
				strerror(-ret));
	}
	c->ncopies = 0;
	c->page_copy_ns += kvd_now_ns() - t0;
}

/*
 * Puts the next page of a layer (head h's bytes at src + h * stride; the heads put
 * already by a seal that failed are not put again) and queues the building of its
 * summaries in the client's batch. The bytes go to the store by put_copies, with the
 * batch's (src must stay until then: the data area, or the layer's fill buffer). 0, or
 * -errno: the heads put so far are kept (sealed_heads, their bytes copied now), the rest
 * of the seal is made again by flush_pending.
 */
static int seal_put(struct kvd_client *c, struct kvd_seq *q, uint32_t layer, const uint8_t *src,
		    size_t stride)
{
	struct kvd *d = c->d;
	struct kvd_layer *L = &q->layer[layer];
	const uint32_t H = c->layout.kv_heads, pb = c->page_bytes, idx = L->stored;
	int ret = layer_reserve(c, L, idx + 1);
	if (ret < 0)
		return ret;
	for (uint32_t h = L->sealed_heads; h < H; h++) {
		struct kvd_put_copy *cp = &c->copies[c->ncopies];
		cp->k = (struct page_key){.tenant = c->tenant->id, .layer = (uint16_t)layer,
					  .kv_head = (uint16_t)h, .seq = q->own->sseq, .index = idx};
		cp->src = src + h * stride;
		ret = kvt_store_put_reserve(d->store, &cp->k, pb, &cp->dst);
		/* The host tier full of pages not yet on disk: let write-back make room.
		 * (The store runs other clients' completions meanwhile; none touches this one,
		 * and pages reserved are FILLING: kept, not written.) */
		uint64_t t0 = kvd_now_ns();
		while (ret == -EAGAIN &&
		       kvd_now_ns() - t0 < (uint64_t)d->cfg.promote_timeout_ms * 1000000ull) {
			kvt_store_run(d->store, 5);
			detach_dead(d, c);
			ret = kvt_store_put_reserve(d->store, &cp->k, pb, &cp->dst);
		}
		if (ret < 0) {
			L->sealed_heads = h;
			put_copies(c);
			return ret;
		}
		c->ncopies++;
		q->own->pages++;
		c->tenant->disk_pages++;
	}
	L->sealed_heads = H;
	int32_t *recs = c->seal_recs + (size_t)c->nseals * H;
	if ((ret = rec_alloc(c, H, recs)) < 0) {
		put_copies(c);
		return ret;
	}
	c->seals[c->nseals++] = (struct kvd_seal){.q = q, .layer = layer, .idx = idx,
						  .src = src, .stride = stride};
	L->seal_queued = true;
	return 0;
}

/* A page of whole-page append (head h at src + h * stride) into the layer's fill
 * buffer, which do_append_pages made sure of: a seal of it that failed is made again
 * from there by flush_pending. */
static void keep_in_fill(const struct kvd_client *c, struct kvd_layer *L, const uint8_t *src,
			 size_t stride)
{
	const uint32_t pb = c->page_bytes;
	if (src != L->fill)
		for (uint32_t h = 0; h < c->layout.kv_heads; h++)
			memcpy(L->fill + (size_t)h * pb, src + h * stride, pb);
}

/* A queued seal that did not finish: the layer as after a seal whose puts were made. */
static void seal_undo(struct kvd_client *c, const struct kvd_seal *e, const int32_t *recs)
{
	struct kvd_layer *L = &e->q->layer[e->layer];
	rec_release(c, recs, c->layout.kv_heads);
	L->seal_queued = false;
	keep_in_fill(c, L, e->src, e->stride);
}

int kvd_seal_flush(struct kvd_client *c)
{
	const uint32_t n = c->nseals;
	if (!n)
		return 0;
	struct kvd *d = c->d;
	const uint64_t t0 = kvd_now_ns();
	const uint32_t H = c->layout.kv_heads, pb = c->page_bytes, m = n * H;
	/* the pages, then int32 [m] slots, [m] records, [m] fast-path slots, [m] their
	 * positions: the indices in one copy up */
	uint8_t *pages = scratch(d, SCR_PAGES, (size_t)m * pb);
	int32_t *dix = scratch(d, SCR_SLOTS, 4 * (size_t)m * sizeof(int32_t));
	int32_t *hix = pinned(d, 2, 4 * (size_t)m * sizeof(int32_t));
	int ret = pages && dix && hix ? 0 : -ENOMEM;
	uint32_t nf = 0;
	for (uint32_t i = 0; i < n && ret == 0; i++) {
		const struct kvd_seal *e = &c->seals[i];
		uint8_t *dst = pages + (size_t)i * H * pb;
		if (e->stride == pb) {
			ret = kvt_compute_copy_async(d->cc, dst, e->src, (size_t)H * pb, NULL);
		} else {
			for (uint32_t h = 0; h < H && ret == 0; h++)
				ret = kvt_compute_copy_async(d->cc, dst + (size_t)h * pb,
							     e->src + h * e->stride, pb, NULL);
		}
		for (uint32_t h = 0; h < H; h++) {
			hix[i * H + h] = (int32_t)(i * H + h);
			hix[m + i * H + h] = c->seal_recs[i * H + h];
		}
		/* the fast path's copy, where the client's own kernels find it (wire.h) */
		if (kvd_fast_pos(c, e->q, e->layer, 0, e->idx) >= 0)
			for (uint32_t h = 0; h < H; h++, nf++) {
				hix[2 * m + nf] = (int32_t)(i * H + h);
				hix[3 * m + nf] = (int32_t)kvd_fast_pos(c, e->q, e->layer, h, e->idx);
			}
	}
	put_copies(c); /* on the CPU while the device copies the pages up */
	struct kvt_summarize_args a = {.g = c->geom, .pool = pages, .slot_bytes = pb,
				       .slots = dix, .records = dix + m,
				       .summaries = c->sum_pool, .n = m};
	struct kvt_summarize_args fa = a;
	fa.slots = dix + 2 * m;
	fa.records = dix + 3 * m;
	fa.summaries = c->fast.ptr;
	fa.n = nf;
	if (ret == 0)
		ret = kvt_compute_copy_async(d->cc, dix, hix, 4 * (size_t)m * sizeof(int32_t), NULL);
	if (ret == 0)
		ret = kvt_summarize(d->cc, &a, NULL);
	if (ret == 0 && nf)
		ret = kvt_summarize(d->cc, &fa, NULL);
	/* waited for after an error too: the copies read sources let go of next */
	int sret = kvt_compute_sync(d->cc, NULL);
	if (ret == 0)
		ret = sret;
	int first = ret;
	uint32_t done = 0;
	for (uint32_t i = 0; i < n; i++) {
		struct kvd_seal *e = &c->seals[i];
		struct kvd_layer *L = &e->q->layer[e->layer];
		const int32_t *recs = c->seal_recs + (size_t)i * H;
		e->res = ret < 0 ? ret : origin_add_recs(e->q->own, recs, H);
		if (e->res < 0) {
			seal_undo(c, e, recs);
			first = first < 0 ? first : e->res;
			continue;
		}
		for (uint32_t h = 0; h < H; h++)
			L->rec[(size_t)h * L->cap + e->idx] = recs[h];
		L->owner[e->idx] = e->q->own;
		L->stored++;
		L->sealed_heads = 0;
		L->seal_queued = false;
		done++;
	}
	c->seal_batches++;
	c->sealed += done;
	c->nseals = 0;
	const uint64_t t1 = kvd_now_ns();
	if (done)
		kvd_fast_sealed(c, c->seals, n);
	const uint64_t t2 = kvd_now_ns();
	c->seal_lease_ns += t2 - t1;
	for (uint32_t i = 0; i < n; i++) {
		const struct kvd_seal *e = &c->seals[i];
		if (!e->answer)
			continue;
		kvd_complete(c, e->ud, e->res < 0 ? e->res : 0, e->accepted, e->ntok);
		c->page_appends++;
		c->page_answer_ns += t2 - e->t_in;
	}
	c->seal_ns += t2 - t0; /* the answers' posting aside */
	return first;
}

/* Puts the page that just filled (or finishes a seal that failed before) and builds
 * its summaries now (those of the seals queued before it first). */
static int seal(struct kvd_client *c, struct kvd_seq *q, uint32_t layer)
{
	kvd_seal_flush(c);
	int ret = seal_put(c, q, layer, q->layer[layer].fill, c->page_bytes);
	return ret < 0 ? ret : kvd_seal_flush(c);
}

static int flush_pending(struct kvd_client *c, struct kvd_seq *q, uint32_t layer)
{
	struct kvd_layer *L = &q->layer[layer];
	if (L->seal_queued)
		kvd_seal_flush(c); /* one that fails is made again below */
	while (L->stored < L->ntok / c->layout.page_tokens) {
		int ret = seal(c, q, layer);
		if (ret < 0)
			return ret;
	}
	return 0;
}

/* Is [off, off + len) inside the client's data area? */
static bool in_data(const struct kvd_client *c, uint64_t off, uint64_t len)
{
	return off <= c->data_bytes && len <= c->data_bytes - off;
}

/* An append answered at once: after those whose seals are queued (in order). */
static void answer(struct kvd_client *c, uint64_t ud, int res, uint64_t aux0, uint64_t aux1)
{
	kvd_seal_flush(c);
	kvd_complete(c, ud, res, aux0, aux1);
}

/*
 * APPEND of a whole page (wire.h KVT_APPEND_PAGES): put from the data area as it is,
 * its summaries built with those of the appends after it (kvd_seal_flush answers it).
 */
static void do_append_pages(struct kvd_client *c, const struct kvt_sqe *r)
{
	struct kvd *d = c->d;
	const uint64_t t_in = kvd_now_ns();
	const uint32_t H = c->layout.kv_heads, T = c->layout.page_tokens, pb = c->page_bytes;
	const uint64_t stride = r->off[1];
	if (r->flags != KVT_APPEND_PAGES || r->seq >= d->cfg.max_seqs ||
	    r->layer >= c->layout.layers || r->ntok != T || stride < pb || stride > c->data_bytes ||
	    !in_data(c, r->off[0], (uint64_t)(H - 1) * stride + pb)) {
		kvd_client_kill(c, KVD_DISC_BAD_REQUEST,
				"APPEND of a page out of bounds (flags %u seq %u layer %u ntok %u off %llu "
				"stride %llu)", r->flags, r->seq, r->layer, r->ntok,
				(unsigned long long)r->off[0], (unsigned long long)stride);
		return;
	}
	struct kvd_seq *q = seq_get(c, r->seq);
	if (!q) {
		answer(c, r->user_data, -ENOENT, 0, 0);
		return;
	}
	struct kvd_layer *L = &q->layer[r->layer];
	if ((uint64_t)L->ntok + T > (uint64_t)INT32_MAX / 2) {
		answer(c, r->user_data, -EFBIG, 0, 0);
		return;
	}
	int ret = flush_pending(c, q, r->layer);
	if (ret == 0 && L->ntok % T)
		ret = -EINVAL; /* a page filling here: the client's count is not ours */
	uint64_t quota = d->cfg.disk_quota_bytes / c->page_bytes;
	if (ret == 0 && quota && c->tenant->disk_pages + H > quota)
		ret = -EDQUOT;
	/* the fill buffer, where a seal that fails keeps the page for its retry */
	if (ret == 0 && !L->fill && !(L->fill = kvt_malloc((size_t)H * pb)))
		ret = -ENOMEM;
	if (ret < 0) {
		answer(c, r->user_data, ret, 0, L->ntok);
		return;
	}
	const uint8_t *src = c->data + r->off[0];
	L->ntok += T;
	c->tokens += T;
	const uint64_t t_put = kvd_now_ns();
	if ((ret = seal_put(c, q, r->layer, src, stride)) == 0)
		c->page_put_ns += kvd_now_ns() - t_put; /* of the appends answered once sealed */
	if (ret < 0) {
		keep_in_fill(c, L, src, stride); /* its retry puts the other heads from there */
		answer(c, r->user_data, ret, T, L->ntok);
		return;
	}
	struct kvd_seal *e = &c->seals[c->nseals - 1];
	e->ud = r->user_data;
	e->accepted = T;
	e->ntok = L->ntok;
	e->answer = true;
	e->t_in = t_in;
	if (c->nseals == SEAL_BATCH_MAX)
		kvd_seal_flush(c);
}

static void do_append(struct kvd_client *c, const struct kvt_sqe *r)
{
	struct kvd *d = c->d;
	struct kvd_seq *q = seq_get(c, r->seq);
	const uint32_t H = c->layout.kv_heads, T = c->layout.page_tokens;
	const size_t row = (size_t)c->layout.head_dim * esize(c);
	const uint64_t bytes = (uint64_t)r->ntok * H * row;
	if (r->flags & KVT_APPEND_PAGES) {
		do_append_pages(c, r);
		return;
	}
	if (r->flags || r->seq >= d->cfg.max_seqs || r->layer >= c->layout.layers || !r->ntok ||
	    bytes > c->data_bytes || !in_data(c, r->off[0], bytes) || !in_data(c, r->off[1], bytes)) {
		kvd_client_kill(c, KVD_DISC_BAD_REQUEST, "APPEND out of bounds (flags %u seq %u layer %u ntok %u off %llu/%llu)",
				r->flags, r->seq, r->layer, r->ntok, (unsigned long long)r->off[0],
				(unsigned long long)r->off[1]);
		return;
	}
	if (!q) {
		kvd_complete(c, r->user_data, -ENOENT, 0, 0);
		return;
	}
	struct kvd_layer *L = &q->layer[r->layer];
	if ((uint64_t)L->ntok + r->ntok > (uint64_t)INT32_MAX / 2) {
		kvd_complete(c, r->user_data, -EFBIG, 0, 0);
		return;
	}
	int ret = flush_pending(c, q, r->layer);
	if (ret < 0) {
		kvd_complete(c, r->user_data, ret, 0, 0);
		return;
	}
	uint64_t quota = d->cfg.disk_quota_bytes / c->page_bytes;
	uint64_t more = (uint64_t)((L->ntok % T) + r->ntok) / T * H;
	if (quota && c->tenant->disk_pages + more > quota) {
		kvd_complete(c, r->user_data, -EDQUOT, 0, 0);
		return;
	}
	if (!L->fill && !(L->fill = kvt_malloc((size_t)H * c->page_bytes))) {
		kvd_complete(c, r->user_data, -ENOMEM, 0, 0);
		return;
	}
	const uint8_t *K = c->data + r->off[0], *V = c->data + r->off[1];
	uint32_t accepted = 0;
	for (uint32_t t = 0; t < r->ntok; t++) {
		size_t pos = L->ntok % T;
		for (uint32_t h = 0; h < H; h++) {
			uint8_t *page = L->fill + (size_t)h * c->page_bytes;
			memcpy(page + pos * row, K + ((size_t)t * H + h) * row, row);
			memcpy(page + ((size_t)T + pos) * row, V + ((size_t)t * H + h) * row, row);
		}
		L->ntok++;
		accepted++;
		if (L->ntok % T == 0 && (ret = seal(c, q, r->layer)) < 0)
			break;
	}
	c->tokens += accepted;
	kvd_complete(c, r->user_data, ret < 0 ? ret : 0, accepted, L->ntok);
}

/* ---- waits ---- */

static void wait_done(struct kvd_wait *w)
{
	if (w->pending)
		return;
	if (w->retry && w->c && !w->err)
		return; /* the tick retries; it finishes when nothing is left */
	if (w->c) {
		w->finish(w);
		w->c->busy = NULL;
		w->c->kicked = true;
	}
	w->release(w);
}

/* ---- selection ---- */

void kvd_pf_add(struct kvtier_prefetch_stats *to, const struct kvtier_prefetch_stats *from)
{
	uint64_t *t = (uint64_t *)to;
	const uint64_t *f = (const uint64_t *)from;
	for (size_t i = 0; i < sizeof(*to) / sizeof(uint64_t); i++)
		t[i] += f[i];
}

struct kvd_client *kvd_client_by_id(struct kvd *d, uint32_t id)
{
	struct kvd_client *c;
	kvt_list_for_each_entry(c, &d->clients, link)
		if (c->id == id)
			return c;
	return NULL;
}

static unsigned lat_bucket(uint64_t ns)
{
	uint64_t us = ns / 1000;
	unsigned b = 0;
	while (us > 1 && b < KVTIER_LAT_BUCKETS - 1) {
		us >>= 1;
		b++;
	}
	return b;
}

/* A fetch the prefetcher started: it outlives the client, so it names it by id. */
struct kvd_pf {
	struct kvd *d;
	uint32_t client;
	uint32_t bytes;
	uint8_t tier;
	bool from_disk;
	uint64_t t0;
};

static void pf_cb(void *arg, int res)
{
	struct kvd_pf *p = arg;
	struct kvd_client *c = kvd_client_by_id(p->d, p->client);
	if (p->from_disk)
		p->d->pf_disk_inflight--;
	struct kvtier_prefetch_stats *st = c ? &c->pf : &p->d->pf_gone;
	if (res == 0) {
		unsigned b = lat_bucket(kvd_now_ns() - p->t0);
		if (p->tier == TIER_GPU) {
			st->lat_gpu[b]++;
			st->bytes_h2d += p->bytes;
		} else {
			st->lat_host[b]++;
		}
		if (p->from_disk)
			st->bytes_nvme += p->bytes;
	}
	kvt_free(p);
}

/*
 * Starts bringing page p of head h to tier `to`, unless it is there or on its way.
 * *full: the tiers that had no room (nothing evictable) earlier in this plan; they are
 * not asked again, each refusal having walked their LRU lists. now: the plan's clock.
 */
static void prefetch(struct kvd_client *c, struct kvd_seq *q, struct kvd_layer *L, uint32_t h,
		     const struct page_key *k, enum tier_id to, unsigned *full, uint64_t now)
{
	struct kvd *d = c->d;
	struct kvt_page_info pi;
	if (kvt_store_page_info(d->store, k, &pi) < 0)
		return;
	unsigned have = pi.valid | pi.inflight;
	if ((have & (1u << to)) || (to == TIER_HOST && (have & (1u << TIER_GPU))))
		return;
	/* Disk reads of prefetches are bounded, so that a step's own reads do not queue
	 * behind many of them. */
	const bool disk = !(have & (1u << TIER_HOST));
	struct kvd_pf *p = NULL;
	if ((*full & (1u << to)) || (disk && (*full & (1u << TIER_HOST))) ||
	    (disk && d->pf_disk_inflight >= d->cfg.max_disk_prefetch) ||
	    !(p = kvt_malloc(sizeof(*p)))) {
		PF_ADD(c, q, prefetch_refused, 1);
		return;
	}
	*p = (struct kvd_pf){.d = d, .client = c->id, .bytes = c->page_bytes, .tier = (uint8_t)to,
			     .from_disk = disk, .t0 = now};
	int ret = kvt_store_prefetch(d->store, k, to, pf_cb, p);
	if (ret < 0) {
		kvt_free(p);
		PF_ADD(c, q, prefetch_refused, 1);
		/* no room in `to`, or in host RAM on the way from disk */
		if (ret == -EAGAIN)
			*full |= disk ? (1u << TIER_HOST) | (1u << to) : 1u << to;
		return;
	}
	d->pf_disk_inflight += disk;
	if (to == TIER_GPU)
		PF_ADD(c, q, prefetch_gpu, 1);
	else
		PF_ADD(c, q, prefetch_host, 1);
	uint32_t *ps = &L->pf_step[(size_t)h * L->cap + k->index];
	if (!*ps)
		*ps = L->steps;
}

/* A page the plan ranks: its predicted score. */
struct cand {
	float s;
	uint32_t p;
};

/* Keeps the k best of a stream (a min-heap on s). */
static void heap_push(struct cand *hp, uint32_t *n, uint32_t k, struct cand c)
{
	uint32_t i;
	if (*n < k) {
		i = (*n)++;
		while (i && hp[(i - 1) / 2].s > c.s) {
			hp[i] = hp[(i - 1) / 2];
			i = (i - 1) / 2;
		}
		hp[i] = c;
		return;
	}
	if (!k || c.s <= hp[0].s)
		return;
	i = 0; /* replace the root and sift down */
	for (;;) {
		uint32_t l = 2 * i + 1, m = i;
		float ms = c.s;
		if (l < k && hp[l].s < ms)
			m = l, ms = hp[l].s;
		if (l + 1 < k && hp[l + 1].s < ms)
			m = l + 1;
		if (m == i)
			break;
		hp[i] = hp[m];
		i = m;
	}
	hp[i] = c;
}

static int cand_desc(const void *a, const void *b)
{
	const struct cand *x = a, *y = b;
	return x->s > y->s ? -1 : x->s < y->s ? 1 : (x->p > y->p) - (x->p < y->p);
}

struct kvd_prom {
	struct kvd_select *s;
	uint32_t i;
};

/* kvd_select.to of a page the answer does not wait for: on the GPU, or read in place */
#define TO_NONE 0xff
#define TO_HOST_READ 0xfe

struct kvd_select {
	struct kvd_wait w;
	uint32_t layer, rows, out_stride;
	uint64_t out_off;
	bool host_ok;          /* the client reads pages in place from the host arena */
	bool fenced;           /* its reads wait on the copy fence (KVT_SEL_FENCED) */
	struct page_key *keys; /* [rows][out_stride] */
	uint8_t *to;           /* [rows][out_stride] tier a page the answer waits for goes to */
	int32_t *n_out, *tail_len;
	struct kvd_prom *prom;
	uint32_t *todo; /* moves the store refused for room: retried */
	uint32_t ntodo;
	uint64_t hits, waited;
	uint64_t t0; /* the request taken from the ring */
};

static void sel_cb(void *arg, int res)
{
	struct kvd_prom *p = arg;
	struct kvd_select *s = p->s;
	s->w.pending--;
	if (res == -EAGAIN)
		s->todo[s->ntodo++] = p->i;
	else if (res < 0 && !s->w.err)
		s->w.err = res == -ENOENT ? -EIO : res;
	if (!s->w.pending && !s->ntodo)
		s->w.retry = NULL;
	wait_done(&s->w);
}

/*
 * A page the answer needs on the GPU: with the client's copy fence, the answer waits
 * only until its copy is queued on the device (the client's reads wait on the fence,
 * recorded behind it when the answer goes); else until it has landed.
 */
static void sel_start(struct kvd_select *s, uint32_t i)
{
	struct kvd *d = s->w.d;
	int ret = s->to[i] == TIER_GPU && s->fenced
			  ? kvt_store_promote_queued(d->store, &s->keys[i], sel_cb, &s->prom[i])
			  : kvt_store_promote(d->store, &s->keys[i], (enum tier_id)s->to[i], sel_cb,
					      &s->prom[i]);
	if (ret == -ENOENT)
		ret = -EIO; /* the store lost the page (every copy bad): not "no such sequence" */
	if (ret == -EAGAIN)
		s->todo[s->ntodo++] = i;
	else if (ret < 0 && !s->w.err)
		s->w.err = ret;
	else if (ret == 0)
		s->w.pending++;
}

static void sel_retry(struct kvd_wait *w)
{
	struct kvd_select *s = (struct kvd_select *)w;
	uint32_t n = s->ntodo;
	s->ntodo = 0;
	for (uint32_t j = 0; j < n; j++)
		sel_start(s, s->todo[j]);
	if (!s->w.pending && !s->ntodo) {
		s->w.retry = NULL;
		wait_done(&s->w);
	}
}

static void sel_finish(struct kvd_wait *w)
{
	struct kvd_select *s = (struct kvd_select *)w;
	struct kvd_client *c = w->c;
	struct kvd *d = w->d;
	if (w->err) {
		kvd_complete(c, w->user_data, w->err, 0, 0);
		return;
	}
	const uint64_t tf = kvd_now_ns();
	int32_t *table = (int32_t *)(c->data + s->out_off);
	int32_t *n_out = table + (size_t)s->rows * s->out_stride, *tail = n_out + s->rows;
	int32_t *pages = tail + s->rows;
	uint64_t early = 0; /* pages named while their copies to the GPU are under way */
	for (uint32_t r = 0; r < s->rows; r++) {
		for (int32_t j = 0; j < s->n_out[r]; j++) {
			const struct page_key *k = &s->keys[(size_t)r * s->out_stride + j];
			struct kvt_page_info pi;
			int32_t slot = -1;
			if (kvt_store_page_info(d->store, k, &pi) == 0) {
				if (pi.valid & (1u << TIER_GPU)) {
					slot = (int32_t)TIER_SLOT_INDEX(pi.slot[TIER_GPU]);
				} else if (s->host_ok && (pi.valid & (1u << TIER_HOST))) {
					slot = (int32_t)TIER_SLOT_INDEX(pi.slot[TIER_HOST]) | KVT_SLOT_HOST;
				} else if ((pi.queued & (1u << TIER_GPU)) && s->fenced) {
					slot = (int32_t)TIER_SLOT_INDEX(pi.slot[TIER_GPU]);
					early++;
				}
			}
			if (slot < 0) {
				/* pinned pages stay: this is a bug, and never a wrong page */
				kvt_err("engine", "client %u: selected page %u of layer %u is not "
					"where it was brought", c->id, k->index, k->layer);
				kvd_complete(c, w->user_data, -EIO, 0, 0);
				return;
			}
			table[(size_t)r * s->out_stride + j] = slot;
			pages[(size_t)r * s->out_stride + j] = (int32_t)k->index;
			kvt_store_touch(d->store, k, 1.0f);
		}
		n_out[r] = s->n_out[r];
		tail[r] = s->tail_len[r];
	}
	/* after the copies the table names: what the client's reads wait for */
	int ret = early ? kvt_store_copy_fence(d->store, c->copy_fence) : 0;
	if (ret < 0) {
		kvt_err("engine", "client %u: the copy fence: %s", c->id, strerror(-ret));
		kvd_complete(c, w->user_data, -EIO, 0, 0);
		return;
	}
	c->selects++;
	c->selects_early += early > 0;
	c->pages_early += early;
	uint64_t now = kvd_now_ns();
	d->sel_phase_ns[SEL_ANSWER] += now - tf;
	uint64_t ut = (now - s->t0) / 1000, uc = (w->start_ns - s->t0) / 1000;
	unsigned bt = kvt_hist_bucket(ut), bc = kvt_hist_bucket(uc);
	c->sel_lat[bt]++;
	d->sel_lat[bt]++;
	c->sel_compute[bc]++;
	d->sel_compute[bc]++;
	c->sel_lat_sum_us += ut;
	d->sel_lat_sum_us += ut;
	c->sel_compute_sum_us += uc;
	d->sel_compute_sum_us += uc;
	kvd_complete_flags(c, w->user_data, 0, early ? KVT_CQE_COPIES : 0, s->hits, s->waited);
}

static void sel_release(struct kvd_wait *w)
{
	struct kvd_select *s = (struct kvd_select *)w;
	kvt_free(s->keys);
	kvt_free(s->prom);
	kvt_free(s->todo);
	kvt_free(s);
}

/* Is page p of a row with ntok tokens a sink or window page (never substituted)? */
static bool always_page(const struct kvt_sqe *r, uint32_t T, uint32_t ntok, uint32_t p)
{
	uint32_t sinks = (r->sink_tokens + T - 1) / T;
	return p < sinks || (uint64_t)(p + 1) * T + r->window_tokens > ntok;
}

/*
 * The prefetcher's view of one row after its selection: the pages not selected,
 * ranked by predicted score (this step's, plus drift_pct of its change since the last
 * step: a page whose score rises is fetched before it enters the top-k), best first.
 * The GPU has picked the row's ncand best-scored pages (pages[], any order): only those
 * are ranked, so a plan costs the same at 1M tokens as at 8K. A page's trend is known
 * when it was a candidate at the last selection too. Returns how many of the best are
 * in out (at most k).
 */
static uint32_t rank_row(struct kvd *d, struct kvd_layer *L, uint32_t h, const float *sc,
			 const uint8_t *sel, const int32_t *pages, uint32_t ncand, struct cand *out,
			 uint32_t k)
{
	const float drift = (float)d->cfg.drift_pct / 100.0f;
	if (!L->prev) /* no page stored yet: nothing to rank (and no arrays to index) */
		return 0;
	struct kvd_prev *prev = L->prev + (size_t)h * L->cap;
	uint32_t n = 0;
	for (uint32_t i = 0; i < ncand; i++) {
		const uint32_t p = (uint32_t)pages[i];
		if (p >= L->stored)
			continue;
		float s = sc[p], pv = prev[p].at + 1 == L->steps ? prev[p].s : NAN;
		prev[p] = (struct kvd_prev){s, L->steps};
		if (sel[p] || !isfinite(s))
			continue;
		heap_push(out, &n, k, (struct cand){isnan(pv) ? s : s + drift * (s - pv), p});
	}
	qsort(out, n, sizeof(*out), cand_desc);
	return n;
}

static bool resident(const struct kvt_page_info *pi, bool host_ok)
{
	return (pi->valid & (1u << TIER_GPU)) || (host_ok && (pi->valid & (1u << TIER_HOST)));
}

/* Counts the row's prefetched pages now selected (used: o[0..n) are the selection)
 * and, every wasted_steps selections, those that waited too long (wasted). */
static void pf_account(struct kvd_client *c, struct kvd_seq *q, struct kvd_layer *L, uint32_t h,
		       const int32_t *o, int32_t n)
{
	const uint32_t lim = c->d->cfg.wasted_steps;
	if (!L->pf_step)
		return;
	uint32_t *ps = L->pf_step + (size_t)h * L->cap;
	for (int32_t j = 0; j < n; j++)
		if (ps[o[j]]) {
			if (L->steps - ps[o[j]] > lim)
				PF_ADD(c, q, prefetch_wasted, 1);
			else
				PF_ADD(c, q, prefetch_used, 1);
			ps[o[j]] = 0;
		}
	if (L->steps % lim)
		return;
	for (uint32_t p = 0; p < L->stored; p++)
		if (ps[p] && L->steps - ps[p] > lim) {
			PF_ADD(c, q, prefetch_wasted, 1);
			ps[p] = 0;
		}
}

/*
 * KVT_SEL_SUBST: a selected page only on NVMe (not a sink or window page) is replaced
 * by the best-ranked page that is resident, so the step reads nothing from disk. With
 * select.substitute_gap > 0, only pages whose score bound lies that many nats or more
 * below the row's best-scored page: those can hold little of the softmax mass, and
 * the step still waits for any page that may matter (a needle the query just turned to).
 */
static void substitute(struct kvd_client *c, struct kvd_seq *q, struct kvd_layer *L,
		       const struct kvt_sqe *r, bool host_ok, uint32_t h, int32_t *o, int32_t n,
		       uint8_t *sm, const float *sc, struct cand *cd, uint32_t nc)
{
	struct kvd *d = c->d;
	const uint32_t T = c->layout.page_tokens;
	uint32_t ci = 0, ne = 0, ei = 0;
	bool moved = false, scanned = false;
	struct cand *extra = NULL;
	float floor = INFINITY; /* pages scored above it are never replaced */
	if (d->cfg.substitute_gap) {
		float best = -INFINITY;
		for (int32_t j = 0; j < n; j++)
			if (!always_page(r, T, L->ntok, (uint32_t)o[j]) && sc[o[j]] > best)
				best = sc[o[j]];
		/* scores are q.k bounds; a logit is q.k / sqrt(D) */
		floor = best - (float)d->cfg.substitute_gap * sqrtf((float)c->layout.head_dim);
	}
	for (int32_t j = 0; j < n; j++) {
		struct page_key k = {.tenant = c->tenant->id, .layer = (uint16_t)r->layer,
				     .kv_head = (uint16_t)h, .seq = L->owner[o[j]]->sseq,
				     .index = (uint32_t)o[j]};
		struct kvt_page_info pi;
		if (sc[o[j]] > floor || always_page(r, T, L->ntok, k.index) ||
		    kvt_store_page_info(d->store, &k, &pi) < 0 || resident(&pi, host_ok) ||
		    (pi.inflight & (1u << TIER_GPU)))
			continue;
		int64_t sub = -1;
		for (; ci < nc && sub < 0; ci++) {
			k.index = cd[ci].p;
			k.seq = L->owner[k.index]->sseq;
			if (kvt_store_page_info(d->store, &k, &pi) == 0 && resident(&pi, host_ok)) {
				sub = k.index;
				cd[ci].s = -INFINITY; /* taken */
			}
		}
		/* none among the ranked: the best-scored resident pages of all, found in one
		 * scan of the row (at most as many as there are pages to replace) */
		if (sub < 0 && !scanned) {
			scanned = true;
			extra = kvt_malloc((size_t)n * sizeof(*extra));
			for (uint32_t p = 0; extra && p < L->stored; p++) {
				k.index = p;
				k.seq = L->owner[p]->sseq;
				if (!sm[p] && isfinite(sc[p]) &&
				    kvt_store_page_info(d->store, &k, &pi) == 0 && resident(&pi, host_ok))
					heap_push(extra, &ne, (uint32_t)(n - j), (struct cand){sc[p], p});
			}
			if (extra)
				qsort(extra, ne, sizeof(*extra), cand_desc);
		}
		if (sub < 0 && ei < ne)
			sub = extra[ei++].p;
		if (sub < 0)
			break; /* nothing resident is left to take */
		sm[o[j]] = 0;
		sm[sub] = 1;
		o[j] = (int32_t)sub;
		PF_ADD(c, q, substituted, 1);
		moved = true;
	}
	kvt_free(extra);
	if (moved) /* the table stays in ascending page order */
		for (int32_t j = 1; j < n; j++)
			for (int32_t i = j; i > 0 && o[i - 1] > o[i]; i--) {
				int32_t t = o[i];
				o[i] = o[i - 1];
				o[i - 1] = t;
			}
}

/* Where one selected page is: counted, and if it must be waited for, where it goes. */
static int classify(struct kvd_client *c, struct kvd_seq *q, bool host_ok,
		    const struct kvt_page_info *pi)
{
	const unsigned G = 1u << TIER_GPU, Hm = 1u << TIER_HOST;
	if (pi->valid & G) {
		PF_ADD(c, q, hit, 1);
		return -1;
	}
	if (pi->inflight & G) {
		PF_ADD(c, q, late, 1);
		return TIER_GPU;
	}
	if (pi->valid & Hm) {
		if (host_ok) {
			PF_ADD(c, q, host, 1);
			return -1;
		}
		PF_ADD(c, q, fetched, 1);
		return TIER_GPU;
	}
	if (pi->inflight & Hm)
		PF_ADD(c, q, late, 1);
	else
		PF_ADD(c, q, disk, 1);
	return host_ok ? TIER_HOST : TIER_GPU;
}

static void do_select(struct kvd_client *c, const struct kvt_sqe *r)
{
	const uint64_t t0 = kvd_now_ns();
	struct kvd *d = c->d;
	if (r->ntok) { /* the client's attention time of its last step */
		unsigned b = kvt_hist_bucket(r->ntok);
		c->attn[b]++;
		d->attn[b]++;
		c->attn_sum_us += r->ntok;
		d->attn_sum_us += r->ntok;
	}
	const struct kvt_wire_layout *lo = &c->layout;
	const uint32_t nseq = r->seq, H = lo->kv_heads, T = lo->page_tokens;
	const uint64_t rows = (uint64_t)nseq * H;
	const uint64_t qbytes = rows * lo->group * lo->head_dim * esize(c);
	const uint64_t obytes = rows * (2 * (uint64_t)r->out_stride + 2) * sizeof(int32_t);
	const unsigned flags = KVT_SEL_TOPP | KVT_SEL_HOST | KVT_SEL_SUBST | KVT_SEL_FENCED;
	int ret = -EINVAL;
	if (!nseq || nseq > d->cfg.max_batch || r->layer >= lo->layers || !r->out_stride ||
	    r->out_stride > (1u << 24) || (r->flags & ~flags) ||
	    !in_data(c, r->off[0], nseq * sizeof(uint32_t)) || !in_data(c, r->off[1], qbytes) ||
	    !in_data(c, r->off[2], obytes) || ((r->off[0] | r->off[1] | r->off[2]) & 3)) {
		kvd_client_kill(c, KVD_DISC_BAD_REQUEST, "SELECT out of bounds or misaligned (nseq %u "
				"layer %u out_stride %u, offsets %llu %llu %llu)", nseq, r->layer,
				r->out_stride, (unsigned long long)r->off[0],
				(unsigned long long)r->off[1], (unsigned long long)r->off[2]);
		return;
	}
	if (r->budget > r->out_stride ||
	    ((r->flags & KVT_SEL_TOPP) && !(r->top_p >= 0.0f && r->top_p <= 1.0f))) {
		kvd_complete(c, r->user_data, -EINVAL, 0, 0);
		return;
	}
	/* the sequences, and their ids copied out of shared memory once */
	struct kvd_seq **seqs = kvt_malloc(nseq * (sizeof(*seqs) + sizeof(uint32_t)));
	uint8_t *plan = NULL;
	if (!seqs) {
		kvd_complete(c, r->user_data, -ENOMEM, 0, 0);
		return;
	}
	uint32_t *ids = (uint32_t *)(seqs + nseq);
	memcpy(ids, c->data + r->off[0], nseq * sizeof(uint32_t));
	uint32_t stride = 1;
	for (uint32_t b = 0; b < nseq; b++) {
		if (ids[b] >= d->cfg.max_seqs) {
			/* ids live in seqs' allocation: say which before freeing it */
			kvd_client_kill(c, KVD_DISC_BAD_REQUEST, "SELECT of sequence id %u (max %u)", ids[b], d->cfg.max_seqs);
			kvt_free(seqs);
			return;
		}
		seqs[b] = seq_get(c, ids[b]);
		if (!seqs[b]) {
			ret = -ENOENT;
			goto out;
		}
		for (uint32_t j = 0; j < b; j++)
			if (seqs[j] == seqs[b]) { /* its pins would be dropped under it */
				ret = -EINVAL;
				goto out;
			}
		if ((ret = flush_pending(c, seqs[b], r->layer)) < 0)
			goto out;
		if (seqs[b]->layer[r->layer].stored > stride)
			stride = seqs[b]->layer[r->layer].stored;
	}
	const bool dense = r->layer < lo->dense_layers;
	if (dense && r->out_stride < stride) {
		ret = -ENOBUFS;
		goto out;
	}
	/*
	 * What goes up, in one pinned buffer and one copy: the record index, pages and
	 * tail of every row, then the queries. What comes back (the selection, and the
	 * scores when the prefetcher plans) in one more: a select synchronises once.
	 */
	const bool planning_wanted = !dense && (d->cfg.prefetch || (r->flags & KVT_SEL_SUBST));
	const uint32_t gm = (uint32_t)((uint64_t)r->budget * d->cfg.gpu_margin_pct / 100);
	const uint32_t hm = (uint32_t)((uint64_t)r->budget * d->cfg.host_margin_pct / 100);
	/* the plan's candidates, picked on the GPU: the best-scored pages, twice the
	 * margins beyond the selection (the plan re-ranks them by trend), and as many
	 * again for substitutes */
	uint64_t kc = (uint64_t)r->out_stride + (d->cfg.prefetch ? 2ull * (gm + hm) : 0) +
		      ((r->flags & KVT_SEL_SUBST) ? r->out_stride : 0);
	const uint32_t K2 = (uint32_t)(kc < stride ? kc : stride);
	const size_t ib = ((rows * stride + rows * 2) * sizeof(int32_t) + 255) & ~(size_t)255;
	const size_t hb = ib + qbytes;
	const size_t cells = rows * r->out_stride;
	const size_t ob = (cells + rows) * sizeof(int32_t) +
			  (planning_wanted ? rows * stride * sizeof(float) +
						     rows * ((size_t)K2 + 1) * sizeof(int32_t)
					   : 0);
	int32_t *h_idx = pinned(d, 0, hb);
	int32_t *h_res = pinned(d, 1, ob);
	if (!h_idx || !h_res) {
		ret = -ENOMEM;
		goto out;
	}
	int32_t *h_np = h_idx + rows * stride, *h_tail = h_np + rows;
	for (uint32_t b = 0; b < nseq; b++) {
		const struct kvd_layer *L = &seqs[b]->layer[r->layer];
		for (uint32_t h = 0; h < H; h++) {
			uint64_t row = (uint64_t)b * H + h;
			if (L->stored)
				memcpy(h_idx + row * stride, L->rec + (size_t)h * L->cap,
				       L->stored * sizeof(int32_t));
			for (uint32_t p = L->stored; p < stride; p++)
				h_idx[row * stride + p] = 0;
			h_np[row] = (int32_t)L->stored;
			h_tail[row] = (int32_t)(L->ntok - L->stored * T);
		}
	}
	memcpy((uint8_t *)h_idx + ib, c->data + r->off[1], qbytes);
	int32_t *d_idx = scratch(d, SCR_SUMIDX, hb);
	float *d_sc = scratch(d, SCR_SCORES, rows * stride * sizeof(float));
	int32_t *d_nout = scratch(d, SCR_OUT, (cells + rows) * sizeof(int32_t));
	int32_t *d_ncand = planning_wanted ? scratch(d, SCR_CAND, rows * ((size_t)K2 + 1) * sizeof(int32_t))
					   : NULL;
	if (!d_idx || !d_sc || !d_nout || (planning_wanted && !d_ncand)) {
		ret = -ENOMEM;
		goto out;
	}
	int32_t *d_np = d_idx + rows * stride, *d_tail = d_np + rows, *d_out = d_nout + rows;
	void *qd = (uint8_t *)d_idx + ib;
	const uint64_t t_dev = kvd_now_ns();
	if ((ret = kvt_compute_copy_async(d->cc, d_idx, h_idx, hb, NULL)) < 0)
		goto out;
	struct kvt_layer_policy pol;
	kvt_layer_policy_default(&pol);
	pol.dense_layers = lo->dense_layers;
	pol.mode = (r->flags & KVT_SEL_TOPP) ? KVT_SELECT_TOPP : KVT_SELECT_TOPK;
	struct kvt_score_args sc = {.g = c->geom, .rows = (uint32_t)rows, .stride = stride,
				    .q = qd, .summaries = c->sum_pool, .sum_index = d_idx,
				    .n_pages = d_np, .scores = d_sc};
	struct kvt_select_args sel = {.rows = (uint32_t)rows, .stride = stride,
				      .out_stride = r->out_stride, .budget_pages = r->budget,
				      .page_tokens = T, .sink_tokens = r->sink_tokens,
				      .window_tokens = r->window_tokens, .top_p = r->top_p,
				      .logit_scale = 1.0f / sqrtf((float)lo->head_dim),
				      .scores = d_sc, .n_pages = d_np, .tail_len = d_tail,
				      .out = d_out, .n_out = d_nout};
	if (!c->sum_pool) /* nothing summarized yet: every row is empty */
		sc.summaries = d_idx;
	float *h_scores = (float *)(h_res + cells + rows);
	int32_t *h_ncand = (int32_t *)(h_scores + rows * stride), *h_cand = h_ncand + rows;
	struct kvt_select_args cs = sel;
	if (planning_wanted)
		cs = (struct kvt_select_args){
			.mode = KVT_SELECT_TOPK, .rows = (uint32_t)rows, .stride = stride,
			.out_stride = K2, .budget_pages = K2, .page_tokens = T,
			.sink_tokens = r->sink_tokens, .window_tokens = r->window_tokens,
			.logit_scale = sel.logit_scale, .scores = d_sc, .n_pages = d_np,
			.tail_len = d_tail, .out = d_ncand + rows, .n_out = d_ncand};
	if ((ret = kvt_select_layer(d->cc, &pol, r->layer, &sc, &sel, NULL)) < 0 ||
	    (planning_wanted && (ret = kvt_select(d->cc, &cs, NULL)) < 0) ||
	    (ret = kvt_compute_copy_async(d->cc, h_res, d_nout, (cells + rows) * sizeof(int32_t),
					  NULL)) < 0 ||
	    (planning_wanted &&
	     ((ret = kvt_compute_copy_async(d->cc, h_scores, d_sc, rows * stride * sizeof(float),
					    NULL)) < 0 ||
	      (ret = kvt_compute_copy_async(d->cc, h_ncand, d_ncand,
					    rows * ((size_t)K2 + 1) * sizeof(int32_t), NULL)) < 0))) {
		kvt_compute_sync(d->cc, NULL); /* nothing queued may still read the staging */
		goto out;
	}
	const uint64_t t_sync = kvd_now_ns();
	if ((ret = kvt_compute_sync(d->cc, NULL)) < 0)
		goto out;
	struct kvd_select *s = kvt_calloc(1, sizeof(*s));
	if (!s) {
		ret = -ENOMEM;
		goto out;
	}
	s->keys = kvt_malloc(cells * sizeof(*s->keys) + rows * 2 * sizeof(int32_t) +
			     cells * sizeof(int32_t) + cells);
	s->prom = kvt_malloc(cells * sizeof(*s->prom));
	s->todo = kvt_malloc(cells * sizeof(*s->todo));
	if (!s->keys || !s->prom || !s->todo) {
		sel_release(&s->w);
		ret = -ENOMEM;
		goto out;
	}
	int32_t *h_out = (int32_t *)(s->keys + cells);
	s->n_out = h_out + cells;
	s->tail_len = s->n_out + rows;
	s->to = (uint8_t *)(s->tail_len + rows);
	memcpy(s->n_out, h_res, rows * sizeof(int32_t));
	memcpy(h_out, h_res + rows, cells * sizeof(int32_t));
	memcpy(s->tail_len, h_tail, rows * sizeof(int32_t));
	s->w = (struct kvd_wait){.d = d, .c = c, .user_data = r->user_data,
				 .start_ns = kvd_now_ns(), .finish = sel_finish,
				 .retry = sel_retry, .release = sel_release};
	s->t0 = t0;
	s->layer = r->layer;
	s->rows = (uint32_t)rows;
	s->out_stride = r->out_stride;
	s->out_off = r->off[2];
	s->host_ok = r->flags & KVT_SEL_HOST;
	s->fenced = (r->flags & KVT_SEL_FENCED) && c->copy_fence;
	for (uint64_t row = 0; row < rows && !s->w.err; row++)
		if (s->n_out[row] < 0 || (uint32_t)s->n_out[row] > r->out_stride)
			s->w.err = -EIO;
		else
			for (int32_t j = 0; j < s->n_out[row] && !s->w.err; j++)
				if ((uint32_t)h_out[row * r->out_stride + j] >=
				    seqs[row / H]->layer[r->layer].stored)
					s->w.err = -EIO;
	/*
	 * The prefetcher's plan needs every page's score (on the host) and a map of the
	 * selected pages; substitution needs the ranking too.
	 */
	const bool planning = planning_wanted && !s->w.err;
	/* ranked per row: the margins, and substitutes */
	const uint32_t K = (d->cfg.prefetch ? gm + hm : 0) +
			   ((r->flags & KVT_SEL_SUBST) ? r->out_stride : 0);
	float *h_sc = NULL;
	uint8_t *selmap = NULL;
	struct cand *cands = NULL;
	uint32_t *ncand = NULL;
	if (planning) {
		plan = kvt_malloc(rows * stride + rows * (K * sizeof(struct cand) + sizeof(uint32_t)));
		if (!plan) {
			sel_release(&s->w);
			ret = -ENOMEM;
			goto out;
		}
		h_sc = h_scores; /* the pinned copy: nothing else runs before the plan is made */
		cands = (struct cand *)plan;
		ncand = (uint32_t *)(cands + rows * K);
		selmap = (uint8_t *)(ncand + rows);
	}
	/* The previous step's pins of these rows: kept where a page is selected again,
	 * the others let go before any move starts (their pages may make room). */
	reads_check(c);
	struct old_pins *op = kvt_malloc(nseq * sizeof(*op));
	for (uint32_t b = 0; b < nseq; b++) {
		if (op)
			old_pins_take(&seqs[b]->layer[r->layer], &op[b]);
		else
			unpin_layer(c, &seqs[b]->layer[r->layer]);
		seqs[b]->layer[r->layer].steps++;
		PF_ADD(c, seqs[b], steps, 1);
	}
	/* 1: pin what the answer names (so that no move started below evicts a page
	 * selected for a later row); with substitution, rank each row's other pages and
	 * substitute first (without, the ranking is the plan's alone: step 3) */
	const bool subst = r->flags & KVT_SEL_SUBST;
	for (uint64_t row = 0; row < rows && !s->w.err; row++) {
		struct kvd_seq *q = seqs[row / H];
		struct kvd_layer *L = &q->layer[r->layer];
		const uint32_t h = (uint32_t)(row % H);
		int32_t *o = h_out + row * r->out_stride;
		const int32_t n = s->n_out[row];
		PF_ADD(c, q, selected, (uint64_t)n);
		if (planning) {
			uint8_t *sm = selmap + row * stride;
			struct cand *cd = cands + row * K;
			memset(sm, 0, L->stored);
			for (int32_t j = 0; j < n; j++)
				sm[o[j]] = 1;
			const int32_t nc = h_ncand[row];
			ncand[row] = 0;
			if (subst && nc >= 0 && (uint32_t)nc <= K2)
				ncand[row] = rank_row(d, L, h, h_sc + row * stride, sm,
						      h_cand + row * K2, (uint32_t)nc, cd, K);
			if (subst)
				substitute(c, q, L, r, s->host_ok, h, o, n, sm, h_sc + row * stride, cd,
					   ncand[row]);
			if (d->cfg.prefetch)
				pf_account(c, q, L, h, o, n);
		}
		for (int32_t j = 0; j < n; j++) {
			size_t i = row * r->out_stride + (size_t)j;
			s->keys[i] = (struct page_key){.tenant = c->tenant->id,
						       .layer = (uint16_t)r->layer,
						       .kv_head = (uint16_t)h,
						       .seq = L->owner[o[j]]->sseq,
						       .index = (uint32_t)o[j]};
			s->prom[i] = (struct kvd_prom){s, (uint32_t)i};
			ret = op ? repin(c, L, &op[row / H], &s->keys[i])
				 : pin_key(d, L, &s->keys[i], false);
			if (ret < 0) {
				s->w.err = ret;
				break;
			}
		}
		if (op)
			old_pins_head_done(c, &op[row / H], (uint16_t)h);
	}
	for (uint32_t b = 0; op && b < nseq; b++)
		old_pins_done(c, &op[b]);
	kvt_free(op);
	const uint64_t t_rank = kvd_now_ns();
	/* 2: where each selected page is; start the moves the answer waits for */
	for (uint64_t row = 0; row < rows && !s->w.err; row++) {
		struct kvd_seq *q = seqs[row / H];
		for (int32_t j = 0; j < s->n_out[row] && !s->w.err; j++) {
			size_t i = row * r->out_stride + (size_t)j;
			struct kvt_page_info pi;
			if ((ret = kvt_store_page_info(d->store, &s->keys[i], &pi)) < 0) {
				s->w.err = ret;
				break;
			}
			int to = classify(c, q, s->host_ok, &pi);
			if (to < 0) {
				const bool gpu = (pi.valid >> TIER_GPU) & 1;
				s->hits += gpu;
				s->to[i] = gpu ? TO_NONE : TO_HOST_READ;
				continue;
			}
			s->to[i] = (uint8_t)to;
			s->waited++;
			sel_start(s, (uint32_t)i);
		}
	}
	const uint64_t t_where = kvd_now_ns();
	/*
	 * An answer that waits for nothing goes now: the plan below is for the next step,
	 * and the client's attention and next append overlap it. (One that waits keeps
	 * the plan first: the pinned buffers it reads are free again once this returns.)
	 */
	const bool answer_now = !s->w.pending && !s->ntodo;
	if (!s->ntodo)
		s->w.retry = NULL;
	if (answer_now)
		sel_finish(&s->w);
	const uint64_t t_answer = kvd_now_ns();
	/* 3: the plan for the next step: what this one reads from host RAM, then the
	 * next-best pages (ranked by trend) to the GPU, and deeper ones from NVMe to host
	 * RAM */
	unsigned full = 0;
	for (uint64_t row = 0; planning && d->cfg.prefetch && row < rows && !s->w.err; row++) {
		struct kvd_seq *q = seqs[row / H];
		struct kvd_layer *L = &q->layer[r->layer];
		const uint32_t h = (uint32_t)(row % H);
		struct cand *cd = cands + row * K;
		const int32_t nc = h_ncand[row];
		if (!subst && nc >= 0 && (uint32_t)nc <= K2)
			ncand[row] = rank_row(d, L, h, h_sc + row * stride, selmap + row * stride,
					      h_cand + row * K2, (uint32_t)nc, cd, K);
		for (int32_t j = 0; j < s->n_out[row]; j++) /* the others are there or waited for */
			if (s->to[row * r->out_stride + (size_t)j] == TO_HOST_READ)
				prefetch(c, q, L, h, &s->keys[row * r->out_stride + (size_t)j],
					 TIER_GPU, &full, t_where);
		for (uint32_t i = 0, g = 0; i < ncand[row] && g < gm + hm; i++) {
			if (cd[i].s == -INFINITY)
				continue; /* taken as a substitute */
			struct page_key k = {.tenant = c->tenant->id, .layer = (uint16_t)r->layer,
					     .kv_head = (uint16_t)h, .seq = L->owner[cd[i].p]->sseq,
					     .index = cd[i].p};
			prefetch(c, q, L, h, &k, g++ < gm ? TIER_GPU : TIER_HOST, &full, t_where);
		}
	}
	kvt_free(seqs);
	kvt_free(plan);
	const uint64_t t_plan = kvd_now_ns();
	d->sel_phase_ns[SEL_INPUTS] += t_dev - t0;
	d->sel_phase_ns[SEL_DEVICE] += s->w.start_ns - t_dev;
	d->sel_phase_ns[SEL_WAIT] += s->w.start_ns - t_sync;
	d->sel_phase_ns[SEL_RANK] += t_rank - s->w.start_ns;
	d->sel_phase_ns[SEL_WHERE] += t_where - t_rank;
	d->sel_phase_ns[SEL_PLAN] += t_plan - t_answer;
	d->sel_phase_n++;
	if (!answer_now) {
		c->busy = &s->w;
		return;
	}
	sel_release(&s->w);
	return;
out:
	kvt_free(seqs);
	kvt_free(plan);
	kvd_complete(c, r->user_data, ret, 0, 0);
}

/* ---- fork ---- */

struct kvd_fork {
	struct kvd_wait w;
	uint32_t child;
	uint64_t off;  /* where the child's partial pages go: [layer][head][page] */
	uint8_t *buf;  /* pages read from the store, [layer][head][page]: owned here, so a
			* read that lands after the client left writes nothing of its */
	uint8_t *read; /* [layer]: that layer's partial page is in buf */
};

static void fork_cb(void *arg, int res)
{
	struct kvd_fork *f = arg;
	f->w.pending--;
	if (res < 0 && !f->w.err)
		f->w.err = res;
	wait_done(&f->w);
}

static void fork_finish(struct kvd_wait *w)
{
	struct kvd_fork *f = (struct kvd_fork *)w;
	struct kvd_client *c = w->c;
	struct kvd_seq *q = seq_get(c, f->child);
	if (w->err && q)
		seq_free(c, q);
	for (uint32_t l = 0; !w->err && q && f->read && l < c->layout.layers; l++)
		if (f->read[l])
			memcpy(q->layer[l].fill, f->buf + (size_t)l * c->layout.kv_heads * c->page_bytes,
			       (size_t)c->layout.kv_heads * c->page_bytes);
	/* The client keeps its own copy of the page it fills: it gets the partial page. */
	const size_t pb = c->page_bytes, H = c->layout.kv_heads;
	for (uint32_t l = 0; !w->err && q && l < c->layout.layers; l++)
		if (q->layer[l].fill)
			memcpy(c->data + f->off + l * H * pb, q->layer[l].fill, H * pb);
	kvd_complete(w->c, w->user_data, w->err ? w->err : (int)f->child, 0, 0);
}

static void fork_release(struct kvd_wait *w)
{
	struct kvd_fork *f = (struct kvd_fork *)w;
	kvt_free(f->buf);
	kvt_free(f->read);
	kvt_free(f);
}

static void fork_cancel(struct kvd_wait *w)
{
	struct kvd_fork *f = (struct kvd_fork *)w;
	if (seq_get(w->c, f->child))
		seq_free(w->c, seq_get(w->c, f->child));
}

static void do_fork(struct kvd_client *c, const struct kvt_sqe *r)
{
	struct kvd *d = c->d;
	const uint32_t H = c->layout.kv_heads, T = c->layout.page_tokens, pb = c->page_bytes;
	struct kvd_seq *p = seq_get(c, r->seq);
	int ret = 0;
	if (!p) {
		kvd_complete(c, r->user_data, -ENOENT, 0, 0);
		return;
	}
	if (!in_data(c, r->off[0], (uint64_t)c->layout.layers * H * pb)) {
		kvd_complete(c, r->user_data, -EINVAL, 0, 0);
		return;
	}
	for (uint32_t l = 0; l < c->layout.layers; l++) {
		if (p->layer[l].ntok < r->ntok) {
			kvd_complete(c, r->user_data, -ERANGE, 0, 0);
			return;
		}
		if ((ret = flush_pending(c, p, l)) < 0) {
			kvd_complete(c, r->user_data, ret, 0, 0);
			return;
		}
	}
	struct kvd_fork *f = kvt_calloc(1, sizeof(*f));
	struct kvd_seq *q = f ? seq_new(c) : NULL;
	if (!q) {
		kvt_free(f);
		kvd_complete(c, r->user_data, c->nseqs >= d->cfg.max_seqs ? -EMFILE : -ENOMEM, 0, 0);
		return;
	}
	f->w = (struct kvd_wait){.d = d, .c = c, .user_data = r->user_data,
				 .start_ns = kvd_now_ns(), .finish = fork_finish,
				 .cancel = fork_cancel, .release = fork_release};
	f->child = q->id;
	f->off = r->off[0];
	const uint32_t full = r->ntok / T, part = r->ntok % T;
	for (uint32_t l = 0; l < c->layout.layers && !ret; l++) {
		struct kvd_layer *P = &p->layer[l], *L = &q->layer[l];
		if ((ret = layer_reserve(c, L, full + 1)) < 0)
			break;
		for (uint32_t i = 0; i < full && !ret; i++) {
			L->owner[i] = P->owner[i];
			ret = seq_ref(q, P->owner[i]);
		}
		for (uint32_t h = 0; full && h < H; h++)
			memcpy(L->rec + (size_t)h * L->cap, P->rec + (size_t)h * P->cap,
			       full * sizeof(int32_t));
		L->ntok = r->ntok;
		L->stored = full;
		if (!part || ret)
			continue;
		if (!(L->fill = kvt_malloc((size_t)H * pb))) {
			ret = -ENOMEM;
			break;
		}
		if (full == P->stored) { /* the prefix ends in the parent's filling page */
			memcpy(L->fill, P->fill, (size_t)H * pb);
			continue;
		}
		if (!f->buf) {
			f->buf = kvt_malloc((size_t)c->layout.layers * H * pb);
			f->read = kvt_calloc(c->layout.layers, 1);
			if (!f->buf || !f->read) {
				ret = -ENOMEM;
				break;
			}
		}
		f->read[l] = 1;
		for (uint32_t h = 0; h < H && !ret; h++) {
			struct page_key k = {.tenant = c->tenant->id, .layer = (uint16_t)l,
					     .kv_head = (uint16_t)h, .seq = P->owner[full]->sseq,
					     .index = full};
			ret = kvt_store_read(d->store, &k, f->buf + ((size_t)l * H + h) * pb, pb,
					     fork_cb, f);
			if (ret == 0)
				f->w.pending++;
		}
	}
	if (ret < 0)
		f->w.err = ret;
	if (f->w.pending) {
		c->busy = &f->w;
		return;
	}
	fork_finish(&f->w);
	fork_release(&f->w);
}

/* ---- named sequences ---- */

/* The name of an OPEN or REMOVE: 0, -EINVAL (empty, too long, control characters),
 * -EFAULT (outside the data area: the client is cut off here). */
static int read_name(struct kvd_client *c, const struct kvt_sqe *r, char *name)
{
	if (!in_data(c, r->off[0], r->ntok)) {
		kvd_client_kill(c, KVD_DISC_BAD_REQUEST, "%s name out of bounds (off %llu len %u)",
				r->op == KVT_OP_SEQ_OPEN ? "SEQ_OPEN" : "SEQ_REMOVE",
				(unsigned long long)r->off[0], r->ntok);
		return -EFAULT;
	}
	if (!r->ntok || r->ntok > KVT_SEQ_NAME_MAX)
		return -EINVAL;
	memcpy(name, c->data + r->off[0], r->ntok);
	name[r->ntok] = 0;
	for (uint32_t i = 0; i < r->ntok; i++)
		if ((unsigned char)name[i] < 0x20 || name[i] == 0x7f)
			return -EINVAL;
	return 0;
}

/* Pages of a named sequence read back and summarized, a batch of page indices at a
 * time (every layer and head of each), in order: the first page found bad (a torn or
 * corrupt write the scan could not see, or one lost since) ends the sequence there. */
struct kvd_open {
	struct kvd_wait w;
	struct kvd_named *n;
	uint32_t seq;
	uint32_t pages;       /* of every (layer, head), to read */
	uint32_t first, nb;   /* the batch in flight: page indices */
	uint32_t batch_max;
	uint32_t bad;         /* the first index found bad; pages when none */
	uint8_t *buf;         /* [batch_max][layers][heads][page_bytes] */
	struct open_rd {
		struct kvd_open *o;
		uint32_t index;
	} *rd;
};

static void open_batch(struct kvd_open *o);

static void open_cb(void *arg, int res)
{
	struct open_rd *rd = arg;
	struct kvd_open *o = rd->o;
	if (res < 0 && rd->index < o->bad && o->w.c) {
		o->bad = rd->index;
		o->w.d->recovery.open_cut++;
		kvt_warn("engine", "named sequence \"%s\": page %u unreadable (%s): cut there",
			 o->n->name, rd->index, strerror(-res));
	}
	o->w.start_ns = kvd_now_ns(); /* the timeout is on progress */
	if (--o->w.pending)
		return;
	if (o->w.c && !o->w.err)
		open_batch(o); /* summarizes what landed, starts the next batch */
	if (!o->w.pending)
		wait_done(&o->w);
}

/* Summaries of the batch's good pages, then the next batch's reads. */
static void open_batch(struct kvd_open *o)
{
	struct kvd_client *c = o->w.c;
	struct kvd *d = c->d;
	struct kvd_seq *q = seq_get(c, o->seq);
	const uint32_t L = c->layout.layers, H = c->layout.kv_heads, pb = c->page_bytes;
	uint32_t end = o->first + o->nb < o->bad ? o->first + o->nb : o->bad;
	if (end > o->first) {
		const uint32_t n = (end - o->first) * L * H;
		int32_t *recs = kvt_malloc(n * sizeof(int32_t)), *ids = kvt_malloc(n * sizeof(int32_t));
		void *pages = scratch(d, SCR_PAGES, (size_t)n * pb);
		int32_t *slots = scratch(d, SCR_SLOTS, n * sizeof(int32_t));
		int32_t *rdev = scratch(d, SCR_RECS, n * sizeof(int32_t));
		int ret = recs && ids && pages && slots && rdev ? rec_alloc(c, n, recs) : -ENOMEM;
		if (ret == 0) {
			for (uint32_t i = 0; i < n; i++)
				ids[i] = (int32_t)i;
			struct kvt_summarize_args a = {.g = c->geom, .pool = pages, .slot_bytes = pb,
						       .slots = slots, .records = rdev,
						       .summaries = c->sum_pool, .n = n};
			if (kvt_compute_upload(d->cc, pages, o->buf, (size_t)n * pb) < 0 ||
			    kvt_compute_upload(d->cc, slots, ids, n * sizeof(int32_t)) < 0 ||
			    kvt_compute_upload(d->cc, rdev, recs, n * sizeof(int32_t)) < 0 ||
			    (ret = kvt_summarize(d->cc, &a, NULL)) < 0 ||
			    (ret = kvt_compute_sync(d->cc, NULL)) < 0 ||
			    (ret = origin_add_recs(q->own, recs, n)) < 0) {
				rec_release(c, recs, n);
				ret = ret < 0 ? ret : -ENOMEM;
			}
		}
		for (uint32_t i = 0; ret == 0 && i < n; i++) {
			uint32_t idx = o->first + i / (L * H), l = i / H % L, h = i % H;
			struct kvd_layer *Ly = &q->layer[l];
			Ly->rec[(size_t)h * Ly->cap + idx] = recs[i];
			Ly->owner[idx] = q->own;
		}
		kvt_free(recs);
		kvt_free(ids);
		if (ret < 0) {
			o->w.err = ret;
			return;
		}
	}
	o->first = end;
	if (o->first >= o->bad)
		return; /* done: open_finish */
	o->nb = o->bad - o->first < o->batch_max ? o->bad - o->first : o->batch_max;
	for (uint32_t i = 0; i < o->nb; i++)
		for (uint32_t l = 0; l < L; l++)
			for (uint32_t h = 0; h < H; h++) {
				uint32_t j = (i * L + l) * H + h;
				struct page_key k = {.tenant = c->tenant->id, .layer = (uint16_t)l,
						     .kv_head = (uint16_t)h, .seq = o->n->sseq,
						     .index = o->first + i};
				o->rd[j] = (struct open_rd){o, k.index};
				int ret = kvt_store_read(d->store, &k, o->buf + (size_t)j * pb, pb,
							 open_cb, &o->rd[j]);
				if (ret == 0) {
					o->w.pending++;
				} else if (k.index < o->bad) {
					o->bad = k.index;
					d->recovery.open_cut++;
				}
			}
}

static void open_finish(struct kvd_wait *w)
{
	struct kvd_open *o = (struct kvd_open *)w;
	struct kvd_client *c = w->c;
	struct kvd_seq *q = seq_get(c, o->seq);
	const uint32_t L = c->layout.layers, H = c->layout.kv_heads;
	if (w->err) {
		seq_free(c, q); /* building: the name's pages stay as they were */
		kvd_complete(c, w->user_data, w->err, 0, 0);
		return;
	}
	uint32_t n = o->bad; /* pages all read and summarized */
	for (uint32_t l = 0; l < L; l++) {
		q->layer[l].stored = n;
		q->layer[l].ntok = n * c->layout.page_tokens;
	}
	q->own->pages = (uint64_t)n * L * H;
	q->own->building = false;
	if (n < o->n->pages) {
		uint64_t cut = kvd_named_cut(c->d, o->n, n);
		c->tenant->disk_pages -= cut;
		o->n->pages = n;
	}
	c->d->recovery.opens += n > 0;
	kvd_complete(c, w->user_data, (int)q->id, (uint64_t)n * c->layout.page_tokens, 0);
}

static void open_cancel(struct kvd_wait *w)
{
	seq_free(w->c, seq_get(w->c, ((struct kvd_open *)w)->seq));
}

static void open_release(struct kvd_wait *w)
{
	struct kvd_open *o = (struct kvd_open *)w;
	kvt_free(o->buf);
	kvt_free(o->rd);
	kvt_free(o);
}

static bool same_pages(const struct kvt_wire_layout *a, const struct kvt_wire_layout *b)
{
	return a->layers == b->layers && a->kv_heads == b->kv_heads && a->head_dim == b->head_dim &&
	       a->dtype == b->dtype && a->page_tokens == b->page_tokens;
}

/* The name of an OPEN or REMOVE and the tenant's sequence of that name (*n, NULL when
 * none): 0, -EINVAL, or -EFAULT (the client was cut off). */
static int request_named(struct kvd_client *c, const struct kvt_sqe *r, char *name,
			 struct kvd_named **n)
{
	int ret = read_name(c, r, name);
	*n = ret ? NULL : kvd_named_find(c->d, c->tenant->id, name);
	return ret;
}

static void do_open(struct kvd_client *c, const struct kvt_sqe *r)
{
	struct kvd *d = c->d;
	char name[KVT_SEQ_NAME_MAX + 1];
	struct kvd_named *n;
	int ret = request_named(c, r, name, &n);
	if (ret == -EFAULT)
		return;
	if (ret == 0 && r->flags & ~(KVT_OPEN_CREATE | KVT_OPEN_EXCL))
		ret = -EINVAL;
	else if (ret == 0 && n && (r->flags & KVT_OPEN_CREATE) && (r->flags & KVT_OPEN_EXCL))
		ret = -EEXIST;
	else if (ret == 0 && !n && !(r->flags & KVT_OPEN_CREATE))
		ret = -ENOENT;
	else if (ret == 0 && n && n->open)
		ret = -EBUSY;
	else if (ret == 0 && n && !same_pages(&n->layout, &c->layout))
		ret = -EINVAL;
	if (ret < 0) {
		kvd_complete(c, r->user_data, ret, 0, 0);
		return;
	}
	const uint32_t L = c->layout.layers, H = c->layout.kv_heads, pb = c->page_bytes;
	struct kvd_open *o = kvt_calloc(1, sizeof(*o));
	struct kvd_seq *q = o ? seq_new(c) : NULL;
	if (!q) {
		kvt_free(o);
		kvd_complete(c, r->user_data, c->nseqs >= d->cfg.max_seqs ? -EMFILE : -ENOMEM, 0, 0);
		return;
	}
	if (!n && (ret = kvd_named_create(d, c->tenant, name, &c->layout, &n)) < 0) {
		seq_free(c, q);
		kvt_free(o);
		kvd_complete(c, r->user_data, ret, 0, 0);
		return;
	}
	c->tenant->reserved = true;
	q->own->sseq = n->sseq;
	q->own->named = n;
	q->own->building = true;
	n->open = q->own;
	*o = (struct kvd_open){.w = {.d = d, .c = c, .user_data = r->user_data,
				     .start_ns = kvd_now_ns(), .finish = open_finish,
				     .cancel = open_cancel, .release = open_release},
			       .n = n, .seq = q->id, .pages = n->pages, .bad = n->pages};
	/* a batch: at most a quarter of the tenant's host arena and 64 MiB, at least one
	 * page index */
	uint64_t per = (uint64_t)L * H * pb, room = c->tenant->host_bytes / 4;
	o->batch_max = (uint32_t)((room < (64u << 20) ? room : (64u << 20)) / per);
	if (o->batch_max < 1)
		o->batch_max = 1;
	if (o->batch_max > 64)
		o->batch_max = 64;
	if (o->batch_max > o->pages)
		o->batch_max = o->pages;
	for (uint32_t l = 0; l < L && !ret; l++)
		ret = layer_reserve(c, &q->layer[l], o->pages + 1);
	if (!ret && o->pages &&
	    (!(o->buf = kvt_malloc((size_t)o->batch_max * per)) ||
	     !(o->rd = kvt_calloc((size_t)o->batch_max * L * H, sizeof(*o->rd)))))
		ret = -ENOMEM;
	if (ret < 0)
		o->w.err = ret;
	else if (o->pages)
		open_batch(o);
	if (o->w.pending) {
		c->busy = &o->w;
		return;
	}
	open_finish(&o->w);
	open_release(&o->w);
}

struct kvd_sync {
	struct kvd_wait w;
	uint32_t tokens;
};

static void sync_cb(void *arg, int res)
{
	struct kvd_sync *y = arg;
	y->w.pending--;
	y->w.start_ns = kvd_now_ns();
	if (res < 0 && !y->w.err)
		y->w.err = res;
	wait_done(&y->w);
}

static void sync_finish(struct kvd_wait *w)
{
	struct kvd_sync *y = (struct kvd_sync *)w;
	kvd_complete(w->c, w->user_data, w->err, w->err ? 0 : y->tokens, 0);
}

static void sync_release(struct kvd_wait *w)
{
	kvt_free(w);
}

/* Every full page of the sequence on NVMe (of its parents too, for a fork). */
static void do_sync(struct kvd_client *c, const struct kvt_sqe *r)
{
	struct kvd *d = c->d;
	struct kvd_seq *q = seq_get(c, r->seq);
	const uint32_t L = c->layout.layers, H = c->layout.kv_heads;
	int ret = q ? 0 : -ENOENT;
	uint32_t full = UINT32_MAX;
	for (uint32_t l = 0; l < L && !ret; l++) {
		ret = flush_pending(c, q, l);
		if (q->layer[l].stored < full)
			full = q->layer[l].stored;
	}
	struct kvd_sync *y = ret ? NULL : kvt_calloc(1, sizeof(*y));
	if (!y) {
		kvd_complete(c, r->user_data, ret ? ret : -ENOMEM, 0, 0);
		return;
	}
	y->w = (struct kvd_wait){.d = d, .c = c, .user_data = r->user_data,
				 .start_ns = kvd_now_ns(), .finish = sync_finish,
				 .release = sync_release};
	y->tokens = full * c->layout.page_tokens;
	for (uint32_t l = 0; l < L && !ret; l++) {
		struct kvd_layer *Ly = &q->layer[l];
		for (uint32_t i = 0; i < Ly->stored && !ret; i++)
			for (uint32_t h = 0; h < H && !ret; h++) {
				struct page_key k = {.tenant = c->tenant->id, .layer = (uint16_t)l,
						     .kv_head = (uint16_t)h,
						     .seq = Ly->owner[i]->sseq, .index = i};
				ret = kvt_store_writeback(d->store, &k, sync_cb, y);
				if (ret == 0)
					y->w.pending++;
				else if (ret == -ENOENT)
					ret = -EIO; /* the store lost it (every copy bad) */
			}
	}
	if (ret < 0)
		y->w.err = ret;
	if (y->w.pending) {
		c->busy = &y->w;
		return;
	}
	sync_finish(&y->w);
	sync_release(&y->w);
}

static void do_remove(struct kvd_client *c, const struct kvt_sqe *r)
{
	struct kvd *d = c->d;
	char name[KVT_SEQ_NAME_MAX + 1];
	struct kvd_named *n;
	int ret = request_named(c, r, name, &n);
	if (ret == -EFAULT)
		return;
	if (ret == 0)
		ret = !n ? -ENOENT : n->open ? -EBUSY : 0;
	if (ret == 0) {
		uint64_t sseq = n->sseq, pages = (uint64_t)n->pages * n->layout.layers *
						  n->layout.kv_heads;
		/* journaled first: a crash between the two leaves pages nobody names, which
		 * the next start drops */
		if ((ret = kvd_named_remove(d, n)) == 0) {
			drop_store_seq(d, c->tenant->id, sseq);
			c->tenant->disk_pages -= pages;
		}
	}
	kvd_complete(c, r->user_data, ret, 0, 0);
}

/* ---- dispatch ---- */

void kvd_engine_request(struct kvd_client *c, const struct kvt_sqe *r)
{
	struct kvd_seq *q = NULL;
	if ((r->op == KVT_OP_SEQ_CLOSE || r->op == KVT_OP_SEQ_FORK || r->op == KVT_OP_SEQ_INFO ||
	     r->op == KVT_OP_SEQ_SYNC) &&
	    (r->seq >= c->d->cfg.max_seqs || r->layer >= c->layout.layers)) {
		kvd_client_kill(c, KVD_DISC_BAD_REQUEST, "request %u: sequence id %u or layer %u out of range", r->op,
				r->seq, r->layer);
		return;
	}
	/* what the client asks next runs after the seals queued (and sees them) */
	if (c->nseals && !(r->op == KVT_OP_APPEND && (r->flags & KVT_APPEND_PAGES)))
		kvd_seal_flush(c);
	switch (r->op) {
	case KVT_OP_NOP:
		kvd_complete(c, r->user_data, 0, 0, 0);
		return;
	case KVT_OP_SEQ_CREATE:
		q = seq_new(c);
		kvd_complete(c, r->user_data,
			     q ? (int)q->id : c->nseqs >= c->d->cfg.max_seqs ? -EMFILE : -ENOMEM, 0, 0);
		return;
	case KVT_OP_SEQ_CLOSE:
		if (!(q = seq_get(c, r->seq))) {
			kvd_complete(c, r->user_data, -ENOENT, 0, 0);
			return;
		}
		reads_check(c); /* its pages may be under the client's last attend still */
		seq_free(c, q);
		kvd_complete(c, r->user_data, 0, 0, 0);
		return;
	case KVT_OP_SEQ_FORK:
		do_fork(c, r);
		return;
	case KVT_OP_APPEND:
		do_append(c, r);
		return;
	case KVT_OP_SELECT:
		do_select(c, r);
		return;
	case KVT_OP_STATS:
		if (!in_data(c, r->off[0], sizeof(struct kvtier_prefetch_stats))) {
			kvd_client_kill(c, KVD_DISC_BAD_REQUEST, "STATS out of bounds (off %llu)",
					(unsigned long long)r->off[0]);
			return;
		}
		if (r->seq != KVT_SEQ_ALL && !(q = seq_get(c, r->seq))) {
			kvd_complete(c, r->user_data, -ENOENT, 0, 0);
			return;
		}
		kvd_fast_tick(c); /* the selections whose reports are in */
		memcpy(c->data + r->off[0], r->seq == KVT_SEQ_ALL ? &c->pf : &q->st,
		       sizeof(struct kvtier_prefetch_stats));
		kvd_complete(c, r->user_data, 0, 0, 0);
		return;
	case KVT_OP_SEQ_OPEN:
		do_open(c, r);
		return;
	case KVT_OP_SEQ_SYNC:
		do_sync(c, r);
		return;
	case KVT_OP_SEQ_REMOVE:
		do_remove(c, r);
		return;
	case KVT_OP_FEEDBACK:
		kvd_fast_feedback(c, r);
		return;
	case KVT_OP_SEQ_INFO:
		if (!(q = seq_get(c, r->seq)) || r->layer >= c->layout.layers) {
			kvd_complete(c, r->user_data, q ? -EINVAL : -ENOENT, 0, 0);
			return;
		}
		kvd_complete(c, r->user_data, (int)q->layer[r->layer].ntok,
			     q->layer[r->layer].stored, 0);
		return;
	default:
		kvd_client_kill(c, KVD_DISC_BAD_REQUEST, "unknown request op %u", r->op);
	}
}

int kvd_engine_attach(struct kvd_client *c)
{
	c->rec_bytes = kvt_summary_record_bytes(&c->geom);
	c->seqs = kvt_calloc(c->d->cfg.max_seqs, sizeof(*c->seqs));
	c->seals = kvt_malloc(SEAL_BATCH_MAX * sizeof(*c->seals));
	c->seal_recs = kvt_malloc((size_t)SEAL_BATCH_MAX * c->layout.kv_heads * sizeof(int32_t));
	c->copies = kvt_malloc((size_t)SEAL_BATCH_MAX * c->layout.kv_heads * sizeof(*c->copies));
	return c->seqs && c->seals && c->seal_recs && c->copies ? 0 : -ENOMEM; /* detach frees them */
}

void kvd_engine_detach(struct kvd_client *c)
{
	kvd_seal_flush(c); /* none queued outside a drain of the ring; made, not left */
	kvt_free(c->seals);
	kvt_free(c->seal_recs);
	kvt_free(c->copies);
	c->seals = NULL;
	c->seal_recs = NULL;
	c->copies = NULL;
	kvd_pf_add(&c->d->pf_gone, &c->pf);
	memset(&c->pf, 0, sizeof(c->pf));
	if (c->busy) {
		struct kvd_wait *w = c->busy;
		w->c = NULL; /* finishes on its own, posting nothing */
		w->retry = NULL;
		c->busy = NULL;
		if (!w->pending)
			w->release(w);
	}
	/* gone: its reads with it (or cut off: they only hurt itself) */
	c->reads_busy = false;
	deferred_release(c);
	kvt_free(c->deferred);
	c->deferred = NULL;
	c->defcap = 0;
	for (uint32_t i = 0; c->seqs && i < c->d->cfg.max_seqs && c->nseqs; i++)
		if (c->seqs[i])
			seq_free(c, c->seqs[i]);
	kvt_free(c->seqs);
	c->seqs = NULL;
	kvd_fast_detach(c);
	if (c->sum_pool)
		kvt_compute_free(c->d->cc, c->sum_pool);
	c->sum_pool = NULL;
	kvt_free(c->sum_free);
	c->sum_free = NULL;
}

void kvd_engine_tick(struct kvd *d)
{
	uint64_t now = kvd_now_ns();
	struct kvd_client *c;
	kvt_list_for_each_entry(c, &d->clients, link)
	{
		reads_tick(c);
		kvd_fast_tick(c);
		struct kvd_wait *w = c->busy;
		if (!w)
			continue;
		if (now - w->start_ns > (uint64_t)d->cfg.promote_timeout_ms * 1000000ull) {
			kvt_warn("engine", "client %u: pages not brought up in %u ms (GPU pool too "
				 "small for the pinned selections?): %u moves pending, %u refused, "
				 "%u pins kept for its reads%s", c->id, d->cfg.promote_timeout_ms,
				 w->pending, w->retry == sel_retry ? ((struct kvd_select *)w)->ntodo : 0,
				 c->ndeferred, c->ndeferred ? " (still running)" : "");
			struct kvt_store_stats st;
			kvt_store_stats(d->store, &st);
			kvt_warn("engine", "  gpu slots %llu/%llu, host %llu/%llu, dirty %llu, refused %llu",
				 (unsigned long long)st.tier[0].used, (unsigned long long)st.tier[0].slots,
				 (unsigned long long)st.tier[1].used, (unsigned long long)st.tier[1].slots,
				 (unsigned long long)st.pages_dirty, (unsigned long long)st.backpressure);
			kvd_complete(c, w->user_data, -ENOBUFS, 0, 0);
			if (w->cancel)
				w->cancel(w);
			c->busy = NULL;
			c->kicked = true;
			w->c = NULL;
			w->retry = NULL;
			if (!w->pending)
				w->release(w);
			continue;
		}
		if (w->retry)
			w->retry(w);
	}
	struct kvd_zombie *z, *zt;
	kvt_list_for_each_entry_safe(z, zt, &d->zombies, link)
	{
		int ret = kvt_store_drop_seq(d->store, z->tenant, z->sseq);
		if (ret == -EBUSY)
			continue;
		kvt_list_del(&z->link);
		kvt_free(z);
	}
}

void kvd_engine_stop(struct kvd *d)
{
	if (d->sel_phase_n) {
		const double n = (double)d->sel_phase_n * 1e3;
		kvt_notice("engine", "%llu selects, daemon time per select: inputs %.1f us, copies "
			   "and kernels %.1f us (%.1f waiting for the device), pins (and substitution) "
			   "%.1f us, finding pages %.1f us, plan and prefetches %.1f us (after the "
			   "answer when it waits for nothing), answer %.1f us",
			   (unsigned long long)d->sel_phase_n, (double)d->sel_phase_ns[SEL_INPUTS] / n,
			   (double)d->sel_phase_ns[SEL_DEVICE] / n, (double)d->sel_phase_ns[SEL_WAIT] / n,
			   (double)d->sel_phase_ns[SEL_RANK] / n, (double)d->sel_phase_ns[SEL_WHERE] / n,
			   (double)d->sel_phase_ns[SEL_PLAN] / n, (double)d->sel_phase_ns[SEL_ANSWER] / n);
	}
	for (int i = 0; i < SCR_MAX; i++)
		if (d->scr[i].p)
			kvt_compute_free(d->cc, d->scr[i].p);
	for (int i = 0; i < 3; i++)
		kvt_compute_host_free(d->cc, d->pin[i]);
	struct kvd_zombie *z, *zt;
	kvt_list_for_each_entry_safe(z, zt, &d->zombies, link)
	{
		kvt_store_drop_seq(d->store, z->tenant, z->sseq);
		kvt_free(z);
	}
}
