// SPDX-License-Identifier: MIT
/* The AVX2 build of page_hash.c's XXH3 (this file is compiled with -mavx2). */
#include "page_hash.h"

#define XXH_INLINE_ALL
#define XXH_NAMESPACE kvt_avx2_
#define XXH_VECTOR    XXH_AVX2
#include <xxhash.h>

uint64_t kvt_page_hash_avx2(uint64_t seed, const void *a, size_t alen, const void *b,
			    size_t blen);

uint64_t kvt_page_hash_avx2(uint64_t seed, const void *a, size_t alen, const void *b,
			    size_t blen)
{
	XXH3_state_t st;
	XXH3_64bits_reset_withSeed(&st, seed);
	XXH3_64bits_update(&st, a, alen);
	XXH3_64bits_update(&st, b, blen);
	return XXH3_64bits_digest(&st);
}
