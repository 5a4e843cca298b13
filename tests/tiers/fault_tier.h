/* SPDX-License-Identifier: MIT */
#ifndef KVT_TEST_FAULT_TIER_H
#define KVT_TEST_FAULT_TIER_H

#include "tiers/tier.h"

/*
 * A tier that wraps the nvme tier and injects faults: the Nth read fails with EIO or
 * comes back short (as the nvme tier reports a short transfer: -EIO, counted), the
 * Nth write fails with ENOSPC. Counting starts at 1 from fault_reset(); 0 = never.
 */
struct fault_cfg {
	unsigned eio_read_nth;
	unsigned short_read_nth;
	unsigned enospc_write_nth;
	unsigned reads, writes;     /* seen since reset */
	unsigned injected;
};

extern struct fault_cfg fault_cfg;
extern const struct tier_ops fault_tier_ops;
void fault_reset(void);

#endif
