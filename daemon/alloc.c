// SPDX-License-Identifier: MIT
#include "alloc.h"
#include "kvtier_config.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

static _Atomic size_t alloc_bytes;

#if HAVE_JEMALLOC && !defined(KVT_ALLOC_LIBC)
#include <jemalloc/jemalloc.h>

static int arena_flags;
static pthread_once_t arena_once = PTHREAD_ONCE_INIT;

static void arena_init(void)
{
	unsigned a;
	size_t sz = sizeof(a);
	if (mallctl("arenas.create", &a, &sz, NULL, 0) == 0)
		arena_flags = MALLOCX_ARENA(a);
}

/*
 * The metadata arena, through a thread cache of each thread's own (explicit tcaches
 * are the way to cache an arena that is not the thread's): without one, every
 * allocation and free took the arena's lock, a tenth of the daemon's time in a decode
 * loop (perf on the GPU machine).
 */
static __thread int thread_flags = -1;

static int flags(void)
{
	if (__builtin_expect(thread_flags >= 0, 1))
		return thread_flags;
	pthread_once(&arena_once, arena_init);
	unsigned tc;
	size_t sz = sizeof(tc);
	int f = arena_flags;
	if (f && mallctl("tcache.create", &tc, &sz, NULL, 0) == 0)
		f |= MALLOCX_TCACHE(tc);
	else if (f)
		f |= MALLOCX_TCACHE_NONE;
	thread_flags = f;
	return f;
}

void *kvt_malloc(size_t size)
{
	void *p = mallocx(size ? size : 1, flags());
	if (p)
		atomic_fetch_add(&alloc_bytes, sallocx(p, 0));
	return p;
}

void *kvt_calloc(size_t n, size_t size)
{
	if (size && n > (size_t)-1 / size)
		return NULL;
	size_t bytes = n * size;
	void *p = mallocx(bytes ? bytes : 1, flags() | MALLOCX_ZERO);
	if (p)
		atomic_fetch_add(&alloc_bytes, sallocx(p, 0));
	return p;
}

void *kvt_realloc(void *p, size_t size)
{
	if (!p)
		return kvt_malloc(size);
	size_t old = sallocx(p, 0);
	void *q = rallocx(p, size ? size : 1, flags());
	if (q) {
		atomic_fetch_sub(&alloc_bytes, old);
		atomic_fetch_add(&alloc_bytes, sallocx(q, 0));
	}
	return q;
}

void kvt_free(void *p)
{
	if (!p)
		return;
	atomic_fetch_sub(&alloc_bytes, sallocx(p, 0));
	dallocx(p, flags());
}

const char *kvt_alloc_backend(void)
{
	return "jemalloc";
}
#else
#include <malloc.h>

void *kvt_malloc(size_t size)
{
	void *p = malloc(size ? size : 1);
	if (p)
		atomic_fetch_add(&alloc_bytes, malloc_usable_size(p));
	return p;
}

void *kvt_calloc(size_t n, size_t size)
{
	void *p = calloc(n ? n : 1, size ? size : 1);
	if (p)
		atomic_fetch_add(&alloc_bytes, malloc_usable_size(p));
	return p;
}

void *kvt_realloc(void *p, size_t size)
{
	size_t old = p ? malloc_usable_size(p) : 0;
	void *q = realloc(p, size ? size : 1);
	if (q) {
		atomic_fetch_sub(&alloc_bytes, old);
		atomic_fetch_add(&alloc_bytes, malloc_usable_size(q));
	}
	return q;
}

void kvt_free(void *p)
{
	if (!p)
		return;
	atomic_fetch_sub(&alloc_bytes, malloc_usable_size(p));
	free(p);
}

const char *kvt_alloc_backend(void)
{
	return "libc";
}
#endif

size_t kvt_alloc_bytes(void)
{
	return atomic_load(&alloc_bytes);
}
