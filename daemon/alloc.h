/* SPDX-License-Identifier: MIT */
#ifndef KVT_ALLOC_H
#define KVT_ALLOC_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Allocations for kvtier's own metadata (page map, sequences, queues). They come from
 * a jemalloc arena of their own where jemalloc is built in, so that metadata churn
 * never fragments the heap of the rest of the process; from libc under sanitizers,
 * so that ASan sees every one of them. All return NULL on failure; thread-safe.
 */
void *kvt_malloc(size_t size);
void *kvt_calloc(size_t n, size_t size);
void *kvt_realloc(void *p, size_t size);
void kvt_free(void *p);
/* Bytes currently allocated through these functions (approximate, for stats). */
size_t kvt_alloc_bytes(void);
/* "jemalloc" or "libc". */
const char *kvt_alloc_backend(void);

#ifdef __cplusplus
}
#endif

#endif
