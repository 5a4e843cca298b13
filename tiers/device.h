/* SPDX-License-Identifier: MIT */
#ifndef KVT_DEVICE_H
#define KVT_DEVICE_H

/*
 * The device backend: where the GPU tier's memory comes from and how pages are copied
 * between it and pinned host memory. Two implementations: "cuda" (VMM pool, batched
 * copies on streams of its own, completions signalled on an eventfd) and "cpu" (a
 * memfd pool, copies done by a worker thread). The store never asks which it has.
 */

#include <stddef.h>
#include <stdint.h>

#include "daemon/list.h"

#ifdef __cplusplus
extern "C" {
#endif

enum kvt_copy_dir {
	KVT_H2D, /* host -> device */
	KVT_D2H, /* device -> host */
};

struct kvt_copy {
	void *dst;
	const void *src;
	uint64_t len;
};

/*
 * A batch of page copies in one direction, started together and completed together.
 * The submitter fills copies, n, dir and done and keeps copies alive until done runs
 * (from kvt_device_ops.poll, on the thread that calls it) with res 0 or -errno.
 */
struct kvt_copy_batch {
	const struct kvt_copy *copies;
	unsigned n;
	enum kvt_copy_dir dir;
	int res;
	void (*done)(struct kvt_copy_batch *b);
	/* private to the device */
	struct kvt_list link;
};

/* Device memory made shareable with another process (the GPU pool). */
struct kvt_dev_mem {
	void *ptr;   /* device address (cpu device: a host mapping) */
	size_t size; /* rounded up to the device's granularity */
	int fd;      /* POSIX fd another process can map (VMM handle / memfd), or -1 */
	uint64_t handle;
};

enum kvt_device_cap {
	KVT_DEV_CAP_GPU = 1u << 0, /* a real GPU: device memory is not CPU-addressable */
};

#define KVT_DEVICE_OPS_VERSION 4

/*
 * A fence: the end of device work one process queued, which another process can see.
 * cuda: an event made with cudaEventInterprocess and shared by cudaIpcGetEventHandle.
 * The daemon makes two per client and sends their handles: the read fence, which the
 * client records behind its kernels that read the daemon's pages and the daemon
 * queries before it lets those pages' slots go; and the copy fence, which the daemon
 * records behind its copies into the GPU pool (fence_record_copies) and the client's
 * stream waits on before it reads the slots a select named while their copies were
 * under way.
 * cpu: kernels complete before the call that queues them returns, so a fence recorded
 * on a stream is complete at once; copies are done by the device's worker thread, and
 * a fence recorded behind them keeps its state in KVT_FENCE_SHM_BYTES of memory that
 * both processes map (the client's ring), which the worker updates as copies land.
 */
#define KVT_FENCE_HANDLE_BYTES 64
#define KVT_FENCE_SHM_BYTES    64
struct kvt_fence;

struct kvt_device;

struct kvt_device_ops {
	const char *name;
	uint32_t version;
	uint32_t caps;
	/* 0, -ENODEV (no such device or no driver), -errno. */
	int (*open)(struct kvt_device **out, int ordinal);
	void (*close)(struct kvt_device *d);
	/* Human-readable device name (model, PCI bus id). */
	const char *(*describe)(struct kvt_device *d);
	/* NUMA node of the device, -1 if unknown. */
	int (*numa_node)(struct kvt_device *d);
	/* Pins host memory for fast copies (cudaHostRegister); 0 or -errno. */
	int (*host_register)(struct kvt_device *d, void *p, size_t len);
	void (*host_unregister)(struct kvt_device *d, void *p);
	/* Device memory of at least size bytes, exportable as an fd. 0 or -errno. */
	int (*mem_create)(struct kvt_device *d, size_t size, struct kvt_dev_mem *out);
	void (*mem_destroy)(struct kvt_device *d, struct kvt_dev_mem *m);
	/* Starts a batch; 0 or -errno (then done is not called). */
	int (*copy_submit)(struct kvt_device *d, struct kvt_copy_batch *b);
	/* Readable (eventfd) when batches have completed; poll then runs their done. */
	int (*event_fd)(struct kvt_device *d);
	void (*poll)(struct kvt_device *d);
	/* Synchronous copy of any size, for tests and tools. 0 or -errno. */
	int (*memcpy)(struct kvt_device *d, void *dst, const void *src, size_t len,
		      enum kvt_copy_dir dir);
	/*
	 * Maps memory another process made with mem_create and sent as its fd (a client
	 * mapping the daemon's GPU pool), read-only where the device can enforce it; fd
	 * stays the caller's. Undone with mem_destroy (out->fd is -1). 0 or -errno.
	 */
	int (*mem_import)(struct kvt_device *d, int fd, size_t size, struct kvt_dev_mem *out);
	/*
	 * Makes a read-only host mapping (another process's pinned arena) readable by the
	 * device's kernels in place: *dev is the address they use. Undone with
	 * host_unregister(p). 0, -EOPNOTSUPP (the device cannot map read-only memory),
	 * -errno.
	 */
	int (*host_map_ro)(struct kvt_device *d, void *p, size_t len, void **dev);
	/*
	 * A fence; shareable when handle is not NULL (it is then filled with
	 * KVT_FENCE_HANDLE_BYTES bytes that fence_open takes in another process). shm
	 * (may be NULL: the fence is then never recorded behind copies) is
	 * KVT_FENCE_SHM_BYTES of memory, 8-byte aligned, that the other process maps
	 * too and passes to fence_open: where a device keeps a fence's state in memory
	 * (cpu), it lives there; it must outlive the fence.
	 */
	int (*fence_create)(struct kvt_device *d, uint8_t *handle, void *shm,
			    struct kvt_fence **out);
	int (*fence_open)(struct kvt_device *d, const uint8_t *handle, void *shm,
			  struct kvt_fence **out);
	/* Marks the end of the work queued so far on stream (a cudaStream_t; NULL: the
	 * legacy default stream). */
	int (*fence_record)(struct kvt_device *d, struct kvt_fence *f, void *stream);
	/* Marks the end of the copy batches submitted so far in direction dir (on cpu:
	 * in either), on a fence made with shm. 0 or -errno. */
	int (*fence_record_copies)(struct kvt_device *d, struct kvt_fence *f,
				   enum kvt_copy_dir dir);
	/* 0: the work before the fence's last record, in whichever process made it, is
	 * complete; -EAGAIN: not yet; -errno. Never blocks. */
	int (*fence_query)(struct kvt_device *d, struct kvt_fence *f);
	/* Blocks until it is complete. 0 or -errno. */
	int (*fence_wait)(struct kvt_device *d, struct kvt_fence *f);
	void (*fence_destroy)(struct kvt_device *d, struct kvt_fence *f);
	/* Work queued on stream from now on starts after the fence's last record, without
	 * blocking the caller (cudaStreamWaitEvent). 0 or -errno. */
	int (*fence_stream_wait)(struct kvt_device *d, struct kvt_fence *f, void *stream);
};

struct kvt_device {
	const struct kvt_device_ops *ops;
};

extern const struct kvt_device_ops kvt_device_cpu_ops;
/* NULL when built without CUDA. */
extern const struct kvt_device_ops *const kvt_device_cuda_ops;

/*
 * Opens a device by name: "cuda", "cpu", or "auto" (cuda where a GPU and its driver
 * are found, else cpu). 0 or -errno (-ENODEV: "cuda" asked for and none usable).
 */
int kvt_device_open(const char *name, int ordinal, struct kvt_device **out);
void kvt_device_close(struct kvt_device *d);

#ifdef __cplusplus
}
#endif

#endif
