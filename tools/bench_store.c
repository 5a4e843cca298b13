// SPDX-License-Identifier: MIT
/*
 * kvtier-bench-store: the store's own cost of a lease, as kvtierd's fast path takes them
 * (daemon/fast.c), with as many pages in the store as a long context at a large batch
 * holds: each step leases FRESH pages chosen at random (where the page is, a pin, and a
 * copy into the GPU pool for one in host RAM), hears of each copy's landing (where it is
 * now), and lets go of the leases taken KEEP steps before. The host tier holds every
 * page, the GPU pool a share of them (-g), as kvtier-bench's `--host-budget 1.3` runs.
 *
 *   kvtier-bench-store [-d cpu|cuda|auto] [-n PAGES] [-f FRESH] [-s STEPS] [-k KEEP]
 *                      [-g GPU_FRAC] [-D DIR]
 *
 * Side by side in one run: each lookup on its own (plain), and with the lookups a few
 * keys ahead warmed into the CPU's cache (kvt_store_warm; the fast path does so for its
 * releases: its starts' pages, unlike these random ones, are mostly in cache). Prints
 * the time a lease costs the thread by part (start, landing, release, and the store's
 * own polling: CPU time, not the waits for the copies), in ns, and a step's wall time;
 * the last line: `warmed_vs_plain: X` (the parts together, warmed over plain).
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "tiers/device.h"
#include "tiers/store.h"

static uint64_t clock_ns(clockid_t id)
{
	struct timespec ts;
	clock_gettime(id, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t ns(void)
{
	return clock_ns(CLOCK_MONOTONIC);
}

/* this thread's CPU time: the polls' own work, not their waits for the copies */
static uint64_t cpu_ns(void)
{
	return clock_ns(CLOCK_THREAD_CPUTIME_ID);
}

/* the daemon's keys: per sequence, layer, KV head and page index */
#define LAYERS 32u
#define HEADS  8u

static struct page_key key_of(uint32_t i, uint32_t per_row)
{
	const uint32_t idx = i % per_row, r = i / per_row;
	return (struct page_key){.seq = r / (LAYERS * HEADS),
				 .layer = (uint16_t)(r / HEADS % LAYERS),
				 .kv_head = (uint16_t)(r % HEADS),
				 .index = idx};
}

struct bench {
	struct kvt_store *s;
	uint32_t per_row, npages, fresh, keep;
	uint32_t *ring; /* each step's leases, kept keep steps */
	uint8_t *held;	/* leased now, by page */
	uint64_t rng;
	uint64_t landed, landed_gpu, failed, land_ns;
};

struct lease {
	struct bench *b;
	uint32_t page;
};

static void landed(void *arg, int res)
{
	struct lease *l = arg;
	struct bench *b = l->b;
	const uint64_t t = ns();
	struct page_key k = key_of(l->page, b->per_row);
	struct kvt_page_info pi;
	if (res == 0 && kvt_store_page_info(b->s, &k, &pi) == 0) {
		b->landed++;
		b->landed_gpu += (pi.valid >> TIER_GPU) & 1;
	} else {
		b->failed++;
	}
	free(l);
	b->land_ns += ns() - t;
}

static uint64_t rng_next(uint64_t *x)
{
	*x ^= *x << 13;
	*x ^= *x >> 7;
	*x ^= *x << 17;
	return *x;
}

struct phase {
	uint64_t leases, to_gpu, refused, evictions;
	double start, land, release, run, all, wall_us; /* ns a lease; us a step */
};

/* The leases held: let go (the bench's state between its phases). */
static void release_all(struct bench *b)
{
	for (uint32_t i = 0; i < b->npages; i++) {
		if (!b->held[i])
			continue;
		struct page_key k = key_of(i, b->per_row);
		kvt_store_unpin(b->s, &k);
		b->held[i] = 0;
	}
}

/* The bucket of the key 8 after j in list and the page of the one 4 after, warmed
 * (kvt_store_warm). */
static void warm_ahead(struct bench *b, const uint32_t *list, uint32_t j)
{
	if (j + 8 < b->fresh) {
		struct page_key k = key_of(list[j + 8], b->per_row);
		kvt_store_warm(b->s, &k, false);
	}
	if (j + 4 < b->fresh) {
		struct page_key k = key_of(list[j + 4], b->per_row);
		kvt_store_warm(b->s, &k, true);
	}
}

static int phase(struct bench *b, uint32_t steps, bool warm, struct phase *out)
{
	struct kvt_store_stats s0, s1;
	uint64_t t_start = 0, t_release = 0, t_run = 0, released = 0;
	release_all(b);
	kvt_store_stats(b->s, &s0);
	b->landed = b->failed = b->land_ns = 0;
	memset(out, 0, sizeof(*out));
	const uint64_t w0 = ns();
	for (uint32_t st = 0; st < steps; st++) {
		uint32_t *mine = b->ring + (size_t)(st % (b->keep + 1)) * b->fresh;
		uint64_t t = ns();
		for (uint32_t j = 0; st > b->keep && j < b->fresh; j++) { /* their keep is over */
			if (warm)
				warm_ahead(b, mine, j);
			struct page_key k = key_of(mine[j], b->per_row);
			kvt_store_unpin(b->s, &k);
			b->held[mine[j]] = 0;
			released++;
		}
		t_release += ns() - t;
		for (uint32_t j = 0; j < b->fresh; j++) { /* the step's selection, new pages */
			uint32_t i;
			do
				i = (uint32_t)(rng_next(&b->rng) % b->npages);
			while (b->held[i]);
			b->held[i] = 1;
			mine[j] = i;
		}
		const uint64_t t1 = ns();
		for (uint32_t j = 0; j < b->fresh; j++) {
			if (warm)
				warm_ahead(b, mine, j);
			/* as lease_start, lease_promote: where it is, a pin, a copy up */
			struct page_key k = key_of(mine[j], b->per_row);
			struct kvt_page_info pi;
			int ret = kvt_store_page_info(b->s, &k, &pi);
			if (ret < 0 || (ret = kvt_store_pin(b->s, &k)) < 0)
				return ret;
			out->leases++;
			if (pi.valid & (1u << TIER_GPU))
				continue;
			struct lease *l = malloc(sizeof(*l));
			if (!l)
				return -ENOMEM;
			*l = (struct lease){.b = b, .page = mine[j]};
			if (kvt_store_prefetch(b->s, &k, TIER_GPU, landed, l) < 0) {
				free(l);
				out->refused++;
			} else {
				out->to_gpu++;
			}
		}
		const uint64_t t2 = ns();
		t_start += t2 - t1;
		/* the step's copies land before the next step (a decode step is longer) */
		const uint64_t l0 = b->land_ns, c0 = cpu_ns();
		while (b->landed + b->failed < out->to_gpu)
			kvt_store_run(b->s, 1);
		t_run += cpu_ns() - c0 - (b->land_ns - l0);
	}
	kvt_store_stats(b->s, &s1);
	const double n = (double)out->leases;
	out->evictions = s1.evictions[TIER_GPU] - s0.evictions[TIER_GPU];
	out->start = (double)t_start / n;
	out->land = (double)b->land_ns / n;
	out->release = (double)t_release / (released ? (double)released : 1);
	out->run = (double)t_run / n;
	out->all = out->start + out->land + out->release + out->run;
	out->wall_us = (double)(ns() - w0) / steps / 1e3;
	return 0;
}

int main(int argc, char **argv)
{
	const char *devname = "auto", *dir = getenv("TMPDIR") ? getenv("TMPDIR") : "/var/tmp";
	uint32_t npages = 1u << 19, fresh = 256, steps = 2000, keep = 4;
	double gpu_frac = 0.10;
	int c;
	while ((c = getopt(argc, argv, "d:n:f:s:k:g:D:h")) != -1) {
		switch (c) {
		case 'd':
			devname = optarg;
			break;
		case 'n':
			npages = (uint32_t)strtoul(optarg, NULL, 0);
			break;
		case 'f':
			fresh = (uint32_t)strtoul(optarg, NULL, 0);
			break;
		case 's':
			steps = (uint32_t)strtoul(optarg, NULL, 0);
			break;
		case 'k':
			keep = (uint32_t)strtoul(optarg, NULL, 0);
			break;
		case 'g':
			gpu_frac = strtod(optarg, NULL);
			break;
		case 'D':
			dir = optarg;
			break;
		default:
			fprintf(stderr,
				"usage: %s [-d cpu|cuda|auto] [-n PAGES] [-f FRESH] [-s STEPS] "
				"[-k KEEP] [-g GPU_FRAC] [-D DIR]\n",
				argv[0]);
			return c == 'h' ? 0 : 2;
		}
	}
	const uint32_t pb = 4096, per_row = 512;
	if (npages < per_row || !fresh || !keep || (uint64_t)fresh * (keep + 1) > npages / 4 ||
	    gpu_frac <= 0 || gpu_frac > 1) {
		fprintf(stderr,
			"%s: -n at least 512 and 4x the pages leased at once; -g in (0, 1]\n",
			argv[0]);
		return 2;
	}
	npages -= npages % per_row;
	char path[4096];
	snprintf(path, sizeof(path), "%s/kvtier-bench-store-XXXXXX", dir);
	int fd = mkstemp(path);
	if (fd < 0) {
		fprintf(stderr, "%s: %s\n", path, strerror(errno));
		return 1;
	}
	close(fd);
	unlink(path);
	const uint64_t gpu = (uint64_t)(gpu_frac * npages) * pb;
	if (gpu < (uint64_t)fresh * (keep + 2) * pb) {
		fprintf(stderr, "%s: a GPU pool of %.0f pages holds fewer than the leases (-g)\n",
			argv[0], gpu_frac * npages);
		return 2;
	}
	struct kvt_store_params p = {.device = devname,
				     .nvme_path = path,
				     .nvme_bytes = (uint64_t)npages * pb + (64u << 20),
				     .host_bytes = (uint64_t)npages * (pb + 4096) * 13 / 10,
				     .gpu_bytes = gpu,
				     .page_bytes = pb};
	struct bench b = {.per_row = per_row};
	int ret = kvt_store_open(&p, &b.s);
	if (ret < 0) {
		fprintf(stderr, "store: %s\n", strerror(-ret));
		unlink(path);
		return 1;
	}
	unlink(path); /* the store keeps it open */
	uint8_t page[4096];
	for (uint32_t i = 0; i < npages; i++) {
		struct page_key k = key_of(i, per_row);
		memset(page, (int)(i & 0xff), sizeof(page));
		while ((ret = kvt_store_put(b.s, &k, page, pb, 0, NULL, NULL)) == -EAGAIN)
			kvt_store_run(b.s, 1);
		if (ret < 0) {
			fprintf(stderr, "put %u: %s\n", i, strerror(-ret));
			return 1;
		}
		if (!(i & 4095))
			kvt_store_run(b.s, 0);
	}
	if ((ret = kvt_store_flush(b.s)) < 0) {
		fprintf(stderr, "flush: %s\n", strerror(-ret));
		return 1;
	}
	/* a ring of the steps' leases, released KEEP steps later */
	b.ring = malloc((size_t)(keep + 1) * fresh * sizeof(*b.ring));
	b.held = calloc(npages, 1);
	if (!b.ring || !b.held)
		return 1;
	b.npages = npages;
	b.fresh = fresh;
	b.keep = keep;
	b.rng = 0x9e3779b97f4a7c15ull;
	printf("store: %u pages of %u KiB (%s), GPU pool %.0f%%; %u steps of %u fresh leases, "
	       "each kept %u steps\n",
	       npages, pb >> 10, kvt_store_device(b.s)->ops->describe(kvt_store_device(b.s)),
	       gpu_frac * 100, steps, fresh, keep);
	if (getenv("KVT_BENCH_MARK")) /* for a profiler that attaches to the timed part */
		fprintf(stderr, "timed\n");
	/* side by side, twice over (the second pair's figures reported): each lookup on
	 * its own, and with the lookups ahead warmed (kvt_store_warm) */
	struct phase ph[2];
	for (int round = 0; round < 2 && !ret; round++)
		for (int w = 0; w < 2 && !ret; w++)
			ret = phase(&b, steps, w, &ph[w]);
	if (ret < 0) {
		fprintf(stderr, "lease: %s\n", strerror(-ret));
		return 1;
	}
	for (int w = 0; w < 2; w++) {
		const struct phase *r = &ph[w];
		printf("%-8s leases %llu: %llu copied up, %llu refused; GPU evictions %llu\n",
		       w ? "warmed" : "plain", (unsigned long long)r->leases,
		       (unsigned long long)r->to_gpu, (unsigned long long)r->refused,
		       (unsigned long long)r->evictions);
		printf("%-8s ns a lease: start %.0f, landing %.0f, release %.0f, store polls (CPU) "
		       "%.0f; all %.0f; step wall %.1f us\n",
		       w ? "warmed" : "plain", r->start, r->land, r->release, r->run, r->all,
		       r->wall_us);
	}
	printf("lease_ns: %.0f (plain %.0f)\n", ph[1].all, ph[0].all);
	printf("warmed_vs_plain: %.3f\n", ph[1].all / ph[0].all);
	release_all(&b);
	free(b.ring);
	free(b.held);
	kvt_store_close(b.s);
	return b.failed ? 1 : 0;
}
