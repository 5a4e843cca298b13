// SPDX-License-Identifier: MIT
/*
 * Faults: each gives a clean error or a counted miss, never wrong data. Injected
 * through the fault-injection tier (tiers/tier_fault.h: EIO, short read, ENOSPC) or done to the store file itself
 * (a flipped byte, a stale page at a reused slot, a second opener).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tiers/store.h"
#include "tiers/tier_fault.h"
#include "helpers.h"

#define PB (32u << 10)
#define DATA_OFF (1u << 20) /* tier_nvme.c's layout */

static struct tier_fault_cfg *fc; /* the store's wrapper */

struct fx {
	const char *dir;
	struct kvt_store *s;
	struct kvt_store_params p;
	uint8_t *buf;
};

static int setup(void **state)
{
	struct fx *f = calloc(1, sizeof(*f));
	f->dir = strdup(t_dir("faults"));
	f->p = (struct kvt_store_params){
		.device = "cpu",
		.nvme_path = strdup(t_path(f->dir, "store")),
		.nvme_bytes = 256 * PB,
		.host_bytes = 4u << 20,
		.gpu_bytes = 2u << 20,
		.page_bytes = PB,
		.queue_depth = 16,
		.faults = "hang_ms=5000", /* the wrapper, nothing injected until a test says */
	};
	f->buf = aligned_alloc(4096, PB);
	int r = kvt_store_open(&f->p, &f->s);
	if (r == -EPERM || r == -ENOSYS)
		return -1;
	assert_int_equal(r, 0);
	fc = tier_fault_cfg(kvt_store_tier(f->s, TIER_NVME));
	assert_non_null(fc);
	*state = f;
	return 0;
}

static int teardown(void **state)
{
	struct fx *f = *state;
	kvt_store_close(f->s);
	t_rmdir(f->dir);
	free((void *)f->p.nvme_path);
	free((void *)f->dir);
	free(f->buf);
	free(f);
	return 0;
}

/* Puts pages of seq, writes them back and drops their memory copies. */
static void on_disk_only(struct fx *f, uint64_t seq, uint32_t n)
{
	struct kvt_store *s = f->s;
	for (uint32_t i = 0; i < n; i++) {
		struct page_key k = t_key(0, seq, 0, 0, i);
		t_fill(f->buf, PB, &k);
		assert_int_equal(t_put(s, &k, f->buf, PB, 0, NULL), 0);
	}
	assert_int_equal(kvt_store_flush(s), 0);
	for (uint32_t i = 0; i < n; i++) {
		struct page_key k = t_key(0, seq, 0, 0, i);
		assert_int_equal(kvt_store_evict(s, &k, TIER_HOST), 0);
	}
}

static int read_page(struct fx *f, const struct page_key *k)
{
	struct t_wait w = {.pending = 1};
	memset(f->buf, 0x5a, PB);
	int r = kvt_store_read(f->s, k, f->buf, PB, t_cb, &w);
	if (r)
		return r;
	return t_drain(f->s, &w);
}

static uint64_t file_off(struct fx *f, const struct page_key *k, uint32_t payload_off)
{
	struct kvt_page_info pi;
	assert_int_equal(kvt_store_page_info(f->s, k, &pi), 0);
	struct tier *nv = kvt_store_tier(f->s, TIER_NVME);
	uint32_t hs = nv->ops->hdr_size(nv);
	uint32_t a = nv->ops->io_align(nv);
	uint32_t slot_size = (hs + PB + a - 1) / a * a;
	return DATA_OFF + TIER_SLOT_INDEX(pi.slot[TIER_NVME]) * slot_size + hs + payload_off;
}

static void eio_on_nth_read(void **state)
{
	struct fx *f = *state;
	on_disk_only(f, 1, 8);
	fc->reads = 0;
	fc->nth[FAULT_READ_EIO] = 3;
	int bad = 0;
	for (uint32_t i = 0; i < 8; i++) {
		struct page_key k = t_key(0, 1, 0, 0, i);
		int r = read_page(f, &k);
		if (r) {
			assert_int_equal(r, -EIO);
			bad++;
		} else {
			assert_true(t_check(f->buf, PB, &k));
		}
	}
	assert_int_equal(bad, 1);
	struct kvt_store_stats st;
	kvt_store_stats(f->s, &st);
	assert_int_equal(st.read_errors, 1);
	assert_int_equal(st.pages_lost, 1); /* its only copy: a counted loss, not bad data */
	assert_int_equal(st.pages, 7);
}

static void short_read(void **state)
{
	struct fx *f = *state;
	on_disk_only(f, 2, 4);
	fc->reads = 0;
	fc->nth[FAULT_READ_SHORT] = 1;
	/* A page with a second copy on the GPU survives a bad disk read. */
	struct page_key k = t_key(0, 2, 0, 0, 0);
	struct t_wait w = {.pending = 1};
	fc->nth[FAULT_READ_SHORT] = 0;
	assert_int_equal(kvt_store_promote(f->s, &k, TIER_GPU, t_cb, &w), 0);
	assert_int_equal(t_drain(f->s, &w), 0);
	assert_int_equal(kvt_store_evict(f->s, &k, TIER_HOST), 0);
	fc->reads = 0;
	fc->nth[FAULT_READ_SHORT] = 1;
	struct page_key k1 = t_key(0, 2, 0, 0, 1);
	assert_int_equal(read_page(f, &k1), -EIO);
	assert_int_equal(read_page(f, &k), 0); /* from the GPU copy */
	assert_true(t_check(f->buf, PB, &k));
	/* A real short read: the file cut in the middle of the last page written. */
	struct page_key k3 = t_key(0, 2, 0, 0, 3);
	int fd = open(f->p.nvme_path, O_RDWR);
	assert_true(fd >= 0);
	assert_int_equal(ftruncate(fd, (off_t)file_off(f, &k3, PB / 2)), 0);
	close(fd);
	fc->nth[FAULT_READ_SHORT] = 0;
	assert_int_equal(read_page(f, &k3), -EIO);
	struct kvt_store_stats st;
	kvt_store_stats(f->s, &st);
	assert_int_equal(st.read_errors, 2);
	assert_int_equal(st.tier[TIER_NVME].err[TIER_ERR_SHORT], 2); /* injected, and real */
}

static void enospc_on_write(void **state)
{
	struct fx *f = *state;
	fc->writes = 0;
	fc->nth[FAULT_WRITE_ENOSPC] = 2;
	on_disk_only(f, 3, 6);
	struct kvt_store_stats st;
	kvt_store_stats(f->s, &st);
	assert_int_equal(st.write_errors, 1);
	assert_int_equal(st.tier[TIER_NVME].poisoned, 1); /* never trusted again */
	for (uint32_t i = 0; i < 6; i++) {
		struct page_key k = t_key(0, 3, 0, 0, i);
		assert_int_equal(read_page(f, &k), 0);
		assert_true(t_check(f->buf, PB, &k));
	}
}

static void flipped_byte(void **state)
{
	struct fx *f = *state;
	on_disk_only(f, 4, 3);
	struct page_key k = t_key(0, 4, 0, 0, 1);
	int fd = open(f->p.nvme_path, O_RDWR);
	assert_true(fd >= 0);
	uint8_t b;
	uint64_t off = file_off(f, &k, 12345);
	assert_int_equal(pread(fd, &b, 1, (off_t)off), 1);
	b ^= 0x10;
	assert_int_equal(pwrite(fd, &b, 1, (off_t)off), 1);
	fsync(fd);
	close(fd);
	assert_int_equal(read_page(f, &k), -EBADMSG);
	struct kvt_store_stats st;
	kvt_store_stats(f->s, &st);
	assert_int_equal(st.tier[TIER_NVME].err[TIER_ERR_CORRUPT], 1);
	for (uint32_t i = 0; i < 3; i += 2) {
		struct page_key o = t_key(0, 4, 0, 0, i);
		assert_int_equal(read_page(f, &o), 0);
		assert_true(t_check(f->buf, PB, &o));
	}
}

/*
 * A read of a page whose checksum the store remembers moves the payload alone, checked
 * against that checksum: a damaged header is not read, and the page is still served
 * right; a damaged payload is caught (flipped_byte).
 */
static void flipped_header_byte(void **state)
{
	struct fx *f = *state;
	struct tier *nv = kvt_store_tier(f->s, TIER_NVME);
	uint32_t hs = nv->ops->hdr_size(nv), a = nv->ops->io_align(nv);
	if (hs % a)
		skip(); /* a header smaller than the block: every read reads it */
	on_disk_only(f, 8, 2);
	struct page_key k = t_key(0, 8, 0, 0, 1);
	int fd = open(f->p.nvme_path, O_RDWR);
	assert_true(fd >= 0);
	uint8_t b;
	uint64_t off = file_off(f, &k, 0) - hs + offsetof(struct page_hdr, key);
	assert_int_equal(pread(fd, &b, 1, (off_t)off), 1);
	b ^= 0x01;
	assert_int_equal(pwrite(fd, &b, 1, (off_t)off), 1);
	fsync(fd);
	close(fd);
	assert_int_equal(read_page(f, &k), 0);
	assert_true(t_check(f->buf, PB, &k));
	struct kvt_store_stats st;
	kvt_store_stats(f->s, &st);
	assert_int_equal(st.tier[TIER_NVME].errors, 0);
}

static void stale_at_reused_slot(void **state)
{
	struct fx *f = *state;
	on_disk_only(f, 5, 1);
	struct page_key old = t_key(0, 5, 0, 0, 0);
	uint64_t off = file_off(f, &old, 0);
	struct tier *nv = kvt_store_tier(f->s, TIER_NVME);
	uint32_t hs = nv->ops->hdr_size(nv);
	/* Keep the old page's bytes, header included. */
	uint8_t *saved = malloc(hs + PB);
	int fd = open(f->p.nvme_path, O_RDWR);
	assert_int_equal(pread(fd, saved, hs + PB, (off_t)(off - hs)), (ssize_t)(hs + PB));
	assert_int_equal(kvt_store_drop_seq(f->s, 0, 5), 0);
	for (int i = 0; i < 20; i++)
		kvt_store_run(f->s, 5); /* the wipe lands, the slot is free */
	/* The next page takes the freed slot (LIFO). */
	struct page_key k = t_key(0, 6, 0, 0, 0);
	t_fill(f->buf, PB, &k);
	assert_int_equal(t_put(f->s, &k, f->buf, PB, 0, NULL), 0);
	assert_int_equal(kvt_store_flush(f->s), 0);
	assert_int_equal(file_off(f, &k, 0), off);
	assert_int_equal(kvt_store_evict(f->s, &k, TIER_HOST), 0);
	/* Put the old page back where the new one is: a valid page, but not this one. */
	assert_int_equal(pwrite(fd, saved, hs + PB, (off_t)(off - hs)), (ssize_t)(hs + PB));
	fsync(fd);
	close(fd);
	free(saved);
	assert_int_equal(read_page(f, &k), -ESTALE);
	struct kvt_store_stats st;
	kvt_store_stats(f->s, &st);
	assert_int_equal(st.tier[TIER_NVME].err[TIER_ERR_STALE], 1);
}

static void second_opener(void **state)
{
	struct fx *f = *state;
	struct kvt_store *s2;
	struct kvt_store_params p = f->p;
	p.nvme_ops = NULL;
	assert_int_equal(kvt_store_open(&p, &s2), -EBUSY); /* same process */
#ifndef __SANITIZE_THREAD__ /* TSan's runtime cannot start threads in a child forked
			     * from a threaded process (the store's copy thread) */
	pid_t pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		struct kvt_store *s3;
		_exit(kvt_store_open(&p, &s3) == -EBUSY ? 0 : 1);
	}
	int st;
	assert_int_equal(waitpid(pid, &st, 0), pid);
	assert_true(WIFEXITED(st));
	assert_int_equal(WEXITSTATUS(st), 0); /* another process */
#endif
	/* And the store still works. */
	on_disk_only(f, 7, 2);
	struct page_key k = t_key(0, 7, 0, 0, 1);
	assert_int_equal(read_page(f, &k), 0);
	assert_true(t_check(f->buf, PB, &k));
}

/*
 * A store larger than its filesystem's free space: a clear -ENOSPC at open, and the
 * file takes no more of the disk than before (ext4's fallocate would take every free
 * block before failing, and keep them).
 */
static void larger_than_disk(void **state)
{
	struct fx *f = *state;
	struct statvfs vs;
	assert_int_equal(statvfs(f->dir, &vs), 0);
	const uint64_t free_b = (uint64_t)vs.f_bavail * vs.f_frsize;
	char *path = strdup(t_path(f->dir, "big"));
	struct kvt_store_params p = f->p;
	p.nvme_path = path;
	p.nvme_ops = NULL;
	p.faults = NULL;
	p.nvme_bytes = free_b + (64ull << 30);
	struct kvt_store *s2 = NULL;
	assert_int_equal(kvt_store_open(&p, &s2), -ENOSPC);
	assert_null(s2);
	struct stat st;
	if (stat(path, &st) == 0)
		assert_true((uint64_t)st.st_blocks * 512 < (1u << 20));
	/* the free space the filesystem had is still there (give or take others' use) */
	assert_int_equal(statvfs(f->dir, &vs), 0);
	assert_true((uint64_t)vs.f_bavail * vs.f_frsize + (256u << 20) > free_b);
	unlink(path);
	free(path);
	/* the store that fits still works */
	on_disk_only(f, 9, 2);
	struct page_key k = t_key(0, 9, 0, 0, 1);
	assert_int_equal(read_page(f, &k), 0);
	assert_true(t_check(f->buf, PB, &k));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(eio_on_nth_read, setup, teardown),
		cmocka_unit_test_setup_teardown(short_read, setup, teardown),
		cmocka_unit_test_setup_teardown(enospc_on_write, setup, teardown),
		cmocka_unit_test_setup_teardown(flipped_byte, setup, teardown),
		cmocka_unit_test_setup_teardown(flipped_header_byte, setup, teardown),
		cmocka_unit_test_setup_teardown(stale_at_reused_slot, setup, teardown),
		cmocka_unit_test_setup_teardown(second_opener, setup, teardown),
		cmocka_unit_test_setup_teardown(larger_than_disk, setup, teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
