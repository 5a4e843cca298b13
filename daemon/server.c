// SPDX-License-Identifier: MIT
/*
 * The server: the control socket, the handshake that hands a client its shared
 * memory, the request rings and the end of clients. A client is trusted with nothing:
 * its peer credentials are checked before a byte is read, every message is framed
 * and bounded, every ring index it writes is checked against the ring's size, and
 * anything malformed ends that client (with the reason logged) and no one else.
 */
#include "kvtierd.h"
#include "daemon/alloc.h"
#include "daemon/log.h"
#include "tiers/device.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <poll.h>
#include <unistd.h>

#define RING_HDR_BYTES 4096u

static void client_arm(struct kvd_client *c);

const char *kvd_disc_name(enum kvd_disc why)
{
	static const char *const names[KVD_DISC_MAX] = {"closed", "protocol", "refused",
							 "bad_request", "error", "stopping"};
	return (unsigned)why < KVD_DISC_MAX ? names[why] : "?";
}

void kvd_client_kill(struct kvd_client *c, enum kvd_disc why, const char *fmt, ...)
{
	if (c->dead)
		return;
	c->disc = why;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(c->why, sizeof(c->why), fmt, ap);
	va_end(ap);
	c->dead = true;
	if (c->ctl && why == KVD_DISC_CLOSED)
		kvt_info("server", "control connection %u (pid %d uid %u) closed", c->id,
			 (int)c->pid, (unsigned)c->uid);
	else
		kvt_notice("server", "%s %u (pid %d uid %u): disconnected: %s",
			   c->ctl ? "control connection" : "client", c->id, (int)c->pid,
			   (unsigned)c->uid, c->why);
}

/* ---- control messages ---- */

int kvd_send_msg(int fd, uint16_t type, int32_t status, const void *payload, uint32_t len,
		    const int *fds, unsigned nfds)
{
	struct kvt_msg_hdr h = {.magic = KVT_WIRE_MAGIC, .version = KVT_WIRE_VERSION,
				.type = type, .len = len, .status = status};
	struct iovec iov[2] = {{&h, sizeof(h)}, {(void *)payload, len}};
	union {
		char buf[CMSG_SPACE(sizeof(int) * KVT_FD_MAX)];
		struct cmsghdr align;
	} u;
	struct msghdr m = {.msg_iov = iov, .msg_iovlen = len ? 2 : 1};
	if (nfds) {
		memset(&u, 0, sizeof(u));
		m.msg_control = u.buf;
		m.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
		struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
		cm->cmsg_level = SOL_SOCKET;
		cm->cmsg_type = SCM_RIGHTS;
		cm->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
		memcpy(CMSG_DATA(cm), fds, sizeof(int) * nfds);
	}
	ssize_t n = sendmsg(fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
	if (n < 0)
		return -errno;
	return (size_t)n == sizeof(h) + len ? 0 : -EIO;
}

static void send_error(int fd, int err, const char *why)
{
	kvd_send_msg(fd, KVT_MSG_ERROR, -err, why, (uint32_t)strlen(why) + 1, NULL, 0);
}

/* ---- tenants ---- */

static struct kvd_tenant *tenant_get(struct kvd *d, uid_t uid, const char *name, int *err)
{
	struct kvd_tenant *free_t = NULL;
	for (uint32_t i = 0; i < d->cfg.max_tenants; i++) {
		struct kvd_tenant *t = &d->tenants[i];
		bool same = t->uid == uid && !strncmp(t->name, name, sizeof(t->name));
		if (t->used && same)
			return t;
		if (t->reserved && !t->used && same) {
			free_t = t; /* its named sequences are stored under this id */
			break;
		}
		if (!t->used && !t->reserved && !free_t)
			free_t = t;
	}
	if (!free_t) {
		*err = -EUSERS;
		return NULL;
	}
	struct kvd_tenant *t = free_t;
	t->id = (uint32_t)(t - d->tenants);
	/* tenant 0's arenas come with the store */
	int ret = t->id ? kvt_store_add_tenant(d->store, t->id, d->cfg.host_bytes, d->cfg.gpu_bytes)
			: 0;
	struct tier *ht = kvt_store_tier(d->store, TIER_HOST), *gt = kvt_store_tier(d->store, TIER_GPU);
	int ha = ret < 0 ? ret : tier_host_tenant_arena(ht, t->id);
	int ga = ret < 0 || ha < 0 ? -1 : gt ? tier_gpu_tenant_arena(gt, t->id) : -ENODEV;
	void *base;
	if (ha < 0 || ga < 0 ||
	    tier_host_arena_info(ht, (uint32_t)ha, &t->host_fd, &base, &t->host_bytes) < 0 ||
	    tier_gpu_arena_info(gt, (uint32_t)ga, &t->pool_fd, &base, &t->pool_bytes) < 0) {
		kvt_err("server", "tenant %u (uid %u, \"%s\"): arenas: %s", t->id, (unsigned)uid, name,
			strerror(ret < 0 ? -ret : ha < 0 ? -ha : ENODEV));
		*err = ret < 0 ? ret : -ENOMEM;
		return NULL;
	}
	t->used = true;
	t->uid = uid;
	snprintf(t->name, sizeof(t->name), "%s", name);
	kvt_notice("server", "tenant %u: uid %u \"%s\", host %llu MiB, gpu %llu MiB", t->id,
		   (unsigned)uid, name, (unsigned long long)(t->host_bytes >> 20),
		   (unsigned long long)(t->pool_bytes >> 20));
	return t;
}

/* ---- handshake ---- */

static bool allowed(struct kvd *d, uid_t uid, gid_t gid)
{
	if (uid == 0 || uid == geteuid())
		return true;
	for (uint32_t i = 0; i < d->cfg.n_allow_uids; i++)
		if (d->cfg.allow_uids[i] == uid)
			return true;
	for (uint32_t i = 0; i < d->cfg.n_allow_gids; i++)
		if (d->cfg.allow_gids[i] == gid)
			return true;
	return false;
}

static uint32_t pow2(uint32_t v)
{
	uint32_t n = 1;
	while (n < v)
		n <<= 1;
	return n;
}

static int check_layout(struct kvd *d, const struct kvt_wire_layout *l, const char **why)
{
	*why = "bad layout";
	if (!l->layers || l->layers > 256 || !l->kv_heads || l->kv_heads > 256 || !l->group ||
	    l->group > 64 || l->dense_layers > l->layers)
		return -EINVAL;
	struct kvt_geom g = {.head_dim = l->head_dim, .page_tokens = l->page_tokens,
			     .group = l->group, .reps = l->reps, .dtype = l->dtype};
	if (kvt_geom_check(&g) < 0 || l->page_tokens > 4096 || l->head_dim > 1024)
		return -EINVAL;
	uint64_t pb = 2ull * l->page_tokens * l->head_dim * kvt_dtype_size(l->dtype);
	if (pb > kvt_store_page_bytes(d->store)) {
		*why = "page larger than the store's page_bytes";
		return -EMSGSIZE;
	}
	return 0;
}

static int make_ring(struct kvd_client *c, uint32_t entries, uint64_t data_bytes)
{
	c->sq_entries = c->cq_entries = entries;
	uint64_t arrays = (uint64_t)entries * sizeof(struct kvt_sqe) +
			  (uint64_t)entries * sizeof(struct kvt_cqe);
	uint64_t data_off = RING_HDR_BYTES + ((arrays + 4095) & ~4095ull);
	data_bytes = (data_bytes + 4095) & ~4095ull;
	c->ring_bytes = data_off + data_bytes;
	char name[32];
	snprintf(name, sizeof(name), "kvtier-ring-c%u", c->id);
	c->ring_fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (c->ring_fd < 0)
		return -errno;
	if (ftruncate(c->ring_fd, (off_t)c->ring_bytes) < 0 ||
	    fcntl(c->ring_fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0)
		return -errno;
	void *p = mmap(NULL, c->ring_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, c->ring_fd, 0);
	if (p == MAP_FAILED)
		return -errno;
	c->ring = p;
	c->hdr = p;
	c->sqes = (struct kvt_sqe *)(c->ring + RING_HDR_BYTES);
	c->cqes = (struct kvt_cqe *)(c->ring + RING_HDR_BYTES + entries * sizeof(struct kvt_sqe));
	c->data = c->ring + data_off;
	c->data_bytes = data_bytes;
	c->hdr->magic = KVT_RING_MAGIC;
	c->hdr->version = KVT_WIRE_VERSION;
	c->hdr->sq_entries = c->hdr->cq_entries = entries;
	c->hdr->sqe_off = RING_HDR_BYTES;
	c->hdr->cqe_off = RING_HDR_BYTES + entries * (uint32_t)sizeof(struct kvt_sqe);
	c->hdr->data_off = data_off;
	c->hdr->data_bytes = data_bytes;
	c->req_efd = eventfd(0, EFD_CLOEXEC); /* blocking: io_uring arms a poll on it */
	c->cmp_efd = eventfd(0, EFD_CLOEXEC);
	if (c->req_efd < 0 || c->cmp_efd < 0)
		return -errno;
	return 0;
}

static void hello(struct kvd_client *c, const struct kvt_msg_hdr *h, const uint8_t *payload)
{
	struct kvd *d = c->d;
	struct kvt_hello m;
	if (h->len < sizeof(m)) {
		send_error(c->sock, EPROTO, "HELLO too short");
		kvd_client_kill(c, KVD_DISC_PROTOCOL, "HELLO of %u bytes", h->len);
		return;
	}
	memcpy(&m, payload, sizeof(m));
	const char *why = NULL;
	int ret = m.size < sizeof(m) ? (why = "HELLO size", -EPROTO) : check_layout(d, &m.layout, &why);
	if (ret == 0 && (m.ring_entries > 4096 || m.data_bytes > d->cfg.data_bytes_max))
		why = "ring or data area larger than allowed", ret = -EINVAL;
	char tname[KVT_TENANT_NAME_MAX + 1];
	memcpy(tname, m.tenant, KVT_TENANT_NAME_MAX);
	tname[KVT_TENANT_NAME_MAX] = 0;
	for (char *s = tname; ret == 0 && *s; s++)
		if (*s < 0x21 || *s > 0x7e)
			why = "tenant name not printable", ret = -EINVAL;
	if (ret == 0 && !(c->tenant = tenant_get(d, c->uid, tname, &ret)))
		why = ret == -EUSERS ? "too many tenants" : "tenant arenas";
	if (ret < 0) {
		send_error(c->sock, -ret, why);
		kvd_client_kill(c, KVD_DISC_REFUSED, "HELLO refused: %s", why);
		return;
	}
	c->layout = m.layout;
	c->geom = (struct kvt_geom){.head_dim = m.layout.head_dim,
				    .page_tokens = m.layout.page_tokens, .group = m.layout.group,
				    .reps = m.layout.reps, .dtype = m.layout.dtype};
	c->page_bytes = 2u * m.layout.page_tokens * m.layout.head_dim *
			(uint32_t)kvt_dtype_size(m.layout.dtype);
	uint32_t entries = pow2(m.ring_entries ? m.ring_entries : d->cfg.ring_entries);
	uint64_t data = m.data_bytes ? m.data_bytes : d->cfg.data_bytes;
	if ((ret = make_ring(c, entries, data)) < 0 || (ret = kvd_engine_attach(c)) < 0) {
		send_error(c->sock, -ret, "out of memory");
		kvd_client_kill(c, KVD_DISC_ERROR, "ring: %s", strerror(-ret));
		return;
	}
	struct kvt_device *dev = kvt_store_device(d->store);
	/* the seals of whole pages copy from the data area to the device: pinned, at the
	 * copy engine's speed; without it (a failure is not fatal) through a staging copy */
	c->data_pinned = dev->ops->host_register(dev, c->data, c->data_bytes) == 0;
	struct kvt_welcome w = {
		.size = sizeof(w),
		.client_id = c->id,
		.tenant_id = c->tenant->id,
		.device = (dev->ops->caps & KVT_DEV_CAP_GPU) ? KVT_WIRE_DEV_CUDA : KVT_WIRE_DEV_CPU,
		.sq_entries = entries,
		.cq_entries = entries,
		.ring_bytes = c->ring_bytes,
		.data_off = c->hdr->data_off,
		.data_bytes = c->data_bytes,
		.pool_bytes = c->tenant->pool_bytes,
		.slot_bytes = kvt_store_page_bytes(d->store),
		.host_bytes = c->tenant->host_bytes,
		.max_seqs = d->cfg.max_seqs,
		.max_batch = d->cfg.max_batch,
		.page_bytes = c->page_bytes,
		.device_ordinal = 0,
		.host_stride = tier_host_stride(kvt_store_tier(d->store, TIER_HOST)),
		.host_headroom = 0, /* host slots hold pages alone (their disk headers do not) */
	};
	/* the client's read fence; without one its attends synchronise (slower, not wrong) */
	if ((ret = dev->ops->fence_create(dev, w.fence, NULL, &c->fence)) == 0)
		w.flags |= KVT_WELCOME_FENCE;
	else
		kvt_warn("server", "client %u: no read fence (%s): its reads are synchronous",
			 c->id, strerror(-ret));
	/* the copy fence; without one its selects wait for their copies to land */
	if ((ret = dev->ops->fence_create(dev, w.copy_fence, c->hdr->copy_fence,
					  &c->copy_fence)) == 0)
		w.flags |= KVT_WELCOME_COPY_FENCE;
	else
		kvt_warn("server", "client %u: no copy fence (%s): its selects wait for their "
			 "copies", c->id, strerror(-ret));
	/* the fast path, when asked for; without it the client selects through the daemon */
	if (m.fast_pages) {
		if ((ret = kvd_fast_attach(c, m.fast_pages, m.fast_seqs)) == 0 && c->fast.ptr) {
			w.flags |= KVT_WELCOME_FAST;
			w.fast_bytes = c->fast.size;
			w.fast_map_off = c->fast_map_off;
			w.fast_pages = c->fast_pages;
			w.fast_seqs = c->fast_seqs;
		} else {
			kvt_warn("server", "client %u: no fast path (%u pages x %u sequences): %s",
				 c->id, m.fast_pages, m.fast_seqs, strerror(ret < 0 ? -ret : EINVAL));
		}
	}
	int fds[KVT_FD_MAX] = {c->ring_fd, c->req_efd, c->cmp_efd, c->tenant->pool_fd,
			       c->tenant->host_fd, c->fast.fd};
	const unsigned nfds = c->fast.ptr ? KVT_FD_MAX : KVT_FD_FAST;
	if ((ret = kvd_send_msg(c->sock, KVT_MSG_WELCOME, 0, &w, sizeof(w), fds, nfds)) < 0) {
		kvd_client_kill(c, KVD_DISC_ERROR, "WELCOME: %s", strerror(-ret));
		return;
	}
	c->attached = true;
	c->attach_ns = kvd_now_ns();
	c->tenant->clients++;
	kvt_notice("server", "client %u (pid %d uid %u): attached, tenant %u, %u layers x %u kv "
		   "heads x %u, page %u tokens, ring %u, data %llu KiB", c->id, (int)c->pid,
		   (unsigned)c->uid, c->tenant->id, m.layout.layers, m.layout.kv_heads,
		   m.layout.head_dim, m.layout.page_tokens, entries,
		   (unsigned long long)(c->data_bytes >> 10));
	client_arm(c);
}

static void send_stats(struct kvd_client *c)
{
	struct kvd *d = c->d;
	struct kvt_store_stats st;
	kvt_store_stats(d->store, &st);
	struct kvt_wire_stats w = {.size = sizeof(w), .pages = st.pages,
				   .seqs = st.seqs, .accepted = d->accepted, .rejected = d->rejected,
				   .disconnects = d->disconnects};
	for (int t = 0; t < 3; t++) {
		w.tier_used[t] = st.tier[t].used;
		w.tier_slots[t] = st.tier[t].slots;
		w.promotions[t] = st.promotions[t];
	}
	w.writebacks = st.writebacks;
	w.read_errors = st.read_errors;
	w.backpressure = st.backpressure;
	w.pf = d->pf_gone;
	struct kvd_client *o;
	kvt_list_for_each_entry(o, &d->clients, link)
	{
		w.clients += o->attached && !o->dead;
		w.requests += o->requests;
		w.bad_requests += o->bad_requests;
		kvd_pf_add(&w.pf, &o->pf);
	}
	kvd_send_msg(c->sock, KVT_MSG_STATS_REPLY, 0, &w, sizeof(w), NULL, 0);
}

/* Reads what the socket has and handles every whole message. */
static void sock_read(struct kvd_client *c)
{
	for (;;) {
		ssize_t n = recv(c->sock, c->rx + c->rx_len, sizeof(c->rx) - c->rx_len, MSG_DONTWAIT);
		if (n == 0) {
			kvd_client_kill(c, KVD_DISC_CLOSED, c->attached ? "connection closed" : "closed before HELLO");
			return;
		}
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN && errno != EWOULDBLOCK)
				kvd_client_kill(c, KVD_DISC_CLOSED, "recv: %s", strerror(errno));
			return;
		}
		c->rx_len += (size_t)n;
		while (c->rx_len >= sizeof(struct kvt_msg_hdr) && !c->dead) {
			struct kvt_msg_hdr h;
			memcpy(&h, c->rx, sizeof(h));
			if (h.magic != KVT_WIRE_MAGIC) {
				kvd_client_kill(c, KVD_DISC_PROTOCOL, "bad magic %08x", h.magic);
				return;
			}
			if (h.version != KVT_WIRE_VERSION) {
				send_error(c->sock, EPROTONOSUPPORT, "wire version not supported");
				kvd_client_kill(c, KVD_DISC_PROTOCOL, "wire version %u (we speak %u)", h.version,
						KVT_WIRE_VERSION);
				return;
			}
			if (h.len > KVT_MSG_MAX) {
				kvd_client_kill(c, KVD_DISC_PROTOCOL, "message of %u bytes", h.len);
				return;
			}
			if (c->rx_len < sizeof(h) + h.len)
				break;
			const uint8_t *payload = c->rx + sizeof(h);
			if (h.type == KVT_MSG_HELLO && !c->attached && !c->ctl)
				hello(c, &h, payload);
			else if (h.type == KVT_MSG_PING && c->attached)
				kvd_send_msg(c->sock, KVT_MSG_PONG, 0, NULL, 0, NULL, 0);
			else if (h.type == KVT_MSG_STATS)
				send_stats(c);
			else if (h.type == KVT_MSG_CTL && !c->attached)
				kvd_ctl_request(c, payload, h.len);
			else
				kvd_client_kill(c, KVD_DISC_PROTOCOL, "unexpected message type %u", h.type);
			memmove(c->rx, c->rx + sizeof(h) + h.len, c->rx_len - sizeof(h) - h.len);
			c->rx_len -= sizeof(h) + h.len;
		}
	}
}

/* ---- rings ---- */

void kvd_complete(struct kvd_client *c, uint64_t user_data, int res, uint64_t aux0,
		  uint64_t aux1)
{
	kvd_complete_flags(c, user_data, res, 0, aux0, aux1);
}

void kvd_complete_flags(struct kvd_client *c, uint64_t user_data, int res, uint32_t flags,
			uint64_t aux0, uint64_t aux1)
{
	if (c->dead)
		return;
	uint32_t head = kvt_load_acquire(&c->hdr->cq_head);
	if (c->cq_tail - head >= c->cq_entries) {
		kvd_client_kill(c, KVD_DISC_BAD_REQUEST, "completion ring index corrupt or overrun (head %u tail %u)", head,
				c->cq_tail);
		return;
	}
	struct kvt_cqe *e = &c->cqes[c->cq_tail & (c->cq_entries - 1)];
	e->user_data = user_data;
	e->res = res;
	e->flags = flags;
	e->aux[0] = aux0;
	e->aux[1] = aux1;
	if (res < 0 && res != -ENOENT)
		c->bad_requests++;
	/* Publish the entry before the index that makes it visible. */
	kvt_store_release(&c->hdr->cq_tail, ++c->cq_tail);
	/* Pairs with the client's cq_wait store and its re-check of cq_tail. */
	kvt_smp_mb();
	if (__atomic_load_n(&c->hdr->cq_wait, __ATOMIC_RELAXED)) {
		uint64_t one = 1;
		ssize_t w = write(c->cmp_efd, &one, sizeof(one));
		(void)w;
	}
}

/* The requests in the ring, in order, until it is empty or one waits; the seals that
 * appends of whole pages queued (engine.c) are made before it returns. */
static void ring_drain(struct kvd_client *c)
{
	while (!c->dead && !c->busy) {
		uint32_t tail = kvt_load_acquire(&c->hdr->sq_tail);
		if (tail - c->sq_head > c->sq_entries) {
			kvd_client_kill(c, KVD_DISC_BAD_REQUEST, "request ring index corrupt (head %u tail %u, %u entries)",
					c->sq_head, tail, c->sq_entries);
			break;
		}
		if (tail == c->sq_head)
			break;
		uint32_t chead = kvt_load_acquire(&c->hdr->cq_head);
		if (c->cq_tail - chead > c->cq_entries) {
			kvd_client_kill(c, KVD_DISC_BAD_REQUEST, "completion ring index corrupt (head %u tail %u)", chead,
					c->cq_tail);
			break;
		}
		/* the appends whose answers wait for their seals hold their entries already */
		if (c->cq_tail - chead + c->nseals >= c->cq_entries)
			break; /* the client has not read its completions: it waits for itself */
		/* The one copy out of shared memory; only the copy is used. */
		struct kvt_sqe r;
		memcpy(&r, &c->sqes[c->sq_head & (c->sq_entries - 1)], sizeof(r));
		kvt_store_release(&c->hdr->sq_head, ++c->sq_head);
		c->requests++;
		kvd_engine_request(c, &r);
	}
	kvd_seal_flush(c);
}

/* ---- event loop operations ---- */

/* ops_inflight: bit 0 the socket poll, bit 1 the eventfd read, bit 2 a control
 * connection's wait to send (ctl.c). */
static void sock_op_fn(struct kvt_op *op, int res, uint32_t flags)
{
	struct kvd_client *c = kvt_container_of(op, struct kvd_client, sock_op);
	c->ops_inflight &= ~1u;
	if (c->dead)
		return;
	if (res < 0 && res != -ECANCELED)
		kvd_client_kill(c, KVD_DISC_ERROR, "poll: %s", strerror(-res));
	else
		sock_read(c);
	if (!c->dead)
		client_arm(c);
}

static void efd_op_fn(struct kvt_op *op, int res, uint32_t flags)
{
	struct kvd_client *c = kvt_container_of(op, struct kvd_client, efd_op);
	c->ops_inflight &= ~2u;
	c->kicked = true;
	if (!c->dead && res < 0 && res != -EAGAIN && res != -EINTR && res != -ECANCELED)
		kvd_client_kill(c, KVD_DISC_ERROR, "eventfd: %s", strerror(-res));
}

static void client_arm(struct kvd_client *c)
{
	if (c->ops_inflight & 1)
		return;
	struct io_uring_sqe *sqe = kvt_loop_sqe(c->d->loop, &c->sock_op);
	io_uring_prep_poll_add(sqe, c->sock, POLLIN | POLLRDHUP);
	c->ops_inflight |= 1;
}

static void efd_arm(struct kvd_client *c)
{
	if (c->ops_inflight & 2)
		return;
	struct io_uring_sqe *sqe = kvt_loop_sqe(c->d->loop, &c->efd_op);
	io_uring_prep_read(sqe, c->req_efd, &c->efd_val, sizeof(c->efd_val), 0);
	c->ops_inflight |= 2;
}

static void lsock_fn(struct kvt_op *op, int res, uint32_t flags)
{
	struct kvd *d = kvt_container_of(op, struct kvd, lsock_op);
	d->lsock_armed = false;
}

static void accept_all(struct kvd *d)
{
	for (;;) {
		int fd = accept4(d->lsock, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
		if (fd < 0) {
			if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
				kvt_warn("server", "accept: %s", strerror(errno));
			if (errno == EINTR)
				continue;
			return;
		}
		struct ucred cr;
		socklen_t cl = sizeof(cr);
		if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &cl) < 0) {
			kvt_warn("server", "SO_PEERCRED: %s", strerror(errno));
			close(fd);
			continue;
		}
		if (!allowed(d, cr.uid, cr.gid)) {
			d->rejected++;
			kvt_notice("server", "refused pid %d uid %u gid %u: not an allowed user",
				   (int)cr.pid, (unsigned)cr.uid, (unsigned)cr.gid);
			send_error(fd, EACCES, "uid not allowed");
			close(fd);
			continue;
		}
		if (d->nclients >= d->cfg.max_clients) {
			d->rejected++;
			kvt_notice("server", "refused pid %d: %u clients attached", (int)cr.pid,
				   d->nclients);
			send_error(fd, EUSERS, "too many clients");
			close(fd);
			continue;
		}
		struct kvd_client *c = kvt_calloc(1, sizeof(*c));
		if (!c) {
			close(fd);
			continue;
		}
		c->d = d;
		c->id = d->next_client_id++;
		c->sock = fd;
		c->pid = cr.pid;
		c->uid = cr.uid;
		c->gid = cr.gid;
		c->ring_fd = c->req_efd = c->cmp_efd = -1;
		c->sock_op.fn = sock_op_fn;
		c->efd_op.fn = efd_op_fn;
		kvt_list_add_tail(&d->clients, &c->link);
		d->nclients++;
		d->accepted++;
		kvt_info("server", "client %u: pid %d uid %u connected", c->id, (int)cr.pid,
			 (unsigned)cr.uid);
		client_arm(c);
	}
}

static void client_free(struct kvd_client *c)
{
	struct kvd *d = c->d;
	kvd_engine_detach(c);
	struct kvt_device *dev = kvt_store_device(d->store);
	if (c->fence)
		dev->ops->fence_destroy(dev, c->fence);
	if (c->copy_fence) /* before the ring it may keep its state in goes */
		dev->ops->fence_destroy(dev, c->copy_fence);
	if (c->attached)
		c->tenant->clients--;
	if (c->data_pinned)
		dev->ops->host_unregister(dev, c->data);
	if (c->ring)
		munmap(c->ring, c->ring_bytes);
	if (c->ring_fd >= 0)
		close(c->ring_fd);
	if (c->req_efd >= 0)
		close(c->req_efd);
	if (c->cmp_efd >= 0)
		close(c->cmp_efd);
	close(c->sock);
	kvt_list_del(&c->link);
	d->nclients--;
	if (!c->ctl) { /* a kvtierctl leaving is no event */
		d->disconnects++;
		d->disc[c->disc]++;
	}
	kvd_ctl_forget(c);
	kvt_free(c);
}

/* A dead client's pending operations are made to complete; then it is freed. */
static void client_retire(struct kvd_client *c)
{
	if (c->ops_inflight & 5)
		shutdown(c->sock, SHUT_RDWR); /* the polls complete with POLLHUP */
	if (c->ops_inflight & 2) {
		uint64_t one = 1;
		ssize_t w = write(c->req_efd, &one, sizeof(one));
		(void)w;
	}
	if (c->ops_inflight & 7)
		return;
	client_free(c);
}

void kvd_server_tick(struct kvd *d)
{
	if (d->lsock >= 0 && !d->lsock_armed && !d->stopping) {
		accept_all(d);
		struct io_uring_sqe *sqe = kvt_loop_sqe(d->loop, &d->lsock_op);
		io_uring_prep_poll_add(sqe, d->lsock, POLLIN);
		d->lsock_armed = true;
	}
	kvd_engine_tick(d);
	kvd_ctl_tick(d);
	kvd_metrics_tick(d);
	struct kvd_client *c, *tmp;
	kvt_list_for_each_entry_safe(c, tmp, &d->clients, link)
	{
		if (c->dead) {
			client_retire(c);
			continue;
		}
		if (!c->attached)
			continue;
		if (c->kicked) {
			c->kicked = false;
			ring_drain(c);
			kvd_fast_tick(c); /* the reports just in */
		}
		if (!c->dead)
			efd_arm(c);
	}
	kvt_loop_submit(d->loop);
}

int kvd_server_start(struct kvd *d)
{
	kvt_list_init(&d->clients);
	kvt_list_init(&d->zombies);
	d->lsock_op.fn = lsock_fn;
	d->loop = kvt_store_loop(d->store);
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	if (strlen(d->cfg.socket) >= sizeof(a.sun_path)) {
		kvt_err("server", "socket path too long: %s", d->cfg.socket);
		return -ENAMETOOLONG;
	}
	snprintf(a.sun_path, sizeof(a.sun_path), "%s", d->cfg.socket);
	/* the socket's directory, made private to us if we make it */
	char dir[sizeof(a.sun_path)];
	snprintf(dir, sizeof(dir), "%s", d->cfg.socket);
	char *slash = strrchr(dir, '/');
	if (slash && slash != dir) {
		*slash = 0;
		for (char *p = dir + 1; *p; p++) {
			if (*p != '/')
				continue;
			*p = 0;
			mkdir(dir, 0755);
			*p = '/';
		}
		if (mkdir(dir, 0700) < 0 && errno != EEXIST) {
			int err = errno;
			kvt_err("server", "mkdir %s: %s", dir, strerror(err));
			return -err;
		}
	}
	d->lsock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (d->lsock < 0)
		return -errno;
	/* A stale socket of a dead daemon is replaced; a live one is not. */
	if (connect(d->lsock, (struct sockaddr *)&a, sizeof(a)) == 0) {
		kvt_err("server", "%s: another kvtierd is listening", d->cfg.socket);
		close(d->lsock);
		d->lsock = -1;
		return -EADDRINUSE;
	}
	close(d->lsock);
	d->lsock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	unlink(d->cfg.socket);
	mode_t old = umask(0777 & ~d->cfg.socket_mode);
	int ret = bind(d->lsock, (struct sockaddr *)&a, sizeof(a));
	umask(old);
	if (ret < 0 || chmod(d->cfg.socket, d->cfg.socket_mode) < 0 || listen(d->lsock, 64) < 0) {
		int err = errno;
		kvt_err("server", "%s: %s", d->cfg.socket, strerror(err));
		close(d->lsock);
		d->lsock = -1;
		return -err;
	}
	kvt_notice("server", "listening on %s (mode %03o)", d->cfg.socket, d->cfg.socket_mode);
	return 0;
}

void kvd_server_stop(struct kvd *d)
{
	d->stopping = true;
	if (d->lsock >= 0) {
		close(d->lsock);
		d->lsock = -1;
		unlink(d->cfg.socket);
	}
	struct kvd_client *c;
	kvt_list_for_each_entry(c, &d->clients, link)
		kvd_client_kill(c, KVD_DISC_STOPPING, "daemon stopping");
	/* let every client's operations complete, then free them */
	for (int i = 0; i < 200 && !kvt_list_empty(&d->clients); i++) {
		kvd_server_tick(d);
		kvt_store_run(d->store, 10);
	}
	kvd_engine_stop(d);
}
