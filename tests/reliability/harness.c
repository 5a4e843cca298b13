// SPDX-License-Identifier: MIT
#include "harness.h"

#include <errno.h>
#include <fcntl.h>
#include <dirent.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "helpers.h"

double rel_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

unsigned rel_scale(unsigned quick, unsigned lng)
{
	const char *e = getenv("KVT_REL_LONG");
	return e && *e == '1' ? lng : quick;
}

static uint64_t rng_state;

uint64_t rel_rand(void)
{
	if (!rng_state) {
		const char *e = getenv("KVT_REL_SEED");
		rng_state = e ? strtoull(e, NULL, 0) : ((uint64_t)time(NULL) << 20 ^ (uint64_t)getpid());
		if (!rng_state)
			rng_state = 1;
		printf("rel: seed %llu (KVT_REL_SEED reruns it)\n", (unsigned long long)rng_state);
		fflush(stdout);
	}
	uint64_t x = rng_state;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return rng_state = x;
}

/* ---- the daemon ---- */

int rel_connect(const char *sock)
{
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	snprintf(a.sun_path, sizeof(a.sun_path), "%s", sock);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

int rel_stats(const char *sock, struct kvt_wire_stats *w)
{
	int fd = rel_connect(sock);
	if (fd < 0)
		return -1;
	struct kvt_msg_hdr h = {KVT_WIRE_MAGIC, KVT_WIRE_VERSION, KVT_MSG_STATS, 0, 0};
	int ret = -1;
	if (send(fd, &h, sizeof(h), MSG_NOSIGNAL) == sizeof(h) &&
	    recv(fd, &h, sizeof(h), MSG_WAITALL) == sizeof(h) && h.type == KVT_MSG_STATS_REPLY &&
	    h.len >= sizeof(*w) && recv(fd, w, sizeof(*w), MSG_WAITALL) == sizeof(*w))
		ret = 0;
	close(fd);
	return ret;
}

int rel_ctl(const char *sock, const char *words, size_t len, char *out, size_t outlen)
{
	int fd = rel_connect(sock);
	if (fd < 0)
		return -1;
	struct kvt_msg_hdr h = {KVT_WIRE_MAGIC, KVT_WIRE_VERSION, KVT_MSG_CTL, (uint32_t)len, 0};
	int ret = -1;
	char buf[4096];
	size_t have = 0;
	if (out && outlen)
		out[0] = 0;
	if (send(fd, &h, sizeof(h), MSG_NOSIGNAL) == sizeof(h) &&
	    send(fd, words, len, MSG_NOSIGNAL) == (ssize_t)len)
		while (recv(fd, &h, sizeof(h), MSG_WAITALL) == sizeof(h) &&
		       h.type == KVT_MSG_CTL_REPLY) {
			for (uint32_t got = 0; got < h.len;) {
				size_t want = h.len - got < sizeof(buf) ? h.len - got : sizeof(buf);
				ssize_t k = recv(fd, buf, want, 0);
				if (k <= 0)
					goto out;
				got += (uint32_t)k;
				if (out && have + 1 < outlen) {
					size_t m = (size_t)k < outlen - 1 - have ? (size_t)k : outlen - 1 - have;
					memcpy(out + have, buf, m);
					have += m;
					out[have] = 0;
				}
			}
			if (h.status != KVT_CTL_MORE) {
				ret = h.status;
				break;
			}
		}
out:
	close(fd);
	return ret;
}

/* A daemon found dead: how it ended and the end of its log, on stderr. */
static void report_death(const struct rel_daemon *d, int st)
{
	if (st == -1)
		; /* alive */
	else if (WIFSIGNALED(st))
		fprintf(stderr, "kvtierd (pid %d) was killed by signal %d (%s)\n", (int)d->pid,
			WTERMSIG(st), strsignal(WTERMSIG(st)));
	else
		fprintf(stderr, "kvtierd (pid %d) exited %d\n", (int)d->pid, WEXITSTATUS(st));
	FILE *f = fopen(d->log, "r");
	char lines[20][512];
	unsigned n = 0, routine = 0;
	while (f && fgets(lines[n % 20], sizeof(lines[0]), f)) {
		/* the routine lines of a busy run, counted: the others are the story */
		if (strstr(lines[n % 20], "attached, tenant") || strstr(lines[n % 20], "connection closed") ||
		    strstr(lines[n % 20], "closed before HELLO") ||
		    strstr(lines[n % 20], "pages not brought up") || strstr(lines[n % 20], "gpu slots")) {
			routine++;
			continue;
		}
		n++;
	}
	fprintf(stderr, "  log: %u lines of clients attaching, leaving and timing out, then:\n", routine);
	for (unsigned i = n > 20 ? n - 20 : 0; i < n; i++)
		fprintf(stderr, "  log: %s", lines[i % 20]);
	if (f)
		fclose(f);
}

bool rel_daemon_alive(struct rel_daemon *d)
{
	struct kvt_wire_stats w;
	int st;
	if (d->pid <= 0)
		return false;
	if (waitpid(d->pid, &st, WNOHANG) == d->pid) {
		report_death(d, st);
		d->pid = -1;
		return false;
	}
	int r = rel_stats(d->sock, &w);
	if (r < 0) {
		fprintf(stderr, "kvtierd (pid %d) alive, but STATS failed (%s)\n", (int)d->pid,
			strerror(errno));
		report_death(d, -1);
	}
	return r == 0;
}

void (*rel_daemon_preexec)(void);

int rel_daemon_start(struct rel_daemon *d, const char *const *extra, bool keep_state)
{
	if (!keep_state) {
		snprintf(d->dir, sizeof(d->dir), "/tmp/kvtrel-XXXXXX");
		if (!mkdtemp(d->dir))
			return -1;
		chmod(d->dir, 0755);
		snprintf(d->sock, sizeof(d->sock), "%s/kvtierd.sock", d->dir);
		snprintf(d->state, sizeof(d->state), "%.500s", t_dir("rel"));
		snprintf(d->log, sizeof(d->log), "%s/kvtierd.log", d->dir);
	}
	const char *bin = getenv("KVT_DAEMON");
	if (!bin) {
		fprintf(stderr, "KVT_DAEMON: the path of kvtierd\n");
		return -1;
	}
	char sk[200], sd[600];
	snprintf(sk, sizeof(sk), "ipc.socket=%s", d->sock);
	snprintf(sd, sizeof(sd), "store.state_dir=%s", d->state);
	const char *argv[96] = {"kvtierd", "-o", sk, "-o", sd, "-o", "store.device=cpu",
				"-o", "store.page_bytes=8K", "-o", "store.nvme_bytes=64M",
				"-o", "tenant.gpu_bytes=1M", "-o", "tenant.host_bytes=2M",
				"-o", "ipc.socket_mode=0666", "-o", "ipc.data_bytes=1M",
				"-o", "daemon.promote_timeout_ms=3000", "-o", "metrics.listen=off"};
	int n = 0;
	while (argv[n])
		n++;
	for (int i = 0; extra && extra[i] && n < 92; i++) {
		argv[n++] = "-o";
		argv[n++] = extra[i];
	}
	argv[n] = NULL;
	d->pid = fork();
	if (d->pid < 0)
		return -1;
	if (d->pid == 0) {
		/* its output to the log (not the test's pipe), and it dies with the test */
		int fd = open(d->log, O_WRONLY | O_CREAT | O_APPEND, 0644);
		if (fd >= 0) {
			dup2(fd, 1);
			dup2(fd, 2);
			close(fd);
		}
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (rel_daemon_preexec)
			rel_daemon_preexec();
		execv(bin, (char *const *)argv);
		_exit(127);
	}
	for (int i = 0; i < 1000; i++) {
		struct kvt_wire_stats w;
		if (rel_stats(d->sock, &w) == 0)
			return 0;
		if (waitpid(d->pid, NULL, WNOHANG) == d->pid) {
			d->pid = -1;
			return -1;
		}
		usleep(10000);
	}
	return -1;
}

int rel_daemon_stop(struct rel_daemon *d)
{
	int st = 0;
	if (d->pid <= 0)
		return -1;
	kill(d->pid, SIGTERM);
	waitpid(d->pid, &st, 0);
	d->pid = -1;
	return WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : -1;
}

void rel_daemon_kill9(struct rel_daemon *d)
{
	if (d->pid <= 0)
		return;
	kill(d->pid, SIGKILL);
	waitpid(d->pid, NULL, 0);
	d->pid = -1;
}

void rel_daemon_cleanup(struct rel_daemon *d)
{
	if (d->pid > 0)
		rel_daemon_stop(d);
	unlink(d->sock);
	unlink(d->log);
	rmdir(d->dir);
	t_rmdir(d->state);
}

int rel_proc(pid_t pid, struct rel_proc *out)
{
	char p[64];
	memset(out, 0, sizeof(*out));
	snprintf(p, sizeof(p), "/proc/%d/fd", (int)pid);
	DIR *dir = opendir(p);
	if (!dir)
		return -1;
	for (struct dirent *e; (e = readdir(dir));)
		out->fds += e->d_name[0] != '.';
	closedir(dir);
	snprintf(p, sizeof(p), "/proc/%d/status", (int)pid);
	FILE *f = fopen(p, "r");
	if (!f)
		return -1;
	char line[256];
	while (fgets(line, sizeof(line), f)) {
		sscanf(line, "VmRSS: %ld", &out->rss_kb);
		sscanf(line, "VmPin: %ld", &out->pin_kb);
		sscanf(line, "VmLck: %ld", &out->lck_kb);
	}
	fclose(f);
	return 0;
}

struct kvtier_client *rel_attach(const struct rel_daemon *d, const char *tenant, uint32_t flags)
{
	struct kvtier_layout lay = {REL_LAYERS, REL_HEADS, REL_GROUP, REL_D, KVTIER_F32, REL_T, 0, 2};
	struct kvtier_attach_opts o = {.socket = d->sock, .tenant = tenant, .max_live_seqs = 8,
				       .flags = flags};
	struct kvtier_client *c = NULL;
	int ret = kvtier_attach(&lay, &o, &c);
	if (ret < 0)
		fprintf(stderr, "attach: %s\n", strerror(-ret));
	return c;
}

int rel_raw_attach(struct rel_raw *r, const char *sock, uint16_t version, uint32_t head_dim,
		   const char *tenant)
{
	memset(r, 0, sizeof(*r));
	r->sock = rel_connect(sock);
	struct kvt_hello h = {.size = sizeof(h), .layout = {REL_LAYERS, REL_HEADS, REL_GROUP,
							    head_dim, KVTIER_F32, REL_T, 0, 2}};
	snprintf(h.tenant, sizeof(h.tenant), "%s", tenant ? tenant : "");
	struct kvt_msg_hdr mh = {KVT_WIRE_MAGIC, version, KVT_MSG_HELLO, sizeof(h), 0};
	struct iovec iov[2] = {{&mh, sizeof(mh)}, {&h, sizeof(h)}};
	struct msghdr m = {.msg_iov = iov, .msg_iovlen = 2};
	if (sendmsg(r->sock, &m, MSG_NOSIGNAL) < 0)
		return -errno;
	union {
		char buf[CMSG_SPACE(sizeof(int) * KVT_FD_MAX)];
		struct cmsghdr a;
	} u;
	struct iovec ri = {&mh, sizeof(mh)};
	struct msghdr rm = {.msg_iov = &ri, .msg_iovlen = 1, .msg_control = u.buf,
			    .msg_controllen = sizeof(u.buf)};
	if (recvmsg(r->sock, &rm, MSG_WAITALL) != sizeof(mh))
		return -ECONNRESET;
	if (mh.type != KVT_MSG_WELCOME)
		return mh.status ? mh.status : -EPROTO;
	struct cmsghdr *cm = CMSG_FIRSTHDR(&rm);
	if (!cm)
		return -EPROTO;
	/* the fds that came (KVT_FD_FAST only with the fast path); the others -1 */
	size_t nfd = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
	for (int i = 0; i < KVT_FD_MAX; i++)
		r->fds[i] = -1;
	memcpy(r->fds, CMSG_DATA(cm), (nfd < KVT_FD_MAX ? nfd : KVT_FD_MAX) * sizeof(int));
	if (recv(r->sock, &r->w, sizeof(r->w), MSG_WAITALL) != sizeof(r->w))
		return -EPROTO;
	r->ring = mmap(NULL, r->w.ring_bytes, PROT_READ | PROT_WRITE, MAP_SHARED,
		       r->fds[KVT_FD_RING], 0);
	return r->ring == MAP_FAILED ? -errno : 0;
}

void rel_raw_close(struct rel_raw *r)
{
	if (r->ring && r->ring != MAP_FAILED)
		munmap(r->ring, r->w.ring_bytes);
	for (int i = 0; i < KVT_FD_MAX; i++)
		if (r->fds[i] > 0) /* not 0: a struct zeroed before a failed attach */
			close(r->fds[i]);
	close(r->sock);
}

const float *rel_slot_page(const struct kvtier_memory *m, int32_t slot)
{
	if (slot & KVTIER_SLOT_HOST)
		return m->host_pool ? (const float *)((const char *)m->host_pool +
						       (uint64_t)(slot & ~KVTIER_SLOT_HOST) *
							       m->host_slot_bytes)
				    : NULL;
	return (const float *)((const char *)m->pool + (uint64_t)slot * m->slot_bytes);
}

/* ---- the data ---- */

static float mix(uint64_t x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdull;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ull;
	x ^= x >> 33;
	return (float)((double)(x >> 11) / (double)(1ull << 53) * 2.0 - 1.0);
}

float rel_kv(uint32_t salt, uint32_t layer, uint32_t head, uint32_t tok, uint32_t ch, int v)
{
	/* channel 0 of K names the sequence: a page found on disk says whose it is */
	if (ch == 0 && v == 0)
		return (float)salt;
	return mix(((uint64_t)salt * 0x9e3779b97f4a7c15ull) ^ ((uint64_t)layer << 56) ^
		   ((uint64_t)head << 48) ^ ((uint64_t)tok << 12) ^ ((uint64_t)ch << 2) ^
		   (uint64_t)v);
}

int rel_append(struct kvtier_client *c, uint32_t seq, uint32_t salt, uint32_t from, uint32_t n)
{
	size_t per = (size_t)n * REL_HEADS * REL_D;
	float *k = malloc(per * 4), *v = malloc(per * 4);
	int ret = k && v ? 0 : -ENOMEM;
	for (uint32_t l = 0; l < REL_LAYERS && ret == 0; l++) {
		for (uint32_t t = 0; t < n; t++)
			for (uint32_t h = 0; h < REL_HEADS; h++)
				for (uint32_t ch = 0; ch < REL_D; ch++) {
					size_t i = ((size_t)t * REL_HEADS + h) * REL_D + ch;
					k[i] = rel_kv(salt, l, h, from + t, ch, 0);
					v[i] = rel_kv(salt, l, h, from + t, ch, 1);
				}
		ret = kvtier_append(c, seq, l, k, v, n, KVT_MEM_HOST);
	}
	free(k);
	free(v);
	return ret;
}

int rel_verify(struct kvtier_client *c, uint32_t seq, uint32_t salt, unsigned *checked)
{
	return rel_verify_split(c, seq, salt, salt, UINT32_MAX, checked);
}

int rel_verify_split(struct kvtier_client *c, uint32_t seq, uint32_t a, uint32_t b,
		     uint32_t from, unsigned *checked)
{
	uint32_t ntok;
	int ret = kvtier_seq_tokens(c, seq, 0, &ntok);
	const uint32_t full = ntok / REL_T;
	struct kvtier_table *tab = ret ? NULL : kvtier_table_create(c, 1);
	if (!tab)
		return ret ? ret : -ENOMEM;
	struct kvtier_memory mem;
	kvtier_memory(c, &mem);
	float q[REL_HEADS * REL_GROUP * REL_D];
	struct kvtier_select_params sp = {.budget_pages = full + 1};
	int wrong = 0;
	for (uint32_t l = 0; ret == 0 && l < REL_LAYERS; l++) {
		rel_query(a, 0, l, q);
		if ((ret = kvtier_select(c, &seq, 1, l, q, KVT_MEM_HOST, &sp, tab)) < 0)
			break;
		struct kvtier_table_view v;
		kvtier_table_view(tab, &v);
		for (uint32_t row = 0; row < v.rows; row++) {
			wrong += v.n_pages[row] != (int32_t)full; /* every page, each once */
			for (int j = 0; j < v.n_pages[row]; j++) {
				const float *pg = rel_slot_page(&mem, v.slots[row * v.stride + j]);
				wrong += !pg || v.pages[row * v.stride + j] != j ||
					 !rel_page_ok(pg, (uint32_t)j < from ? a : b, l, row, (uint32_t)j);
				if (checked)
					(*checked)++;
			}
		}
		/* a page per head: the pins of this layer let go of */
		struct kvtier_select_params one = {.budget_pages = 1};
		if (full)
			ret = kvtier_select(c, &seq, 1, l, q, KVT_MEM_HOST, &one, tab);
	}
	kvtier_table_destroy(tab);
	return ret < 0 ? ret : wrong;
}

void rel_query(uint32_t salt, uint32_t step, uint32_t layer, float *q)
{
	for (uint32_t h = 0; h < REL_HEADS; h++)
		for (uint32_t g = 0; g < REL_GROUP; g++)
			for (uint32_t ch = 0; ch < REL_D; ch++)
				q[((size_t)h * REL_GROUP + g) * REL_D + ch] =
					ch == 0 ? 0.0f
						: 2.0f * mix((uint64_t)salt << 32 ^ layer << 24 ^ h << 16 ^
							     g << 12 ^ ch) +
							  0.3f * mix((uint64_t)step << 40 ^ salt ^ ch << 8);
}

bool rel_page_ok(const float *page, uint32_t salt, uint32_t layer, uint32_t head, uint32_t idx)
{
	for (uint32_t t = 0; t < REL_T; t++)
		for (uint32_t ch = 0; ch < REL_D; ch++)
			if (page[t * REL_D + ch] != rel_kv(salt, layer, head, idx * REL_T + t, ch, 0) ||
			    page[(REL_T + t) * REL_D + ch] !=
				    rel_kv(salt, layer, head, idx * REL_T + t, ch, 1))
				return false;
	return true;
}
