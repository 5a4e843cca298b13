// SPDX-License-Identifier: MIT
/*
 * Host tier: pinned host RAM in arenas, one per tenant, each a sealed memfd mapped
 * MAP_SHARED (so it can be handed to that tenant's processes), placed on the GPU's
 * NUMA node, pinned by the device and registered with the loop's io_uring so the nvme
 * tier reads into it with READ_FIXED. Slot i of an arena is the page at base + i *
 * stride: page_bytes, padded to the nvme tier's io span and block (the page header
 * goes to disk from a buffer of the nvme tier's own, so RAM holds payload alone).
 */
#include "tier.h"
#include "device.h"
#include "slots.h"
#include "daemon/alloc.h"
#include "daemon/log.h"
#include "kvtier_config.h"

#include <errno.h>
#include <fcntl.h>
#include <numa.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

#define HOST_MAX_ARENAS 64

struct host_arena {
	uint32_t tenant;
	int fd;
	char *base;
	uint64_t len;
	bool registered; /* with the device */
	int buf_index;   /* first fixed buffer, or -1 */
	struct slot_pool pool;
};

struct host_tier {
	struct tier base;
	uint32_t stride;
	unsigned narenas;
	struct host_arena arenas[HOST_MAX_ARENAS];
	uint64_t reads, writes, read_bytes, write_bytes;
};

static int host_open(struct tier **out, const struct tier_params *p)
{
	struct host_tier *h = kvt_calloc(1, sizeof(*h));
	if (!h)
		return -ENOMEM;
	h->base.ops = &tier_host_ops;
	h->base.p = *p;
	uint32_t align = p->stride_align > 64 ? p->stride_align : 64;
	uint32_t span = p->span > p->page_bytes ? p->span : p->page_bytes;
	h->stride = (span + align - 1) / align * align;
	*out = &h->base;
	return 0;
}

static void arena_destroy(struct host_tier *h, struct host_arena *a)
{
	if (a->buf_index >= 0 && h->base.p.loop)
		kvt_loop_unregister_buffer(h->base.p.loop, a->base);
	if (a->registered)
		h->base.p.dev->ops->host_unregister(h->base.p.dev, a->base);
	if (a->base)
		munmap(a->base, a->len);
	if (a->fd >= 0)
		close(a->fd);
	slot_pool_destroy(&a->pool);
	memset(a, 0, sizeof(*a));
	a->fd = -1;
}

static void host_close(struct tier *t)
{
	struct host_tier *h = (struct host_tier *)t;
	for (unsigned i = 0; i < h->narenas; i++)
		arena_destroy(h, &h->arenas[i]);
	kvt_free(h);
}

static void place_on_node(void *p, size_t len, int node)
{
	if (numa_available() < 0)
		return;
	if (node < 0 || node > numa_max_node())
		node = 0;
	/* Before the first touch, so every page is allocated on that node. */
	numa_tonode_memory(p, len, node);
}

static int host_arena_add(struct tier *t, uint32_t tenant, uint64_t bytes)
{
	struct host_tier *h = (struct host_tier *)t;
	if (h->narenas == HOST_MAX_ARENAS)
		return -ENOSPC;
	uint64_t nslots = bytes / h->stride;
	if (!nslots || nslots > UINT32_MAX)
		return -EINVAL;
	struct host_arena *a = &h->arenas[h->narenas];
	memset(a, 0, sizeof(*a));
	a->fd = -1;
	a->buf_index = -1;
	a->tenant = tenant;
	a->len = nslots * h->stride;
	char name[64];
	snprintf(name, sizeof(name), "kvtier-host-t%u", tenant);
	int ret;
	a->fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (a->fd < 0) {
		ret = -errno;
		goto fail;
	}
	/* Sealed against shrink and grow: a client's mapping can never fault on a hole. */
	if (ftruncate(a->fd, (off_t)a->len) < 0 ||
	    fcntl(a->fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) < 0) {
		ret = -errno;
		goto fail;
	}
	a->base = mmap(NULL, a->len, PROT_READ | PROT_WRITE, MAP_SHARED, a->fd, 0);
	if (a->base == MAP_FAILED) {
		a->base = NULL;
		ret = -errno;
		goto fail;
	}
	/* Clients of the tenant map the arena too, read-only: from now on no writable
	 * mapping can be made, and no seal changed. */
	if (fcntl(a->fd, F_ADD_SEALS, F_SEAL_FUTURE_WRITE | F_SEAL_SEAL) < 0)
		kvt_warn("host", "arena of tenant %u not sealed against writers: %s", tenant,
			 strerror(errno));
	place_on_node(a->base, a->len, t->p.numa_node);
	if (madvise(a->base, a->len, MADV_POPULATE_WRITE) < 0) {
		if (errno != EINVAL) {
			ret = -errno;
			kvt_err("host", "cannot populate %llu bytes: %s",
				(unsigned long long)a->len, strerror(errno));
			goto fail;
		}
		for (uint64_t off = 0; off < a->len; off += 4096)
			a->base[off] = 0;
	}
	ret = t->p.dev->ops->host_register(t->p.dev, a->base, a->len);
	if (ret < 0) {
		/* Pageable copies are slower but correct; say so once. */
		kvt_warn("host", "arena of tenant %u not pinned: %s", tenant, strerror(-ret));
	} else {
		a->registered = true;
	}
	if (t->p.loop) {
		a->buf_index = kvt_loop_register_buffer(t->p.loop, a->base, a->len, h->stride);
		if (a->buf_index < 0)
			kvt_warn("host", "arena of tenant %u not registered with io_uring: %s",
				 tenant, strerror(-a->buf_index));
	}
	ret = slot_pool_init(&a->pool, (uint32_t)nslots);
	if (ret < 0)
		goto fail;
	kvt_info("host", "arena %u: tenant %u, %llu slots of %u bytes, %s", h->narenas, tenant,
		 (unsigned long long)nslots, h->stride, a->registered ? "pinned" : "pageable");
	return (int)h->narenas++;
fail:
	kvt_err("host", "arena for tenant %u (%llu bytes): %s", tenant,
		(unsigned long long)bytes, strerror(-ret));
	arena_destroy(h, a);
	return ret;
}

static struct host_arena *arena_of(struct host_tier *h, tier_slot_t s)
{
	uint32_t ai = TIER_SLOT_ARENA(s);
	if (s == TIER_SLOT_NONE || ai >= h->narenas ||
	    TIER_SLOT_INDEX(s) >= h->arenas[ai].pool.nslots)
		return NULL;
	return &h->arenas[ai];
}

static int host_alloc(struct tier *t, uint32_t tenant, tier_slot_t *out)
{
	struct host_tier *h = (struct host_tier *)t;
	bool found = false;
	for (unsigned i = 0; i < h->narenas; i++) {
		struct host_arena *a = &h->arenas[i];
		if (a->tenant != tenant)
			continue;
		found = true;
		uint32_t idx;
		if (slot_pool_alloc(&a->pool, &idx) == 0) {
			*out = TIER_SLOT(i, idx);
			return 0;
		}
	}
	return found ? -ENOSPC : -ENOENT;
}

static void host_free(struct tier *t, tier_slot_t s)
{
	struct host_arena *a = arena_of((struct host_tier *)t, s);
	if (!a || slot_pool_free(&a->pool, (uint32_t)TIER_SLOT_INDEX(s)) < 0)
		kvt_err("host", "free of slot %llx not in use", (unsigned long long)s);
}

static void host_poison(struct tier *t, tier_slot_t s)
{
	struct host_arena *a = arena_of((struct host_tier *)t, s);
	if (a)
		slot_pool_poison(&a->pool, (uint32_t)TIER_SLOT_INDEX(s));
}

static void *host_slot_ptr(struct tier *t, tier_slot_t s)
{
	struct host_tier *h = (struct host_tier *)t;
	struct host_arena *a = arena_of(h, s);
	if (!a)
		return NULL;
	return a->base + TIER_SLOT_INDEX(s) * h->stride;
}

uint32_t tier_host_stride(struct tier *t)
{
	return ((struct host_tier *)t)->stride;
}

static int host_submit(struct tier *t, struct tier_io **ios, unsigned n)
{
	struct host_tier *h = (struct host_tier *)t;
	for (unsigned i = 0; i < n; i++) {
		struct tier_io *io = ios[i];
		char *p = host_slot_ptr(t, io->slot);
		io->tier = t;
		io->check = PAGE_OK;
		if (!p || io->len > t->p.page_bytes) {
			io->res = -EINVAL;
		} else if (io->dir == TIER_READ) {
			memcpy(io->buf, p, io->len);
			h->reads++;
			h->read_bytes += io->len;
			io->res = 0;
		} else {
			memcpy(p, io->buf, io->len);
			h->writes++;
			h->write_bytes += io->len;
			io->res = 0;
		}
		io->done(io);
	}
	return 0;
}

static void host_usage(struct tier *t, struct tier_usage *u)
{
	struct host_tier *h = (struct host_tier *)t;
	memset(u, 0, sizeof(*u));
	for (unsigned i = 0; i < h->narenas; i++) {
		u->slots += h->arenas[i].pool.nslots;
		u->used += slot_pool_used(&h->arenas[i].pool);
		u->poisoned += h->arenas[i].pool.npoisoned;
	}
	u->capacity_bytes = u->slots * t->p.page_bytes;
	u->used_bytes = u->used * t->p.page_bytes;
	u->reads = h->reads;
	u->writes = h->writes;
	u->read_bytes = h->read_bytes;
	u->write_bytes = h->write_bytes;
}

int tier_host_arena_info(struct tier *t, uint32_t arena, int *fd, void **base, uint64_t *len)
{
	struct host_tier *h = (struct host_tier *)t;
	if (t->ops != &tier_host_ops || arena >= h->narenas)
		return -EINVAL;
	*fd = h->arenas[arena].fd;
	*base = h->arenas[arena].base;
	*len = h->arenas[arena].len;
	return 0;
}

int tier_host_tenant_arena(struct tier *t, uint32_t tenant)
{
	struct host_tier *h = (struct host_tier *)t;
	if (t->ops != &tier_host_ops)
		return -EINVAL;
	for (unsigned i = 0; i < h->narenas; i++)
		if (h->arenas[i].tenant == tenant)
			return (int)i;
	return -ENOENT;
}

const struct tier_ops tier_host_ops = {
	.name = "host",
	.version = TIER_OPS_VERSION,
	.caps = TIER_CAP_HOST_PTR | TIER_CAP_ARENAS,
	.open = host_open,
	.close = host_close,
	.arena_add = host_arena_add,
	.alloc = host_alloc,
	.free = host_free,
	.poison = host_poison,
	.slot_ptr = host_slot_ptr,
	.submit = host_submit,
	.usage = host_usage,
};
