// SPDX-License-Identifier: MIT
/* Integration tests of the page store on real files (O_DIRECT, io_uring), cpu device. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tiers/device.h"
#include "tiers/store.h"
#include "helpers.h"

#define PB (32u << 10)

struct fx {
	const char *dir;
	struct kvt_store *s;
	struct kvt_store_params p;
	uint8_t *buf;
};

static struct kvt_store_params params(const char *dir, uint64_t nvme, uint64_t host,
				      uint64_t gpu)
{
	struct kvt_store_params p = {
		.device = "cpu",
		.nvme_path = strdup(t_path(dir, "store")),
		.nvme_bytes = nvme,
		.host_bytes = host,
		.gpu_bytes = gpu,
		.page_bytes = PB,
		.queue_depth = 32,
	};
	return p;
}

/* queue_depth 0: params()'s; page_bytes 0: PB */
static int setup_pb(void **state, const char *name, uint64_t nvme, uint64_t host, uint64_t gpu,
		    unsigned qd, unsigned bg, uint32_t page_bytes)
{
	struct fx *f = calloc(1, sizeof(*f));
	f->dir = strdup(t_dir(name));
	f->p = params(f->dir, nvme, host, gpu);
	if (qd)
		f->p.queue_depth = qd;
	if (page_bytes)
		f->p.page_bytes = page_bytes;
	f->p.background_depth = bg;
	f->buf = aligned_alloc(4096, (f->p.page_bytes + 4095) & ~4095u);
	int r = kvt_store_open(&f->p, &f->s);
	if (r == -EPERM || r == -ENOSYS) {
		free(f);
		return -1; /* io_uring not allowed here */
	}
	assert_int_equal(r, 0);
	*state = f;
	return 0;
}

static int setup_qd(void **state, const char *name, uint64_t nvme, uint64_t host, uint64_t gpu,
		    unsigned qd, unsigned bg)
{
	return setup_pb(state, name, nvme, host, gpu, qd, bg, 0);
}

static int setup(void **state, const char *name, uint64_t nvme, uint64_t host, uint64_t gpu)
{
	return setup_qd(state, name, nvme, host, gpu, 0, 0);
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

static int setup_small(void **state)
{
	return setup(state, "small", 64u << 20, 4u << 20, 2u << 20);
}

/* Pages 0..n-1 of sequence seq (layer 0, head 0) promoted to tier, all landed. */
static void promote_pages(struct kvt_store *s, uint64_t seq, uint32_t n, enum tier_id tier)
{
	struct t_wait w = {0};
	for (uint32_t i = 0; i < n; i++) {
		struct page_key k = t_key(0, seq, 0, 0, i);
		w.pending++;
		assert_int_equal(kvt_store_promote(s, &k, tier, t_cb, &w), 0);
	}
	assert_int_equal(t_drain(s, &w), 0);
}

static void read_verify(struct kvt_store *s, const struct page_key *k, uint8_t *buf)
{
	struct t_wait w = {.pending = 1};
	memset(buf, 0xa5, PB);
	assert_int_equal(kvt_store_read(s, k, buf, PB, t_cb, &w), 0);
	assert_int_equal(t_drain(s, &w), 0);
	assert_true(t_check(buf, PB, k));
}

/* At least 1 GiB of pages through put, write-back, eviction and promotion. */
static void gigabyte(void **state)
{
	struct fx *f;
	if (setup(state, "gig", 1100ull << 20, 192u << 20, 64u << 20))
		skip();
	f = *state;
	struct kvt_store *s = f->s;
	const uint32_t layers = 32, heads = 8, pages = 128; /* 32768 pages = 1 GiB */
	struct t_wait w = {0};
	for (uint32_t i = 0; i < pages; i++)
		for (uint32_t l = 0; l < layers; l++)
			for (uint32_t h = 0; h < heads; h++) {
				struct page_key k = t_key(0, 1 + i % 3, l, h, i);
				t_fill(f->buf, PB, &k);
				unsigned fl = (i % 4 == 0) ? KVT_PUT_GPU : 0;
				assert_int_equal(t_put(s, &k, f->buf, PB, fl, &w), 0);
			}
	assert_int_equal(t_drain(s, &w), 0);
	assert_int_equal(kvt_store_flush(s), 0);
	struct kvt_store_stats st;
	kvt_store_stats(s, &st);
	assert_int_equal(st.pages, 32768);
	assert_int_equal(st.pages_dirty, 0);
	assert_true(st.writebacks >= 32768);
	/* The host tier (192 MiB) and GPU (64 MiB) hold a fraction: the rest was evicted. */
	assert_true(st.evictions[TIER_HOST] > 20000);
	assert_true(st.evictions[TIER_GPU] > 0);
	assert_true(st.tier[TIER_HOST].used <= st.tier[TIER_HOST].slots);
	assert_int_equal(st.tier[TIER_NVME].used, 32768);

	/* Promote a scattered set to the GPU (from disk mostly) and check it there. */
	struct kvt_device *dev = kvt_store_device(s);
	int n = 0;
	for (uint32_t i = 0; i < pages; i += 7)
		for (uint32_t l = 0; l < layers; l += 5) {
			struct page_key k = t_key(0, 1 + i % 3, l, (i + l) % heads, i);
			w.pending++;
			assert_int_equal(kvt_store_promote(s, &k, TIER_GPU, t_cb, &w), 0);
			n++;
		}
	assert_int_equal(t_drain(s, &w), 0);
	for (uint32_t i = 0; i < pages; i += 7)
		for (uint32_t l = 0; l < layers; l += 5) {
			struct page_key k = t_key(0, 1 + i % 3, l, (i + l) % heads, i);
			void *g = kvt_store_slot_ptr(s, &k, TIER_GPU);
			if (!g)
				continue; /* evicted again by a later promotion: fine */
			assert_int_equal(dev->ops->memcpy(dev, f->buf, g, PB, KVT_D2H), 0);
			assert_true(t_check(f->buf, PB, &k));
		}
	/* Every page, bit for bit, wherever it is now. */
	for (uint32_t i = 0; i < pages; i++)
		for (uint32_t l = 0; l < layers; l++)
			for (uint32_t h = 0; h < heads; h++) {
				struct page_key k = t_key(0, 1 + i % 3, l, h, i);
				w.pending++;
				assert_int_equal(kvt_store_read(s, &k, f->buf, PB, t_cb, &w), 0);
				assert_int_equal(t_drain(s, &w), 0);
				assert_true(t_check(f->buf, PB, &k));
			}
	kvt_store_stats(s, &st);
	assert_true(st.promotions[TIER_HOST] > 20000);
	assert_true(st.promotions[TIER_GPU] >= (uint64_t)n);
	assert_int_equal(st.read_errors, 0);
	print_message("1 GiB: %llu write-backs, %llu host / %llu gpu promotions, "
		      "%llu host / %llu gpu evictions\n",
		      (unsigned long long)st.writebacks,
		      (unsigned long long)st.promotions[TIER_HOST],
		      (unsigned long long)st.promotions[TIER_GPU],
		      (unsigned long long)st.evictions[TIER_HOST],
		      (unsigned long long)st.evictions[TIER_GPU]);
}

static void evict_rules(void **state)
{
	struct fx *f = *state;
	struct kvt_store *s = f->s;
	struct page_key k = t_key(0, 9, 0, 0, 0);
	t_fill(f->buf, PB, &k);
	struct t_wait w = {0};
	assert_int_equal(t_put(s, &k, f->buf, PB, KVT_PUT_GPU, &w), 0);
	assert_int_equal(t_drain(s, &w), 0);
	struct kvt_page_info pi;
	assert_int_equal(kvt_store_page_info(s, &k, &pi), 0);
	assert_true(pi.valid & (1u << TIER_GPU));
	assert_int_equal(kvt_store_pin(s, &k), 0);
	assert_int_equal(kvt_store_evict(s, &k, TIER_GPU), -EBUSY);
	assert_int_equal(kvt_store_unpin(s, &k), 0);
	assert_int_equal(kvt_store_unpin(s, &k), -EINVAL);
	assert_int_equal(kvt_store_evict(s, &k, TIER_GPU), 0);
	assert_int_equal(kvt_store_evict(s, &k, TIER_GPU), -ENOENT);
	/* Wait for the write-back, then the host copy may go: the disk has it. */
	w.pending++;
	assert_int_equal(kvt_store_writeback(s, &k, t_cb, &w), 0);
	assert_int_equal(t_drain(s, &w), 0);
	assert_int_equal(kvt_store_evict(s, &k, TIER_HOST), 0);
	assert_int_equal(kvt_store_evict(s, &k, TIER_NVME), -EPERM); /* the last copy */
	assert_int_equal(kvt_store_page_info(s, &k, &pi), 0);
	assert_int_equal(pi.valid, 1u << TIER_NVME);
	assert_int_equal(pi.state, KVT_PAGE_CLEAN);
	read_verify(s, &k, f->buf);
	/* Unknown page, bad input. */
	struct page_key nope = t_key(0, 1234, 0, 0, 0);
	assert_int_equal(kvt_store_promote(s, &nope, TIER_GPU, NULL, NULL), -ENOENT);
	assert_int_equal(kvt_store_put(s, &k, f->buf, PB, 0, NULL, NULL), -EEXIST);
	assert_int_equal(kvt_store_put(s, &nope, f->buf, PB + 1, 0, NULL, NULL), -EINVAL);
	assert_int_equal(kvt_store_put(s, &nope, f->buf, PB, 1u << 9, NULL, NULL), -EINVAL);
	assert_int_equal(kvt_store_promote(s, &k, TIER_NVME, NULL, NULL), -EINVAL);
}

/* Pinned pages stay where they are while the tier is under pressure. */
static void pins_hold(void **state)
{
	struct fx *f = *state;
	struct kvt_store *s = f->s;
	/* GPU tier: 2 MiB = 64 slots. Pin 16 pages on the GPU, then push 200 through. */
	struct t_wait w = {0};
	for (uint32_t i = 0; i < 16; i++) {
		struct page_key k = t_key(0, 50, 0, 0, i);
		t_fill(f->buf, PB, &k);
		assert_int_equal(t_put(s, &k, f->buf, PB, KVT_PUT_GPU, &w), 0);
	}
	assert_int_equal(t_drain(s, &w), 0);
	for (uint32_t i = 0; i < 16; i++) {
		struct page_key k = t_key(0, 50, 0, 0, i);
		assert_int_equal(kvt_store_pin(s, &k), 0);
	}
	for (uint32_t i = 0; i < 200; i++) {
		struct page_key k = t_key(0, 51, 0, 0, i);
		t_fill(f->buf, PB, &k);
		assert_int_equal(t_put(s, &k, f->buf, PB, KVT_PUT_GPU, &w), 0);
		assert_int_equal(t_drain(s, &w), 0);
	}
	for (uint32_t i = 0; i < 16; i++) {
		struct page_key k = t_key(0, 50, 0, 0, i);
		struct kvt_page_info pi;
		assert_int_equal(kvt_store_page_info(s, &k, &pi), 0);
		assert_true(pi.valid & (1u << TIER_GPU));
		assert_true(pi.valid & (1u << TIER_HOST));
	}
	assert_int_equal(kvt_store_drop_seq(s, 0, 50), -EBUSY);
	for (uint32_t i = 0; i < 16; i++) {
		struct page_key k = t_key(0, 50, 0, 0, i);
		assert_int_equal(kvt_store_unpin(s, &k), 0);
	}
	assert_int_equal(kvt_store_drop_seq(s, 0, 50), 0);
	assert_int_equal(kvt_store_drop_seq(s, 0, 50), -ENOENT);
	struct page_key k = t_key(0, 50, 0, 0, 3);
	assert_int_equal(kvt_store_page_info(s, &k, NULL), -ENOENT);
}

/* kvt_store_warm is a hint: for keys there, absent, and of a dropped sequence (their
 * buckets emptied), with either stage, nothing the store says or holds changes. */
static void warm_is_a_hint(void **state)
{
	struct fx *f = *state;
	struct kvt_store *s = f->s;
	struct t_wait w = {0};
	for (uint32_t i = 0; i < 32; i++) {
		struct page_key k = t_key(0, 60 + i % 2, i % 4, i % 8, i);
		t_fill(f->buf, PB, &k);
		assert_int_equal(t_put(s, &k, f->buf, PB, 0, &w), 0);
	}
	assert_int_equal(t_drain(s, &w), 0);
	assert_int_equal(kvt_store_drop_seq(s, 0, 61), 0);
	struct kvt_store_stats st0, st1;
	kvt_store_stats(s, &st0);
	for (uint32_t i = 0; i < 64; i++) { /* present (even i < 32), dropped (odd), absent */
		struct page_key k = t_key(0, 60 + i % 2, i % 4, i % 8, i);
		kvt_store_warm(s, &k, false);
		kvt_store_warm(s, &k, true);
	}
	kvt_store_stats(s, &st1);
	assert_int_equal(st1.pages, st0.pages);
	assert_int_equal(st1.pages, 16);
	assert_int_equal(st1.evictions[TIER_HOST], st0.evictions[TIER_HOST]);
	for (uint32_t i = 0; i < 64; i++) {
		struct page_key k = t_key(0, 60 + i % 2, i % 4, i % 8, i);
		struct kvt_page_info pi;
		if (i < 32 && i % 2 == 0) {
			assert_int_equal(kvt_store_page_info(s, &k, &pi), 0);
			assert_int_equal(pi.pins, 0);
			read_verify(s, &k, f->buf);
		} else {
			assert_int_equal(kvt_store_page_info(s, &k, &pi), -ENOENT);
		}
	}
}

/* The cpu device's worker lands each copy batch this late (KVT_CPU_COPY_DELAY_US). */
static int setup_slow_copies(void **state)
{
	setenv("KVT_CPU_COPY_DELAY_US", "300000", 1);
	int r = setup(state, "slow", 64u << 20, 4u << 20, 2u << 20);
	unsetenv("KVT_CPU_COPY_DELAY_US");
	return r;
}

/*
 * kvt_store_promote_queued answers once a page's copy into the GPU is queued on the
 * device, naming its slot; a copy fence recorded then, opened by another process over
 * shared memory, completes only when the copy has landed, and the slot then holds the
 * page. The worker sleeps 300 ms before each batch: the fence is still open right after
 * the record (the parent's query) and the other process's wait has something to wait
 * for.
 */
static void queued_copies(void **state)
{
	struct fx *f = *state;
	struct kvt_store *s = f->s;
	struct kvt_device *dev = kvt_store_device(s);
	struct t_wait w = {0};
	const uint32_t n = 8;
	for (uint32_t i = 0; i < n; i++) { /* in host RAM only */
		struct page_key k = t_key(0, 60, 0, 0, i);
		t_fill(f->buf, PB, &k);
		assert_int_equal(t_put(s, &k, f->buf, PB, 0, &w), 0);
	}
	assert_int_equal(t_drain(s, &w), 0);
	/* the fence's state where both processes see it */
	uint8_t *shm = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	assert_true(shm != MAP_FAILED);
	uint8_t handle[KVT_FENCE_HANDLE_BYTES];
	struct kvt_fence *fence;
	assert_int_equal(dev->ops->fence_create(dev, handle, shm, &fence), 0);
	assert_int_equal(dev->ops->fence_query(dev, fence), 0); /* nothing recorded yet */
	for (uint32_t i = 0; i < n; i++) {
		struct page_key k = t_key(0, 60, 0, 0, i);
		w.pending++;
		assert_int_equal(kvt_store_promote_queued(s, &k, t_cb, &w), 0);
	}
	/* queued: the callbacks run, the copies have not landed (300 ms) */
	assert_int_equal(t_drain(s, &w), 0);
	tier_slot_t slot[8];
	for (uint32_t i = 0; i < n; i++) {
		struct page_key k = t_key(0, 60, 0, 0, i);
		struct kvt_page_info pi;
		assert_int_equal(kvt_store_page_info(s, &k, &pi), 0);
		assert_false(pi.valid & (1u << TIER_GPU));
		assert_true(pi.queued & (1u << TIER_GPU));
		assert_true(pi.inflight & (1u << TIER_GPU));
		assert_null(kvt_store_slot_ptr(s, &k, TIER_GPU)); /* not valid there yet */
		slot[i] = pi.slot[TIER_GPU];
		/* a second queued promote is answered at once; a plain one waits */
		w.pending++;
		assert_int_equal(kvt_store_promote_queued(s, &k, t_cb, &w), 0);
	}
	assert_int_equal(kvt_store_run(s, 0) >= 0, 1);
	assert_int_equal(w.pending, 0);
	assert_int_equal(kvt_store_copy_fence(s, fence), 0);
	assert_int_equal(dev->ops->fence_query(dev, fence), -EAGAIN);
	struct tier *gt = kvt_store_tier(s, TIER_GPU);
	pid_t pid = fork();
	if (pid == 0) {
		/* another process: waits on the fence, then finds every page in its slot */
		struct kvt_fence *o;
		int bad = dev->ops->fence_open(dev, handle, shm, &o) != 0;
		bad |= !bad && dev->ops->fence_wait(dev, o) != 0;
		bad |= !bad && dev->ops->fence_query(dev, o) != 0;
		for (uint32_t i = 0; !bad && i < n; i++) {
			struct page_key k = t_key(0, 60, 0, 0, i);
			bad |= !t_check(gt->ops->slot_ptr(gt, slot[i]), PB, &k);
		}
		_exit(bad ? 1 : 0);
	}
	assert_true(pid > 0);
	int st = 0;
	assert_int_equal(waitpid(pid, &st, 0), pid);
	assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
	/* landed: valid on the GPU in the slot named, no longer queued */
	promote_pages(s, 60, n, TIER_GPU);
	for (uint32_t i = 0; i < n; i++) {
		struct page_key k = t_key(0, 60, 0, 0, i);
		struct kvt_page_info pi;
		assert_int_equal(kvt_store_page_info(s, &k, &pi), 0);
		assert_true(pi.valid & (1u << TIER_GPU));
		assert_int_equal(pi.queued, 0);
		assert_int_equal(pi.slot[TIER_GPU], slot[i]);
	}
	dev->ops->fence_destroy(dev, fence);
	munmap(shm, 4096);
	/* a page dropped while its copy is queued: the slot comes back once it lands */
	struct page_key k = t_key(0, 60, 1, 0, 0);
	t_fill(f->buf, PB, &k);
	assert_int_equal(t_put(s, &k, f->buf, PB, 0, &w), 0);
	assert_int_equal(t_drain(s, &w), 0);
	struct kvt_store_stats st0, st1;
	kvt_store_stats(s, &st0);
	w.pending++;
	assert_int_equal(kvt_store_promote_queued(s, &k, t_cb, &w), 0);
	assert_int_equal(t_drain(s, &w), 0);
	assert_int_equal(kvt_store_drop_page(s, &k), 0);
	while (kvt_store_busy(s))
		assert_true(kvt_store_run(s, 100) >= 0);
	kvt_store_stats(s, &st1);
	assert_int_equal(st1.tier[TIER_GPU].used, st0.tier[TIER_GPU].used);
}

/* Dropped sequences give their slots back, on disk too once wiped. */
static void drop_frees(void **state)
{
	struct fx *f = *state;
	struct kvt_store *s = f->s;
	struct t_wait w = {0};
	struct kvt_store_stats st0, st;
	kvt_store_stats(s, &st0);
	for (uint32_t i = 0; i < 40; i++) {
		struct page_key k = t_key(0, 60, 1, 1, i);
		t_fill(f->buf, PB, &k);
		assert_int_equal(t_put(s, &k, f->buf, PB, i % 2 ? KVT_PUT_GPU : 0, &w), 0);
	}
	/* Drop while write-backs may still be in flight. */
	kvt_store_run(s, 0);
	assert_int_equal(kvt_store_drop_seq(s, 0, 60), 0);
	int r = t_drain(s, &w); /* GPU puts complete: done, or cancelled by the drop */
	assert_true(r == 0 || r == -ECANCELED);
	assert_int_equal(w.pending, 0);
	for (int i = 0; i < 50; i++)
		kvt_store_run(s, 10);
	kvt_store_stats(s, &st);
	assert_int_equal(st.pages, st0.pages);
	assert_int_equal(st.tier[TIER_NVME].used, st0.tier[TIER_NVME].used);
	assert_int_equal(st.tier[TIER_HOST].used, st0.tier[TIER_HOST].used);
	assert_int_equal(st.tier[TIER_GPU].used, st0.tier[TIER_GPU].used);
}

static void filling_pages(void **state)
{
	struct fx *f = *state;
	struct kvt_store *s = f->s;
	struct page_key k = t_key(0, 70, 2, 3, 0);
	t_fill(f->buf, PB, &k);
	assert_int_equal(kvt_store_put(s, &k, f->buf, 4096, KVT_PUT_FILLING, NULL, NULL), 0);
	struct kvt_page_info pi;
	for (int i = 0; i < 10; i++)
		kvt_store_run(s, 5);
	assert_int_equal(kvt_store_page_info(s, &k, &pi), 0);
	assert_int_equal(pi.state, KVT_PAGE_FILLING);
	assert_false(pi.valid & (1u << TIER_NVME)); /* never written back while filling */
	assert_int_equal(kvt_store_append(s, &k, f->buf + 4096, PB, false), -EINVAL);
	for (uint32_t off = 4096; off < PB; off += 4096)
		assert_int_equal(kvt_store_append(s, &k, f->buf + off, 4096, false), 0);
	assert_int_equal(kvt_store_page_info(s, &k, &pi), 0);
	assert_int_equal(pi.state, KVT_PAGE_DIRTY); /* full: sealed */
	assert_int_equal(kvt_store_flush(s), 0);
	assert_int_equal(kvt_store_evict(s, &k, TIER_HOST), 0);
	read_verify(s, &k, f->buf);
}

struct fill_job {
	void *dst;
	struct page_key k;
};

static void *fill_thread(void *arg)
{
	struct fill_job *j = arg;
	t_fill(j->dst, PB, &j->k);
	return NULL;
}

/* A put whose bytes are copied by another thread (kvtierd's batches): the page is kept
 * and never written back until sealed, then it is as a put's. */
static void reserved_pages(void **state)
{
	struct fx *f = *state;
	struct kvt_store *s = f->s;
	struct fill_job j = {.k = t_key(0, 71, 1, 2, 0)};
	void *dst = NULL;
	assert_int_equal(kvt_store_put_reserve(s, &j.k, 0, &dst), -EINVAL);
	assert_int_equal(kvt_store_put_reserve(s, &j.k, PB + 1, &dst), -EINVAL);
	assert_int_equal(kvt_store_put_reserve(s, &j.k, PB, &j.dst), 0);
	assert_non_null(j.dst);
	assert_int_equal(kvt_store_put_reserve(s, &j.k, PB, &dst), -EEXIST);
	assert_int_equal(kvt_store_flush(s), 0);
	for (int i = 0; i < 10; i++)
		kvt_store_run(s, 5);
	struct kvt_page_info pi;
	assert_int_equal(kvt_store_page_info(s, &j.k, &pi), 0);
	assert_int_equal(pi.state, KVT_PAGE_FILLING);
	assert_int_equal(pi.valid, 1u << TIER_HOST); /* not written from a slot not yet filled */
	assert_int_equal(kvt_store_evict(s, &j.k, TIER_HOST), -EPERM); /* its one copy */
	pthread_t th;
	assert_int_equal(pthread_create(&th, NULL, fill_thread, &j), 0);
	assert_int_equal(pthread_join(th, NULL), 0);
	assert_int_equal(kvt_store_seal(s, &j.k), 0);
	assert_int_equal(kvt_store_seal(s, &j.k), -EINVAL);
	struct page_key none = t_key(0, 71, 1, 2, 1);
	assert_int_equal(kvt_store_seal(s, &none), -ENOENT);
	assert_int_equal(kvt_store_page_info(s, &j.k, &pi), 0);
	assert_int_equal(pi.state, KVT_PAGE_DIRTY);
	assert_int_equal(kvt_store_flush(s), 0);
	assert_int_equal(kvt_store_evict(s, &j.k, TIER_HOST), 0);
	read_verify(s, &j.k, f->buf); /* from disk: the bytes the thread wrote */
}

static void tenants_apart(void **state)
{
	struct fx *f = *state;
	struct kvt_store *s = f->s;
	struct page_key k = t_key(7, 1, 0, 0, 0);
	t_fill(f->buf, PB, &k);
	assert_int_equal(kvt_store_put(s, &k, f->buf, PB, 0, NULL, NULL), -ENOENT);
	assert_int_equal(kvt_store_add_tenant(s, 7, 1u << 20, 1u << 20), 0);
	struct t_wait w = {0};
	assert_int_equal(t_put(s, &k, f->buf, PB, KVT_PUT_GPU, &w), 0);
	assert_int_equal(t_drain(s, &w), 0);
	struct kvt_page_info pi;
	assert_int_equal(kvt_store_page_info(s, &k, &pi), 0);
	assert_int_not_equal(TIER_SLOT_ARENA(pi.slot[TIER_HOST]), 0); /* its own arena */
	assert_int_not_equal(TIER_SLOT_ARENA(pi.slot[TIER_GPU]), 0);
	/* Same sequence number, other tenant: another page. */
	struct page_key k0 = t_key(0, 1, 0, 0, 0);
	assert_int_equal(kvt_store_page_info(s, &k0, &pi), -ENOENT);
	int fd;
	void *base;
	uint64_t len;
	assert_int_equal(tier_host_arena_info(kvt_store_tier(s, TIER_HOST), 1, &fd, &base, &len), 0);
	assert_true(fd >= 0);
	assert_true(base && len >= (1u << 20) - 65536);
	read_verify(s, &k, f->buf);
}

/* one read at a time: the order they go in is the order out */
static int setup_qd1(void **state)
{
	return setup_qd(state, "qd1", 64u << 20, 4u << 20, 2u << 20, 1, 0);
}

static int setup_bg1(void **state)
{
	return setup_qd(state, "bg1", 64u << 20, 4u << 20, 2u << 20, 4, 1);
}

/* n pages of seq 70, on NVMe only */
static void on_disk(struct fx *f, int n)
{
	struct t_wait w = {0};
	for (int i = 0; i < n; i++) {
		struct page_key k = t_key(0, 70, 0, 0, (uint32_t)i);
		t_fill(f->buf, PB, &k);
		assert_int_equal(t_put(f->s, &k, f->buf, PB, 0, &w), 0);
	}
	assert_int_equal(t_drain(f->s, &w), 0);
	assert_int_equal(kvt_store_flush(f->s), 0);
	for (int i = 0; i < n; i++) {
		struct page_key k = t_key(0, 70, 0, 0, (uint32_t)i);
		assert_int_equal(kvt_store_evict(f->s, &k, TIER_HOST), 0);
	}
}

struct order {
	int at[16], n;
};

struct order_cb {
	struct order *o;
	int id;
};

static void order_cb(void *arg, int res)
{
	struct order_cb *a = arg;
	assert_int_equal(res, 0);
	a->o->at[a->id] = a->o->n++;
}

/* the n pages of on_disk() asked into host RAM in order; o records the order they come */
static void promote_all(struct kvt_store *s, struct order *o, struct order_cb *cb, int n)
{
	for (int i = 0; i < n; i++) {
		struct page_key k = t_key(0, 70, 0, 0, (uint32_t)i);
		cb[i] = (struct order_cb){o, i};
		assert_int_equal(kvt_store_promote(s, &k, TIER_HOST, order_cb, &cb[i]), 0);
	}
}

/*
 * A hurried read (kvt_store_hurry) goes to the disk before the reads queued ahead of
 * it: one hurried while still in the store's queue, one once the disk tier has it
 * waiting for a queue slot. The others keep their order; all read the right bytes.
 */
static void hurried_reads(void **state)
{
	struct fx *f = *state;
	struct kvt_store *s = f->s;
	const int n = 8;
	on_disk(f, n);
	struct page_key k6 = t_key(0, 70, 0, 0, 6), k5 = t_key(0, 70, 0, 0, 5);
	assert_int_equal(kvt_store_hurry(s, &k6), -ENOENT); /* no read under way */
	struct order o = {0};
	struct order_cb cb[8];
	promote_all(s, &o, cb, n);
	assert_int_equal(kvt_store_hurry(s, &k6), 0); /* in the store's queue still */
	assert_int_equal(kvt_store_hurry(s, &k6), 0); /* twice: once counted */
	assert_true(kvt_store_run(s, 0) >= 0);        /* submitted: 6 first */
	assert_int_equal(kvt_store_hurry(s, &k5), 0); /* waiting for the disk's one slot */
	while (o.n < n)
		assert_true(kvt_store_run(s, 100) >= 0);
	assert_int_equal(o.at[6], 0);
	assert_true(o.at[5] <= 2); /* after 6 and at most the one started after it */
	for (int i = 1; i < n; i++) /* the rest in the order asked */
		if (i != 5 && i != 6)
			for (int j = 0; j < i; j++)
				if (j != 5 && j != 6)
					assert_true(o.at[j] < o.at[i]);
	struct kvt_store_stats st;
	kvt_store_stats(s, &st);
	assert_int_equal(st.reads_hurried, 2);
	uint64_t lat = 0, disk = 0;
	for (int b = 0; b < KVT_HIST_BUCKETS; b++)
		lat += st.hurried_lat[b], disk += st.hurried_disk[b];
	assert_int_equal(lat, 2); /* their latency, from the hurry */
	assert_int_equal(disk, 2);
	for (int i = 0; i < n; i++) {
		struct page_key k = t_key(0, 70, 0, 0, (uint32_t)i);
		read_verify(s, &k, f->buf);
	}
}

/*
 * A page whose read waits for room in host RAM (every slot pinned) is hurried too: the
 * first to get room, its read ahead of the others once it starts.
 */
static void hurried_while_stalled(void **state)
{
	struct fx *f = *state;
	struct kvt_store *s = f->s;
	const int n = 8;
	on_disk(f, n);
	struct kvt_store_stats st;
	kvt_store_stats(s, &st);
	const uint32_t slots = (uint32_t)(st.tier[TIER_HOST].slots - st.tier[TIER_HOST].used);
	struct t_wait w = {0};
	for (uint32_t i = 0; i < slots; i++) { /* host RAM full of pinned pages */
		struct page_key k = t_key(0, 71, 0, 0, i);
		t_fill(f->buf, PB, &k);
		assert_int_equal(t_put(s, &k, f->buf, PB, 0, &w), 0);
		assert_int_equal(t_drain(s, &w), 0);
		assert_int_equal(kvt_store_pin(s, &k), 0);
	}
	struct order o = {0};
	struct order_cb cb[8];
	promote_all(s, &o, cb, n);
	for (int r = 0; r < 4; r++)
		assert_true(kvt_store_run(s, 0) >= 0);
	assert_int_equal(o.n, 0); /* no room: every read waits */
	struct page_key k6 = t_key(0, 70, 0, 0, 6);
	assert_int_equal(kvt_store_hurry(s, &k6), 0);
	assert_int_equal(kvt_store_hurry(s, &k6), 0); /* counted once */
	for (uint32_t i = 0; i < 2; i++) { /* room for two */
		struct page_key k = t_key(0, 71, 0, 0, i);
		assert_int_equal(kvt_store_unpin(s, &k), 0);
	}
	while (o.n < 2)
		assert_true(kvt_store_run(s, 100) >= 0);
	assert_int_equal(o.at[6], 0);
	for (uint32_t i = 2; i < slots; i++) {
		struct page_key k = t_key(0, 71, 0, 0, i);
		assert_int_equal(kvt_store_unpin(s, &k), 0);
	}
	while (o.n < n)
		assert_true(kvt_store_run(s, 100) >= 0);
	kvt_store_stats(s, &st);
	assert_int_equal(st.reads_hurried, 1);
	uint64_t lat = 0;
	for (int b = 0; b < KVT_HIST_BUCKETS; b++)
		lat += st.hurried_lat[b];
	assert_int_equal(lat, 1);
	for (int i = 0; i < n; i++) {
		struct page_key k = t_key(0, 70, 0, 0, (uint32_t)i);
		read_verify(s, &k, f->buf);
	}
}

/*
 * background_depth 1 of queue_depth 4: reads no one hurried go to the disk one at a
 * time; a hurried one does not wait for them.
 */
static void background_depth(void **state)
{
	struct fx *f = *state;
	struct kvt_store *s = f->s;
	const int n = 8;
	on_disk(f, n);
	struct order o = {0};
	struct order_cb cb[8];
	promote_all(s, &o, cb, n);
	struct kvt_store_stats st;
	uint64_t most = 0;
	while (o.n < 4) {
		assert_true(kvt_store_run(s, 0) >= 0);
		kvt_store_stats(s, &st);
		most = st.tier[TIER_NVME].inflight > most ? st.tier[TIER_NVME].inflight : most;
	}
	/* started one at a time: in flight, 1 (and 1 for ios waiting for a slot) */
	assert_true(most <= 2);
	for (int i = 0; i < 4; i++)
		assert_int_equal(o.at[i], i);
	struct page_key k7 = t_key(0, 70, 0, 0, 7);
	assert_int_equal(kvt_store_hurry(s, &k7), 0);
	while (o.n < n)
		assert_true(kvt_store_run(s, 100) >= 0);
	assert_true(o.at[7] <= 5); /* beside the one under way, not after 4, 5 and 6 */
	for (int i = 0; i < n; i++) {
		struct page_key k = t_key(0, 70, 0, 0, (uint32_t)i);
		read_verify(s, &k, f->buf);
	}
}

static int setup_tiny_disk(void **state)
{
	/* 16 pages of disk */
	return setup(state, "tiny", 16 * PB, 8u << 20, 0);
}

static void disk_full(void **state)
{
	struct fx *f = *state;
	struct kvt_store *s = f->s;
	for (uint32_t i = 0; i < 16; i++) {
		struct page_key k = t_key(0, 1 + i / 8, 0, 0, i % 8);
		t_fill(f->buf, PB, &k);
		assert_int_equal(t_put(s, &k, f->buf, PB, 0, NULL), 0);
	}
	struct page_key k = t_key(0, 3, 0, 0, 0);
	assert_int_equal(kvt_store_put(s, &k, f->buf, PB, 0, NULL, NULL), -ENOSPC);
	struct kvt_store_stats st;
	kvt_store_stats(s, &st);
	assert_int_equal(st.enospc_refused, 1);
	assert_int_equal(st.pages, 16); /* nothing lost */
	assert_int_equal(kvt_store_flush(s), 0);
	/* A store with the other policy drops the coldest sequence instead. */
	kvt_store_close(f->s);
	f->p.disk_full = KVT_DISKFULL_EVICT_SEQ;
	assert_int_equal(kvt_store_open(&f->p, &f->s), 0);
	s = f->s;
	kvt_store_stats(s, &st);
	assert_int_equal(st.recovered_pages, 16);
	struct page_key warm = t_key(0, 2, 0, 0, 0);
	assert_int_equal(kvt_store_touch(s, &warm, 1.0f), 0);
	t_fill(f->buf, PB, &k);
	assert_int_equal(t_put(s, &k, f->buf, PB, 0, NULL), 0);
	kvt_store_stats(s, &st);
	assert_int_equal(st.diskfull_seq_evictions, 1);
	struct kvt_page_info pi;
	struct page_key cold = t_key(0, 1, 0, 0, 0);
	assert_int_equal(kvt_store_page_info(s, &cold, &pi), -ENOENT); /* seq 1 went */
	assert_int_equal(kvt_store_page_info(s, &warm, &pi), 0);      /* seq 2 stayed */
	read_verify(s, &warm, f->buf);
	read_verify(s, &k, f->buf);
}

/*
 * Runs the store until write-back has left at most `dirty` pages on no disk and nothing
 * is in flight. Its passes run once a millisecond and start a few writes each: between
 * two of them nothing may be in flight, so "not busy" alone is no end (a loaded machine
 * got there early). Gives up after 30 s; the checks after it then fail.
 */
static void wb_settle(struct kvt_store *s, uint64_t dirty)
{
	struct timespec t0, t;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		kvt_store_run(s, 2);
		struct kvt_store_stats st;
		kvt_store_stats(s, &st);
		if (st.pages_dirty <= dirty && !kvt_store_busy(s))
			return;
		clock_gettime(CLOCK_MONOTONIC, &t);
		if (t.tv_sec - t0.tv_sec > 30)
			return;
	}
}

static int setup_wb(void **state, const char *name, uint64_t nvme, uint64_t host)
{
	if (setup(state, name, nvme, host, 0))
		return -1;
	struct fx *f = *state;
	kvt_store_close(f->s);
	f->p.write_policy = KVT_WRITE_BACK;
	assert_int_equal(kvt_store_open(&f->p, &f->s), 0);
	return 0;
}

static int setup_write_back(void **state)
{
	return setup_wb(state, "wback", 64u << 20, 4u << 20);
}

/*
 * Write-back: nothing goes to disk while the host tier has room; past its watermark
 * the coldest pages are written and evicted, every page reads back whole, and a flush
 * writes the rest (a restart finds them all).
 */
static void write_back(void **state)
{
	struct fx *f = *state;
	struct kvt_store *s = f->s;
	struct kvt_store_stats st;
	kvt_store_stats(s, &st);
	const uint32_t hslots = (uint32_t)st.tier[TIER_HOST].slots, few = hslots / 2,
		       many = 3 * hslots;
	for (uint32_t i = 0; i < few; i++) {
		struct page_key k = t_key(0, 1, 0, 0, i);
		t_fill(f->buf, PB, &k);
		assert_int_equal(t_put(s, &k, f->buf, PB, 0, NULL), 0);
	}
	for (int i = 0; i < 20; i++)
		kvt_store_run(s, 1);
	kvt_store_stats(s, &st);
	assert_int_equal(st.pages_dirty, few);
	assert_int_equal(st.writebacks, 0);
	assert_int_equal(st.writes_for_room, 0);
	assert_int_equal(st.tier[TIER_NVME].used, 0); /* no slot taken */

	for (uint32_t i = few; i < many; i++) {
		struct page_key k = t_key(0, 1, 0, 0, i);
		t_fill(f->buf, PB, &k);
		assert_int_equal(t_put(s, &k, f->buf, PB, 0, NULL), 0);
	}
	while (kvt_store_busy(s))
		kvt_store_run(s, 10);
	kvt_store_stats(s, &st);
	assert_int_equal(st.pages, many);
	assert_true(st.writes_for_room >= many - hslots);
	assert_int_equal(st.writebacks, st.writes_for_room);
	assert_true(st.tier[TIER_HOST].used <= hslots);
	/* what the host tier kept was not written: the disk holds only the rest */
	assert_true(st.tier[TIER_NVME].used < many);
	assert_int_equal(st.pages_dirty, many - st.tier[TIER_NVME].used);
	/* the pages put last are the hottest: still only in host RAM */
	struct kvt_page_info pi;
	struct page_key last = t_key(0, 1, 0, 0, many - 1);
	assert_int_equal(kvt_store_page_info(s, &last, &pi), 0);
	assert_int_equal(pi.state, KVT_PAGE_DIRTY);
	assert_int_equal(pi.valid, 1u << TIER_HOST);
	for (uint32_t i = 0; i < many; i++) {
		struct page_key k = t_key(0, 1, 0, 0, i);
		read_verify(s, &k, f->buf);
	}
	assert_int_equal(kvt_store_flush(s), 0);
	kvt_store_stats(s, &st);
	assert_int_equal(st.pages_dirty, 0);
	assert_int_equal(st.tier[TIER_NVME].used, many);
	kvt_store_close(f->s);
	assert_int_equal(kvt_store_open(&f->p, &f->s), 0);
	kvt_store_stats(f->s, &st);
	assert_int_equal(st.recovered_pages, many);
	struct page_key k = t_key(0, 1, 0, 0, many / 2);
	read_verify(f->s, &k, f->buf);
}

static int setup_write_back_tiny(void **state)
{
	return setup_wb(state, "wbtiny", 16 * PB, 1u << 20);
}

/* Write-back's capacity is the disk and host RAM below its low watermark (room kept
 * for reads from disk); past it, puts are refused (ENOSPC, counted) and nothing taken
 * in is lost: every page reads back. */
static void write_back_full(void **state)
{
	struct fx *f = *state;
	struct kvt_store *s = f->s;
	struct kvt_store_stats st;
	kvt_store_stats(s, &st);
	const uint64_t cap = st.tier[TIER_HOST].slots * 80 / 100 + st.tier[TIER_NVME].slots;
	uint32_t n = 0;
	int ret;
	for (;; n++) {
		struct page_key k = t_key(0, 1, 0, 0, n);
		t_fill(f->buf, PB, &k);
		if ((ret = t_put(s, &k, f->buf, PB, 0, NULL)) != 0)
			break;
	}
	assert_int_equal(ret, -ENOSPC);
	assert_int_equal(n, cap);
	/* the host tier above its watermark writes its coldest pages to the rest of the disk */
	wb_settle(s, st.tier[TIER_HOST].slots * 80 / 100);
	kvt_store_stats(s, &st);
	assert_int_equal(st.enospc_refused, 1);
	assert_int_equal(st.pages, n);
	assert_int_equal(st.tier[TIER_NVME].used, st.tier[TIER_NVME].slots);
	for (uint32_t i = 0; i < n; i++) {
		struct page_key k = t_key(0, 1, 0, 0, i);
		read_verify(s, &k, f->buf);
	}
}

static int setup_write_back_oldest(void **state)
{
	return setup_wb(state, "wbold", 32u << 20, 160u << 20);
}

/*
 * Write-back keeps the pages on no disk below the host tier's low watermark, the
 * oldest put written first, even where the coldest host copies are clean ones (more of
 * them than the store looks at from the cold end: it then used to write nothing, and
 * reads from disk waited for writes): the written pages keep their host copies, the
 * newest stay dirty, and every page reads back.
 */
static void write_back_oldest(void **state)
{
	struct fx *f = *state;
	struct kvt_store *s = f->s;
	struct kvt_store_stats st;
	kvt_store_stats(s, &st);
	const uint64_t hslots = st.tier[TIER_HOST].slots, low = hslots * 80 / 100;
	const uint32_t clean = 260; /* more than the 256 the store looks at from the cold end */
	const uint32_t dirty = (uint32_t)(hslots * 88 / 100) - clean; /* below the high mark */
	assert_true(dirty > low + 32);
	for (uint32_t i = 0; i < clean; i++) {
		struct page_key k = t_key(0, 1, 0, 0, i);
		t_fill(f->buf, PB, &k);
		assert_int_equal(t_put(s, &k, f->buf, PB, 0, NULL), 0);
	}
	assert_int_equal(kvt_store_flush(s), 0); /* the coldest: clean copies */
	for (uint32_t i = 0; i < dirty; i++) {
		struct page_key k = t_key(0, 2, 0, 0, i);
		t_fill(f->buf, PB, &k);
		assert_int_equal(t_put(s, &k, f->buf, PB, 0, NULL), 0);
	}
	wb_settle(s, low);
	kvt_store_stats(s, &st);
	assert_int_equal(st.pages, clean + dirty);
	assert_true(st.pages_dirty <= low);
	assert_true(st.pages_dirty >= low - 2 * 32); /* no more written than the mark asks */
	assert_int_equal(st.tier[TIER_HOST].used, clean + dirty); /* nothing evicted */
	struct kvt_page_info pi;
	struct page_key first = t_key(0, 2, 0, 0, 0), last = t_key(0, 2, 0, 0, dirty - 1);
	assert_int_equal(kvt_store_page_info(s, &first, &pi), 0);
	assert_int_equal(pi.state, KVT_PAGE_CLEAN);
	assert_int_equal(pi.valid, (1u << TIER_HOST) | (1u << TIER_NVME));
	assert_int_equal(kvt_store_page_info(s, &last, &pi), 0);
	assert_int_equal(pi.state, KVT_PAGE_DIRTY);
	assert_int_equal(pi.valid, 1u << TIER_HOST);
	for (uint32_t i = 0; i < dirty; i += 7) {
		struct page_key k = t_key(0, 2, 0, 0, i);
		read_verify(s, &k, f->buf);
	}
	struct page_key k = t_key(0, 1, 0, 0, clean - 1);
	read_verify(s, &k, f->buf);
}

static int setup_odd(void **state)
{
	return setup_pb(state, "odd", 4u << 20, 2u << 20, 0, 0, 0, 5 * 4096 + 512);
}

/*
 * Pages that are not whole file-system blocks: the disk's ios move header and payload
 * padded to the block, the payload part from and into host slots, which are laid out
 * far enough apart that a read into one never reaches the next (every page read back
 * from disk into neighbouring host slots, then checked); the header never in host RAM.
 */
static void odd_page_size(void **state)
{
	struct fx *f = *state;
	struct kvt_store *s = f->s;
	const uint32_t pb = f->p.page_bytes, n = 40;
	struct tier *nv = kvt_store_tier(s, TIER_NVME), *host = kvt_store_tier(s, TIER_HOST);
	assert_true(nv->ops->io_span(nv) > pb); /* the case this test is for */
	assert_true(tier_host_stride(host) >= nv->ops->io_span(nv));
	assert_int_equal(tier_host_stride(host) % nv->ops->io_align(nv), 0);
	for (uint32_t i = 0; i < n; i++) {
		struct page_key k = t_key(0, 3, 0, 0, i);
		t_fill(f->buf, pb, &k);
		assert_int_equal(t_put(s, &k, f->buf, pb, 0, NULL), 0);
	}
	assert_int_equal(kvt_store_flush(s), 0);
	for (uint32_t i = 0; i < n; i++) {
		struct page_key k = t_key(0, 3, 0, 0, i);
		assert_int_equal(kvt_store_evict(s, &k, TIER_HOST), 0);
	}
	promote_pages(s, 3, n, TIER_HOST);
	for (uint32_t i = 0; i < n; i++) {
		struct page_key k = t_key(0, 3, 0, 0, i);
		struct kvt_page_info pi;
		assert_int_equal(kvt_store_page_info(s, &k, &pi), 0);
		assert_true(pi.valid & (1u << TIER_HOST));
		const void *h = kvt_store_slot_ptr(s, &k, TIER_HOST);
		assert_non_null(h);
		assert_true(t_check(h, pb, &k));
	}
	struct kvt_store_stats st;
	kvt_store_stats(s, &st);
	assert_true(st.tier[TIER_NVME].reads >= n);
	assert_int_equal(st.read_errors, 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_teardown(gigabyte, teardown),
		cmocka_unit_test_setup_teardown(evict_rules, setup_small, teardown),
		cmocka_unit_test_setup_teardown(pins_hold, setup_small, teardown),
		cmocka_unit_test_setup_teardown(queued_copies, setup_slow_copies, teardown),
		cmocka_unit_test_setup_teardown(drop_frees, setup_small, teardown),
		cmocka_unit_test_setup_teardown(warm_is_a_hint, setup_small, teardown),
		cmocka_unit_test_setup_teardown(filling_pages, setup_small, teardown),
		cmocka_unit_test_setup_teardown(reserved_pages, setup_small, teardown),
		cmocka_unit_test_setup_teardown(tenants_apart, setup_small, teardown),
		cmocka_unit_test_setup_teardown(disk_full, setup_tiny_disk, teardown),
		cmocka_unit_test_setup_teardown(hurried_reads, setup_qd1, teardown),
		cmocka_unit_test_setup_teardown(hurried_while_stalled, setup_qd1, teardown),
		cmocka_unit_test_setup_teardown(background_depth, setup_bg1, teardown),
		cmocka_unit_test_setup_teardown(write_back, setup_write_back, teardown),
		cmocka_unit_test_setup_teardown(write_back_full, setup_write_back_tiny, teardown),
		cmocka_unit_test_setup_teardown(write_back_oldest, setup_write_back_oldest, teardown),
		cmocka_unit_test_setup_teardown(odd_page_size, setup_odd, teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
