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
	/* A state on the stack must be initialized: reset_withSeed derives the secret from
	 * the seed only when the seed differs from the one the state holds, and garbage
	 * equal to this call's seed (left by the last call at this stack address) would
	 * keep a secret that was since overwritten: a wrong hash, now and then. */
	XXH3_INITSTATE(&st);
	XXH3_64bits_reset_withSeed(&st, seed);
	XXH3_64bits_update(&st, a, alen);
	XXH3_64bits_update(&st, b, blen);
	return XXH3_64bits_digest(&st);
}
