// SPDX-License-Identifier: MIT
/*
 * GPU tier: slots in device memory, one arena per tenant, each a separate device
 * allocation exportable as an fd (CUDA VMM; a memfd on the cpu device). Page copies
 * to and from host memory are batched: one submit becomes one device batch per
 * direction, never one small copy per page.
 */
#include "tier.h"
#include "device.h"
#include "slots.h"
#include "daemon/alloc.h"
#include "daemon/log.h"

#include <errno.h>
#include <poll.h>
#include <string.h>

#define GPU_MAX_ARENAS 64

struct gpu_arena {
	uint32_t tenant;
	struct kvt_dev_mem mem;
	struct slot_pool pool;
};

struct gpu_batch {
	struct kvt_copy_batch b;
	struct gpu_tier *g;
	unsigned n;
	struct tier_io **ios;
	struct kvt_copy *copies;
};

struct gpu_tier {
	struct tier base;
	struct kvt_device *dev;
	struct kvt_op wake; /* multishot poll on the device's eventfd */
	bool polling;
	unsigned narenas;
	struct gpu_arena arenas[GPU_MAX_ARENAS];
	uint64_t reads, writes, read_bytes, write_bytes, errors;
	unsigned batches_inflight;
};

static void gpu_arm(struct gpu_tier *g);

static void gpu_wake(struct kvt_op *op, int res, uint32_t flags)
{
	struct gpu_tier *g = kvt_container_of(op, struct gpu_tier, wake);
	g->dev->ops->poll(g->dev);
	if (!(flags & IORING_CQE_F_MORE)) {
		g->polling = false;
		if (res != -ECANCELED)
			gpu_arm(g);
	}
}

static void gpu_arm(struct gpu_tier *g)
{
	if (g->polling || !g->base.p.loop)
		return;
	struct io_uring_sqe *sqe = kvt_loop_sqe(g->base.p.loop, &g->wake);
	io_uring_prep_poll_multishot(sqe, g->dev->ops->event_fd(g->dev), POLLIN);
	g->polling = true;
}

static int gpu_open(struct tier **out, const struct tier_params *p)
{
	if (!p->dev)
		return -EINVAL;
	struct gpu_tier *g = kvt_calloc(1, sizeof(*g));
	if (!g)
		return -ENOMEM;
	g->base.ops = &tier_gpu_ops;
	g->base.p = *p;
	g->dev = p->dev;
	g->wake.fn = gpu_wake;
	gpu_arm(g);
	*out = &g->base;
	return 0;
}

static void gpu_close(struct tier *t)
{
	struct gpu_tier *g = (struct gpu_tier *)t;
	/* Let batches in flight land before their memory goes. */
	while (g->batches_inflight) {
		struct pollfd pfd = {.fd = g->dev->ops->event_fd(g->dev), .events = POLLIN};
		poll(&pfd, 1, 100);
		g->dev->ops->poll(g->dev);
	}
	if (g->polling && t->p.loop) {
		struct io_uring_sqe *sqe = kvt_loop_sqe(t->p.loop, NULL);
		io_uring_prep_poll_remove(sqe, (__u64)(uintptr_t)&g->wake);
		kvt_loop_submit(t->p.loop);
		/* The removal's and the poll's CQEs: the latter runs gpu_wake. */
		for (int i = 0; i < 10 && g->polling; i++)
			kvt_loop_run(t->p.loop, 1, 10);
		kvt_loop_run(t->p.loop, 0, 0);
	}
	for (unsigned i = 0; i < g->narenas; i++) {
		g->dev->ops->mem_destroy(g->dev, &g->arenas[i].mem);
		slot_pool_destroy(&g->arenas[i].pool);
	}
	kvt_free(g);
}

static int gpu_arena_add(struct tier *t, uint32_t tenant, uint64_t bytes)
{
	struct gpu_tier *g = (struct gpu_tier *)t;
	if (g->narenas == GPU_MAX_ARENAS)
		return -ENOSPC;
	uint64_t nslots = bytes / t->p.page_bytes;
	if (!nslots || nslots > UINT32_MAX)
		return -EINVAL;
	struct gpu_arena *a = &g->arenas[g->narenas];
	memset(a, 0, sizeof(*a));
	a->tenant = tenant;
	int ret = g->dev->ops->mem_create(g->dev, nslots * t->p.page_bytes, &a->mem);
	if (ret < 0) {
		kvt_err("gpu", "pool of %llu bytes for tenant %u: %s",
			(unsigned long long)(nslots * t->p.page_bytes), tenant, strerror(-ret));
		return ret;
	}
	ret = slot_pool_init(&a->pool, (uint32_t)nslots);
	if (ret < 0) {
		g->dev->ops->mem_destroy(g->dev, &a->mem);
		return ret;
	}
	kvt_info("gpu", "arena %u: tenant %u, %llu slots of %u bytes on %s", g->narenas, tenant,
		 (unsigned long long)nslots, t->p.page_bytes, g->dev->ops->describe(g->dev));
	return (int)g->narenas++;
}

static struct gpu_arena *arena_of(struct gpu_tier *g, tier_slot_t s)
{
	uint32_t ai = TIER_SLOT_ARENA(s);
	if (s == TIER_SLOT_NONE || ai >= g->narenas ||
	    TIER_SLOT_INDEX(s) >= g->arenas[ai].pool.nslots)
		return NULL;
	return &g->arenas[ai];
}

static int gpu_alloc(struct tier *t, uint32_t tenant, tier_slot_t *out)
{
	struct gpu_tier *g = (struct gpu_tier *)t;
	bool found = false;
	for (unsigned i = 0; i < g->narenas; i++) {
		if (g->arenas[i].tenant != tenant)
			continue;
		found = true;
		uint32_t idx;
		if (slot_pool_alloc(&g->arenas[i].pool, &idx) == 0) {
			*out = TIER_SLOT(i, idx);
			return 0;
		}
	}
	return found ? -ENOSPC : -ENOENT;
}

static void gpu_free(struct tier *t, tier_slot_t s)
{
	struct gpu_arena *a = arena_of((struct gpu_tier *)t, s);
	if (!a || slot_pool_free(&a->pool, (uint32_t)TIER_SLOT_INDEX(s)) < 0)
		kvt_err("gpu", "free of slot %llx not in use", (unsigned long long)s);
}

static void gpu_poison(struct tier *t, tier_slot_t s)
{
	struct gpu_arena *a = arena_of((struct gpu_tier *)t, s);
	if (a)
		slot_pool_poison(&a->pool, (uint32_t)TIER_SLOT_INDEX(s));
}

static void *gpu_slot_ptr(struct tier *t, tier_slot_t s)
{
	struct gpu_arena *a = arena_of((struct gpu_tier *)t, s);
	if (!a)
		return NULL;
	return (char *)a->mem.ptr + TIER_SLOT_INDEX(s) * t->p.page_bytes;
}

static void batch_done(struct kvt_copy_batch *b)
{
	struct gpu_batch *gb = kvt_container_of(b, struct gpu_batch, b);
	struct gpu_tier *g = gb->g;
	g->batches_inflight--;
	for (unsigned i = 0; i < gb->n; i++) {
		struct tier_io *io = gb->ios[i];
		io->res = b->res;
		if (b->res < 0) {
			g->errors++;
		} else if (io->dir == TIER_READ) {
			g->reads++;
			g->read_bytes += io->len;
		} else {
			g->writes++;
			g->write_bytes += io->len;
		}
		io->done(io);
	}
	kvt_free(gb);
}

static int submit_dir(struct gpu_tier *g, struct tier_io **ios, unsigned n, enum tier_dir dir)
{
	unsigned m = 0;
	for (unsigned i = 0; i < n; i++)
		m += ios[i]->dir == dir;
	if (!m)
		return 0;
	struct gpu_batch *gb = kvt_malloc(sizeof(*gb) + m * (sizeof(struct tier_io *) +
							     sizeof(struct kvt_copy)));
	if (!gb)
		return -ENOMEM;
	gb->copies = (struct kvt_copy *)(gb + 1);
	gb->ios = (struct tier_io **)(gb->copies + m);
	gb->g = g;
	gb->n = 0;
	for (unsigned i = 0; i < n; i++) {
		struct tier_io *io = ios[i];
		if (io->dir != dir)
			continue;
		char *d = gpu_slot_ptr(&g->base, io->slot);
		struct kvt_copy *c = &gb->copies[gb->n];
		c->len = io->len;
		c->dst = dir == TIER_WRITE ? (void *)d : io->buf;
		c->src = dir == TIER_WRITE ? io->buf : (const void *)d;
		io->tier = &g->base;
		io->check = PAGE_OK;
		gb->ios[gb->n++] = io;
	}
	gb->b.copies = gb->copies;
	gb->b.n = gb->n;
	gb->b.dir = dir == TIER_WRITE ? KVT_H2D : KVT_D2H;
	gb->b.done = batch_done;
	int ret = g->dev->ops->copy_submit(g->dev, &gb->b);
	if (ret < 0) {
		kvt_free(gb);
		return ret;
	}
	g->batches_inflight++;
	return 0;
}

static int gpu_submit(struct tier *t, struct tier_io **ios, unsigned n)
{
	struct gpu_tier *g = (struct gpu_tier *)t;
	for (unsigned i = 0; i < n; i++)
		if (!gpu_slot_ptr(t, ios[i]->slot) || ios[i]->len > t->p.page_bytes)
			return -EINVAL;
	bool writes = false;
	for (unsigned i = 0; i < n; i++)
		writes |= ios[i]->dir == TIER_WRITE;
	int ret = submit_dir(g, ios, n, TIER_WRITE);
	if (ret < 0)
		return ret; /* nothing started */
	ret = submit_dir(g, ios, n, TIER_READ);
	if (ret < 0 && !writes)
		return ret;
	if (ret < 0) {
		/* The writes are under way: the reads complete here with the error. */
		for (unsigned i = 0; i < n; i++) {
			if (ios[i]->dir == TIER_READ) {
				ios[i]->res = ret;
				g->errors++;
				ios[i]->done(ios[i]);
			}
		}
	}
	gpu_arm(g);
	return 0;
}

static void gpu_usage(struct tier *t, struct tier_usage *u)
{
	struct gpu_tier *g = (struct gpu_tier *)t;
	memset(u, 0, sizeof(*u));
	for (unsigned i = 0; i < g->narenas; i++) {
		u->slots += g->arenas[i].pool.nslots;
		u->used += slot_pool_used(&g->arenas[i].pool);
		u->poisoned += g->arenas[i].pool.npoisoned;
	}
	u->capacity_bytes = u->slots * t->p.page_bytes;
	u->used_bytes = u->used * t->p.page_bytes;
	u->reads = g->reads;
	u->writes = g->writes;
	u->read_bytes = g->read_bytes;
	u->write_bytes = g->write_bytes;
	u->errors = g->errors;
}

int tier_gpu_arena_info(struct tier *t, uint32_t arena, int *fd, void **base, uint64_t *len)
{
	struct gpu_tier *g = (struct gpu_tier *)t;
	if (t->ops != &tier_gpu_ops || arena >= g->narenas)
		return -EINVAL;
	*fd = g->arenas[arena].mem.fd;
	*base = g->arenas[arena].mem.ptr;
	*len = g->arenas[arena].mem.size;
	return 0;
}

int tier_gpu_tenant_arena(struct tier *t, uint32_t tenant)
{
	struct gpu_tier *g = (struct gpu_tier *)t;
	if (t->ops != &tier_gpu_ops)
		return -EINVAL;
	for (unsigned i = 0; i < g->narenas; i++)
		if (g->arenas[i].tenant == tenant)
			return (int)i;
	return -ENOENT;
}

const struct tier_ops tier_gpu_ops = {
	.name = "gpu",
	.version = TIER_OPS_VERSION,
	.caps = TIER_CAP_DEVICE | TIER_CAP_ARENAS,
	.open = gpu_open,
	.close = gpu_close,
	.arena_add = gpu_arena_add,
	.alloc = gpu_alloc,
	.free = gpu_free,
	.poison = gpu_poison,
	.slot_ptr = gpu_slot_ptr,
	.submit = gpu_submit,
	.usage = gpu_usage,
};
