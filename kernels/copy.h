/* SPDX-License-Identifier: MIT */
#ifndef KVT_KERNELS_COPY_H
#define KVT_KERNELS_COPY_H

/* Page gather/scatter kernels, behind a C interface (no CUDA types). */

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct kvt_copy;

/*
 * Launches one kernel that performs the n copies of descs (readable by the GPU:
 * mapped pinned host memory or device memory) on stream (a cudaStream_t). Sources and
 * destinations may be device memory or mapped pinned host memory, so one launch
 * gathers scattered host pages into the GPU pool (or scatters them back) at PCIe
 * speed. 0 or -errno.
 */
int kvt_cuda_copy_pages(const struct kvt_copy *descs, unsigned n, void *stream);

/* One thread that spins for ns nanoseconds on stream (the GPU's global timer): the work
 * queued after it starts that much later. For tests of ordering. 0 or -errno. */
int kvt_cuda_delay(uint64_t ns, void *stream);

#ifdef __cplusplus
}
#endif

#endif
