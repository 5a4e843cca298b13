// SPDX-License-Identifier: MIT
#include "slots.h"
#include "daemon/alloc.h"

#include <errno.h>
#include <string.h>

int slot_pool_init(struct slot_pool *p, uint32_t nslots)
{
	memset(p, 0, sizeof(*p));
	p->stack = kvt_malloc((size_t)nslots * sizeof(*p->stack));
	p->pos = kvt_malloc((size_t)nslots * sizeof(*p->pos));
	p->state = kvt_calloc(nslots ? nslots : 1, 1);
	if (!p->stack || !p->pos || !p->state) {
		slot_pool_destroy(p);
		return -ENOMEM;
	}
	p->nslots = nslots;
	p->nfree = nslots;
	for (uint32_t i = 0; i < nslots; i++) {
		p->stack[i] = nslots - 1 - i;
		p->pos[nslots - 1 - i] = i;
	}
	return 0;
}

void slot_pool_destroy(struct slot_pool *p)
{
	kvt_free(p->stack);
	kvt_free(p->pos);
	kvt_free(p->state);
	memset(p, 0, sizeof(*p));
}

int slot_pool_alloc(struct slot_pool *p, uint32_t *out)
{
	if (!p->nfree)
		return -ENOSPC;
	uint32_t s = p->stack[--p->nfree];
	p->state[s] = SLOT_USED;
	*out = s;
	return 0;
}

int slot_pool_claim(struct slot_pool *p, uint32_t slot)
{
	if (slot >= p->nslots)
		return -ERANGE;
	if (p->state[slot] != SLOT_FREE)
		return -EBUSY;
	uint32_t i = p->pos[slot], top = p->stack[--p->nfree];
	p->stack[i] = top;
	p->pos[top] = i;
	p->state[slot] = SLOT_USED;
	return 0;
}

int slot_pool_free(struct slot_pool *p, uint32_t slot)
{
	if (slot >= p->nslots || p->state[slot] != SLOT_USED)
		return -EINVAL;
	p->state[slot] = SLOT_FREE;
	p->pos[slot] = p->nfree;
	p->stack[p->nfree++] = slot;
	return 0;
}

int slot_pool_poison(struct slot_pool *p, uint32_t slot)
{
	if (slot >= p->nslots || p->state[slot] != SLOT_USED)
		return -EINVAL;
	p->state[slot] = SLOT_POISONED;
	p->npoisoned++;
	return 0;
}
