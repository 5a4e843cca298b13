/* SPDX-License-Identifier: MIT */
#ifndef KVT_CONFIG_H
#define KVT_CONFIG_H

/*
 * kvtierd's options: one declarative table (config.c) gives the embedded defaults,
 * INI parsing (libinih; "[section] key = value" sets "section.key"), command-line
 * overrides, get/set by name and the dump. Sizes take K/M/G/T suffixes (powers of
 * two). Options marked reloadable change on SIGHUP (kvt_config_reload); the others
 * only at start.
 */

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#define KVT_MAX_ID_LIST 16

struct kvt_config {
	/* ipc */
	char socket[256];
	uint32_t socket_mode;
	uint32_t allow_uids[KVT_MAX_ID_LIST], n_allow_uids; /* besides root and our own uid */
	uint32_t allow_gids[KVT_MAX_ID_LIST], n_allow_gids;
	uint32_t max_clients;
	uint32_t max_seqs;
	uint32_t max_batch;
	uint32_t ring_entries;
	uint64_t data_bytes;
	uint64_t data_bytes_max;
	/* store */
	char state_dir[256];
	char nvme_path[512];
	char names_path[512];
	char device[16];
	uint64_t nvme_bytes;
	uint64_t page_bytes;
	uint32_t queue_depth;
	uint32_t background_depth;
	char disk_full[16]; /* "refuse" | "evict" */
	char write_policy[16]; /* "through" | "back" */
	bool durable;
	char fault_inject[256]; /* tier_fault.h's spec; "" off */
	/* tenants: every tenant gets arenas of these sizes, and a disk quota */
	uint64_t host_bytes;
	uint64_t gpu_bytes;
	uint64_t disk_quota_bytes; /* 0: no quota beyond the store's size */
	uint32_t max_tenants;
	uint64_t summary_bytes;    /* per client, summaries of every page it holds */
	/* prefetch */
	bool prefetch;             /* plan and fetch the next step's pages */
	uint32_t gpu_margin_pct;   /* next-best pages brought to the GPU, % of the budget */
	uint32_t host_margin_pct;  /* and deeper, from NVMe to host RAM, % of the budget */
	uint32_t drift_pct;        /* weight of a page's score trend in the plan */
	uint32_t wasted_steps;     /* a prefetched page unused this many steps is wasted */
	uint32_t max_disk_prefetch; /* prefetches reading from NVMe at once */
	uint32_t substitute_gap;   /* nats below a row's best page a page must be to be replaced */
	/* the fast path (ipc/wire.h) */
	uint64_t fast_bytes_max;   /* largest region of summaries and map a client may have */
	uint32_t lease_steps;      /* a lease not selected in this many steps is taken back */
	bool fast_promote;         /* leases in host RAM copied to the GPU pool */
	bool fast_warm;            /* lease releases' lookups warmed ahead (kvt_store_warm) */
	uint32_t fast_threads;     /* the fast path's report readers, the loop's included */
	uint32_t fast_disk_reads;  /* low-value NVMe reads under way per client */
	/* stats */
	char metrics_listen[64];
	/* daemon */
	uint32_t log_level;
	uint32_t promote_timeout_ms;
};

/* The embedded defaults, sized from this machine (RAM, disk, user). */
void kvt_config_defaults(struct kvt_config *c);

/* Sets one option from text. 0, -ENOENT (no such option), -EINVAL (bad value or
 * out of bounds; why goes to *why), -EPERM (not reloadable and running is true). */
int kvt_config_set(struct kvt_config *c, const char *name, const char *value, bool running,
		   const char **why);
/* The option's value as text into buf. 0 or -ENOENT. */
int kvt_config_get(const struct kvt_config *c, const char *name, char *buf, size_t len);
/* Reads an INI file over c. 0, -errno (unreadable), -EINVAL (errors are logged with
 * their line). */
int kvt_config_load(struct kvt_config *c, const char *path, bool running);
/* Calls fn for every option, in table order, until it returns non-zero (returned). */
int kvt_config_each(const struct kvt_config *c,
		    int (*fn)(void *arg, const char *name, const char *value, bool reloadable,
			      const char *help),
		    void *arg);
/* "name = value  # help" for every option. */
void kvt_config_dump(const struct kvt_config *c, FILE *f);
/* Applies the reloadable options of fresh to live; returns how many changed. */
int kvt_config_reload(struct kvt_config *live, const struct kvt_config *fresh);

/* Parses "64M"-style sizes. 0 or -EINVAL. */
int kvt_parse_size(const char *s, uint64_t *out);

#endif
