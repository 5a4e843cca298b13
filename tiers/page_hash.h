/* SPDX-License-Identifier: MIT */
#ifndef KVT_PAGE_HASH_H
#define KVT_PAGE_HASH_H

#include <stddef.h>
#include <stdint.h>

/* XXH3-64 of a then b, seeded: the same value on every CPU, AVX2 used where present. */
uint64_t kvt_page_hash(uint64_t seed, const void *a, size_t alen, const void *b, size_t blen);

#endif
