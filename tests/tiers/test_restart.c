// SPDX-License-Identifier: MIT
/*
 * Restart: a process writing pages is killed with SIGKILL; the store reopened finds
 * every page whose write-back had completed, bit for bit, and drops torn ones.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "tiers/store.h"
#include "helpers.h"

#define PB     (32u << 10)
#define NPAGES 6000

/* Shared with the child: which pages it saw written back. */
struct board {
	_Atomic uint32_t done[NPAGES];
	_Atomic uint32_t ndone;
	_Atomic int ready;
};

static struct kvt_store_params params(const char *path)
{
	return (struct kvt_store_params){
		.device = "cpu",
		.nvme_path = path,
		.nvme_bytes = (uint64_t)NPAGES * PB,
		.host_bytes = 16u << 20,
		.page_bytes = PB,
		.queue_depth = 32,
	};
}

struct wb {
	struct board *b;
	uint32_t i;
};

static void wb_done(void *arg, int res)
{
	struct wb *w = arg;
	if (res == 0) {
		atomic_store(&w->b->done[w->i], 1);
		atomic_fetch_add(&w->b->ndone, 1);
	}
	free(w);
}

static void writer(const char *path, struct board *b)
{
	struct kvt_store_params p = params(path);
	struct kvt_store *s;
	if (kvt_store_open(&p, &s))
		_exit(2);
	uint8_t *buf = aligned_alloc(4096, PB);
	atomic_store(&b->ready, 1);
	for (uint32_t i = 0; i < NPAGES; i++) {
		struct page_key k = t_key(0, 1 + i % 5, (uint16_t)(i % 32), 0, i);
		t_fill(buf, PB, &k);
		if (t_put(s, &k, buf, PB, 0, NULL))
			_exit(3);
		struct wb *w = malloc(sizeof(*w));
		w->b = b;
		w->i = i;
		if (kvt_store_writeback(s, &k, wb_done, w))
			_exit(4);
		kvt_store_run(s, 0);
	}
	for (;;)
		kvt_store_run(s, 100); /* until killed */
}

static void kill9_mid_write(void **state)
{
	const char *dir = t_dir("restart");
	char path[4400];
	snprintf(path, sizeof(path), "%s/store", dir);
	struct board *b = mmap(NULL, sizeof(*b), PROT_READ | PROT_WRITE,
			       MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	assert_ptr_not_equal(b, MAP_FAILED);
	memset(b, 0, sizeof(*b));
	pid_t pid = fork();
	assert_true(pid >= 0);
	if (pid == 0)
		writer(path, b);
	/* Kill it while it writes: after a third of the pages are on disk. */
	for (int i = 0; i < 60000 && atomic_load(&b->ndone) < NPAGES / 3; i++) {
		int st;
		if (waitpid(pid, &st, WNOHANG) == pid)
			fail_msg("writer exited early: %d", WEXITSTATUS(st));
		usleep(1000);
	}
	kill(pid, SIGKILL);
	int st;
	assert_int_equal(waitpid(pid, &st, 0), pid);
	assert_true(WIFSIGNALED(st));
	uint32_t acked = atomic_load(&b->ndone);
	assert_true(acked >= NPAGES / 3);
	assert_true(acked < NPAGES); /* it really died mid-write */

	struct kvt_store_params p = params(path);
	struct kvt_store *s;
	assert_int_equal(kvt_store_open(&p, &s), 0);
	struct kvt_store_stats stats;
	kvt_store_stats(s, &stats);
	print_message("killed after %u acknowledged write-backs; found %llu pages, %llu bad\n",
		      acked, (unsigned long long)stats.recovered_pages,
		      (unsigned long long)stats.recovered_bad);
	assert_true(stats.recovered_pages >= acked);
	uint8_t *buf = aligned_alloc(4096, PB);
	uint32_t found = 0;
	for (uint32_t i = 0; i < NPAGES; i++) {
		struct page_key k = t_key(0, 1 + i % 5, (uint16_t)(i % 32), 0, i);
		struct kvt_page_info pi;
		int r = kvt_store_page_info(s, &k, &pi);
		if (atomic_load(&b->done[i]))
			assert_int_equal(r, 0); /* every acknowledged page is back */
		if (r)
			continue;
		assert_int_equal(pi.state, KVT_PAGE_CLEAN);
		struct t_wait w = {.pending = 1};
		assert_int_equal(kvt_store_read(s, &k, buf, PB, t_cb, &w), 0);
		assert_int_equal(t_drain(s, &w), 0);
		assert_true(t_check(buf, PB, &k));
		found++;
	}
	assert_int_equal(found, stats.recovered_pages);
	/* Torn pages were wiped: a second restart finds the same pages and nothing bad. */
	kvt_store_close(s);
	assert_int_equal(kvt_store_open(&p, &s), 0);
	kvt_store_stats(s, &stats);
	assert_int_equal(stats.recovered_pages, found);
	assert_int_equal(stats.recovered_bad, 0);
	kvt_store_close(s);
	free(buf);
	munmap(b, sizeof(*b));
	t_rmdir(dir);
}

static void torn_page_dropped(void **state)
{
	const char *dir = t_dir("torn");
	char path[4400];
	snprintf(path, sizeof(path), "%s/store", dir);
	struct kvt_store_params p = params(path);
	p.nvme_bytes = 64 * PB;
	struct kvt_store *s;
	assert_int_equal(kvt_store_open(&p, &s), 0);
	uint8_t *buf = aligned_alloc(4096, PB);
	for (uint32_t i = 0; i < 4; i++) {
		struct page_key k = t_key(0, 9, 0, 0, i);
		t_fill(buf, PB, &k);
		assert_int_equal(t_put(s, &k, buf, PB, 0, NULL), 0);
	}
	assert_int_equal(kvt_store_flush(s), 0);
	struct kvt_page_info pi;
	struct page_key k2 = t_key(0, 9, 0, 0, 2);
	assert_int_equal(kvt_store_page_info(s, &k2, &pi), 0);
	struct tier *nv = kvt_store_tier(s, TIER_NVME);
	uint32_t hs = nv->ops->hdr_size(nv);
	uint32_t a = nv->ops->io_align(nv);
	uint64_t off = (1u << 20) + TIER_SLOT_INDEX(pi.slot[TIER_NVME]) * (uint64_t)((hs + PB + a - 1) / a * a);
	kvt_store_close(s);
	/* Tear page 2: its second half from another write. */
	int fd = open(path, O_RDWR);
	memset(buf, 0x77, PB / 2);
	assert_int_equal(pwrite(fd, buf, PB / 2, (off_t)(off + hs + PB / 2)), PB / 2);
	close(fd);
	assert_int_equal(kvt_store_open(&p, &s), 0);
	struct kvt_store_stats st;
	kvt_store_stats(s, &st);
	assert_int_equal(st.recovered_pages, 3);
	assert_int_equal(st.recovered_bad, 1);
	assert_int_equal(kvt_store_page_info(s, &k2, &pi), -ENOENT);
	kvt_store_close(s);
	free(buf);
	t_rmdir(dir);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(kill9_mid_write),
		cmocka_unit_test(torn_page_dropped),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
