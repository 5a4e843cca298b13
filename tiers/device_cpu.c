// SPDX-License-Identifier: MIT
/*
 * The cpu device: the "GPU pool" is a memfd mapped shared, exactly what a client will
 * map, and copies are done by a worker thread so that they complete asynchronously,
 * as the CUDA engine's do. KVT_CPU_COPY_DELAY_US (tests) makes the worker sleep that
 * long before each batch, so that a client that read a slot before its copy landed
 * would read the wrong page.
 */
#include "device.h"
#include "daemon/alloc.h"
#include "daemon/log.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

struct cpu_device {
	struct kvt_device base;
	int efd;
	pthread_t worker;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct kvt_list queued;
	struct kvt_list done;
	bool stop;
	unsigned delay_us;
	/* copy batches submitted and landed (one worker: they land in order), and the
	 * fences recorded behind copies, which the worker tells of every landing */
	uint64_t submitted, landed;
	struct kvt_list fences;
};

static void fences_landed(struct cpu_device *d);

static void *cpu_worker(void *arg)
{
	struct cpu_device *d = arg;
	pthread_mutex_lock(&d->lock);
	for (;;) {
		while (!d->stop && kvt_list_empty(&d->queued))
			pthread_cond_wait(&d->cond, &d->lock);
		if (d->stop && kvt_list_empty(&d->queued))
			break;
		struct kvt_copy_batch *b = kvt_list_first(&d->queued, struct kvt_copy_batch, link);
		kvt_list_del(&b->link);
		pthread_mutex_unlock(&d->lock);
		if (d->delay_us)
			usleep(d->delay_us);
		for (unsigned i = 0; i < b->n; i++)
			memcpy(b->copies[i].dst, b->copies[i].src, b->copies[i].len);
		b->res = 0;
		pthread_mutex_lock(&d->lock);
		d->landed++;
		fences_landed(d);
		kvt_list_add_tail(&d->done, &b->link);
		uint64_t one = 1;
		ssize_t w = write(d->efd, &one, sizeof(one));
		(void)w;
	}
	pthread_mutex_unlock(&d->lock);
	return NULL;
}

static int cpu_open(struct kvt_device **out, int ordinal)
{
	(void)ordinal;
	struct cpu_device *d = kvt_calloc(1, sizeof(*d));
	if (!d)
		return -ENOMEM;
	d->base.ops = &kvt_device_cpu_ops;
	kvt_list_init(&d->queued);
	kvt_list_init(&d->done);
	kvt_list_init(&d->fences);
	const char *delay = getenv("KVT_CPU_COPY_DELAY_US");
	if (delay && *delay) {
		d->delay_us = (unsigned)strtoul(delay, NULL, 10);
		kvt_notice("cpu", "copies land %u us late (KVT_CPU_COPY_DELAY_US)", d->delay_us);
	}
	pthread_mutex_init(&d->lock, NULL);
	pthread_cond_init(&d->cond, NULL);
	d->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (d->efd < 0) {
		int e = -errno;
		kvt_free(d);
		return e;
	}
	int r = pthread_create(&d->worker, NULL, cpu_worker, d);
	if (r) {
		close(d->efd);
		kvt_free(d);
		return -r;
	}
	*out = &d->base;
	return 0;
}

static void cpu_close(struct kvt_device *dev)
{
	struct cpu_device *d = (struct cpu_device *)dev;
	pthread_mutex_lock(&d->lock);
	d->stop = true;
	pthread_cond_signal(&d->cond);
	pthread_mutex_unlock(&d->lock);
	pthread_join(d->worker, NULL);
	close(d->efd);
	pthread_mutex_destroy(&d->lock);
	pthread_cond_destroy(&d->cond);
	kvt_free(d);
}

static const char *cpu_describe(struct kvt_device *d)
{
	(void)d;
	return "cpu (no GPU: pool in a memfd)";
}

static int cpu_numa_node(struct kvt_device *d)
{
	(void)d;
	return -1;
}

static int cpu_host_register(struct kvt_device *d, void *p, size_t len)
{
	(void)d;
	(void)p;
	(void)len;
	return 0;
}

static int cpu_host_map_ro(struct kvt_device *d, void *p, size_t len, void **dev)
{
	(void)d;
	(void)len;
	*dev = p; /* the cpu device's kernels read host memory as it is */
	return 0;
}

static void cpu_host_unregister(struct kvt_device *d, void *p)
{
	(void)d;
	(void)p;
}

static int cpu_mem_create(struct kvt_device *d, size_t size, struct kvt_dev_mem *out)
{
	(void)d;
	size_t gran = 2u << 20;
	size = (size + gran - 1) / gran * gran;
	int fd = memfd_create("kvtier-gpu-pool", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (fd < 0)
		return -errno;
	if (ftruncate(fd, (off_t)size) < 0 ||
	    fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) < 0) {
		int e = -errno;
		close(fd);
		return e;
	}
	void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED ||
	    fcntl(fd, F_ADD_SEALS, F_SEAL_FUTURE_WRITE | F_SEAL_SEAL) < 0) { /* readers only */
		int e = -errno;
		if (p != MAP_FAILED)
			munmap(p, size);
		close(fd);
		return e;
	}
	out->ptr = p;
	out->size = size;
	out->fd = fd;
	out->handle = 0;
	return 0;
}

static void cpu_mem_destroy(struct kvt_device *d, struct kvt_dev_mem *m)
{
	(void)d;
	if (m->ptr)
		munmap(m->ptr, m->size);
	if (m->fd >= 0)
		close(m->fd);
	m->ptr = NULL;
	m->fd = -1;
}

static int cpu_mem_import(struct kvt_device *d, int fd, size_t size, struct kvt_dev_mem *out)
{
	(void)d;
	void *p = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		return -errno;
	out->ptr = p;
	out->size = size;
	out->fd = -1;
	out->handle = 0;
	return 0;
}

static int cpu_copy_submit(struct kvt_device *dev, struct kvt_copy_batch *b)
{
	struct cpu_device *d = (struct cpu_device *)dev;
	pthread_mutex_lock(&d->lock);
	kvt_list_add_tail(&d->queued, &b->link);
	d->submitted++;
	pthread_cond_signal(&d->cond);
	pthread_mutex_unlock(&d->lock);
	return 0;
}

static int cpu_event_fd(struct kvt_device *dev)
{
	return ((struct cpu_device *)dev)->efd;
}

static void cpu_poll(struct kvt_device *dev)
{
	struct cpu_device *d = (struct cpu_device *)dev;
	uint64_t v;
	ssize_t r = read(d->efd, &v, sizeof(v));
	(void)r;
	struct kvt_list done;
	kvt_list_init(&done);
	pthread_mutex_lock(&d->lock);
	if (!kvt_list_empty(&d->done)) {
		/* Splice the finished batches out, then run them without the lock. */
		done.next = d->done.next;
		done.prev = d->done.prev;
		done.next->prev = &done;
		done.prev->next = &done;
		kvt_list_init(&d->done);
	}
	pthread_mutex_unlock(&d->lock);
	struct kvt_list *pos, *tmp;
	kvt_list_for_each_safe(pos, tmp, &done)
	{
		struct kvt_copy_batch *b = kvt_container_of(pos, struct kvt_copy_batch, link);
		kvt_list_del(pos);
		b->done(b);
	}
}

static int cpu_memcpy(struct kvt_device *d, void *dst, const void *src, size_t len,
		      enum kvt_copy_dir dir)
{
	(void)d;
	(void)dir;
	memcpy(dst, src, len);
	return 0;
}

/*
 * Fences. The cpu device's kernels (the compute backend's) complete before the call
 * that queues them returns, so a fence recorded on a stream is complete at once. Its
 * copies are the worker's: a fence recorded behind them waits until the worker has
 * landed as many batches as were submitted when it was recorded. Such a fence keeps
 * that state in the shared memory it was made with (struct cpu_fence_shm), where the
 * worker publishes its count after every batch, so that a client process sees the
 * copies land without a word from the daemon. The handle names the device, so that a
 * cuda handle given to a cpu client (or the reverse) is refused.
 */
struct cpu_fence_shm {
	uint64_t target; /* batches that must have landed: the last record's count */
	uint64_t landed; /* batches landed: the worker's count */
	uint32_t wake;   /* futex word: bumped after each landing */
	uint32_t pad;
};
_Static_assert(sizeof(struct cpu_fence_shm) <= KVT_FENCE_SHM_BYTES, "fence state");

struct kvt_fence {
	struct cpu_fence_shm *shm; /* NULL: recorded on streams only, always complete */
	struct cpu_device *owner;  /* made here with shm: in owner->fences */
	struct kvt_list link;
};

static const char cpu_fence_tag[] = "kvtier-cpu-fence";

/* With d->lock held, by the worker after each batch. */
static void fences_landed(struct cpu_device *d)
{
	struct kvt_fence *f;
	kvt_list_for_each_entry(f, &d->fences, link)
	{
		__atomic_store_n(&f->shm->landed, d->landed, __ATOMIC_RELEASE);
		__atomic_add_fetch(&f->shm->wake, 1, __ATOMIC_RELEASE);
		/* shared futex: the waiter is another process */
		syscall(SYS_futex, &f->shm->wake, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
	}
}

static int fence_new(struct cpu_device *owner, void *shm, struct kvt_fence **out)
{
	if (shm && ((uintptr_t)shm & 7))
		return -EINVAL;
	struct kvt_fence *f = kvt_calloc(1, sizeof(*f));
	if (!f)
		return -ENOMEM;
	f->shm = shm;
	kvt_list_init(&f->link);
	if (owner && shm) {
		f->owner = owner;
		pthread_mutex_lock(&owner->lock);
		*f->shm = (struct cpu_fence_shm){.target = owner->landed, .landed = owner->landed};
		kvt_list_add_tail(&owner->fences, &f->link);
		pthread_mutex_unlock(&owner->lock);
	}
	*out = f;
	return 0;
}

static int cpu_fence_create(struct kvt_device *d, uint8_t *handle, void *shm,
			    struct kvt_fence **out)
{
	if (handle) {
		memset(handle, 0, KVT_FENCE_HANDLE_BYTES);
		memcpy(handle, cpu_fence_tag, sizeof(cpu_fence_tag) - 1);
	}
	return fence_new((struct cpu_device *)d, shm, out);
}

static int cpu_fence_open(struct kvt_device *d, const uint8_t *handle, void *shm,
			  struct kvt_fence **out)
{
	(void)d;
	if (memcmp(handle, cpu_fence_tag, sizeof(cpu_fence_tag) - 1))
		return -EINVAL;
	return fence_new(NULL, shm, out);
}

static int cpu_fence_record(struct kvt_device *d, struct kvt_fence *f, void *stream)
{
	(void)d;
	(void)stream;
	if (f->shm) /* what the stream holds is done: complete, as of the copies landed */
		__atomic_store_n(&f->shm->target, 0, __ATOMIC_RELEASE);
	return 0;
}

static int cpu_fence_record_copies(struct kvt_device *dev, struct kvt_fence *f,
				   enum kvt_copy_dir dir)
{
	struct cpu_device *d = (struct cpu_device *)dev;
	(void)dir; /* one worker does both directions, in order */
	if (f->owner != d)
		return -EINVAL;
	pthread_mutex_lock(&d->lock);
	__atomic_store_n(&f->shm->target, d->submitted, __ATOMIC_RELEASE);
	pthread_mutex_unlock(&d->lock);
	return 0;
}

static int cpu_fence_query(struct kvt_device *d, struct kvt_fence *f)
{
	(void)d;
	if (!f->shm)
		return 0;
	return __atomic_load_n(&f->shm->landed, __ATOMIC_ACQUIRE) >=
			       __atomic_load_n(&f->shm->target, __ATOMIC_ACQUIRE)
		       ? 0
		       : -EAGAIN;
}

static int cpu_fence_wait(struct kvt_device *d, struct kvt_fence *f)
{
	if (!f->shm)
		return 0;
	for (;;) {
		uint32_t w = __atomic_load_n(&f->shm->wake, __ATOMIC_ACQUIRE);
		if (cpu_fence_query(d, f) == 0)
			return 0;
		/* bounded, so that a wake-up lost to a word the other side rewrote costs a
		 * little time and never a hang */
		struct timespec ts = {0, 10 * 1000 * 1000};
		syscall(SYS_futex, &f->shm->wake, FUTEX_WAIT, w, &ts, NULL, 0);
	}
}

static void cpu_fence_destroy(struct kvt_device *d, struct kvt_fence *f)
{
	(void)d;
	if (f->owner) {
		pthread_mutex_lock(&f->owner->lock);
		kvt_list_del(&f->link);
		pthread_mutex_unlock(&f->owner->lock);
	}
	kvt_free(f);
}

static int cpu_fence_stream_wait(struct kvt_device *d, struct kvt_fence *f, void *stream)
{
	(void)stream;
	/* the work queued after this runs on the caller's thread, now: wait here */
	return cpu_fence_wait(d, f);
}

const struct kvt_device_ops kvt_device_cpu_ops = {
	.name = "cpu",
	.version = KVT_DEVICE_OPS_VERSION,
	.caps = 0,
	.open = cpu_open,
	.close = cpu_close,
	.describe = cpu_describe,
	.numa_node = cpu_numa_node,
	.host_register = cpu_host_register,
	.host_unregister = cpu_host_unregister,
	.mem_create = cpu_mem_create,
	.mem_destroy = cpu_mem_destroy,
	.mem_import = cpu_mem_import,
	.host_map_ro = cpu_host_map_ro,
	.copy_submit = cpu_copy_submit,
	.event_fd = cpu_event_fd,
	.poll = cpu_poll,
	.memcpy = cpu_memcpy,
	.fence_create = cpu_fence_create,
	.fence_open = cpu_fence_open,
	.fence_record = cpu_fence_record,
	.fence_record_copies = cpu_fence_record_copies,
	.fence_query = cpu_fence_query,
	.fence_wait = cpu_fence_wait,
	.fence_destroy = cpu_fence_destroy,
	.fence_stream_wait = cpu_fence_stream_wait,
};
