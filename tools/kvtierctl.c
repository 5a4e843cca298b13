// SPDX-License-Identifier: MIT
/*
 * kvtierctl: what an operator sees of kvtierd, and what a capacity planner sizes from.
 * Talks to the daemon's control socket (KVT_MSG_CTL, ipc/wire.h); the daemon answers in
 * JSON, which --json prints as it came and the default output turns into tables.
 */
#include "ipc/paths.h"
#include "ipc/wire.h"
#include "kvtier_config.h"

#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static const char *sock_path;
static bool opt_json;

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

static void die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("kvtierctl: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	exit(1);
}

/* ---- the control socket ---- */

/* The daemon's socket connected, or -errno. */
static int ctl_try_connect(void)
{
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	if (strlen(sock_path) >= sizeof(a.sun_path))
		return -ENAMETOOLONG;
	snprintf(a.sun_path, sizeof(a.sun_path), "%s", sock_path);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
		int e = errno;
		close(fd);
		return -e;
	}
	return fd;
}

static int ctl_connect(void)
{
	int fd = ctl_try_connect();
	if (fd == -ENOENT)
		die("kvtierd is not running: no socket at %s (start kvtierd, or name its "
		    "socket with -s or KVTIER_SOCKET)", sock_path);
	if (fd == -ECONNREFUSED)
		die("kvtierd is not running: %s is a stale socket", sock_path);
	if (fd == -EACCES || fd == -EPERM)
		die("permission denied on %s: run as the daemon's user or root, or have the "
		    "daemon allow you (ipc.allow_uids, ipc.allow_gids, ipc.socket_mode)", sock_path);
	if (fd < 0)
		die("connect %s: %s", sock_path, strerror(-fd));
	return fd;
}

static void read_full(int fd, void *buf, size_t len)
{
	size_t got = 0;
	while (got < len) {
		ssize_t n = recv(fd, (char *)buf + got, len - got, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			die("the daemon closed the connection%s%s", n < 0 ? ": " : "",
			    n < 0 ? strerror(errno) : "");
		got += (size_t)n;
	}
}

/*
 * Sends one command (words joined by NULs) and returns the whole answer; *status is 0
 * or -errno. Exits with a clear message when the daemon refuses the connection.
 */
static char *ctl_call(int fd, const char *const *words, unsigned n, int *status, size_t *olen)
{
	char msg[4096];
	size_t len = 0;
	for (unsigned i = 0; i < n; i++) {
		size_t l = strlen(words[i]) + 1;
		if (len + l > sizeof(msg))
			die("command too long");
		memcpy(msg + len, words[i], l);
		len += l;
	}
	struct kvt_msg_hdr h = {.magic = KVT_WIRE_MAGIC, .version = KVT_WIRE_VERSION,
				.type = KVT_MSG_CTL, .len = (uint32_t)len};
	struct iovec iov[2] = {{&h, sizeof(h)}, {msg, len}};
	struct msghdr m = {.msg_iov = iov, .msg_iovlen = 2};
	if (sendmsg(fd, &m, MSG_NOSIGNAL) != (ssize_t)(sizeof(h) + len)) {
		/* a daemon that refuses us says why, then hangs up: read its reason */
		int e = errno;
		struct kvt_msg_hdr r;
		char why[256];
		if (recv(fd, &r, sizeof(r), MSG_DONTWAIT) == sizeof(r) && r.type == KVT_MSG_ERROR) {
			ssize_t got = recv(fd, why, sizeof(why) - 1, MSG_DONTWAIT);
			why[got > 0 ? got : 0] = 0;
			die("the daemon refused: %s", got > 0 ? why : strerror(-r.status));
		}
		die("send: %s", strerror(e));
	}
	char *out = NULL;
	size_t olen_ = 0;
	for (;;) {
		struct kvt_msg_hdr r;
		read_full(fd, &r, sizeof(r));
		if (r.magic != KVT_WIRE_MAGIC || r.len > KVT_MSG_MAX)
			die("garbled answer from the daemon");
		char *p = realloc(out, olen_ + r.len + 1);
		if (!p)
			die("out of memory");
		out = p;
		read_full(fd, out + olen_, r.len);
		olen_ += r.len;
		out[olen_] = 0;
		if (r.type == KVT_MSG_ERROR)
			die("the daemon refused: %s", r.len ? out : strerror(-r.status));
		if (r.type != KVT_MSG_CTL_REPLY)
			die("unexpected answer type %u", r.type);
		if (r.status != KVT_CTL_MORE) {
			*status = r.status;
			break;
		}
	}
	if (olen)
		*olen = olen_;
	return out;
}

/* A command whose answer is JSON; errors end the program with the daemon's reason. */
static json_t *call_json(int fd, const char *const *words, unsigned n, char **raw)
{
	int st;
	char *txt = ctl_call(fd, words, n, &st, NULL);
	json_error_t err;
	json_t *j = json_loads(txt, JSON_DECODE_ANY, &err);
	if (!j)
		die("bad JSON from the daemon: %s", err.text);
	if (st < 0) {
		json_t *e = json_object_get(j, "error");
		die("%s", json_is_string(e) ? json_string_value(e) : strerror(-st));
	}
	if (raw)
		*raw = txt;
	else
		free(txt);
	return j;
}

/* ---- formatting ---- */

static double num(const json_t *o, const char *key)
{
	json_t *v = json_object_get(o, key);
	return json_is_number(v) ? json_number_value(v) : 0;
}

static const char *str(const json_t *o, const char *key)
{
	json_t *v = json_object_get(o, key);
	return json_is_string(v) ? json_string_value(v) : "";
}

static char *fmt_bytes(char *buf, size_t len, double b)
{
	static const char *u[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
	int i = 0;
	while (fabs(b) >= 1024 && i < 5) {
		b /= 1024;
		i++;
	}
	snprintf(buf, len, i ? "%.1f %s" : "%.0f %s", b, u[i]);
	return buf;
}

static char *fmt_us(char *buf, size_t len, double us)
{
	if (us <= 0)
		snprintf(buf, len, "-");
	else if (us < 1000)
		snprintf(buf, len, "%.0f us", us);
	else if (us < 1e6)
		snprintf(buf, len, "%.1f ms", us / 1e3);
	else
		snprintf(buf, len, "%.2f s", us / 1e6);
	return buf;
}

static char *fmt_dur(char *buf, size_t len, double s)
{
	if (s < 120)
		snprintf(buf, len, "%.0fs", s);
	else if (s < 7200)
		snprintf(buf, len, "%.0fm", s / 60);
	else if (s < 172800)
		snprintf(buf, len, "%.1fh", s / 3600);
	else
		snprintf(buf, len, "%.1fd", s / 86400);
	return buf;
}

/* A table: cells added row by row, printed with each column as wide as its widest. */
#define TCOLS 16
struct table {
	char *cell[512][TCOLS];
	unsigned rows, cols;
	bool right[TCOLS];
};

static void t_row(struct table *t, const char *fmt, ...)
{
	/* fmt: cells separated by '|' */
	if (t->rows == 512)
		return;
	char line[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	unsigned c = 0;
	char *save, *tok = strtok_r(line, "|", &save);
	while (tok && c < TCOLS) {
		t->cell[t->rows][c++] = strdup(tok);
		tok = strtok_r(NULL, "|", &save);
	}
	if (c > t->cols)
		t->cols = c;
	t->rows++;
}

static void t_print(struct table *t, FILE *f)
{
	size_t w[TCOLS] = {0};
	for (unsigned r = 0; r < t->rows; r++)
		for (unsigned c = 0; c < t->cols; c++)
			if (t->cell[r][c] && strlen(t->cell[r][c]) > w[c])
				w[c] = strlen(t->cell[r][c]);
	for (unsigned r = 0; r < t->rows; r++) {
		for (unsigned c = 0; c < t->cols; c++) {
			const char *s = t->cell[r][c] ? t->cell[r][c] : "";
			bool last = c + 1 == t->cols;
			if (t->right[c] && r)
				fprintf(f, "%*s%s", (int)w[c], s, last ? "" : "  ");
			else
				fprintf(f, "%-*s%s", last ? 0 : (int)w[c], s, last ? "" : "  ");
			free(t->cell[r][c]);
			t->cell[r][c] = NULL;
		}
		fputc('\n', f);
	}
	t->rows = t->cols = 0;
}

static void right_from(struct table *t, unsigned c0)
{
	for (unsigned c = c0; c < TCOLS; c++)
		t->right[c] = true;
}

static double hist_p(const json_t *o, const char *h, const char *p)
{
	return num(json_object_get(o, h), p);
}

/* ---- commands ---- */

static void print_raw(const char *txt)
{
	fputs(txt, stdout);
	if (!*txt || txt[strlen(txt) - 1] != '\n')
		fputc('\n', stdout);
}

static void show_status(const json_t *s, FILE *f)
{
	char b1[32], b2[32], b3[32];
	const json_t *dev = json_object_get(s, "device");
	json_t *m = json_object_get(s, "metrics");
	fprintf(f, "kvtierd %s  pid %.0f  up %s  device %s (%s)\n", str(s, "version"), num(s, "pid"),
		fmt_dur(b1, sizeof(b1), num(s, "uptime_s")), str(dev, "name"), str(dev, "backend"));
	fprintf(f, "socket %s  metrics %s\n", str(s, "socket"),
		json_is_string(m) ? json_string_value(m) : "off");
	fprintf(f, "clients %.0f  tenants %.0f  sequences %.0f  pages %.0f (%.0f dirty)\n",
		num(s, "clients"), num(s, "tenants"), num(s, "sequences"), num(s, "pages"),
		num(s, "pages_dirty"));
	struct table t = {0};
	right_from(&t, 1);
	t_row(&t, "TIER|USED|CAPACITY|USE%%|PAGES");
	size_t i;
	json_t *v;
	json_array_foreach(json_object_get(s, "tiers"), i, v)
	{
		double cap = num(v, "capacity_bytes"), used = num(v, "used_bytes");
		t_row(&t, "%s|%s|%s|%.1f|%.0f", str(v, "tier"), fmt_bytes(b1, sizeof(b1), used),
		      fmt_bytes(b2, sizeof(b2), cap), cap > 0 ? 100 * used / cap : 0,
		      num(v, "pages"));
	}
	t_print(&t, f);
	json_t *job = json_object_get(s, "job");
	if (json_is_object(job))
		fprintf(f, "job %.0f: %s %s %s: %.0f/%.0f done, %.0f skipped, %.0f failed\n",
			num(job, "id"), str(job, "op"), str(job, "tier"), str(job, "state"),
			num(job, "done"), num(job, "total"), num(job, "skipped"), num(job, "failed"));
	(void)b3;
}

static void show_tiers(const json_t *a, FILE *f)
{
	char b[10][32];
	struct table t = {0};
	right_from(&t, 1);
	t_row(&t, "TIER|USED|CAPACITY|PAGES|READ|WRITTEN|READ/S|WRITE/S|RD P50|RD P99|WR P50|WR "
		  "P99|ERRORS");
	size_t i;
	json_t *v;
	json_array_foreach(a, i, v)
	{
		t_row(&t, "%s|%s|%s|%.0f|%s|%s|%s/s|%s/s|%s|%s|%s|%s|%.0f", str(v, "tier"),
		      fmt_bytes(b[0], 32, num(v, "used_bytes")), fmt_bytes(b[1], 32, num(v, "capacity_bytes")),
		      num(v, "pages"), fmt_bytes(b[2], 32, num(v, "read_bytes")),
		      fmt_bytes(b[3], 32, num(v, "write_bytes")),
		      fmt_bytes(b[4], 32, num(v, "read_bytes_per_s")),
		      fmt_bytes(b[5], 32, num(v, "write_bytes_per_s")),
		      fmt_us(b[6], 32, hist_p(v, "read_latency", "p50")),
		      fmt_us(b[7], 32, hist_p(v, "read_latency", "p99")),
		      fmt_us(b[8], 32, hist_p(v, "write_latency", "p50")),
		      fmt_us(b[9], 32, hist_p(v, "write_latency", "p99")), num(v, "errors"));
	}
	t_print(&t, f);
	/* errors and evictions by reason, where there are any */
	json_array_foreach(a, i, v)
	{
		const char *k;
		json_t *x;
		char line[512] = "";
		size_t n = 0;
		json_object_foreach(json_object_get(v, "errors_by_reason"), k, x)
			if (json_number_value(x) > 0)
				n += (size_t)snprintf(line + n, sizeof(line) - n, " %s=%.0f", k,
						      json_number_value(x));
		if (n)
			fprintf(f, "%s errors:%s\n", str(v, "tier"), line);
		n = 0;
		line[0] = 0;
		json_object_foreach(json_object_get(v, "evictions"), k, x)
			if (json_number_value(x) > 0 && n < sizeof(line))
				n += (size_t)snprintf(line + n, sizeof(line) - n, " %s=%.0f", k,
						      json_number_value(x));
		if (n)
			fprintf(f, "%s evictions:%s\n", str(v, "tier"), line);
	}
}

static void show_clients(const json_t *a, FILE *f)
{
	char b[4][32];
	struct table t = {0};
	right_from(&t, 0);
	t.right[3] = false;
	t_row(&t, "ID|PID|UID|TENANT|UP|MODEL|SEQS|TOKENS|SELECTS|HIT%%|SEL P50|SEL P99|ATTN P50|"
		  "PREFETCHED");
	size_t i;
	json_t *v;
	json_array_foreach(a, i, v)
	{
		const json_t *l = json_object_get(v, "layout"), *p = json_object_get(v, "prefetch");
		char tenant[64];
		snprintf(tenant, sizeof(tenant), "%.0f%s%s", num(v, "tenant"),
			 *str(v, "tenant_name") ? ":" : "", str(v, "tenant_name"));
		t_row(&t, "%.0f|%.0f|%.0f|%s|%s|%.0fx%.0fx%.0f %s|%.0f|%.0f|%.0f|%.1f|%s|%s|%s|%.0f",
		      num(v, "id"), num(v, "pid"), num(v, "uid"), tenant,
		      fmt_dur(b[0], 32, num(v, "attached_s")), num(l, "layers"), num(l, "kv_heads"),
		      num(l, "head_dim"), str(l, "dtype"), num(v, "sequences"), num(v, "tokens"),
		      num(v, "selects"), 100 * num(p, "hit_rate"),
		      fmt_us(b[1], 32, hist_p(v, "select_latency", "p50")),
		      fmt_us(b[2], 32, hist_p(v, "select_latency", "p99")),
		      fmt_us(b[3], 32, hist_p(v, "attention_latency", "p50")),
		      num(p, "prefetch_gpu") + num(p, "prefetch_host"));
	}
	if (!json_array_size(a))
		fprintf(f, "no clients attached\n");
	else
		t_print(&t, f);
}

static void show_seqs(const json_t *a, FILE *f)
{
	struct table t = {0};
	right_from(&t, 0);
	t_row(&t, "CLIENT|SEQ|TOKENS|PAGES|GPU|HOST|NVME|DIRTY|PINNED|STEPS|HIT%%");
	size_t i;
	json_t *v;
	json_array_foreach(a, i, v)
		t_row(&t, "%.0f|%.0f|%.0f|%.0f|%.0f|%.0f|%.0f|%.0f|%.0f|%.0f|%.1f", num(v, "client"),
		      num(v, "seq"), num(v, "tokens"), num(v, "pages"), num(v, "pages_gpu"),
		      num(v, "pages_host"), num(v, "pages_nvme"), num(v, "pages_dirty"),
		      num(v, "pages_pinned"), num(v, "steps"), 100 * num(v, "hit_rate"));
	if (!json_array_size(a))
		fprintf(f, "no sequences\n");
	else
		t_print(&t, f);
}

static void show_names(const json_t *a, FILE *f)
{
	struct table t = {0};
	right_from(&t, 2);
	t_row(&t, "TENANT|NAME|TOKENS|PAGES|GPU|HOST|NVME|DIRTY|OPEN BY");
	size_t i;
	json_t *v;
	json_array_foreach(a, i, v)
	{
		char by[32] = "-";
		if (json_is_true(json_object_get(v, "open")))
			snprintf(by, sizeof(by), json_object_get(v, "client") ? "client %.0f" : "a fork",
				 num(v, "client"));
		const char *tn = json_string_value(json_object_get(v, "tenant_name"));
		t_row(&t, "%.0f%s%s%s|%s|%.0f|%.0f|%.0f|%.0f|%.0f|%.0f|%s", num(v, "tenant"),
		      tn && *tn ? " (" : "", tn && *tn ? tn : "", tn && *tn ? ")" : "",
		      json_string_value(json_object_get(v, "name")), num(v, "tokens"), num(v, "pages"),
		      num(v, "pages_gpu"), num(v, "pages_host"), num(v, "pages_nvme"),
		      num(v, "pages_dirty"), by);
	}
	if (!json_array_size(a))
		fprintf(f, "no named sequences\n");
	else
		t_print(&t, f);
}

static void show_pages(const json_t *o, FILE *f)
{
	struct table t = {0};
	right_from(&t, 0);
	t.right[5] = t.right[6] = false;
	t_row(&t, "CLIENT|SEQ|LAYER|HEAD|PAGE|TIERS|STATE|PINS|SCORE");
	size_t i;
	json_t *v;
	json_array_foreach(json_object_get(o, "pages"), i, v)
	{
		char tiers[32] = "";
		size_t k;
		json_t *x;
		json_array_foreach(json_object_get(v, "tiers"), k, x)
		{
			if (k)
				strcat(tiers, ",");
			strncat(tiers, json_string_value(x), 8);
		}
		json_array_foreach(json_object_get(v, "moving_to"), k, x)
		{
			strcat(tiers, k ? "," : " >");
			strncat(tiers, json_string_value(x), 8);
		}
		if (t.rows == 511) { /* the table holds this many; the rest are summarised */
			t_print(&t, f);
			t_row(&t, "CLIENT|SEQ|LAYER|HEAD|PAGE|TIERS|STATE|PINS|SCORE");
		}
		t_row(&t, "%.0f|%.0f|%.0f|%.0f|%.0f|%s|%s|%.0f|%.3g", num(v, "client"), num(v, "seq"),
		      num(v, "layer"), num(v, "head"), num(v, "page"), tiers, str(v, "state"),
		      num(v, "pins"), num(v, "score"));
	}
	t_print(&t, f);
	fprintf(f, "%.0f pages matched%s\n", num(o, "matched"),
		json_is_true(json_object_get(o, "truncated")) ? " (list cut at --limit)" : "");
}

static void show_stats(const json_t *s, FILE *f)
{
	char b[4][32];
	const json_t *st = json_object_get(s, "store"), *cl = json_object_get(s, "clients"),
		     *pf = json_object_get(s, "prefetch");
	const char *wp = json_string_value(json_object_get(st, "write_policy"));
	char pol[64] = "write-through";
	if (wp && !strcmp(wp, "back"))
		snprintf(pol, sizeof(pol), "write-back: %.0f for room", num(st, "writes_for_room"));
	fprintf(f, "store: %.0f pages (%.0f dirty, %.0f filling) in %.0f sequences; %.0f "
		   "write-backs (%s); errors: read %.0f write %.0f lost %.0f; enospc %.0f; "
		   "backpressure %.0f; reads hurried %.0f\n",
		num(st, "pages"), num(st, "pages_dirty"), num(st, "pages_filling"),
		num(st, "sequences"), num(st, "writebacks"), pol, num(st, "read_errors"),
		num(st, "write_errors"), num(st, "pages_lost"), num(st, "enospc_refused"),
		num(st, "backpressure"), num(st, "reads_hurried"));
	if (num(st, "reads_hurried") > 0)
		fprintf(f, "hurried reads: hurry to done p50 %s p99 %s; on the disk p50 %s p99 %s\n",
			fmt_us(b[0], 32, hist_p(st, "hurried_read_latency", "p50")),
			fmt_us(b[1], 32, hist_p(st, "hurried_read_latency", "p99")),
			fmt_us(b[2], 32, hist_p(st, "hurried_read_disk_time", "p50")),
			fmt_us(b[3], 32, hist_p(st, "hurried_read_disk_time", "p99")));
	fprintf(f, "pages: lifetime p50 %s p99 %s; reuse gap p50 %s p99 %s\n",
		fmt_us(b[0], 32, 1e3 * hist_p(st, "page_lifetime", "p50")),
		fmt_us(b[1], 32, 1e3 * hist_p(st, "page_lifetime", "p99")),
		fmt_us(b[2], 32, 1e3 * hist_p(st, "page_reuse_gap", "p50")),
		fmt_us(b[3], 32, 1e3 * hist_p(st, "page_reuse_gap", "p99")));
	fprintf(f, "clients: %.0f attached, %.0f accepted, %.0f rejected, %.0f requests (%.0f bad)",
		num(cl, "attached"), num(cl, "accepted"), num(cl, "rejected"), num(cl, "requests"),
		num(cl, "bad_requests"));
	const char *k;
	json_t *x;
	fprintf(f, "; disconnects %.0f:", num(cl, "disconnects"));
	json_object_foreach(json_object_get(cl, "disconnects_by_reason"), k, x)
		if (json_number_value(x) > 0)
			fprintf(f, " %s=%.0f", k, json_number_value(x));
	fputc('\n', f);
	fprintf(f, "select: %.0f steps, p50 %s p99 %s (scoring p50 %s); attention p50 %s\n",
		num(pf, "steps"), fmt_us(b[0], 32, hist_p(s, "select_latency", "p50")),
		fmt_us(b[1], 32, hist_p(s, "select_latency", "p99")),
		fmt_us(b[2], 32, hist_p(s, "select_compute", "p50")),
		fmt_us(b[3], 32, hist_p(s, "attention_latency", "p50")));
	double sel = num(pf, "selected");
	fprintf(f, "pages selected %.0f: on GPU %.1f%%, late %.0f, read from host %.0f, from disk "
		   "%.0f, substituted %.0f\n",
		sel, sel > 0 ? 100 * num(pf, "hit") / sel : 0, num(pf, "late"), num(pf, "host"),
		num(pf, "disk"), num(pf, "substituted"));
	fprintf(f, "prefetch: %.0f to GPU, %.0f to host; used %.0f, wasted %.0f, refused %.0f; "
		   "%s host->GPU, %s from NVMe\n",
		num(pf, "prefetch_gpu"), num(pf, "prefetch_host"), num(pf, "prefetch_used"),
		num(pf, "prefetch_wasted"), num(pf, "prefetch_refused"),
		fmt_bytes(b[0], 32, num(pf, "bytes_h2d")), fmt_bytes(b[1], 32, num(pf, "bytes_nvme")));
	show_tiers(json_object_get(s, "tiers"), f);
}

static int cmd_simple(int fd, const char *cmd, const char *const *extra, unsigned nextra,
		      void (*show)(const json_t *, FILE *))
{
	const char *w[16] = {cmd};
	unsigned n = 1;
	for (unsigned i = 0; i < nextra && n < 16; i++)
		w[n++] = extra[i];
	char *raw;
	json_t *j = call_json(fd, w, n, &raw);
	if (opt_json)
		print_raw(raw);
	else
		show(j, stdout);
	json_decref(j);
	free(raw);
	return 0;
}

/* ---- jobs: evict, drain, flush ---- */

static void bar(const json_t *job, bool tty)
{
	double total = num(job, "total"), done = num(job, "done") + num(job, "skipped") +
						 num(job, "failed");
	double frac = total > 0 ? done / total : 1;
	if (!tty)
		return;
	int w = 40, fill = (int)(frac * w + 0.5);
	fprintf(stderr, "\r%s %s [", str(job, "op"), str(job, "tier"));
	for (int i = 0; i < w; i++)
		fputc(i < fill ? '#' : '.', stderr);
	fprintf(stderr, "] %3.0f%% %.0f/%.0f pages", 100 * frac, done, total);
	fflush(stderr);
}

static int run_job(int fd, const char *const *w, unsigned n, bool wait)
{
	json_t *job = call_json(fd, w, n, NULL);
	bool tty = isatty(2) && !opt_json;
	while (wait && !strcmp(str(job, "state"), "running")) {
		bar(job, tty);
		struct timespec ts = {0, 100 * 1000000};
		nanosleep(&ts, NULL);
		const char *jw[] = {"job"};
		json_decref(job);
		job = call_json(fd, jw, 1, NULL);
	}
	bar(job, tty);
	if (tty)
		fputc('\n', stderr);
	if (opt_json) {
		char *s = json_dumps(job, JSON_COMPACT);
		puts(s);
		free(s);
	} else {
		printf("job %.0f: %s%s%s %s: %.0f of %.0f pages done, %.0f skipped (busy or still "
		       "filling), %.0f failed%s%s, %.2f s\n",
		       num(job, "id"), str(job, "op"), *str(job, "tier") ? " " : "", str(job, "tier"),
		       str(job, "state"), num(job, "done"), num(job, "total"), num(job, "skipped"),
		       num(job, "failed"), *str(job, "first_error") ? ": " : "",
		       str(job, "first_error"), num(job, "elapsed_s"));
	}
	int rc = num(job, "failed") > 0 ? 1 : 0;
	json_decref(job);
	return rc;
}

/* ---- top ---- */

static volatile sig_atomic_t stop_top;
static void on_int(int sig)
{
	(void)sig;
	stop_top = 1;
}

static int cmd_top(int fd, double interval, long iterations)
{
	bool tty = isatty(1);
	signal(SIGINT, on_int);
	for (long it = 0; !stop_top && (iterations <= 0 || it < iterations); it++) {
		const char *ws[] = {"status"}, *wt[] = {"tiers"}, *wc[] = {"clients"};
		json_t *s = call_json(fd, ws, 1, NULL), *t = call_json(fd, wt, 1, NULL),
		       *c = call_json(fd, wc, 1, NULL);
		if (tty)
			fputs("\033[H\033[2J", stdout);
		time_t now = time(NULL);
		char ts[32];
		strftime(ts, sizeof(ts), "%H:%M:%S", localtime(&now));
		printf("kvtierctl top  %s  every %.1fs  (Ctrl-C to quit)\n", ts, interval);
		show_status(s, stdout);
		putchar('\n');
		show_tiers(t, stdout);
		putchar('\n');
		show_clients(c, stdout);
		if (!tty)
			puts("--");
		fflush(stdout);
		json_decref(s);
		json_decref(t);
		json_decref(c);
		if (iterations > 0 && it + 1 >= iterations)
			break;
		struct timespec d = {(time_t)interval,
				     (long)((interval - (double)(time_t)interval) * 1e9)};
		nanosleep(&d, NULL);
	}
	return 0;
}

/* ---- plan ---- */

struct model {
	const char *name;
	unsigned layers, kv_heads, head_dim;
};

static const struct model models[] = {
	{"llama-3.1-8b", 32, 8, 128},  {"llama-3.1-70b", 80, 8, 128}, {"llama-3.2-3b", 28, 8, 128},
	{"qwen2.5-7b", 28, 4, 128},    {"qwen2.5-72b", 80, 8, 128},   {"mistral-7b", 32, 8, 128},
	{"mistral-nemo-12b", 40, 8, 128},
};

struct plan {
	unsigned layers, kv_heads, head_dim, dsize, page_tokens, reps, dense_layers;
	double context, sessions, budget, sink, window;
	double gpu_margin, host_margin; /* prefetch margins, fractions of the selection */
	double hit_gpu, hit_host, hit_disk; /* where selected pages are found */
	double bw_hbm, bw_pcie, bw_nvme;    /* bytes/s */
	const char *rates_from, *bw_from;
};

struct plan_out {
	double kv_session, kv_total, page_bytes, pages_total, sum_bytes, sel_pages, step_bytes;
	double need_gpu, need_host, need_nvme;
	double from_gpu, from_host, from_nvme;
	double t_score, t_hbm, t_pcie, t_nvme, floor, dense;
};

static void plan_eval(const struct plan *p, double context, struct plan_out *o)
{
	double T = p->page_tokens, lh = (double)p->layers * p->kv_heads;
	o->page_bytes = 2.0 * T * p->head_dim * p->dsize;
	double pages_row = ceil(context / T);
	o->kv_session = context * lh * 2 * p->head_dim * p->dsize;
	o->kv_total = o->kv_session * p->sessions;
	o->pages_total = pages_row * lh * p->sessions;
	o->sum_bytes = o->pages_total * (4.0 + p->reps) * p->head_dim * p->dsize; /* compute.h */
	/* pages each (layer, head) of a session reads per step */
	double sel = ceil(p->budget / T) + ceil(p->sink / T) + ceil(p->window / T);
	if (sel > pages_row)
		sel = pages_row;
	double sparse_layers = p->layers - p->dense_layers;
	o->sel_pages = p->sessions * p->kv_heads * (sparse_layers * sel + p->dense_layers * pages_row);
	o->step_bytes = o->sel_pages * o->page_bytes;
	/* the hot set on the GPU, the prefetch margin in host RAM; everything on NVMe */
	double hot = p->sessions * p->kv_heads * sparse_layers * sel * o->page_bytes;
	double dense = p->sessions * p->kv_heads * p->dense_layers * pages_row * o->page_bytes;
	o->need_gpu = hot * (1 + p->gpu_margin) + dense + o->sum_bytes;
	o->need_host = hot * (1 + p->host_margin);
	o->need_nvme = o->kv_total * (1 + 512.0 / o->page_bytes);
	o->from_gpu = o->step_bytes * p->hit_gpu;
	o->from_host = o->step_bytes * p->hit_host;
	o->from_nvme = o->step_bytes * p->hit_disk;
	/* scoring reads every summary; then the pages come from their tiers at once */
	o->t_score = (o->sum_bytes * (sparse_layers / p->layers)) / p->bw_hbm;
	o->t_hbm = o->from_gpu / p->bw_hbm;
	o->t_pcie = o->from_host / p->bw_pcie;
	o->t_nvme = o->from_nvme / p->bw_nvme;
	o->floor = o->t_score + fmax(o->t_hbm, fmax(o->t_pcie, o->t_nvme));
	o->dense = o->kv_total / p->bw_hbm;
}

static double parse_num(const char *s, const char *what)
{
	char *end;
	errno = 0;
	double v = strtod(s, &end);
	double mul = 1;
	if (*end == 'K' || *end == 'k')
		mul = 1024, end++;
	else if (*end == 'M' || *end == 'm')
		mul = 1024 * 1024, end++;
	if (*end || errno || v < 0 || !isfinite(v))
		die("%s: not a number: %s", what, s);
	return v * mul;
}

/* Hit rates and copy bandwidths the running daemon observed, where it has any. */
static void plan_observe(struct plan *p)
{
	int fd = ctl_try_connect();
	if (fd < 0)
		return; /* no daemon: assumed rates */
	const char *w[] = {"stats"};
	int st;
	char *txt = ctl_call(fd, w, 1, &st, NULL);
	close(fd);
	json_t *j = st == 0 ? json_loads(txt, 0, NULL) : NULL;
	free(txt);
	if (!j)
		return;
	const json_t *pf = json_object_get(j, "prefetch");
	double sel = num(pf, "selected");
	if (sel >= 100) {
		p->hit_gpu = num(pf, "hit") / sel;
		p->hit_host = num(pf, "host") / sel;
		p->hit_disk = (num(pf, "disk") + num(pf, "late")) / sel;
		double rest = 1 - p->hit_gpu - p->hit_host - p->hit_disk;
		if (rest > 0) /* fetched to the GPU before the answer: counted as host reads */
			p->hit_host += rest;
		p->rates_from = "observed by the running kvtierd";
	}
	json_decref(j);
}

static void plan_usage(FILE *f)
{
	fprintf(f,
		"usage: kvtierctl plan (--model NAME | --layers N --kv-heads N --head-dim N)\n"
		"                      --context TOKENS --sessions N [options]\n"
		"  --dtype fp16|bf16|fp32     KV dtype (default bf16)\n"
		"  --budget TOKENS            top-k budget per (layer, KV head) (default 2048)\n"
		"  --page-tokens P            tokens per page (default 64)\n"
		"  --sink TOKENS --window TOKENS  always-selected pages (default 64, 128)\n"
		"  --dense-layers N           layers that attend over everything (default 0)\n"
		"  --reps R                   representative keys per summary (default 4)\n"
		"  --gpu-margin PCT --host-margin PCT  prefetch margins (default 100, 200)\n"
		"  --hit-gpu F --hit-host F --hit-disk F  where selected pages are found\n"
		"                             (default: the running daemon's, else 0.95/0.04/0.01)\n"
		"  --hbm-gbps X --pcie-gbps X --nvme-gbps X  bandwidths (default: measured on the\n"
		"                             H100 machine: 3000, 50, 1.8)\n"
		"  --plot FILE.png            chart of the step-time floor against context length\n"
		"models:");
	for (size_t i = 0; i < sizeof(models) / sizeof(models[0]); i++)
		fprintf(f, " %s", models[i].name);
	fputc('\n', f);
}

static int plan_plot(const struct plan *p, const char *file, const char *title)
{
	char dat[] = "/tmp/kvtierctl-plan-XXXXXX";
	int dfd = mkstemp(dat);
	if (dfd < 0)
		die("mkstemp: %s", strerror(errno));
	FILE *d = fdopen(dfd, "w");
	double maxc = fmax(p->context * 2, 1 << 20);
	for (double c = 4096; c <= maxc * 1.0001; c *= 1.189207115) { /* 4 points an octave */
		struct plan_out o;
		plan_eval(p, c, &o);
		fprintf(d, "%.0f %.6g %.6g %.6g %.6g %.6g\n", c, o.floor * 1e3, o.dense * 1e3,
			o.t_score * 1e3, o.t_pcie * 1e3, o.t_nvme * 1e3);
	}
	fclose(d);
	char gp[] = "/tmp/kvtierctl-plot-XXXXXX";
	int gfd = mkstemp(gp);
	FILE *g = fdopen(gfd, "w");
	fprintf(g,
		"set terminal pngcairo size 900,560 noenhanced\n"
		"set output '%s'\n"
		"set title '%s'\n"
		"set logscale xy\n"
		"set xlabel 'context (tokens)'\n"
		"set ylabel 'ms per decode step (floor)'\n"
		"set grid\n"
		"set key top left\n"
		"set format x '%%.0s%%c'\n"
		"set arrow from %.0f, graph 0 to %.0f, graph 1 nohead dt 2 lc 'gray'\n"
		"plot '%s' u 1:2 w l lw 2 t 'kvtier floor', "
		"'' u 1:3 w l lw 2 dt 2 t 'dense from HBM (if it fitted)', "
		"'' u 1:4 w l t 'scoring summaries', "
		"'' u 1:5 w l t 'host RAM over PCIe', "
		"'' u 1:6 w l t 'NVMe'\n",
		file, title, p->context, p->context, dat);
	fclose(g);
	pid_t pid = fork();
	if (pid == 0) {
		execlp("gnuplot", "gnuplot", gp, (char *)NULL);
		fprintf(stderr, "kvtierctl: gnuplot: %s (apt-get install gnuplot-nox)\n", strerror(errno));
		_exit(127);
	}
	int status = 0;
	waitpid(pid, &status, 0);
	unlink(dat);
	unlink(gp);
	struct stat sb;
	if (!WIFEXITED(status) || WEXITSTATUS(status) || stat(file, &sb) < 0 || !sb.st_size)
		die("plot: gnuplot failed to write %s", file);
	return 0;
}

static int cmd_plan(int argc, char **argv)
{
	struct plan p = {.dsize = 2, .page_tokens = 64, .reps = 4, .budget = 2048, .sink = 64,
			 .window = 128, .gpu_margin = 1.0, .host_margin = 2.0, .hit_gpu = 0.95,
			 .hit_host = 0.04, .hit_disk = 0.01, .bw_hbm = 3000e9, .bw_pcie = 50e9,
			 .bw_nvme = 1.8e9, .rates_from = "assumed (no running kvtierd with 100 "
							 "selected pages to learn from)",
			 .bw_from = "measured on the H100 machine (REFERENCES.md)"};
	const char *model = NULL, *plot = NULL, *dtype = "bf16";
	bool hits_given = false, bw_given = false;
	static const struct option lo[] = {
		{"model", 1, 0, 'm'},	     {"layers", 1, 0, 'L'},	 {"kv-heads", 1, 0, 'H'},
		{"head-dim", 1, 0, 'D'},     {"dtype", 1, 0, 't'},	 {"context", 1, 0, 'c'},
		{"sessions", 1, 0, 'n'},     {"budget", 1, 0, 'b'},	 {"page-tokens", 1, 0, 'P'},
		{"sink", 1, 0, 1},	     {"window", 1, 0, 2},	 {"dense-layers", 1, 0, 3},
		{"reps", 1, 0, 4},	     {"gpu-margin", 1, 0, 5},	 {"host-margin", 1, 0, 6},
		{"hit-gpu", 1, 0, 7},	     {"hit-host", 1, 0, 8},	 {"hit-disk", 1, 0, 9},
		{"hbm-gbps", 1, 0, 10},	     {"pcie-gbps", 1, 0, 11},	 {"nvme-gbps", 1, 0, 12},
		{"plot", 1, 0, 13},	     {"help", 0, 0, 'h'},	 {"json", 0, 0, 'j'},
		{0, 0, 0, 0}};
	int o;
	optind = 1;
	while ((o = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
		switch (o) {
		case 'm': model = optarg; break;
		case 'L': p.layers = (unsigned)parse_num(optarg, "--layers"); break;
		case 'H': p.kv_heads = (unsigned)parse_num(optarg, "--kv-heads"); break;
		case 'D': p.head_dim = (unsigned)parse_num(optarg, "--head-dim"); break;
		case 't': dtype = optarg; break;
		case 'c': p.context = parse_num(optarg, "--context"); break;
		case 'n': p.sessions = parse_num(optarg, "--sessions"); break;
		case 'b': p.budget = parse_num(optarg, "--budget"); break;
		case 'P': p.page_tokens = (unsigned)parse_num(optarg, "--page-tokens"); break;
		case 1: p.sink = parse_num(optarg, "--sink"); break;
		case 2: p.window = parse_num(optarg, "--window"); break;
		case 3: p.dense_layers = (unsigned)parse_num(optarg, "--dense-layers"); break;
		case 4: p.reps = (unsigned)parse_num(optarg, "--reps"); break;
		case 5: p.gpu_margin = parse_num(optarg, "--gpu-margin") / 100; break;
		case 6: p.host_margin = parse_num(optarg, "--host-margin") / 100; break;
		case 7: p.hit_gpu = parse_num(optarg, "--hit-gpu"); hits_given = true; break;
		case 8: p.hit_host = parse_num(optarg, "--hit-host"); hits_given = true; break;
		case 9: p.hit_disk = parse_num(optarg, "--hit-disk"); hits_given = true; break;
		case 10: p.bw_hbm = parse_num(optarg, "--hbm-gbps") * 1e9; bw_given = true; break;
		case 11: p.bw_pcie = parse_num(optarg, "--pcie-gbps") * 1e9; bw_given = true; break;
		case 12: p.bw_nvme = parse_num(optarg, "--nvme-gbps") * 1e9; bw_given = true; break;
		case 13: plot = optarg; break;
		case 'j': opt_json = true; break;
		case 'h': plan_usage(stdout); return 0;
		default: plan_usage(stderr); return 2;
		}
	}
	if (optind < argc)
		die("plan: unexpected argument %s", argv[optind]);
	if (model) {
		const struct model *m = NULL;
		for (size_t i = 0; i < sizeof(models) / sizeof(models[0]); i++)
			if (!strcasecmp(models[i].name, model))
				m = &models[i];
		if (!m) {
			fprintf(stderr, "kvtierctl: plan: unknown model %s\n", model);
			plan_usage(stderr);
			return 2;
		}
		if (!p.layers)
			p.layers = m->layers;
		if (!p.kv_heads)
			p.kv_heads = m->kv_heads;
		if (!p.head_dim)
			p.head_dim = m->head_dim;
	}
	if (!p.layers || !p.kv_heads || !p.head_dim || p.context < 1 || p.sessions < 1) {
		fprintf(stderr, "kvtierctl: plan: a model (or --layers, --kv-heads, --head-dim), "
				"--context and --sessions are needed\n");
		plan_usage(stderr);
		return 2;
	}
	if (!strcmp(dtype, "fp16") || !strcmp(dtype, "bf16"))
		p.dsize = 2;
	else if (!strcmp(dtype, "fp32"))
		p.dsize = 4;
	else
		die("plan: --dtype fp16, bf16 or fp32");
	if (!p.page_tokens || p.dense_layers > p.layers || p.bw_hbm <= 0 || p.bw_pcie <= 0 ||
	    p.bw_nvme <= 0)
		die("plan: bad page size, dense layers or bandwidth");
	if (!hits_given)
		plan_observe(&p);
	else
		p.rates_from = "given";
	double hs = p.hit_gpu + p.hit_host + p.hit_disk;
	if (hs <= 0 || fabs(hs - 1) > 1e-6) {
		if (hs <= 0)
			die("plan: hit rates must add up to 1");
		p.hit_gpu /= hs, p.hit_host /= hs, p.hit_disk /= hs;
	}
	if (bw_given)
		p.bw_from = "given";
	struct plan_out r;
	plan_eval(&p, p.context, &r);
	char title[160];
	snprintf(title, sizeof(title), "%s, %u sessions, budget %.0f tokens",
		 model ? model : "custom model", (unsigned)p.sessions, p.budget);
	if (opt_json) {
		json_t *j = json_pack(
			"{s:s, s:{s:i,s:i,s:i,s:i,s:i,s:f,s:f,s:f}, s:{s:f,s:f,s:f,s:s},"
			" s:{s:f,s:f,s:f,s:s}, s:{s:f,s:f,s:f,s:f,s:f},"
			" s:{s:f,s:f,s:f}, s:{s:f,s:f,s:f},"
			" s:{s:f,s:f,s:f,s:f,s:f,s:f}}",
			"model", model ? model : "custom",
			"shape", "layers", p.layers, "kv_heads", p.kv_heads, "head_dim", p.head_dim,
			"dtype_bytes", p.dsize, "page_tokens", p.page_tokens, "context", p.context,
			"sessions", p.sessions, "budget", p.budget,
			"hit_rates", "gpu", p.hit_gpu, "host", p.hit_host, "disk", p.hit_disk,
			"from", p.rates_from,
			"bandwidth_bytes_per_s", "hbm", p.bw_hbm, "pcie", p.bw_pcie, "nvme", p.bw_nvme,
			"from", p.bw_from,
			"kv", "per_session_bytes", r.kv_session, "total_bytes", r.kv_total,
			"page_bytes", r.page_bytes, "pages", r.pages_total, "summary_bytes", r.sum_bytes,
			"tiers_bytes", "gpu", r.need_gpu, "host", r.need_host, "nvme", r.need_nvme,
			"step_bytes", "gpu", r.from_gpu, "host", r.from_host, "nvme", r.from_nvme,
			"step_seconds", "score", r.t_score, "hbm", r.t_hbm, "pcie", r.t_pcie, "nvme",
			r.t_nvme, "floor", r.floor, "dense_hbm", r.dense);
		char *s = json_dumps(j, JSON_COMPACT);
		puts(s);
		free(s);
		json_decref(j);
	} else {
		char b[6][32];
		printf("%s: %u layers x %u KV heads x %u, %s, pages of %u tokens (%s)\n",
		       model ? model : "model", p.layers, p.kv_heads, p.head_dim, dtype, p.page_tokens,
		       fmt_bytes(b[0], 32, r.page_bytes));
		printf("%u sessions x %.0f tokens: KV %s per session, %s in all (%.0f pages)\n",
		       (unsigned)p.sessions, p.context, fmt_bytes(b[0], 32, r.kv_session),
		       fmt_bytes(b[1], 32, r.kv_total), r.pages_total);
		printf("selection: budget %.0f + sink %.0f + window %.0f tokens per (layer, KV head); "
		       "%.0f pages a step\n\n", p.budget, p.sink, p.window, r.sel_pages);
		struct table t = {0};
		right_from(&t, 1);
		t_row(&t, "TIER|NEEDED|HOLDS|READ PER STEP|TIME PER STEP");
		t_row(&t, "gpu|%s|hot set x%.1f + summaries %s|%s|%s", fmt_bytes(b[0], 32, r.need_gpu),
		      1 + p.gpu_margin, fmt_bytes(b[1], 32, r.sum_bytes),
		      fmt_bytes(b[2], 32, r.from_gpu), fmt_us(b[3], 32, r.t_hbm * 1e6));
		t_row(&t, "host|%s|hot set x%.1f (prefetch margin)|%s|%s",
		      fmt_bytes(b[0], 32, r.need_host), 1 + p.host_margin,
		      fmt_bytes(b[2], 32, r.from_host), fmt_us(b[3], 32, r.t_pcie * 1e6));
		t_row(&t, "nvme|%s|everything (+ page headers)|%s|%s", fmt_bytes(b[0], 32, r.need_nvme),
		      fmt_bytes(b[2], 32, r.from_nvme), fmt_us(b[3], 32, r.t_nvme * 1e6));
		t.right[2] = false;
		t_print(&t, stdout);
		printf("\nscoring every summary: %s a step\n", fmt_us(b[0], 32, r.t_score * 1e6));
		printf("step-time floor: %s (scoring, then the three tiers in parallel); dense "
		       "attention from HBM would need %s a step and %s of HBM\n",
		       fmt_us(b[0], 32, r.floor * 1e6), fmt_us(b[1], 32, r.dense * 1e6),
		       fmt_bytes(b[2], 32, r.kv_total));
		printf("hit rates gpu %.3f host %.3f disk %.3f: %s\n", p.hit_gpu, p.hit_host,
		       p.hit_disk, p.rates_from);
		printf("bandwidths HBM %.0f GB/s, PCIe %.1f GB/s, NVMe %.2f GB/s: %s\n", p.bw_hbm / 1e9,
		       p.bw_pcie / 1e9, p.bw_nvme / 1e9, p.bw_from);
	}
	if (plot) {
		plan_plot(&p, plot, title);
		if (!opt_json)
			printf("chart: %s\n", plot);
	}
	return 0;
}

/* ---- main ---- */

static void usage(FILE *f)
{
	fprintf(f,
		"usage: kvtierctl [-s SOCKET] [--json] COMMAND [ARGS]\n"
		"  status                       version, uptime, device, tiers, clients\n"
		"  tiers                        per tier: use, I/O, bandwidth, latency, errors\n"
		"  clients                      attached clients\n"
		"  seqs [--client N]            sequences and where their pages are\n"
		"  names                        named sequences (kept across restarts)\n"
		"  pages [--client N [--seq N]] [--layer N] [--tier T] [--limit N]\n"
		"                               where each page lives\n"
		"  stats [--json | --prometheus]  every counter\n"
		"  config get [NAME] | config set NAME VALUE\n"
		"  evict --tier gpu|host [--client N [--seq N]]  drop copies that have one below\n"
		"  drain --tier gpu|host        move everything of a tier down\n"
		"  flush                        write back every dirty page\n"
		"  job | cancel                 the running maintenance job\n"
		"  top [--interval S] [--iterations N]  a live view\n"
		"  plan ...                     capacity planning (kvtierctl plan --help)\n"
		"Each command takes --help. The socket: -s, else $KVTIER_SOCKET, else the daemon's\n"
		"default. evict, drain and flush show a progress bar and wait (--no-wait: not).\n");
}

struct sub_opts {
	const char *client, *seq, *layer, *tier, *limit;
	bool prometheus, no_wait;
	double interval;
	long iterations;
};

static const char *const sub_help[][2] = {
	{"status", "kvtierctl status [--json]: version, uptime, device, tiers' use, clients"},
	{"tiers", "kvtierctl tiers [--json]: capacity, used, pages, bytes read and written, "
		  "bandwidth over the last 10 s, copy latency p50/p99, errors and evictions by "
		  "reason"},
	{"clients", "kvtierctl clients [--json]: pid, uid, tenant, model, sequences, tokens, "
		    "selection latency, prefetch hit rate"},
	{"seqs", "kvtierctl seqs [--client N] [--json]: each sequence's pages per tier"},
	{"names", "kvtierctl names [--json]: every named sequence: tenant, tokens, pages per "
		  "tier, which client holds it open"},
	{"pages", "kvtierctl pages [--client N [--seq N]] [--layer N] [--tier gpu|host|nvme] "
		  "[--limit N (10000)] [--json]"},
	{"stats", "kvtierctl stats [--json | --prometheus]: every counter and histogram"},
	{"config", "kvtierctl config get [NAME] | config set NAME VALUE: reloadable options "
		   "change at once (root or the daemon's user)"},
	{"evict", "kvtierctl evict --tier gpu|host [--client N [--seq N]] [--no-wait]: drops "
		  "the copies in a tier (written back first where they are the only one)"},
	{"drain", "kvtierctl drain --tier gpu|host [--no-wait]: moves everything of a tier "
		  "down (GPU pages to host RAM where there is room, else to NVMe)"},
	{"flush", "kvtierctl flush [--no-wait]: writes every dirty page back to NVMe"},
	{"job", "kvtierctl job [--json]: the maintenance job's progress"},
	{"cancel", "kvtierctl cancel: stops the running job after the pages in flight"},
	{"top", "kvtierctl top [--interval S (1)] [--iterations N (forever)]"},
};

int main(int argc, char **argv)
{
	char defsock[256];
	const char *env = getenv("KVTIER_SOCKET");
	kvt_default_socket(defsock, sizeof(defsock));
	sock_path = env && *env ? env : defsock;
	int i = 1;
	for (; i < argc && argv[i][0] == '-'; i++) {
		if (!strcmp(argv[i], "-s") || !strcmp(argv[i], "--socket")) {
			if (++i == argc)
				die("-s needs a path");
			sock_path = argv[i];
		} else if (!strcmp(argv[i], "--json") || !strcmp(argv[i], "-j")) {
			opt_json = true;
		} else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
			usage(stdout);
			return 0;
		} else if (!strcmp(argv[i], "-V") || !strcmp(argv[i], "--version")) {
			printf("kvtierctl %s\n", KVT_VERSION);
			return 0;
		} else {
			usage(stderr);
			return 2;
		}
	}
	if (i == argc) {
		usage(stderr);
		return 2;
	}
	const char *cmd = argv[i];
	int sargc = argc - i;
	char **sargv = argv + i;
	if (!strcmp(cmd, "plan"))
		return cmd_plan(sargc, sargv);
	const char *help = NULL;
	for (size_t k = 0; k < sizeof(sub_help) / sizeof(sub_help[0]); k++)
		if (!strcmp(sub_help[k][0], cmd))
			help = sub_help[k][1];
	if (!help) {
		fprintf(stderr, "kvtierctl: unknown command %s\n", cmd);
		usage(stderr);
		return 2;
	}
	/* config's words come first */
	const char *cfg_words[3] = {0};
	unsigned ncfg = 0;
	if (!strcmp(cmd, "config")) {
		int k = 1;
		while (k < sargc && sargv[k][0] != '-' && ncfg < 3)
			cfg_words[ncfg++] = sargv[k++];
		sargc -= ncfg;
		sargv += ncfg;
	}
	struct sub_opts so = {.interval = 1};
	static const struct option lo[] = {
		{"client", 1, 0, 'c'}, {"seq", 1, 0, 'q'},	   {"layer", 1, 0, 'l'},
		{"tier", 1, 0, 't'},   {"limit", 1, 0, 'n'},	   {"json", 0, 0, 'j'},
		{"prometheus", 0, 0, 'p'}, {"no-wait", 0, 0, 'w'}, {"interval", 1, 0, 'i'},
		{"iterations", 1, 0, 'N'}, {"help", 0, 0, 'h'},	   {0, 0, 0, 0}};
	int o;
	optind = 1;
	while ((o = getopt_long(sargc, sargv, "h", lo, NULL)) != -1) {
		switch (o) {
		case 'c': so.client = optarg; break;
		case 'q': so.seq = optarg; break;
		case 'l': so.layer = optarg; break;
		case 't': so.tier = optarg; break;
		case 'n': so.limit = optarg; break;
		case 'j': opt_json = true; break;
		case 'p': so.prometheus = true; break;
		case 'w': so.no_wait = true; break;
		case 'i': so.interval = parse_num(optarg, "--interval"); break;
		case 'N': so.iterations = (long)parse_num(optarg, "--iterations"); break;
		case 'h': puts(help); return 0;
		default: fprintf(stderr, "%s\n", help); return 2;
		}
	}
	if (optind < sargc) {
		fprintf(stderr, "kvtierctl: %s: unexpected argument %s\n%s\n", cmd, sargv[optind], help);
		return 2;
	}
	/* name=value words for the daemon */
	char kv[6][96];
	const char *extra[8];
	unsigned ne = 0;
#define ADD(name, v)                                                                           \
	do {                                                                                   \
		if (v) {                                                                       \
			snprintf(kv[ne], sizeof(kv[ne]), "%s=%s", name, v);                    \
			extra[ne] = kv[ne];                                                    \
			ne++;                                                                  \
		}                                                                              \
	} while (0)
	ADD("client", so.client);
	ADD("seq", so.seq);
	ADD("layer", so.layer);
	ADD("tier", so.tier);
	ADD("limit", so.limit);
#undef ADD
	int fd = ctl_connect();
	int rc = 0;
	if (!strcmp(cmd, "status"))
		rc = cmd_simple(fd, "status", NULL, 0, show_status);
	else if (!strcmp(cmd, "tiers"))
		rc = cmd_simple(fd, "tiers", NULL, 0, show_tiers);
	else if (!strcmp(cmd, "clients"))
		rc = cmd_simple(fd, "clients", NULL, 0, show_clients);
	else if (!strcmp(cmd, "seqs"))
		rc = cmd_simple(fd, "seqs", extra, ne, show_seqs);
	else if (!strcmp(cmd, "names"))
		rc = cmd_simple(fd, "names", extra, ne, show_names);
	else if (!strcmp(cmd, "pages"))
		rc = cmd_simple(fd, "pages", extra, ne, show_pages);
	else if (!strcmp(cmd, "stats") && so.prometheus) {
		const char *w[] = {"metrics"};
		int st;
		char *txt = ctl_call(fd, w, 1, &st, NULL);
		if (st < 0)
			die("metrics: %s", txt);
		fputs(txt, stdout);
		free(txt);
	} else if (!strcmp(cmd, "stats"))
		rc = cmd_simple(fd, "stats", NULL, 0, show_stats);
	else if (!strcmp(cmd, "config")) {
		const char *w[4] = {"config"};
		char nm[300], vl[600];
		unsigned n = 1;
		if (ncfg == 0 || !strcmp(cfg_words[0], "get")) {
			w[n++] = "get";
			if (ncfg > 2)
				die("config get [NAME]");
			if (ncfg == 2) {
				snprintf(nm, sizeof(nm), "name=%s", cfg_words[1]);
				w[n++] = nm;
			}
		} else if (!strcmp(cfg_words[0], "set") && ncfg == 3) {
			w[n++] = "set";
			snprintf(nm, sizeof(nm), "name=%s", cfg_words[1]);
			snprintf(vl, sizeof(vl), "value=%s", cfg_words[2]);
			w[n++] = nm;
			w[n++] = vl;
		} else {
			fprintf(stderr, "%s\n", help);
			return 2;
		}
		char *raw;
		json_t *j = call_json(fd, w, n, &raw);
		if (opt_json) {
			print_raw(raw);
		} else if (json_is_array(j)) {
			size_t k;
			json_t *v;
			json_array_foreach(j, k, v)
				printf("%s = %s%s\n", str(v, "name"), str(v, "value"),
				       json_is_true(json_object_get(v, "reloadable")) ? "" : "  (at start only)");
		} else {
			printf("%s = %s (was %s)\n", str(j, "name"), str(j, "value"), str(j, "previous"));
		}
		json_decref(j);
		free(raw);
	} else if (!strcmp(cmd, "evict") || !strcmp(cmd, "drain") || !strcmp(cmd, "flush")) {
		const char *w[8] = {cmd};
		for (unsigned k = 0; k < ne; k++)
			w[k + 1] = extra[k];
		rc = run_job(fd, w, ne + 1, !so.no_wait);
	} else if (!strcmp(cmd, "job") || !strcmp(cmd, "cancel")) {
		const char *w[] = {cmd};
		char *raw;
		json_t *j = call_json(fd, w, 1, &raw);
		if (opt_json)
			print_raw(raw);
		else if (json_is_null(j))
			puts("no job has run");
		else
			printf("job %.0f: %s %s %s: %.0f of %.0f done, %.0f skipped, %.0f failed, %.2f s\n",
			       num(j, "id"), str(j, "op"), str(j, "tier"), str(j, "state"), num(j, "done"),
			       num(j, "total"), num(j, "skipped"), num(j, "failed"), num(j, "elapsed_s"));
		json_decref(j);
		free(raw);
	} else if (!strcmp(cmd, "top")) {
		if (so.interval < 0.1)
			die("top: --interval of at least 0.1 s");
		rc = cmd_top(fd, so.interval, so.iterations);
	}
	close(fd);
	return rc;
}
