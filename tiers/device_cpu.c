// SPDX-License-Identifier: MIT
/*
 * The cpu device: the "GPU pool" is a memfd mapped shared, exactly what a client will
 * map, and copies are done by a worker thread so that they complete asynchronously,
 * as the CUDA engine's do.
 */
#include "device.h"
#include "daemon/alloc.h"
#include "daemon/log.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
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
};

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
		for (unsigned i = 0; i < b->n; i++)
			memcpy(b->copies[i].dst, b->copies[i].src, b->copies[i].len);
		b->res = 0;
		pthread_mutex_lock(&d->lock);
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
 * Fences: the cpu device's work (the compute backend's kernels) completes before the
 * call that queues it returns, so every fence is complete. The handle names the
 * device, so that a cuda handle given to a cpu client (or the reverse) is refused.
 */
struct kvt_fence {
	char unused;
};

/* Nothing to wait for: every cpu fence is this one. */
static struct kvt_fence cpu_fence;
static const char cpu_fence_tag[] = "kvtier-cpu-fence";

static int cpu_fence_create(struct kvt_device *d, uint8_t *handle, struct kvt_fence **out)
{
	(void)d;
	if (handle) {
		memset(handle, 0, KVT_FENCE_HANDLE_BYTES);
		memcpy(handle, cpu_fence_tag, sizeof(cpu_fence_tag) - 1);
	}
	*out = &cpu_fence;
	return 0;
}

static int cpu_fence_open(struct kvt_device *d, const uint8_t *handle, struct kvt_fence **out)
{
	if (memcmp(handle, cpu_fence_tag, sizeof(cpu_fence_tag) - 1))
		return -EINVAL;
	return cpu_fence_create(d, NULL, out);
}

static int cpu_fence_record(struct kvt_device *d, struct kvt_fence *f, void *stream)
{
	(void)d;
	(void)f;
	(void)stream;
	return 0;
}

static int cpu_fence_query(struct kvt_device *d, struct kvt_fence *f)
{
	(void)d;
	(void)f;
	return 0;
}

static void cpu_fence_destroy(struct kvt_device *d, struct kvt_fence *f)
{
	(void)d;
	(void)f;
}

static int cpu_fence_stream_wait(struct kvt_device *d, struct kvt_fence *f, void *stream)
{
	(void)d;
	(void)f;
	(void)stream;
	return 0; /* the work before the fence is done */
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
	.fence_query = cpu_fence_query,
	.fence_wait = cpu_fence_query,
	.fence_destroy = cpu_fence_destroy,
	.fence_stream_wait = cpu_fence_stream_wait,
};
