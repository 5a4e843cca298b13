// SPDX-License-Identifier: MIT
#include "store.h"
#include "device.h"
#include "tier_fault.h"
#include "daemon/alloc.h"
#include "daemon/list.h"
#include "daemon/log.h"

#include <errno.h>
#include <string.h>
#include <time.h>

#define B(t)	     (1u << (t))
#define QUEUE_FLUSH  512
#define MAX_WB_TRIES 3
#define EVICT_SCAN   64
#define WB_SCAN      256 /* KVT_WRITE_BACK: host pages looked at per search for cold ones */
#define WB_ROOM      8   /* and written at once when a host slot is wanted and none is free */
#define HOST_WB_FREE 2   /* KVT_WRITE_BACK: host slots kept free (%), the rest clean copies */

struct waiter {
	struct waiter *next;
	int tier; /* TIER_*: done when valid there; WAIT_READ: copy out of host;
		   * WAIT_QUEUED: valid on the GPU, or its copy there queued */
	kvt_store_cb cb;
	void *arg;
	void *dst;
	uint32_t cap;
};
#define WAIT_READ   TIER_MAX
#define WAIT_QUEUED (TIER_MAX + 1)

struct seq {
	struct seq *hnext;
	uint32_t tenant;
	uint64_t id;
	uint64_t last_access;
	uint32_t npages;
	struct kvt_list pages;
};

struct page {
	/* what a lookup and a lease touch first: the first two cache lines */
	struct page *hnext;
	struct page_key key;
	tier_slot_t slot[TIER_MAX];
	uint16_t pins;
	uint16_t io_refs;       /* moves in flight for this page */
	uint8_t readers[TIER_MAX]; /* moves in flight reading the copy in each tier */
	uint8_t state;
	uint8_t valid, busy, want;
	uint8_t queued; /* B(TIER_GPU): its copy there is on the device (slot[] its slot) */
	uint8_t wb_tries;
	bool dropped;
	bool hurry; /* its read from NVMe, once it starts, goes ahead (kvt_store_hurry) */
	uint32_t len;
	float score;
	struct kvt_list lru[2]; /* TIER_GPU, TIER_HOST */
	uint64_t last_access;
	struct seq *seq;
	struct kvt_list seq_link;
	struct kvt_list wb_link;
	struct kvt_list stall_link;
	struct kvt_list dirty_link; /* on kvt_store.dirty while dirty (sealed, on no disk) */
	uint64_t epoch;
	uint64_t csum; /* of the disk copy: its reads need not read the header */
	uint64_t born_ms, touch_ms; /* monotonic: when put, when last touched (0: never) */
	struct waiter *waiters;
	struct move *rd; /* its read from NVMe into host RAM, while under way */
};

struct move {
	struct tier_io io;
	struct kvt_store *s;
	struct page *pg;
	enum tier_id src, dst;
	tier_slot_t slot; /* the slot written: dst's (or the nvme slot) */
	uint64_t t0_ns;
	uint64_t hurry_ns; /* a read hurried (kvt_store_hurry): when; else 0 */
};

struct ready {
	struct kvt_list link;
	kvt_store_cb cb;
	void *arg;
	int res;
};

struct ioq {
	struct tier_io **ios;
	unsigned n, cap;
};

/*
 * Objects that come and go with each copy (moves, waiters, completions), kept for the
 * next ones up to FREELIST_MAX of each kind: a lease took four allocations and frees,
 * about a tenth of kvtier-bench-store's time (perf). Under AddressSanitizer none are
 * kept, so that a use after free is still caught.
 */
#if defined(__SANITIZE_ADDRESS__)
#define FREELIST_MAX 0u
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FREELIST_MAX 0u
#endif
#endif
#ifndef FREELIST_MAX
#define FREELIST_MAX 4096u
#endif

struct freelist {
	void *head;
	unsigned n;
};

static void *fl_get(struct freelist *f, size_t size)
{
	void *p = f->head;
	if (!p)
		return kvt_malloc(size);
	f->head = *(void **)p;
	f->n--;
	return p;
}

static void fl_put(struct freelist *f, void *p)
{
	if (f->n + 1 > FREELIST_MAX) {
		kvt_free(p);
		return;
	}
	*(void **)p = f->head;
	f->head = p;
	f->n++;
}

static void fl_drain(struct freelist *f)
{
	while (f->head) {
		void *nx = *(void **)f->head;
		kvt_free(f->head);
		f->head = nx;
	}
	f->n = 0;
}

struct kvt_store {
	struct kvt_store_params p;
	struct kvt_loop loop;
	struct kvt_device *dev;
	bool own_dev;
	struct tier *tier[TIER_MAX];
	struct ioq q[TIER_MAX];
	struct page **pbuckets;
	uint64_t pmask, npages;
	struct seq **sbuckets;
	uint64_t smask, nseqs;
	struct kvt_list lru[2];
	struct kvt_list wbq;
	struct kvt_list dirty; /* dirty pages, oldest first: what the write-back writes first */
	struct kvt_list stalled;
	struct kvt_list ready;
	struct freelist free_moves, free_waiters, free_ready;
	unsigned wb_inflight;
	unsigned moves_inflight;
	uint64_t epoch;
	uint64_t clock;
	uint64_t now_ms; /* monotonic, read once per run: page ages need no finer clock */
	uint64_t wm_next_ms[2]; /* a watermark pass that fell short is tried again from then */
	uint64_t wb_next_ms;    /* write-back: the next look for cold dirty pages */
	float score_ema;
	struct kvt_store_stats st;
};

const char *kvt_evict_reason_name(enum kvt_evict_reason r)
{
	static const char *const names[KVT_EVICT_MAX] = {"watermark", "room", "request", "stale"};
	return (unsigned)r < KVT_EVICT_MAX ? names[r] : "?";
}

/* ---- maps ---- */

static uint64_t seq_hash(uint32_t tenant, uint64_t id)
{
	uint64_t h = (id ^ ((uint64_t)tenant << 40)) * 0x9e3779b97f4a7c15ull;
	return h ^ (h >> 31);
}

static int grow(void **buckets, uint64_t *mask, uint64_t count, size_t next_off,
		uint64_t (*hash)(const void *))
{
	if (count <= *mask)
		return 0;
	uint64_t nmask = (*mask + 1) * 2 - 1;
	void **nb = kvt_calloc(nmask + 1, sizeof(void *));
	if (!nb)
		return -ENOMEM; /* keep the old table: slower, still correct */
	void **ob = *buckets;
	for (uint64_t i = 0; i <= *mask; i++) {
		void *e = ob[i];
		while (e) {
			void **nextp = (void **)((char *)e + next_off);
			void *nx = *nextp;
			uint64_t b = hash(e) & nmask;
			*nextp = nb[b];
			nb[b] = e;
			e = nx;
		}
	}
	kvt_free(ob);
	*buckets = nb;
	*mask = nmask;
	return 0;
}

static uint64_t page_hash_of(const void *e)
{
	return page_key_hash(&((const struct page *)e)->key);
}

static uint64_t seq_hash_of(const void *e)
{
	const struct seq *q = e;
	return seq_hash(q->tenant, q->id);
}

static struct page *page_find(const struct kvt_store *s, const struct page_key *k)
{
	struct page *pg = s->pbuckets[page_key_hash(k) & s->pmask];
	while (pg && !page_key_eq(&pg->key, k))
		pg = pg->hnext;
	return pg;
}

static void page_unhash(struct kvt_store *s, struct page *pg)
{
	struct page **pp = &s->pbuckets[page_key_hash(&pg->key) & s->pmask];
	while (*pp && *pp != pg)
		pp = &(*pp)->hnext;
	if (*pp) {
		*pp = pg->hnext;
		s->npages--;
	}
}

static struct seq *seq_find(struct kvt_store *s, uint32_t tenant, uint64_t id)
{
	struct seq *q = s->sbuckets[seq_hash(tenant, id) & s->smask];
	while (q && !(q->tenant == tenant && q->id == id))
		q = q->hnext;
	return q;
}

static struct seq *seq_get(struct kvt_store *s, uint32_t tenant, uint64_t id)
{
	struct seq *q = seq_find(s, tenant, id);
	if (q)
		return q;
	q = kvt_calloc(1, sizeof(*q));
	if (!q)
		return NULL;
	q->tenant = tenant;
	q->id = id;
	kvt_list_init(&q->pages);
	uint64_t b = seq_hash(tenant, id) & s->smask;
	q->hnext = s->sbuckets[b];
	s->sbuckets[b] = q;
	s->nseqs++;
	grow((void **)&s->sbuckets, &s->smask, s->nseqs, offsetof(struct seq, hnext),
	     seq_hash_of);
	return q;
}

static void seq_put(struct kvt_store *s, struct seq *q)
{
	if (q->npages)
		return;
	struct seq **pp = &s->sbuckets[seq_hash(q->tenant, q->id) & s->smask];
	while (*pp && *pp != q)
		pp = &(*pp)->hnext;
	if (*pp) {
		*pp = q->hnext;
		s->nseqs--;
	}
	kvt_free(q);
}

static struct page *page_new(struct kvt_store *s, const struct page_key *k)
{
	struct seq *q = seq_get(s, k->tenant, k->seq);
	if (!q)
		return NULL;
	struct page *pg = kvt_calloc(1, sizeof(*pg));
	if (!pg) {
		seq_put(s, q);
		return NULL;
	}
	pg->key = *k;
	pg->key.pad = 0;
	pg->seq = q;
	pg->born_ms = s->now_ms;
	for (int t = 0; t < TIER_MAX; t++)
		pg->slot[t] = TIER_SLOT_NONE;
	kvt_list_init(&pg->lru[0]);
	kvt_list_init(&pg->lru[1]);
	kvt_list_init(&pg->wb_link);
	kvt_list_init(&pg->stall_link);
	kvt_list_init(&pg->dirty_link);
	kvt_list_add_tail(&q->pages, &pg->seq_link);
	q->npages++;
	uint64_t b = page_key_hash(k) & s->pmask;
	pg->hnext = s->pbuckets[b];
	s->pbuckets[b] = pg;
	s->npages++;
	grow((void **)&s->pbuckets, &s->pmask, s->npages, offsetof(struct page, hnext),
	     page_hash_of);
	return pg;
}

/* ---- completions ---- */

static void defer(struct kvt_store *s, kvt_store_cb cb, void *arg, int res)
{
	if (!cb)
		return;
	struct ready *r = fl_get(&s->free_ready, sizeof(*r));
	if (!r) {
		cb(arg, res); /* no memory to defer: complete inline */
		return;
	}
	r->cb = cb;
	r->arg = arg;
	r->res = res;
	kvt_list_add_tail(&s->ready, &r->link);
}

static int add_waiter(struct kvt_store *s, struct page *pg, int tier, kvt_store_cb cb,
		      void *arg, void *dst, uint32_t cap)
{
	if (!cb && tier != WAIT_READ)
		return 0;
	struct waiter *w = fl_get(&s->free_waiters, sizeof(*w));
	if (!w)
		return -ENOMEM;
	*w = (struct waiter){.next = pg->waiters, .tier = tier, .cb = cb, .arg = arg,
			     .dst = dst, .cap = cap};
	pg->waiters = w;
	return 0;
}

static void *tier_ptr(struct kvt_store *s, enum tier_id t, tier_slot_t slot)
{
	return s->tier[t]->ops->slot_ptr(s->tier[t], slot);
}

/* Completes the waiters that can be completed: those whose tier holds a copy, and
 * all of them with err when err is set. */
static void wake(struct kvt_store *s, struct page *pg, int err)
{
	struct waiter **wp = &pg->waiters;
	while (*wp) {
		struct waiter *w = *wp;
		int res = 1;
		if (w->tier == WAIT_READ) {
			if (pg->valid & B(TIER_HOST)) {
				uint32_t n = pg->len < w->cap ? pg->len : w->cap;
				memcpy(w->dst, tier_ptr(s, TIER_HOST, pg->slot[TIER_HOST]), n);
				res = 0;
			}
		} else if (w->tier == WAIT_QUEUED) {
			if (pg->valid & B(TIER_GPU) || pg->queued & B(TIER_GPU))
				res = 0;
		} else if (pg->valid & B(w->tier)) {
			res = 0;
		}
		if (res == 1 && err)
			res = err;
		if (res == 1) {
			wp = &w->next;
			continue;
		}
		*wp = w->next;
		defer(s, w->cb, w->arg, res);
		fl_put(&s->free_waiters, w);
	}
}

/* ---- slots and eviction ---- */

static bool lru_tier(enum tier_id t)
{
	return t == TIER_GPU || t == TIER_HOST;
}

/*
 * The LRU lists hold the copies that may be evicted one day. A pin leaves the page where
 * it is (a pin is then one write to the page, which the daemon's lease of a page looked
 * up on another thread needs: no neighbours' lines); the eviction scan takes pinned pages
 * it meets off the list, uncounted, so that the cold end does not fill up with pages in
 * use. A page's last unpin puts its copies back as the most recent.
 */
static void lru_touch(struct kvt_store *s, struct page *pg, enum tier_id t)
{
	if (!lru_tier(t) || pg->pins)
		return;
	kvt_list_del(&pg->lru[t]);
	kvt_list_add(&s->lru[t], &pg->lru[t]);
}

static bool evictable(const struct kvt_store *s, const struct page *pg, enum tier_id t)
{
	/* write-back: a dirty page's host copy is its copy to write from, kept */
	if (t == TIER_HOST && s->p.write_policy == KVT_WRITE_BACK && !(pg->valid & B(TIER_NVME)))
		return false;
	return (pg->valid & B(t)) && !pg->pins && !pg->readers[t] && !pg->dropped &&
	       (pg->valid & ~B(t)) && !(pg->busy & B(t));
}

static void drop_copy(struct kvt_store *s, struct page *pg, enum tier_id t,
		      enum kvt_evict_reason why)
{
	struct tier *tr = s->tier[t];
	tr->ops->free(tr, pg->slot[t]);
	pg->slot[t] = TIER_SLOT_NONE;
	pg->valid &= (uint8_t)~B(t);
	if (lru_tier(t))
		kvt_list_del(&pg->lru[t]);
	s->st.evictions[t]++;
	s->st.evict_reason[t][why]++;
}

/* A page sealed or put whole, on no disk: on the dirty list, newest last. */
static void set_dirty(struct kvt_store *s, struct page *pg)
{
	pg->state = KVT_PAGE_DIRTY;
	if (!kvt_list_linked(&pg->dirty_link))
		kvt_list_add_tail(&s->dirty, &pg->dirty_link);
}

/* A page's first 128 bytes (what a lookup and a lease touch), on 2 or 3 cache lines (the
 * allocator aligns it to 32), into the CPU's cache. */
static void page_prefetch(const struct page *pg)
{
	__builtin_prefetch(pg, 1);
	__builtin_prefetch((const char *)pg + 64, 1);
	__builtin_prefetch((const char *)pg + 127, 1);
}

/*
 * Drops one copy from tier t, coldest first; a page that scored above the running
 * mean since its last chance gets one more pass (its score decays to the mean).
 */
static bool evict_one(struct kvt_store *s, enum tier_id t, enum kvt_evict_reason why)
{
	/*
	 * Bounded: pages that cannot go yet (dirty, pinned, read by a copy) may pile up
	 * at the tail; the caller then backs off and retries once write-backs land.
	 */
	struct page *fallback = NULL;
	struct kvt_list *pos = s->lru[t].prev;
	for (int scanned = 0; pos != &s->lru[t] && scanned < EVICT_SCAN;) {
		struct page *pg = kvt_container_of(pos, struct page, lru[t]);
		pos = pos->prev;
		if (pg->pins) {
			/* in use: off the list until its last unpin, not counted (the fast
			 * path's leases pin most of the GPU pool at batch 32) */
			kvt_list_del(&pg->lru[t]);
			continue;
		}
		scanned++;
		if (!evictable(s, pg, t))
			continue;
		if (pg->score > s->score_ema) {
			pg->score = s->score_ema;
			if (!fallback)
				fallback = pg;
			continue;
		}
		drop_copy(s, pg, t, why);
		if (pos != &s->lru[t]) /* the next one to go, cold: on its way meanwhile */
			page_prefetch(kvt_container_of(pos, struct page, lru[t]));
		return true;
	}
	/* Only recently high-scoring pages in reach: the coldest of them goes. */
	if (fallback) {
		drop_copy(s, fallback, t, why);
		return true;
	}
	return false;
}

static unsigned write_cold(struct kvt_store *s, uint32_t tenant, uint64_t need);

static int slot_get(struct kvt_store *s, enum tier_id t, uint32_t tenant, tier_slot_t *out)
{
	struct tier *tr = s->tier[t];
	if (!tr)
		return -ENODEV;
	int ret = tr->ops->alloc(tr, tenant, out);
	while (ret == -ENOSPC && lru_tier(t) && evict_one(s, t, KVT_EVICT_ROOM))
		ret = tr->ops->alloc(tr, tenant, out);
	/* write-back: dirty pages at the cold end, beyond evict_one's reach, make way */
	if (ret == -ENOSPC && t == TIER_HOST && s->p.write_policy == KVT_WRITE_BACK)
		write_cold(s, tenant, WB_ROOM);
	return ret;
}

/* ---- moves ---- */

static void progress(struct kvt_store *s, struct page *pg);
static void page_free(struct kvt_store *s, struct page *pg);
static void page_drop(struct kvt_store *s, struct page *pg);

static void ioq_push(struct kvt_store *s, enum tier_id t, struct tier_io *io);

static void fail_page(struct kvt_store *s, struct page *pg, int err)
{
	pg->want = 0;
	wake(s, pg, err);
}

static void move_done(struct tier_io *io)
{
	struct move *m = kvt_container_of(io, struct move, io);
	struct kvt_store *s = m->s;
	struct page *pg = m->pg;
	int res = io->res;
	enum tier_id via = m->dst == TIER_HOST ? m->src : m->dst;
	if (pg->rd == m)
		pg->rd = NULL;
	int dir = m->dst == TIER_HOST ? TIER_READ : TIER_WRITE;
	const uint64_t now = tier_now_ns(), us = (now - m->t0_ns) / 1000;
	s->st.lat[via][dir][kvt_hist_bucket(us)]++;
	s->st.lat_sum_us[via][dir] += us;
	if (m->hurry_ns) {
		const uint64_t hu = (now - m->hurry_ns) / 1000;
		const uint64_t du = io->issue_ns && io->issue_ns < now ? (now - io->issue_ns) / 1000 : 0;
		s->st.hurried_lat[kvt_hist_bucket(hu)]++;
		s->st.hurried_lat_sum_us += hu;
		s->st.hurried_disk[kvt_hist_bucket(du)]++;
		s->st.hurried_disk_sum_us += du;
	}
	pg->busy &= (uint8_t)~B(m->dst);
	if (pg->queued & B(m->dst)) {
		pg->queued &= (uint8_t)~B(m->dst);
		pg->slot[m->dst] = TIER_SLOT_NONE; /* m->slot's, set again below once valid */
	}
	pg->io_refs--;
	pg->readers[m->src]--;
	s->moves_inflight--;
	if (m->dst == TIER_NVME)
		s->wb_inflight--;

	if (pg->dropped) {
		if (m->dst != TIER_NVME)
			s->tier[m->dst]->ops->free(s->tier[m->dst], m->slot);
		fl_put(&s->free_moves, m);
		if (!pg->io_refs)
			page_free(s, pg);
		return;
	}
	if (res == 0) {
		if (m->dst == TIER_NVME) {
			pg->epoch = m->io.meta.epoch;
			pg->csum = m->io.meta.csum;
			pg->valid |= B(TIER_NVME);
			pg->state = KVT_PAGE_CLEAN;
			kvt_list_del(&pg->dirty_link);
			pg->want &= (uint8_t)~B(TIER_NVME);
			s->st.writebacks++;
		} else {
			pg->slot[m->dst] = m->slot;
			pg->valid |= B(m->dst);
			lru_touch(s, pg, m->dst);
			s->st.promotions[m->dst]++;
		}
	} else if (m->dst == TIER_NVME) {
		/* The slot may hold anything now: never trust or reuse it. */
		s->st.write_errors++;
		s->tier[TIER_NVME]->ops->poison(s->tier[TIER_NVME], m->slot);
		pg->slot[TIER_NVME] = TIER_SLOT_NONE;
		if (++pg->wb_tries >= MAX_WB_TRIES ||
		    slot_get(s, TIER_NVME, pg->key.tenant, &pg->slot[TIER_NVME]) < 0) {
			kvt_err("store", "page (seq %llu layer %u page %u) not written back: %s",
				(unsigned long long)pg->key.seq, pg->key.layer, pg->key.index,
				strerror(-res));
			pg->slot[TIER_NVME] = TIER_SLOT_NONE;
			pg->want &= (uint8_t)~B(TIER_NVME);
			wake(s, pg, res); /* writeback waiters learn it; the page stays dirty */
		}
	} else {
		s->tier[m->dst]->ops->free(s->tier[m->dst], m->slot);
		if (m->src == TIER_NVME) {
			/* A bad disk copy is a counted miss, never data. */
			s->st.read_errors++;
			struct tier *nv = s->tier[TIER_NVME];
			if (res == -EIO || res == -ENODATA)
				nv->ops->poison(nv, pg->slot[TIER_NVME]);
			else
				nv->ops->free(nv, pg->slot[TIER_NVME]);
			pg->slot[TIER_NVME] = TIER_SLOT_NONE;
			pg->valid &= (uint8_t)~B(TIER_NVME);
			if (!pg->valid) {
				s->st.pages_lost++;
				fail_page(s, pg, res);
				fl_put(&s->free_moves, m);
				page_drop(s, pg);
				return;
			}
			/* Another copy is left (GPU): progress takes it from there. */
		} else {
			fail_page(s, pg, res);
		}
	}
	fl_put(&s->free_moves, m);
	wake(s, pg, 0);
	progress(s, pg);
}

static int start_move(struct kvt_store *s, struct page *pg, enum tier_id src,
		      enum tier_id dst, tier_slot_t slot)
{
	struct move *m = fl_get(&s->free_moves, sizeof(*m));
	if (!m)
		return -ENOMEM;
	memset(m, 0, sizeof(*m));
	m->s = s;
	m->pg = pg;
	m->src = src;
	m->dst = dst;
	m->slot = slot;
	m->t0_ns = tier_now_ns();
	struct tier_io *io = &m->io;
	io->len = pg->len;
	io->done = move_done;
	io->meta.key = pg->key;
	io->meta.len = pg->len;
	io->meta.epoch = pg->epoch;
	io->meta.csum = src == TIER_NVME ? pg->csum : 0;
	enum tier_id via; /* the tier that performs the copy */
	if (dst == TIER_HOST) {
		via = src;
		io->slot = pg->slot[src];
		io->dir = TIER_READ;
		io->buf = tier_ptr(s, TIER_HOST, slot);
	} else {
		via = dst;
		io->slot = slot;
		io->dir = TIER_WRITE;
		io->buf = tier_ptr(s, TIER_HOST, pg->slot[TIER_HOST]);
		if (dst == TIER_NVME)
			io->meta.epoch = ++s->epoch;
	}
	pg->busy |= B(dst);
	pg->io_refs++;
	pg->readers[src]++;
	if (src == TIER_NVME && dst == TIER_HOST) {
		pg->rd = m;
		if (pg->hurry) { /* hurried while it waited for room */
			io->urgent = true;
			m->hurry_ns = m->t0_ns;
		}
	}
	if (dst == TIER_HOST)
		pg->hurry = false;
	s->moves_inflight++;
	if (dst == TIER_NVME)
		s->wb_inflight++;
	ioq_push(s, via, io);
	return 0;
}

static void stall(struct kvt_store *s, struct page *pg)
{
	if (!kvt_list_linked(&pg->stall_link))
		kvt_list_add_tail(&s->stalled, &pg->stall_link);
}

/* Starts whatever moves the page needs to reach the tiers in want. */
static void progress(struct kvt_store *s, struct page *pg)
{
	if (pg->dropped)
		return;
	/* A want is met once: a copy dropped later is not brought back unasked. */
	pg->want &= (uint8_t)~pg->valid;
	unsigned need = pg->want;
	if (pg->state == KVT_PAGE_FILLING)
		need &= ~B(TIER_NVME);
	if (!need)
		return;
	uint8_t host = B(TIER_HOST);
	bool via_host = (need & (B(TIER_GPU) | B(TIER_NVME))) && !(pg->valid & host);
	if (((need & host) || via_host) && !(pg->busy & host)) {
		enum tier_id src = (pg->valid & B(TIER_GPU)) ? TIER_GPU : TIER_NVME;
		if (!(pg->valid & B(src))) {
			fail_page(s, pg, -EIO);
			return;
		}
		tier_slot_t slot;
		int ret = slot_get(s, TIER_HOST, pg->key.tenant, &slot);
		if (ret == -ENOSPC) {
			stall(s, pg);
			return;
		}
		if (ret < 0 || start_move(s, pg, src, TIER_HOST, slot) < 0) {
			if (ret == 0)
				s->tier[TIER_HOST]->ops->free(s->tier[TIER_HOST], slot);
			fail_page(s, pg, ret < 0 ? ret : -ENOMEM);
			return;
		}
		return; /* the rest follows once the host copy is there */
	}
	if (!(pg->valid & host))
		return;
	if ((need & B(TIER_GPU)) && !(pg->busy & B(TIER_GPU))) {
		tier_slot_t slot;
		int ret = slot_get(s, TIER_GPU, pg->key.tenant, &slot);
		if (ret == -ENOSPC) {
			stall(s, pg);
		} else if (ret < 0 || start_move(s, pg, TIER_HOST, TIER_GPU, slot) < 0) {
			if (ret == 0)
				s->tier[TIER_GPU]->ops->free(s->tier[TIER_GPU], slot);
			fail_page(s, pg, ret < 0 ? ret : -ENOMEM);
			return;
		}
	}
	if ((need & B(TIER_NVME)) && !(pg->busy & B(TIER_NVME)) &&
	    pg->slot[TIER_NVME] != TIER_SLOT_NONE) {
		if (s->wb_inflight >= s->p.writeback_max) {
			if (!kvt_list_linked(&pg->wb_link))
				kvt_list_add_tail(&s->wbq, &pg->wb_link);
		} else {
			kvt_list_del(&pg->wb_link);
			if (start_move(s, pg, TIER_HOST, TIER_NVME, pg->slot[TIER_NVME]) < 0)
				kvt_list_add_tail(&s->wbq, &pg->wb_link);
		}
	}
}

/* A dirty page on its way to disk, its write started unless it was: false where the
 * disk has no slot for it. */
static bool wb_going(struct kvt_store *s, struct page *pg)
{
	if (pg->want & B(TIER_NVME))
		return true;
	if (pg->slot[TIER_NVME] == TIER_SLOT_NONE) {
		if (slot_get(s, TIER_NVME, pg->key.tenant, &pg->slot[TIER_NVME]) < 0) {
			pg->slot[TIER_NVME] = TIER_SLOT_NONE;
			return false;
		}
		pg->wb_tries = 0;
	}
	pg->want |= B(TIER_NVME);
	s->st.writes_for_room++;
	progress(s, pg);
	return true;
}

/*
 * KVT_WRITE_BACK, a host slot wanted and none free: starts writing the tenant's coldest
 * dirty host pages until `need` are on their way to disk, those already on it counted;
 * once written they are clean copies that evict_one may take. Returns how many are on
 * their way (0: none could start, the disk is full).
 */
static unsigned write_cold(struct kvt_store *s, uint32_t tenant, uint64_t need)
{
	const unsigned cap = 2 * s->p.writeback_max;
	unsigned going = 0;
	struct kvt_list *pos = s->lru[TIER_HOST].prev;
	for (int n = 0; pos != &s->lru[TIER_HOST] && n < WB_SCAN && going < need && going < cap;
	     n++) {
		struct page *pg = kvt_container_of(pos, struct page, lru[TIER_HOST]);
		pos = pos->prev;
		if (pg->state != KVT_PAGE_DIRTY || pg->dropped || pg->key.tenant != tenant)
			continue;
		if (!wb_going(s, pg))
			break;
		going++;
	}
	return going;
}

/*
 * KVT_WRITE_BACK's watermark: starts writing the dirty pages put first until `need` are
 * on their way to disk, those already on it counted. Written, they are clean copies
 * that stay in host RAM until evict_one takes them, coldest first; a read from disk
 * then finds room without waiting for a write. Returns how many are on their way.
 */
static unsigned write_oldest(struct kvt_store *s, uint64_t need)
{
	const unsigned cap = 2 * s->p.writeback_max;
	unsigned going = 0;
	struct kvt_list *pos = s->dirty.next;
	for (int n = 0; pos != &s->dirty && n < WB_SCAN && going < need && going < cap; n++) {
		struct page *pg = kvt_container_of(pos, struct page, dirty_link);
		pos = pos->next;
		if (pg->dropped)
			continue;
		if (!wb_going(s, pg))
			break;
		going++;
	}
	return going;
}

/*
 * The copies into the GPU of a submit: once the device has them, their pages are
 * "queued" there (slot[] their destination): kvt_store_promote_queued's waiters go.
 * Listed before the submit, which may complete other copies (reads) inline; these
 * ones land only from the device's poll, so their pages are still here after it.
 */
struct queued_copy {
	struct page *pg;
	tier_slot_t slot;
};

static void mark_queued(struct kvt_store *s, struct queued_copy *qc, unsigned n)
{
	for (unsigned i = 0; i < n; i++) {
		struct page *pg = qc[i].pg;
		if (pg->dropped || !(pg->busy & B(TIER_GPU)) || (pg->valid & B(TIER_GPU)))
			continue;
		pg->queued |= B(TIER_GPU);
		pg->slot[TIER_GPU] = qc[i].slot;
		wake(s, pg, 0);
	}
}

static void ioq_flush(struct kvt_store *s, enum tier_id t)
{
	struct ioq *q = &s->q[t];
	if (!q->n)
		return;
	/* Take the array: completions run from here may queue new copies. */
	struct tier_io **ios = q->ios;
	unsigned n = q->n, cap = q->cap, nq = 0;
	q->ios = NULL;
	q->n = q->cap = 0;
	struct queued_copy *qc = t == TIER_GPU ? kvt_malloc(n * sizeof(*qc)) : NULL;
	for (unsigned i = 0; qc && i < n; i++) {
		if (ios[i]->dir != TIER_WRITE)
			continue;
		struct move *m = kvt_container_of(ios[i], struct move, io);
		qc[nq++] = (struct queued_copy){m->pg, m->slot};
	}
	int ret = s->tier[t]->ops->submit(s->tier[t], ios, n);
	if (ret < 0) {
		kvt_err("store", "%s: submit of %u copies: %s", tier_name(t), n, strerror(-ret));
		for (unsigned i = 0; i < n; i++) {
			ios[i]->res = ret;
			ios[i]->done(ios[i]);
		}
	} else if (nq) {
		mark_queued(s, qc, nq);
	}
	kvt_free(qc);
	if (!q->ios) {
		q->ios = ios;
		q->cap = cap;
	} else {
		kvt_free(ios);
	}
}

static void ioq_push(struct kvt_store *s, enum tier_id t, struct tier_io *io)
{
	struct ioq *q = &s->q[t];
	if (q->n == q->cap) {
		unsigned ncap = q->cap ? q->cap * 2 : 64;
		struct tier_io **n = kvt_realloc(q->ios, ncap * sizeof(*n));
		if (!n) {
			ioq_flush(s, t);
			if (q->n == q->cap) { /* no room at all: fail this copy, lose nothing */
				io->res = -ENOMEM;
				io->done(io);
				return;
			}
		} else {
			q->ios = n;
			q->cap = ncap;
		}
	}
	q->ios[q->n++] = io;
	if (q->n >= QUEUE_FLUSH)
		ioq_flush(s, t);
}

static void flush_queues(struct kvt_store *s)
{
	/* Host-tier copies complete inline and may queue more: do them last. */
	for (int i = 0; i < 3; i++) {
		ioq_flush(s, TIER_NVME);
		ioq_flush(s, TIER_GPU);
		ioq_flush(s, TIER_HOST);
	}
}

/* ---- page lifetime ---- */

static void page_free(struct kvt_store *s, struct page *pg)
{
	for (int t = 0; t < TIER_MAX; t++) {
		if (pg->slot[t] == TIER_SLOT_NONE || !s->tier[t])
			continue;
		s->tier[t]->ops->free(s->tier[t], pg->slot[t]);
	}
	kvt_list_del(&pg->lru[0]);
	kvt_list_del(&pg->lru[1]);
	kvt_list_del(&pg->wb_link);
	kvt_list_del(&pg->stall_link);
	kvt_list_del(&pg->dirty_link);
	if (pg->seq) {
		kvt_list_del(&pg->seq_link);
		pg->seq->npages--;
		seq_put(s, pg->seq);
		pg->seq = NULL;
	}
	wake(s, pg, -ECANCELED);
	kvt_free(pg);
}

static void page_drop(struct kvt_store *s, struct page *pg)
{
	page_unhash(s, pg);
	s->st.pages_dropped++;
	uint64_t life = s->now_ms - pg->born_ms;
	s->st.lifetime[kvt_hist_bucket(life)]++;
	s->st.lifetime_sum_ms += life;
	if (pg->io_refs) {
		/* Slots of copies in flight are freed as they land (move_done). */
		pg->dropped = true;
		kvt_list_del(&pg->seq_link);
		pg->seq->npages--;
		seq_put(s, pg->seq);
		pg->seq = NULL;
		kvt_list_del(&pg->lru[0]);
		kvt_list_del(&pg->lru[1]);
		kvt_list_del(&pg->wb_link);
		kvt_list_del(&pg->stall_link);
		kvt_list_del(&pg->dirty_link);
		wake(s, pg, -ECANCELED);
		return;
	}
	page_free(s, pg);
}

static int seq_drop(struct kvt_store *s, struct seq *q)
{
	struct kvt_list *pos, *tmp;
	kvt_list_for_each_safe(pos, tmp, &q->pages)
	{
		if (kvt_container_of(pos, struct page, seq_link)->pins)
			return -EBUSY;
	}
	s->st.drops++;
	/* The last page frees q; never touch it after the loop. */
	kvt_list_for_each_safe(pos, tmp, &q->pages)
	{
		bool last = tmp == &q->pages;
		page_drop(s, kvt_container_of(pos, struct page, seq_link));
		if (last)
			break;
	}
	return 0;
}

static bool seq_pinned(struct seq *q)
{
	struct kvt_list *pos, *tmp;
	kvt_list_for_each_safe(pos, tmp, &q->pages)
	{
		if (kvt_container_of(pos, struct page, seq_link)->pins)
			return true;
	}
	return false;
}

/* Disk full, policy EVICT_SEQ: drops the coldest unpinned sequence other than keep. */
static bool evict_cold_seq(struct kvt_store *s, uint32_t tenant, uint64_t keep)
{
	struct seq *victim = NULL;
	for (uint64_t b = 0; b <= s->smask; b++) {
		for (struct seq *q = s->sbuckets[b]; q; q = q->hnext) {
			if ((q->tenant == tenant && q->id == keep) || seq_pinned(q))
				continue;
			if (!victim || q->last_access < victim->last_access)
				victim = q;
		}
	}
	if (!victim)
		return false;
	kvt_warn("store", "disk full: dropping cold sequence %llu of tenant %u (%u pages)",
		 (unsigned long long)victim->id, victim->tenant, victim->npages);
	s->st.diskfull_seq_evictions++;
	seq_drop(s, victim);
	return true;
}

/*
 * Write-back: may one more page be stored? Its capacity is the disk and the host tier
 * below its low watermark: with the disk full, a page read back from it still finds a
 * host slot to land in (dirty pages no longer make way).
 */
static bool wb_room(struct kvt_store *s)
{
	struct tier_usage nu, hu;
	s->tier[TIER_NVME]->ops->usage(s->tier[TIER_NVME], &nu);
	s->tier[TIER_HOST]->ops->usage(s->tier[TIER_HOST], &hu);
	return s->npages < nu.slots + hu.slots * s->p.low_wm / 100;
}

/* The disk has no room for a page: the policy's answer, -EAGAIN or -ENOSPC. */
static int disk_full(struct kvt_store *s, const struct page_key *k)
{
	if (s->p.disk_full == KVT_DISKFULL_EVICT_SEQ && evict_cold_seq(s, k->tenant, k->seq)) {
		s->st.backpressure++;
		return -EAGAIN; /* slots come free as their wipes land */
	}
	s->st.enospc_refused++;
	return -ENOSPC;
}

/* ---- public operations ---- */

/* A put up to its bytes: the page new in host RAM (and on its disk slot under
 * write-through), last touched, its len bytes for the caller to write. */
static int put_new(struct kvt_store *s, const struct page_key *k, uint32_t len,
		   struct page **out)
{
	if (page_find(s, k))
		return -EEXIST;
	const bool through = s->p.write_policy == KVT_WRITE_THROUGH;
	if (!through && !wb_room(s))
		return disk_full(s, k);
	tier_slot_t hslot, nslot = TIER_SLOT_NONE;
	int ret = slot_get(s, TIER_HOST, k->tenant, &hslot);
	if (ret == -ENOSPC) { /* write-back: room comes as cold pages reach the disk */
		s->st.backpressure++;
		return -EAGAIN;
	}
	if (ret < 0)
		return ret;
	ret = through ? slot_get(s, TIER_NVME, k->tenant, &nslot) : 0;
	if (ret == -ENOSPC) {
		s->tier[TIER_HOST]->ops->free(s->tier[TIER_HOST], hslot);
		return disk_full(s, k);
	}
	if (ret < 0) {
		s->tier[TIER_HOST]->ops->free(s->tier[TIER_HOST], hslot);
		return ret;
	}
	struct page *pg = page_new(s, k);
	if (!pg) {
		s->tier[TIER_HOST]->ops->free(s->tier[TIER_HOST], hslot);
		if (nslot != TIER_SLOT_NONE)
			s->tier[TIER_NVME]->ops->free(s->tier[TIER_NVME], nslot);
		return -ENOMEM;
	}
	pg->len = len;
	pg->slot[TIER_HOST] = hslot;
	pg->slot[TIER_NVME] = nslot;
	pg->valid = B(TIER_HOST);
	pg->last_access = ++s->clock;
	pg->seq->last_access = pg->last_access;
	lru_touch(s, pg, TIER_HOST);
	s->st.puts++;
	*out = pg;
	return 0;
}

/* A page complete: dirty, and on its way to disk under write-through. */
static void seal_page(struct kvt_store *s, struct page *pg)
{
	set_dirty(s, pg);
	if (s->p.write_policy == KVT_WRITE_THROUGH)
		pg->want |= B(TIER_NVME);
}

int kvt_store_put(struct kvt_store *s, const struct page_key *k, const void *src,
		  uint32_t len, unsigned flags, kvt_store_cb cb, void *arg)
{
	if (!k || !src || !len || len > s->p.page_bytes ||
	    (flags & ~(unsigned)(KVT_PUT_GPU | KVT_PUT_FILLING)))
		return -EINVAL;
	if ((flags & KVT_PUT_GPU) && !s->tier[TIER_GPU])
		return -ENODEV;
	struct page *pg;
	int ret = put_new(s, k, len, &pg);
	if (ret < 0)
		return ret;
	memcpy(tier_ptr(s, TIER_HOST, pg->slot[TIER_HOST]), src, len);
	if (flags & KVT_PUT_FILLING)
		pg->state = KVT_PAGE_FILLING;
	else
		seal_page(s, pg);
	if (flags & KVT_PUT_GPU) {
		pg->want |= B(TIER_GPU);
		add_waiter(s, pg, TIER_GPU, cb, arg, NULL, 0);
	} else {
		defer(s, cb, arg, 0);
	}
	progress(s, pg);
	return 0;
}

int kvt_store_put_reserve(struct kvt_store *s, const struct page_key *k, uint32_t len,
			  void **dst)
{
	if (!k || !dst || !len || len > s->p.page_bytes)
		return -EINVAL;
	struct page *pg;
	int ret = put_new(s, k, len, &pg);
	if (ret < 0)
		return ret;
	pg->state = KVT_PAGE_FILLING; /* its one copy kept, never written back */
	*dst = tier_ptr(s, TIER_HOST, pg->slot[TIER_HOST]);
	return 0;
}

int kvt_store_seal(struct kvt_store *s, const struct page_key *k)
{
	struct page *pg = page_find(s, k);
	if (!pg)
		return -ENOENT;
	if (pg->state != KVT_PAGE_FILLING)
		return -EINVAL;
	if (pg->valid & B(TIER_GPU)) /* made before the bytes were all in: stale */
		drop_copy(s, pg, TIER_GPU, KVT_EVICT_STALE);
	seal_page(s, pg);
	progress(s, pg);
	return 0;
}

int kvt_store_append(struct kvt_store *s, const struct page_key *k, const void *src,
		     uint32_t len, bool seal)
{
	struct page *pg = page_find(s, k);
	if (!pg)
		return -ENOENT;
	if (pg->state != KVT_PAGE_FILLING || len > s->p.page_bytes - pg->len)
		return -EINVAL;
	if (pg->io_refs)
		return -EAGAIN;
	if (!(pg->valid & B(TIER_HOST)))
		return -EAGAIN;
	char *p = tier_ptr(s, TIER_HOST, pg->slot[TIER_HOST]);
	memcpy(p + pg->len, src, len);
	pg->len += len;
	if (pg->valid & B(TIER_GPU)) /* stale now: the next promote copies it again */
		drop_copy(s, pg, TIER_GPU, KVT_EVICT_STALE);
	s->st.appends++;
	pg->last_access = ++s->clock;
	if (seal || pg->len == s->p.page_bytes) {
		seal_page(s, pg);
		progress(s, pg);
	}
	return 0;
}

/*
 * Brings a copy of the page to `to`; with only_if_room, starts only where every tier on
 * the way has room now (free, or by evicting a cold copy) and else returns -EAGAIN.
 */
static int promote_page(struct kvt_store *s, struct page *pg, enum tier_id to,
			bool only_if_room, bool queued_ok, kvt_store_cb cb, void *arg)
{
	if (to != TIER_HOST && to != TIER_GPU)
		return -EINVAL;
	if (!s->tier[to])
		return -ENODEV;
	const bool there = (pg->valid | pg->busy) & B(to); /* or on its way */
	for (int t = TIER_HOST; only_if_room && !there && t >= (int)to; t--) {
		if ((pg->valid | pg->busy) & B(t))
			continue;
		tier_slot_t slot;
		int ret = slot_get(s, (enum tier_id)t, pg->key.tenant, &slot);
		if (ret < 0)
			return ret == -ENOSPC ? -EAGAIN : ret;
		s->tier[t]->ops->free(s->tier[t], slot);
	}
	pg->last_access = ++s->clock;
	pg->seq->last_access = pg->last_access;
	if (pg->valid & B(to)) {
		lru_touch(s, pg, to);
		defer(s, cb, arg, 0);
		return 0;
	}
	if (queued_ok && (pg->queued & B(to))) {
		defer(s, cb, arg, 0);
		return 0;
	}
	int ret = add_waiter(s, pg, queued_ok ? WAIT_QUEUED : to, cb, arg, NULL, 0);
	if (ret < 0)
		return ret;
	pg->want |= B(to);
	progress(s, pg);
	return 0;
}

static int promote(struct kvt_store *s, const struct page_key *k, enum tier_id to,
		   bool only_if_room, bool queued_ok, kvt_store_cb cb, void *arg)
{
	struct page *pg = page_find(s, k);
	if (!pg)
		return -ENOENT;
	return promote_page(s, pg, to, only_if_room, queued_ok, cb, arg);
}

int kvt_store_promote(struct kvt_store *s, const struct page_key *k, enum tier_id to,
		      kvt_store_cb cb, void *arg)
{
	return promote(s, k, to, false, false, cb, arg);
}

int kvt_store_promote_queued(struct kvt_store *s, const struct page_key *k, kvt_store_cb cb,
			     void *arg)
{
	return promote(s, k, TIER_GPU, false, true, cb, arg);
}

int kvt_store_copy_fence(struct kvt_store *s, struct kvt_fence *f)
{
	return s->dev->ops->fence_record_copies(s->dev, f, KVT_H2D);
}

int kvt_store_prefetch(struct kvt_store *s, const struct page_key *k, enum tier_id to,
		       kvt_store_cb cb, void *arg)
{
	return promote(s, k, to, true, false, cb, arg);
}

int kvt_store_hurry(struct kvt_store *s, const struct page_key *k)
{
	struct page *pg = page_find(s, k);
	if (!pg)
		return -ENOENT;
	if (!pg->rd) {
		/* waiting for room in a tier before its read can start: first to get it,
		 * and its read urgent then */
		if (!kvt_list_linked(&pg->stall_link) || (pg->valid & B(TIER_HOST)) ||
		    !(pg->valid & B(TIER_NVME)))
			return -ENOENT;
		if (!pg->hurry) {
			pg->hurry = true;
			kvt_list_del(&pg->stall_link);
			kvt_list_add(&s->stalled, &pg->stall_link);
			s->st.reads_hurried++;
		}
		return 0;
	}
	struct tier_io *io = &pg->rd->io;
	if (io->urgent)
		return 0;
	struct tier *t = s->tier[TIER_NVME];
	if (io->tier && t->ops->hurry) /* submitted: the tier moves it up */
		t->ops->hurry(t, io);
	else /* still in the store's queue: submitted urgent */
		io->urgent = true;
	pg->rd->hurry_ns = tier_now_ns();
	s->st.reads_hurried++;
	return 0;
}

int kvt_store_writeback(struct kvt_store *s, const struct page_key *k, kvt_store_cb cb,
			void *arg)
{
	struct page *pg = page_find(s, k);
	if (!pg)
		return -ENOENT;
	if (pg->state == KVT_PAGE_FILLING)
		return -EINVAL;
	if (pg->valid & B(TIER_NVME)) {
		defer(s, cb, arg, 0);
		return 0;
	}
	if (pg->slot[TIER_NVME] == TIER_SLOT_NONE) {
		int ret = slot_get(s, TIER_NVME, pg->key.tenant, &pg->slot[TIER_NVME]);
		if (ret < 0) {
			pg->slot[TIER_NVME] = TIER_SLOT_NONE;
			return ret;
		}
		pg->wb_tries = 0;
	}
	int ret = add_waiter(s, pg, TIER_NVME, cb, arg, NULL, 0);
	if (ret < 0)
		return ret;
	pg->want |= B(TIER_NVME);
	/* An explicit request jumps the background queue. */
	kvt_list_del(&pg->wb_link);
	if ((pg->busy & B(TIER_NVME)) || !(pg->valid & B(TIER_HOST)) ||
	    start_move(s, pg, TIER_HOST, TIER_NVME, pg->slot[TIER_NVME]) < 0)
		progress(s, pg); /* via host, or queued for the cron to retry */
	return 0;
}

int kvt_store_evict(struct kvt_store *s, const struct page_key *k, enum tier_id from)
{
	if ((unsigned)from >= TIER_MAX)
		return -EINVAL;
	struct page *pg = page_find(s, k);
	if (!pg || !(pg->valid & B(from)))
		return -ENOENT;
	if (pg->pins || pg->readers[from] || (pg->busy & B(from)))
		return -EBUSY;
	if (!(pg->valid & ~B(from)))
		return -EPERM;
	drop_copy(s, pg, from, KVT_EVICT_REQUEST);
	if (from == TIER_NVME) {
		set_dirty(s, pg); /* no longer on disk: the slot is wiped */
		pg->slot[TIER_NVME] = TIER_SLOT_NONE;
	}
	return 0;
}

int kvt_store_drop_seq(struct kvt_store *s, uint32_t tenant, uint64_t seq)
{
	struct seq *q = seq_find(s, tenant, seq);
	if (!q)
		return -ENOENT;
	return seq_drop(s, q);
}

uint64_t kvt_store_epoch(const struct kvt_store *s)
{
	return s->epoch;
}

int kvt_store_drop_page(struct kvt_store *s, const struct page_key *k)
{
	struct page *pg = page_find(s, k);
	if (!pg)
		return -ENOENT;
	if (pg->pins)
		return -EBUSY;
	page_drop(s, pg);
	return 0;
}

int kvt_store_read(struct kvt_store *s, const struct page_key *k, void *dst, uint32_t cap,
		   kvt_store_cb cb, void *arg)
{
	struct page *pg = page_find(s, k);
	if (!pg)
		return -ENOENT;
	if (!dst)
		return -EINVAL;
	int ret = add_waiter(s, pg, WAIT_READ, cb, arg, dst, cap);
	if (ret < 0)
		return ret;
	pg->want |= B(TIER_HOST);
	wake(s, pg, 0);
	progress(s, pg);
	return 0;
}

static int pin(struct page *pg)
{
	if (pg->pins == UINT16_MAX)
		return -EOVERFLOW;
	pg->pins++; /* on the LRU lists still: evict_one takes it off if it meets it */
	return 0;
}

int kvt_store_pin(struct kvt_store *s, const struct page_key *k)
{
	struct page *pg = page_find(s, k);
	return pg ? pin(pg) : -ENOENT;
}

int kvt_store_unpin(struct kvt_store *s, const struct page_key *k)
{
	struct page *pg = page_find(s, k);
	if (!pg)
		return -ENOENT;
	if (!pg->pins)
		return -EINVAL;
	if (!--pg->pins)
		for (int t = TIER_GPU; t <= TIER_HOST; t++)
			if ((pg->valid & B(t)) && !pg->dropped)
				lru_touch(s, pg, (enum tier_id)t);
	return 0;
}

int kvt_store_touch(struct kvt_store *s, const struct page_key *k, float score)
{
	struct page *pg = page_find(s, k);
	if (!pg)
		return -ENOENT;
	pg->score = score;
	s->score_ema = 0.99f * s->score_ema + 0.01f * score;
	uint64_t ms = s->now_ms;
	if (pg->touch_ms) {
		s->st.reuse_gap[kvt_hist_bucket(ms - pg->touch_ms)]++;
		s->st.reuse_gap_sum_ms += ms - pg->touch_ms;
	}
	pg->touch_ms = ms ? ms : 1;
	pg->last_access = ++s->clock;
	pg->seq->last_access = pg->last_access;
	for (int t = 0; t < 2; t++)
		if (pg->valid & B(t))
			lru_touch(s, pg, (enum tier_id)t);
	return 0;
}

static void page_info(const struct page *pg, struct kvt_page_info *out)
{
	out->state = (enum kvt_page_state)pg->state;
	out->valid = pg->valid;
	out->inflight = pg->busy;
	out->queued = pg->queued;
	out->pins = pg->pins;
	out->len = pg->len;
	out->epoch = pg->epoch;
	out->score = pg->score;
	for (int t = 0; t < TIER_MAX; t++)
		out->slot[t] = pg->slot[t];
}

void kvt_store_warm(struct kvt_store *s, const struct page_key *k, bool page)
{
	struct page *const *b = &s->pbuckets[page_key_hash(k) & s->pmask];
	if (!page) {
		__builtin_prefetch(b);
		return;
	}
	if (*b) /* the first of its bucket: mostly the one */
		page_prefetch(*b);
}

uint64_t kvt_store_drops(const struct kvt_store *s)
{
	return s->st.pages_dropped;
}

struct kvt_page_ref *kvt_store_lookup(const struct kvt_store *s, const struct page_key *k,
				      struct kvt_page_info *out)
{
	struct page *pg = page_find(s, k);
	if (pg && out)
		page_info(pg, out);
	return (struct kvt_page_ref *)pg;
}

int kvt_store_pin_ref(struct kvt_store *s, struct kvt_page_ref *r)
{
	(void)s;
	return pin((struct page *)r);
}

int kvt_store_prefetch_ref(struct kvt_store *s, struct kvt_page_ref *r, enum tier_id to,
			   kvt_store_cb cb, void *arg)
{
	return promote_page(s, (struct page *)r, to, true, false, cb, arg);
}

void kvt_store_ref_info(const struct kvt_page_ref *r, struct kvt_page_info *out)
{
	page_info((const struct page *)r, out);
}

void kvt_store_ref_warm(const struct kvt_page_ref *r)
{
	page_prefetch((const struct page *)r);
}

int kvt_store_page_info(struct kvt_store *s, const struct page_key *k,
			struct kvt_page_info *out)
{
	return kvt_store_lookup(s, k, out) ? 0 : -ENOENT;
}

int kvt_store_foreach(struct kvt_store *s, uint32_t tenant, uint64_t seq,
		      kvt_store_page_fn fn, void *arg)
{
	struct kvt_page_info pi;
	if (seq != UINT64_MAX && tenant != UINT32_MAX) {
		struct seq *q = seq_find(s, tenant, seq);
		if (!q)
			return 0;
		struct kvt_list *pos, *tmp;
		kvt_list_for_each_safe(pos, tmp, &q->pages)
		{
			struct page *pg = kvt_container_of(pos, struct page, seq_link);
			page_info(pg, &pi);
			int r = fn(arg, &pg->key, &pi);
			if (r)
				return r;
		}
		return 0;
	}
	for (uint64_t b = 0; b <= s->pmask; b++) {
		for (struct page *pg = s->pbuckets[b]; pg; pg = pg->hnext) {
			if ((tenant != UINT32_MAX && pg->key.tenant != tenant) ||
			    (seq != UINT64_MAX && pg->key.seq != seq))
				continue;
			page_info(pg, &pi);
			int r = fn(arg, &pg->key, &pi);
			if (r)
				return r;
		}
	}
	return 0;
}

void *kvt_store_slot_ptr(struct kvt_store *s, const struct page_key *k, enum tier_id t)
{
	struct page *pg = page_find(s, k);
	if (!pg || (unsigned)t >= TIER_MAX || !(pg->valid & B(t)))
		return NULL;
	return tier_ptr(s, t, pg->slot[t]);
}

/* ---- periodic work ---- */

static void cron(struct kvt_store *s)
{
	/* Stalled pages first: slots may have come free. */
	struct kvt_list stalled = s->stalled;
	if (!kvt_list_empty(&s->stalled)) {
		stalled.next->prev = &stalled;
		stalled.prev->next = &stalled;
		kvt_list_init(&s->stalled);
		struct kvt_list *pos, *tmp;
		kvt_list_for_each_safe(pos, tmp, &stalled)
		{
			struct page *pg = kvt_container_of(pos, struct page, stall_link);
			kvt_list_del(pos);
			progress(s, pg);
		}
	}
	while (s->wb_inflight < s->p.writeback_max && !kvt_list_empty(&s->wbq)) {
		struct page *pg = kvt_list_first(&s->wbq, struct page, wb_link);
		kvt_list_del(&pg->wb_link);
		progress(s, pg);
		if (kvt_list_linked(&pg->wb_link))
			break;
	}
	/*
	 * Write-back: the pages on no disk are kept below the host tier's low watermark, the
	 * oldest written first, so that the rest of it is clean copies: a page read back
	 * from disk then finds a slot at once, and the disk is not written on a read's way.
	 * Once a millisecond. (It looked for dirty pages among the WB_SCAN coldest host
	 * copies, which at batch 32 on the H200 were clean ones: dirty pages stayed at 89%
	 * and reads from disk waited for writes.)
	 */
	if (s->p.write_policy == KVT_WRITE_BACK && s->now_ms >= s->wb_next_ms) {
		struct tier_usage nu, hu;
		s->tier[TIER_NVME]->ops->usage(s->tier[TIER_NVME], &nu);
		s->tier[TIER_HOST]->ops->usage(s->tier[TIER_HOST], &hu);
		const uint64_t dirty = s->npages > nu.used ? s->npages - nu.used : 0,
			       low = hu.slots * s->p.low_wm / 100;
		if (dirty > low)
			write_oldest(s, dirty - low);
		s->wb_next_ms = s->now_ms + 1;
	}
	/*
	 * Watermarks: background eviction of clean copies. A pass that falls short (what is
	 * left is dirty, pinned or in use) waits a millisecond for the next. Write-back's
	 * host tier keeps only HOST_WB_FREE% free: its clean copies are the pages written
	 * first (above), taken at once where a slot is wanted, and each one kept is a read
	 * from disk saved (evicted down to the low watermark, H200 batch 32: 12.5 -> 16.8 MB
	 * a step read from disk).
	 */
	for (int t = 0; t < 2; t++) {
		if (!s->tier[t] || s->now_ms < s->wm_next_ms[t])
			continue;
		struct tier_usage u;
		s->tier[t]->ops->usage(s->tier[t], &u);
		uint64_t high = u.slots * s->p.high_wm / 100, low = u.slots * s->p.low_wm / 100;
		if (t == TIER_HOST && s->p.write_policy == KVT_WRITE_BACK) {
			high = u.slots - u.slots * HOST_WB_FREE / 100;
			low = high - u.slots / 200;
		}
		if (u.used <= high)
			continue;
		while (u.used > low && evict_one(s, (enum tier_id)t, KVT_EVICT_WATERMARK))
			u.used--;
		if (u.used > low)
			s->wm_next_ms[t] = s->now_ms + 1;
	}
}

int kvt_store_run(struct kvt_store *s, int timeout_ms)
{
	int handled = 0;
	s->now_ms = tier_now_ns() / 1000000;
	cron(s);
	flush_queues(s);
	if (kvt_list_empty(&s->ready)) {
		int ret = kvt_loop_run(&s->loop, timeout_ms ? 1 : 0, timeout_ms);
		if (ret < 0)
			return ret;
		handled += ret;
		flush_queues(s);
	}
	/* Callbacks last: they may start new work, which the next run picks up. */
	while (!kvt_list_empty(&s->ready)) {
		struct ready *r = kvt_list_first(&s->ready, struct ready, link);
		kvt_list_del(&r->link);
		r->cb(r->arg, r->res);
		fl_put(&s->free_ready, r);
		handled++;
	}
	flush_queues(s);
	return handled;
}

bool kvt_store_busy(struct kvt_store *s)
{
	struct tier_usage u;
	s->tier[TIER_NVME]->ops->usage(s->tier[TIER_NVME], &u);
	return s->moves_inflight || !kvt_list_empty(&s->ready) || !kvt_list_empty(&s->wbq) ||
	       u.inflight;
}

struct flush_ctx {
	unsigned pending;
	int err;
};

static void flush_cb(void *arg, int res)
{
	struct flush_ctx *f = arg;
	f->pending--;
	if (res && !f->err)
		f->err = res;
}

int kvt_store_flush(struct kvt_store *s)
{
	struct flush_ctx f = {0};
	for (uint64_t b = 0; b <= s->pmask; b++) {
		for (struct page *pg = s->pbuckets[b]; pg; pg = pg->hnext) {
			if (pg->state != KVT_PAGE_DIRTY)
				continue;
			int ret = kvt_store_writeback(s, &pg->key, flush_cb, &f);
			if (ret == 0)
				f.pending++;
			else if (!f.err)
				f.err = ret;
		}
	}
	while (f.pending || s->moves_inflight) {
		int ret = kvt_store_run(s, 100);
		if (ret < 0)
			return ret;
	}
	return f.err;
}

/* ---- open / close ---- */

static bool recover_page(void *arg, tier_slot_t slot, const struct page_meta *m,
			 enum page_check c)
{
	struct kvt_store *s = arg;
	if (c != PAGE_OK) {
		s->st.recovered_bad++;
		return false;
	}
	struct page *pg = page_find(s, &m->key);
	if (pg) {
		/* Two copies of one page: the later write wins. */
		if (pg->epoch > m->epoch)
			return false;
		s->tier[TIER_NVME]->ops->free(s->tier[TIER_NVME], pg->slot[TIER_NVME]);
		s->st.recovered_pages--;
	} else {
		pg = page_new(s, &m->key);
		if (!pg)
			return false;
	}
	pg->len = m->len;
	pg->epoch = m->epoch;
	pg->csum = m->csum;
	pg->state = KVT_PAGE_CLEAN;
	pg->valid = B(TIER_NVME);
	pg->slot[TIER_NVME] = slot;
	if (m->epoch > s->epoch)
		s->epoch = m->epoch;
	s->st.recovered_pages++;
	return true;
}

const char *tier_name(enum tier_id id)
{
	static const char *const n[TIER_MAX] = {"gpu", "host", "nvme"};
	return (unsigned)id < TIER_MAX ? n[id] : "?";
}

int kvt_store_open(const struct kvt_store_params *p, struct kvt_store **out)
{
	if (!p || !p->nvme_path)
		return -EINVAL;
	struct kvt_store *s = kvt_calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	s->p = *p;
	s->now_ms = tier_now_ns() / 1000000;
	if (!s->p.page_bytes)
		s->p.page_bytes = 32768;
	if (!s->p.queue_depth)
		s->p.queue_depth = 64;
	if (!s->p.writeback_max)
		s->p.writeback_max = s->p.queue_depth > 1 ? s->p.queue_depth / 2 : 1;
	if (!s->p.high_wm || s->p.high_wm > 100)
		s->p.high_wm = 90;
	if (!s->p.low_wm || s->p.low_wm >= s->p.high_wm)
		s->p.low_wm = s->p.high_wm > 10 ? s->p.high_wm - 10 : s->p.high_wm / 2;
	if (!s->p.nvme_ops)
		s->p.nvme_ops = s->p.faults && s->p.faults[0] ? &tier_fault_ops : &tier_nvme_ops;
	kvt_list_init(&s->lru[0]);
	kvt_list_init(&s->lru[1]);
	kvt_list_init(&s->wbq);
	kvt_list_init(&s->dirty);
	kvt_list_init(&s->stalled);
	kvt_list_init(&s->ready);
	s->pmask = 1023;
	s->smask = 63;
	s->pbuckets = kvt_calloc(s->pmask + 1, sizeof(*s->pbuckets));
	s->sbuckets = kvt_calloc(s->smask + 1, sizeof(*s->sbuckets));
	int ret = -ENOMEM;
	if (!s->pbuckets || !s->sbuckets)
		goto fail;
	if (s->p.page_bytes % 512 || s->p.page_bytes > (64u << 20)) {
		kvt_err("store", "page size %u: must be a multiple of 512, at most 64 MiB",
			s->p.page_bytes);
		ret = -EINVAL;
		goto fail;
	}
	ret = kvt_loop_init(&s->loop, s->p.queue_depth * 2 + 64);
	if (ret < 0)
		goto fail;
	if (p->dev) {
		s->dev = p->dev;
	} else {
		ret = kvt_device_open(p->device, 0, &s->dev);
		if (ret < 0)
			goto fail;
		s->own_dev = true;
	}
	struct tier_params tp = {
		.loop = &s->loop,
		.dev = s->dev,
		.page_bytes = s->p.page_bytes,
		.capacity = s->p.nvme_bytes,
		.path = s->p.nvme_path,
		.queue_depth = s->p.queue_depth,
		.bg_depth = s->p.background_depth,
		.durable = s->p.durable,
		.numa_node = s->dev->ops->numa_node(s->dev),
		.faults = s->p.faults,
	};
	ret = s->p.nvme_ops->open(&s->tier[TIER_NVME], &tp);
	if (ret < 0)
		goto fail;
	tp.span = s->tier[TIER_NVME]->ops->io_span(s->tier[TIER_NVME]);
	tp.stride_align = s->tier[TIER_NVME]->ops->io_align(s->tier[TIER_NVME]);
	ret = tier_host_ops.open(&s->tier[TIER_HOST], &tp);
	if (ret < 0)
		goto fail;
	if (s->p.gpu_bytes) {
		ret = tier_gpu_ops.open(&s->tier[TIER_GPU], &tp);
		if (ret < 0)
			goto fail;
	}
	ret = kvt_store_add_tenant(s, 0, s->p.host_bytes, s->p.gpu_bytes);
	if (ret < 0)
		goto fail;
	int64_t kept = s->tier[TIER_NVME]->ops->scan(s->tier[TIER_NVME], recover_page, s);
	if (kept < 0) {
		ret = (int)kept;
		goto fail;
	}
	s->epoch++;
	*out = s;
	return 0;
fail:
	kvt_store_close(s);
	return ret;
}

int kvt_store_add_tenant(struct kvt_store *s, uint32_t tenant, uint64_t host_bytes,
			 uint64_t gpu_bytes)
{
	if (!host_bytes)
		return -EINVAL;
	int ret = s->tier[TIER_HOST]->ops->arena_add(s->tier[TIER_HOST], tenant, host_bytes);
	if (ret < 0)
		return ret;
	if (gpu_bytes && s->tier[TIER_GPU]) {
		ret = s->tier[TIER_GPU]->ops->arena_add(s->tier[TIER_GPU], tenant, gpu_bytes);
		if (ret < 0)
			return ret;
	}
	return 0;
}

void kvt_store_close(struct kvt_store *s)
{
	if (!s)
		return;
	if (s->loop.entries) {
		flush_queues(s);
		while (s->moves_inflight && kvt_loop_run(&s->loop, 1, 1000) >= 0)
			flush_queues(s);
	}
	while (!kvt_list_empty(&s->ready)) {
		struct ready *r = kvt_list_first(&s->ready, struct ready, link);
		kvt_list_del(&r->link);
		kvt_free(r);
	}
	if (s->pbuckets) {
		for (uint64_t b = 0; b <= s->pmask; b++) {
			struct page *pg = s->pbuckets[b];
			while (pg) {
				struct page *nx = pg->hnext;
				for (struct waiter *w = pg->waiters; w;) {
					struct waiter *wn = w->next;
					kvt_free(w);
					w = wn;
				}
				kvt_free(pg);
				pg = nx;
			}
		}
	}
	if (s->sbuckets) {
		for (uint64_t b = 0; b <= s->smask; b++) {
			struct seq *q = s->sbuckets[b];
			while (q) {
				struct seq *nx = q->hnext;
				kvt_free(q);
				q = nx;
			}
		}
	}
	/* GPU tier before host: its copies read host memory. */
	for (int t = 0; t < TIER_MAX; t++)
		if (s->tier[t])
			s->tier[t]->ops->close(s->tier[t]);
	if (s->own_dev)
		kvt_device_close(s->dev);
	kvt_loop_exit(&s->loop);
	for (int t = 0; t < TIER_MAX; t++)
		kvt_free(s->q[t].ios);
	kvt_free(s->pbuckets);
	kvt_free(s->sbuckets);
	fl_drain(&s->free_moves);
	fl_drain(&s->free_waiters);
	fl_drain(&s->free_ready);
	kvt_free(s);
}

void kvt_store_stats(struct kvt_store *s, struct kvt_store_stats *out)
{
	*out = s->st;
	for (int t = 0; t < TIER_MAX; t++)
		if (s->tier[t])
			s->tier[t]->ops->usage(s->tier[t], &out->tier[t]);
	out->pages = s->npages;
	out->seqs = s->nseqs;
	uint64_t filling = 0, dirty = 0;
	for (uint64_t b = 0; b <= s->pmask; b++) {
		for (struct page *pg = s->pbuckets[b]; pg; pg = pg->hnext) {
			filling += pg->state == KVT_PAGE_FILLING;
			dirty += pg->state == KVT_PAGE_DIRTY;
		}
	}
	out->pages_filling = filling;
	out->pages_dirty = dirty;
	out->meta_bytes = kvt_alloc_bytes();
}

struct tier *kvt_store_tier(struct kvt_store *s, enum tier_id t)
{
	return (unsigned)t < TIER_MAX ? s->tier[t] : NULL;
}

struct kvt_loop *kvt_store_loop(struct kvt_store *s)
{
	return &s->loop;
}

struct kvt_device *kvt_store_device(struct kvt_store *s)
{
	return s->dev;
}

uint32_t kvt_store_page_bytes(struct kvt_store *s)
{
	return s->p.page_bytes;
}
