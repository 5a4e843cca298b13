/* SPDX-License-Identifier: MIT */
#ifndef KVT_LOOP_H
#define KVT_LOOP_H

#include <liburing.h>
#include <stdint.h>

/*
 * The event loop: one io_uring that carries disk I/O, wake-ups from the device's copy
 * engine (an eventfd polled through the ring) and, later, the daemon's sockets. Every
 * SQE's user_data points at a struct kvt_op whose fn runs when its CQE is reaped.
 * Not thread-safe: one thread owns a loop.
 */
struct kvt_op {
	/* res: the CQE's result (bytes or -errno); flags: the CQE's flags. */
	void (*fn)(struct kvt_op *op, int res, uint32_t flags);
};

#define KVT_LOOP_MAX_BUFS 256

struct kvt_loop {
	struct io_uring ring;
	unsigned entries;
	unsigned inflight; /* SQEs handed out and not yet completed */
	unsigned nbufs;    /* registered buffer slots in use */
	struct iovec bufs[KVT_LOOP_MAX_BUFS];
	unsigned nfiles;
	int files[16];
	uint64_t cqes_reaped;
};

/* Sets up the ring with entries SQEs (a power of two is used). 0 or -errno. */
int kvt_loop_init(struct kvt_loop *l, unsigned entries);
void kvt_loop_exit(struct kvt_loop *l);

/*
 * Returns a zeroed SQE whose user_data is op, submitting what is queued if the SQ is
 * full. Never NULL: if the SQ stays full, completions are reaped until a slot frees.
 */
struct io_uring_sqe *kvt_loop_sqe(struct kvt_loop *l, struct kvt_op *op);

/* Submits queued SQEs; returns the number submitted or -errno. */
int kvt_loop_submit(struct kvt_loop *l);

/*
 * Submits, then waits until at least min_complete CQEs arrived or timeout_ms passed
 * (-1: no timeout; 0: do not wait), and runs every op whose CQE is there. Returns the
 * number of CQEs handled or -errno (-ETIME is not an error: it returns 0).
 */
int kvt_loop_run(struct kvt_loop *l, unsigned min_complete, int timeout_ms);

/*
 * Registers [base, base+len) as fixed buffers, split in pieces of at most 1 GiB (the
 * kernel rejects larger iovecs) that end on multiples of unit, so that no unit-sized
 * slot straddles two pieces. Returns the index of the first piece (the others
 * follow) or -errno. Memory must stay mapped until kvt_loop_unregister_buffer.
 */
int kvt_loop_register_buffer(struct kvt_loop *l, void *base, size_t len, size_t unit);
void kvt_loop_unregister_buffer(struct kvt_loop *l, void *base);
/* The fixed-buffer index covering [p, p+len), or -1 if none covers it whole. */
int kvt_loop_buffer_index(const struct kvt_loop *l, const void *p, size_t len);

/* Registers fd as a fixed file; returns its index or -errno. */
int kvt_loop_register_file(struct kvt_loop *l, int fd);
void kvt_loop_unregister_file(struct kvt_loop *l, int index);

#define KVT_LOOP_BUF_PIECE (1ull << 30)

#endif
