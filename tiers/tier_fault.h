/* SPDX-License-Identifier: MIT */
#ifndef KVT_TIER_FAULT_H
#define KVT_TIER_FAULT_H

/*
 * Fault injection into the NVMe tier: a tier that wraps tier_nvme_ops and makes
 * chosen I/Os fail the way disks fail. For the reliability suite and for operators
 * who want to see what kvtierd does when a disk misbehaves (store.fault_inject; the
 * daemon logs a warning at start while it is set). Never on by default.
 *
 * The spec is a comma-separated list of kind=WHEN, WHEN either a probability in
 * [0, 1] ("read_eio=0.01") or "@N", the Nth I/O of that direction counted from 1
 * ("write_enospc=@3"); plus hang_ms=N (how long a hung I/O is held, default 5000) and
 * seed=N. Kinds:
 *   read_eio, write_eio      the I/O fails with EIO
 *   read_short, write_short  the device transfers less than asked (the tier's own
 *                            short-transfer path: the I/O fails with EIO, counted)
 *   write_enospc             the write fails with ENOSPC
 *   read_hang, write_hang    the I/O reaches the disk only after hang_ms: a hung
 *                            device that answers late; its buffer stays held till then
 */

#include "tiers/tier.h"

enum tier_fault_kind {
	FAULT_READ_EIO,
	FAULT_READ_SHORT,
	FAULT_READ_HANG,
	FAULT_WRITE_EIO,
	FAULT_WRITE_SHORT,
	FAULT_WRITE_ENOSPC,
	FAULT_WRITE_HANG,
	FAULT_MAX
};

struct tier_fault_cfg {
	double rate[FAULT_MAX]; /* probability per I/O of the kind's direction */
	uint32_t nth[FAULT_MAX]; /* the Nth I/O of the direction (1-based), 0: none */
	uint32_t hang_ms;
	uint64_t seed;
	/* counters, since open or the last reset by the owner */
	uint64_t reads, writes;
	uint64_t injected[FAULT_MAX];
	uint32_t hung_now; /* hung I/Os not yet let through */
};

/* Parses a spec (above) into *out (zeroed first). 0, or -EINVAL with *why set. */
int tier_fault_parse(const char *spec, struct tier_fault_cfg *out, const char **why);
const char *tier_fault_kind_name(enum tier_fault_kind k);

/* The wrapper: tier_params.faults holds the spec. */
extern const struct tier_ops tier_fault_ops;

/* The live configuration and counters of a tier opened with tier_fault_ops (NULL for
 * another tier): tests change it between steps. */
struct tier_fault_cfg *tier_fault_cfg(struct tier *t);

#endif
