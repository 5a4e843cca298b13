// SPDX-License-Identifier: MIT
/*
 * kvtier-bench-nvme: the nvme tier's page reads and writes (header stamped and
 * checksummed, verified on read) at queue depths 1..128, next to fio's figures for
 * the same block size, depth, O_DIRECT and io_uring engine on the same file.
 *
 *   kvtier-bench-nvme [-f FILE] [-s SIZE_MB] [-t SECONDS] [-r REPS] [-q QD,..] [-b KB,..]
 *
 * Each setting runs kvtier and fio alternately REPS times (default 3) for SECONDS
 * each (default 2); the medians are compared.
 * The last line is `nvme_read_ratio_vs_fio: X` for 32 KiB pages at QD32.
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "daemon/log.h"
#include "daemon/loop.h"
#include "tiers/device.h"
#include "tiers/tier.h"

struct bio {
	struct tier_io io;
	struct bench *b;
};

struct bench {
	struct tier *nv;
	uint64_t nslots;
	uint64_t done, bytes, errors;
	bool stop;
	uint64_t rng;
	uint64_t *epochs; /* per slot: what was written there */
	uint64_t *csums;  /* and its checksum, which reads check the payload alone with */
	uint64_t epoch;
	bool fill;      /* every slot once, in order */
	uint64_t next;
};

static double median(double *v, int n)
{
	for (int i = 1; i < n; i++)
		for (int j = i; j > 0 && v[j - 1] > v[j]; j--) {
			double t = v[j];
			v[j] = v[j - 1];
			v[j - 1] = t;
		}
	return v[n / 2];
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t rnd(struct bench *b)
{
	b->rng ^= b->rng << 13;
	b->rng ^= b->rng >> 7;
	b->rng ^= b->rng << 17;
	return b->rng;
}

static void submit_one(struct bio *x);

static void bio_done(struct tier_io *io)
{
	struct bio *x = (struct bio *)io;
	struct bench *b = x->b;
	if (io->res)
		b->errors++;
	else if (io->dir == TIER_WRITE)
		b->csums[TIER_SLOT_INDEX(io->slot)] = io->meta.csum;
	if (!io->res) {
		b->done++;
		b->bytes += io->len;
	}
	if (!b->stop)
		submit_one(x);
}

static void submit_one(struct bio *x)
{
	struct bench *b = x->b;
	struct tier_io *io = &x->io;
	if (b->fill && b->next >= b->nslots) {
		b->stop = true;
		return;
	}
	uint64_t slot = b->fill ? b->next++ : rnd(b) % b->nslots;
	io->slot = TIER_SLOT(0, slot);
	io->meta.key = (struct page_key){.seq = slot};
	io->meta.len = io->len;
	if (io->dir == TIER_WRITE) {
		io->meta.epoch = ++b->epoch;
		b->epochs[slot] = io->meta.epoch;
	} else {
		io->meta.epoch = b->epochs[slot];
		io->meta.csum = b->csums[slot];
	}
	io->done = bio_done;
	struct tier_io *one = io;
	if (b->nv->ops->submit(b->nv, &one, 1) < 0)
		b->errors++;
}

static double run_tier(struct kvt_loop *loop, struct bench *b, struct tier *host,
		       unsigned qd, enum tier_dir dir, uint32_t len, double secs)
{
	struct bio *x = calloc(qd, sizeof(*x));
	tier_slot_t *hs = calloc(qd, sizeof(*hs));
	for (unsigned i = 0; i < qd; i++) {
		if (host->ops->alloc(host, 0, &hs[i]))
			abort();
		x[i].b = b;
		x[i].io.buf = host->ops->slot_ptr(host, hs[i]);
		x[i].io.len = len;
		x[i].io.dir = dir;
		memset(x[i].io.buf, (int)i, len);
	}
	b->done = b->bytes = b->errors = 0;
	b->next = 0;
	b->stop = false;
	double t0 = now();
	for (unsigned i = 0; i < qd; i++)
		submit_one(&x[i]);
	kvt_loop_submit(loop);
	while (now() - t0 < secs && !b->stop)
		kvt_loop_run(loop, 1, 100);
	b->stop = true;
	double t1 = now();
	uint64_t bytes = b->bytes;
	while (loop->inflight)
		kvt_loop_run(loop, 1, 100);
	for (unsigned i = 0; i < qd; i++)
		host->ops->free(host, hs[i]);
	free(x);
	free(hs);
	if (b->errors)
		fprintf(stderr, "bench: %llu I/O errors or failed page checks\n",
			(unsigned long long)b->errors);
	return (double)bytes / (t1 - t0);
}

/* fio's bandwidth in bytes/s, or -1. Terse v3: field 7 read KiB/s, field 48 write KiB/s. */
static double run_fio(const char *file, uint64_t off, uint64_t size, unsigned qd, bool write,
		      uint32_t bs, double secs)
{
	char cmd[1024];
	snprintf(cmd, sizeof(cmd),
		 "fio --name=kvt --filename=%s --direct=1 --ioengine=io_uring --fixedbufs "
		 "--registerfiles --rw=%s --bs=%u --iodepth=%u --offset=%llu --size=%llu "
		 "--runtime=%.0f --time_based --randrepeat=0 --norandommap "
		 "--output-format=terse --terse-version=3 2>/dev/null",
		 file, write ? "randwrite" : "randread", bs, qd, (unsigned long long)off,
		 (unsigned long long)size, secs);
	FILE *p = popen(cmd, "r");
	if (!p)
		return -1;
	char line[16384];
	double bw = -1;
	while (fgets(line, sizeof(line), p)) {
		int field = 1;
		for (char *c = line, *tok = line;; c++) {
			if (*c == ';' || *c == '\0' || *c == '\n') {
				char save = *c;
				*c = '\0';
				if ((!write && field == 7) || (write && field == 48))
					bw = atof(tok) * 1024.0;
				field++;
				tok = c + 1;
				if (save != ';')
					break;
			}
		}
	}
	pclose(p);
	return bw;
}

int main(int argc, char **argv)
{
	const char *file = "kvtier-bench.store";
	uint64_t size_mb = 4096;
	double secs = 2;
	int reps = 3;
	unsigned qds[16] = {1, 4, 16, 32, 64, 128}, nqd = 6;
	uint32_t kbs[4] = {32, 256}, nkb = 2;
	int c;
	while ((c = getopt(argc, argv, "f:s:t:q:b:r:h")) != -1) {
		switch (c) {
		case 'r':
			reps = atoi(optarg);
			reps = reps < 1 ? 1 : reps > 9 ? 9 : reps;
			break;
		case 'f':
			file = optarg;
			break;
		case 's':
			size_mb = strtoull(optarg, NULL, 0);
			break;
		case 't':
			secs = atof(optarg);
			break;
		case 'q':
			nqd = 0;
			for (char *t = strtok(optarg, ","); t && nqd < 16; t = strtok(NULL, ","))
				qds[nqd++] = (unsigned)atoi(t);
			break;
		case 'b':
			nkb = 0;
			for (char *t = strtok(optarg, ","); t && nkb < 4; t = strtok(NULL, ","))
				kbs[nkb++] = (uint32_t)atoi(t);
			break;
		default:
			fprintf(stderr,
				"usage: %s [-f FILE] [-s SIZE_MB] [-t SECONDS] [-r REPS] [-q QD,..] [-b KB,..]\n",
				argv[0]);
			return c == 'h' ? 0 : 2;
		}
	}
	bool have_fio = system("fio --version >/dev/null 2>&1") == 0;
	if (!have_fio)
		fprintf(stderr, "fio not found: kvtier's figures only\n");
	kvt_log_set_level(KVT_LOG_ERR);
	double ratio_32k_qd32 = -1;
	printf("%-6s %-5s %4s %12s %12s %7s\n", "page", "op", "qd", "kvtier MB/s", "fio MB/s",
	       "ratio");
	for (unsigned bi = 0; bi < nkb; bi++) {
		uint32_t len = kbs[bi] << 10;
		unlink(file);
		struct kvt_loop loop;
		int r = kvt_loop_init(&loop, 512);
		if (r < 0)
			return 1;
		struct kvt_device *dev;
		kvt_device_open("cpu", 0, &dev);
		struct tier_params tp = {.loop = &loop, .dev = dev, .page_bytes = len,
					 .capacity = size_mb << 20, .path = file, .queue_depth = 128};
		struct tier *nv, *host;
		if ((r = tier_nvme_ops.open(&nv, &tp)) < 0) {
			fprintf(stderr, "open %s: %s\n", file, strerror(-r));
			return 1;
		}
		tp.span = nv->ops->io_span(nv);
		tp.stride_align = nv->ops->io_align(nv);
		uint32_t a = tp.stride_align;
		/* on disk: header and payload */
		uint32_t slot_size = (nv->ops->hdr_size(nv) + len + a - 1) / a * a;
		tier_host_ops.open(&host, &tp);
		host->ops->arena_add(host, 0, (uint64_t)(tp.span + a - 1) / a * a * 130);
		struct tier_usage u;
		nv->ops->usage(nv, &u);
		struct bench b = {.nv = nv, .nslots = u.slots, .rng = 88172645463325252ull};
		b.epochs = calloc(u.slots, sizeof(uint64_t));
		b.csums = calloc(u.slots, sizeof(uint64_t));
		/* Write every slot once, in order, so that reads verify real pages. */
		b.fill = true;
		run_tier(&loop, &b, host, 64, TIER_WRITE, len, 1e9);
		b.fill = false;
		/*
		 * Reads first: fio's writes land on kvtier's pages (same file), and a read of
		 * a page fio overwrote is a checksum failure, not a page.
		 */
		for (int w = 0; w < 2; w++) {
			for (unsigned qi = 0; qi < nqd; qi++) {
				/*
				 * Shared disks drift by tens of percent between seconds: alternate the
				 * two, reps times, and compare medians.
				 */
				double o[9], fo[9];
				for (int rep = 0; rep < reps; rep++) {
					o[rep] = run_tier(&loop, &b, host, qds[qi],
							w ? TIER_WRITE : TIER_READ, len, secs);
					fo[rep] = have_fio ? run_fio(file, 1u << 20,
								   (uint64_t)u.slots * slot_size,
								   qds[qi], w, len, secs)
							 : -1;
				}
				double ours = median(o, reps), fio = median(fo, reps);
				double ratio = fio > 0 ? ours / fio : -1;
				printf("%-6s %-5s %4u %12.0f %12.0f %7.3f\n",
				       len == 32768 ? "32K" : len == 262144 ? "256K" : "?",
				       w ? "write" : "read", qds[qi], ours / 1e6, fio / 1e6, ratio);
				fflush(stdout);
				if (!w && len == 32768 && qds[qi] == 32)
					ratio_32k_qd32 = ratio;
			}
		}
		free(b.epochs);
		free(b.csums);
		host->ops->close(host);
		nv->ops->close(nv);
		kvt_device_close(dev);
		kvt_loop_exit(&loop);
		unlink(file);
	}
	printf("(MB/s of page payload; kvtier writes a header block with each page and reads "
	       "the payload alone, checked against the checksum it keeps; fio on the same file, "
	       "same bs, depth, O_DIRECT, io_uring with fixed buffers and files)\n");
	printf("nvme_read_ratio_vs_fio: %.3f\n", ratio_32k_qd32);
	return 0;
}
