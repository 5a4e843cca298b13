/* SPDX-License-Identifier: MIT */
/*
 * The body of kvt_page_hash, included by page_hash.c (baseline) and page_hash_avx2.c
 * (compiled with -mavx2), each after choosing its XXH_NAMESPACE and XXH_VECTOR.
 */
#define XXH_INLINE_ALL
#include <xxhash.h>

static inline uint64_t xxh3_two(uint64_t seed, const void *a, size_t alen, const void *b,
				size_t blen)
{
	XXH3_state_t st;
	XXH3_64bits_reset_withSeed(&st, seed);
	XXH3_64bits_update(&st, a, alen);
	XXH3_64bits_update(&st, b, blen);
	return XXH3_64bits_digest(&st);
}
