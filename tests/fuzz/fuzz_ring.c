// SPDX-License-Identifier: MIT
/*
 * The request ring's decoder: a client attaches properly (HELLO, WELCOME, the ring
 * mapped), then the input becomes what it writes into shared memory: its first byte
 * the number of requests, then 64-byte requests (struct kvt_sqe), then the data area
 * the requests' offsets point into (K/V, queries, sequence lists). A last flag byte
 * may also corrupt the ring's indices. The daemon answers every request or hangs up
 * on the client; a well-formed sequence of requests (create, append, select, fork,
 * close) is served.
 */
#include "fuzz_daemon.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "ipc/wire.h"

struct conn {
	int sock, fds[KVT_FD_MAX];
	bool welcomed, gone;
	struct kvt_welcome w;
	uint8_t *ring;
	uint32_t want; /* completions expected */
};

static bool welcome(void *arg)
{
	struct conn *c = arg;
	struct kvt_msg_hdr mh;
	union {
		char b[CMSG_SPACE(sizeof(int) * KVT_FD_MAX)];
		struct cmsghdr a;
	} u;
	struct iovec iov = {&mh, sizeof(mh)};
	struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.b,
			   .msg_controllen = sizeof(u.b)};
	ssize_t n = recvmsg(c->sock, &m, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
	if (n <= 0)
		return c->gone = n == 0;
	struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
	if (n != sizeof(mh) || mh.type != KVT_MSG_WELCOME || !cm)
		__builtin_trap(); /* a valid HELLO is welcomed */
	/* the fds that came (no fast path: one fewer); the others -1, never closed */
	const size_t nfd = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
	for (int k = 0; k < KVT_FD_MAX; k++)
		c->fds[k] = -1;
	memcpy(c->fds, CMSG_DATA(cm), (nfd < KVT_FD_MAX ? nfd : KVT_FD_MAX) * sizeof(int));
	if (recv(c->sock, &c->w, sizeof(c->w), MSG_WAITALL) != sizeof(c->w))
		__builtin_trap();
	c->welcomed = true;
	return true;
}

static bool answered(void *arg)
{
	struct conn *c = arg;
	struct kvt_ring_hdr *h = (struct kvt_ring_hdr *)c->ring;
	if (!fz_drain(c->sock))
		return c->gone = true;
	return kvt_load_acquire(&h->cq_tail) - h->cq_head >= c->want;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (fz_daemon_init() < 0 || size < 1)
		return size < 1 ? 0 : (__builtin_trap(), 0);
	struct conn c = {.sock = fz_connect()};
	if (c.sock < 0)
		__builtin_trap();
	struct kvt_hello h = {.size = sizeof(h), .layout = {2, 2, 2, 64, 2 /* f32 */, 16, 0, 2},
			      .ring_entries = 16};
	struct kvt_msg_hdr mh = {KVT_WIRE_MAGIC, KVT_WIRE_VERSION, KVT_MSG_HELLO, sizeof(h), 0};
	uint8_t msg[sizeof(mh) + sizeof(h)];
	memcpy(msg, &mh, sizeof(mh));
	memcpy(msg + sizeof(mh), &h, sizeof(h));
	if (send(c.sock, msg, sizeof(msg), MSG_NOSIGNAL) != sizeof(msg))
		__builtin_trap();
	fz_turn(200, welcome, &c);
	if (!c.welcomed)
		__builtin_trap();
	c.ring = mmap(NULL, c.w.ring_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, c.fds[KVT_FD_RING], 0);
	if (c.ring == MAP_FAILED)
		__builtin_trap();
	struct kvt_ring_hdr *rh = (struct kvt_ring_hdr *)c.ring;
	struct kvt_sqe *sq = (struct kvt_sqe *)(c.ring + rh->sqe_off);
	uint32_t n = data[0] % (rh->sq_entries + 1);
	size_t off = 1;
	uint32_t i = 0;
	for (; i < n && off + sizeof(struct kvt_sqe) <= size; i++, off += sizeof(struct kvt_sqe))
		memcpy(&sq[i], data + off, sizeof(struct kvt_sqe));
	n = i;
	size_t rest = size - off < c.w.data_bytes ? size - off : c.w.data_bytes;
	memcpy(c.ring + c.w.data_off, data + off, rest);
	/* the last byte, where there is one past the requests: ring index abuse */
	uint8_t abuse = size > 1 + n * sizeof(struct kvt_sqe) ? data[size - 1] : 0;
	uint32_t tail = n;
	if ((abuse & 0xc0) == 0xc0)
		tail = (uint32_t)abuse << 24 | abuse; /* far past the ring */
	if ((abuse & 0xc0) == 0x80)
		kvt_store_release(&rh->cq_head, (uint32_t)abuse * 977u);
	kvt_store_release(&rh->sq_tail, tail);
	uint64_t one = 1;
	if (write(c.fds[KVT_FD_REQ], &one, sizeof(one)) != sizeof(one))
		__builtin_trap();
	c.want = n;
	fz_turn(3000, answered, &c);
	munmap(c.ring, c.w.ring_bytes);
	for (int k = 0; k < KVT_FD_MAX; k++)
		if (c.fds[k] >= 0)
			close(c.fds[k]);
	fz_settle(c.sock);
	return 0;
}
