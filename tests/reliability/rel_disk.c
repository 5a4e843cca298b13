// SPDX-License-Identifier: MIT
/*
 * What disks do to the store: I/O errors, short transfers, ENOSPC and hung I/O
 * injected under the real daemon (store.fault_inject, tiers/tier_fault.h), bytes
 * flipped in its store file while it serves, and at the store level random flips, torn
 * sectors and pages copied over other slots, read live and after a restart. Every page
 * that reaches a client is compared with what was appended: a fault may cost a step
 * an error, never wrong KV.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"
#include "helpers.h"
#include "tiers/store.h"

#define QN	((size_t)REL_HEADS * REL_GROUP * REL_D)
#define PREFILL 1024u /* 64 pages per (layer, head): 512 pages, 4 MiB, more than GPU + host */

/* A number from the daemon's JSON ("key": N), its last occurrence (the tiers are
 * listed gpu, host, nvme), or -1. */
static long long json_num(const char *text, const char *key)
{
	char pat[80];
	snprintf(pat, sizeof(pat), "\"%s\":", key);
	const char *p = NULL;
	for (const char *q = strstr(text, pat); q; q = strstr(q + 1, pat))
		p = q;
	return p ? strtoll(p + strlen(pat), NULL, 10) : -1;
}

struct run {
	unsigned steps, ok, failed, pages, wrong;
	int first_err;
};

/* Decode steps over two long sequences; every served page checked byte for byte. */
static void decode(struct kvtier_client *c, const uint32_t *ids, const uint32_t *salts,
		   unsigned steps, uint32_t flags, struct run *r)
{
	struct kvtier_memory mem;
	kvtier_memory(c, &mem);
	struct kvtier_table *tab = kvtier_table_create(c, 2);
	assert_non_null(tab);
	float q[2 * QN], out[2 * QN];
	for (unsigned s = 0; s < steps; s++) {
		struct kvtier_select_params sp = {.budget_pages = 12, .sink_tokens = REL_T,
						  .window_tokens = 2 * REL_T, .flags = flags};
		for (uint32_t l = 0; l < REL_LAYERS; l++) {
			for (int b = 0; b < 2; b++)
				rel_query(salts[b], s * 7 + 3, l, q + b * QN);
			r->steps++;
			int ret = kvtier_select(c, ids, 2, l, q, KVT_MEM_HOST, &sp, tab);
			if (ret) {
				r->failed++;
				if (!r->first_err)
					r->first_err = ret;
				continue;
			}
			r->ok++;
			struct kvtier_table_view v;
			kvtier_table_view(tab, &v);
			for (uint32_t row = 0; row < v.rows; row++)
				for (int j = 0; j < v.n_pages[row]; j++) {
					const float *pg = rel_slot_page(&mem, v.slots[row * v.stride + j]);
					r->pages++;
					r->wrong += !pg || !rel_page_ok(pg, salts[row / REL_HEADS], l, row % REL_HEADS,
								 (uint32_t)v.pages[row * v.stride + j]);
				}
			assert_int_equal(kvtier_attend(c, tab, q, out, NULL, 0.125f, KVT_MEM_HOST), 0);
		}
	}
	kvtier_table_destroy(tab);
}

static void prefill(struct kvtier_client *c, uint32_t *ids, const uint32_t *salts)
{
	for (int b = 0; b < 2; b++) {
		assert_int_equal(kvtier_seq_create(c, &ids[b]), 0);
		for (uint32_t t = 0; t < PREFILL; t += 256)
			assert_int_equal(rel_append(c, ids[b], salts[b], t, 256), 0);
	}
}

/* ---- 3. disk faults under the daemon ---- */

static void disk_faults(void **state)
{
	struct rel_daemon d;
	const char *spec = "store.fault_inject=read_eio=0.005,read_short=0.005,write_eio=0.03,"
			   "write_short=0.01,write_enospc=0.01,seed=7";
	assert_int_equal(rel_daemon_start(&d, (const char *const[]){spec, NULL}, false), 0);
	struct kvtier_client *c = rel_attach(&d, NULL, 0);
	assert_non_null(c);
	uint32_t ids[2], salts[2] = {301, 302};
	prefill(c, ids, salts);
	struct run r = {0};
	decode(c, ids, salts, rel_scale(40, 400), 0, &r);
	char js[65536];
	assert_int_equal(rel_ctl(d.sock, "stats", 6, js, sizeof(js)), 0);
	long long we = json_num(js, "write_errors"), re = json_num(js, "read_errors"),
		  lost = json_num(js, "pages_lost"), poisoned = json_num(js, "poisoned_slots");
	printf("rel: disk-faults: injected EIO 0.5%%/3%%, short 0.5%%/1%% of reads/writes, ENOSPC 1%% "
	       "of writes: %lld write errors (%lld slots poisoned, never reused), %lld read "
	       "errors, %lld pages lost\n", we, poisoned, re, lost);
	printf("rel: disk-faults: %u selects: %u served (%u pages, %u wrong), %u failed cleanly "
	       "(first: %s)\n", r.steps, r.ok, r.pages, r.wrong, r.failed,
	       r.first_err ? strerror(-r.first_err) : "none");
	assert_int_equal(r.wrong, 0);
	assert_true(r.ok > 0);
	assert_true(we > 0 && poisoned >= we);
	assert_true(rel_daemon_alive(&d));
	kvtier_detach(c);
	assert_int_equal(rel_daemon_stop(&d), 0);
	rel_daemon_cleanup(&d);
}

/* ---- 3. a hung disk: the step fails after the promote timeout; the read's buffer is
 * held until the disk answers; the daemon serves others meanwhile ---- */

static void hung_io(void **state)
{
	struct rel_daemon d;
	assert_int_equal(rel_daemon_start(&d, (const char *const[]){
		"store.fault_inject=read_hang=1,hang_ms=2500", "daemon.promote_timeout_ms=400",
		"prefetch.enable=0", NULL}, false), 0);
	struct kvtier_client *c = rel_attach(&d, NULL, KVTIER_ATTACH_NO_HOST_READS);
	assert_non_null(c);
	uint32_t ids[2], salts[2] = {401, 402};
	prefill(c, ids, salts);
	struct run r = {0};
	double t0 = rel_now();
	decode(c, ids, salts, 1, 0, &r); /* both layers: the first selects read the disk */
	double took = rel_now() - t0;
	struct kvt_wire_stats w;
	assert_int_equal(rel_stats(d.sock, &w), 0);
	/* meanwhile another client is served */
	struct kvtier_client *o = rel_attach(&d, "other", 0);
	assert_non_null(o);
	double p0 = rel_now();
	assert_int_equal(kvtier_ping(o), 0);
	assert_int_equal(kvtier_nop(o), 0);
	double ping_ms = (rel_now() - p0) * 1e3;
	kvtier_detach(o);
	char js[65536];
	assert_int_equal(rel_ctl(d.sock, "stats", 6, js, sizeof(js)), 0);
	long long held = json_num(js, "hung_now");
	/* after the disk answers: the same steps succeed, with the right pages */
	usleep(2700 * 1000);
	struct run r2 = {0};
	decode(c, ids, salts, 2, 0, &r2);
	printf("rel: hung-io: every NVMe read held 2.5 s, promote timeout 0.4 s: %u selects "
	       "failed with %s in %.2f s; a second client's ping+nop meanwhile %.2f ms; reads "
	       "held %lld\n", r.failed, r.first_err ? strerror(-r.first_err) : "none", took,
	       ping_ms, held);
	printf("rel: hung-io: after the disk answered: %u of %u selects served, %u pages, %u "
	       "wrong (reads still hang: a step needing the disk fails again: %u)\n", r2.ok,
	       r2.steps, r2.pages, r2.wrong, r2.failed);
	assert_true(r.failed >= 1);
	assert_int_equal(r.first_err, -ENOBUFS);
	assert_int_equal(r.wrong + r2.wrong, 0);
	assert_true(ping_ms < 200);
	assert_true(held >= 1);
	kvtier_detach(c);
	/* every held read completes and is freed: the daemon drains */
	t0 = rel_now();
	do
		assert_int_equal(rel_stats(d.sock, &w), 0);
	while ((w.pages || w.tier_used[0] || w.tier_used[1]) && rel_now() - t0 < 8);
	printf("rel: hung-io: after detach: pages %llu, gpu slots %llu, host slots %llu (%.1f s)\n",
	       (unsigned long long)w.pages, (unsigned long long)w.tier_used[0],
	       (unsigned long long)w.tier_used[1], rel_now() - t0);
	assert_int_equal(w.pages + w.tier_used[0] + w.tier_used[1], 0);
	assert_int_equal(rel_daemon_stop(&d), 0);
	rel_daemon_cleanup(&d);
}

/* ---- 4. the store file corrupted under a serving daemon ---- */

static void corrupt_live(void **state)
{
	struct rel_daemon d;
	assert_int_equal(rel_daemon_start(&d, NULL, false), 0);
	struct kvtier_client *c = rel_attach(&d, NULL, KVTIER_ATTACH_NO_HOST_READS);
	assert_non_null(c);
	uint32_t ids[2], salts[2] = {501, 502};
	prefill(c, ids, salts);
	struct kvt_wire_stats w;
	double t0 = rel_now();
	do
		assert_int_equal(rel_stats(d.sock, &w), 0);
	while (w.writebacks < w.pages && rel_now() - t0 < 5);
	char path[700];
	snprintf(path, sizeof(path), "%s/store.kvt", d.state);
	int fd = open(path, O_RDWR);
	assert_true(fd >= 0);
	off_t size = lseek(fd, 0, SEEK_END);
	const unsigned flips = rel_scale(300, 3000);
	for (unsigned i = 0; i < flips; i++) {
		off_t off = (off_t)((1u << 20) + rel_rand() % (uint64_t)(size - (1u << 20)));
		uint8_t b;
		assert_int_equal(pread(fd, &b, 1, off), 1);
		b ^= (uint8_t)(1u << (rel_rand() % 8));
		assert_int_equal(pwrite(fd, &b, 1, off), 1);
	}
	fsync(fd);
	close(fd);
	struct run r = {0};
	decode(c, ids, salts, rel_scale(30, 200), 0, &r);
	char js[65536];
	assert_int_equal(rel_ctl(d.sock, "stats", 6, js, sizeof(js)), 0);
	printf("rel: corrupt-live: %u bits flipped in the %lld MiB store file under the daemon "
	       "(%llu pages written back); %u selects: %u served (%u pages, %u wrong), %u failed "
	       "(first: %s); read errors %lld, pages lost %lld\n", flips,
	       (long long)(size >> 20), (unsigned long long)w.writebacks, r.steps, r.ok, r.pages,
	       r.wrong, r.failed, r.first_err ? strerror(-r.first_err) : "none",
	       json_num(js, "read_errors"), json_num(js, "pages_lost"));
	assert_int_equal(r.wrong, 0);
	assert_true(json_num(js, "read_errors") > 0);
	kvtier_detach(c);
	assert_int_equal(rel_daemon_stop(&d), 0);
	rel_daemon_cleanup(&d);
}

/* ---- 4. the store level: flips, torn sectors, copied slots; live and after reopen ---- */

#define SPB (32u << 10)
#define DATA_OFF (1u << 20) /* tier_nvme.c's layout */

enum harm { HARM_NONE, HARM_FLIP_PAYLOAD, HARM_FLIP_HDR, HARM_TORN, HARM_COPY, HARM_MAX };
static const char *const harm_name[] = {"none", "payload bit flips", "header bit flips",
					"torn (a sector of another page)", "another slot copied over"};

static int read_one(struct kvt_store *s, const struct page_key *k, uint8_t *buf)
{
	struct t_wait w = {.pending = 1};
	memset(buf, 0x5a, SPB);
	int r = kvt_store_read(s, k, buf, SPB, t_cb, &w);
	return r ? r : t_drain(s, &w);
}

static void corrupt_store(void **state)
{
	const unsigned n = rel_scale(1500, 6000);
	const char *dir = t_dir("rel-corrupt");
	char path[4400];
	snprintf(path, sizeof(path), "%s/store", dir);
	struct kvt_store_params p = {.device = "cpu", .nvme_path = path,
				     .nvme_bytes = (uint64_t)(n + 64) * SPB,
				     .host_bytes = 8u << 20, .page_bytes = SPB, .queue_depth = 32};
	struct kvt_store *s;
	assert_int_equal(kvt_store_open(&p, &s), 0);
	uint8_t *buf = aligned_alloc(4096, SPB), *slot = aligned_alloc(4096, 2 * SPB),
		*other = aligned_alloc(4096, 2 * SPB);
	for (uint32_t i = 0; i < n; i++) {
		struct page_key k = t_key(0, 1 + i % 7, (uint16_t)(i % 3), 0, i);
		t_fill(buf, SPB, &k);
		assert_int_equal(t_put(s, &k, buf, SPB, 0, NULL), 0);
	}
	assert_int_equal(kvt_store_flush(s), 0);
	struct tier *nv = kvt_store_tier(s, TIER_NVME);
	const uint32_t hs = nv->ops->hdr_size(nv), al = nv->ops->io_align(nv);
	const uint64_t ssz = (hs + SPB + al - 1) / al * al, span = hs + SPB; /* header + payload */
	uint64_t *off = calloc(n, sizeof(uint64_t));
	for (uint32_t i = 0; i < n; i++) {
		struct page_key k = t_key(0, 1 + i % 7, (uint16_t)(i % 3), 0, i);
		int ev = kvt_store_evict(s, &k, TIER_HOST);
		assert_true(ev == 0 || ev == -ENOENT); /* -ENOENT: already only on disk */
		struct kvt_page_info pi;
		assert_int_equal(kvt_store_page_info(s, &k, &pi), 0);
		off[i] = DATA_OFF + TIER_SLOT_INDEX(pi.slot[TIER_NVME]) * ssz;
	}
	/* harm a quarter of the pages, each in one way */
	uint8_t *harm = calloc(n, 1);
	unsigned harmed[HARM_MAX] = {0};
	int fd = open(path, O_RDWR);
	assert_true(fd >= 0);
	for (uint32_t i = 0; i < n; i++) {
		if (rel_rand() % 4)
			continue;
		enum harm h = (enum harm)(1 + rel_rand() % (HARM_MAX - 1));
		uint32_t j = (uint32_t)(rel_rand() % n);
		if (h == HARM_COPY && (j == i || harm[j]))
			continue;
		assert_int_equal(pread(fd, slot, span, (off_t)off[i]), (ssize_t)span);
		if (h == HARM_FLIP_PAYLOAD || h == HARM_FLIP_HDR) {
			unsigned bits = 1 + (unsigned)(rel_rand() % 8);
			memcpy(other, slot, span);
			for (unsigned b = 0; b < bits; b++) {
				/* the header is the slot's first 64 bytes (the rest of
				 * the headroom is padding no reader looks at) */
				uint64_t at = h == HARM_FLIP_HDR ? rel_rand() % 64 : hs + rel_rand() % SPB;
				slot[at] ^= (uint8_t)(1u << (rel_rand() % 8));
			}
			if (!memcmp(slot, other, span))
				continue; /* the flips undid each other: nothing harmed */
		} else {
			/* torn: one 4 KiB sector of page j; copy: all of page j's slot */
			uint64_t from = h == HARM_TORN ? (1 + rel_rand() % (span / 4096 - 1)) * 4096 : 0;
			uint64_t len = h == HARM_TORN ? 4096 : span;
			assert_int_equal(pread(fd, other, len, (off_t)(off[j] + from)), (ssize_t)len);
			if (!memcmp(slot + from, other, len))
				continue;
			memcpy(slot + from, other, len);
		}
		assert_int_equal(pwrite(fd, slot, span, (off_t)off[i]), (ssize_t)span);
		harm[i] = (uint8_t)h;
		harmed[h]++;
	}
	fsync(fd);
	close(fd);
	/*
	 * live: every harmed page fails its read, every other reads back exact; except
	 * that a store whose header is a whole block reads a page's payload alone, against
	 * the checksum it remembers: a damaged header is then not read, and the page reads
	 * back exact. After a restart the scan reads every header: every harmed page fails.
	 */
	const bool payload_reads = hs % al == 0;
	unsigned det[HARM_MAX] = {0}, good = 0, wrong = 0, hdr_unread = 0;
	for (int pass = 0; pass < 2; pass++) {
		memset(det, 0, sizeof(det));
		good = wrong = hdr_unread = 0;
		if (pass == 1) { /* a restart: the scan keeps what verifies */
			kvt_store_close(s);
			assert_int_equal(kvt_store_open(&p, &s), 0);
		}
		for (uint32_t i = 0; i < n; i++) {
			struct page_key k = t_key(0, 1 + i % 7, (uint16_t)(i % 3), 0, i);
			int r = read_one(s, &k, buf);
			if (r == 0 && !t_check(buf, SPB, &k))
				wrong++; /* never */
			else if (r == 0 && harm[i] == HARM_FLIP_HDR && payload_reads && !pass)
				hdr_unread++;
			else if (r == 0)
				good += !harm[i]; /* a harmed page read back exact: not detected */
			else if (harm[i])
				det[harm[i]]++;
		}
		unsigned total = 0, found = 0;
		for (int h = 1; h < HARM_MAX; h++) {
			total += harmed[h];
			found += det[h];
			printf("rel: corrupt-store: %s: %s: %u of %u detected\n",
			       pass ? "after reopen" : "live", harm_name[h], det[h], harmed[h]);
		}
		printf("rel: corrupt-store: %s: %u of %u harmed pages detected (%.1f%%), %u of %u "
		       "intact pages read back exact, %u reads returned wrong data\n", pass ? "after reopen" : "live",
		       found, total, 100.0 * found / (total ? total : 1), good, n - total, wrong);
		if (hdr_unread)
			printf("rel: corrupt-store: %s: %u pages with a damaged header served exact "
			       "(payload read alone, checked against the remembered checksum)\n",
			       pass ? "after reopen" : "live", hdr_unread);
		assert_int_equal(found + hdr_unread, total);
		assert_int_equal(good, n - total);
		assert_int_equal(wrong, 0);
	}
	kvt_store_close(s);
	t_rmdir(dir);
	free(off);
	free(harm);
	free(buf);
	free(slot);
	free(other);
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(corrupt_store),
		cmocka_unit_test(disk_faults),
		cmocka_unit_test(hung_io),
		cmocka_unit_test(corrupt_live),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
