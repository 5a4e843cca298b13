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
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"

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

static void crash_loop(void **state)
{
	const unsigned cycles = rel_scale(10, 100);
	struct rel_daemon d;
	assert_int_equal(rel_daemon_start(&d, NULL, false), 0);
	unsigned wrong = 0, resets = 0, other = 0, served = 0;
	double restart_max = 0, restart_sum = 0;
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
			if (msg[0] == -ECONNRESET || msg[0] == -EPIPE)
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
		double t0 = rel_now();
		assert_int_equal(rel_daemon_start(&d, NULL, true), 0);
		double t = rel_now() - t0;
		restart_sum += t;
		if (t > restart_max)
			restart_max = t;
		/* the new daemon serves from scratch */
		int r = client_run(&d, 9000 + cyc, 3, &wrong);
		assert_int_equal(r, 3);
		served++;
	}
	printf("rel: crash-loop: %u SIGKILLs of the daemon under 3 clients each: %u clients saw "
	       "ECONNRESET, %u something else; restart to serving %.0f ms mean, %.0f ms max; "
	       "%u fresh clients served after restarts, %u wrong pages\n", cycles, resets, other,
	       1e3 * restart_sum / cycles, 1e3 * restart_max, served, wrong);
	assert_int_equal(wrong, 0);
	assert_int_equal(other, 0);
	assert_int_equal(rel_daemon_stop(&d), 0);
	rel_daemon_cleanup(&d);
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
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
