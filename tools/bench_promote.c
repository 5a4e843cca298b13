// SPDX-License-Identifier: MIT
/*
 * kvtier-bench-promote: promotion of scattered pages from the pinned host tier into
 * the GPU pool, through the GPU tier exactly as the store does it, against one large
 * cudaMemcpy of pinned memory (the link's practical limit), in the same run.
 *
 *   kvtier-bench-promote [-d cuda|cpu] [-p PAGE_KB] [-n PAGES_PER_STEP] [-H HOST_MB]
 *
 * KVT_CUDA_COPY=memcpy selects cudaMemcpyBatchAsync instead of the gather kernel.
 * Last line: `promote_ratio_vs_pinned_copy: X`.
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "daemon/loop.h"
#include "tiers/device.h"
#include "tiers/tier.h"

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int cmp_d(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static unsigned pending;
static unsigned errors;

static void done(struct tier_io *io)
{
	if (io->res)
		errors++;
	pending--;
}

int main(int argc, char **argv)
{
	const char *devname = "auto";
	uint32_t page_kb = 32, per_step = 8192;
	uint64_t host_mb = 2048;
	int c;
	while ((c = getopt(argc, argv, "d:p:n:H:h")) != -1) {
		switch (c) {
		case 'd':
			devname = optarg;
			break;
		case 'p':
			page_kb = (uint32_t)atoi(optarg);
			break;
		case 'n':
			per_step = (uint32_t)atoi(optarg);
			break;
		case 'H':
			host_mb = strtoull(optarg, NULL, 0);
			break;
		default:
			fprintf(stderr, "usage: %s [-d cuda|cpu] [-p PAGE_KB] [-n PAGES] [-H HOST_MB]\n",
				argv[0]);
			return c == 'h' ? 0 : 2;
		}
	}
	uint32_t pb = page_kb << 10;
	struct kvt_loop loop;
	struct kvt_device *dev;
	if (kvt_loop_init(&loop, 256) < 0 || kvt_device_open(devname, 0, &dev) < 0)
		return 1;
	struct tier_params tp = {.loop = &loop, .dev = dev, .page_bytes = pb,
				 .numa_node = dev->ops->numa_node(dev)};
	struct tier *host, *gpu;
	tier_host_ops.open(&host, &tp);
	tier_gpu_ops.open(&gpu, &tp);
	if (host->ops->arena_add(host, 0, host_mb << 20) < 0 ||
	    gpu->ops->arena_add(gpu, 0, (uint64_t)per_step * pb) < 0)
		return 1;
	struct tier_usage hu;
	host->ops->usage(host, &hu);
	uint32_t nhost = (uint32_t)hu.slots;
	tier_slot_t *hs = malloc(nhost * sizeof(*hs)), *gs = malloc(per_step * sizeof(*gs));
	for (uint32_t i = 0; i < nhost; i++) {
		host->ops->alloc(host, 0, &hs[i]);
		uint64_t *p = host->ops->slot_ptr(host, hs[i]);
		for (uint32_t j = 0; j < pb / 8; j++)
			p[j] = (uint64_t)i << 32 | j;
	}
	for (uint32_t i = 0; i < per_step; i++)
		gpu->ops->alloc(gpu, 0, &gs[i]);
	printf("device: %s\n", dev->ops->describe(dev));

	/* Baseline: one large copy of pinned memory into the pool. */
	int afd;
	void *abase, *gbase;
	uint64_t alen, glen;
	tier_host_arena_info(host, 0, &afd, &abase, &alen);
	tier_gpu_arena_info(gpu, 0, &afd, &gbase, &glen);
	uint64_t big = (uint64_t)per_step * pb;
	if (big > alen)
		big = alen;
	double tb[7];
	for (int r = 0; r < 7; r++) {
		double t0 = now();
		dev->ops->memcpy(dev, gbase, abase, big, KVT_H2D);
		tb[r] = now() - t0;
	}
	qsort(tb, 7, sizeof(double), cmp_d);
	double bw_big = (double)big / tb[3];

	/* Scattered: per_step random host pages into random pool slots, one submit. */
	struct tier_io *ios = calloc(per_step, sizeof(*ios));
	struct tier_io **iop = calloc(per_step, sizeof(*iop));
	uint64_t rng = 0x9e3779b97f4a7c15ull;
	double ts[7];
	for (int r = 0; r < 7; r++) {
		for (uint32_t i = 0; i < per_step; i++) {
			rng ^= rng << 13;
			rng ^= rng >> 7;
			rng ^= rng << 17;
			uint32_t h = (uint32_t)(rng % nhost);
			ios[i] = (struct tier_io){.slot = gs[(i * 7919u) % per_step],
						  .buf = host->ops->slot_ptr(host, hs[h]),
						  .len = pb, .dir = TIER_WRITE, .done = done};
			ios[i].meta.key.index = h;
			iop[i] = &ios[i];
		}
		pending = per_step;
		double t0 = now();
		if (gpu->ops->submit(gpu, iop, per_step) < 0)
			return 1;
		while (pending)
			kvt_loop_run(&loop, 1, 1000);
		ts[r] = now() - t0;
	}
	qsort(ts, 7, sizeof(double), cmp_d);
	double bw_sc = (double)per_step * pb / ts[3];

	/* Check the last round landed where it should. */
	uint64_t *chk = malloc(pb);
	unsigned bad = 0;
	for (uint32_t i = 0; i < per_step; i += 97) {
		dev->ops->memcpy(dev, chk, gpu->ops->slot_ptr(gpu, ios[i].slot), pb, KVT_D2H);
		uint32_t h = ios[i].meta.key.index;
		for (uint32_t j = 0; j < pb / 8; j += 61)
			bad += chk[j] != ((uint64_t)h << 32 | j);
	}
	const char *mode = getenv("KVT_CUDA_COPY");
	printf("one pinned copy of %llu MiB: %.2f GB/s\n", (unsigned long long)(big >> 20),
	       bw_big / 1e9);
	printf("%u scattered %u KiB pages (%s): %.2f GB/s, %.1f us per step, %u errors, %u bad words\n",
	       per_step, page_kb,
	       (dev->ops->caps & KVT_DEV_CAP_GPU) ? (mode && !strcmp(mode, "memcpy")
							 ? "cudaMemcpyBatchAsync"
							 : "gather kernel")
						  : "cpu worker",
	       bw_sc / 1e9, ts[3] * 1e6, errors, bad);
	printf("promote_ratio_vs_pinned_copy: %.3f\n", bw_sc / bw_big);
	free(chk);
	free(ios);
	free(iop);
	gpu->ops->close(gpu);
	host->ops->close(host);
	kvt_device_close(dev);
	kvt_loop_exit(&loop);
	return bad || errors ? 1 : 0;
}
