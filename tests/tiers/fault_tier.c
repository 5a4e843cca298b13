// SPDX-License-Identifier: MIT
#include "fault_tier.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

struct fault_cfg fault_cfg;

struct fault_tier {
	struct tier base;
	struct tier *inner;
};

void fault_reset(void)
{
	memset(&fault_cfg, 0, sizeof(fault_cfg));
}

static struct tier *in(struct tier *t)
{
	return ((struct fault_tier *)t)->inner;
}

static int f_open(struct tier **out, const struct tier_params *p)
{
	struct fault_tier *f = calloc(1, sizeof(*f));
	if (!f)
		return -ENOMEM;
	int r = tier_nvme_ops.open(&f->inner, p);
	if (r < 0) {
		free(f);
		return r;
	}
	f->base.ops = &fault_tier_ops;
	f->base.p = *p;
	*out = &f->base;
	return 0;
}

static void f_close(struct tier *t)
{
	in(t)->ops->close(in(t));
	free(t);
}

static int f_alloc(struct tier *t, uint32_t tenant, tier_slot_t *out)
{
	return in(t)->ops->alloc(in(t), tenant, out);
}

static void f_free(struct tier *t, tier_slot_t s)
{
	in(t)->ops->free(in(t), s);
}

static void f_poison(struct tier *t, tier_slot_t s)
{
	in(t)->ops->poison(in(t), s);
}

static void *f_slot_ptr(struct tier *t, tier_slot_t s)
{
	return in(t)->ops->slot_ptr(in(t), s);
}

static int f_submit(struct tier *t, struct tier_io **ios, unsigned n)
{
	for (unsigned i = 0; i < n; i++) {
		struct tier_io *io = ios[i];
		int inject = 0;
		if (io->dir == TIER_READ) {
			fault_cfg.reads++;
			if (fault_cfg.reads == fault_cfg.eio_read_nth ||
			    fault_cfg.reads == fault_cfg.short_read_nth)
				inject = -EIO;
		} else {
			fault_cfg.writes++;
			if (fault_cfg.writes == fault_cfg.enospc_write_nth)
				inject = -ENOSPC;
		}
		if (inject) {
			fault_cfg.injected++;
			io->tier = t;
			io->res = inject;
			io->check = PAGE_OK;
			io->done(io);
			continue;
		}
		int r = in(t)->ops->submit(in(t), &io, 1);
		if (r < 0)
			return r;
	}
	return 0;
}

static void f_usage(struct tier *t, struct tier_usage *u)
{
	in(t)->ops->usage(in(t), u);
}

static uint32_t f_headroom(struct tier *t)
{
	return in(t)->ops->headroom(in(t));
}

static uint32_t f_io_align(struct tier *t)
{
	return in(t)->ops->io_align(in(t));
}

static int64_t f_scan(struct tier *t, tier_scan_fn fn, void *arg)
{
	return in(t)->ops->scan(in(t), fn, arg);
}

const struct tier_ops fault_tier_ops = {
	.name = "nvme+faults",
	.version = TIER_OPS_VERSION,
	.caps = TIER_CAP_PERSISTENT | TIER_CAP_HEADROOM,
	.open = f_open,
	.close = f_close,
	.alloc = f_alloc,
	.free = f_free,
	.poison = f_poison,
	.slot_ptr = f_slot_ptr,
	.submit = f_submit,
	.usage = f_usage,
	.headroom = f_headroom,
	.io_align = f_io_align,
	.scan = f_scan,
};
