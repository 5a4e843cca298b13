// SPDX-License-Identifier: MIT
#include "fuzz_daemon.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "daemon/alloc.h"
#include "daemon/log.h"
#include "tiers/store.h"

struct kvd *fz_d;
static struct kvt_config initial;

int fz_daemon_init(void)
{
	if (fz_d)
		return 0;
	kvt_log_set_level((enum kvt_log_level)(KVT_LOG_ERR - 1)); /* quiet: the fuzzer's output stays readable */
	struct kvd *d = kvt_calloc(1, sizeof(*d));
	char dir[] = "/var/tmp/kvtfuzz-XXXXXX"; /* O_DIRECT: not tmpfs */
	if (!d || !mkdtemp(dir))
		return -1;
	kvt_config_defaults(&d->cfg);
	const char *why;
	char sock[200];
	snprintf(sock, sizeof(sock), "%s/s", dir);
	const char *sets[][2] = {
		{"store.state_dir", dir}, {"ipc.socket", sock}, {"store.device", "cpu"},
		{"store.page_bytes", "8K"}, {"store.nvme_bytes", "16M"},
		{"tenant.host_bytes", "1M"}, {"tenant.gpu_bytes", "512K"},
		{"ipc.data_bytes", "256K"}, {"metrics.listen", "off"},
		{"daemon.promote_timeout_ms", "200"}, {"tenant.max_tenants", "4"},
	};
	for (size_t i = 0; i < sizeof(sets) / sizeof(sets[0]); i++)
		if (kvt_config_set(&d->cfg, sets[i][0], sets[i][1], false, &why) < 0) {
			fprintf(stderr, "fuzz: %s: %s\n", sets[i][0], why);
			return -1;
		}
	snprintf(d->cfg.nvme_path, sizeof(d->cfg.nvme_path), "%s/store.kvt", dir);
	if (kvd_start(d) < 0)
		return -1;
	initial = d->cfg;
	fz_d = d;
	return 0;
}

int fz_connect(void)
{
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	snprintf(a.sun_path, sizeof(a.sun_path), "%s", fz_d->cfg.socket);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

void fz_turn(int n, bool (*fn)(void *), void *arg)
{
	for (int i = 0; i < n && !(fn && fn(arg)); i++)
		kvd_iterate(fz_d, 1);
}

bool fz_drain(int fd)
{
	for (;;) {
		char buf[4096];
		union {
			char b[CMSG_SPACE(sizeof(int) * 16)];
			struct cmsghdr a;
		} u;
		struct iovec iov = {buf, sizeof(buf)};
		struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.b,
				   .msg_controllen = sizeof(u.b)};
		ssize_t n = recvmsg(fd, &m, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
		for (struct cmsghdr *c = n > 0 ? CMSG_FIRSTHDR(&m) : NULL; c; c = CMSG_NXTHDR(&m, c))
			if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
				for (size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); i++)
					close(((int *)CMSG_DATA(c))[i]);
		if (n == 0)
			return false;
		if (n < 0)
			return errno == EAGAIN || errno == EINTR;
	}
}

/* No client left and no disk I/O in flight: a move the kernel holds is referenced
 * only from the io_uring, where LeakSanitizer cannot see it. */
static bool no_clients(void *arg)
{
	return fz_d->nclients == 0 && kvt_list_empty(&fz_d->zombies) &&
	       !kvt_store_busy(fz_d->store);
}

void fz_settle(int fd)
{
	fz_drain(fd);
	close(fd);
	fz_turn(5000, no_clients, NULL); /* 5 s at most */
	if (!no_clients(NULL)) {
		fprintf(stderr, "fuzz: 5 s after its connection closed, the daemon still holds "
			"the client or its I/O\n");
		abort();
	}
	/* named sequences outlive their client: forgotten, so every input starts alike */
	while (fz_d->nnamed) {
		struct kvd_named *n = fz_d->named[fz_d->nnamed - 1];
		uint32_t tenant = n->tenant;
		uint64_t sseq = n->sseq,
			 pages = (uint64_t)n->pages * n->layout.layers * n->layout.kv_heads;
		if (kvd_named_remove(fz_d, n) < 0)
			abort();
		kvt_store_drop_seq(fz_d->store, tenant, sseq);
		fz_d->tenants[tenant].disk_pages -= pages;
	}
	kvt_config_reload(&fz_d->cfg, &initial);
}
