// SPDX-License-Identifier: MIT
/*
 * Integration: the real kvtierd on a temporary socket and store, real client
 * processes over libkvtier, KV larger than the GPU pool and the host tier together
 * (so pages live on disk), attention checked against a dense reference computed
 * here; several clients, kill -9 of a client, malformed messages, a refused uid.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "helpers.h"
#include "reliability/harness.h"
#include "ipc/kvtier.h"
#include "ipc/wire.h"

/* The model: small enough to check by hand, f32 so the reference is tight. */
#define LAYERS 2
#define HEADS  2
#define GROUP  2
#define D      64
#define T      16
#define PB     (2 * T * D * 4) /* 8 KiB */
#define PREFILL 1024           /* 64 pages per (layer, head): 256 pages, 2 MiB */

static char sock_path[108];
static bool in_child; /* a forked client: a failed check exits instead of longjmp'ing */

#define check_eq(a, b) check((long long)(a) == (long long)(b))
#define check(c)                                                                               \
	do {                                                                                   \
		if (!(c)) {                                                                    \
			if (in_child) {                                                        \
				fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #c); \
				_exit(99);                                                     \
			}                                                                      \
			fail_msg("%s:%d: %s", __FILE__, __LINE__, #c);                         \
		}                                                                              \
	} while (0)
static const char *store_dir;
static pid_t daemon_pid = -1;
static const char *extra_opt; /* one more -o for the next start_daemon */

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- the data: a deterministic value for every (salt, layer, head, token, channel) ---- */

static float gen(uint32_t salt, uint32_t layer, uint32_t head, uint32_t tok, uint32_t d, int v)
{
	uint64_t x = ((uint64_t)salt * 0x9e3779b97f4a7c15ull) ^ ((uint64_t)layer << 52) ^
		     ((uint64_t)head << 44) ^ ((uint64_t)tok << 12) ^ ((uint64_t)d << 2) ^ (uint64_t)v;
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdull;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ull;
	x ^= x >> 33;
	return (float)((double)(x >> 11) / (double)(1ull << 53) * 2.0 - 1.0);
}

/* the token at position tok of a sequence: the parent's salt before the fork point */
struct seqdesc {
	uint32_t id;
	uint32_t salt, parent_salt, fork_at; /* tokens < fork_at come from parent_salt */
	uint32_t ntok;
};

static float kv_of(const struct seqdesc *s, uint32_t l, uint32_t h, uint32_t tok, uint32_t d,
		   int v)
{
	return gen(tok < s->fork_at ? s->parent_salt : s->salt, l, h, tok, d, v);
}

static void append_tokens(struct kvtier_client *c, struct seqdesc *s, uint32_t n)
{
	float *k = malloc((size_t)n * HEADS * D * 4), *v = malloc((size_t)n * HEADS * D * 4);
	for (uint32_t l = 0; l < LAYERS; l++) {
		for (uint32_t t = 0; t < n; t++)
			for (uint32_t h = 0; h < HEADS; h++)
				for (uint32_t d = 0; d < D; d++) {
					size_t i = ((size_t)t * HEADS + h) * D + d;
					k[i] = kv_of(s, l, h, s->ntok + t, d, 0);
					v[i] = kv_of(s, l, h, s->ntok + t, d, 1);
				}
		check_eq(kvtier_append(c, s->id, l, k, v, n, KVT_MEM_HOST), 0);
	}
	s->ntok += n;
	free(k);
	free(v);
}

/* Queries: noisy around a fixed direction, or (drifting) turning slowly between two. */
static bool drifting;

static void query(uint32_t salt, uint32_t step, uint32_t l, float *q)
{
	if (drifting) {
		const double a = 0.12 * step;
		for (uint32_t h = 0; h < HEADS; h++)
			for (uint32_t g = 0; g < GROUP; g++)
				for (uint32_t d = 0; d < D; d++)
					q[((size_t)h * GROUP + g) * D + d] = (float)(
						1.5 * gen(salt, l, h, 7777 + g, d, 2) +
						2.5 * (cos(a) * gen(salt, l, h, 8000, d, 4) +
						       sin(a) * gen(salt, l, h, 8001, d, 4)));
		return;
	}
	for (uint32_t h = 0; h < HEADS; h++)
		for (uint32_t g = 0; g < GROUP; g++)
			for (uint32_t d = 0; d < D; d++)
				q[((size_t)h * GROUP + g) * D + d] =
					2.0f * gen(salt, l, h, 7777 + g, d, 2) +
					0.2f * gen(salt, l, h, 9000 + step, d, 3);
}

/* Which page of (s, l, h) a pool slot holds, comparing every byte; -1 if none. */
static int page_of_slot(const struct seqdesc *s, uint32_t l, uint32_t h, const float *slot)
{
	for (uint32_t p = 0; p < s->ntok / T; p++) {
		bool ok = true;
		for (uint32_t t = 0; t < T && ok; t++)
			for (uint32_t d = 0; d < D && ok; d++)
				ok = slot[t * D + d] == kv_of(s, l, h, p * T + t, d, 0) &&
				     slot[(T + t) * D + d] == kv_of(s, l, h, p * T + t, d, 1);
		if (ok)
			return (int)p;
	}
	return -1;
}

/* A table entry's page: in the GPU pool, or read in place from the host arena. */
static const float *slot_addr(const struct kvtier_memory *m, int32_t s)
{
	const float *p = rel_slot_page(m, s);
	check(p != NULL);
	return p;
}

/* Dense attention of q over the given pages plus the tail, in double. */
static void reference(const struct seqdesc *s, uint32_t l, uint32_t h, const float *q,
		      const int *pages, int npages, float *out)
{
	uint32_t tail0 = s->ntok / T * T;
	uint32_t ntoks = (uint32_t)npages * T + (s->ntok - tail0);
	uint32_t *toks = malloc(ntoks * sizeof(uint32_t));
	uint32_t n = 0;
	for (int i = 0; i < npages; i++)
		for (uint32_t t = 0; t < T; t++)
			toks[n++] = (uint32_t)pages[i] * T + t;
	for (uint32_t t = tail0; t < s->ntok; t++)
		toks[n++] = t;
	double *lg = malloc(n * sizeof(double));
	for (uint32_t g = 0; g < GROUP; g++) {
		double m = -INFINITY, sum = 0, acc[D] = {0};
		for (uint32_t i = 0; i < n; i++) {
			double x = 0;
			for (uint32_t d = 0; d < D; d++)
				x += (double)q[g * D + d] * kv_of(s, l, h, toks[i], d, 0);
			lg[i] = x / sqrt((double)D);
			if (lg[i] > m)
				m = lg[i];
		}
		for (uint32_t i = 0; i < n; i++) {
			double p = exp(lg[i] - m);
			sum += p;
			for (uint32_t d = 0; d < D; d++)
				acc[d] += p * kv_of(s, l, h, toks[i], d, 1);
		}
		for (uint32_t d = 0; d < D; d++)
			out[g * D + d] = (float)(acc[d] / sum);
	}
	free(lg);
	free(toks);
}

static uint32_t sel_flags; /* of every select step() makes */

/*
 * One decode step for a batch: append a token to every layer, then per layer select
 * and attend, and check every row: each selected slot holds a page of that row (byte
 * for byte), sinks and window are in, at most the budget, output = reference over the
 * selected pages and the tail. Returns the pages selected in all.
 */
static unsigned step(struct kvtier_client *c, struct seqdesc *s, uint32_t n, uint32_t stepno,
		     uint32_t budget, struct kvtier_table *tab)
{
	struct kvtier_memory mem;
	kvtier_memory(c, &mem);
	unsigned total = 0;
	for (uint32_t b = 0; b < n; b++)
		append_tokens(c, &s[b], 1);
	uint32_t ids[8];
	for (uint32_t b = 0; b < n; b++)
		ids[b] = s[b].id;
	const size_t qn = (size_t)HEADS * GROUP * D;
	float *q = malloc(n * qn * 4), *out = malloc(n * qn * 4), ref[GROUP * D];
	struct kvtier_select_params sp = {.budget_pages = budget, .sink_tokens = T,
					  .window_tokens = 2 * T, .flags = sel_flags};
	for (uint32_t l = 0; l < LAYERS; l++) {
		for (uint32_t b = 0; b < n; b++)
			query(s[b].salt, stepno, l, q + b * qn);
		check_eq(kvtier_select(c, ids, n, l, q, KVT_MEM_HOST, &sp, tab), 0);
		check_eq(kvtier_attend(c, tab, q, out, NULL, 1.0f / sqrtf(D), KVT_MEM_HOST), 0);
		struct kvtier_table_view v;
		kvtier_table_view(tab, &v);
		check_eq(v.rows, n * HEADS);
		for (uint32_t r = 0; r < v.rows; r++) {
			const struct seqdesc *sq = &s[r / HEADS];
			uint32_t h = r % HEADS, full = sq->ntok / T;
			int pages[512], np = v.n_pages[r];
			check(np <= (int)(budget < full ? budget : full));
			check_eq(v.tail_len[r], (int)(sq->ntok % T));
			bool sink = false;
			for (int j = 0; j < np; j++) {
				const float *slot = slot_addr(&mem, v.slots[r * v.stride + j]);
				pages[j] = page_of_slot(sq, l, h, slot);
				check(pages[j] >= 0);
				check_eq(v.pages[r * v.stride + j], pages[j]); /* what the view says */
				if (j)
					check(pages[j] > pages[j - 1]);
				sink |= pages[j] == 0;
			}
			check(sink);
			check_eq(pages[np - 1], (int)full - 1); /* the window */
			reference(sq, l, h, q + (size_t)r * GROUP * D, pages, np, ref);
			for (uint32_t i = 0; i < GROUP * D; i++)
				check(fabsf(out[(size_t)r * GROUP * D + i] - ref[i]) <= 2e-5f);
			total += (unsigned)np;
		}
	}
	free(q);
	free(out);
	return total;
}

/* ---- the daemon ---- */

/* The harness's raw access (tests/reliability/harness.c), on this test's socket. */
static int connect_raw(void)
{
	return rel_connect(sock_path);
}

static int stats(struct kvt_wire_stats *w)
{
	return rel_stats(sock_path, w);
}

/* A control command (words, each NUL-ended); its last answer piece's status. The
 * answer's first bytes go to out (NUL-ended) when out is not NULL. */
static int ctl_cmd_out(const char *words, size_t len, char *out, size_t outlen)
{
	return rel_ctl(sock_path, words, len, out, outlen);
}

#define CTL(s) ctl_cmd_out(s, sizeof(s) - 1, NULL, 0)

/* Every test starts with the default queries and select flags, whatever the last one
 * left behind when it failed. */
static int reset_globals(void **state)
{
	drifting = false;
	sel_flags = 0;
	return 0;
}

static int start_daemon(void **state)
{
	static char dir[64];
	strcpy(dir, "/tmp/kvtd-XXXXXX"); /* again for each start (test_copy_order) */
	if (!mkdtemp(dir))
		return -1;
	chmod(dir, 0755);
	snprintf(sock_path, sizeof(sock_path), "%s/kvtierd.sock", dir);
	store_dir = strdup(t_dir("daemon"));
	const char *bin = getenv("KVT_DAEMON");
	daemon_pid = fork();
	if (daemon_pid == 0) {
		char sd[512];
		snprintf(sd, sizeof(sd), "store.state_dir=%s", store_dir);
		char sk[200];
		snprintf(sk, sizeof(sk), "ipc.socket=%s", sock_path);
		/* GPU pool 128 pages, host 256: two sequences of 256 pages each spill to disk */
		const char *argv[] = {"kvtierd", "-o", sk, "-o", sd, "-o", "store.device=cpu", "-o",
				      "store.page_bytes=8K", "-o", "store.nvme_bytes=64M", "-o",
				      "tenant.gpu_bytes=1M", "-o", "tenant.host_bytes=2M", "-o",
				      "ipc.socket_mode=0666", "-o", "ipc.data_bytes=1M", "-o",
				      "daemon.promote_timeout_ms=3000", "-o", "fast.threads=3",
				      extra_opt ? "-o" : NULL, extra_opt, NULL};
		execv(bin, (char *const *)argv);
		_exit(127);
	}
	for (int i = 0; i < 500; i++) {
		struct kvt_wire_stats w;
		if (stats(&w) == 0)
			return 0;
		if (waitpid(daemon_pid, NULL, WNOHANG) == daemon_pid)
			return -1;
		usleep(10000);
	}
	return -1;
}

static int stop_daemon(void **state)
{
	int st = 0;
	if (daemon_pid > 0) {
		kill(daemon_pid, SIGTERM);
		waitpid(daemon_pid, &st, 0);
		daemon_pid = -1;
	}
	unlink(sock_path);
	if (store_dir)
		t_rmdir(store_dir);
	free((void *)store_dir); /* made again by the next start (test_copy_order) */
	store_dir = NULL;
	/* SIGTERM: a clean exit 0 */
	return WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : -1;
}

static void daemon_alive(void)
{
	struct kvt_wire_stats w;
	assert_int_equal(stats(&w), 0);
	assert_int_equal(waitpid(daemon_pid, NULL, WNOHANG), 0);
}

static struct kvtier_client *attach_flags(const char *tenant, uint32_t flags)
{
	struct kvtier_layout lay = {LAYERS, HEADS, GROUP, D, KVTIER_F32, T, 0, 2};
	struct kvtier_attach_opts o = {.socket = sock_path, .tenant = tenant, .max_live_seqs = 8,
				       .flags = flags};
	struct kvtier_client *c = NULL;
	int ret = kvtier_attach(&lay, &o, &c);
	if (ret < 0)
		fprintf(stderr, "attach: %s\n", strerror(-ret));
	return c;
}

/* A fast-path client: max_seqs sequences of up to max_context tokens (ring: 0 default). */
static struct kvtier_client *attach_fast(uint32_t max_seqs, uint32_t max_context, uint32_t ring)
{
	struct kvtier_layout lay = {LAYERS, HEADS, GROUP, D, KVTIER_F32, T, 0, 2};
	struct kvtier_attach_opts o = {.socket = sock_path, .max_live_seqs = max_seqs,
				       .ring_entries = ring, .max_context = max_context};
	struct kvtier_client *c = NULL;
	assert_int_equal(kvtier_attach(&lay, &o, &c), 0);
	return c;
}

static struct kvtier_client *attach(const char *tenant)
{
	return attach_flags(tenant, 0);
}

/* ---- tests ---- */

static void test_decode_offloaded(void **state)
{
	struct kvtier_client *c = attach(NULL);
	assert_non_null(c);
	assert_string_equal(kvtier_backend(c), "cpu");
	struct seqdesc s[2] = {{.salt = 11, .fork_at = 0}, {.salt = 12, .fork_at = 0}};
	for (int i = 0; i < 2; i++) {
		assert_int_equal(kvtier_seq_create(c, &s[i].id), 0);
		append_tokens(c, &s[i], PREFILL);
	}
	struct kvt_wire_stats w;
	assert_int_equal(stats(&w), 0);
	/* more pages than GPU pool and host tier hold together: the rest only on disk */
	assert_true(w.pages == 2 * LAYERS * HEADS * (PREFILL / T));
	assert_true(w.pages > w.tier_slots[0] + w.tier_slots[1]);
	struct kvtier_table *tab = kvtier_table_create(c, 2);
	assert_non_null(tab);
	/* budget 8 pages of 64: the batch of two, 24 steps, slowly drifting queries */
	for (uint32_t t = 0; t < 24; t++)
		assert_true(step(c, s, 2, t, 8, tab) > 0);
	/* each sequence alone, a larger budget (pins last until the next select of a
	 * layer: the pool holds 128 pages) */
	for (uint32_t t = 0; t < 2; t++)
		step(c, &s[t], 1, 100 + t, 12, tab);
	uint32_t n;
	assert_int_equal(kvtier_seq_tokens(c, s[0].id, 1, &n), 0);
	assert_int_equal(n, PREFILL + 25);
	kvtier_table_destroy(tab);
	for (int i = 0; i < 2; i++)
		assert_int_equal(kvtier_seq_close(c, s[i].id), 0);
	assert_int_equal(kvtier_seq_close(c, s[0].id), -ENOENT);
	kvtier_detach(c);
}

/*
 * The prefetcher: one sequence whose KV is four times the GPU pool and three times
 * the host tier, decoded with queries that drift slowly. Every step's output must equal
 * the reference over its pages (step() checks each page byte for byte, wherever it is
 * read from), and after a warm-up, most selected pages must already be on the GPU when
 * the step asks for them.
 */
#define PF_PREFILL 2048 /* 128 pages per (layer, head): 512 pages, 4 MiB */
/* the hit rate this loop must reach: it measures 0.99 (0.94 with no prefetch margin) */
#define PF_FLOOR 0.95

static void test_prefetch(void **state)
{
	struct kvtier_client *c = attach(NULL);
	assert_non_null(c);
	struct kvtier_memory mem;
	kvtier_memory(c, &mem);
	assert_non_null(mem.host_pool); /* the cpu device reads the host arena in place */
	struct seqdesc s = {.salt = 21};
	assert_int_equal(kvtier_seq_create(c, &s.id), 0);
	append_tokens(c, &s, PF_PREFILL);
	struct kvt_wire_stats w;
	assert_int_equal(stats(&w), 0);
	const uint64_t kv = (uint64_t)LAYERS * HEADS * (PF_PREFILL / T);
	assert_true(kv >= 4 * w.tier_slots[0] && kv >= 2 * w.tier_slots[1]);
	struct kvtier_table *tab = kvtier_table_create(c, 1);
	assert_non_null(tab);
	drifting = true;
	for (uint32_t t = 0; t < 8; t++) /* warm-up: the first steps find nothing prefetched */
		step(c, &s, 1, t, 8, tab);
	struct kvtier_prefetch_stats a, b, cl;
	assert_int_equal(kvtier_stats(c, s.id, &a), 0);
	unsigned last = 0;
	for (uint32_t t = 8; t < 72; t++)
		last = step(c, &s, 1, t, 8, tab);
	assert_int_equal(kvtier_stats(c, s.id, &b), 0);
	/* pins kept from step to step, and let go: exactly the last selection's pages are
	 * pinned (one per page: rows and layers are different pages) */
	char js[8192];
	js[0] = 0;
	assert_int_equal(ctl_cmd_out("seqs\0", 5, js, sizeof(js)), 0);
	const char *pp = strstr(js, "\"pages_pinned\":");
	assert_non_null(pp);
	print_message("pinned after 64 steps: %llu, the last step selected %u\n",
		      strtoull(pp + 15, NULL, 10), last);
	assert_int_equal(strtoull(pp + 15, NULL, 10), last);
	const double sel = (double)(b.selected - a.selected);
	const double hit = (double)(b.hit - a.hit) / sel;
	print_message("prefetch: %.0f pages selected in 64 steps: hit %.3f, late %.3f, host %.3f, "
		      "disk %.3f; prefetched %llu to the GPU, %llu to host, used %llu, wasted %llu, "
		      "refused %llu\n",
		      sel, hit, (double)(b.late - a.late) / sel, (double)(b.host - a.host) / sel,
		      (double)(b.disk - a.disk) / sel, (unsigned long long)(b.prefetch_gpu - a.prefetch_gpu),
		      (unsigned long long)(b.prefetch_host - a.prefetch_host),
		      (unsigned long long)(b.prefetch_used - a.prefetch_used),
		      (unsigned long long)(b.prefetch_wasted - a.prefetch_wasted),
		      (unsigned long long)(b.prefetch_refused - a.prefetch_refused));
	assert_true(hit >= PF_FLOOR);
	assert_true(b.steps - a.steps == 64 * LAYERS);
	assert_true(b.hit + b.late + b.host + b.disk + b.fetched == b.selected);
	assert_true(b.prefetch_gpu > a.prefetch_gpu && b.prefetch_used > a.prefetch_used);
	/* the client's counters hold the sequence's, plus latencies and bytes */
	assert_int_equal(kvtier_stats(c, UINT32_MAX, &cl), 0);
	assert_true(cl.selected == b.selected && cl.hit == b.hit);
	uint64_t nlat = 0;
	for (int i = 0; i < KVTIER_LAT_BUCKETS; i++)
		nlat += cl.lat_gpu[i];
	assert_true(nlat > 0 && cl.bytes_h2d == nlat * PB);
	assert_int_equal(kvtier_stats(c, 77, &cl), -ENOENT);
	/* a jump to another topic finds pages only on disk: substituted, never waited for */
	sel_flags = KVTIER_SEL_SUBSTITUTE;
	drifting = false;
	step(c, &s, 1, 500, 8, tab);
	assert_int_equal(kvtier_stats(c, s.id, &a), 0);
	print_message("substitution: %llu pages\n", (unsigned long long)(a.substituted - b.substituted));
	assert_true(a.substituted > b.substituted);
	assert_true(a.disk == b.disk);
	/* with select.substitute_gap, only pages scored far below the row's best are
	 * replaced: at a gap no page is that far below, the step reads from disk instead */
	assert_int_equal(CTL("config\0set\0name=select.substitute_gap\0value=1000\0"), 0);
	step(c, &s, 1, 900, 8, tab);
	assert_int_equal(kvtier_stats(c, s.id, &b), 0);
	print_message("substitution at a 1000-nat gap: %llu pages, %llu read from disk\n",
		      (unsigned long long)(b.substituted - a.substituted),
		      (unsigned long long)(b.disk - a.disk));
	assert_true(b.substituted == a.substituted && b.disk > a.disk);
	assert_int_equal(CTL("config\0set\0name=select.substitute_gap\0value=0\0"), 0);
	assert_int_equal(CTL("config\0set\0name=select.substitute_gap\0value=x\0"), -EINVAL);
	sel_flags = 0;
	/* the daemon's counters include this client's */
	assert_int_equal(stats(&w), 0);
	assert_true(w.pf.selected >= a.selected && w.pf.prefetch_gpu >= a.prefetch_gpu);
	kvtier_table_destroy(tab);
	assert_true(w.pages > 0);
	assert_int_equal(kvtier_seq_close(c, s.id), 0);
	/* every pin the selects kept from step to step was let go: the sequence's pages
	 * are all freed, in every tier (a pinned page would keep its slots) */
	for (int i = 0; i < 200 && stats(&w) == 0 &&
			w.pages + w.tier_used[0] + w.tier_used[1] + w.tier_used[2];
	     i++)
		usleep(10000);
	assert_int_equal(stats(&w), 0);
	print_message("pages left after the close: %llu; slots in use gpu %llu host %llu nvme %llu\n",
		      (unsigned long long)w.pages, (unsigned long long)w.tier_used[0],
		      (unsigned long long)w.tier_used[1], (unsigned long long)w.tier_used[2]);
	assert_int_equal(w.pages, 0);
	for (int t = 0; t < 3; t++)
		assert_int_equal(w.tier_used[t], 0);
	kvtier_detach(c);

	/* a client that reads nothing in place: every page comes to the GPU pool first */
	c = attach_flags(NULL, KVTIER_ATTACH_NO_HOST_READS);
	assert_non_null(c);
	kvtier_memory(c, &mem);
	assert_null(mem.host_pool);
	struct seqdesc s2 = {.salt = 22};
	assert_int_equal(kvtier_seq_create(c, &s2.id), 0);
	append_tokens(c, &s2, PF_PREFILL);
	tab = kvtier_table_create(c, 1);
	for (uint32_t t = 0; t < 6; t++) /* step() fails on a host slot: there is no host pool */
		step(c, &s2, 1, t, 8, tab);
	assert_int_equal(kvtier_stats(c, s2.id, &a), 0);
	assert_true(a.host == 0 && a.fetched + a.disk > 0);
	kvtier_table_destroy(tab);
	kvtier_detach(c);
	drifting = false;
}

static void test_fork(void **state)
{
	struct kvtier_client *c = attach(NULL);
	assert_non_null(c);
	struct seqdesc p = {.salt = 21};
	assert_int_equal(kvtier_seq_create(c, &p.id), 0);
	append_tokens(c, &p, 200); /* 12 full pages + 8 tokens */
	struct kvtier_table *tab = kvtier_table_create(c, 1);
	/* forks inside a stored page, at a page boundary, and in the parent's filling page */
	uint32_t at[3] = {37, 64, 196};
	for (int i = 0; i < 3; i++) {
		struct seqdesc ch = {.salt = 30 + (uint32_t)i, .parent_salt = 21, .fork_at = at[i],
				     .ntok = at[i]};
		assert_int_equal(kvtier_seq_fork(c, p.id, at[i], &ch.id), 0);
		append_tokens(c, &ch, 40);
		step(c, &ch, 1, 5, 4096, tab); /* every page: the dense reference */
		step(c, &ch, 1, 6, 3, tab);
		assert_int_equal(kvtier_seq_close(c, ch.id), 0);
	}
	uint32_t bad;
	assert_int_equal(kvtier_seq_fork(c, p.id, 999, &bad), -ERANGE);
	/* the parent closes first; a fork still reads its pages */
	struct seqdesc ch = {.salt = 40, .parent_salt = 21, .fork_at = 100, .ntok = 100};
	assert_int_equal(kvtier_seq_fork(c, p.id, 100, &ch.id), 0);
	assert_int_equal(kvtier_seq_close(c, p.id), 0);
	p.ntok = 0;
	step(c, &ch, 1, 7, 4096, tab);
	assert_int_equal(kvtier_seq_close(c, ch.id), 0);
	kvtier_table_destroy(tab);
	kvtier_detach(c);
	struct kvt_wire_stats w;
	assert_int_equal(stats(&w), 0);
	assert_int_equal(w.seqs, 0);
}

static int client_loop(uint32_t salt, const char *tenant)
{
	struct kvtier_client *c = attach(tenant);
	if (!c)
		return 2;
	struct seqdesc s = {.salt = salt};
	if (kvtier_seq_create(c, &s.id) < 0)
		return 3;
	append_tokens(c, &s, 300);
	struct kvtier_table *tab = kvtier_table_create(c, 1);
	for (uint32_t t = 0; t < 10; t++)
		step(c, &s, 1, t, 6, tab);
	kvtier_table_destroy(tab);
	kvtier_seq_close(c, s.id);
	kvtier_detach(c);
	return 0;
}

static void test_many_clients(void **state)
{
	pid_t pids[4];
	for (int i = 0; i < 4; i++) {
		pids[i] = fork();
		if (pids[i] == 0 && (in_child = true))
			_exit(client_loop(50 + (uint32_t)i, i % 2 ? "other" : NULL));
	}
	for (int i = 0; i < 4; i++) {
		int st;
		assert_int_equal(waitpid(pids[i], &st, 0), pids[i]);
		assert_true(WIFEXITED(st));
		assert_int_equal(WEXITSTATUS(st), 0);
	}
	daemon_alive();
}

/*
 * The client's reads: pins a select (or a close) lets go of while the client still
 * reads their pages are kept until the reads end. Sequence A's pages are selected
 * into half the GPU pool; with reads held, A is closed and B then C each select as
 * many pages again, more than the pool holds beside A's: C's select must wait, A's
 * slots must still hold A's pages byte for byte, and once the reads are released C's
 * select completes and is right. Without the deferral, C's pages would take A's slots.
 */
struct sel_job {
	struct kvtier_client *c;
	struct seqdesc *s;
	struct kvtier_table *tab;
	uint32_t budget;
	int ret;
	bool done;
};

static void *select_job(void *arg)
{
	struct sel_job *j = arg;
	float q[HEADS * GROUP * D];
	query(j->s->salt, 0, 0, q);
	struct kvtier_select_params sp = {.budget_pages = j->budget, .sink_tokens = T,
					  .window_tokens = T};
	j->ret = kvtier_select(j->c, &j->s->id, 1, 0, q, KVT_MEM_HOST, &sp, j->tab);
	__atomic_store_n(&j->done, true, __ATOMIC_RELEASE);
	return NULL;
}

/* Attention of s's layer-0 query over the table, checked against the reference. */
static void check_attend(struct kvtier_client *c, const struct seqdesc *s, struct kvtier_table *tab,
			 bool async)
{
	struct kvtier_memory mem;
	kvtier_memory(c, &mem);
	float q[HEADS * GROUP * D], out[HEADS * GROUP * D], ref[GROUP * D];
	query(s->salt, 0, 0, q);
	if (async)
		assert_int_equal(kvtier_attend_async(c, tab, q, out, NULL, 1.0f / sqrtf(D), NULL), 0);
	else
		assert_int_equal(kvtier_attend(c, tab, q, out, NULL, 1.0f / sqrtf(D), KVT_MEM_HOST), 0);
	struct kvtier_table_view v;
	kvtier_table_view(tab, &v);
	for (uint32_t r = 0; r < v.rows; r++) {
		int pages[PF_PREFILL / T];
		for (int j = 0; j < v.n_pages[r]; j++)
			assert_true((pages[j] = page_of_slot(s, 0, r, slot_addr(&mem, v.slots[r * v.stride + j]))) >= 0);
		reference(s, 0, r, q + (size_t)r * GROUP * D, pages, v.n_pages[r], ref);
		for (uint32_t i = 0; i < GROUP * D; i++)
			assert_true(fabsf(out[(size_t)r * GROUP * D + i] - ref[i]) <= 2e-5f);
	}
}

static void test_reads_held(void **state)
{
	struct kvtier_client *c = attach_flags(NULL, KVTIER_ATTACH_NO_HOST_READS);
	assert_non_null(c);
	struct kvtier_memory mem;
	kvtier_memory(c, &mem);
	/* the tenant's GPU pool: tenant.gpu_bytes=1M of 8 KiB slots (its mapping is rounded
	 * up to the device's granularity) */
	const uint32_t budget = (1u << 20) / PB / (2 * HEADS);
	struct seqdesc s[3] = {{.salt = 91}, {.salt = 92}, {.salt = 93}};
	struct kvtier_table *tab[3];
	for (int i = 0; i < 3; i++) {
		assert_int_equal(kvtier_seq_create(c, &s[i].id), 0);
		append_tokens(c, &s[i], PF_PREFILL); /* 128 full pages of each (layer, head) */
		assert_non_null(tab[i] = kvtier_table_create(c, 1));
	}
	/* A: half the pool; an async attend (at once on cpu) and a plain one */
	assert_true(budget >= 8 && budget < PF_PREFILL / T / 2);
	struct sel_job a = {c, &s[0], tab[0], budget};
	select_job(&a);
	assert_int_equal(a.ret, 0);
	check_attend(c, &s[0], tab[0], true);
	check_attend(c, &s[0], tab[0], false);
	struct kvtier_table_view va;
	kvtier_table_view(tab[0], &va);
	int32_t aslots[HEADS][PF_PREFILL / T];
	int apages[HEADS][PF_PREFILL / T];
	for (uint32_t r = 0; r < HEADS; r++)
		for (int j = 0; j < va.n_pages[r]; j++) {
			aslots[r][j] = va.slots[r * va.stride + j];
			apages[r][j] = va.pages[r * va.stride + j];
			assert_false(aslots[r][j] & KVTIER_SLOT_HOST);
		}
	const int32_t na[HEADS] = {va.n_pages[0], va.n_pages[1]};
	/* reads held: A closed, B selected (fits beside A), C selected in a thread (does not) */
	kvtier_reads_hold(c);
	assert_int_equal(kvtier_seq_close(c, s[0].id), 0);
	struct sel_job b = {c, &s[1], tab[1], budget}, cj = {c, &s[2], tab[2], budget};
	select_job(&b);
	assert_int_equal(b.ret, 0);
	pthread_t th;
	assert_int_equal(pthread_create(&th, NULL, select_job, &cj), 0);
	usleep(500 * 1000); /* C's select waits for room (or, wrongly, took A's slots) */
	bool waited = !__atomic_load_n(&cj.done, __ATOMIC_ACQUIRE);
	for (uint32_t r = 0; r < HEADS; r++)
		for (int j = 0; j < na[r]; j++)
			assert_int_equal(page_of_slot(&s[0], 0, r, slot_addr(&mem, aslots[r][j])),
					 apages[r][j]);
	assert_true(waited);
	kvtier_reads_release(c);
	assert_int_equal(pthread_join(th, NULL), 0);
	assert_int_equal(cj.ret, 0);
	check_attend(c, &s[1], tab[1], false);
	check_attend(c, &s[2], tab[2], true);
	for (int i = 0; i < 3; i++)
		kvtier_table_destroy(tab[i]);
	assert_int_equal(kvtier_seq_close(c, s[1].id), 0);
	assert_int_equal(kvtier_seq_close(c, s[2].id), 0);
	kvtier_detach(c);
	daemon_alive();
}

static void test_kill9(void **state)
{
	int pfd[2];
	assert_int_equal(pipe(pfd), 0);
	pid_t pid = fork();
	if (pid == 0) {
		in_child = true;
		close(pfd[0]);
		struct kvtier_client *c = attach(NULL);
		struct seqdesc s[2] = {{.salt = 61}, {.salt = 62}};
		for (int i = 0; i < 2; i++) {
			kvtier_seq_create(c, &s[i].id);
			append_tokens(c, &s[i], 400);
		}
		struct kvtier_table *tab = kvtier_table_create(c, 2);
		for (uint32_t t = 0;; t++) {
			step(c, s, 2, t, 8, tab);
			if (t == 2 && write(pfd[1], "x", 1) != 1)
				_exit(1);
		}
	}
	close(pfd[1]);
	char x;
	assert_int_equal(read(pfd[0], &x, 1), 1);
	close(pfd[0]);
	usleep(2000); /* somewhere in a step */
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
	double t0 = now_s();
	struct kvt_wire_stats w;
	do {
		assert_int_equal(stats(&w), 0);
	} while ((w.clients || w.seqs || w.pages) && now_s() - t0 < 2.0);
	double took = now_s() - t0;
	/* within one second, its pins released and its sequences freed */
	assert_int_equal(w.seqs, 0);
	assert_int_equal(w.pages, 0);
	assert_true(took < 1.0);
	assert_int_equal(client_loop(70, NULL), 0);
}

/* A raw handshake, so that the test can write anything into the ring. */
static int raw_attach(struct rel_raw *r, uint16_t version, uint32_t head_dim)
{
	return rel_raw_attach(r, sock_path, version, head_dim, NULL);
}

/* Submits a request (or just an index) and says whether the daemon hung up. */
static bool raw_submit_hangs_up(struct rel_raw *r, const struct kvt_sqe *e, uint32_t tail_bump)
{
	struct kvt_ring_hdr *h = (struct kvt_ring_hdr *)r->ring;
	struct kvt_sqe *sq = (struct kvt_sqe *)(r->ring + h->sqe_off);
	if (e)
		sq[h->sq_tail & (h->sq_entries - 1)] = *e;
	kvt_store_release(&h->sq_tail, h->sq_tail + tail_bump);
	uint64_t one = 1;
	if (write(r->fds[KVT_FD_REQ], &one, 8) != 8)
		return false;
	struct pollfd p = {r->sock, POLLIN | POLLRDHUP, 0};
	for (int i = 0; i < 100; i++) {
		if (poll(&p, 1, 20) == 1) {
			char b[512];
			while (recv(r->sock, b, sizeof(b), MSG_DONTWAIT) > 0)
				;
			if (recv(r->sock, b, sizeof(b), MSG_DONTWAIT) == 0)
				return true;
		}
	}
	return false;
}

/* n requests written into the ring and told once; their n completions, in order, into
 * out (2 s at most): 0, or -ETIMEDOUT. */
static int raw_calls(struct rel_raw *r, struct kvt_sqe *e, uint32_t n, struct kvt_cqe *out)
{
	struct kvt_ring_hdr *h = (struct kvt_ring_hdr *)r->ring;
	struct kvt_sqe *sq = (struct kvt_sqe *)(r->ring + h->sqe_off);
	struct kvt_cqe *cq = (struct kvt_cqe *)(r->ring + h->cqe_off);
	static uint64_t ud;
	for (uint32_t i = 0; i < n; i++) {
		e[i].user_data = ++ud;
		sq[(h->sq_tail + i) & (h->sq_entries - 1)] = e[i];
	}
	kvt_store_release(&h->sq_tail, h->sq_tail + n);
	uint64_t one = 1;
	if (write(r->fds[KVT_FD_REQ], &one, 8) != 8)
		return -errno;
	for (uint32_t i = 0; i < n; i++) {
		const double t0 = now_s();
		while (kvt_load_acquire(&h->cq_tail) == h->cq_head)
			if (now_s() - t0 > 2.0)
				return -ETIMEDOUT;
		out[i] = cq[h->cq_head & (h->cq_entries - 1)];
		kvt_store_release(&h->cq_head, h->cq_head + 1);
	}
	return 0;
}

static bool hung_up(int fd)
{
	char b[512];
	struct pollfd p = {fd, POLLIN | POLLRDHUP, 0};
	for (int i = 0; i < 100; i++) {
		if (poll(&p, 1, 20) == 1) {
			ssize_t n;
			while ((n = recv(fd, b, sizeof(b), MSG_DONTWAIT)) > 0)
				;
			if (n == 0)
				return true;
		}
	}
	return false;
}

static void test_malformed(void **state)
{
	struct rel_raw r;
	/* wrong version: an error, then the hang-up */
	assert_int_equal(raw_attach(&r, KVT_WIRE_VERSION + 1, D), -EPROTONOSUPPORT);
	assert_true(hung_up(r.sock));
	rel_raw_close(&r);
	/* a layout no kernel takes */
	assert_int_equal(raw_attach(&r, KVT_WIRE_VERSION, 0), -EINVAL);
	rel_raw_close(&r);
	/* bad magic; an oversized length; garbage bytes */
	struct kvt_msg_hdr bad[3] = {{0xdeadbeef, KVT_WIRE_VERSION, KVT_MSG_HELLO, 88, 0},
				     {KVT_WIRE_MAGIC, KVT_WIRE_VERSION, KVT_MSG_HELLO, 1u << 30, 0},
				     {KVT_WIRE_MAGIC, KVT_WIRE_VERSION, 999, 0, 0}};
	for (int i = 0; i < 3; i++) {
		int fd = connect_raw();
		assert_true(fd >= 0);
		assert_int_equal(send(fd, &bad[i], sizeof(bad[i]), MSG_NOSIGNAL), sizeof(bad[i]));
		assert_true(hung_up(fd));
		close(fd);
		daemon_alive();
	}
	/* ring abuse by an attached client */
	struct kvt_sqe cases[] = {
		{.op = KVT_OP_SELECT, .seq = 1, .layer = 0, .out_stride = 8, .off = {0, 64, 1ull << 40}},
		{.op = KVT_OP_APPEND, .seq = 1u << 30, .layer = 0, .ntok = 1},
		{.op = KVT_OP_APPEND, .seq = 0, .layer = 77, .ntok = 1},
		{.op = KVT_OP_APPEND, .flags = 0x80, .seq = 0, .layer = 0, .ntok = 1},
		/* whole pages: heads overlapping, past the data area, not a page of tokens */
		{.op = KVT_OP_APPEND, .flags = KVT_APPEND_PAGES, .seq = 0, .ntok = T, .off = {0, 64}},
		{.op = KVT_OP_APPEND, .flags = KVT_APPEND_PAGES, .seq = 0, .ntok = T,
		 .off = {1ull << 40, 1ull << 20}},
		{.op = KVT_OP_APPEND, .flags = KVT_APPEND_PAGES, .seq = 0, .ntok = 1,
		 .off = {0, 1ull << 20}},
		{.op = 200},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		assert_int_equal(raw_attach(&r, KVT_WIRE_VERSION, D), 0);
		assert_true(raw_submit_hangs_up(&r, &cases[i], 1));
		rel_raw_close(&r);
		daemon_alive();
	}
	/* a request index far past the ring */
	assert_int_equal(raw_attach(&r, KVT_WIRE_VERSION, D), 0);
	assert_true(raw_submit_hangs_up(&r, NULL, 5000));
	rel_raw_close(&r);
	/* and a well-behaved client is served throughout */
	struct kvtier_client *c = attach(NULL);
	assert_non_null(c);
	assert_int_equal(kvtier_nop(c), 0);
	assert_int_equal(kvtier_ping(c), 0);
	uint32_t id;
	assert_int_equal(kvtier_seq_create(c, &id), 0);
	assert_int_equal(kvtier_seq_close(c, id), 0);
	assert_int_equal(kvtier_seq_close(c, id), -ENOENT); /* a closed id: an error, no hang-up */
	assert_int_equal(kvtier_nop(c), 0);
	kvtier_detach(c);
}

/*
 * Appends of whole pages (KVT_APPEND_PAGES) through the ring by hand: several in a row
 * are answered in order, each with its page's tokens, and the daemon then holds the
 * pages (SEQ_INFO: tokens and pages stored; their bytes: test_append_batch, whose full
 * pages go this way). One onto a page still filling, or of a sequence that is not
 * there: an error, and the client stays.
 */
static void test_append_pages(void **state)
{
	(void)state;
	struct rel_raw r;
	assert_int_equal(raw_attach(&r, KVT_WIRE_VERSION, D), 0);
	uint8_t *data = r.ring + r.w.data_off;
	struct kvt_sqe e[4];
	struct kvt_cqe o[4];
	/* two sequences: a page of tokens into each layer of the first, a partial one */
	e[0] = (struct kvt_sqe){.op = KVT_OP_SEQ_CREATE};
	e[1] = (struct kvt_sqe){.op = KVT_OP_SEQ_CREATE};
	assert_int_equal(raw_calls(&r, e, 2, o), 0);
	assert_true(o[0].res >= 0 && o[1].res >= 0);
	const uint32_t a = (uint32_t)o[0].res, b = (uint32_t)o[1].res;
	/* heads' pages at a stride past the page, as a tail pool's slots */
	const uint64_t stride = PB + 4096, per = HEADS * stride;
	for (uint32_t l = 0; l < LAYERS; l++)
		for (uint32_t h = 0; h < HEADS; h++) {
			float *pg = (float *)(data + l * per + h * stride);
			for (uint32_t t = 0; t < T; t++)
				for (uint32_t d = 0; d < D; d++) {
					pg[t * D + d] = rel_kv(91, l, h, t, d, 0);
					pg[(T + t) * D + d] = rel_kv(91, l, h, t, d, 1);
				}
		}
	for (uint32_t l = 0; l < LAYERS; l++)
		e[l] = (struct kvt_sqe){.op = KVT_OP_APPEND, .flags = KVT_APPEND_PAGES, .seq = a,
					.layer = (uint16_t)l, .ntok = T, .off = {l * per, stride}};
	e[LAYERS] = (struct kvt_sqe){.op = KVT_OP_SEQ_INFO, .seq = a, .layer = 1};
	assert_int_equal(raw_calls(&r, e, LAYERS + 1, o), 0);
	for (uint32_t l = 0; l < LAYERS; l++) {
		assert_int_equal(o[l].res, 0);
		check_eq(o[l].user_data, e[l].user_data);
		check_eq(o[l].aux[0], T);
		check_eq(o[l].aux[1], T);
	}
	check_eq(o[LAYERS].res, T); /* tokens */
	check_eq(o[LAYERS].aux[0], 1); /* pages stored */
	/* onto b's page still filling (3 tokens in it): refused; a sequence not there */
	float *kv = (float *)(data + 8 * per);
	for (uint32_t i = 0; i < 3 * HEADS * D * 2; i++)
		kv[i] = 1.0f;
	e[0] = (struct kvt_sqe){.op = KVT_OP_APPEND, .seq = b, .layer = 0, .ntok = 3,
				.off = {8 * per, 8 * per + 3 * HEADS * D * 4}};
	e[1] = (struct kvt_sqe){.op = KVT_OP_APPEND, .flags = KVT_APPEND_PAGES, .seq = b,
				.layer = 0, .ntok = T, .off = {0, stride}};
	e[2] = (struct kvt_sqe){.op = KVT_OP_APPEND, .flags = KVT_APPEND_PAGES, .seq = 77,
				.layer = 0, .ntok = T, .off = {0, stride}};
	e[3] = (struct kvt_sqe){.op = KVT_OP_SEQ_INFO, .seq = b, .layer = 0};
	assert_int_equal(raw_calls(&r, e, 4, o), 0);
	assert_int_equal(o[0].res, 0);
	check_eq(o[0].aux[0], 3);
	assert_int_equal(o[1].res, -EINVAL);
	assert_int_equal(o[2].res, -ENOENT);
	check_eq(o[3].res, 3);
	check_eq(o[3].aux[0], 0);
	/* counted: the appends answered once sealed (not the refused), and their time */
	char js[8192] = "";
	assert_int_equal(ctl_cmd_out("clients\0", 8, js, sizeof(js)), 0);
	const char *at = strstr(js, "\"page_appends\":");
	assert_non_null(at);
	check_eq(strtoull(at + 15, NULL, 10), LAYERS);
	assert_non_null(at = strstr(js, "\"page_answer_us_mean\":"));
	assert_true(strtod(at + 22, NULL) > 0);
	rel_raw_close(&r);
	daemon_alive();
}

/*
 * Copies into the GPU pool and the client's reads, ordered by the copy fence. The
 * daemon is started again with a cpu device that lands every copy batch 3 ms late
 * (KVT_CPU_COPY_DELAY_US); a client that reads nothing in place (every selected page
 * comes to the pool) gets its answers as soon as the copies they need are queued, and
 * waits on the fence before it reads. step() checks every output against the reference
 * and every selected slot byte for byte: a read before its copy landed would find the
 * slot's old page, or nothing.
 */
static void test_copy_order(void **state)
{
	assert_int_equal(stop_daemon(state), 0);
	setenv("KVT_CPU_COPY_DELAY_US", "3000", 1);
	int r = start_daemon(state);
	unsetenv("KVT_CPU_COPY_DELAY_US");
	assert_int_equal(r, 0);
	struct kvtier_client *c = attach_flags(NULL, KVTIER_ATTACH_NO_HOST_READS);
	assert_non_null(c);
	struct seqdesc s = {.salt = 31};
	assert_int_equal(kvtier_seq_create(c, &s.id), 0);
	append_tokens(c, &s, PF_PREFILL);
	struct kvtier_table *tab = kvtier_table_create(c, 1);
	assert_non_null(tab);
	drifting = true;
	for (uint32_t t = 0; t < 16; t++)
		step(c, &s, 1, t, 8, tab);
	/* answers went before their copies landed, and the pages were right */
	char js[8192] = "";
	assert_int_equal(ctl_cmd_out("clients\0", 8, js, sizeof(js)), 0);
	const char *a = strstr(js, "\"selects_before_copies\":");
	const char *b = strstr(js, "\"pages_before_copies\":");
	assert_non_null(a);
	assert_non_null(b);
	assert_non_null(strstr(js, "\"copy_fence\":true"));
	unsigned long long sel = strtoull(a + 24, NULL, 10), pages = strtoull(b + 22, NULL, 10);
	print_message("answered before their copies landed: %llu selects, %llu pages\n", sel,
		      pages);
	assert_true(sel > 0 && pages >= sel);
	struct kvtier_prefetch_stats st;
	assert_int_equal(kvtier_stats(c, s.id, &st), 0);
	assert_true(st.host == 0 && st.fetched + st.disk + st.late > 0);
	kvtier_table_destroy(tab);
	kvtier_detach(c);
	drifting = false;
}

/*
 * The fast path: the client selects on its own (kvtier_select_async) from the daemon's
 * summaries and map of leases, appends with kvtier_append_async (the page still filling
 * stays with the client until full), and attends. Checked at every step: each table
 * entry is the page it says it is, byte for byte, and a page of the selection the
 * daemon makes for the same query (a select through the daemon, on a second table);
 * the output is the reference over the entries. A page missing at first (not leased
 * yet) is leased for the next steps: with the query held, the fast table becomes the
 * daemon's selection exactly, and the missed count stops growing. Leases name pages
 * where they are: read in place from host RAM first, from the GPU pool once copied there
 * (not while fast.promote is off). No waits here (wait_us < 0): test_fast_wait.
 */
/*
 * kvtier_append_batch_async: a batch's token per layer in one call, the sequences in a
 * new order each step, at other positions in their pages (one fills a page at every
 * step of T; two fill theirs at the same step, sent as they are on the device and sealed
 * together, KVT_APPEND_PAGES), on the fast path and without it (kvtier_append for each). Afterwards a
 * step through the daemon finds the pages it selects (the window: the pages the batch
 * wrote) byte for byte and the tail in the output, and the daemon counts every token. A sequence named twice or not live: refused,
 * nothing appended (else the pages after it would be off by a token).
 */
#define NB 4 /* sequences */
static void test_append_batch(void **state)
{
	(void)state;
	for (int fast = 1; fast >= 0; fast--) {
		struct kvtier_client *c = fast ? attach_fast(4, 16 * T, 0) : attach(NULL);
		struct seqdesc s[NB] = {{.salt = 61u + 4u * (uint32_t)fast}, {.salt = 62u + 4u * (uint32_t)fast},
					{.salt = 63u + 4u * (uint32_t)fast}, {.salt = 64u + 4u * (uint32_t)fast}};
		const uint32_t pre[NB] = {5 * T - 5, 4 * T - 1, 4 * T, 2 * T};
		for (int i = 0; i < NB; i++) {
			assert_int_equal(kvtier_seq_create(c, &s[i].id), 0);
			append_tokens(c, &s[i], pre[i]);
		}
		const size_t row = (size_t)HEADS * D;
		float *k = malloc(NB * row * 4), *v = malloc(NB * row * 4);
		uint32_t ids[NB] = {s[0].id, s[1].id, s[0].id};
		assert_int_equal(kvtier_append_batch_async(c, ids, 3, 0, k, v, NULL), -EINVAL);
		ids[2] = 1u << 30;
		assert_int_equal(kvtier_append_batch_async(c, ids, 3, 0, k, v, NULL), -ENOENT);
		assert_int_equal(kvtier_append_batch_async(c, ids, 2, LAYERS, k, v, NULL), -EINVAL);
		assert_int_equal(kvtier_append_batch_async(c, ids, 0, 0, NULL, NULL, NULL), 0);
		for (uint32_t st = 0; st < T + 3; st++) {
			for (uint32_t l = 0; l < LAYERS; l++) {
				for (uint32_t i = 0; i < NB; i++) {
					struct seqdesc *b = &s[(i + st) % NB];
					ids[i] = b->id;
					for (uint32_t h = 0; h < HEADS; h++)
						for (uint32_t d = 0; d < D; d++) {
							k[i * row + h * D + d] = kv_of(b, l, h, b->ntok, d, 0);
							v[i * row + h * D + d] = kv_of(b, l, h, b->ntok, d, 1);
						}
				}
				assert_int_equal(kvtier_append_batch_async(c, ids, NB, l, k, v, NULL), 0);
			}
			for (int i = 0; i < NB; i++)
				s[i].ntok++;
		}
		struct kvtier_table *tab = kvtier_table_create(c, NB);
		assert_non_null(tab);
		/* one more token each, then the sinks, the window (the pages the batch wrote to)
		 * and the pages the query picks, and the tail */
		check(step(c, s, NB, 0, 16, tab) > 0);
		for (int i = 0; i < NB; i++)
			for (uint32_t l = 0; l < LAYERS; l++) {
				uint32_t n = 0;
				assert_int_equal(kvtier_seq_tokens(c, s[i].id, l, &n), 0);
				check_eq(n, s[i].ntok);
			}
		if (fast) { /* a budget past the pages the fast path covers (16): all of them,
			     * and the report within the daemon's bounds (the client stays) */
			float *q = calloc((size_t)NB * HEADS * GROUP * D, 4);
			struct kvtier_select_params sp = {.budget_pages = 64, .sink_tokens = T,
							  .window_tokens = T, .host_gap = -1};
			uint32_t all[NB] = {s[0].id, s[1].id, s[2].id, s[3].id};
			assert_int_equal(kvtier_select_async(c, all, NB, 1, q, &sp, tab, NULL), 0);
			struct kvtier_table_view tv;
			kvtier_table_view(tab, &tv);
			for (uint32_t r = 0; r < tv.rows; r++)
				check_eq(tv.n_pages[r], (int)(s[r / HEADS].ntok / T));
			assert_int_equal(kvtier_nop(c), 0);
			/* layer 0, never selected on the fast path: a report of 4 sequences
			 * read over the daemon's threads (fast.threads=3) leases what it
			 * names, waiting for nothing; a later selection then finds every page
			 * leased, each slot holding its page */
			struct kvtier_memory mem;
			kvtier_memory(c, &mem);
			sp.wait_us = -1;
			bool full = false;
			for (int tries = 0; tries < 400 && !full; tries++) {
				assert_int_equal(kvtier_select_async(c, all, NB, 0, q, &sp, tab, NULL), 0);
				kvtier_table_view(tab, &tv);
				full = true;
				for (uint32_t r = 0; r < tv.rows; r++)
					full &= tv.n_pages[r] == (int)(s[r / HEADS].ntok / T);
				if (!full)
					usleep(5000);
			}
			check(full);
			for (uint32_t r = 0; r < tv.rows; r++) {
				const struct seqdesc *b = &s[r / HEADS];
				for (int j = 0; j < tv.n_pages[r]; j++)
					check_eq(page_of_slot(b, 0, r % HEADS,
							      slot_addr(&mem, tv.slots[r * tv.stride + j])),
						 tv.pages[r * tv.stride + j]);
			}
			assert_int_equal(kvtier_nop(c), 0);
			char pj[8192] = "";
			assert_int_equal(ctl_cmd_out("clients\0", 8, pj, sizeof(pj)), 0);
			const char *pl = strstr(pj, "\"fast_reports_pooled\":");
			assert_non_null(pl);
			check(strtoull(pl + 22, NULL, 10) >= 2);
			free(q);
			/* the pages two sequences filled at one step, sealed in one batch (of
			 * every layer's: one at least) */
			char js[8192] = "";
			assert_int_equal(ctl_cmd_out("clients\0", 8, js, sizeof(js)), 0);
			const char *ps = strstr(js, "\"pages_sealed\":"), *sb = strstr(js, "\"seal_batches\":");
			assert_non_null(ps);
			assert_non_null(sb);
			const unsigned long long sealed = strtoull(ps + 15, NULL, 10),
						 batches = strtoull(sb + 15, NULL, 10);
			print_message("pages sealed %llu in %llu batches\n", sealed, batches);
			check(sealed > batches);
		}
		kvtier_table_destroy(tab);
		free(k);
		free(v);
		kvtier_detach(c);
	}
	daemon_alive();
}

/*
 * A page filled on the fast path goes to the daemon without a wait: until its answer is
 * reaped (at the layer's next append, or any call through the daemon) it is still the
 * tail, attended from its tail slot (the table: one full page fewer, tail_len T, the
 * output the same); after it, a full page the daemon leased like any other. Checked
 * against the reference over every token, on both layers; then a step through the
 * daemon finds every page it stored byte for byte.
 */
static void test_pages_in_flight(void **state)
{
	(void)state;
	struct kvtier_client *c = attach_fast(2, 16 * T, 0);
	struct seqdesc s[2] = {{.salt = 71}, {.salt = 72}};
	for (int i = 0; i < 2; i++) {
		assert_int_equal(kvtier_seq_create(c, &s[i].id), 0);
		append_tokens(c, &s[i], 2 * T);
	}
	const uint32_t ids[2] = {s[0].id, s[1].id};
	const size_t row = (size_t)HEADS * D, qn = (size_t)HEADS * GROUP * D;
	float *k = malloc(2 * row * 4), *v = malloc(2 * row * 4), *q = malloc(2 * qn * 4),
	      *out = malloc(2 * qn * 4), ref[GROUP * D];
	struct kvtier_select_params sp = {.budget_pages = 16, .sink_tokens = T,
					  .window_tokens = T, .host_gap = -1, .wait_us = 2000000};
	struct kvtier_table *tab = kvtier_table_create(c, 2);
	assert_non_null(tab);
	/* page 2 token by token on the fast path (kept here until full), then page 3 begun */
	for (uint32_t st = 0; st < T + 1; st++) {
		for (uint32_t l = 0; l < LAYERS; l++) {
			for (uint32_t i = 0; i < 2; i++)
				for (uint32_t h = 0; h < HEADS; h++)
					for (uint32_t d = 0; d < D; d++) {
						k[i * row + h * D + d] = kv_of(&s[i], l, h, s[i].ntok, d, 0);
						v[i * row + h * D + d] = kv_of(&s[i], l, h, s[i].ntok, d, 1);
					}
			assert_int_equal(kvtier_append_batch_async(c, ids, 2, l, k, v, NULL), 0);
		}
		for (int i = 0; i < 2; i++)
			s[i].ntok++;
		if (st < T - 1)
			continue;
		const bool flight = st == T - 1;
		for (uint32_t l = 0; l < LAYERS; l++) {
			for (uint32_t i = 0; i < 2; i++)
				query(s[i].salt, 0, l, q + i * qn);
			assert_int_equal(kvtier_select_async(c, ids, 2, l, q, &sp, tab, NULL), 0);
			assert_int_equal(kvtier_attend_async(c, tab, q, out, NULL, 1.0f / sqrtf(D), NULL), 0);
			struct kvtier_table_view tv;
			kvtier_table_view(tab, &tv);
			for (uint32_t r = 0; r < tv.rows; r++) {
				const struct seqdesc *b = &s[r / HEADS];
				const int full = (int)(b->ntok / T);
				check_eq(tv.n_pages[r], flight ? full - 1 : full);
				check_eq(tv.tail_len[r], flight ? (int)T : (int)(b->ntok % T));
				check(tv.tail_slot[r] >= 0);
				int pages[16];
				for (int j = 0; j < tv.n_pages[r]; j++)
					pages[j] = tv.pages[r * tv.stride + j];
				if (flight) /* the tail: the page in flight */
					pages[tv.n_pages[r]] = full - 1;
				reference(b, l, r % HEADS, q + (size_t)r * GROUP * D, pages,
					  tv.n_pages[r] + flight, ref);
				for (uint32_t i = 0; i < GROUP * D; i++)
					check(fabsf(out[(size_t)r * GROUP * D + i] - ref[i]) <= 2e-5f);
			}
		}
	}
	for (int i = 0; i < 2; i++)
		for (uint32_t l = 0; l < LAYERS; l++) {
			uint32_t n = 0;
			assert_int_equal(kvtier_seq_tokens(c, s[i].id, l, &n), 0);
			check_eq(n, s[i].ntok);
		}
	check(step(c, s, 2, 0, 16, tab) > 0);
	kvtier_table_destroy(tab);
	free(k);
	free(v);
	free(q);
	free(out);
	kvtier_detach(c);
	daemon_alive();
}

/*
 * The fast path's waits: pages that matter (here every one, host_gap < 0) and are not
 * leased yet hold the call (the cpu device's resolve) until the daemon has leased them:
 * from the first step of each new query on, the fast table is the daemon's selection
 * exactly, nothing is missed, and the pages waited for are counted (late). With the
 * daemon stopped, the wait ends at wait_us and the step goes without them; the daemon,
 * continued, acks the report late, and the next step has them.
 */
static void test_fast_wait(void **state)
{
	(void)state;
	struct kvtier_client *c = attach_fast(2, PREFILL + 64, 0);
	struct kvtier_memory mem;
	kvtier_memory(c, &mem);
	struct seqdesc s = {.salt = 53}, filler = {.salt = 54};
	assert_int_equal(kvtier_seq_create(c, &s.id), 0);
	append_tokens(c, &s, PREFILL);
	assert_int_equal(kvtier_seq_sync(c, s.id, NULL), 0);
	/* a second sequence as large pushes most of the first out of host RAM: those of its
	 * pages that matter are read from NVMe while the step waits */
	assert_int_equal(kvtier_seq_create(c, &filler.id), 0);
	append_tokens(c, &filler, PREFILL);
	struct kvtier_table *fast = kvtier_table_create(c, 1), *slow = kvtier_table_create(c, 1);
	assert_non_null(fast);
	assert_non_null(slow);
	float *q = malloc((size_t)HEADS * GROUP * D * 4);
	/* waits long enough for a read behind the second sequence's write-back: in host RAM,
	 * the room for it comes only then */
	struct kvtier_select_params sp = {.budget_pages = 8, .sink_tokens = T, .window_tokens = T,
					  .host_gap = -1, .wait_us = 2000000};
	struct kvtier_prefetch_stats st;
	uint64_t late = 0;
	for (uint32_t stepno = 0; stepno < 9; stepno++) {
		const uint32_t salt = 60 + stepno / 3; /* a new query every 3 steps */
		for (uint32_t l = 0; l < LAYERS; l++) {
			query(salt, stepno, l, q);
			assert_int_equal(kvtier_select_async(c, &s.id, 1, l, q, &sp, fast, NULL), 0);
			struct kvtier_table_view fv, sv;
			kvtier_table_view(fast, &fv);
			assert_int_equal(kvtier_select(c, &s.id, 1, l, q, KVT_MEM_HOST, &sp, slow), 0);
			kvtier_table_view(slow, &sv);
			for (uint32_t r = 0; r < fv.rows; r++) {
				check_eq(fv.n_pages[r], sv.n_pages[r]);
				for (int j = 0; j < fv.n_pages[r]; j++) {
					const float *slot = slot_addr(&mem, fv.slots[r * fv.stride + j]);
					check_eq(page_of_slot(&s, l, r, slot), sv.pages[r * sv.stride + j]);
					check_eq(fv.pages[r * fv.stride + j], sv.pages[r * sv.stride + j]);
				}
			}
		}
		assert_int_equal(kvtier_stats(c, UINT32_MAX, &st), 0);
		check_eq(st.missed, 0);
		if (stepno % 3 == 0)
			check(st.late > late); /* the new query's pages, waited for */
		late = st.late;
	}
	print_message("fast path with waits: %llu pages selected, %llu waited for (%llu read from "
		      "NVMe), %llu missed\n", (unsigned long long)st.selected,
		      (unsigned long long)st.late, (unsigned long long)st.prefetch_host,
		      (unsigned long long)st.missed);
	check(st.prefetch_host > 0);
	/* the daemon stopped: the wait ends at wait_us, the pages not leased are left out */
	sp.wait_us = 20000;
	query(90, 0, 0, q);
	assert_int_equal(kill(daemon_pid, SIGSTOP), 0);
	int wst;
	assert_int_equal(waitpid(daemon_pid, &wst, WUNTRACED), daemon_pid);
	assert_true(WIFSTOPPED(wst));
	const int sel_ret = kvtier_select_async(c, &s.id, 1, 0, q, &sp, fast, NULL);
	assert_int_equal(kill(daemon_pid, SIGCONT), 0);
	assert_int_equal(sel_ret, 0);
	struct kvtier_table_view fv, sv;
	kvtier_table_view(fast, &fv);
	int short_rows = 0;
	for (uint32_t r = 0; r < fv.rows; r++)
		short_rows += fv.n_pages[r] < 8;
	check(short_rows > 0);
	/* continued: the report heard of, the pages leased, the next step has them */
	assert_int_equal(kvtier_select_async(c, &s.id, 1, 0, q, &sp, fast, NULL), 0);
	kvtier_table_view(fast, &fv);
	assert_int_equal(kvtier_select(c, &s.id, 1, 0, q, KVT_MEM_HOST, &sp, slow), 0);
	kvtier_table_view(slow, &sv);
	for (uint32_t r = 0; r < fv.rows; r++)
		check_eq(fv.n_pages[r], sv.n_pages[r]);
	assert_int_equal(kvtier_seq_close(c, s.id), 0);
	assert_int_equal(kvtier_seq_close(c, filler.id), 0);
	kvtier_table_destroy(fast);
	kvtier_table_destroy(slow);
	kvtier_detach(c);
	free(q);
	daemon_alive();
}

/*
 * The pages a report waits for are leased ahead of the reports before it: the client's
 * stream stands still until the ack, while the reports before are only the daemon's lag.
 * With the daemon stopped, layer 0's report (no waits) and then layer 1's (waits, which
 * time out) queue; continued, the daemon serves layer 1's waits first (counted), and the
 * next step of layer 1 has every page of the daemon's own selection.
 */
static void test_fast_waits_ahead(void **state)
{
	(void)state;
	struct kvtier_client *c = attach_fast(2, PREFILL + 64, 0);
	struct seqdesc s = {.salt = 57};
	assert_int_equal(kvtier_seq_create(c, &s.id), 0);
	append_tokens(c, &s, PREFILL);
	assert_int_equal(kvtier_seq_sync(c, s.id, NULL), 0);
	struct kvtier_table *t0 = kvtier_table_create(c, 1), *t1 = kvtier_table_create(c, 1),
			   *slow = kvtier_table_create(c, 1);
	assert_non_null(t0);
	assert_non_null(t1);
	assert_non_null(slow);
	float *q = malloc((size_t)HEADS * GROUP * D * 4);
	struct kvtier_select_params nowait = {.budget_pages = 8, .sink_tokens = T,
					      .window_tokens = T, .host_gap = -1, .wait_us = -1};
	struct kvtier_select_params waits = nowait;
	waits.wait_us = 20000;
	char js[8192] = "";
	assert_int_equal(ctl_cmd_out("clients\0", 8, js, sizeof(js)), 0);
	const char *a = strstr(js, "\"fast_waits_ahead\":");
	assert_non_null(a);
	const unsigned long long before = strtoull(a + 19, NULL, 10);
	assert_int_equal(kill(daemon_pid, SIGSTOP), 0);
	int wst;
	assert_int_equal(waitpid(daemon_pid, &wst, WUNTRACED), daemon_pid);
	assert_true(WIFSTOPPED(wst));
	query(97, 0, 0, q);
	const int r0 = kvtier_select_async(c, &s.id, 1, 0, q, &nowait, t0, NULL);
	query(97, 0, 1, q);
	const int r1 = kvtier_select_async(c, &s.id, 1, 1, q, &waits, t1, NULL);
	assert_int_equal(kill(daemon_pid, SIGCONT), 0);
	assert_int_equal(r0, 0);
	assert_int_equal(r1, 0);
	struct kvtier_prefetch_stats st;
	assert_int_equal(kvtier_stats(c, UINT32_MAX, &st), 0); /* the reports processed */
	assert_int_equal(ctl_cmd_out("clients\0", 8, js, sizeof(js)), 0);
	assert_non_null(a = strstr(js, "\"fast_waits_ahead\":"));
	const unsigned long long after = strtoull(a + 19, NULL, 10);
	print_message("waits leased ahead of the reports before them: %llu\n", after - before);
	check_eq(after, before + 1);
	/* and the time that took is told by part: the waits, the reading of the selections */
	assert_non_null(a = strstr(js, "\"fast_report_us_mean\":{\"waits\":"));
	char *e;
	const double w_us = strtod(a + 31, &e);
	assert_true(!strncmp(e, ",\"reads\":", 9));
	const double s_us = strtod(e + 9, NULL);
	print_message("a report: waits %.1f us, reads %.1f us\n", w_us, s_us);
	assert_true(w_us > 0 && s_us > 0);
	/* the next step of layer 1 has what the wait asked for */
	assert_int_equal(kvtier_select_async(c, &s.id, 1, 1, q, &waits, t1, NULL), 0);
	assert_int_equal(kvtier_select(c, &s.id, 1, 1, q, KVT_MEM_HOST, &nowait, slow), 0);
	struct kvtier_table_view fv, sv;
	kvtier_table_view(t1, &fv);
	kvtier_table_view(slow, &sv);
	for (uint32_t r = 0; r < fv.rows; r++) {
		check_eq(fv.n_pages[r], sv.n_pages[r]);
		for (int j = 0; j < fv.n_pages[r]; j++)
			check_eq(fv.pages[r * fv.stride + j], sv.pages[r * sv.stride + j]);
	}
	assert_int_equal(kvtier_seq_close(c, s.id), 0);
	kvtier_table_destroy(t0);
	kvtier_table_destroy(t1);
	kvtier_table_destroy(slow);
	kvtier_detach(c);
	free(q);
	daemon_alive();
}

/*
 * The fast path's reports take no completion: with the daemon stopped they fill the
 * request ring (the rest are dropped, not queued). A request that waits for its answer
 * then waits for room too, rather than overrun the ring (which the daemon answers by
 * disconnecting the client).
 */
static void *cont_later(void *arg)
{
	struct timespec ts = {0, 200 * 1000000};
	nanosleep(&ts, NULL);
	kill(*(pid_t *)arg, SIGCONT);
	return NULL;
}

static void test_fast_ring_full(void **state)
{
	(void)state;
	struct kvtier_client *c = attach_fast(2, PREFILL + 64, 4);
	struct seqdesc s = {.salt = 41};
	assert_int_equal(kvtier_seq_create(c, &s.id), 0);
	append_tokens(c, &s, PREFILL);
	struct kvtier_table *t = kvtier_table_create(c, 1);
	assert_non_null(t);
	const size_t qn = (size_t)HEADS * GROUP * D;
	float *q = malloc(qn * 4);
	struct kvtier_select_params sp = {.budget_pages = 4, .sink_tokens = T, .window_tokens = T};
	assert_int_equal(kill(daemon_pid, SIGSTOP), 0);
	int wst; /* stopped (kill only asks) */
	assert_int_equal(waitpid(daemon_pid, &wst, WUNTRACED), daemon_pid);
	assert_true(WIFSTOPPED(wst));
	pthread_t th; /* continued in 200 ms, whatever fails here */
	assert_int_equal(pthread_create(&th, NULL, cont_later, &daemon_pid), 0);
	for (uint32_t i = 0; i < 12; i++) { /* 12 reports, 4 entries */
		query(50, i, i % LAYERS, q);
		assert_int_equal(kvtier_select_async(c, &s.id, 1, i % LAYERS, q, &sp, t, NULL), 0);
	}
	assert_int_equal(kvtier_nop(c), 0); /* waits for room, then answered */
	pthread_join(th, NULL);
	uint32_t n = 0;
	assert_int_equal(kvtier_seq_tokens(c, s.id, 0, &n), 0);
	check_eq(n, PREFILL);
	/* the client is still attached and served */
	query(50, 0, 0, q);
	assert_int_equal(kvtier_select_async(c, &s.id, 1, 0, q, &sp, t, NULL), 0);
	assert_int_equal(kvtier_seq_close(c, s.id), 0);
	kvtier_table_destroy(t);
	free(q);
	kvtier_detach(c);
	daemon_alive();
}

static void test_fast(void **state)
{
	struct kvtier_client *c = attach_fast(4, PREFILL + 256, 0);
	struct kvtier_memory mem;
	kvtier_memory(c, &mem);
	struct seqdesc s = {.salt = 31};
	assert_int_equal(kvtier_seq_create(c, &s.id), 0);
	append_tokens(c, &s, PREFILL - 5); /* a page still filling */
	struct kvtier_table *fast = kvtier_table_create(c, 1), *slow = kvtier_table_create(c, 1);
	assert_non_null(fast);
	assert_non_null(slow);
	const size_t qn = (size_t)HEADS * GROUP * D;
	float *q = malloc(qn * 4), *out = malloc(qn * 4), ref[GROUP * D];
	float *k = malloc((size_t)HEADS * D * 4), *v = malloc((size_t)HEADS * D * 4);
	/* every page leased in host RAM read in place */
	struct kvtier_select_params sp = {.budget_pages = 8, .sink_tokens = T, .window_tokens = 2 * T,
					  .host_gap = -1, .wait_us = -1};
	struct kvtier_prefetch_stats st;
	uint64_t missed_at[40], in_host = 0, on_gpu = 0;
	/* the first query's leases stay in host RAM (read in place), the others' go to the GPU */
	assert_int_equal(CTL("config\0set\0name=fast.promote\0value=0\0"), 0);
	for (uint32_t stepno = 0; stepno < 40; stepno++) {
		/* the query held for 12 steps, then another */
		const uint32_t qstep = stepno < 12 ? 0 : stepno < 24 ? 500 : 900;
		if (stepno == 12) {
			check(in_host > 0);
			assert_int_equal(CTL("config\0set\0name=fast.promote\0value=1\0"), 0);
		}
		for (uint32_t l = 0; l < LAYERS; l++) {
			for (uint32_t h = 0; h < HEADS; h++)
				for (uint32_t d = 0; d < D; d++) {
					k[h * D + d] = kv_of(&s, l, h, s.ntok, d, 0);
					v[h * D + d] = kv_of(&s, l, h, s.ntok, d, 1);
				}
			assert_int_equal(kvtier_append_async(c, s.id, l, k, v, 1, NULL), 0);
		}
		s.ntok++;
		for (uint32_t l = 0; l < LAYERS; l++) {
			query(qstep == 0 ? 40 : qstep, 0, l, q);
			assert_int_equal(kvtier_select_async(c, &s.id, 1, l, q, &sp, fast, NULL), 0);
			assert_int_equal(kvtier_attend_async(c, fast, q, out, NULL, 1.0f / sqrtf(D), NULL), 0);
			struct kvtier_table_view fv, sv;
			kvtier_table_view(fast, &fv);
			assert_int_equal(kvtier_select(c, &s.id, 1, l, q, KVT_MEM_HOST, &sp, slow), 0);
			kvtier_table_view(slow, &sv);
			for (uint32_t r = 0; r < fv.rows; r++) {
				int pages[64], np = fv.n_pages[r];
				check_eq(fv.tail_len[r], (int)(s.ntok % T));
				check(np <= sv.n_pages[r]);
				int at = 0;
				for (int j = 0; j < np; j++) {
					const float *slot = slot_addr(&mem, fv.slots[r * fv.stride + j]);
					if (fv.slots[r * fv.stride + j] & KVTIER_SLOT_HOST)
						in_host++;
					else
						on_gpu++;
					pages[j] = page_of_slot(&s, l, r, slot);
					check(pages[j] >= 0);
					check_eq(fv.pages[r * fv.stride + j], pages[j]);
					while (at < sv.n_pages[r] && sv.pages[r * sv.stride + at] != pages[j])
						at++;
					check(at < sv.n_pages[r]); /* in the daemon's selection, in order */
				}
				/* a query held 3 steps: every page it selects is leased */
				if (stepno % 12 >= 3)
					check_eq(np, sv.n_pages[r]);
				reference(&s, l, r, q + (size_t)r * GROUP * D, pages, np, ref);
				for (uint32_t i = 0; i < GROUP * D; i++)
					check(fabsf(out[(size_t)r * GROUP * D + i] - ref[i]) <= 2e-5f);
			}
		}
		assert_int_equal(kvtier_stats(c, UINT32_MAX, &st), 0);
		missed_at[stepno] = st.missed;
	}
	/* the first step of each query misses pages (other than those still leased), and
	 * the steps after a few of it miss none */
	check(missed_at[0] > 0);
	check_eq(missed_at[11], missed_at[3]);
	check(missed_at[12] > missed_at[11]);
	check_eq(missed_at[23], missed_at[15]);
	check_eq(missed_at[39], missed_at[27]);
	check(st.selected > st.hit && st.hit > 0);
	/* leases name pages in host RAM in place at once, and move to the GPU pool */
	check(in_host > 0 && on_gpu > 0 && st.host > 0);
	uint32_t n;
	assert_int_equal(kvtier_seq_tokens(c, s.id, 1, &n), 0);
	check_eq(n, PREFILL + 35);
	/* a fork sends the page still filling first, and takes the daemon's path */
	uint32_t f;
	assert_int_equal(kvtier_seq_fork(c, s.id, s.ntok, &f), 0);
	assert_int_equal(kvtier_select_async(c, &f, 1, 1, q, &sp, fast, NULL), 0);
	struct kvtier_table_view fv;
	kvtier_table_view(fast, &fv);
	check_eq(fv.tail_len[0], (int)(s.ntok % T));
	assert_int_equal(kvtier_seq_close(c, f), 0);
	kvtier_table_destroy(fast);
	kvtier_table_destroy(slow);
	assert_int_equal(kvtier_seq_close(c, s.id), 0);
	kvtier_detach(c);
	free(q);
	free(out);
	free(k);
	free(v);
	daemon_alive();
}

static void test_disallowed_uid(void **state)
{
	if (geteuid() != 0)
		skip();
	pid_t pid = fork();
	if (pid == 0) {
		in_child = true;
		if (setgid(65534) < 0 || setuid(65534) < 0)
			_exit(10);
		struct kvtier_client *c = attach(NULL);
		_exit(c ? 11 : 0);
	}
	int st;
	waitpid(pid, &st, 0);
	assert_true(WIFEXITED(st));
	assert_int_equal(WEXITSTATUS(st), 0);
	struct kvt_wire_stats w;
	assert_int_equal(stats(&w), 0);
	assert_true(w.rejected >= 1);
}

/*
 * A wait the daemon cannot answer in time: started again with every NVMe read held 800
 * ms (fault injection), it gets a report whose pages that matter are only on disk; the
 * client waits 20 ms and its step goes without them, and the daemon acks the report
 * once the wait is over, counts it (fast_waits_late), logs why, and counts its pages
 * not in as missed (not late: they were not waited into the step).
 */
static void test_fast_wait_late(void **state)
{
	assert_int_equal(stop_daemon(state), 0);
	extra_opt = "store.fault_inject=read_hang=1,hang_ms=800";
	int r = start_daemon(state);
	extra_opt = NULL;
	assert_int_equal(r, 0);
	struct kvtier_client *c = attach_fast(2, PREFILL + 64, 0);
	struct seqdesc s = {.salt = 73}, filler = {.salt = 74};
	assert_int_equal(kvtier_seq_create(c, &s.id), 0);
	append_tokens(c, &s, PREFILL);
	assert_int_equal(kvtier_seq_sync(c, s.id, NULL), 0);
	assert_int_equal(kvtier_seq_create(c, &filler.id), 0);
	append_tokens(c, &filler, PREFILL); /* most of the first sequence now only on disk */
	assert_int_equal(kvtier_seq_sync(c, filler.id, NULL), 0);
	struct kvtier_table *fast = kvtier_table_create(c, 1);
	assert_non_null(fast);
	float *q = malloc((size_t)HEADS * GROUP * D * 4);
	struct kvtier_select_params sp = {.budget_pages = 8, .sink_tokens = T, .window_tokens = T,
					  .host_gap = -1, .wait_us = 20000};
	struct kvtier_prefetch_stats st0, st;
	assert_int_equal(kvtier_stats(c, UINT32_MAX, &st0), 0);
	for (uint32_t l = 0; l < LAYERS; l++) {
		query(81, 0, l, q);
		assert_int_equal(kvtier_select_async(c, &s.id, 1, l, q, &sp, fast, NULL), 0);
	}
	char js[8192] = "";
	unsigned long long late = 0;
	for (int i = 0; i < 300 && !late; i++) { /* acked at the daemon's next tick */
		assert_int_equal(ctl_cmd_out("clients\0", 8, js, sizeof(js)), 0);
		const char *a = strstr(js, "\"fast_waits_late\":");
		assert_non_null(a);
		late = strtoull(a + 18, NULL, 10);
		if (!late)
			usleep(10000);
	}
	/* the pages of an ack written late count as missed, not waited for */
	assert_int_equal(kvtier_stats(c, UINT32_MAX, &st), 0);
	print_message("every disk read held 800 ms, waits of 20 ms: %llu pages missed, %llu "
		      "reports acked late\n", (unsigned long long)(st.missed - st0.missed), late);
	check(st.missed > st0.missed);
	check(late >= 1);
	free(q);
	kvtier_table_destroy(fast);
	assert_int_equal(kvtier_seq_close(c, s.id), 0);
	assert_int_equal(kvtier_seq_close(c, filler.id), 0);
	kvtier_detach(c);
	daemon_alive();
}

int main(void)
{
	if (!getenv("KVT_DAEMON")) {
		fprintf(stderr, "KVT_DAEMON: path of kvtierd\n");
		return 1;
	}
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup(test_decode_offloaded, reset_globals),
		cmocka_unit_test_setup(test_prefetch, reset_globals),
		cmocka_unit_test_setup(test_fork, reset_globals),
		cmocka_unit_test_setup(test_many_clients, reset_globals),
		cmocka_unit_test_setup(test_malformed, reset_globals),
		cmocka_unit_test_setup(test_kill9, reset_globals),
		cmocka_unit_test_setup(test_reads_held, reset_globals),
		cmocka_unit_test_setup(test_fast, reset_globals),
		cmocka_unit_test_setup(test_fast_wait, reset_globals),
		cmocka_unit_test_setup(test_fast_waits_ahead, reset_globals),
		cmocka_unit_test_setup(test_append_batch, reset_globals),
		cmocka_unit_test_setup(test_pages_in_flight, reset_globals),
		cmocka_unit_test_setup(test_append_pages, reset_globals),
		cmocka_unit_test_setup(test_fast_ring_full, reset_globals),
		cmocka_unit_test_setup(test_disallowed_uid, reset_globals),
		cmocka_unit_test_setup(test_copy_order, reset_globals), /* restarts the daemon */
		cmocka_unit_test_setup(test_fast_wait_late, reset_globals), /* restarts it */
	};
	return cmocka_run_group_tests(tests, start_daemon, stop_daemon);
}
