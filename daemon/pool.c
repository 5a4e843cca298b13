// SPDX-License-Identifier: MIT
#include "daemon/pool.h"
#include "daemon/alloc.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdbool.h>

struct kvd_pool {
	unsigned n; /* threads started */
	pthread_t *th;
	pthread_mutex_t mu;
	pthread_cond_t cv;
	uint32_t gen; /* a run's number (under mu) */
	bool stop;
	/* the run under way: set under mu before gen moves */
	kvd_pool_fn fn;
	void *arg;
	uint32_t items;
	/* the run's number and its next item to take, one word (atomic): a thread that
	 * wakes for a run already over takes nothing of the next one */
	uint64_t next;
	uint32_t done; /* items of this run done (atomic) */
};

struct worker {
	struct kvd_pool *p;
	unsigned w;
};

static void take(struct kvd_pool *p, uint32_t gen, kvd_pool_fn fn, void *arg, uint32_t items,
		 unsigned w)
{
	uint64_t v = __atomic_load_n(&p->next, __ATOMIC_RELAXED);
	for (;;) {
		if ((uint32_t)(v >> 32) != gen || (uint32_t)v >= items)
			return;
		if (!__atomic_compare_exchange_n(&p->next, &v, v + 1, true, __ATOMIC_RELAXED,
						 __ATOMIC_RELAXED))
			continue; /* v is the word as it is now */
		fn(arg, w, (uint32_t)v);
		/* what fn wrote, released to the caller's acquire */
		__atomic_fetch_add(&p->done, 1, __ATOMIC_RELEASE);
		v = __atomic_load_n(&p->next, __ATOMIC_RELAXED);
	}
}

static void *worker_main(void *a)
{
	struct kvd_pool *p = ((struct worker *)a)->p;
	const unsigned w = ((struct worker *)a)->w;
	kvt_free(a);
	uint32_t seen = 0;
	pthread_mutex_lock(&p->mu);
	for (;;) {
		while (!p->stop && p->gen == seen)
			pthread_cond_wait(&p->cv, &p->mu);
		if (p->stop)
			break;
		seen = p->gen;
		kvd_pool_fn fn = p->fn;
		void *arg = p->arg;
		const uint32_t items = p->items;
		pthread_mutex_unlock(&p->mu);
		take(p, seen, fn, arg, items, w);
		pthread_mutex_lock(&p->mu);
	}
	pthread_mutex_unlock(&p->mu);
	return NULL;
}

int kvd_pool_new(unsigned threads, struct kvd_pool **out)
{
	*out = NULL;
	if (threads <= 1)
		return 0;
	struct kvd_pool *p = kvt_calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	p->th = kvt_calloc(threads - 1, sizeof(*p->th));
	if (!p->th) {
		kvt_free(p);
		return -ENOMEM;
	}
	pthread_mutex_init(&p->mu, NULL);
	pthread_cond_init(&p->cv, NULL);
	int ret = 0;
	for (unsigned i = 0; i + 1 < threads; i++) {
		struct worker *a = kvt_malloc(sizeof(*a));
		if (!a) {
			ret = -ENOMEM;
			break;
		}
		*a = (struct worker){p, i + 1};
		if ((ret = -pthread_create(&p->th[i], NULL, worker_main, a)) < 0) {
			kvt_free(a);
			break;
		}
		p->n++;
	}
	if (ret < 0) {
		kvd_pool_free(p);
		return ret;
	}
	*out = p;
	return 0;
}

void kvd_pool_free(struct kvd_pool *p)
{
	if (!p)
		return;
	pthread_mutex_lock(&p->mu);
	p->stop = true;
	pthread_cond_broadcast(&p->cv);
	pthread_mutex_unlock(&p->mu);
	for (unsigned i = 0; i < p->n; i++)
		pthread_join(p->th[i], NULL);
	pthread_cond_destroy(&p->cv);
	pthread_mutex_destroy(&p->mu);
	kvt_free(p->th);
	kvt_free(p);
}

unsigned kvd_pool_width(const struct kvd_pool *p)
{
	return p ? p->n + 1 : 1;
}

void kvd_pool_run(struct kvd_pool *p, uint32_t n, kvd_pool_fn fn, void *arg)
{
	if (!p || n <= 1) {
		for (uint32_t i = 0; i < n; i++)
			fn(arg, 0, i);
		return;
	}
	pthread_mutex_lock(&p->mu);
	p->fn = fn;
	p->arg = arg;
	p->items = n;
	const uint32_t gen = ++p->gen;
	__atomic_store_n(&p->done, 0, __ATOMIC_RELAXED);
	__atomic_store_n(&p->next, (uint64_t)gen << 32, __ATOMIC_RELAXED);
	pthread_cond_broadcast(&p->cv);
	pthread_mutex_unlock(&p->mu);
	take(p, gen, fn, arg, n, 0);
	/* the items others took: a thread that wakes late finds none left, and is not
	 * waited for */
	for (unsigned spins = 0; __atomic_load_n(&p->done, __ATOMIC_ACQUIRE) < n; spins++)
		if (spins > 256)
			sched_yield();
}
