// SPDX-License-Identifier: MIT
/*
 * A few threads beside the event loop's for work that splits into independent items
 * (the fast path's reports: one item a sequence). The loop's thread runs items too and
 * returns once all are done; the others sleep between runs.
 */
#ifndef KVTIER_DAEMON_POOL_H
#define KVTIER_DAEMON_POOL_H

#include <stdint.h>

struct kvd_pool;

/* fn(arg, w, i): item i of a run, on thread w (0: the caller's, 1.. the pool's). */
typedef void (*kvd_pool_fn)(void *arg, unsigned w, uint32_t i);

/* A pool of `threads` threads in all, the caller's included (1: none started, runs are
 * calls in a loop). 0, or -errno. */
int kvd_pool_new(unsigned threads, struct kvd_pool **out);
void kvd_pool_free(struct kvd_pool *p);
/* The threads a run may use, the caller's included (1 for a NULL pool). */
unsigned kvd_pool_width(const struct kvd_pool *p);
/* fn for items 0..n-1, each once, spread over the threads; returns when all are done
 * (what they wrote is then visible to the caller). A NULL pool runs them here. */
void kvd_pool_run(struct kvd_pool *p, uint32_t n, kvd_pool_fn fn, void *arg);

#endif
