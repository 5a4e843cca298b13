// SPDX-License-Identifier: MIT
#include "loop.h"
#include "log.h"

#include <errno.h>
#include <string.h>

int kvt_loop_init(struct kvt_loop *l, unsigned entries)
{
	memset(l, 0, sizeof(*l));
	unsigned n = 1;
	while (n < entries)
		n <<= 1;
	struct io_uring_params p = {0};
	p.flags = IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_CQSIZE;
	p.cq_entries = n * 4;
	int ret = io_uring_queue_init_params(n, &l->ring, &p);
	if (ret == -EINVAL) { /* older kernel: no COOP_TASKRUN or SUBMIT_ALL */
		memset(&p, 0, sizeof(p));
		p.flags = IORING_SETUP_CQSIZE;
		p.cq_entries = n * 4;
		ret = io_uring_queue_init_params(n, &l->ring, &p);
	}
	if (ret == -EPERM || ret == -ENOSYS || ret == -EACCES) {
		kvt_err("loop", "io_uring is not available here (io_uring_setup: %s): the kernel "
			"has it disabled (sysctl kernel.io_uring_disabled) or a seccomp profile "
			"blocks it (container runtimes' default profiles do: allow io_uring_setup, "
			"io_uring_enter and io_uring_register). kvtier drives its disk with io_uring "
			"and cannot run without it", strerror(-ret));
		return ret;
	}
	if (ret < 0) {
		kvt_err("loop", "io_uring_queue_init(%u): %s", n, strerror(-ret));
		return ret;
	}
	l->entries = n;
	ret = io_uring_register_buffers_sparse(&l->ring, KVT_LOOP_MAX_BUFS);
	if (ret < 0) {
		kvt_err("loop", "io_uring_register_buffers_sparse: %s", strerror(-ret));
		io_uring_queue_exit(&l->ring);
		return ret;
	}
	ret = io_uring_register_files_sparse(&l->ring, 16);
	if (ret < 0) {
		kvt_err("loop", "io_uring_register_files_sparse: %s", strerror(-ret));
		io_uring_queue_exit(&l->ring);
		return ret;
	}
	for (unsigned i = 0; i < 16; i++)
		l->files[i] = -1;
	return 0;
}

void kvt_loop_exit(struct kvt_loop *l)
{
	if (l->entries)
		io_uring_queue_exit(&l->ring);
	l->entries = 0;
}

static int reap(struct kvt_loop *l)
{
	struct io_uring_cqe *cqe;
	unsigned n = 0;
	/*
	 * Copy each CQE out and advance before running the op: an op may queue new SQEs
	 * and even run the loop again.
	 */
	for (;;) {
		if (io_uring_peek_cqe(&l->ring, &cqe) != 0)
			break;
		struct kvt_op *op = io_uring_cqe_get_data(cqe);
		int res = cqe->res;
		uint32_t flags = cqe->flags;
		io_uring_cqe_seen(&l->ring, cqe);
		if (!(flags & IORING_CQE_F_MORE))
			l->inflight--;
		n++;
		if (op)
			op->fn(op, res, flags);
	}
	l->cqes_reaped += n;
	return (int)n;
}

struct io_uring_sqe *kvt_loop_sqe(struct kvt_loop *l, struct kvt_op *op)
{
	struct io_uring_sqe *sqe;
	while (!(sqe = io_uring_get_sqe(&l->ring))) {
		int ret = io_uring_submit(&l->ring);
		if (ret < 0 && ret != -EAGAIN && ret != -EBUSY)
			kvt_warn("loop", "submit: %s", strerror(-ret));
		if (ret <= 0)
			kvt_loop_run(l, 1, 10);
	}
	io_uring_prep_nop(sqe);
	io_uring_sqe_set_data(sqe, op);
	l->inflight++;
	return sqe;
}

int kvt_loop_submit(struct kvt_loop *l)
{
	int ret;
	do
		ret = io_uring_submit(&l->ring);
	while (ret == -EINTR);
	return ret;
}

int kvt_loop_run(struct kvt_loop *l, unsigned min_complete, int timeout_ms)
{
	int ret;
	if (min_complete && timeout_ms != 0) {
		struct __kernel_timespec ts = {
			.tv_sec = timeout_ms / 1000,
			.tv_nsec = (long long)(timeout_ms % 1000) * 1000000LL,
		};
		struct io_uring_cqe *cqe;
		ret = io_uring_submit_and_wait_timeout(&l->ring, &cqe, min_complete,
						       timeout_ms < 0 ? NULL : &ts, NULL);
		/* EBUSY: completions to reap first; EAGAIN: the kernel short of resources for
		 * now. Both pass: what is done is reaped, the rest goes next turn. */
		if (ret < 0 && ret != -ETIME && ret != -EINTR && ret != -EBUSY && ret != -EAGAIN)
			return ret;
	} else {
		ret = kvt_loop_submit(l);
		if (ret < 0 && ret != -EBUSY && ret != -EAGAIN)
			return ret;
	}
	return reap(l);
}

int kvt_loop_register_buffer(struct kvt_loop *l, void *base, size_t len, size_t unit)
{
	if (!unit || unit > KVT_LOOP_BUF_PIECE)
		return -EINVAL;
	size_t step = KVT_LOOP_BUF_PIECE / unit * unit;
	size_t pieces = (len + step - 1) / step;
	if (!len || l->nbufs + pieces > KVT_LOOP_MAX_BUFS)
		return -ENOSPC;
	/* Find a run of free slots (a freed run is reused). */
	unsigned first = l->nbufs;
	for (unsigned i = 0; i + pieces <= l->nbufs; i++) {
		unsigned j;
		for (j = 0; j < pieces && !l->bufs[i + j].iov_base; j++)
			;
		if (j == pieces) {
			first = i;
			break;
		}
	}
	struct iovec iov[KVT_LOOP_MAX_BUFS] = {{0}};
	__u64 tags[KVT_LOOP_MAX_BUFS] = {0};
	for (size_t i = 0; i < pieces; i++) {
		size_t off = i * step;
		iov[i].iov_base = (char *)base + off;
		iov[i].iov_len = len - off < step ? len - off : step;
		tags[i] = 0;
	}
	int ret = io_uring_register_buffers_update_tag(&l->ring, first, iov, tags,
						       (unsigned)pieces);
	if (ret < 0) {
		kvt_err("loop", "register %zu bytes as %zu buffers: %s", len, pieces,
			strerror(-ret));
		return ret;
	}
	for (size_t i = 0; i < pieces; i++)
		l->bufs[first + i] = iov[i];
	if (first + pieces > l->nbufs)
		l->nbufs = first + (unsigned)pieces;
	return (int)first;
}

void kvt_loop_unregister_buffer(struct kvt_loop *l, void *base)
{
	int idx = kvt_loop_buffer_index(l, base, 1);
	if (idx < 0 || l->bufs[idx].iov_base != base)
		return;
	char *end = (char *)base;
	for (unsigned i = (unsigned)idx; i < l->nbufs && l->bufs[i].iov_base == end; i++) {
		end += l->bufs[i].iov_len;
		struct iovec none = {0};
		__u64 tag = 0;
		io_uring_register_buffers_update_tag(&l->ring, i, &none, &tag, 1);
		l->bufs[i] = none;
	}
	while (l->nbufs && !l->bufs[l->nbufs - 1].iov_base)
		l->nbufs--;
}

int kvt_loop_buffer_index(const struct kvt_loop *l, const void *p, size_t len)
{
	const char *c = p;
	for (unsigned i = 0; i < l->nbufs; i++) {
		const char *b = l->bufs[i].iov_base;
		if (b && c >= b && c + len <= b + l->bufs[i].iov_len)
			return (int)i;
	}
	return -1;
}

int kvt_loop_register_file(struct kvt_loop *l, int fd)
{
	for (unsigned i = 0; i < 16; i++) {
		if (l->files[i] >= 0)
			continue;
		int ret = io_uring_register_files_update(&l->ring, i, &fd, 1);
		if (ret < 0)
			return ret;
		l->files[i] = fd;
		if (i >= l->nfiles)
			l->nfiles = i + 1;
		return (int)i;
	}
	return -ENOSPC;
}

void kvt_loop_unregister_file(struct kvt_loop *l, int index)
{
	if (index < 0 || index >= 16 || l->files[index] < 0)
		return;
	int none = -1;
	io_uring_register_files_update(&l->ring, (unsigned)index, &none, 1);
	l->files[index] = -1;
}
