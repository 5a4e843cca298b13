/* SPDX-License-Identifier: MIT */
#ifndef KVT_TEST_HELPERS_H
#define KVT_TEST_HELPERS_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tiers/store.h"

#define T_EXIT_SKIP 77

/*
 * A fresh directory for a test's store, on a file system that takes O_DIRECT (the
 * build directory: tmpfs does not). KVT_TEST_DIR overrides.
 */
static inline const char *t_dir(const char *name)
{
	static char path[3000];
	const char *base = getenv("KVT_TEST_DIR");
	if (!base)
		base = ".";
	snprintf(path, sizeof(path), "%.2900s/kvt-test-%.40s-%d", base, name, (int)getpid());
	char cmd[6100];
	snprintf(cmd, sizeof(cmd), "rm -rf '%s' && mkdir -p '%s'", path, path);
	if (system(cmd) != 0)
		abort();
	return path;
}

static inline void t_rmdir(const char *path)
{
	char cmd[4200];
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", path);
	if (system(cmd) != 0)
		fprintf(stderr, "could not remove %s\n", path);
}

static inline char *t_path(const char *dir, const char *file)
{
	static char p[4300];
	snprintf(p, sizeof(p), "%s/%s", dir, file);
	return p;
}

/* Deterministic page contents: a different byte stream for every key. */
static inline void t_fill(void *buf, uint32_t len, const struct page_key *k)
{
	uint64_t x = page_key_hash(k) | 1;
	uint64_t *w = buf;
	for (uint32_t i = 0; i < len / 8; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		w[i] = x;
	}
	for (uint32_t i = len / 8 * 8; i < len; i++)
		((uint8_t *)buf)[i] = (uint8_t)(x >> (i % 8));
}

static inline int t_check(const void *buf, uint32_t len, const struct page_key *k)
{
	static __thread uint8_t *want;
	static __thread uint32_t cap;
	if (cap < len) {
		free(want);
		want = malloc(len);
		cap = len;
	}
	t_fill(want, len, k);
	return memcmp(buf, want, len) == 0;
}

static inline struct page_key t_key(uint32_t tenant, uint64_t seq, uint16_t layer,
				    uint16_t head, uint32_t index)
{
	struct page_key k = {.tenant = tenant, .layer = layer, .kv_head = head, .seq = seq,
			     .index = index};
	return k;
}

/* Counts completions and remembers the first error. */
struct t_wait {
	int pending;
	int err;
	int done;
};

static inline void t_cb(void *arg, int res)
{
	struct t_wait *w = arg;
	w->pending--;
	w->done++;
	if (res && !w->err)
		w->err = res;
}

static inline int t_drain(struct kvt_store *s, struct t_wait *w)
{
	while (w->pending > 0) {
		int r = kvt_store_run(s, 100);
		if (r < 0)
			return r;
	}
	return w->err;
}

/* put, running the store while it pushes back. */
static inline int t_put(struct kvt_store *s, const struct page_key *k, const void *buf,
			uint32_t len, unsigned flags, struct t_wait *w)
{
	for (int tries = 0; tries < 100000; tries++) {
		if (w)
			w->pending++;
		int r = kvt_store_put(s, k, buf, len, flags, w ? t_cb : NULL, w);
		if (r != -EAGAIN) {
			if (r && w)
				w->pending--;
			return r;
		}
		if (w)
			w->pending--;
		kvt_store_run(s, 10);
	}
	return -ETIMEDOUT;
}

#endif
