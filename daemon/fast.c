// SPDX-License-Identifier: MIT
/*
 * The fast path (ipc/wire.h): a client that picks its own pages on its own stream,
 * from summaries and a map of leased slots that the daemon keeps in GPU memory both
 * processes map. The daemon never stands between a layer and its attention: it hears
 * of each selection afterwards (KVT_OP_FEEDBACK, read once the client's kernel has
 * written it), leases what the selection missed (pinned in the GPU pool, its slot
 * written into the map once the page is there), and takes back leases of pages not
 * selected for fast.lease_steps steps of their layer: -1 into the map first, the pin
 * let go only once the client's reads that may have seen the old slot have ended.
 *
 * A lease is one pin of the page in the store: the store never moves a leased page.
 * What the client reads through the map is therefore always the page the map names;
 * a page not leased in time is left out of that step's table, counted (missed), and
 * leased for the next.
 *
 * A lease names the page where it is: a GPU slot, or, for a page in host RAM, its host
 * slot (KVT_SLOT_HOST), which the client's attention may read in place (the client
 * does so only for pages whose score says they may matter: the bus is slow). A page
 * only on NVMe is read into host RAM first (pages that may not matter only while
 * fewer than fast.disk_reads reads are under way; those the client waits for ahead of
 * every read and write no one waits for: kvt_store_hurry). So a lease is granted at once
 * for most pages, and its copy to the GPU starts then (at most FAST_PROMOTING at once;
 * the others when selected again): once there, the map entry names the GPU slot. The
 * pin keeps the host copy until the lease goes, so reads of either are good while the
 * map changes.
 */
#include "kvtierd.h"

#include "daemon/alloc.h"
#include "daemon/log.h"

#include <errno.h>
#include <string.h>

#define FB_MAX	     65536u	 /* feedbacks waiting for their kernels */
#define LEASE_NONE   (-1)
#define LEASE_COMING (-2)
#define LEASE_PROMOTING 0x20000000 /* with a host slot: a copy to the GPU under way */
#define FAST_PROMOTING	4096u	   /* host leases being copied to the GPU at once */
/* A page leased for a report's wait ahead of the reports before it counts as selected
 * this many steps ahead of its layer's count until its own report says so: the sweeps of
 * the reports before it (which compare steps signed) keep it. */
#define LEASE_AHEAD 1024u
/* A lookup in the store is two cache misses (its bucket, its page) once it holds millions
 * of pages: the release of many leases warms the bucket WARM_BUCKET lookups ahead and the
 * page WARM_PAGE ahead (kvt_store_warm), so that their misses overlap (H100, batch 8, 32K:
 * releases 0.56-0.69x a report, fast.warm off and on in one call). The selections' lease
 * starts did not gain from it (their pages are mostly near ones used lately: in cache). */
#define WARM_BUCKET 8u
#define WARM_PAGE   4u
/* A tick's reports stop after this much of their work (at least one goes), so that the
 * ring is read again: a report's waits are heard of, and leased ahead, within about one
 * report's work (~1.1 ms at batch 32 on the H200) instead of a whole backlog's. */
#define FAST_TICK_NS 250000u
/* Reports of fewer sequences are read on the loop's thread alone (the pool's hand-off,
 * a few microseconds, is more than they cost). */
#define FAST_POOL_MIN 4u

/* A report's first pass (fb_seq): what it found for the second (fb_apply). */
struct fb_act {
	struct kvt_page_ref *ref;
	uint32_t b, p;
	uint16_t h;
	bool start; /* a new lease; else a host lease's copy to the GPU */
	bool matters;
};

struct fb_rv {
	int64_t pos;
	struct page_key k;
};

struct kvd_fb_part {
	struct fb_act *act;
	uint32_t nact, actcap;
	struct fb_rv *rv;
	uint32_t nrv, rvcap;
	uint64_t fresh, pressured;
	struct kvtier_prefetch_stats pf; /* steps, selected, hit, host, late, missed */
};

int kvd_fast_attach(struct kvd_client *c, uint32_t pages, uint32_t seqs)
{
	struct kvd *d = c->d;
	struct kvt_device *dev = kvt_store_device(d->store);
	if (!pages || !seqs)
		return 0;
	if (!c->fence)
		return -EOPNOTSUPP; /* leases cannot be taken back without the read fence */
	if (seqs > d->cfg.max_seqs || pages > (1u << 24))
		return -EINVAL;
	const uint64_t n = (uint64_t)c->layout.layers * seqs * c->layout.kv_heads * pages;
	const uint64_t sum = (n * c->rec_bytes + 4095) & ~4095ull;
	const uint64_t bytes = sum + n * sizeof(int32_t);
	if (n > INT32_MAX || bytes > d->cfg.fast_bytes_max)
		return -E2BIG;
	int ret = dev->ops->mem_create(dev, bytes, &c->fast);
	if (ret < 0)
		return ret;
	c->fast_pages = pages;
	c->fast_seqs = seqs;
	c->fast_map_off = sum;
	if ((ret = kvt_compute_memset(d->cc, (uint8_t *)c->fast.ptr + sum, 0xff,
				      n * sizeof(int32_t))) < 0) {
		dev->ops->mem_destroy(dev, &c->fast);
		memset(&c->fast, 0, sizeof(c->fast));
		c->fast_pages = c->fast_seqs = 0;
		return ret;
	}
	return 0;
}

/* Leases taken back whose reads have ended: their pins go (all of them when the
 * client is gone). */
static void revoked_release(struct kvd_client *c, bool all)
{
	if (!c->nrevoked)
		return;
	struct kvd *d = c->d;
	bool done = all || c->dead;
	uint32_t seq = 0;
	if (!done) {
		struct kvt_device *dev = kvt_store_device(d->store);
		/* the count first: a record counted is made, and the query sees it or a later one */
		seq = kvt_load_acquire(&c->hdr->fence_seq);
		int ret = dev->ops->fence_query(dev, c->fence);
		if (ret < 0 && ret != -EAGAIN) {
			kvd_client_kill(c, KVD_DISC_ERROR, "its read fence: %s", strerror(-ret));
			return; /* detach releases them */
		}
		if (ret == -EAGAIN)
			return;
	}
	while (c->nrevoked) {
		struct kvd_revoked *r = &c->revoked[c->rv_head];
		if (!done && (int32_t)(seq - r->snap) < 2)
			break;
		if (d->cfg.fast_warm) { /* the lookups ahead: WARM_BUCKET */
			const uint32_t n = c->nrevoked, cap = c->revokedcap, at = c->rv_head;
			if (WARM_BUCKET < n)
				kvt_store_warm(d->store, &c->revoked[(at + WARM_BUCKET) % cap].k, false);
			if (WARM_PAGE < n)
				kvt_store_warm(d->store, &c->revoked[(at + WARM_PAGE) % cap].k, true);
		}
		kvt_store_unpin(d->store, &r->k);
		c->rv_head = (c->rv_head + 1) % c->revokedcap;
		c->nrevoked--;
	}
	if (!c->nrevoked)
		c->rv_head = 0;
}

static int revoked_push(struct kvd_client *c, const struct page_key *k, uint32_t snap)
{
	if (c->nrevoked == c->revokedcap) {
		uint32_t nc = c->revokedcap ? c->revokedcap * 2 : 1024;
		struct kvd_revoked *n = kvt_malloc(nc * sizeof(*n));
		if (!n)
			return -ENOMEM;
		for (uint32_t i = 0; i < c->nrevoked; i++)
			n[i] = c->revoked[(c->rv_head + i) % c->revokedcap];
		kvt_free(c->revoked);
		c->revoked = n;
		c->revokedcap = nc;
		c->rv_head = 0;
	}
	c->revoked[(c->rv_head + c->nrevoked) % c->revokedcap] = (struct kvd_revoked){*k, snap};
	c->nrevoked++;
	return 0;
}

/*
 * The map writes made, then the leases they took back start waiting for the client's
 * reads: a read the client queues from now on sees -1, and the fence it records twice
 * more marks the end of every read queued before.
 */
static void map_flush(struct kvd_client *c, bool closing)
{
	struct kvd *d = c->d;
	if (c->npairs) {
		int ret = kvt_scatter_i32(d->cc, (int32_t *)((uint8_t *)c->fast.ptr + c->fast_map_off),
					  c->pairs, c->npairs);
		if (ret < 0) {
			/* the map may still name slots taken back: they stay pinned (until the
			 * client detaches), never reused under it */
			kvt_err("fast", "client %u: map writes failed (%s): %u leases kept", c->id,
				strerror(-ret), c->nrevoking);
			kvd_client_kill(c, KVD_DISC_ERROR, "fast-path map: %s", strerror(-ret));
			return;
		}
		c->npairs = 0;
	}
	if (!c->nrevoking)
		return;
	/* A sequence closing: the client queues no more reads of it, and those queued are
	 * behind the fence it recorded last (kvd_client_unpin waits for that one). */
	const uint32_t snap = kvt_load_acquire(&c->hdr->fence_seq);
	for (uint32_t i = 0; i < c->nrevoking; i++)
		if (closing)
			kvd_client_unpin(c, &c->revoking[i]);
		else if (c->dead)
			kvt_store_unpin(d->store, &c->revoking[i]);
		else if (revoked_push(c, &c->revoking[i], snap) < 0)
			kvd_client_unpin(c, &c->revoking[i]); /* out of memory: the older way */
	c->nrevoking = 0;
}

static int pair_push(struct kvd_client *c, int64_t pos, int32_t v)
{
	if (c->npairs == c->paircap) {
		uint32_t nc = c->paircap ? c->paircap * 2 : 1024;
		int32_t *n = kvt_realloc(c->pairs, (size_t)nc * 2 * sizeof(int32_t));
		if (!n)
			return -ENOMEM;
		c->pairs = n;
		c->paircap = nc;
	}
	c->pairs[2 * c->npairs] = (int32_t)pos;
	c->pairs[2 * c->npairs + 1] = v;
	c->npairs++;
	return 0;
}

/* -1 into the map for k's position; its pin waits for the client's reads. */
static void lease_revoke(struct kvd_client *c, int64_t pos, const struct page_key *k)
{
	if (c->nrevoking == c->revokingcap) {
		uint32_t nc = c->revokingcap ? c->revokingcap * 2 : 1024;
		struct page_key *n = kvt_realloc(c->revoking, nc * sizeof(*n));
		if (n) {
			c->revoking = n;
			c->revokingcap = nc;
		}
	}
	if (c->nrevoking == c->revokingcap || pair_push(c, pos, LEASE_NONE) < 0) {
		/* no memory to take it back safely: the lease stays pinned until detach */
		kvt_warn("fast", "client %u: out of memory taking a lease back", c->id);
		return;
	}
	c->revoking[c->nrevoking++] = *k;
	c->fast_revokes++;
}

void kvd_fast_detach(struct kvd_client *c)
{
	struct kvd *d = c->d;
	/* sequences are gone (their leases with them): what remains are pins */
	for (uint32_t i = 0; i < c->nrevoking; i++)
		kvt_store_unpin(d->store, &c->revoking[i]);
	c->nrevoking = 0;
	revoked_release(c, true);
	kvt_free(c->revoking);
	kvt_free(c->revoked);
	kvt_free(c->pairs);
	kvt_free(c->fb);
	for (uint32_t i = 0; i < c->nacks; i++)
		kvt_free(c->acks[i].pg);
	kvt_free(c->acks);
	for (unsigned w = 0; w < c->fb_nparts; w++) {
		kvt_free(c->fb_parts[w].act);
		kvt_free(c->fb_parts[w].rv);
	}
	kvt_free(c->fb_parts);
	c->fb_parts = NULL;
	c->fb_nparts = 0;
	c->acks = NULL;
	c->nacks = c->ackcap = 0;
	c->revoking = NULL;
	c->revoked = NULL;
	c->pairs = NULL;
	c->fb = NULL;
	c->nfb = c->fbcap = c->npairs = c->paircap = c->revokingcap = c->revokedcap = 0;
	if (c->fast.ptr) {
		struct kvt_device *dev = kvt_store_device(d->store);
		dev->ops->mem_destroy(dev, &c->fast);
		memset(&c->fast, 0, sizeof(c->fast));
	}
}

int64_t kvd_fast_pos(const struct kvd_client *c, const struct kvd_seq *q, uint32_t layer,
		     uint32_t h, uint32_t idx)
{
	if (!c->fast.ptr || q->id >= c->fast_seqs || idx >= c->fast_pages)
		return -1;
	return (((int64_t)layer * c->fast_seqs + q->id) * c->layout.kv_heads + h) * c->fast_pages +
	       idx;
}

int kvd_fast_layer_grow(struct kvd_client *c, struct kvd_layer *L, uint32_t old_cap,
			uint32_t new_cap)
{
	if (!c->fast.ptr)
		return 0;
	const uint32_t H = c->layout.kv_heads;
	struct kvd_lease *lease = kvt_malloc((size_t)H * new_cap * sizeof(*lease));
	if (!lease)
		return -ENOMEM;
	for (size_t i = 0; i < (size_t)H * new_cap; i++)
		lease[i] = (struct kvd_lease){LEASE_NONE, 0};
	for (uint32_t h = 0; h < H && old_cap && L->lease; h++)
		memcpy(lease + (size_t)h * new_cap, L->lease + (size_t)h * old_cap,
		       old_cap * sizeof(*lease));
	kvt_free(L->lease);
	L->lease = lease;
	return 0;
}

void kvd_fast_seq_free(struct kvd_client *c, struct kvd_seq *q)
{
	struct kvd *d = c->d;
	for (uint32_t l = 0; l < c->layout.layers; l++) {
		struct kvd_layer *L = &q->layer[l];
		bool any = false;
		for (uint32_t j = 0; j < L->nleased; j++) {
			uint32_t h = L->leased[j] >> 24, p = L->leased[j] & 0xffffff;
			int32_t *ls = &L->lease[(size_t)h * L->cap + p].slot;
			struct page_key k = kvd_page_key(c, q, l, h, p);
			if (*ls == LEASE_COMING) {
				kvt_store_unpin(d->store, &k); /* never in the map */
			} else if (*ls >= 0) {
				lease_revoke(c, kvd_fast_pos(c, q, l, h, p), &k);
				any = true;
			}
			*ls = LEASE_NONE;
		}
		L->nleased = 0;
		if (any)
			map_flush(c, true);
		kvt_free(L->lease);
		kvt_free(L->leased);
		L->lease = NULL;
		L->leased = NULL;
		L->leasecap = 0;
	}
}

/* ---- leases ---- */

struct lease_cb {
	struct kvd *d;
	uint32_t client, seq, layer, h, p;
	uint64_t gen, t0; /* t0: the loop's clock (d->now_ns) */
	struct kvt_page_ref *ref; /* the page, good while the store's drops are still `drops` */
	uint64_t drops;
	bool promote; /* a host lease's copy to the GPU (else a read from NVMe) */
	bool waited;  /* a read the client waits for (hurried) */
};

/* The leased page's info as its copy lands, looked up again only if the store has
 * dropped pages since the lease took its reference. */
static int cb_info(struct kvd_client *c, struct kvd_seq *q, const struct lease_cb *a,
		   struct kvt_page_info *pi)
{
	if (a->ref && kvt_store_drops(c->d->store) == a->drops) {
		kvt_store_ref_info(a->ref, pi);
		return 0;
	}
	struct page_key k = kvd_page_key(c, q, a->layer, a->h, a->p);
	return kvt_store_page_info(c->d->store, &k, pi);
}

/* Where a lease of the page can name it now: a GPU slot, a host slot, or -1. */
static int32_t lease_slot(const struct kvt_page_info *pi)
{
	if (pi->valid & (1u << TIER_GPU))
		return (int32_t)TIER_SLOT_INDEX(pi->slot[TIER_GPU]);
	if (pi->valid & (1u << TIER_HOST))
		return (int32_t)TIER_SLOT_INDEX(pi->slot[TIER_HOST]) | KVT_SLOT_HOST;
	return LEASE_NONE;
}

static void grant(struct kvd_client *c, struct kvd_seq *q, uint32_t layer, uint32_t h,
		  uint32_t p, int32_t slot)
{
	struct kvd_layer *L = &q->layer[layer];
	if (pair_push(c, kvd_fast_pos(c, q, layer, h, p), slot) < 0) {
		/* not in the map: the client cannot see it, so it is no lease */
		struct page_key k = kvd_page_key(c, q, layer, h, p);
		kvt_store_unpin(c->d->store, &k);
		L->lease[(size_t)h * L->cap + p].slot = LEASE_NONE;
		return;
	}
	L->lease[(size_t)h * L->cap + p].slot = slot;
	c->fast_grants++;
}

/* A host lease's page landed on the GPU (or did not): the map names the GPU slot now. */
static void promoted(struct kvd_client *c, struct kvd_seq *q, const struct lease_cb *a, int res)
{
	struct kvd_layer *L = &q->layer[a->layer];
	int32_t *ls = &L->lease[(size_t)a->h * L->cap + a->p].slot;
	struct kvt_page_info pi;
	if (*ls < 0 || !(*ls & KVT_SLOT_HOST))
		return; /* taken back (and maybe leased again) meanwhile */
	*ls &= ~LEASE_PROMOTING;
	if (res < 0 || cb_info(c, q, a, &pi) < 0 || !(pi.valid & (1u << TIER_GPU)))
		return; /* it stays a host lease */
	const int32_t slot = (int32_t)TIER_SLOT_INDEX(pi.slot[TIER_GPU]);
	if (pair_push(c, kvd_fast_pos(c, q, a->layer, a->h, a->p), slot) < 0)
		return;
	*ls = slot;
	c->fast_copied++;
	c->fast_grant_ns += c->d->now_ns - a->t0;
	c->pf.bytes_h2d += c->page_bytes;
}

static void lease_promote(struct kvd_client *c, struct kvd_seq *q, uint32_t layer, uint32_t h,
			  uint32_t p, struct kvt_page_ref *r);

static void lease_cb_fn(void *arg, int res)
{
	struct lease_cb *a = arg;
	struct kvd *d = a->d;
	struct kvd_client *c = kvd_client_by_id(d, a->client);
	struct kvd_seq *q = c && !c->dead ? kvd_seq_get(c, a->seq) : NULL;
	if (c && a->promote)
		c->fast_promoting--;
	else if (c)
		c->fast_reading--;
	if (!q || q->gen != a->gen) { /* closed: its close let the pin go */
		kvt_free(a);
		return;
	}
	if (a->promote) {
		promoted(c, q, a, res);
		kvt_free(a);
		return;
	}
	struct kvd_layer *L = &q->layer[a->layer];
	int32_t *ls = &L->lease[(size_t)a->h * L->cap + a->p].slot;
	struct page_key k = kvd_page_key(c, q, a->layer, a->h, a->p);
	struct kvt_page_info pi;
	if (*ls != LEASE_COMING) {
		kvt_free(a);
		return;
	}
	int32_t slot = LEASE_NONE;
	if (res == 0 && cb_info(c, q, a, &pi) == 0)
		slot = lease_slot(&pi);
	if (a->waited) {
		c->fast_wait_reads++;
		c->fast_wait_read_ns += d->now_ns - a->t0;
	}
	if (slot >= 0) {
		grant(c, q, a->layer, a->h, a->p, slot);
		c->pf.bytes_nvme += c->page_bytes;
		if (slot & KVT_SLOT_HOST)
			lease_promote(c, q, a->layer, a->h, a->p, NULL);
	} else {
		kvt_store_unpin(d->store, &k);
		*ls = LEASE_NONE; /* the sweep drops it from the list */
		if (res < 0 && res != -EAGAIN)
			kvt_warn("fast", "client %u: page %u of layer %u head %u not read: %s",
				 c->id, a->p, a->layer, a->h, strerror(-res));
	}
	kvt_free(a);
}

static int leased_push(struct kvd_layer *L, uint32_t h, uint32_t p)
{
	if (L->nleased == L->leasecap) {
		uint32_t nc = L->leasecap ? L->leasecap * 2 : 64;
		uint32_t *n = kvt_realloc(L->leased, nc * sizeof(*n));
		if (!n)
			return -ENOMEM;
		L->leased = n;
		L->leasecap = nc;
	}
	L->leased[L->nleased++] = h << 24 | p;
	return 0;
}

/* A page the client selected and found no lease for: pinned, and into the map where it
 * is (GPU or host RAM; from NVMe once read). r: the page looked up already, or NULL. */
static void lease_start(struct kvd_client *c, struct kvd_seq *q, uint32_t layer, uint32_t h,
			uint32_t p, bool matters, bool waited, struct kvt_page_ref *r)
{
	struct kvd *d = c->d;
	struct kvd_layer *L = &q->layer[layer];
	struct page_key k;
	struct kvt_page_info pi;
	if (r) {
		kvt_store_ref_info(r, &pi); /* now: the moves before it may have changed it */
	} else {
		k = kvd_page_key(c, q, layer, h, p);
		if (!(r = kvt_store_lookup(d->store, &k, &pi)))
			return;
	}
	/* the disk is slow: pages that may not matter wait for the next selection when
	 * many reads are under way already */
	if (!(pi.valid & ((1u << TIER_GPU) | (1u << TIER_HOST))) && !matters &&
	    c->fast_reading >= d->cfg.fast_disk_reads)
		return;
	if (leased_push(L, h, p) < 0)
		return;
	if (kvt_store_pin_ref(d->store, r) < 0) {
		L->nleased--;
		return;
	}
	const int32_t slot = lease_slot(&pi);
	if (slot >= 0) {
		grant(c, q, layer, h, p, slot);
		if ((slot & KVT_SLOT_HOST) && L->lease[(size_t)h * L->cap + p].slot == slot)
			lease_promote(c, q, layer, h, p, r); /* read in place until it is there */
		return;
	}
	/* only on NVMe: into host RAM, leased there once read */
	k = kvd_page_key(c, q, layer, h, p);
	struct lease_cb *a = kvt_malloc(sizeof(*a));
	int ret = -ENOMEM;
	if (a) {
		*a = (struct lease_cb){.d = d, .client = c->id, .seq = q->id, .layer = layer,
				       .h = h, .p = p, .gen = q->gen, .t0 = d->now_ns, .ref = r,
				       .drops = kvt_store_drops(d->store), .waited = waited};
		L->lease[(size_t)h * L->cap + p].slot = LEASE_COMING;
		ret = kvt_store_prefetch_ref(d->store, r, TIER_HOST, lease_cb_fn, a);
		c->fast_reading += ret == 0;
		if (ret == 0 && waited) /* ahead of the reads no one waits for */
			kvt_store_hurry(d->store, &k);
	}
	if (ret < 0) {
		kvt_free(a);
		kvt_store_unpin(d->store, &k);
		L->lease[(size_t)h * L->cap + p].slot = LEASE_NONE;
		L->nleased--;
		PF_ADD(c, q, prefetch_refused, 1);
		c->fast_refused++;
		c->fast_pressure = true; /* the sweeps keep only what this step selected */
		return;
	}
	PF_ADD(c, q, prefetch_host, 1);
}

/* A host lease: its page copied to the GPU, the map changed once there (promoted()).
 * r: the page looked up already, or NULL. */
static void lease_promote(struct kvd_client *c, struct kvd_seq *q, uint32_t layer, uint32_t h,
			  uint32_t p, struct kvt_page_ref *r)
{
	struct kvd_layer *L = &q->layer[layer];
	if (!c->d->cfg.fast_promote || c->fast_promoting >= FAST_PROMOTING)
		return; /* read in place meanwhile; the next selection asks again */
	struct page_key k;
	if (!r) {
		k = kvd_page_key(c, q, layer, h, p);
		if (!(r = kvt_store_lookup(c->d->store, &k, NULL)))
			return;
	}
	struct lease_cb *a = kvt_malloc(sizeof(*a));
	if (!a)
		return;
	*a = (struct lease_cb){.d = c->d, .client = c->id, .seq = q->id, .layer = layer, .h = h,
			       .p = p, .gen = q->gen, .t0 = c->d->now_ns, .ref = r,
			       .drops = kvt_store_drops(c->d->store), .promote = true};
	if (kvt_store_prefetch_ref(c->d->store, r, TIER_GPU, lease_cb_fn, a) < 0) {
		kvt_free(a); /* no room in the GPU pool now: it stays a host lease */
		PF_ADD(c, q, prefetch_refused, 1);
		return;
	}
	L->lease[(size_t)h * L->cap + p].slot |= LEASE_PROMOTING;
	c->fast_promoting++;
	PF_ADD(c, q, prefetch_gpu, 1);
}

void kvd_fast_sealed(struct kvd_client *c, const struct kvd_seal *s, uint32_t n)
{
	struct kvd *d = c->d;
	const uint32_t H = c->layout.kv_heads;
	if (c->dead)
		return;
	bool any = false;
	for (uint32_t i = 0; i < n; i++) {
		struct kvd_layer *L = &s[i].q->layer[s[i].layer];
		const uint32_t idx = s[i].idx;
		if (s[i].res < 0)
			continue;
		/* a layer not decoding yet (a prefill) leases nothing: no step would read it soon */
		if (kvd_fast_pos(c, s[i].q, s[i].layer, 0, idx) < 0 || !L->fsteps)
			continue;
		if (!L->lease && kvd_fast_layer_grow(c, L, 0, L->cap) < 0)
			continue;
		/* the window selects it at the next step: leased now, in the map before the answer */
		for (uint32_t h = 0; h < H; h++) {
			L->lease[(size_t)h * L->cap + idx].at = L->fsteps;
			if (L->lease[(size_t)h * L->cap + idx].slot == LEASE_NONE)
				lease_start(c, s[i].q, s[i].layer, h, idx, true, false, NULL);
		}
		any = true;
	}
	if (!any)
		return;
	/* every seal's copies under way at once: one wait for all of them */
	const uint64_t t0 = kvd_now_ns();
	for (uint32_t i = 0; i < n; i++) {
		const struct kvd_layer *L = &s[i].q->layer[s[i].layer];
		if (s[i].res < 0 || !L->lease || kvd_fast_pos(c, s[i].q, s[i].layer, 0, s[i].idx) < 0)
			continue;
		for (uint32_t h = 0; h < H;) {
			if (L->lease[(size_t)h * L->cap + s[i].idx].slot != LEASE_COMING) {
				h++;
				continue;
			}
			if (kvd_now_ns() - t0 > (uint64_t)d->cfg.promote_timeout_ms * 1000000ull)
				goto out; /* they come later, into the map then */
			kvt_store_run(d->store, 1);
		}
	}
out:
	map_flush(c, false);
}

/* A page the client waits for: leased, and its read from NVMe (if any) ahead of the
 * others (prefetches, leases of pages that may not matter, the write-back). */
static void lease_wait_start(struct kvd_client *c, struct kvd_seq *q, uint32_t layer, uint32_t h,
			     uint32_t p)
{
	struct kvd_layer *L = &q->layer[layer];
	const size_t at = (size_t)h * L->cap + p;
	if (L->lease[at].slot == LEASE_NONE) {
		lease_start(c, q, layer, h, p, true, true, NULL);
	} else if (L->lease[at].slot == LEASE_COMING) { /* a read started earlier */
		struct page_key k = kvd_page_key(c, q, layer, h, p);
		kvt_store_hurry(c->d->store, &k);
	}
}

/* ---- feedback ---- */

static bool fb_ready(const struct kvd_client *c, const struct kvt_sqe *e)
{
	return __atomic_load_n((const uint32_t *)(c->data + e->off[1]), __ATOMIC_ACQUIRE) ==
	       (uint32_t)e->user_data;
}

/* The layer's lease arrays for a report of seq, or NULL (not a fast-path sequence). */
static struct kvd_layer *fb_layer(struct kvd_client *c, struct kvd_seq *q, uint32_t layer)
{
	if (!q || q->id >= c->fast_seqs)
		return NULL;
	struct kvd_layer *L = &q->layer[layer];
	if (!L->lease && L->cap && kvd_fast_layer_grow(c, L, 0, L->cap) < 0)
		return NULL;
	return L->lease ? L : NULL;
}

static void ack_write(struct kvd_client *c, const struct kvd_ack *a)
{
	__atomic_store_n((uint32_t *)(c->data + a->off + 8), a->token, __ATOMIC_RELEASE);
	const uint64_t ns = kvd_now_ns() - a->t0;
	c->fast_waits++;
	c->fast_waited += a->waited;
	c->fast_wait_ns += ns;
	c->fast_wait_lat[kvt_hist_bucket(ns / 1000)]++;
}

/*
 * The pages a report's client waits for (KVT_PAGE_WAIT), before anything else of it:
 * leased where they are, and the map written; the ack now if none must come from
 * NVMe, else once they have (acks_tick), or once the client has stopped waiting.
 */
static void fb_wait_pass(struct kvd_client *c, const struct kvt_sqe *e, const uint32_t *ids,
			 const int32_t *rep, uint64_t t0)
{
	const uint32_t nseq = e->seq, H = c->layout.kv_heads, layer = e->layer;
	const uint32_t rows = nseq * H, stride = e->out_stride;
	const uint32_t wait_ms = (e->budget + 999) / 1000;
	struct kvd_ack a = {.off = e->off[1], .hold = c->fb_seen, .t0 = t0,
			    .token = (uint32_t)e->user_data,
			    .wait_ns = (uint64_t)(wait_ms < c->d->cfg.promote_timeout_ms
						  ? wait_ms : c->d->cfg.promote_timeout_ms) * 1000000ull};
	uint32_t cap = 0;
	for (uint32_t b = 0; b < nseq; b++) {
		struct kvd_seq *q = kvd_seq_get(c, ids[b]);
		struct kvd_layer *L = fb_layer(c, q, layer);
		for (uint32_t h = 0; L && h < H; h++) {
			const uint32_t row = b * H + h;
			int32_t n = rep[row];
			n = n < 0 ? 0 : n > (int32_t)stride ? (int32_t)stride : n;
			const int32_t *sel = rep + 3 * (size_t)rows + (size_t)row * stride;
			for (int32_t i = 0; i < n; i++) {
				if (!(sel[i] & KVT_PAGE_WAIT))
					continue;
				const int32_t p = sel[i] & ~(KVT_PAGE_MATTERS | KVT_PAGE_WAIT);
				if (p < 0 || (uint32_t)p >= L->stored || (uint32_t)p >= c->fast_pages)
					continue;
				a.waited++;
				const size_t at = (size_t)h * L->cap + (uint32_t)p;
				/* kept by sweeps of reports before this one */
				if (L->lease[at].slot == LEASE_NONE)
					L->lease[at].at = L->fsteps + LEASE_AHEAD;
				lease_wait_start(c, q, layer, h, (uint32_t)p);
				if (L->lease[at].slot != LEASE_COMING && L->lease[at].slot != LEASE_NONE)
					continue; /* in the map */
				if (a.n == cap) {
					const uint32_t nc = cap ? 2 * cap : 16;
					struct kvd_ack_page *pg = kvt_realloc(a.pg, nc * sizeof(*pg));
					if (!pg)
						continue; /* not waited for: acked before it is in */
					a.pg = pg;
					cap = nc;
				}
				a.pg[a.n++] = (struct kvd_ack_page){q->gen, q->id, layer, h, (uint32_t)p};
			}
		}
	}
	if (!a.waited)
		return;
	map_flush(c, false);
	if (!a.n && !c->nacks) {
		ack_write(c, &a);
		kvt_free(a.pg);
		return;
	}
	if (c->nacks == c->ackcap) {
		uint32_t nc = c->ackcap ? 2 * c->ackcap : 16;
		struct kvd_ack *n = kvt_realloc(c->acks, nc * sizeof(*n));
		if (!n) {
			ack_write(c, &a); /* early: the client reads the map as it is */
			kvt_free(a.pg);
			return;
		}
		c->acks = n;
		c->ackcap = nc;
	}
	c->acks[c->nacks++] = a;
}

/* An ack written after its client stopped waiting: the pages not in were left out of
 * that step, counted missed instead of late (waited for), and the first few such acks
 * say why (where the first page missing was). */
static void ack_late(struct kvd_client *c, const struct kvd_ack *a, uint64_t now)
{
	for (uint32_t j = 0; j < a->n; j++) {
		struct kvd_seq *q = kvd_seq_get(c, a->pg[j].seq);
		if (q && q->gen == a->pg[j].gen && q->st.late) {
			q->st.late--;
			q->st.missed++;
		}
		if (c->pf.late) { /* the report's own counts are in (its pass ran) */
			c->pf.late--;
			c->pf.missed++;
		}
	}
	if (c->fast_waits_late++ >= 16)
		return;
	const struct kvd_ack_page *g = &a->pg[0];
	struct kvd_seq *q = kvd_seq_get(c, g->seq);
	struct kvd_layer *L = q && q->gen == g->gen ? &q->layer[g->layer] : NULL;
	const int32_t ls = L && L->lease ? L->lease[(size_t)g->h * L->cap + g->p].slot : LEASE_NONE;
	struct kvt_page_info pi = {0};
	int r = -ENOENT;
	if (q && q->gen == g->gen) {
		struct page_key k = kvd_page_key(c, q, g->layer, g->h, g->p);
		r = kvt_store_page_info(c->d->store, &k, &pi);
	}
	kvt_warn("fast", "client %u: a report of layer %u acked %.1f ms after it was read (its "
			 "client waits %.0f ms): %u of %u pages not in; the first: seq %u head %u "
			 "page %u of %u stored, lease %s, in the store %s (valid %#x, coming %#x)",
		 c->id, g->layer, (double)(now - a->t0) / 1e6, (double)a->wait_ns / 1e6, a->n,
		 a->waited, g->seq, g->h, g->p, L ? L->stored : 0,
		 ls == LEASE_COMING ? "coming" : ls == LEASE_NONE ? "none" : "granted",
		 r == 0 ? "found" : strerror(-r), pi.valid, pi.inflight);
}

/*
 * Acks whose pages are in the map (or gone), in order, the map written first; or whose
 * client has stopped waiting. A page refused (no room in host RAM, e.g. behind the
 * write-back) or whose read failed is tried again meanwhile.
 */
static void acks_tick(struct kvd_client *c)
{
	uint32_t i = 0;
	const uint64_t now = c->nacks ? kvd_now_ns() : 0;
	for (; i < c->nacks; i++) {
		struct kvd_ack *a = &c->acks[i];
		const bool late = now - a->t0 >= a->wait_ns;
		for (uint32_t j = 0; j < a->n && !late;) {
			const struct kvd_ack_page *g = &a->pg[j];
			struct kvd_seq *q = kvd_seq_get(c, g->seq);
			struct kvd_layer *L = q && q->gen == g->gen ? &q->layer[g->layer] : NULL;
			const int32_t *ls =
				L && L->lease ? &L->lease[(size_t)g->h * L->cap + g->p].slot : NULL;
			if (ls && *ls == LEASE_NONE && g->p < L->stored)
				lease_wait_start(c, q, g->layer, g->h, g->p);
			if (ls && (*ls == LEASE_COMING || *ls == LEASE_NONE))
				j++;
			else
				a->pg[j] = a->pg[--a->n];
		}
		if (a->n && !late)
			break;
		if (a->n)
			ack_late(c, a, now);
		ack_write(c, a);
		kvt_free(a->pg);
	}
	if (i) {
		memmove(c->acks, c->acks + i, (c->nacks - i) * sizeof(*c->acks));
		c->nacks -= i;
	}
}

/* The report's sequences and what it says, copied out of shared memory (bounded by
 * kvd_fast_feedback's checks), or NULL: out of memory. kvt_free() the ids. */
static uint32_t *fb_copy(const struct kvd_client *c, const struct kvt_sqe *e, int32_t **rep)
{
	const uint32_t nseq = e->seq, rows = nseq * c->layout.kv_heads;
	const size_t rep_n = 3 * (size_t)rows + (size_t)rows * e->out_stride;
	uint32_t *ids = kvt_malloc(nseq * sizeof(uint32_t) + rep_n * sizeof(int32_t));
	if (!ids)
		return NULL;
	*rep = (int32_t *)(ids + nseq);
	memcpy(ids, c->data + e->off[0], nseq * sizeof(uint32_t));
	memcpy(*rep, c->data + e->off[1] + 64, rep_n * sizeof(int32_t));
	return ids;
}

/* The time since t counted to part; now. */
static uint64_t fast_lap(struct kvd_client *c, enum kvd_fast_ns part, uint64_t t)
{
	const uint64_t now = kvd_now_ns();
	c->fast_ns[part] += now - t;
	return now;
}

static bool fb_waits(const struct kvd_client *c, const struct kvt_sqe *e)
{
	return __atomic_load_n((const uint32_t *)(c->data + e->off[1] + 4), __ATOMIC_RELAXED);
}

/*
 * The pages that the ready reports from `from` on wait for, leased (and acked) ahead of
 * the rest of the reports before them, in order (so are the acks): the client's stream
 * stands still until the ack, and the reports before its own are the daemon's lag, not
 * the wait's (at batch 8 on the H100, ~0.26 ms of fb_process a report and up to 31
 * reports behind: waits of 4-8 ms).
 */
static void fb_waits_ahead(struct kvd_client *c, uint32_t from)
{
	uint64_t t0 = 0;
	for (uint32_t j = from; j < c->nfb && fb_ready(c, &c->fb[j].e); j++) {
		struct kvd_fb *f = &c->fb[j];
		if (f->waits_done || !fb_waits(c, &f->e))
			continue;
		int32_t *rep;
		uint32_t *ids = fb_copy(c, &f->e, &rep);
		if (!ids)
			return; /* in order, with its report */
		f->waits_done = true;
		c->fast_waits_ahead += j > from;
		const uint64_t t = kvd_now_ns();
		t0 = t0 ? t0 : t;
		fb_wait_pass(c, &f->e, ids, rep, t);
		kvt_free(ids);
	}
	if (t0)
		fast_lap(c, KVD_FAST_WAITS, t0);
}

/*
 * Whether a later report, in already, selected for the same layer of the same
 * sequences: this one's selection is then out of date, and its leases would only be
 * revoked or renewed by that one's (at batch 32 the daemon's work a report, ~1.1 ms on
 * the H200, is more than the client's, ~0.2 ms: reports queue up behind it, and leases
 * started for them go to pages the client has moved on from).
 */
static bool fb_superseded(const struct kvd_client *c, uint32_t i)
{
	const struct kvt_sqe *e = &c->fb[i].e;
	for (uint32_t j = i + 1; j < c->nfb; j++) {
		const struct kvt_sqe *n = &c->fb[j].e;
		if (n->layer == e->layer && n->seq == e->seq && fb_ready(c, n) &&
		    !memcmp(c->data + n->off[0], c->data + e->off[0], e->seq * sizeof(uint32_t)))
			return true;
	}
	return false;
}

/*
 * A report is read in two passes. The first, one item a sequence spread over the
 * daemon's pool (fast.threads), reads what the client selected: each page's last
 * selection noted, the pages to lease or copy up found in the store (a lookup of a
 * store of millions of pages is cache misses: at batch 32 most of a report's time), and
 * the leases not selected for `keep` steps listed for taking back. It writes only the
 * sequence's own arrays and its thread's part; the store is only read (no one else
 * calls it meanwhile). The second, on the loop's thread, does what the parts list, in
 * order: the leases taken back, then the new ones and the copies.
 */
struct fb_run {
	struct kvd_client *c;
	const struct kvt_sqe *e;
	const int32_t *rep;
	struct kvd_seq **qs;
	bool stale;
	uint32_t keep;
	uint64_t drops; /* the store's, when the references were taken */
};

static int fb_parts_grow(struct kvd_client *c, unsigned width)
{
	struct kvd_fb_part *n = kvt_realloc(c->fb_parts, width * sizeof(*n));
	if (!n)
		return -ENOMEM;
	memset(n + c->fb_nparts, 0, (width - c->fb_nparts) * sizeof(*n));
	c->fb_parts = n;
	c->fb_nparts = width;
	return 0;
}

static bool part_grow(void **a, uint32_t *cap, size_t size)
{
	const uint32_t nc = *cap ? 2 * *cap : 256;
	void *n = kvt_realloc(*a, (size_t)nc * size);
	if (!n)
		return false;
	*a = n;
	*cap = nc;
	return true;
}

/* Item b of a run: sequence ids[b] of the report (on any of the pool's threads). */
static void fb_seq(void *arg, unsigned w, uint32_t b)
{
	const struct fb_run *run = arg;
	struct kvd_client *c = run->c;
	struct kvd_fb_part *pt = &c->fb_parts[w];
	struct kvd_seq *q = run->qs[b];
	if (!q)
		return;
	const struct kvt_sqe *e = run->e;
	const uint32_t H = c->layout.kv_heads, layer = e->layer;
	const uint32_t rows = e->seq * H, stride = e->out_stride;
	const int32_t *rep = run->rep;
	const struct kvt_store *store = c->d->store;
	struct kvd_layer *L = &q->layer[layer];
	const uint32_t step = ++L->fsteps;
	struct kvtier_prefetch_stats st = {.steps = 1}; /* the sequence's and the client's */
	for (uint32_t h = 0; h < H; h++) {
		const uint32_t row = b * H + h;
		int32_t n = rep[row], nh = rep[rows + row], nhost = rep[2 * rows + row];
		n = n < 0 ? 0 : n > (int32_t)stride ? (int32_t)stride : n;
		nh = nh < 0 ? 0 : nh > n ? n : nh;
		nhost = nhost < 0 ? 0 : nhost > nh ? nh : nhost;
		const int32_t *sel = rep + 3 * (size_t)rows + (size_t)row * stride;
		const struct kvd_lease *lrow = &L->lease[(size_t)h * L->cap];
		int32_t waited = 0;
		for (int32_t i = 0; i < n; i++) {
			const bool matters = sel[i] & KVT_PAGE_MATTERS;
			waited += (sel[i] & KVT_PAGE_WAIT) != 0;
			if (run->stale)
				continue; /* counted only */
			/* the lease 8 entries on, on its way (the row's pages are ~8% of it:
			 * a miss each, which this thread would otherwise wait for in turn) */
			const uint32_t ahead = i + 8 < n ? (uint32_t)(sel[i + 8] & ~(KVT_PAGE_MATTERS |
									   KVT_PAGE_WAIT))
							: UINT32_MAX;
			if (ahead < L->cap)
				__builtin_prefetch(&lrow[ahead], 1);
			int32_t p = sel[i] & ~(KVT_PAGE_MATTERS | KVT_PAGE_WAIT);
			if (p < 0 || (uint32_t)p >= L->stored || (uint32_t)p >= c->fast_pages)
				continue;
			struct kvd_lease *ls = &L->lease[(size_t)h * L->cap + (uint32_t)p];
			pt->fresh += ls->at + 1 != step;
			ls->at = step;
			const bool start = ls->slot == LEASE_NONE;
			if (!start && !(ls->slot >= 0 && (ls->slot & KVT_SLOT_HOST) &&
					!(ls->slot & LEASE_PROMOTING)))
				continue;
			if (!start && !c->d->cfg.fast_promote)
				continue;
			if (pt->nact == pt->actcap &&
			    !part_grow((void **)&pt->act, &pt->actcap, sizeof(*pt->act)))
				continue; /* out of memory: leased when selected again */
			const struct page_key k = kvd_page_key(c, q, layer, h, (uint32_t)p);
			pt->act[pt->nact++] = (struct fb_act){
				.ref = kvt_store_lookup(store, &k, NULL), .b = b, .p = (uint32_t)p,
				.h = (uint16_t)h, .start = start, .matters = matters};
		}
		waited = waited > n - nh ? n - nh : waited;
		st.selected += (uint64_t)n;
		st.hit += (uint64_t)(nh - nhost);
		st.host += (uint64_t)nhost;
		st.late += (uint64_t)waited;
		st.missed += (uint64_t)(n - nh - waited);
	}
	kvd_pf_add(&q->st, &st);
	kvd_pf_add(&pt->pf, &st);
	if (run->stale)
		return;
	/* leases not selected for `keep` steps go back (those not selected now, when the GPU
	 * pool had no room for a lease); failed ones leave the list */
	pt->pressured += run->keep == 1 && c->fast_pressure;
	for (uint32_t j = 0; j < L->nleased;) {
		const uint32_t h = L->leased[j] >> 24, p = L->leased[j] & 0xffffff;
		struct kvd_lease *ls = &L->lease[(size_t)h * L->cap + p];
		if (ls->slot >= 0 && (int32_t)(step - ls->at) >= (int32_t)run->keep &&
		    (pt->nrv < pt->rvcap || part_grow((void **)&pt->rv, &pt->rvcap, sizeof(*pt->rv)))) {
			pt->rv[pt->nrv++] = (struct fb_rv){kvd_fast_pos(c, q, layer, h, p),
							   kvd_page_key(c, q, layer, h, p)};
			ls->slot = LEASE_NONE;
		}
		if (ls->slot == LEASE_NONE)
			L->leased[j] = L->leased[--L->nleased];
		else
			j++;
	}
}

/* What the first pass of a report found, done on the loop's thread: its counts, the
 * leases taken back, then the new leases and the copies up. */
static void fb_apply(struct kvd_client *c, const struct fb_run *run)
{
	struct kvd *d = c->d;
	const uint32_t layer = run->e->layer;
	d->now_ns = kvd_now_ns(); /* the leases' start, once for all of them */
	for (unsigned w = 0; w < c->fb_nparts; w++) {
		struct kvd_fb_part *pt = &c->fb_parts[w];
		c->fast_fresh += pt->fresh;
		c->fast_selected += pt->pf.selected;
		c->fast_pressured += pt->pressured;
		kvd_pf_add(&c->pf, &pt->pf);
		for (uint32_t i = 0; i < pt->nrv; i++)
			lease_revoke(c, pt->rv[i].pos, &pt->rv[i].k);
	}
	for (unsigned w = 0; w < c->fb_nparts; w++) {
		struct kvd_fb_part *pt = &c->fb_parts[w];
		/* the pages' lines on their way 8 ahead of their turn */
		for (uint32_t j = 0; j < pt->nact && j < 8; j++)
			if (pt->act[j].ref)
				kvt_store_ref_warm(pt->act[j].ref);
		for (uint32_t i = 0; i < pt->nact; i++) {
			/* a page dropped since (a full disk's policy, say): looked up again */
			const bool refs = kvt_store_drops(d->store) == run->drops;
			const struct fb_act *a = &pt->act[i];
			if (refs && i + 8 < pt->nact && pt->act[i + 8].ref)
				kvt_store_ref_warm(pt->act[i + 8].ref);
			if (refs && !a->ref)
				continue; /* not in the store */
			struct kvd_seq *q = run->qs[a->b];
			const struct kvd_layer *L = &q->layer[layer];
			const int32_t slot = L->lease[(size_t)a->h * L->cap + a->p].slot;
			/* as the first pass saw it, unless the same page was named twice */
			if (a->start && slot == LEASE_NONE)
				lease_start(c, q, layer, a->h, a->p, a->matters, false,
					    refs ? a->ref : NULL);
			else if (!a->start && slot >= 0 && (slot & KVT_SLOT_HOST) &&
				 !(slot & LEASE_PROMOTING))
				lease_promote(c, q, layer, a->h, a->p, refs ? a->ref : NULL);
		}
		pt->nact = pt->nrv = 0;
		memset(&pt->pf, 0, sizeof(pt->pf));
		pt->fresh = pt->pressured = 0;
	}
}

/*
 * What the report says, copied out of shared memory once and bounded. A superseded one
 * (stale) is counted, its layers' steps too, and leases nothing: its waits, if any, went
 * ahead already.
 */
static void fb_process(struct kvd_client *c, const struct kvd_fb *f, bool stale)
{
	struct kvd *d = c->d;
	const struct kvt_sqe *e = &f->e;
	const uint32_t nseq = e->seq, layer = e->layer;
	int32_t *rep;
	uint32_t *ids = fb_copy(c, e, &rep);
	if (!ids)
		return; /* a selection not heard of: only fewer leases */
	uint64_t t = kvd_now_ns();
	if (!f->waits_done && fb_waits(c, e)) {
		fb_wait_pass(c, e, ids, rep, t);
		t = fast_lap(c, KVD_FAST_WAITS, t);
	}
	const unsigned width = kvd_pool_width(d->pool);
	struct kvd_seq **qs = kvt_malloc(nseq * sizeof(*qs));
	if (!qs || (c->fb_nparts < width && fb_parts_grow(c, width) < 0)) {
		kvt_free(qs);
		kvt_free(ids);
		return;
	}
	/* the sequences and their lease arrays, made here; a sequence named twice once */
	const uint32_t mark = ++c->fb_mark;
	for (uint32_t b = 0; b < nseq; b++) {
		struct kvd_seq *q = kvd_seq_get(c, ids[b]);
		qs[b] = q && q->fb_mark != mark && fb_layer(c, q, layer) ? q : NULL;
		if (qs[b])
			q->fb_mark = mark;
	}
	struct fb_run run = {.c = c, .e = e, .rep = rep, .qs = qs, .stale = stale,
			     .keep = c->fast_pressure ? 1 : d->cfg.lease_steps,
			     .drops = kvt_store_drops(d->store)};
	struct kvd_pool *pool = nseq >= FAST_POOL_MIN ? d->pool : NULL;
	c->fast_pooled += pool != NULL;
	kvd_pool_run(pool, nseq, fb_seq, &run);
	t = fast_lap(c, KVD_FAST_READS, t);
	fb_apply(c, &run); /* a stale one's counts */
	fast_lap(c, KVD_FAST_LEASES, t);
	kvt_free(qs);
	kvt_free(ids);
}

void kvd_fast_feedback(struct kvd_client *c, const struct kvt_sqe *r)
{
	struct kvd *d = c->d;
	const uint64_t rows = (uint64_t)r->seq * c->layout.kv_heads;
	const uint64_t rep = 64 + (3 * rows + rows * r->out_stride) * sizeof(int32_t);
	if (!c->fast.ptr || !r->seq || r->seq > d->cfg.max_batch || r->layer >= c->layout.layers ||
	    !r->out_stride || r->out_stride > c->fast_pages || r->ntok > c->data_bytes ||
	    ((r->off[0] | r->off[1]) & 3) || r->off[0] > c->data_bytes ||
	    r->seq * sizeof(uint32_t) > c->data_bytes - r->off[0] || r->off[1] > c->data_bytes ||
	    rep > c->data_bytes - r->off[1]) {
		kvd_client_kill(c, KVD_DISC_BAD_REQUEST, "FEEDBACK out of bounds (nseq %u layer %u "
				"stride %u, offsets %llu %llu)", r->seq, r->layer, r->out_stride,
				(unsigned long long)r->off[0], (unsigned long long)r->off[1]);
		return;
	}
	if (c->nfb == c->fbcap) {
		uint32_t nc = c->fbcap ? c->fbcap * 2 : 64;
		struct kvd_fb *n = nc <= FB_MAX ? kvt_realloc(c->fb, nc * sizeof(*n)) : NULL;
		if (!n) {
			kvd_client_kill(c, KVD_DISC_ERROR, "%u feedbacks whose kernels never ran",
					c->nfb);
			return;
		}
		c->fb = n;
		c->fbcap = nc;
	}
	c->fb[c->nfb++] = (struct kvd_fb){.e = *r};
	c->fast_feedbacks++;
	/* processed once the ring is drained (kvd_server_tick): the waits of every report
	 * in by then go first (fb_waits_ahead) */
}

void kvd_fast_tick(struct kvd_client *c)
{
	if (!c->fast.ptr || c->dead)
		return;
	uint32_t i = 0;
	if (c->nfb > c->fast_lag_max)
		c->fast_lag_max = c->nfb;
	const uint64_t t0 = c->nfb ? kvd_now_ns() : 0;
	for (; i < c->nfb && fb_ready(c, &c->fb[i].e);) {
		fb_waits_ahead(c, i);
		const bool stale = fb_superseded(c, i);
		c->fast_superseded += stale;
		fb_process(c, &c->fb[i], stale);
		c->fb_seen += c->fb[i++].e.ntok;
		if (!stale && kvd_now_ns() - t0 >= FAST_TICK_NS)
			break; /* the rest after the ring is read again */
	}
	if (i) {
		c->fast_fb_ns += kvd_now_ns() - t0;
		memmove(c->fb, c->fb + i, (c->nfb - i) * sizeof(*c->fb));
		c->nfb -= i;
	}
	/* timed where there is work (a tick with none stays two loads) */
	const bool busy = c->npairs || c->nrevoking || c->nacks || c->nrevoked;
	uint64_t t = busy ? kvd_now_ns() : 0;
	map_flush(c, false);
	if (busy)
		t = fast_lap(c, KVD_FAST_MAP, t);
	acks_tick(c);
	if (busy)
		t = fast_lap(c, KVD_FAST_ACKS, t);
	/* ring bytes go back in order: none of a report whose ack is still to come */
	const uint64_t done = c->nacks ? c->acks[0].hold : c->fb_seen;
	if (done != c->fb_done) {
		c->fb_done = done;
		kvt_store_release(&c->hdr->fb_done, c->fb_done);
	}
	revoked_release(c, false);
	if (busy)
		fast_lap(c, KVD_FAST_RELEASES, t);
	c->fast_pressure = false;
}

bool kvd_fast_waiting(const struct kvd_client *c)
{
	return c->nfb || c->nrevoked || c->npairs || c->nacks;
}
