// SPDX-License-Identifier: MIT
/* Unit tests: slot allocator, on-disk page format, fixed-buffer registration. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/loop.h"
#include "tiers/page_format.h"
#include "tiers/page_hash.h"
#include "tiers/slots.h"
#include <xxhash.h>
#include "helpers.h"

static void slots_alloc_free(void **state)
{
	struct slot_pool p;
	assert_int_equal(slot_pool_init(&p, 5), 0);
	uint32_t got[5];
	for (int i = 0; i < 5; i++) {
		assert_int_equal(slot_pool_alloc(&p, &got[i]), 0);
		assert_int_equal(got[i], i); /* lowest first */
	}
	uint32_t x;
	assert_int_equal(slot_pool_alloc(&p, &x), -ENOSPC);
	assert_int_equal(slot_pool_used(&p), 5);
	assert_int_equal(slot_pool_free(&p, 3), 0);
	assert_int_equal(slot_pool_free(&p, 3), -EINVAL); /* double free */
	assert_int_equal(slot_pool_free(&p, 99), -EINVAL);
	assert_int_equal(slot_pool_alloc(&p, &x), 0);
	assert_int_equal(x, 3);
	slot_pool_destroy(&p);
}

static void slots_claim_poison(void **state)
{
	struct slot_pool p;
	assert_int_equal(slot_pool_init(&p, 8), 0);
	assert_int_equal(slot_pool_claim(&p, 5), 0);
	assert_int_equal(slot_pool_claim(&p, 5), -EBUSY);
	assert_int_equal(slot_pool_claim(&p, 8), -ERANGE);
	assert_int_equal(slot_pool_claim(&p, 0), 0);
	assert_int_equal(slot_pool_poison(&p, 5), 0);
	assert_int_equal(slot_pool_free(&p, 5), -EINVAL); /* poisoned: never back */
	assert_int_equal(p.npoisoned, 1);
	/* Every other slot is handed out exactly once, 5 never. */
	int seen[8] = {0};
	uint32_t x;
	while (slot_pool_alloc(&p, &x) == 0)
		seen[x]++;
	for (int i = 0; i < 8; i++)
		assert_int_equal(seen[i], (i == 5 || i == 0) ? 0 : 1);
	assert_int_equal(slot_pool_used(&p), 7);
	slot_pool_destroy(&p);
}

enum { HS = 512, PB = 4096 };

static void *page_buf(void)
{
	void *b = aligned_alloc(512, HS + PB);
	assert_non_null(b);
	return b;
}

static void format_roundtrip(void **state)
{
	char *b = page_buf();
	struct page_meta m = {.key = t_key(3, 77, 5, 2, 9), .epoch = 42, .len = PB};
	t_fill(b + HS, PB, &m.key);
	page_hdr_stamp(b, HS, b + HS, &m, 17);
	struct page_meta f;
	assert_int_equal(page_verify(b, HS, b + HS, PB, 17, &m, &f), PAGE_OK);
	assert_true(page_key_eq(&f.key, &m.key));
	assert_int_equal(f.epoch, 42);
	assert_int_equal(page_verify(b, HS, b + HS, PB, 17, NULL, NULL), PAGE_OK);
	/* header and payload apart in RAM (the nvme tier's header buffers): the same page */
	char *h = page_buf(), *pl = page_buf();
	memcpy(pl, b + HS, PB);
	assert_int_equal(page_hdr_stamp(h, HS, pl, &m, 17), page_hdr_stamp(b, HS, b + HS, &m, 17));
	assert_memory_equal(h, b, HS);
	assert_int_equal(page_verify(h, HS, pl, PB, 17, &m, NULL), PAGE_OK);
	pl[PB - 1] ^= 1;
	assert_int_equal(page_verify(h, HS, pl, PB, 17, &m, NULL), PAGE_CORRUPT);
	free(h);
	free(pl);
	free(b);
}

static void format_catches_flips(void **state)
{
	char *b = page_buf();
	struct page_meta m = {.key = t_key(1, 2, 3, 4, 5), .epoch = 7, .len = PB};
	t_fill(b + HS, PB, &m.key);
	page_hdr_stamp(b, HS, b + HS, &m, 0);
	/* Every single-bit flip in the header fields and a sample of the payload. */
	for (size_t byte = 0; byte < sizeof(struct page_hdr) + PB; byte += byte < 64 ? 1 : 61) {
		for (int bit = 0; bit < 8; bit++) {
			size_t at = byte < 64 ? byte : HS + (byte - 64);
			b[at] ^= (char)(1 << bit);
			enum page_check c = page_verify(b, HS, b + HS, PB, 0, &m, NULL);
			assert_int_not_equal(c, PAGE_OK);
			b[at] ^= (char)(1 << bit);
		}
	}
	assert_int_equal(page_verify(b, HS, b + HS, PB, 0, &m, NULL), PAGE_OK);
	free(b);
}

static void format_catches_torn_and_stale(void **state)
{
	char *b = page_buf(), *old = page_buf();
	struct page_meta a = {.key = t_key(0, 1, 0, 0, 0), .epoch = 10, .len = PB};
	struct page_meta n = {.key = t_key(0, 2, 0, 0, 0), .epoch = 11, .len = PB};
	t_fill(old + HS, PB, &a.key);
	page_hdr_stamp(old, HS, old + HS, &a, 4);
	t_fill(b + HS, PB, &n.key);
	page_hdr_stamp(b, HS, b + HS, &n, 4);
	/* Torn: the new header over the old payload's second half. */
	char *torn = page_buf();
	memcpy(torn, b, HS + PB / 2);
	memcpy(torn + HS + PB / 2, old + HS + PB / 2, PB / 2);
	assert_int_equal(page_verify(torn, HS, torn + HS, PB, 4, &n, NULL), PAGE_CORRUPT);
	/* Stale: the old page left at the slot when the new one is expected. */
	assert_int_equal(page_verify(old, HS, old + HS, PB, 4, &n, NULL), PAGE_STALE);
	/* Misplaced: a valid page read from another slot. */
	assert_int_equal(page_verify(b, HS, b + HS, PB, 5, &n, NULL), PAGE_CORRUPT);
	/* Never written. */
	memset(torn, 0, HS + PB);
	assert_int_equal(page_verify(torn, HS, torn + HS, PB, 4, &n, NULL), PAGE_EMPTY);
	/* Same key, same slot, earlier epoch: stale, not ok. */
	struct page_meta a2 = a;
	a2.epoch = 12;
	assert_int_equal(page_verify(old, HS, old + HS, PB, 4, &a2, NULL), PAGE_STALE);
	free(b);
	free(old);
	free(torn);
}

/*
 * A payload read without its header, checked against the checksum its write returned:
 * any payload flip, another epoch, key or slot, and
 * another page's payload all fail.
 */
static void format_payload_alone(void **state)
{
	char *b = page_buf(), *other = page_buf();
	struct page_meta m = {.key = t_key(2, 9, 1, 3, 40), .epoch = 5, .len = PB};
	struct page_meta o = {.key = t_key(2, 9, 1, 3, 41), .epoch = 6, .len = PB};
	t_fill(b + HS, PB, &m.key);
	m.csum = page_hdr_stamp(b, HS, b + HS, &m, 8);
	struct page_meta f;
	assert_int_equal(page_verify(b, HS, b + HS, PB, 8, &m, &f), PAGE_OK);
	assert_true(m.csum != 0);
	assert_true(f.csum == m.csum); /* what a restart scan finds is what the write made */
	memset(b, 0xee, HS); /* the header is neither read nor written */
	assert_int_equal(page_verify_payload(b + HS, HS, 8, &m), PAGE_OK);
	for (size_t i = 0; i < HS; i++)
		assert_int_equal((uint8_t)b[i], 0xee);
	for (size_t at = 0; at < PB; at += 37) {
		b[HS + at] ^= 0x20;
		assert_int_equal(page_verify_payload(b + HS, HS, 8, &m), PAGE_CORRUPT);
		b[HS + at] ^= 0x20;
	}
	struct page_meta x = m;
	x.epoch++;
	assert_int_equal(page_verify_payload(b + HS, HS, 8, &x), PAGE_CORRUPT);
	x = m;
	x.key.index++;
	assert_int_equal(page_verify_payload(b + HS, HS, 8, &x), PAGE_CORRUPT);
	assert_int_equal(page_verify_payload(b + HS, HS, 9, &m), PAGE_CORRUPT);
	t_fill(other + HS, PB, &o.key);
	page_hdr_stamp(other, HS, other + HS, &o, 8);
	assert_int_equal(page_verify_payload(other + HS, HS, 8, &m), PAGE_CORRUPT);
	free(b);
	free(other);
}

/* The on-disk checksum must not depend on which vector unit computed it. */
static void hash_is_xxh3(void **state)
{
	uint8_t *buf = malloc(70000);
	for (int i = 0; i < 70000; i++)
		buf[i] = (uint8_t)(i * 131 + 7);
	size_t lens[] = {0, 1, 63, 64, 240, 241, 1024, 4097, 32768, 65536};
	for (size_t i = 0; i < sizeof(lens) / sizeof(lens[0]); i++) {
		uint64_t seed = 0x1234567ull * (i + 1);
		uint64_t want = XXH3_64bits_withSeed(buf, 64 + lens[i], seed);
		assert_int_equal(kvt_page_hash(seed, buf, 64, buf + 64, lens[i]), want);
	}
	free(buf);
}

/* Leaves a stack where words are `seed` or 0 (every m-th, from phase p): somewhere
 * it looks like an XXH3 state with this seed, no external secret and a garbage secret,
 * which a hash that does not initialize its state would trust. */
static __attribute__((noinline)) uint64_t clobber_stack(uint64_t seed, unsigned m, unsigned p)
{
	volatile uint64_t junk[1024];
	for (size_t i = 0; i < 1024; i++)
		junk[i] = (i + p) % m ? seed : 0;
	return junk[seed % 1024];
}

static __attribute__((noinline)) uint64_t hash_after_clobber(uint64_t seed, const void *p,
							     size_t len, unsigned m, unsigned ph)
{
	clobber_stack(seed, m, ph);
	return kvt_page_hash(seed, p, len / 2, (const char *)p + len / 2, len - len / 2);
}

/* The same bytes hash the same whatever the stack held before (a state on the stack
 * must be initialized before a seeded reset: xxhash.h, XXH3_INITSTATE). */
static void hash_ignores_stack(void **state)
{
	uint8_t buf[300];
	for (size_t i = 0; i < sizeof(buf); i++)
		buf[i] = (uint8_t)(i * 7 + 1);
	static const unsigned mods[] = {2, 3, 5, 7};
	for (uint64_t seed = 1; seed < 40; seed++) {
		size_t len = 1 + seed * 7 % sizeof(buf);
		uint64_t want = XXH3_64bits_withSeed(buf, len, seed);
		for (unsigned k = 0; k < 4; k++)
			for (unsigned ph = 0; ph < mods[k]; ph++)
				assert_int_equal(hash_after_clobber(seed, buf, len, mods[k], ph), want);
	}
}

static void loop_buffers_split(void **state)
{
	struct kvt_loop l;
	int r = kvt_loop_init(&l, 8);
	if (r == -EPERM || r == -ENOSYS)
		skip();
	assert_int_equal(r, 0);
	/* Just over 1 GiB: two pieces (registration pins it, briefly). */
	size_t unit = 33280, len = (size_t)34000 * unit;
	char *base = aligned_alloc(4096, len);
	assert_non_null(base);
	int first = kvt_loop_register_buffer(&l, base, len, unit);
	assert_true(first >= 0);
	assert_int_equal(l.nbufs, 2);
	for (unsigned i = first; i < l.nbufs; i++) {
		assert_true(l.bufs[i].iov_len <= KVT_LOOP_BUF_PIECE);
		assert_int_equal(((char *)l.bufs[i].iov_base - base) % unit, 0);
	}
	/* Every slot falls inside one piece. */
	for (size_t s = 0; s < 34000; s += 97)
		assert_true(kvt_loop_buffer_index(&l, base + s * unit, unit) >= 0);
	assert_int_equal(kvt_loop_buffer_index(&l, base + len, 1), -1);
	kvt_loop_unregister_buffer(&l, base);
	assert_int_equal(l.nbufs, 0);
	kvt_loop_exit(&l);
	free(base);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(slots_alloc_free),
		cmocka_unit_test(slots_claim_poison),
		cmocka_unit_test(format_roundtrip),
		cmocka_unit_test(format_catches_flips),
		cmocka_unit_test(format_catches_torn_and_stale),
		cmocka_unit_test(format_payload_alone),
		cmocka_unit_test(hash_is_xxh3),
		cmocka_unit_test(hash_ignores_stack),
		cmocka_unit_test(loop_buffers_split),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
