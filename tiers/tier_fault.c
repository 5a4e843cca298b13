// SPDX-License-Identifier: MIT
#include "tier_fault.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/alloc.h"
#include "daemon/log.h"
#include "daemon/loop.h"

static const char *const kind_names[FAULT_MAX] = {
	[FAULT_READ_EIO] = "read_eio",	   [FAULT_READ_SHORT] = "read_short",
	[FAULT_READ_HANG] = "read_hang",   [FAULT_WRITE_EIO] = "write_eio",
	[FAULT_WRITE_SHORT] = "write_short", [FAULT_WRITE_ENOSPC] = "write_enospc",
	[FAULT_WRITE_HANG] = "write_hang",
};

const char *tier_fault_kind_name(enum tier_fault_kind k)
{
	return (unsigned)k < FAULT_MAX ? kind_names[k] : "?";
}

int tier_fault_parse(const char *spec, struct tier_fault_cfg *out, const char **why)
{
	memset(out, 0, sizeof(*out));
	out->hang_ms = 5000;
	out->seed = 0x9e3779b97f4a7c15ull;
	*why = NULL;
	if (!spec)
		return 0;
	char buf[512];
	if (strlen(spec) >= sizeof(buf)) {
		*why = "fault spec too long";
		return -EINVAL;
	}
	strcpy(buf, spec);
	char *save = NULL;
	for (char *item = strtok_r(buf, ", ", &save); item; item = strtok_r(NULL, ", ", &save)) {
		char *eq = strchr(item, '=');
		if (!eq || !eq[1]) {
			*why = "fault spec: expected kind=value";
			return -EINVAL;
		}
		*eq = 0;
		const char *v = eq + 1;
		char *end;
		if (!strcmp(item, "hang_ms") || !strcmp(item, "seed")) {
			errno = 0;
			unsigned long long n = strtoull(v, &end, 0);
			if (errno || *end || (item[0] == 'h' && (n < 1 || n > 600000))) {
				*why = "fault spec: hang_ms 1..600000, seed a number";
				return -EINVAL;
			}
			if (item[0] == 'h')
				out->hang_ms = (uint32_t)n;
			else
				out->seed = n ? n : 1;
			continue;
		}
		int k = 0;
		while (k < FAULT_MAX && strcmp(item, kind_names[k]))
			k++;
		if (k == FAULT_MAX) {
			*why = "fault spec: unknown kind";
			return -EINVAL;
		}
		if (v[0] == '@') {
			errno = 0;
			unsigned long n = strtoul(v + 1, &end, 10);
			if (errno || *end || !n || n > UINT32_MAX) {
				*why = "fault spec: @N with N >= 1";
				return -EINVAL;
			}
			out->nth[k] = (uint32_t)n;
		} else {
			double p = strtod(v, &end);
			if (*end || !(p >= 0 && p <= 1)) {
				*why = "fault spec: a probability in [0, 1] or @N";
				return -EINVAL;
			}
			out->rate[k] = p;
		}
	}
	return 0;
}

/* An I/O held back (a hang): submitted to the disk when its timer fires. */
struct held {
	struct kvt_op op;
	struct __kernel_timespec ts;
	struct fault_tier *f;
	struct tier_io *io;
	struct held *next;
};

struct fault_tier {
	struct tier base;
	struct tier *inner;
	struct tier_fault_cfg cfg;
	uint64_t rng;
	struct held *held; /* timers armed */
};

struct tier_fault_cfg *tier_fault_cfg(struct tier *t)
{
	return t && t->ops == &tier_fault_ops ? &((struct fault_tier *)t)->cfg : NULL;
}

static struct tier *in(struct tier *t)
{
	return ((struct fault_tier *)t)->inner;
}

static double uniform(struct fault_tier *f)
{
	uint64_t x = f->rng;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	f->rng = x;
	return (double)(x >> 11) / (double)(1ull << 53);
}

static int f_open(struct tier **out, const struct tier_params *p)
{
	struct fault_tier *f = kvt_calloc(1, sizeof(*f));
	if (!f)
		return -ENOMEM;
	const char *why;
	int r = tier_fault_parse(p->faults, &f->cfg, &why);
	if (r < 0) {
		kvt_err("faults", "%s: %s", p->faults, why);
		kvt_free(f);
		return r;
	}
	f->rng = f->cfg.seed;
	r = tier_nvme_ops.open(&f->inner, p);
	if (r < 0) {
		kvt_free(f);
		return r;
	}
	f->base.ops = &tier_fault_ops;
	f->base.p = *p;
	*out = &f->base;
	kvt_warn("faults", "fault injection on the NVMe tier: %s", p->faults ? p->faults : "");
	return 0;
}

static void f_close(struct tier *t)
{
	struct fault_tier *f = (struct fault_tier *)t;
	/* The store waited for every move: a timer left is one the loop will never run. */
	for (struct held *h = f->held, *n; h; h = n) {
		n = h->next;
		kvt_free(h);
	}
	in(t)->ops->close(in(t));
	kvt_free(f);
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

static void unhold(struct kvt_op *op, int res, uint32_t flags)
{
	struct held *h = kvt_container_of(op, struct held, op);
	struct fault_tier *f = h->f;
	for (struct held **pp = &f->held; *pp; pp = &(*pp)->next)
		if (*pp == h) {
			*pp = h->next;
			break;
		}
	f->cfg.hung_now--;
	struct tier_io *io = h->io;
	kvt_free(h);
	int r = in(&f->base)->ops->submit(in(&f->base), &io, 1);
	if (r < 0) {
		io->tier = &f->base;
		io->res = r;
		io->check = PAGE_OK;
		io->done(io);
	}
}

/* Which fault, if any, this I/O gets. */
static int pick(struct fault_tier *f, bool rd, uint64_t n)
{
	int lo = rd ? FAULT_READ_EIO : FAULT_WRITE_EIO, hi = rd ? FAULT_READ_HANG : FAULT_WRITE_HANG;
	for (int k = lo; k <= hi; k++)
		if (f->cfg.nth[k] == n || (f->cfg.rate[k] > 0 && uniform(f) < f->cfg.rate[k]))
			return k;
	return -1;
}

static int f_submit(struct tier *t, struct tier_io **ios, unsigned n)
{
	struct fault_tier *f = (struct fault_tier *)t;
	for (unsigned i = 0; i < n; i++) {
		struct tier_io *io = ios[i];
		bool rd = io->dir == TIER_READ;
		int k = pick(f, rd, rd ? ++f->cfg.reads : ++f->cfg.writes);
		if (k >= 0)
			f->cfg.injected[k]++;
		if (k == FAULT_READ_HANG || k == FAULT_WRITE_HANG) {
			struct held *h = kvt_calloc(1, sizeof(*h));
			if (h) {
				h->op.fn = unhold;
				h->f = f;
				h->io = io;
				h->ts.tv_sec = f->cfg.hang_ms / 1000;
				h->ts.tv_nsec = (long long)(f->cfg.hang_ms % 1000) * 1000000;
				h->next = f->held;
				f->held = h;
				f->cfg.hung_now++;
				io_uring_prep_timeout(kvt_loop_sqe(t->p.loop, &h->op), &h->ts, 0, 0);
				continue;
			}
			k = -1; /* no memory to hold it: let it through */
		}
		if (k >= 0) {
			io->tier = t;
			io->res = k == FAULT_WRITE_ENOSPC ? -ENOSPC : -EIO;
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

static void f_hurry(struct tier *t, struct tier_io *io)
{
	if (in(t)->ops->hurry) /* one held back (a hang) stays held: it is not the inner's */
		in(t)->ops->hurry(in(t), io);
}

static void f_usage(struct tier *t, struct tier_usage *u)
{
	struct fault_tier *f = (struct fault_tier *)t;
	in(t)->ops->usage(in(t), u);
	u->inflight += f->cfg.hung_now;
	/* what was injected counts as the errors it imitates */
	u->err[TIER_ERR_IO] += f->cfg.injected[FAULT_READ_EIO] + f->cfg.injected[FAULT_WRITE_EIO] +
			       f->cfg.injected[FAULT_WRITE_ENOSPC];
	u->err[TIER_ERR_SHORT] += f->cfg.injected[FAULT_READ_SHORT] +
				  f->cfg.injected[FAULT_WRITE_SHORT];
	u->errors += f->cfg.injected[FAULT_READ_EIO] + f->cfg.injected[FAULT_WRITE_EIO] +
		     f->cfg.injected[FAULT_WRITE_ENOSPC] + f->cfg.injected[FAULT_READ_SHORT] +
		     f->cfg.injected[FAULT_WRITE_SHORT];
}

static uint32_t f_hdr_size(struct tier *t)
{
	return in(t)->ops->hdr_size(in(t));
}

static uint32_t f_io_span(struct tier *t)
{
	return in(t)->ops->io_span(in(t));
}

static uint32_t f_io_align(struct tier *t)
{
	return in(t)->ops->io_align(in(t));
}

static int64_t f_scan(struct tier *t, tier_scan_fn fn, void *arg)
{
	return in(t)->ops->scan(in(t), fn, arg);
}

const struct tier_ops tier_fault_ops = {
	.name = "nvme+faults",
	.version = TIER_OPS_VERSION,
	.caps = TIER_CAP_PERSISTENT | TIER_CAP_SPAN,
	.open = f_open,
	.close = f_close,
	.alloc = f_alloc,
	.free = f_free,
	.poison = f_poison,
	.slot_ptr = f_slot_ptr,
	.submit = f_submit,
	.usage = f_usage,
	.hdr_size = f_hdr_size,
	.io_align = f_io_align,
	.io_span = f_io_span,
	.scan = f_scan,
	.hurry = f_hurry,
};
