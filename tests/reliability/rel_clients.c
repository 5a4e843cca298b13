// SPDX-License-Identifier: MIT
/*
 * What clients can do to the daemon: die at any point of a step (kill -9), attach and
 * detach in a churn loop, and misbehave on purpose (forged ids, another tenant's
 * memory, shrinking the shared memfds, flooding the ring). Each case checks that a
 * well-behaved client's results stay bit-identical throughout and that the daemon's
 * resources (fds, RSS, pinned bytes, slots, sequences) come back to their baseline.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"

static struct rel_daemon dmn;

#define QN ((size_t)REL_HEADS * REL_GROUP * REL_D)
#define STEADY_SALT 1000u
#define STEADY_TOK  512u /* 32 pages per (layer, head) */

/* RSS is a measure of leaks only without sanitizers: ASan keeps freed memory in its
 * quarantine (there, LeakSanitizer checks the daemon at its exit instead). */
static bool rss_counts(void)
{
	const char *e = getenv("KVT_REL_SANITIZED");
	return !e || *e != '1';
}

/* ---- the well-behaved client: the same step over and over, results bit-identical ---- */

struct steady {
	pid_t pid;
	int stop[2];  /* parent -> child: stop */
	int ready[2]; /* child -> parent: prefilled and reference taken */
};

static void steady_main(struct steady *s)
{
	close(s->stop[1]);
	close(s->ready[0]);
	struct kvtier_client *c = rel_attach(&dmn, "steady", 0);
	uint32_t id;
	if (!c || kvtier_seq_create(c, &id) || rel_append(c, id, STEADY_SALT, 0, STEADY_TOK))
		_exit(2);
	struct kvtier_table *tab = kvtier_table_create(c, 1);
	struct kvtier_select_params sp = {.budget_pages = 40, .sink_tokens = REL_T,
					  .window_tokens = 2 * REL_T};
	float q[REL_LAYERS][QN], ref[REL_LAYERS][QN], out[QN];
	struct kvtier_memory mem;
	kvtier_memory(c, &mem);
	for (uint32_t l = 0; l < REL_LAYERS; l++) {
		rel_query(STEADY_SALT, 0, l, q[l]);
		if (kvtier_select(c, &id, 1, l, q[l], KVT_MEM_HOST, &sp, tab) ||
		    kvtier_attend(c, tab, q[l], ref[l], NULL, 0.125f, KVT_MEM_HOST))
			_exit(3);
	}
	if (write(s->ready[1], "r", 1) != 1)
		_exit(4);
	unsigned long steps = 0;
	for (;;) {
		struct pollfd p = {s->stop[0], POLLIN, 0};
		if (poll(&p, 1, 0) == 1)
			break;
		for (uint32_t l = 0; l < REL_LAYERS; l++) {
			int r = kvtier_select(c, &id, 1, l, q[l], KVT_MEM_HOST, &sp, tab);
			if (r) {
				fprintf(stderr, "steady: select: %s\n", strerror(-r));
				_exit(5);
			}
			struct kvtier_table_view v;
			kvtier_table_view(tab, &v);
			for (uint32_t row = 0; row < v.rows; row++) {
				if (v.n_pages[row] != (int)(STEADY_TOK / REL_T))
					_exit(6);
				for (int j = 0; j < v.n_pages[row]; j++) {
					int32_t sl = v.slots[row * v.stride + j];
					const float *pg = rel_slot_page(&mem, sl);
					if (!pg || !rel_page_ok(pg, STEADY_SALT, l, row, (uint32_t)v.pages[row * v.stride + j])) {
						fprintf(stderr, "steady: wrong KV in slot %d\n", sl);
						_exit(7);
					}
				}
			}
			if (kvtier_attend(c, tab, q[l], out, NULL, 0.125f, KVT_MEM_HOST) ||
			    memcmp(out, ref[l], sizeof(out))) {
				fprintf(stderr, "steady: attention changed at step %lu\n", steps);
				_exit(8);
			}
		}
		steps++;
	}
	printf("rel: steady client: %lu steps, every one bit-identical to the first\n", steps);
	fflush(stdout);
	kvtier_table_destroy(tab);
	kvtier_detach(c);
	_exit(0);
}

static void steady_start(struct steady *s)
{
	assert_int_equal(pipe(s->stop), 0);
	assert_int_equal(pipe(s->ready), 0);
	s->pid = fork();
	assert_true(s->pid >= 0);
	if (s->pid == 0)
		steady_main(s);
	close(s->stop[0]);
	close(s->ready[1]);
	char x;
	assert_int_equal(read(s->ready[0], &x, 1), 1);
	close(s->ready[0]);
}

static void steady_stop(struct steady *s)
{
	assert_int_equal(write(s->stop[1], "s", 1), 1);
	close(s->stop[1]);
	int st;
	assert_int_equal(waitpid(s->pid, &st, 0), s->pid);
	assert_true(WIFEXITED(st));
	assert_int_equal(WEXITSTATUS(st), 0);
}

/* Waits until the daemon holds no client, sequence or page; 0 or -1 after 10 s. */
static int drained(struct kvt_wire_stats *w)
{
	double t0 = rel_now();
	do {
		if (rel_stats(dmn.sock, w) == 0 && !w->clients && !w->seqs && !w->pages &&
		    !w->tier_used[0] && !w->tier_used[1] && !w->tier_used[2])
			return 0;
		usleep(5000);
	} while (rel_now() - t0 < 10);
	return -1;
}

/* The daemon's resources once closing connections are done with: /proc sampled until
 * its fd count holds for 200 ms (3 s at most). */
static void settled(struct rel_proc *p)
{
	long last = -1;
	double t0 = rel_now(), since = t0;
	for (;;) {
		assert_int_equal(rel_proc(dmn.pid, p), 0);
		if (p->fds != last) {
			last = p->fds;
			since = rel_now();
		}
		if (rel_now() - since > 0.2 || rel_now() - t0 > 3)
			return;
		usleep(10000);
	}
}

/* Tenants keep their arenas (and fds) for the daemon's life: make them first. */
static void make_tenants(const char *const *names, unsigned n)
{
	for (unsigned i = 0; i < n; i++) {
		struct kvtier_client *c = rel_attach(&dmn, names[i], 0);
		assert_non_null(c);
		kvtier_detach(c);
	}
}

/* ---- 1. clients killed at random points of a step ---- */

/* A client that does everything a client does, forever: appends, selects (host reads
 * or not, substitution or not), attends, forks, closes. */
static void victim_main(uint32_t salt)
{
	struct kvtier_client *c = rel_attach(&dmn, (salt & 1) ? "victims" : NULL,
					     (salt & 2) ? KVTIER_ATTACH_NO_HOST_READS : 0);
	if (!c)
		_exit(2);
	uint32_t ids[4], ntok[4] = {0}, n = 0;
	struct kvtier_table *tab = kvtier_table_create(c, 4);
	float q[4 * QN], out[4 * QN];
	for (uint32_t step = 0;; step++) {
		if (n < 2 || (n < 4 && step % 7 == 3)) {
			if (kvtier_seq_create(c, &ids[n]) == 0)
				ntok[n++] = 0;
		}
		for (uint32_t i = 0; i < n; i++) {
			uint32_t add = step == 0 ? 100 + salt % 200 : 1 + step % 5;
			if (rel_append(c, ids[i], salt + i, ntok[i], add) == 0)
				ntok[i] += add;
		}
		if (step % 11 == 5 && n < 4 && ntok[0] >= REL_T &&
		    kvtier_seq_fork(c, ids[0], ntok[0] / 2, &ids[n]) == 0)
			ntok[n++] = ntok[0] / 2; /* the forked tail is re-appended with salt + n */
		if (step % 13 == 12 && n > 1) {
			kvtier_seq_close(c, ids[n - 1]);
			n--;
		}
		struct kvtier_select_params sp = {.budget_pages = 4 + step % 8, .sink_tokens = REL_T,
						  .window_tokens = REL_T,
						  .flags = (step & 4) ? KVTIER_SEL_SUBSTITUTE : 0};
		for (uint32_t l = 0; l < REL_LAYERS; l++) {
			for (uint32_t i = 0; i < n; i++)
				rel_query(salt + i, step, l, q + i * QN);
			if (kvtier_select(c, ids, n, l, q, KVT_MEM_HOST, &sp, tab) == 0)
				kvtier_attend(c, tab, q, out, NULL, 0.125f, KVT_MEM_HOST);
		}
	}
}

static void client_kill9(void **state)
{
	const unsigned kills = rel_scale(120, 1000);
	struct kvt_wire_stats w;
	struct rel_proc p0, p1, p2;
	make_tenants((const char *const[]){"victims", NULL, "steady"}, 3);
	assert_int_equal(drained(&w), 0);
	settled(&p0);
	struct steady s;
	steady_start(&s);
	/* Victims run four at a time; each is killed 0 to 40 ms after it started (before
	 * HELLO, mid-prefill, mid-select, mid-fork ...). */
	pid_t v[4] = {0};
	unsigned done = 0, started = 0;
	double t0 = rel_now();
	while (done < kills) {
		for (int i = 0; i < 4; i++) {
			if (v[i] > 0) {
				kill(v[i], SIGKILL);
				waitpid(v[i], NULL, 0);
				v[i] = 0;
				if (++done == 20) /* the warm-up: arenas made, allocator settled */
					assert_int_equal(rel_proc(dmn.pid, &p1), 0);
			}
			if (started < kills) {
				uint32_t salt = 2000 + started++;
				v[i] = fork();
				assert_true(v[i] >= 0);
				if (v[i] == 0)
					victim_main(salt);
			}
		}
		usleep((useconds_t)(rel_rand() % 40000));
	}
	double took = rel_now() - t0;
	assert_true(rel_daemon_alive(&dmn));
	steady_stop(&s);
	int dr = drained(&w);
	settled(&p2);
	printf("rel: client-kill9: %u clients killed at random points (0-40 ms into their run) "
	       "in %.1f s beside a steady client\n", kills, took);
	printf("rel: client-kill9: after: clients %llu seqs %llu pages %llu slots used gpu %llu "
	       "host %llu nvme %llu; disconnects %llu\n",
	       (unsigned long long)w.clients, (unsigned long long)w.seqs,
	       (unsigned long long)w.pages, (unsigned long long)w.tier_used[0],
	       (unsigned long long)w.tier_used[1], (unsigned long long)w.tier_used[2],
	       (unsigned long long)w.disconnects);
	printf("rel: client-kill9: daemon fds %ld -> %ld, RSS %ld KiB (after 20) -> %ld KiB, "
	       "pinned %ld -> %ld KiB, locked %ld -> %ld KiB\n",
	       p0.fds, p2.fds, p1.rss_kb, p2.rss_kb, p1.pin_kb, p2.pin_kb, p1.lck_kb, p2.lck_kb);
	fflush(stdout);
	assert_int_equal(dr, 0);
	assert_int_equal(p2.fds, p0.fds);
	assert_true(p2.pin_kb <= p1.pin_kb && p2.lck_kb <= p1.lck_kb);
	assert_true(!rss_counts() || p2.rss_kb - p1.rss_kb < 16 * 1024);
}

/* ---- 7. attach/detach churn ---- */

static void churn(void **state)
{
	const unsigned n = rel_scale(200, 1000), workers = 4;
	struct kvt_wire_stats w;
	struct rel_proc p0, p1, p2;
	/* one warm-up client per tenant first */
	make_tenants((const char *const[]){"churn"}, 1);
	assert_int_equal(drained(&w), 0);
	settled(&p0);
	uint64_t acc0 = w.accepted;
	double t0 = rel_now();
	pid_t pids[4];
	for (unsigned k = 0; k < workers; k++) {
		pids[k] = fork();
		assert_true(pids[k] >= 0);
		if (pids[k])
			continue;
		for (unsigned i = 0; i < n / workers; i++) {
			struct kvtier_client *cc = rel_attach(&dmn, "churn", 0);
			uint32_t id;
			float q[QN], out[QN];
			struct kvtier_select_params sp = {.budget_pages = 4, .sink_tokens = REL_T,
							  .window_tokens = REL_T};
			if (!cc || kvtier_seq_create(cc, &id) || rel_append(cc, id, 5000 + i, 0, 40))
				_exit(2);
			struct kvtier_table *tab = kvtier_table_create(cc, 1);
			rel_query(5000 + i, 0, 0, q);
			if (!tab || kvtier_select(cc, &id, 1, 0, q, KVT_MEM_HOST, &sp, tab) ||
			    kvtier_attend(cc, tab, q, out, NULL, 0.125f, KVT_MEM_HOST))
				_exit(3);
			kvtier_table_destroy(tab);
			kvtier_detach(cc);
		}
		_exit(0);
	}
	bool mid = false;
	for (unsigned k = 0; k < workers; k++) {
		int st;
		assert_int_equal(waitpid(pids[k], &st, 0), pids[k]);
		assert_true(WIFEXITED(st));
		assert_int_equal(WEXITSTATUS(st), 0);
		if (!mid) {
			mid = true;
			assert_int_equal(rel_proc(dmn.pid, &p1), 0);
		}
	}
	double took = rel_now() - t0;
	int dr = drained(&w);
	settled(&p2);
	printf("rel: churn: %llu clients attached, appended, selected, attended and detached "
	       "(%u at a time) in %.1f s\n", (unsigned long long)(w.accepted - acc0), workers, took);
	printf("rel: churn: daemon fds %ld -> %ld -> %ld, RSS %ld -> %ld -> %ld KiB, pinned %ld "
	       "-> %ld KiB, locked %ld -> %ld KiB\n", p0.fds, p1.fds, p2.fds, p0.rss_kb, p1.rss_kb,
	       p2.rss_kb, p0.pin_kb, p2.pin_kb, p0.lck_kb, p2.lck_kb);
	fflush(stdout);
	assert_int_equal(dr, 0);
	assert_true(w.accepted - acc0 >= n / workers * workers);
	assert_int_equal(p2.fds, p0.fds);
	assert_int_equal(p2.pin_kb, p0.pin_kb);
	assert_int_equal(p2.lck_kb, p0.lck_kb);
	assert_true(!rss_counts() || p2.rss_kb - p0.rss_kb < 16 * 1024);
}

/* ---- 6. a malicious client ---- */

/* Submits n requests and waits up to 2 s for n completions: their count. */
static unsigned raw_run(struct rel_raw *r, const struct kvt_sqe *e, unsigned n, int32_t *res)
{
	struct kvt_ring_hdr *h = (struct kvt_ring_hdr *)r->ring;
	struct kvt_sqe *sq = (struct kvt_sqe *)(r->ring + h->sqe_off);
	struct kvt_cqe *cq = (struct kvt_cqe *)(r->ring + h->cqe_off);
	uint32_t tail = h->sq_tail;
	for (unsigned i = 0; i < n; i++)
		sq[(tail + i) & (h->sq_entries - 1)] = e[i];
	kvt_store_release(&h->sq_tail, tail + n);
	uint64_t one = 1;
	if (write(r->fds[KVT_FD_REQ], &one, 8) != 8)
		return 0;
	unsigned got = 0;
	for (double t0 = rel_now(); got < n && rel_now() - t0 < 2;) {
		uint32_t head = h->cq_head;
		if (kvt_load_acquire(&h->cq_tail) == head) {
			usleep(200);
			continue;
		}
		res[got++] = cq[head & (h->cq_entries - 1)].res;
		kvt_store_release(&h->cq_head, head + 1);
	}
	return got;
}

/* Whether any page-sized run of a region holds K of salt (channel 0 is the salt). */
static bool holds_salt(const uint8_t *base, uint64_t len, uint32_t salt)
{
	const float want = (float)salt;
	for (uint64_t off = 0; off + REL_PB <= len; off += 256) {
		const float *f = (const float *)(base + off);
		unsigned t = 0;
		while (t < REL_T && f[t * REL_D] == want)
			t++;
		if (t == REL_T)
			return true;
	}
	return false;
}

static void malicious(void **state)
{
	struct kvt_wire_stats w;
	struct rel_proc p0, p1;
	struct steady s;
	steady_start(&s); /* tenant "steady": its pages are the ones to steal */
	assert_int_equal(rel_proc(dmn.pid, &p0), 0);
	struct rel_raw r;
	assert_int_equal(rel_raw_attach(&r, dmn.sock, KVT_WIRE_VERSION, REL_D, "mallory"), 0);
	unsigned rejected = 0, tried = 0;

	/* (a) forged ids: every sequence op on ids it never created */
	uint32_t forged[] = {0, 1, 2, 7, 63, 64, 1u << 20, 0xfffffffe};
	uint8_t ops[] = {KVT_OP_SEQ_CLOSE, KVT_OP_SEQ_INFO, KVT_OP_SEQ_FORK, KVT_OP_STATS};
	for (unsigned i = 0; i < sizeof(forged) / 4; i++)
		for (unsigned o = 0; o < sizeof(ops); o++) {
			struct kvt_sqe e = {.op = ops[o], .seq = forged[i], .user_data = i, .ntok = 1,
					    .off = {0}};
			int32_t res;
			tried++;
			if (raw_run(&r, &e, 1, &res) == 1 && res < 0) {
				rejected++;
				continue;
			}
			/* no answer: it hung up on us, which is a rejection too */
			assert_true(rel_daemon_alive(&dmn));
			rel_raw_close(&r);
			assert_int_equal(rel_raw_attach(&r, dmn.sock, KVT_WIRE_VERSION, REL_D, "mallory"), 0);
			rejected++;
		}
	printf("rel: malicious: forged sequence ids: %u of %u requests rejected\n", rejected, tried);
	assert_int_equal(rejected, tried);

	/* (b) another tenant's pages: none in what this tenant can map */
	uint8_t *pool = mmap(NULL, r.w.pool_bytes, PROT_READ, MAP_SHARED, r.fds[KVT_FD_POOL], 0);
	uint8_t *host = mmap(NULL, r.w.host_bytes, PROT_READ, MAP_SHARED, r.fds[KVT_FD_HOST], 0);
	assert_ptr_not_equal(pool, MAP_FAILED);
	assert_ptr_not_equal(host, MAP_FAILED);
	bool leak = holds_salt(pool, r.w.pool_bytes, STEADY_SALT) ||
		    holds_salt(host, r.w.host_bytes, STEADY_SALT);
	printf("rel: malicious: another tenant's KV in this tenant's GPU pool (%llu KiB) or host "
	       "arena (%llu KiB): %s\n", (unsigned long long)(r.w.pool_bytes >> 10),
	       (unsigned long long)(r.w.host_bytes >> 10), leak ? "FOUND" : "none");
	assert_false(leak);

	/* (c) the shared memfds: sealed against shrink and grow; pool and arena read-only */
	int shrink_ok = 0, write_ok = 0;
	for (int f = 0; f < KVT_FD_MAX; f++) {
		if (f == KVT_FD_REQ || f == KVT_FD_CMP || f == KVT_FD_FAST)
			continue; /* eventfds; the fast path's region is not asked for here */
		struct stat st;
		assert_int_equal(fstat(r.fds[f], &st), 0);
		shrink_ok += ftruncate(r.fds[f], 0) == 0;
		shrink_ok += ftruncate(r.fds[f], st.st_size + 4096) == 0;
		if (f == KVT_FD_RING)
			continue;
		void *m = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, r.fds[f], 0);
		write_ok += m != MAP_FAILED;
		if (m != MAP_FAILED)
			munmap(m, 4096);
		write_ok += pwrite(r.fds[f], "x", 1, 0) == 1;
		write_ok += mprotect(f == KVT_FD_POOL ? pool : host, 4096, PROT_READ | PROT_WRITE) == 0;
	}
	printf("rel: malicious: shrink/grow of ring, pool and arena memfds: %d succeeded; "
	       "writes to pool and arena: %d succeeded\n", shrink_ok, write_ok);
	assert_int_equal(shrink_ok, 0);
	assert_int_equal(write_ok, 0);
	munmap(pool, r.w.pool_bytes);
	munmap(host, r.w.host_bytes);

	/* (d) flooding: the ring filled again and again without reading completions, then
	 * a storm of wake-ups */
	struct kvt_ring_hdr *h = (struct kvt_ring_hdr *)r.ring;
	struct kvt_sqe *sq = (struct kvt_sqe *)(r.ring + h->sqe_off);
	for (int round = 0; round < 200; round++) {
		uint32_t tail = h->sq_tail;
		for (uint32_t i = 0; i < h->sq_entries; i++)
			sq[(tail + i) & (h->sq_entries - 1)] = (struct kvt_sqe){.op = KVT_OP_NOP};
		kvt_store_release(&h->sq_tail, tail + h->sq_entries);
		uint64_t one = 1;
		for (int k = 0; k < 50; k++)
			if (write(r.fds[KVT_FD_REQ], &one, 8) != 8)
				break;
		usleep(500);
	}
	assert_true(rel_daemon_alive(&dmn));
	assert_int_equal(rel_stats(dmn.sock, &w), 0);
	assert_int_equal(rel_proc(dmn.pid, &p1), 0);
	uint32_t answered = kvt_load_acquire(&h->cq_tail) - h->cq_head;
	printf("rel: malicious: ring flood: 200 rounds of %u requests and 10000 wake-ups; the "
	       "daemon answered %u (the completion ring's size) and waits; RSS %ld -> %ld KiB\n",
	       h->sq_entries, answered, p0.rss_kb, p1.rss_kb);
	assert_true(answered <= h->cq_entries);
	rel_raw_close(&r);
	/* the steady client ran bit-identical throughout (checked in its process) */
	steady_stop(&s);
	assert_int_equal(drained(&w), 0);
	assert_true(!rss_counts() || p1.rss_kb - p0.rss_kb < 16 * 1024);
}

static int setup(void **state)
{
	return rel_daemon_start(&dmn, NULL, false);
}

static int teardown(void **state)
{
	int r = rel_daemon_stop(&dmn);
	rel_daemon_cleanup(&dmn);
	return r;
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(malicious),
		cmocka_unit_test(client_kill9),
		cmocka_unit_test(churn),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}
