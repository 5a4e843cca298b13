// SPDX-License-Identifier: MIT
/*
 * The cuda device. Linked with the static CUDA runtime and reaching the driver API
 * only through cudaGetDriverEntryPointByVersion, so a binary built with CUDA starts
 * where no driver is installed: open() then fails with -ENODEV and "auto" takes the
 * cpu device. CUDA errors become errno here; no cudaError_t leaves this file.
 *
 * Copies: a batch of pages becomes one gather kernel (default) reading mapped pinned
 * host memory, or one cudaMemcpyBatchAsync (KVT_CUDA_COPY=memcpy), on a stream of
 * the device's own per direction; a host function queued behind it signals the
 * eventfd the store's loop polls. KVT_CUDA_COPY_DELAY_US (tests) queues a kernel that
 * spins that long before each batch, so that a reader not ordered after the copies
 * would find the slots' old pages.
 */
#include "device.h"
#include "kernels/copy.h"
#include "kernels/cuda_common.cuh"

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cuda.h>
#include <cuda_runtime.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <unistd.h>

extern "C" {
#include "daemon/alloc.h"
#include "daemon/log.h"
}

namespace {

constexpr unsigned kRing = 1u << 18; /* copy descriptors per direction */

struct drv {
	decltype(&cuMemCreate) create;
	decltype(&cuMemRelease) release;
	decltype(&cuMemAddressReserve) reserve;
	decltype(&cuMemAddressFree) addr_free;
	decltype(&cuMemMap) map;
	decltype(&cuMemUnmap) unmap;
	decltype(&cuMemSetAccess) set_access;
	decltype(&cuMemGetAllocationGranularity) granularity;
	decltype(&cuMemExportToShareableHandle) export_handle;
	decltype(&cuMemImportFromShareableHandle) import_handle;
};

struct lane {
	cudaStream_t stream;
	kvt_copy *ring; /* pinned, mapped: the kernel reads descriptors from here */
	unsigned head;  /* next free descriptor; everything in flight lies below it */
};

struct cuda_device {
	kvt_device base;
	int ordinal;
	int efd;
	bool use_memcpy_batch;
	uint64_t delay_ns;
	char desc[320];
	int numa;
	drv d;
	lane lanes[2];
	pthread_mutex_t lock;
	kvt_list done;
};

/* kvt_cuda_errno (kernels/) with the one code only this file meets. */
static int to_errno(cudaError_t e, const char *what)
{
	if (e == cudaErrorHostMemoryAlreadyRegistered) {
		kvt_err("cuda", "%s: %s", what, cudaGetErrorString(e));
		return -EEXIST;
	}
	return kvt_cuda_errno(e, what);
}

int cu_errno(CUresult r, const char *what)
{
	if (r == CUDA_SUCCESS)
		return 0;
	kvt_err("cuda", "%s: driver error %d", what, (int)r);
	return r == CUDA_ERROR_OUT_OF_MEMORY ? -ENOMEM : -EIO;
}

template <typename F> int entry(const char *name, F *fn)
{
	cudaDriverEntryPointQueryResult q;
	void *p = nullptr;
	cudaError_t e = cudaGetDriverEntryPointByVersion(name, &p, 12000, cudaEnableDefault, &q);
	if (e != cudaSuccess || q != cudaDriverEntryPointSuccess || !p) {
		kvt_err("cuda", "driver entry point %s not found", name);
		return -ENOSYS;
	}
	*fn = reinterpret_cast<F>(p);
	return 0;
}

int numa_of(int ordinal)
{
	char bus[32], path[128];
	if (cudaDeviceGetPCIBusId(bus, sizeof(bus), ordinal) != cudaSuccess)
		return -1;
	for (char *c = bus; *c; c++)
		if (*c >= 'A' && *c <= 'F')
			*c = (char)(*c - 'A' + 'a');
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/numa_node", bus);
	FILE *f = fopen(path, "r");
	if (!f)
		return -1;
	int node = -1;
	if (fscanf(f, "%d", &node) != 1)
		node = -1;
	fclose(f);
	return node;
}

} // namespace

static void cuda_close(kvt_device *dev);

static int cuda_open(kvt_device **out, int ordinal)
{
	int count = 0;
	cudaError_t e = cudaGetDeviceCount(&count);
	if (e != cudaSuccess || count <= ordinal) {
		cudaGetLastError();
		return -ENODEV;
	}
	auto *d = static_cast<cuda_device *>(kvt_calloc(1, sizeof(cuda_device)));
	if (!d)
		return -ENOMEM;
	d->base.ops = kvt_device_cuda_ops;
	d->ordinal = ordinal;
	d->efd = -1;
	kvt_list_init(&d->done);
	pthread_mutex_init(&d->lock, nullptr);
	const char *mode = getenv("KVT_CUDA_COPY");
	d->use_memcpy_batch = mode && !strcmp(mode, "memcpy");
	if (const char *delay = getenv("KVT_CUDA_COPY_DELAY_US"); delay && *delay)
		d->delay_ns = strtoull(delay, nullptr, 10) * 1000;
	int ret;
	if ((ret = to_errno(cudaSetDevice(ordinal), "cudaSetDevice")) < 0)
		goto fail;
	{
		cudaDeviceProp prop;
		if ((ret = to_errno(cudaGetDeviceProperties(&prop, ordinal), "properties")) < 0)
			goto fail;
		char bus[32] = "?";
		cudaDeviceGetPCIBusId(bus, sizeof(bus), ordinal);
		snprintf(d->desc, sizeof(d->desc), "%s (%s, sm_%d%d, %zu MiB)", prop.name, bus,
			 prop.major, prop.minor, prop.totalGlobalMem >> 20);
		int host_ptr_ok = 0;
		cudaDeviceGetAttribute(&host_ptr_ok, cudaDevAttrCanUseHostPointerForRegisteredMem,
				       ordinal);
		if (!host_ptr_ok && !d->use_memcpy_batch) {
			kvt_notice("cuda", "registered host pointers not usable by kernels: "
					   "copies through cudaMemcpyBatchAsync");
			d->use_memcpy_batch = true;
		}
	}
	d->numa = numa_of(ordinal);
	if ((ret = entry("cuMemCreate", &d->d.create)) < 0 ||
	    (ret = entry("cuMemRelease", &d->d.release)) < 0 ||
	    (ret = entry("cuMemAddressReserve", &d->d.reserve)) < 0 ||
	    (ret = entry("cuMemAddressFree", &d->d.addr_free)) < 0 ||
	    (ret = entry("cuMemMap", &d->d.map)) < 0 || (ret = entry("cuMemUnmap", &d->d.unmap)) < 0 ||
	    (ret = entry("cuMemSetAccess", &d->d.set_access)) < 0 ||
	    (ret = entry("cuMemGetAllocationGranularity", &d->d.granularity)) < 0 ||
	    (ret = entry("cuMemExportToShareableHandle", &d->d.export_handle)) < 0 ||
	    (ret = entry("cuMemImportFromShareableHandle", &d->d.import_handle)) < 0)
		goto fail;
	for (int i = 0; i < 2; i++) {
		lane &l = d->lanes[i];
		if ((ret = to_errno(cudaStreamCreateWithFlags(&l.stream, cudaStreamNonBlocking),
				    "stream")) < 0)
			goto fail;
		void *ring = nullptr;
		if ((ret = to_errno(cudaHostAlloc(&ring, kRing * sizeof(kvt_copy),
						  cudaHostAllocMapped | cudaHostAllocPortable),
				    "descriptor ring")) < 0)
			goto fail;
		l.ring = static_cast<kvt_copy *>(ring);
		l.head = 0;
	}
	d->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (d->efd < 0) {
		ret = -errno;
		goto fail;
	}
	kvt_info("cuda", "device %d: %s, NUMA node %d, copies by %s", ordinal, d->desc, d->numa,
		 d->use_memcpy_batch ? "cudaMemcpyBatchAsync" : "gather kernel");
	if (d->delay_ns)
		kvt_notice("cuda", "copies start %llu us late (KVT_CUDA_COPY_DELAY_US)",
			   (unsigned long long)(d->delay_ns / 1000));
	*out = &d->base;
	return 0;
fail:
	cuda_close(&d->base);
	return ret;
}

static void cuda_close(kvt_device *dev)
{
	auto *d = reinterpret_cast<cuda_device *>(dev);
	for (int i = 0; i < 2; i++) {
		if (d->lanes[i].stream) {
			cudaStreamSynchronize(d->lanes[i].stream);
			cudaStreamDestroy(d->lanes[i].stream);
		}
		if (d->lanes[i].ring)
			cudaFreeHost(d->lanes[i].ring);
	}
	if (d->efd >= 0)
		close(d->efd);
	pthread_mutex_destroy(&d->lock);
	kvt_free(d);
}

static const char *cuda_describe(kvt_device *dev)
{
	return reinterpret_cast<cuda_device *>(dev)->desc;
}

static int cuda_numa_node(kvt_device *dev)
{
	return reinterpret_cast<cuda_device *>(dev)->numa;
}

static int cuda_host_register(kvt_device *dev, void *p, size_t len)
{
	(void)dev;
	return to_errno(cudaHostRegister(p, len, cudaHostRegisterPortable | cudaHostRegisterMapped),
			"cudaHostRegister");
}

static int cuda_host_map_ro(kvt_device *dev, void *p, size_t len, void **out)
{
	(void)dev;
	int ro = 0, dev_id = 0;
	if (cudaGetDevice(&dev_id) != cudaSuccess ||
	    cudaDeviceGetAttribute(&ro, cudaDevAttrHostRegisterReadOnlySupported, dev_id) !=
		    cudaSuccess ||
	    !ro)
		return -EOPNOTSUPP;
	int ret = to_errno(cudaHostRegister(p, len, cudaHostRegisterPortable | cudaHostRegisterMapped |
							   cudaHostRegisterReadOnly),
			   "cudaHostRegister(read-only)");
	if (ret < 0)
		return ret;
	if ((ret = to_errno(cudaHostGetDevicePointer(out, p, 0), "cudaHostGetDevicePointer")) < 0)
		cudaHostUnregister(p);
	return ret;
}

static void cuda_host_unregister(kvt_device *dev, void *p)
{
	(void)dev;
	to_errno(cudaHostUnregister(p), "cudaHostUnregister");
}

static CUmemAllocationProp pool_prop(const cuda_device *d)
{
	CUmemAllocationProp prop = {};
	prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
	prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
	prop.location.id = d->ordinal;
	prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
	return prop;
}

/* Reserves an address range for h, maps it and grants this device access. */
static int map_handle(cuda_device *d, CUmemGenericAllocationHandle h, size_t size,
		      CUmemAccess_flags flags, CUdeviceptr *out)
{
	CUmemAllocationProp prop = pool_prop(d);
	size_t gran = 0;
	CUdeviceptr va = 0;
	int ret = cu_errno(d->d.granularity(&gran, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED),
			   "granularity");
	if (ret < 0 || (ret = cu_errno(d->d.reserve(&va, size, gran, 0, 0), "cuMemAddressReserve")) < 0)
		return ret;
	if ((ret = cu_errno(d->d.map(va, size, 0, h, 0), "cuMemMap")) < 0) {
		d->d.addr_free(va, size);
		return ret;
	}
	CUmemAccessDesc acc = {};
	acc.location = prop.location;
	acc.flags = flags;
	if ((ret = cu_errno(d->d.set_access(va, size, &acc, 1), "cuMemSetAccess")) < 0) {
		d->d.unmap(va, size);
		d->d.addr_free(va, size);
		return ret;
	}
	*out = va;
	return 0;
}

static int cuda_mem_create(kvt_device *dev, size_t size, kvt_dev_mem *out)
{
	auto *d = reinterpret_cast<cuda_device *>(dev);
	CUmemAllocationProp prop = pool_prop(d);
	size_t gran = 0;
	int ret = cu_errno(d->d.granularity(&gran, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED),
			   "granularity");
	if (ret < 0)
		return ret;
	size = (size + gran - 1) / gran * gran;
	CUmemGenericAllocationHandle h;
	if ((ret = cu_errno(d->d.create(&h, size, &prop, 0), "cuMemCreate")) < 0)
		return ret;
	CUdeviceptr va = 0;
	int fd = -1;
	if ((ret = map_handle(d, h, size, CU_MEM_ACCESS_FLAGS_PROT_READWRITE, &va)) < 0) {
		d->d.release(h);
		return ret;
	}
	if ((ret = cu_errno(d->d.export_handle(&fd, h, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0),
			    "cuMemExportToShareableHandle")) < 0) {
		d->d.unmap(va, size);
		d->d.addr_free(va, size);
		d->d.release(h);
		return ret;
	}
	out->ptr = reinterpret_cast<void *>(va);
	out->size = size;
	out->fd = fd;
	out->handle = h;
	return 0;
}

static void cuda_mem_destroy(kvt_device *dev, kvt_dev_mem *m)
{
	auto *d = reinterpret_cast<cuda_device *>(dev);
	if (!m->ptr)
		return;
	cudaDeviceSynchronize();
	CUdeviceptr va = reinterpret_cast<CUdeviceptr>(m->ptr);
	d->d.unmap(va, m->size);
	d->d.addr_free(va, m->size);
	d->d.release(static_cast<CUmemGenericAllocationHandle>(m->handle));
	if (m->fd >= 0)
		close(m->fd);
	m->ptr = nullptr;
	m->fd = -1;
}

static int cuda_mem_import(kvt_device *dev, int fd, size_t size, kvt_dev_mem *out)
{
	auto *d = reinterpret_cast<cuda_device *>(dev);
	CUmemGenericAllocationHandle h;
	int ret = cu_errno(d->d.import_handle(&h, reinterpret_cast<void *>(static_cast<uintptr_t>(fd)),
					      CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
			   "cuMemImportFromShareableHandle");
	if (ret < 0)
		return ret;
	/* Read-only: a client reads pages, the daemon alone writes them. */
	CUdeviceptr va = 0;
	if ((ret = map_handle(d, h, size, CU_MEM_ACCESS_FLAGS_PROT_READ, &va)) < 0) {
		d->d.release(h);
		return ret;
	}
	out->ptr = reinterpret_cast<void *>(va);
	out->size = size;
	out->fd = -1;
	out->handle = h;
	return 0;
}

struct cuda_batch_ctx {
	cuda_device *dev;
	kvt_copy_batch *b;
	int lane;
};

static void CUDART_CB batch_landed(void *arg)
{
	auto *c = static_cast<cuda_batch_ctx *>(arg);
	cuda_device *d = c->dev;
	pthread_mutex_lock(&d->lock);
	kvt_list_add_tail(&d->done, &c->b->link);
	pthread_mutex_unlock(&d->lock);
	uint64_t one = 1;
	ssize_t w = write(d->efd, &one, sizeof(one));
	(void)w;
	free(c);
}

static int cuda_copy_submit(kvt_device *dev, kvt_copy_batch *b)
{
	auto *d = reinterpret_cast<cuda_device *>(dev);
	int li = b->dir == KVT_H2D ? 0 : 1;
	lane &l = d->lanes[li];
	if (!b->n || b->n > kRing)
		return -EINVAL;
	/*
	 * A batch takes the run of descriptors after the last one; at the ring's end the
	 * lane drains (once per kRing descriptors) and the ring starts over.
	 */
	if (l.head + b->n > kRing) {
		int ret = to_errno(cudaStreamSynchronize(l.stream), "lane drain");
		if (ret < 0)
			return ret;
		l.head = 0;
	}
	unsigned start = l.head;
	memcpy(l.ring + start, b->copies, b->n * sizeof(kvt_copy));
	l.head = start + b->n;
	int ret;
	if (d->delay_ns && (ret = kvt_cuda_delay(d->delay_ns, l.stream)) < 0)
		return ret;
	if (d->use_memcpy_batch) {
		void **dsts = static_cast<void **>(malloc(b->n * (sizeof(void *) * 2 + sizeof(size_t))));
		if (!dsts)
			return -ENOMEM;
		const void **srcs = const_cast<const void **>(dsts + b->n);
		size_t *sizes = reinterpret_cast<size_t *>(dsts + 2 * b->n);
		for (unsigned i = 0; i < b->n; i++) {
			dsts[i] = b->copies[i].dst;
			srcs[i] = b->copies[i].src;
			sizes[i] = b->copies[i].len;
		}
		cudaMemcpyAttributes attr = {};
		attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
		size_t idx = 0;
		ret = to_errno(cudaMemcpyBatchAsync(dsts, srcs, sizes, b->n, &attr, &idx, 1, l.stream),
			       "cudaMemcpyBatchAsync");
		free(dsts);
	} else {
		ret = kvt_cuda_copy_pages(l.ring + start, b->n, l.stream);
	}
	if (ret < 0)
		return ret;
	auto *c = static_cast<cuda_batch_ctx *>(malloc(sizeof(cuda_batch_ctx)));
	if (!c)
		return -ENOMEM;
	c->dev = d;
	c->b = b;
	c->lane = li;
	b->res = 0;
	return to_errno(cudaLaunchHostFunc(l.stream, batch_landed, c), "cudaLaunchHostFunc");
}

static int cuda_event_fd(kvt_device *dev)
{
	return reinterpret_cast<cuda_device *>(dev)->efd;
}

static void cuda_poll(kvt_device *dev)
{
	auto *d = reinterpret_cast<cuda_device *>(dev);
	uint64_t v;
	ssize_t r = read(d->efd, &v, sizeof(v));
	(void)r;
	kvt_list done;
	kvt_list_init(&done);
	pthread_mutex_lock(&d->lock);
	if (!kvt_list_empty(&d->done)) {
		done.next = d->done.next;
		done.prev = d->done.prev;
		done.next->prev = &done;
		done.prev->next = &done;
		kvt_list_init(&d->done);
	}
	pthread_mutex_unlock(&d->lock);
	kvt_list *pos, *tmp;
	kvt_list_for_each_safe(pos, tmp, &done)
	{
		auto *b = kvt_container_of(pos, kvt_copy_batch, link);
		kvt_list_del(pos);
		b->done(b);
	}
}

static int cuda_memcpy(kvt_device *dev, void *dst, const void *src, size_t len,
		       enum kvt_copy_dir dir)
{
	(void)dev;
	return to_errno(cudaMemcpy(dst, src, len,
				   dir == KVT_H2D ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost),
			"cudaMemcpy");
}

/*
 * Fences: a cudaEvent_t made with cudaEventInterprocess (timing off, as that asks),
 * shared by its IPC handle. A query or a record in either process sees the last record
 * made in any of them.
 */
static_assert(sizeof(cudaIpcEventHandle_t) == KVT_FENCE_HANDLE_BYTES, "fence handle");

static int cuda_fence_create(kvt_device *dev, uint8_t *handle, void *shm, kvt_fence **out)
{
	(void)dev;
	(void)shm; /* the driver keeps the state */
	cudaEvent_t e;
	unsigned fl = cudaEventDisableTiming | (handle ? cudaEventInterprocess : 0);
	int ret = to_errno(cudaEventCreateWithFlags(&e, fl), "cudaEventCreate");
	if (ret < 0)
		return ret;
	if (handle) {
		cudaIpcEventHandle_t h;
		if ((ret = to_errno(cudaIpcGetEventHandle(&h, e), "cudaIpcGetEventHandle")) < 0) {
			cudaEventDestroy(e);
			return ret;
		}
		memcpy(handle, &h, sizeof(h));
	}
	*out = reinterpret_cast<kvt_fence *>(e);
	return 0;
}

static int cuda_fence_open(kvt_device *dev, const uint8_t *handle, void *shm, kvt_fence **out)
{
	(void)dev;
	(void)shm;
	cudaIpcEventHandle_t h;
	memcpy(&h, handle, sizeof(h));
	cudaEvent_t e;
	int ret = to_errno(cudaIpcOpenEventHandle(&e, h), "cudaIpcOpenEventHandle");
	if (ret == 0)
		*out = reinterpret_cast<kvt_fence *>(e);
	return ret;
}

static int cuda_fence_record(kvt_device *dev, kvt_fence *f, void *stream)
{
	(void)dev;
	return to_errno(cudaEventRecord(reinterpret_cast<cudaEvent_t>(f),
					static_cast<cudaStream_t>(stream)),
			"cudaEventRecord");
}

/* Copies of a direction are all queued on its lane's stream, in submission order
 * (copy_submit), so an event recorded there now follows every batch submitted. */
static int cuda_fence_record_copies(kvt_device *dev, kvt_fence *f, enum kvt_copy_dir dir)
{
	auto *d = reinterpret_cast<cuda_device *>(dev);
	return to_errno(cudaEventRecord(reinterpret_cast<cudaEvent_t>(f),
					d->lanes[dir == KVT_H2D ? 0 : 1].stream),
			"cudaEventRecord(copies)");
}

static int cuda_fence_query(kvt_device *dev, kvt_fence *f)
{
	(void)dev;
	cudaError_t e = cudaEventQuery(reinterpret_cast<cudaEvent_t>(f));
	if (e == cudaErrorNotReady)
		return -EAGAIN;
	return to_errno(e, "cudaEventQuery");
}

static int cuda_fence_wait(kvt_device *dev, kvt_fence *f)
{
	(void)dev;
	return to_errno(cudaEventSynchronize(reinterpret_cast<cudaEvent_t>(f)),
			"cudaEventSynchronize");
}

static void cuda_fence_destroy(kvt_device *dev, kvt_fence *f)
{
	(void)dev;
	to_errno(cudaEventDestroy(reinterpret_cast<cudaEvent_t>(f)), "cudaEventDestroy");
}

static int cuda_fence_stream_wait(kvt_device *dev, kvt_fence *f, void *stream)
{
	(void)dev;
	return to_errno(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream),
					    reinterpret_cast<cudaEvent_t>(f), 0),
			"cudaStreamWaitEvent");
}

static const kvt_device_ops cuda_ops = {
	"cuda",
	KVT_DEVICE_OPS_VERSION,
	KVT_DEV_CAP_GPU,
	cuda_open,
	cuda_close,
	cuda_describe,
	cuda_numa_node,
	cuda_host_register,
	cuda_host_unregister,
	cuda_mem_create,
	cuda_mem_destroy,
	cuda_copy_submit,
	cuda_event_fd,
	cuda_poll,
	cuda_memcpy,
	cuda_mem_import,
	cuda_host_map_ro,
	cuda_fence_create,
	cuda_fence_open,
	cuda_fence_record,
	cuda_fence_record_copies,
	cuda_fence_query,
	cuda_fence_wait,
	cuda_fence_destroy,
	cuda_fence_stream_wait,
};

extern "C" const kvt_device_ops *const kvt_device_cuda_ops = &cuda_ops;
