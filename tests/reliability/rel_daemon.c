// SPDX-License-Identifier: MIT
/*
 * The daemon's own life: killed with SIGKILL under load and restarted in a loop (its
 * clients see a clean -ECONNRESET, re-attach, re-prefill and are served right); started
 * where io_uring is refused (a seccomp filter, as container runtimes install) or where
 * it may not pin memory (no CAP_IPC_LOCK, RLIMIT_MEMLOCK 64 KiB).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"
#include "tiers/page_format.h"

#define QN ((size_t)REL_HEADS * REL_GROUP * REL_D)

/* A client's life: attach, prefill, steps with every page checked; the count of steps
 * served, or -errno of the first failure. */
static int client_run(struct rel_daemon *d, uint32_t salt, unsigned steps, unsigned *wrong)
{
	struct kvtier_client *c = rel_attach(d, NULL, 0);
	if (!c)
		return -ECONNREFUSED;
	uint32_t id;
	int ret = kvtier_seq_create(c, &id);
	for (uint32_t t = 0; ret == 0 && t < 512; t += 128)
		ret = rel_append(c, id, salt, t, 128);
	struct kvtier_table *tab = kvtier_table_create(c, 1);
	struct kvtier_memory mem;
	kvtier_memory(c, &mem);
	float q[QN], out[QN];
	struct kvtier_select_params sp = {.budget_pages = 8, .sink_tokens = REL_T,
					  .window_tokens = REL_T};
	unsigned done = 0;
	for (unsigned s = 0; ret == 0 && s < steps; s++, done++)
		for (uint32_t l = 0; ret == 0 && l < REL_LAYERS; l++) {
			rel_query(salt, s, l, q);
			ret = kvtier_select(c, &id, 1, l, q, KVT_MEM_HOST, &sp, tab);
			if (ret)
				break;
			struct kvtier_table_view v;
			kvtier_table_view(tab, &v);
			for (uint32_t row = 0; row < v.rows; row++)
				for (int j = 0; j < v.n_pages[row]; j++) {
					const float *pg = rel_slot_page(&mem, v.slots[row * v.stride + j]);
					*wrong += !pg || !rel_page_ok(pg, salt, l, row, (uint32_t)v.pages[row * v.stride + j]);
				}
			ret = kvtier_attend(c, tab, q, out, NULL, 0.125f, KVT_MEM_HOST);
		}
	kvtier_table_destroy(tab);
	kvtier_detach(c);
	return ret ? ret : (int)done;
}

/* ---- 2. crash loop: SIGKILL under load, restart, again ---- */

struct restarts {
	double sum, max;
};

/* Restarts the killed daemon on its state: how long until it answers, recorded. */
static void restart(struct rel_daemon *d, struct restarts *r)
{
	double t0 = rel_now();
	assert_int_equal(rel_daemon_start(d, NULL, true), 0);
	double t = rel_now() - t0;
	r->sum += t;
	if (t > r->max)
		r->max = t;
}

static void crash_loop(void **state)
{
	const unsigned cycles = rel_scale(10, 100);
	struct rel_daemon d;
	assert_int_equal(rel_daemon_start(&d, NULL, false), 0);
	unsigned wrong = 0, resets = 0, other = 0, served = 0;
	struct restarts rs = {0};
	for (unsigned cyc = 0; cyc < cycles; cyc++) {
		/* three clients mid-work; one tells through a pipe what it saw */
		int pfd[2];
		assert_int_equal(pipe(pfd), 0);
		pid_t pids[3];
		for (int i = 0; i < 3; i++) {
			pids[i] = fork();
			assert_true(pids[i] >= 0);
			if (pids[i] == 0) {
				close(pfd[0]);
				unsigned wr = 0;
				int r = client_run(&d, 7000 + cyc * 3 + i, 1000000, &wr);
				int msg[2] = {r, (int)wr};
				if (write(pfd[1], msg, sizeof(msg)) != sizeof(msg))
					_exit(1);
				_exit(0);
			}
		}
		close(pfd[1]);
		usleep((useconds_t)(20000 + rel_rand() % 80000));
		rel_daemon_kill9(&d);
		for (int i = 0; i < 3; i++) {
			int msg[2];
			assert_int_equal(read(pfd[0], msg, sizeof(msg)), sizeof(msg));
			wrong += (unsigned)msg[1];
			/* refused: the client attached after the kill (slow under tsan) */
			if (msg[0] == -ECONNRESET || msg[0] == -EPIPE || msg[0] == -ECONNREFUSED)
				resets++;
			else
				other++, fprintf(stderr, "client ended with %d\n", msg[0]);
		}
		for (int i = 0; i < 3; i++) {
			int st;
			assert_int_equal(waitpid(pids[i], &st, 0), pids[i]);
			assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
		}
		close(pfd[0]);
		restart(&d, &rs);
		/* the new daemon serves from scratch */
		int r = client_run(&d, 9000 + cyc, 3, &wrong);
		assert_int_equal(r, 3);
		served++;
	}
	printf("rel: crash-loop: %u SIGKILLs of the daemon under 3 clients each: %u clients saw "
	       "ECONNRESET (or ECONNREFUSED), %u something else; restart to serving %.0f ms mean, %.0f ms max; "
	       "%u fresh clients served after restarts, %u wrong pages\n", cycles, resets, other,
	       1e3 * rs.sum / cycles, 1e3 * rs.max, served, wrong);
	assert_int_equal(wrong, 0);
	assert_int_equal(other, 0);
	assert_int_equal(rel_daemon_stop(&d), 0);
	rel_daemon_cleanup(&d);
}

/* ---- 2. SIGKILL under load, restart: named sequences recovered ---- */

#define NS	 4    /* named sequences */
#define MAXTOK	 768  /* tokens of one, at most (48 pages per layer and head) */

/* What the loading client tells the test, in shared memory. */
struct crash_shared {
	uint32_t synced[NS];  /* tokens kvtier_seq_sync said were on NVMe */
	uint32_t attempt[NS]; /* tokens an append may have reached (sent, maybe not acked) */
	uint32_t removing[NS]; /* between the start of a remove and the counters' reset */
	uint32_t appends, syncs, selects, removes;
	uint32_t ready; /* the client has its sequences open: the kill may come */
};

static void name_of(unsigned i, char *buf, size_t len)
{
	snprintf(buf, len, "session/%u", i);
}

/* Appends, syncs and selects over the named sequences until the daemon goes. */
static void crash_client(struct rel_daemon *d, struct crash_shared *sh, uint64_t seed)
{
	struct kvtier_client *c = rel_attach(d, "crash", 0);
	if (!c)
		_exit(2);
	uint32_t id[NS], cur[NS];
	for (unsigned i = 0; i < NS; i++) {
		char name[32];
		name_of(i, name, sizeof(name));
		if (kvtier_seq_open(c, name, KVTIER_SEQ_CREATE, &id[i], &cur[i]))
			_exit(3);
	}
	__atomic_store_n(&sh->ready, 1, __ATOMIC_RELEASE);
	struct kvtier_table *tab = kvtier_table_create(c, 1);
	float q[QN];
	int ret = 0;
	for (uint64_t x = seed | 1; ret == 0;) {
		x ^= x << 13, x ^= x >> 7, x ^= x << 17;
		/* mostly decode-sized appends, now and then a prefill chunk */
		unsigned i = (unsigned)(x % NS),
			 n = (x >> 40) % 4 ? 1 + (unsigned)(x >> 8) % 4 : 1 + (unsigned)(x >> 8) % 60;
		if (cur[i] + n > MAXTOK) { /* full: remove it and start it again */
			char name[32];
			name_of(i, name, sizeof(name));
			sh->removing[i] = 1;
			if ((ret = kvtier_seq_close(c, id[i])) < 0 ||
			    (ret = kvtier_seq_remove(c, name)) < 0)
				break;
			sh->synced[i] = sh->attempt[i] = 0;
			sh->removing[i] = 0;
			sh->removes++;
			if ((ret = kvtier_seq_open(c, name, KVTIER_SEQ_CREATE | KVTIER_SEQ_EXCL, &id[i],
						   &cur[i])) < 0)
				break;
			continue;
		}
		{
			if (sh->attempt[i] < cur[i] + n)
				sh->attempt[i] = cur[i] + n;
			if ((ret = rel_append(c, id[i], 100 + i, cur[i], n)) < 0)
				break;
			cur[i] += n;
			sh->appends++;
		}
		if ((x >> 20) % 8 == 0) {
			uint32_t tok;
			if ((ret = kvtier_seq_sync(c, id[i], &tok)) < 0)
				break;
			if (tok > cur[i] || tok % REL_T)
				_exit(4); /* more than appended, or not whole pages */
			if (sh->synced[i] < tok)
				sh->synced[i] = tok;
			sh->syncs++;
		}
		if ((x >> 24) % 4 == 0 && cur[i] >= 4 * REL_T) {
			struct kvtier_select_params sp = {.budget_pages = 4, .sink_tokens = REL_T,
							  .window_tokens = REL_T};
			rel_query(100 + i, (uint32_t)x, 0, q);
			if ((ret = kvtier_select(c, &id[i], 1, 0, q, KVT_MEM_HOST, &sp, tab)) < 0)
				break;
			sh->selects++;
		}
	}
	_exit(ret == -ECONNRESET || ret == -EPIPE ? 0 : 5);
}

/* A torn write of a page past what was synced, as a power cut leaves one: its last
 * 512 bytes zeroed. The count torn; torn_at[i] the lowest token a tear of i cut. */
static unsigned tear(const struct rel_daemon *d, const struct crash_shared *sh, uint32_t *torn_at)
{
	char path[700];
	snprintf(path, sizeof(path), "%s/store.kvt", d->state);
	int fd = open(path, O_RDWR);
	assert_true(fd >= 0);
	off_t size = lseek(fd, 0, SEEK_END);
	unsigned torn = 0, want = 1 + (unsigned)(rel_rand() % 3);
	for (off_t off = 1 << 20; torn < want && off + 4096 <= size; off += 512) {
		struct page_hdr h;
		assert_int_equal(pread(fd, &h, sizeof(h), off), sizeof(h));
		if (h.magic != PAGE_MAGIC || !(h.key.seq >> 63) || rel_rand() % 2)
			continue;
		float k0; /* channel 0 of the first key: the salt, 100 + i */
		assert_int_equal(pread(fd, &k0, 4, off + h.hdr_size), 4);
		unsigned i = (unsigned)k0 - 100;
		if (i >= NS || h.key.index * REL_T < sh->synced[i])
			continue;
		static const uint8_t zero[512];
		assert_int_equal(pwrite(fd, zero, 512, off + h.hdr_size + h.len - 512), 512);
		if (torn_at[i] > h.key.index * REL_T)
			torn_at[i] = h.key.index * REL_T;
		torn++;
	}
	fsync(fd);
	close(fd);
	return torn;
}

static void crash_recovery(void **state)
{
	const unsigned cycles = rel_scale(12, 100);
	struct crash_shared *sh = mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE,
				       MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	assert_true(sh != MAP_FAILED);
	memset(sh, 0, sizeof(*sh));
	struct rel_daemon d;
	assert_int_equal(rel_daemon_start(&d, NULL, false), 0);
	unsigned lost = 0, phantom = 0, wrong = 0, tears = 0, cut_at_tear = 0;
	uint64_t pages_checked = 0, tokens_recovered = 0, tokens_synced = 0;
	long long bad_seen = 0;
	struct restarts rs = {0};
	for (unsigned cyc = 0; cyc <= cycles; cyc++) {
		uint32_t torn_at[NS];
		for (unsigned i = 0; i < NS; i++)
			torn_at[i] = UINT32_MAX;
		if (cyc) {
			/* the last cycle's daemon was killed under load: tear, restart */
			tears += tear(&d, sh, torn_at);
			restart(&d, &rs);
			char js[65536];
			assert_int_equal(rel_ctl(d.sock, "stats", 6, js, sizeof(js)), 0);
			const char *p = strstr(js, "\"recovered_bad\":");
			bad_seen += p ? strtoll(p + 16, NULL, 10) : 0;
		}
		/* every named sequence: at least what was synced, at most what was sent, all of
		 * it right */
		struct kvtier_client *c = rel_attach(&d, "crash", 0);
		assert_non_null(c);
		for (unsigned i = 0; i < NS; i++) {
			char name[32];
			name_of(i, name, sizeof(name));
			uint32_t id, tok;
			assert_int_equal(kvtier_seq_open(c, name, KVTIER_SEQ_CREATE, &id, &tok), 0);
			/* killed in the middle of a remove: either side of it */
			bool either = sh->removing[i] && tok == 0;
			lost += tok < sh->synced[i] && !either;
			phantom += tok > sh->attempt[i];
			if ((tok < sh->synced[i] && !either) || tok > sh->attempt[i])
				fprintf(stderr, "cycle %u: %s holds %u tokens: synced %u, sent %u\n", cyc,
					name, tok, sh->synced[i], sh->attempt[i]);
			cut_at_tear += torn_at[i] != UINT32_MAX && tok <= torn_at[i];
			unsigned checked = 0;
			int w = rel_verify(c, id, 100 + i, &checked);
			assert_true(w >= 0);
			wrong += (unsigned)w;
			pages_checked += checked;
			tokens_recovered += tok;
			tokens_synced += either ? 0 : sh->synced[i];
			sh->attempt[i] = sh->synced[i] = tok; /* the next client goes on from there */
			sh->removing[i] = 0;
			assert_int_equal(kvtier_seq_close(c, id), 0);
		}
		kvtier_detach(c);
		if (cyc == cycles)
			break;
		pid_t pid = fork();
		assert_true(pid >= 0);
		__atomic_store_n(&sh->ready, 0, __ATOMIC_RELEASE);
		if (pid == 0)
			crash_client(&d, sh, 0x9e3779b97f4a7c15ull * (cyc + 1) ^ rel_rand());
		/* the kill lands 30-150 ms into the client's appends, however slow its opens
		 * (sanitizers) were */
		for (double t0 = rel_now(); !__atomic_load_n(&sh->ready, __ATOMIC_ACQUIRE) &&
					    rel_now() - t0 < 60;) {
			siginfo_t si = {0};
			if (waitid(P_PID, (id_t)pid, &si, WEXITED | WNOHANG | WNOWAIT) == 0 && si.si_pid)
				break; /* it ended early: reaped and reported below */
			usleep(1000);
		}
		usleep((useconds_t)(30000 + rel_rand() % 120000));
		rel_daemon_kill9(&d);
		int st;
		assert_int_equal(waitpid(pid, &st, 0), pid);
		if (!WIFEXITED(st) || WEXITSTATUS(st))
			fprintf(stderr, "cycle %u: loading client exited %d\n", cyc,
				WIFEXITED(st) ? WEXITSTATUS(st) : -1);
		assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
	}
	printf("rel: crash-recovery: %u SIGKILLs of the daemon under a client appending to %u "
	       "named sequences (%u appends, %u syncs, %u selects); %llu tokens recovered "
	       "against %llu synced: %u sequences short of their sync, %u holding more than was "
	       "sent; %llu pages read back, %u wrong; %u torn writes made past the sync point, "
	       "%lld bad pages found by the scans, %u sequences ended at a tear; %u filled, "
	       "removed and made again; restart %.0f ms mean, %.0f ms max\n", cycles, NS, sh->appends, sh->syncs,
	       sh->selects, (unsigned long long)tokens_recovered,
	       (unsigned long long)tokens_synced, lost, phantom,
	       (unsigned long long)pages_checked, wrong, tears, bad_seen, cut_at_tear, sh->removes,
	       1e3 * rs.sum / cycles, 1e3 * rs.max);
	assert_int_equal(lost, 0);
	assert_int_equal(phantom, 0);
	assert_int_equal(wrong, 0);
	assert_true(bad_seen >= tears);
	assert_true(sh->syncs > 0);
	assert_int_equal(rel_daemon_stop(&d), 0);
	rel_daemon_cleanup(&d);
	munmap(sh, sizeof(*sh));
}

/* ---- 8. io_uring refused ---- */

static void deny_io_uring(void)
{
	struct sock_filter f[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = {.len = sizeof(f) / sizeof(f[0]), .filter = f};
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog))
		_exit(126);
}

static bool log_has(const struct rel_daemon *d, const char *what)
{
	FILE *f = fopen(d->log, "r");
	char line[1024];
	bool found = false;
	while (f && !found && fgets(line, sizeof(line), f))
		found = strstr(line, what) != NULL;
	if (f)
		fclose(f);
	return found;
}

static void io_uring_refused(void **state)
{
	struct rel_daemon d;
	rel_daemon_preexec = deny_io_uring;
	double t0 = rel_now();
	int r = rel_daemon_start(&d, NULL, false);
	rel_daemon_preexec = NULL;
	double took = rel_now() - t0;
	bool clear = log_has(&d, "io_uring is not available here");
	printf("rel: io_uring-refused: io_uring_setup denied by seccomp: the daemon %s in %.2f s, "
	       "its log %s\n", r ? "refused to start" : "STARTED", took,
	       clear ? "says why (kernel.io_uring_disabled or a seccomp profile)" : "does not say why");
	assert_int_not_equal(r, 0);
	assert_true(clear);
	assert_true(took < 5);
	rel_daemon_cleanup(&d);
}

/* ---- 8. no pinned memory: no CAP_IPC_LOCK, RLIMIT_MEMLOCK 64 KiB ---- */

static void no_memlock(void)
{
	struct rlimit rl = {64 << 10, 64 << 10};
	prctl(PR_CAPBSET_DROP, CAP_IPC_LOCK, 0, 0, 0);
	struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
	struct __user_cap_data_struct cd[2];
	if (syscall(SYS_capget, &h, cd) == 0) {
		for (int i = 0; i < 2; i++)
			if (CAP_IPC_LOCK / 32 == i) {
				cd[i].effective &= ~(1u << (CAP_IPC_LOCK % 32));
				cd[i].permitted &= ~(1u << (CAP_IPC_LOCK % 32));
				cd[i].inheritable &= ~(1u << (CAP_IPC_LOCK % 32));
			}
		syscall(SYS_capset, &h, cd);
	}
	if (setrlimit(RLIMIT_MEMLOCK, &rl))
		_exit(126);
}

static void memlock_exhausted(void **state)
{
	struct rel_daemon d;
	rel_daemon_preexec = no_memlock;
	int r = rel_daemon_start(&d, (const char *const[]){"tenant.host_bytes=8M", NULL}, false);
	rel_daemon_preexec = NULL;
	assert_int_equal(r, 0);
	unsigned wrong = 0;
	int served = client_run(&d, 4242, 20, &wrong);
	bool warned = log_has(&d, "not registered with io_uring");
	printf("rel: memlock: no CAP_IPC_LOCK, RLIMIT_MEMLOCK 64 KiB, host arena 8 MiB: the daemon "
	       "started, %s, served %d steps with %u wrong pages\n",
	       warned ? "warned and fell back to unregistered buffers" : "registered its buffers anyway",
	       served, wrong);
	assert_int_equal(served, 20);
	assert_int_equal(wrong, 0);
	assert_true(warned);
	assert_int_equal(rel_daemon_stop(&d), 0);
	rel_daemon_cleanup(&d);
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	signal(SIGPIPE, SIG_IGN);
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(io_uring_refused),
		cmocka_unit_test(memlock_exhausted),
		cmocka_unit_test(crash_loop),
		cmocka_unit_test(crash_recovery),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
