// SPDX-License-Identifier: MIT
/*
 * The store on the CUDA device: VMM pool exported as an fd, pages through the gather
 * kernel both ways, checked bit for bit against the host. Exits 77 (skip) without a
 * GPU or when built without CUDA.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "tiers/device.h"
#include "tiers/store.h"
#include "helpers.h"

#define PB (32u << 10)

static struct kvt_device *dev;

static void gpu_store(void **state)
{
	const char *dir = t_dir("gpu");
	struct kvt_store_params p = {
		.dev = dev,
		.nvme_path = t_path(dir, "store"),
		.nvme_bytes = 4096ull * PB,
		.host_bytes = 1024ull * PB,
		.gpu_bytes = 512ull * PB,
		.page_bytes = PB,
		.queue_depth = 64,
	};
	struct kvt_store *s;
	assert_int_equal(kvt_store_open(&p, &s), 0);
	int fd;
	void *base;
	uint64_t len;
	assert_int_equal(tier_gpu_arena_info(kvt_store_tier(s, TIER_GPU), 0, &fd, &base, &len), 0);
	assert_true(fd >= 0); /* exportable to clients */
	assert_true(len >= 512ull * PB);
	uint8_t *buf = aligned_alloc(4096, PB);
	struct t_wait w = {0};
	const uint32_t n = 3000; /* 3x the host tier, 6x the GPU pool */
	for (uint32_t i = 0; i < n; i++) {
		struct page_key k = t_key(0, 1 + i % 4, i % 32, i % 8, i);
		t_fill(buf, PB, &k);
		assert_int_equal(t_put(s, &k, buf, PB, KVT_PUT_GPU, &w), 0);
	}
	assert_int_equal(t_drain(s, &w), 0);
	assert_int_equal(kvt_store_flush(s), 0);
	/* Promote scattered pages (most from disk), check what lands on the GPU. */
	for (uint32_t i = 0; i < n; i += 11) {
		struct page_key k = t_key(0, 1 + i % 4, i % 32, i % 8, i);
		w.pending++;
		assert_int_equal(kvt_store_promote(s, &k, TIER_GPU, t_cb, &w), 0);
	}
	assert_int_equal(t_drain(s, &w), 0);
	uint32_t checked = 0;
	for (uint32_t i = 0; i < n; i += 11) {
		struct page_key k = t_key(0, 1 + i % 4, i % 32, i % 8, i);
		void *g = kvt_store_slot_ptr(s, &k, TIER_GPU);
		assert_non_null(g);
		memset(buf, 0, PB);
		assert_int_equal(dev->ops->memcpy(dev, buf, g, PB, KVT_D2H), 0);
		assert_true(t_check(buf, PB, &k));
		checked++;
	}
	/* GPU -> host through the kernel: drop host and disk copies, read back. */
	for (uint32_t i = 0; i < n; i += 11) {
		struct page_key k = t_key(0, 1 + i % 4, i % 32, i % 8, i);
		kvt_store_evict(s, &k, TIER_HOST);
		assert_int_equal(kvt_store_evict(s, &k, TIER_NVME), 0);
		struct kvt_page_info pi;
		assert_int_equal(kvt_store_page_info(s, &k, &pi), 0);
		assert_int_equal(pi.valid, 1u << TIER_GPU);
		w.pending++;
		memset(buf, 0, PB);
		assert_int_equal(kvt_store_read(s, &k, buf, PB, t_cb, &w), 0);
		assert_int_equal(t_drain(s, &w), 0);
		assert_true(t_check(buf, PB, &k));
	}
	/* And every page, wherever it is. */
	for (uint32_t i = 0; i < n; i++) {
		struct page_key k = t_key(0, 1 + i % 4, i % 32, i % 8, i);
		w.pending++;
		assert_int_equal(kvt_store_read(s, &k, buf, PB, t_cb, &w), 0);
		assert_int_equal(t_drain(s, &w), 0);
		assert_true(t_check(buf, PB, &k));
	}
	struct kvt_store_stats st;
	kvt_store_stats(s, &st);
	print_message("gpu: %u checked on the GPU, %llu gpu promotions, %llu gpu evictions\n",
		      checked, (unsigned long long)st.promotions[TIER_GPU],
		      (unsigned long long)st.evictions[TIER_GPU]);
	assert_int_equal(st.tier[TIER_GPU].errors, 0);
	kvt_store_close(s);
	free(buf);
	t_rmdir(dir);
}

int main(void)
{
	if (!kvt_device_cuda_ops || kvt_device_cuda_ops->open(&dev, 0) < 0) {
		fprintf(stderr, "no GPU: skipped\n");
		return T_EXIT_SKIP;
	}
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(gpu_store),
	};
	int r = cmocka_run_group_tests(tests, NULL, NULL);
	kvt_device_close(dev);
	return r;
}
