// SPDX-License-Identifier: MIT
/*
 * XXH3 for page checksums, compiled here from libxxhash's header with a run-time
 * choice of AVX2 or SSE2: Debian's libxxhash is built for the SSE2 baseline, and the
 * checksum of every page read is the disk path's largest CPU cost (41% of the loop
 * thread at 60K reads/s before this).
 */
#include "page_hash.h"

#include <stdbool.h>

#define XXH_NAMESPACE kvt_sse2_
#include "page_hash_xxh3.h"

#if defined(__x86_64__) && defined(__GNUC__)
uint64_t kvt_page_hash_avx2(uint64_t seed, const void *a, size_t alen, const void *b,
			    size_t blen);

static bool have_avx2(void)
{
	static int v = -1;
	if (v < 0) {
		__builtin_cpu_init();
		v = __builtin_cpu_supports("avx2");
	}
	return v;
}

uint64_t kvt_page_hash(uint64_t seed, const void *a, size_t alen, const void *b, size_t blen)
{
	if (have_avx2())
		return kvt_page_hash_avx2(seed, a, alen, b, blen);
	return xxh3_two(seed, a, alen, b, blen);
}
#else
uint64_t kvt_page_hash(uint64_t seed, const void *a, size_t alen, const void *b, size_t blen)
{
	return xxh3_two(seed, a, alen, b, blen);
}
#endif
