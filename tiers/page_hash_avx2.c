// SPDX-License-Identifier: MIT
/* The AVX2 build of page_hash.c's XXH3 (this file is compiled with -mavx2). */
#include "page_hash.h"

#define XXH_NAMESPACE kvt_avx2_
#define XXH_VECTOR    XXH_AVX2
#include "page_hash_xxh3.h"

uint64_t kvt_page_hash_avx2(uint64_t seed, const void *a, size_t alen, const void *b,
			    size_t blen);

uint64_t kvt_page_hash_avx2(uint64_t seed, const void *a, size_t alen, const void *b,
			    size_t blen)
{
	return xxh3_two(seed, a, alen, b, blen);
}
