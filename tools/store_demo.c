// SPDX-License-Identifier: MIT
/*
 * kvtier-store-demo: the page store end to end on this machine. Writes the KV pages of
 * a long sequence (more than the GPU pool and the host tier hold together), lets them
 * write back to NVMe, runs decode-like steps that bring a selection of pages (sinks,
 * local window, scattered "top-k" pages) to the GPU and checks every byte, then
 * reopens the store as a restarted daemon would. Prints what each tier holds.
 *
 *   kvtier-store-demo [-d auto|cuda|cpu] [-f STORE] [-t TOKENS] [-s STEPS]
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "daemon/log.h"
#include "tiers/device.h"
#include "tiers/store.h"

enum { LAYERS = 4, HEADS = 8, PAGE_TOKENS = 64, HEAD_DIM = 128 };
#define PB (PAGE_TOKENS * HEAD_DIM * 2 * 2) /* K and V, bf16: 32 KiB */

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void fill(uint64_t *w, const struct page_key *k)
{
	uint64_t x = page_key_hash(k) | 1;
	for (unsigned i = 0; i < PB / 8; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		w[i] = x;
	}
}

struct waitc {
	int pending, err;
};

static void cb(void *arg, int res)
{
	struct waitc *w = arg;
	w->pending--;
	if (res && !w->err)
		w->err = res;
}

static void table(struct kvt_store *s, const char *title)
{
	struct kvt_store_stats st;
	kvt_store_stats(s, &st);
	printf("\n%s\n", title);
	printf("  %-5s %10s %10s %12s %10s %12s %12s %8s\n", "tier", "pages", "capacity",
	       "copies in", "evictions", "read MiB", "written MiB", "errors");
	for (int t = 0; t < TIER_MAX; t++) {
		struct tier_usage *u = &st.tier[t];
		if (!u->slots)
			continue;
		uint64_t in = t == TIER_NVME ? st.writebacks : st.promotions[t];
		printf("  %-5s %10llu %10llu %12llu %10llu", tier_name(t), (unsigned long long)u->used,
		       (unsigned long long)u->slots, (unsigned long long)in,
		       (unsigned long long)st.evictions[t]);
		if (t == TIER_NVME)
			printf(" %12.1f %12.1f", (double)u->read_bytes / 1048576.0,
			       (double)u->write_bytes / 1048576.0);
		else
			printf(" %12s %12s", "-", "-");
		printf(" %8llu\n", (unsigned long long)u->errors);
	}
	printf("  pages %llu (dirty %llu) in %llu sequences; metadata %.1f KiB\n",
	       (unsigned long long)st.pages, (unsigned long long)st.pages_dirty,
	       (unsigned long long)st.seqs, (double)st.meta_bytes / 1024.0);
}

int main(int argc, char **argv)
{
	const char *device = "auto";
	char path[4096] = "";
	unsigned tokens = 32768, steps = 32;
	int c;
	while ((c = getopt(argc, argv, "d:f:t:s:h")) != -1) {
		switch (c) {
		case 'd':
			device = optarg;
			break;
		case 'f':
			snprintf(path, sizeof(path), "%s", optarg);
			break;
		case 't':
			tokens = (unsigned)atoi(optarg);
			break;
		case 's':
			steps = (unsigned)atoi(optarg);
			break;
		default:
			fprintf(stderr, "usage: %s [-d auto|cuda|cpu] [-f STORE] [-t TOKENS] [-s STEPS]\n",
				argv[0]);
			return c == 'h' ? 0 : 2;
		}
	}
	if (!path[0]) {
		const char *st = getenv("XDG_STATE_HOME");
		char dir[3000];
		if (st && *st)
			snprintf(dir, sizeof(dir), "%s/kvtier", st);
		else if (getenv("HOME"))
			snprintf(dir, sizeof(dir), "%s/.local/state/kvtier", getenv("HOME"));
		else
			snprintf(dir, sizeof(dir), "/tmp/kvtier");
		char cmd[3100];
		snprintf(cmd, sizeof(cmd), "mkdir -p '%s'", dir);
		if (system(cmd) != 0)
			return 1;
		snprintf(path, sizeof(path), "%s/demo.store", dir);
	}
	unlink(path);
	unsigned npages = tokens / PAGE_TOKENS;
	uint64_t total = (uint64_t)npages * LAYERS * HEADS * PB;
	struct kvt_store_params p = {
		.device = device,
		.nvme_path = path,
		.nvme_bytes = total + (64u << 20),
		.host_bytes = total / 4,
		.gpu_bytes = total / 8,
		.page_bytes = PB,
		.queue_depth = 64,
	};
	struct kvt_store *s;
	int r = kvt_store_open(&p, &s);
	if (r < 0) {
		fprintf(stderr, "kvtier-store-demo: cannot open the store at %s: %s\n", path,
			strerror(-r));
		return 1;
	}
	struct kvt_device *dev = kvt_store_device(s);
	printf("kvtier store demo: device %s\n", dev->ops->describe(dev));
	printf("model: %u layers x %u KV heads, head dim %u, bf16, %u-token pages (%u KiB)\n",
	       LAYERS, HEADS, HEAD_DIM, PAGE_TOKENS, PB >> 10);
	printf("sequence: %u tokens = %.0f MiB of KV; GPU pool %.0f MiB, host %.0f MiB, store %s\n",
	       tokens, (double)total / 1048576.0, (double)p.gpu_bytes / 1048576.0,
	       (double)p.host_bytes / 1048576.0, path);

	uint64_t *buf = aligned_alloc(4096, PB);
	double t0 = now();
	struct waitc w = {0};
	for (unsigned i = 0; i < npages; i++)
		for (unsigned l = 0; l < LAYERS; l++)
			for (unsigned h = 0; h < HEADS; h++) {
				struct page_key k = {.seq = 1, .layer = (uint16_t)l, .kv_head = (uint16_t)h,
						     .index = i};
				fill(buf, &k);
				while ((r = kvt_store_put(s, &k, buf, PB, 0, NULL, NULL)) == -EAGAIN)
					kvt_store_run(s, 10);
				if (r) {
					fprintf(stderr, "put: %s\n", strerror(-r));
					return 1;
				}
				kvt_store_run(s, 0);
			}
	if ((r = kvt_store_flush(s))) {
		fprintf(stderr, "flush: %s\n", strerror(-r));
		return 1;
	}
	double t1 = now();
	printf("prefill: %u pages written and on disk in %.2f s (%.0f MiB/s)\n",
	       npages * LAYERS * HEADS, t1 - t0, (double)total / 1048576.0 / (t1 - t0));
	table(s, "after prefill:");

	/* Decode steps: per (layer, head) the sink page, the last 2 pages and 13 others. */
	unsigned bad = 0, checked = 0;
	uint64_t rng = 12345;
	t0 = now();
	for (unsigned step = 0; step < steps; step++) {
		struct page_key sel[LAYERS * HEADS * 16];
		unsigned n = 0;
		for (unsigned l = 0; l < LAYERS; l++)
			for (unsigned h = 0; h < HEADS; h++)
				for (unsigned j = 0; j < 16; j++) {
					rng ^= rng << 13;
					rng ^= rng >> 7;
					rng ^= rng << 17;
					unsigned idx = j == 0 ? 0 : j <= 2 ? npages - j
							    : (unsigned)(rng % npages);
					sel[n++] = (struct page_key){.seq = 1, .layer = (uint16_t)l,
								     .kv_head = (uint16_t)h,
								     .index = idx};
				}
		for (unsigned i = 0; i < n; i++) {
			w.pending++;
			if (kvt_store_promote(s, &sel[i], TIER_GPU, cb, &w))
				w.pending--;
		}
		while (w.pending)
			kvt_store_run(s, 100);
		for (unsigned i = 0; i < n; i++) {
			kvt_store_pin(s, &sel[i]);
			kvt_store_touch(s, &sel[i], 1.0f);
		}
		/* What attention would read: check a sample of the selection on the GPU. */
		for (unsigned i = step % 7; i < n; i += 7) {
			void *g = kvt_store_slot_ptr(s, &sel[i], TIER_GPU);
			if (!g || dev->ops->memcpy(dev, buf, g, PB, KVT_D2H)) {
				bad++;
				continue;
			}
			uint64_t *want = malloc(PB);
			fill(want, &sel[i]);
			bad += memcmp(want, buf, PB) != 0;
			free(want);
			checked++;
		}
		for (unsigned i = 0; i < n; i++)
			kvt_store_unpin(s, &sel[i]);
	}
	t1 = now();
	printf("\ndecode: %u steps of %u selected pages: %.2f ms per step, %u pages checked on the "
	       "GPU, %u wrong\n",
	       steps, LAYERS * HEADS * 16, (t1 - t0) * 1e3 / steps, checked, bad);
	table(s, "after decode:");
	kvt_store_close(s);

	t0 = now();
	r = kvt_store_open(&p, &s);
	if (r < 0) {
		fprintf(stderr, "reopen: %s\n", strerror(-r));
		return 1;
	}
	struct kvt_store_stats st;
	kvt_store_stats(s, &st);
	printf("\nrestart: %llu pages found on disk in %.2f s, %llu bad\n",
	       (unsigned long long)st.recovered_pages, now() - t0,
	       (unsigned long long)st.recovered_bad);
	kvt_store_close(s);
	unlink(path);
	free(buf);
	return bad ? 1 : 0;
}
