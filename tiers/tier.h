/* SPDX-License-Identifier: MIT */
#ifndef KVT_TIER_H
#define KVT_TIER_H

/*
 * The backend-implementer interface of a tier: GPU HBM, pinned host RAM or NVMe, each
 * a const struct tier_ops over fixed-size page slots. The store (store.h) never asks
 * which tier it has; it moves pages by submitting tier_io's, each a copy between one
 * slot of a tier and host memory.
 */

#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#include "daemon/list.h"
#include "daemon/loop.h"
#include "page_format.h"

/* CLOCK_MONOTONIC in ns: the store's and the tiers' timings */
static inline uint64_t tier_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

struct kvt_device;

enum tier_id {
	TIER_GPU = 0,
	TIER_HOST,
	TIER_NVME,
	TIER_MAX,
};

const char *tier_name(enum tier_id id);

/* A slot: arena number in the top 24 bits, index within the arena below. */
typedef uint64_t tier_slot_t;
#define TIER_SLOT_NONE	       UINT64_MAX
#define TIER_SLOT(arena, idx)  ((uint64_t)(arena) << 40 | (uint64_t)(idx))
#define TIER_SLOT_ARENA(s)     ((uint32_t)((s) >> 40))
#define TIER_SLOT_INDEX(s)     ((s) & ((1ull << 40) - 1))

enum tier_dir {
	TIER_READ,  /* slot -> buf */
	TIER_WRITE, /* buf -> slot */
};

/*
 * One page copy. The submitter fills slot, buf, len, dir, meta and done; the tier
 * sets res (0 or -errno) and, for tiers that verify, check, then calls done once,
 * possibly before submit returns (memory tiers complete inline).
 * Tiers with TIER_CAP_SPAN (nvme) move io_span bytes at buf, not len (whole device
 * blocks): buf must be a host-tier slot, or hold that many bytes, aligned the same.
 */
struct tier_io {
	tier_slot_t slot;
	void *buf;
	uint32_t len;
	enum tier_dir dir;
	struct page_meta meta;
	int res;
	enum page_check check;
	void (*done)(struct tier_io *io);
	/* started before ios that are not (nvme: ahead of those waiting for a queue slot);
	 * set before submit, or later through tier_ops.hurry */
	bool urgent;
	/* private to the tier */
	struct kvt_op op;
	struct tier *tier;
	uint32_t xfer;
	uint64_t issue_ns; /* nvme: when handed to the disk (CLOCK_MONOTONIC), for stats */
	uint8_t rd; /* nvme: how a read goes (tier_nvme.c) */
	bool bg;    /* nvme: started as not urgent (counted against bg_depth) */
	uint32_t hb; /* nvme: its header buffer while under way */
	struct kvt_list qlink;
};

/* What a restart scan reports per written slot; return true to keep the page. */
typedef bool (*tier_scan_fn)(void *arg, tier_slot_t slot, const struct page_meta *m,
			     enum page_check check);

struct tier_params {
	struct kvt_loop *loop;
	struct kvt_device *dev;
	uint32_t page_bytes; /* payload bytes per slot */
	uint32_t span;       /* host: bytes a slot spans at least (the nvme tier's io_span) */
	uint32_t stride_align; /* host: slot stride alignment (the nvme tier's io_align) */
	uint64_t capacity;   /* bytes of payload (nvme: of the store) */
	const char *path;    /* nvme: file or block device */
	unsigned queue_depth;
	unsigned bg_depth; /* nvme: ios in flight that are not urgent, at most (0: queue_depth) */
	bool durable; /* nvme: writes with RWF_DSYNC */
	int numa_node; /* host: node to place arenas on, -1 = unknown */
	const char *faults; /* tier_fault_ops: what to inject (tier_fault.h) */
};

/* Errors by reason, for stats. */
enum tier_err {
	TIER_ERR_IO = 0,   /* EIO and other errno from the device */
	TIER_ERR_SHORT,    /* short read or write */
	TIER_ERR_CORRUPT,  /* checksum mismatch, bad header */
	TIER_ERR_STALE,    /* another page than expected at the slot */
	TIER_ERR_EMPTY,    /* nothing written at the slot */
	TIER_ERR_MAX,
};
const char *tier_err_name(enum tier_err e);

struct tier_usage {
	uint64_t slots;
	uint64_t used;
	uint64_t capacity_bytes;
	uint64_t used_bytes;
	uint64_t reads, writes;
	uint64_t read_bytes, write_bytes;
	uint64_t errors; /* all reasons */
	uint64_t err[TIER_ERR_MAX];
	uint64_t poisoned;
	uint64_t inflight; /* I/Os submitted and not completed (nvme: wipes included) */
};

enum tier_cap {
	TIER_CAP_HOST_PTR = 1u << 0,   /* slot_ptr is CPU-addressable */
	TIER_CAP_DEVICE = 1u << 1,     /* slots are device memory */
	TIER_CAP_PERSISTENT = 1u << 2, /* survives a restart; reads are verified */
	TIER_CAP_SPAN = 1u << 3,       /* ios move io_span bytes at tier_io.buf */
	TIER_CAP_ARENAS = 1u << 4,     /* one arena per tenant */
};

#define TIER_OPS_VERSION 1

struct tier;

struct tier_ops {
	const char *name;
	uint32_t version;
	uint32_t caps;
	/* 0 or -errno. */
	int (*open)(struct tier **out, const struct tier_params *p);
	void (*close)(struct tier *t);
	/* Adds an arena of at least bytes for tenant (TIER_CAP_ARENAS). Arena id or -errno. */
	int (*arena_add)(struct tier *t, uint32_t tenant, uint64_t bytes);
	/* A free slot from tenant's arena (or the shared store). 0, -ENOSPC, -ENOENT. */
	int (*alloc)(struct tier *t, uint32_t tenant, tier_slot_t *out);
	void (*free)(struct tier *t, tier_slot_t slot);
	/* A slot whose write failed: taken out of use for good. */
	void (*poison)(struct tier *t, tier_slot_t slot);
	/* The slot's payload address (device address for TIER_CAP_DEVICE), or NULL. */
	void *(*slot_ptr)(struct tier *t, tier_slot_t slot);
	/* Starts the copies; each completes through its done. 0 or -errno (none started). */
	int (*submit)(struct tier *t, struct tier_io **ios, unsigned n);
	void (*usage)(struct tier *t, struct tier_usage *u);
	/* TIER_CAP_PERSISTENT: bytes of header before each slot's payload on the device. */
	uint32_t (*hdr_size)(struct tier *t);
	/*
	 * TIER_CAP_SPAN: an io covers a slot's header and payload rounded up to whole
	 * blocks of this (the file system's block): host slots are laid out on this stride.
	 */
	uint32_t (*io_align)(struct tier *t);
	/*
	 * TIER_CAP_SPAN: bytes at tier_io.buf that an io of a whole page may read or write
	 * (the payload and the padding to the block): host slots are at least this apart.
	 */
	uint32_t (*io_span)(struct tier *t);
	/*
	 * TIER_CAP_PERSISTENT: reads every slot written before this open and reports it;
	 * slots of kept pages stay in use, all others are freed (and wiped if they held
	 * anything). Runs the loop until done. Number of pages kept or -errno.
	 */
	int64_t (*scan)(struct tier *t, tier_scan_fn fn, void *arg);
	/*
	 * io, submitted to this tier and not completed, becomes urgent: if it still waits
	 * for a queue slot, it goes before every io that is not. NULL: the tier starts its
	 * ios at once (nothing waits).
	 */
	void (*hurry)(struct tier *t, struct tier_io *io);
};

/* What every tier embeds first. */
struct tier {
	const struct tier_ops *ops;
	struct tier_params p;
};

extern const struct tier_ops tier_host_ops;
extern const struct tier_ops tier_gpu_ops;
extern const struct tier_ops tier_nvme_ops;

/* host specifics: fd of an arena (to share it), its size and base. */
int tier_host_arena_info(struct tier *t, uint32_t arena, int *fd, void **base, uint64_t *len);
int tier_gpu_arena_info(struct tier *t, uint32_t arena, int *fd, void **base, uint64_t *len);
/* Where the host tier puts slot i's page in an arena: i * stride. */
uint32_t tier_host_stride(struct tier *t);
/* The (first) arena of tenant, or -ENOENT. */
int tier_host_tenant_arena(struct tier *t, uint32_t tenant);
int tier_gpu_tenant_arena(struct tier *t, uint32_t tenant);

#endif
