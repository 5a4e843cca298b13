/* SPDX-License-Identifier: MIT */
#ifndef KVT_SLOTS_H
#define KVT_SLOTS_H

#include <stdbool.h>
#include <stdint.h>

/*
 * Fixed-size slot allocator: a LIFO free stack (O(1) alloc and free, recently freed
 * slots reused first while their cache lines are warm) and a state byte per slot so
 * a double free or the free of a poisoned slot is caught. Not thread-safe.
 */
enum slot_state {
	SLOT_FREE = 0,
	SLOT_USED,
	SLOT_POISONED,
};

struct slot_pool {
	uint32_t nslots;
	uint32_t nfree;
	uint32_t npoisoned;
	uint32_t *stack; /* free slot numbers, top at stack[nfree - 1] */
	uint32_t *pos;   /* pos[slot]: where a free slot sits in stack */
	uint8_t *state;
};

/* 0 or -ENOMEM. All slots start free; the lowest numbers are handed out first. */
int slot_pool_init(struct slot_pool *p, uint32_t nslots);
void slot_pool_destroy(struct slot_pool *p);
/* 0 and *out, or -ENOSPC. */
int slot_pool_alloc(struct slot_pool *p, uint32_t *out);
/* Takes a specific free slot (restart). 0, -EBUSY if not free, -ERANGE. */
int slot_pool_claim(struct slot_pool *p, uint32_t slot);
/* 0, or -EINVAL for a slot that is not in use (double free). */
int slot_pool_free(struct slot_pool *p, uint32_t slot);
/* Takes a used slot out of use for good. 0 or -EINVAL. */
int slot_pool_poison(struct slot_pool *p, uint32_t slot);

static inline uint32_t slot_pool_used(const struct slot_pool *p)
{
	return p->nslots - p->nfree - p->npoisoned;
}

#endif
