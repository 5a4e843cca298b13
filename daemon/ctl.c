// SPDX-License-Identifier: MIT
/*
 * Control commands: what kvtierctl asks over the daemon's socket (see KVT_MSG_CTL in
 * ipc/wire.h). Answers are JSON, built from the same counters the Prometheus endpoint
 * exports (metrics.c), and queued on the connection: a slow reader never blocks the
 * daemon. Maintenance commands (evict, drain, flush) start a job that runs a bounded
 * number of page moves at a time from the event loop; "job" reports its progress.
 */
#include "kvtierd.h"
#include "daemon/alloc.h"
#include "daemon/json.h"
#include "daemon/log.h"
#include "kvtier_config.h"
#include "tiers/device.h"
#include "tiers/tier_fault.h"

#include <errno.h>
#include <stdarg.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define JOB_INFLIGHT 64   /* page moves of a job in flight */
#define JOB_PER_TICK 4096 /* pages a job looks at per event-loop tick */
#define BW_SAMPLES   11 /* one a second: rates over the last 10 s */
#define ARGS_MAX     16

enum job_kind { JOB_NONE = 0, JOB_FLUSH, JOB_EVICT, JOB_DRAIN };
static const char *const job_names[] = {"none", "flush", "evict", "drain"};

struct kvd_job {
	uint32_t id;
	enum job_kind kind;
	enum tier_id tier;
	bool running, cancelled;
	char filter[64];
	struct page_key *keys;
	uint64_t n, next;
	uint64_t done, failed, skipped, inflight;
	int first_err;
	uint64_t t0_ns, t1_ns;
};

struct bw_sample {
	uint64_t ns;
	uint64_t rd[TIER_MAX], wr[TIER_MAX];
};

struct kvd_ctl {
	struct kvd_job job;
	uint32_t next_job;
	struct bw_sample smp[BW_SAMPLES];
	unsigned nsmp, head; /* head: the newest */
};

/* One page of a job in flight. */
struct job_op {
	struct kvd *d;
	struct page_key k;
	bool then_evict;
	enum tier_id evict_from;
};

/* ---- arguments ---- */

struct args {
	const char *w[ARGS_MAX];
	unsigned n;
};

static const char *arg(const struct args *a, const char *name)
{
	size_t l = strlen(name);
	for (unsigned i = 1; i < a->n; i++)
		if (!strncmp(a->w[i], name, l) && a->w[i][l] == '=')
			return a->w[i] + l + 1;
	return NULL;
}

/* A numeric argument: -1 absent, -2 malformed. */
static int64_t arg_num(const struct args *a, const char *name)
{
	const char *v = arg(a, name);
	if (!v)
		return -1;
	char *end;
	errno = 0;
	unsigned long long x = strtoull(v, &end, 10);
	if (!*v || *end || errno || x > INT64_MAX / 2)
		return -2;
	return (int64_t)x;
}

static int parse_tier(const char *s)
{
	if (!s)
		return -1;
	for (int t = 0; t < TIER_MAX; t++)
		if (!strcmp(s, tier_name((enum tier_id)t)))
			return t;
	return -2;
}

/* ---- output ---- */

static void ctl_out_op(struct kvt_op *op, int res, uint32_t flags);

static void ctl_flush(struct kvd_client *c)
{
	while (c->tx_off < c->tx.len) {
		ssize_t n = send(c->sock, c->tx.p + c->tx_off, c->tx.len - c->tx_off,
				 MSG_DONTWAIT | MSG_NOSIGNAL);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			if (!(c->ops_inflight & 4)) {
				c->out_op.fn = ctl_out_op;
				struct io_uring_sqe *sqe = kvt_loop_sqe(c->d->loop, &c->out_op);
				io_uring_prep_poll_add(sqe, c->sock, POLLOUT);
				c->ops_inflight |= 4;
			}
			return;
		}
		if (n <= 0) {
			kvd_client_kill(c, KVD_DISC_CLOSED, "send: %s", n < 0 ? strerror(errno) : "EOF");
			return;
		}
		c->tx_off += (size_t)n;
	}
	c->tx.len = c->tx_off = 0;
}

static void ctl_out_op(struct kvt_op *op, int res, uint32_t flags)
{
	(void)flags;
	struct kvd_client *c = kvt_container_of(op, struct kvd_client, out_op);
	c->ops_inflight &= ~4u;
	if (c->dead)
		return;
	if (res < 0 && res != -ECANCELED)
		kvd_client_kill(c, KVD_DISC_CLOSED, "poll: %s", strerror(-res));
	else
		ctl_flush(c);
}

/* Frames body as CTL_REPLY pieces onto the connection's queue. */
static void reply(struct kvd_client *c, int status, const struct kvt_buf *body)
{
	size_t len = body->len, off = 0;
	if (c->tx.len - c->tx_off > (64u << 20)) {
		kvd_client_kill(c, KVD_DISC_PROTOCOL, "control answers not read (%zu bytes queued)",
				c->tx.len - c->tx_off);
		return;
	}
	do {
		uint32_t piece = len - off > KVT_MSG_MAX ? KVT_MSG_MAX : (uint32_t)(len - off);
		bool last = off + piece == len;
		struct kvt_msg_hdr h = {.magic = KVT_WIRE_MAGIC, .version = KVT_WIRE_VERSION,
					.type = KVT_MSG_CTL_REPLY, .len = piece,
					.status = last ? status : KVT_CTL_MORE};
		kvt_buf_put(&c->tx, (const char *)&h, sizeof(h));
		kvt_buf_put(&c->tx, body->p + off, piece);
		off += piece;
	} while (off < len);
	if (c->tx.oom) {
		kvd_client_kill(c, KVD_DISC_ERROR, "control answer: out of memory");
		return;
	}
	ctl_flush(c);
}

/* One control request and its answer. */
struct req {
	struct kvd_client *c;
	struct args a;
	struct kvt_buf b;
	struct kvt_json j;
	int err; /* set by fail: the answer is the error */
	char why[256];
};

#define REQ_VARS                                                                          \
	struct kvd_client *c __attribute__((unused)) = r->c;                            \
	struct kvt_json *j __attribute__((unused)) = &r->j;                              \
	const struct args *a __attribute__((unused)) = &r->a

static void fail(struct req *r, int err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static void fail(struct req *r, int err, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(r->why, sizeof(r->why), fmt, ap);
	va_end(ap);
	r->err = err;
}

static void reply_error(struct kvd_client *c, int err, const char *why)
{
	struct kvt_buf b = {0};
	struct kvt_json j;
	kvt_json_init(&j, &b);
	kvt_json_obj(&j, NULL);
	kvt_json_str(&j, "error", why);
	kvt_json_i64(&j, "errno", err);
	kvt_json_end(&j);
	reply(c, -err, &b);
	kvt_buf_free(&b);
}

/* ---- shared pieces ---- */

static struct kvd_client *client_by_id(struct kvd *d, uint32_t id)
{
	struct kvd_client *c;
	kvt_list_for_each_entry(c, &d->clients, link)
		if (c->id == id && c->attached && !c->dead)
			return c;
	return NULL;
}

static double rate(const struct kvd_ctl *x, enum tier_id t, bool rd)
{
	if (x->nsmp < 2)
		return 0;
	const struct bw_sample *a = &x->smp[(x->head + BW_SAMPLES - (x->nsmp - 1)) % BW_SAMPLES];
	const struct bw_sample *b = &x->smp[x->head];
	if (b->ns <= a->ns)
		return 0;
	uint64_t db = rd ? b->rd[t] - a->rd[t] : b->wr[t] - a->wr[t];
	return (double)db * 1e9 / (double)(b->ns - a->ns);
}

static void json_job(struct kvt_json *j, const char *key, const struct kvd_job *jb)
{
	if (jb->kind == JOB_NONE) {
		kvt_json_null(j, key);
		return;
	}
	kvt_json_obj(j, key);
	kvt_json_u64(j, "id", jb->id);
	kvt_json_str(j, "op", job_names[jb->kind]);
	if (jb->kind != JOB_FLUSH)
		kvt_json_str(j, "tier", tier_name(jb->tier));
	kvt_json_str(j, "filter", jb->filter);
	kvt_json_str(j, "state", jb->running ? "running" : jb->cancelled ? "cancelled" : "done");
	kvt_json_u64(j, "total", jb->n);
	kvt_json_u64(j, "done", jb->done);
	kvt_json_u64(j, "skipped", jb->skipped);
	kvt_json_u64(j, "failed", jb->failed);
	kvt_json_u64(j, "inflight", jb->inflight);
	if (jb->first_err)
		kvt_json_str(j, "first_error", strerror(-jb->first_err));
	uint64_t end = jb->running ? kvd_now_ns() : jb->t1_ns;
	kvt_json_f64(j, "elapsed_s", (double)(end - jb->t0_ns) / 1e9);
	kvt_json_end(j);
}

static const char *dtype_name(uint32_t dt)
{
	switch (dt) {
	case KVT_F16:
		return "fp16";
	case KVT_BF16:
		return "bf16";
	case KVT_F32:
		return "fp32";
	}
	return "?";
}

/* ---- commands ---- */

/* Each tier's use; with full, its I/O, latency, evictions and errors too. */
static void json_tiers(struct kvd *d, const struct kvt_store_stats *st, struct kvt_json *j,
		       const char *key, bool full)
{
	kvt_json_arr(j, key);
	for (int t = 0; t < TIER_MAX; t++) {
		const struct tier_usage *u = &st->tier[t];
		kvt_json_obj(j, NULL);
		kvt_json_str(j, "tier", tier_name((enum tier_id)t));
		kvt_json_u64(j, "capacity_bytes", u->capacity_bytes);
		kvt_json_u64(j, "used_bytes", u->used_bytes);
		kvt_json_u64(j, "slots", u->slots);
		kvt_json_u64(j, "pages", u->used);
		if (!full) {
			kvt_json_end(j);
			continue;
		}
		kvt_json_u64(j, "reads", u->reads);
		kvt_json_u64(j, "writes", u->writes);
		kvt_json_u64(j, "read_bytes", u->read_bytes);
		kvt_json_u64(j, "write_bytes", u->write_bytes);
		kvt_json_f64(j, "read_bytes_per_s", rate(d->ctl, (enum tier_id)t, true));
		kvt_json_f64(j, "write_bytes_per_s", rate(d->ctl, (enum tier_id)t, false));
		kvt_json_hist(j, "read_latency", st->lat[t][TIER_READ], KVT_HIST_BUCKETS, "us");
		kvt_json_hist(j, "write_latency", st->lat[t][TIER_WRITE], KVT_HIST_BUCKETS, "us");
		kvt_json_u64(j, "promotions", st->promotions[t]);
		kvt_json_obj(j, "evictions");
		for (int r = 0; r < KVT_EVICT_MAX; r++)
			kvt_json_u64(j, kvt_evict_reason_name((enum kvt_evict_reason)r),
				     st->evict_reason[t][r]);
		kvt_json_end(j);
		kvt_json_u64(j, "errors", u->errors);
		kvt_json_obj(j, "errors_by_reason");
		for (int e = 0; e < TIER_ERR_MAX; e++)
			kvt_json_u64(j, tier_err_name((enum tier_err)e), u->err[e]);
		kvt_json_end(j);
		kvt_json_u64(j, "poisoned_slots", u->poisoned);
		kvt_json_end(j);
	}
	kvt_json_end(j);
}

static void cmd_status(struct req *r)
{
	REQ_VARS;
	struct kvd *d = c->d;
	struct kvt_store_stats st;
	kvt_store_stats(d->store, &st);
	struct kvt_device *dev = kvt_store_device(d->store);
	unsigned clients = 0, tenants = 0;
	struct kvd_client *o;
	kvt_list_for_each_entry(o, &d->clients, link)
		clients += o->attached && !o->dead;
	for (uint32_t t = 0; t < d->cfg.max_tenants; t++)
		tenants += d->tenants[t].used;
	kvt_json_obj(j, NULL);
	kvt_json_str(j, "version", KVT_VERSION);
	kvt_json_u64(j, "wire_version", KVT_WIRE_VERSION);
	kvt_json_i64(j, "pid", getpid());
	kvt_json_f64(j, "uptime_s", (double)(kvd_now_ns() - d->start_ns) / 1e9);
	kvt_json_obj(j, "device");
	kvt_json_str(j, "backend", (dev->ops->caps & KVT_DEV_CAP_GPU) ? "cuda" : "cpu");
	kvt_json_str(j, "name", dev->ops->describe(dev));
	kvt_json_end(j);
	kvt_json_str(j, "socket", d->cfg.socket);
	kvt_json_str(j, "state_dir", d->cfg.state_dir);
	char m[80];
	if (kvd_metrics_address(d, m, sizeof(m)) == 0)
		kvt_json_str(j, "metrics", m);
	else
		kvt_json_null(j, "metrics");
	kvt_json_u64(j, "clients", clients);
	kvt_json_u64(j, "tenants", tenants);
	kvt_json_u64(j, "sequences", st.seqs);
	kvt_json_u64(j, "pages", st.pages);
	kvt_json_u64(j, "pages_dirty", st.pages_dirty);
	json_tiers(d, &st, j, "tiers", false);
	json_job(j, "job", &d->ctl->job);
	kvt_json_end(j);
}

static void cmd_tiers(struct req *r)
{
	REQ_VARS;
	struct kvt_store_stats st;
	kvt_store_stats(c->d->store, &st);
	json_tiers(c->d, &st, j, NULL, true);
}

static void json_pf(struct kvt_json *j, const char *key, const struct kvtier_prefetch_stats *p)
{
	kvt_json_obj(j, key);
	kvt_json_u64(j, "steps", p->steps);
	kvt_json_u64(j, "selected", p->selected);
	kvt_json_u64(j, "hit", p->hit);
	kvt_json_u64(j, "late", p->late);
	kvt_json_u64(j, "host", p->host);
	kvt_json_u64(j, "disk", p->disk);
	kvt_json_u64(j, "fetched", p->fetched);
	kvt_json_u64(j, "substituted", p->substituted);
	kvt_json_u64(j, "missed", p->missed);
	kvt_json_f64(j, "hit_rate", p->selected ? (double)p->hit / (double)p->selected : 0);
	kvt_json_u64(j, "prefetch_gpu", p->prefetch_gpu);
	kvt_json_u64(j, "prefetch_host", p->prefetch_host);
	kvt_json_u64(j, "prefetch_used", p->prefetch_used);
	kvt_json_u64(j, "prefetch_wasted", p->prefetch_wasted);
	kvt_json_u64(j, "prefetch_refused", p->prefetch_refused);
	kvt_json_u64(j, "bytes_h2d", p->bytes_h2d);
	kvt_json_u64(j, "bytes_nvme", p->bytes_nvme);
	kvt_json_hist(j, "latency_gpu", p->lat_gpu, KVTIER_LAT_BUCKETS, "us");
	kvt_json_hist(j, "latency_host", p->lat_host, KVTIER_LAT_BUCKETS, "us");
	kvt_json_end(j);
}

static uint64_t client_tokens(const struct kvd_client *c, uint64_t *seqs)
{
	uint64_t tok = 0;
	*seqs = 0;
	for (uint32_t i = 0; c->seqs && i < c->d->cfg.max_seqs; i++) {
		if (!c->seqs[i])
			continue;
		(*seqs)++;
		tok += c->seqs[i]->layer[0].ntok;
	}
	return tok;
}

static void cmd_clients(struct req *r)
{
	REQ_VARS;
	struct kvd *d = c->d;
	uint64_t now = kvd_now_ns();
	kvt_json_arr(j, NULL);
	struct kvd_client *o;
	kvt_list_for_each_entry(o, &d->clients, link)
	{
		if (!o->attached || o->dead)
			continue;
		const struct kvt_wire_layout *l = &o->layout;
		uint64_t nseq, tok = client_tokens(o, &nseq);
		kvt_json_obj(j, NULL);
		kvt_json_u64(j, "id", o->id);
		kvt_json_i64(j, "pid", o->pid);
		kvt_json_u64(j, "uid", o->uid);
		kvt_json_u64(j, "tenant", o->tenant->id);
		kvt_json_str(j, "tenant_name", o->tenant->name);
		kvt_json_f64(j, "attached_s", (double)(now - o->attach_ns) / 1e9);
		kvt_json_obj(j, "layout");
		kvt_json_u64(j, "layers", l->layers);
		kvt_json_u64(j, "kv_heads", l->kv_heads);
		kvt_json_u64(j, "group", l->group);
		kvt_json_u64(j, "head_dim", l->head_dim);
		kvt_json_str(j, "dtype", dtype_name(l->dtype));
		kvt_json_u64(j, "page_tokens", l->page_tokens);
		kvt_json_u64(j, "dense_layers", l->dense_layers);
		kvt_json_end(j);
		kvt_json_u64(j, "sequences", nseq);
		kvt_json_u64(j, "tokens", tok);
		kvt_json_u64(j, "requests", o->requests);
		kvt_json_u64(j, "bad_requests", o->bad_requests);
		kvt_json_u64(j, "tokens_appended", o->tokens);
		kvt_json_u64(j, "selects", o->selects);
		/* pages sealed (put, summarized), and the batches their summaries were built
		 * in: appends of whole pages in a row share one (engine.c kvd_seal_flush) */
		kvt_json_u64(j, "pages_sealed", o->sealed);
		kvt_json_u64(j, "seal_batches", o->seal_batches);
		kvt_json_f64(j, "seal_batch_us_mean", o->seal_batches ? o->seal_ns / 1e3 / o->seal_batches : 0);
		kvt_json_f64(j, "seal_lease_us_mean", o->seal_batches ? o->seal_lease_ns / 1e3 / o->seal_batches : 0);
		/* of a batch, its pages' bytes into host RAM (over the daemon's threads) */
		kvt_json_f64(j, "seal_copy_us_mean", o->seal_batches ? o->page_copy_ns / 1e3 / o->seal_batches : 0);
		/* appends of whole pages: the store's puts of one (their bytes aside, copied
		 * with the batch's); from the ring to its answer */
		kvt_json_u64(j, "page_appends", o->page_appends);
		kvt_json_f64(j, "page_put_us_mean", o->page_appends ? o->page_put_ns / 1e3 / o->page_appends : 0);
		kvt_json_f64(j, "page_answer_us_mean",
			     o->page_appends ? o->page_answer_ns / 1e3 / o->page_appends : 0);
		/* pins let go of while its kernels may still read their pages: kept now, and
		 * ever (engine.c, the client's reads) */
		kvt_json_bool(j, "read_fence", o->fence != NULL);
		kvt_json_u64(j, "pins_kept_for_reads", o->ndeferred);
		kvt_json_u64(j, "pins_deferred", o->pins_deferred);
		/* selects answered while copies into the GPU pool were under way, their
		 * reads ordered after the copy fence, and the pages so served */
		kvt_json_bool(j, "copy_fence", o->copy_fence != NULL);
		kvt_json_u64(j, "selects_before_copies", o->selects_early);
		kvt_json_u64(j, "pages_before_copies", o->pages_early);
		/* the fast path (fast.c): its reports, leases given, taken back, refused,
		 * reports waiting for their kernels, slots waiting for its reads */
		kvt_json_bool(j, "fast_path", o->fast.ptr != NULL);
		kvt_json_u64(j, "fast_feedbacks", o->fast_feedbacks);
		kvt_json_u64(j, "fast_leases_granted", o->fast_grants);
		kvt_json_u64(j, "fast_leases_revoked", o->fast_revokes);
		kvt_json_u64(j, "fast_leases_refused", o->fast_refused);
		kvt_json_u64(j, "fast_feedbacks_waiting", o->nfb);
		kvt_json_u64(j, "fast_slots_waiting_reads", o->nrevoked);
		kvt_json_u64(j, "fast_feedbacks_waiting_max", o->fast_lag_max);
		/* selection churn: pages reported, and of them those not selected by the
		 * layer's previous step */
		kvt_json_u64(j, "fast_pages_selected", o->fast_selected);
		kvt_json_u64(j, "fast_pages_fresh", o->fast_fresh);
		kvt_json_u64(j, "fast_waits", o->fast_waits);
		kvt_json_u64(j, "fast_waits_late", o->fast_waits_late);
		kvt_json_u64(j, "fast_waits_ahead", o->fast_waits_ahead);
		kvt_json_u64(j, "fast_reports_superseded", o->fast_superseded);
		kvt_json_u64(j, "fast_reports_pooled", o->fast_pooled);
		kvt_json_u64(j, "fast_pages_waited", o->fast_waited);
		kvt_json_f64(j, "fast_wait_us_mean",
				o->fast_waits ? (double)o->fast_wait_ns / 1e3 / (double)o->fast_waits : 0);
		kvt_json_hist(j, "fast_wait", o->fast_wait_lat, KVT_HIST_BUCKETS, "us");
		kvt_json_f64(j, "fast_wait_read_us_mean",
			     o->fast_wait_reads ? (double)o->fast_wait_read_ns / 1e3 / o->fast_wait_reads
						: 0);
		kvt_json_f64(j, "fast_feedback_us_mean",
			     o->fast_feedbacks ? (double)o->fast_fb_ns / 1e3 / o->fast_feedbacks : 0);
		/* a report's share of the fast path's time, by part */
		static const char *const part[KVD_FAST_NS_MAX] = {
			[KVD_FAST_WAITS] = "waits", [KVD_FAST_READS] = "reads",
			[KVD_FAST_LEASES] = "leases", [KVD_FAST_MAP] = "map_writes",
			[KVD_FAST_ACKS] = "acks", [KVD_FAST_RELEASES] = "releases"};
		kvt_json_obj(j, "fast_report_us_mean");
		for (int i = 0; i < KVD_FAST_NS_MAX; i++)
			kvt_json_f64(j, part[i], o->fast_feedbacks ? (double)o->fast_ns[i] / 1e3 /
									     (double)o->fast_feedbacks
								   : 0);
		kvt_json_end(j);
		kvt_json_u64(j, "fast_leases_promoted", o->fast_copied);
		kvt_json_u64(j, "fast_leases_promoting", o->fast_promoting);
		kvt_json_f64(j, "fast_promote_us_mean",
			     o->fast_copied ? (double)o->fast_grant_ns / 1e3 / o->fast_copied : 0);
		kvt_json_u64(j, "fast_sweeps_under_pressure", o->fast_pressured);
		kvt_json_hist(j, "select_latency", o->sel_lat, KVT_HIST_BUCKETS, "us");
		kvt_json_hist(j, "select_compute", o->sel_compute, KVT_HIST_BUCKETS, "us");
		kvt_json_hist(j, "attention_latency", o->attn, KVT_HIST_BUCKETS, "us");
		json_pf(j, "prefetch", &o->pf);
		kvt_json_end(j);
	}
	kvt_json_end(j);
}

struct page_count {
	uint64_t n, tier[TIER_MAX], dirty, pinned;
};

static int count_page(void *arg, const struct page_key *k, const struct kvt_page_info *pi)
{
	(void)k;
	struct page_count *pc = arg;
	pc->n++;
	for (int t = 0; t < TIER_MAX; t++)
		pc->tier[t] += (pi->valid >> t) & 1;
	pc->dirty += pi->state != KVT_PAGE_CLEAN;
	pc->pinned += pi->pins > 0;
	return 0;
}

static void cmd_seqs(struct req *r)
{
	REQ_VARS;
	struct kvd *d = c->d;
	int64_t want = arg_num(a, "client");
	if (want == -2) {
		fail(r, EINVAL, "client=: not a number");
		return;
	}
	if (want >= 0 && !client_by_id(d, (uint32_t)want)) {
		fail(r, ENOENT, "no client %lld attached", (long long)want);
		return;
	}
	kvt_json_arr(j, NULL);
	struct kvd_client *o;
	kvt_list_for_each_entry(o, &d->clients, link)
	{
		if (!o->attached || o->dead || (want >= 0 && o->id != (uint32_t)want))
			continue;
		for (uint32_t i = 0; i < o->nseqs; i++) {
			struct kvd_seq *q = o->seqs[i];
			if (!q)
				continue;
			struct page_count pc = {0};
			for (uint32_t ri = 0; ri < q->nrefs; ri++)
				kvt_store_foreach(d->store, o->tenant->id, q->refs[ri]->sseq, count_page,
						  &pc);
			kvt_json_obj(j, NULL);
			kvt_json_u64(j, "client", o->id);
			kvt_json_u64(j, "seq", q->id);
			kvt_json_u64(j, "tenant", o->tenant->id);
			kvt_json_u64(j, "tokens", q->layer[0].ntok);
			kvt_json_u64(j, "shared_origins", q->nrefs - 1);
			kvt_json_u64(j, "pages", pc.n);
			kvt_json_u64(j, "pages_gpu", pc.tier[TIER_GPU]);
			kvt_json_u64(j, "pages_host", pc.tier[TIER_HOST]);
			kvt_json_u64(j, "pages_nvme", pc.tier[TIER_NVME]);
			kvt_json_u64(j, "pages_dirty", pc.dirty);
			kvt_json_u64(j, "pages_pinned", pc.pinned);
			kvt_json_u64(j, "steps", q->st.steps);
			kvt_json_f64(j, "hit_rate",
				     q->st.selected ? (double)q->st.hit / (double)q->st.selected : 0);
			kvt_json_end(j);
		}
	}
	kvt_json_end(j);
}

/* Named sequences: every one the daemon keeps, open or not. */
static void cmd_names(struct req *r)
{
	REQ_VARS;
	struct kvd *d = c->d;
	kvt_json_arr(j, NULL);
	for (uint32_t i = 0; i < d->nnamed; i++) {
		const struct kvd_named *n = d->named[i];
		struct page_count pc = {0};
		kvt_store_foreach(d->store, n->tenant, n->sseq, count_page, &pc);
		/* while open: the client and sequence holding it (none: only a fork does) */
		const struct kvd_client *by = NULL;
		const struct kvd_seq *q = NULL;
		struct kvd_client *o;
		kvt_list_for_each_entry(o, &d->clients, link)
		{
			for (uint32_t k = 0; n->open && !q && o->attached && o->seqs && k < d->cfg.max_seqs; k++)
				if (o->seqs[k] && o->seqs[k]->own == n->open)
					q = o->seqs[k], by = o;
			if (q)
				break;
		}
		kvt_json_obj(j, NULL);
		kvt_json_str(j, "name", n->name);
		kvt_json_u64(j, "tenant", n->tenant);
		kvt_json_str(j, "tenant_name", n->tname);
		kvt_json_u64(j, "uid", n->uid);
		kvt_json_u64(j, "layers", n->layout.layers);
		kvt_json_u64(j, "kv_heads", n->layout.kv_heads);
		kvt_json_u64(j, "page_tokens", n->layout.page_tokens);
		/* while open, the client's view; else what the next open finds */
		kvt_json_u64(j, "tokens", q ? q->layer[0].ntok : (uint64_t)n->pages * n->layout.page_tokens);
		kvt_json_u64(j, "pages", pc.n);
		kvt_json_u64(j, "pages_gpu", pc.tier[TIER_GPU]);
		kvt_json_u64(j, "pages_host", pc.tier[TIER_HOST]);
		kvt_json_u64(j, "pages_nvme", pc.tier[TIER_NVME]);
		kvt_json_u64(j, "pages_dirty", pc.dirty);
		kvt_json_bool(j, "open", n->open != NULL);
		if (by)
			kvt_json_u64(j, "client", by->id);
		kvt_json_end(j);
	}
	kvt_json_end(j);
}

struct page_list {
	struct kvt_json *j;
	uint32_t client, seq;
	int layer, tier;
	uint64_t limit, listed, matched;
};

static int list_page(void *arg, const struct page_key *k, const struct kvt_page_info *pi)
{
	struct page_list *pl = arg;
	if ((pl->layer >= 0 && k->layer != (uint32_t)pl->layer) ||
	    (pl->tier >= 0 && !(pi->valid & (1u << pl->tier))))
		return 0;
	pl->matched++;
	if (pl->listed >= pl->limit)
		return 0;
	pl->listed++;
	struct kvt_json *j = pl->j;
	static const char *const state[] = {"filling", "dirty", "clean"};
	kvt_json_obj(j, NULL);
	kvt_json_u64(j, "client", pl->client);
	kvt_json_u64(j, "seq", pl->seq);
	kvt_json_u64(j, "layer", k->layer);
	kvt_json_u64(j, "head", k->kv_head);
	kvt_json_u64(j, "page", k->index);
	kvt_json_arr(j, "tiers");
	for (int t = 0; t < TIER_MAX; t++)
		if (pi->valid & (1u << t))
			kvt_json_str(j, NULL, tier_name((enum tier_id)t));
	kvt_json_end(j);
	kvt_json_arr(j, "moving_to");
	for (int t = 0; t < TIER_MAX; t++)
		if (pi->inflight & (1u << t))
			kvt_json_str(j, NULL, tier_name((enum tier_id)t));
	kvt_json_end(j);
	kvt_json_str(j, "state", state[pi->state < 3 ? pi->state : 0]);
	kvt_json_u64(j, "pins", pi->pins);
	kvt_json_u64(j, "bytes", pi->len);
	kvt_json_f64(j, "score", pi->score);
	kvt_json_end(j);
	return 0;
}

static struct kvd_seq *seq_of(struct kvd_client *o, uint32_t id)
{
	/* sequences sit at their id (with holes where some were closed) */
	return o->seqs && id < o->d->cfg.max_seqs ? o->seqs[id] : NULL;
}

static void cmd_pages(struct req *r)
{
	REQ_VARS;
	struct kvd *d = c->d;
	int64_t cl = arg_num(a, "client"), sq = arg_num(a, "seq"), layer = arg_num(a, "layer");
	int64_t limit = arg_num(a, "limit");
	int tier = parse_tier(arg(a, "tier"));
	if (cl == -2 || sq == -2 || layer == -2 || limit == -2 || tier == -2) {
		fail(r, EINVAL, "pages: bad argument (client=, seq=, layer=, limit= take "
				       "numbers, tier= gpu, host or nvme)");
		return;
	}
	if (sq >= 0 && cl < 0) {
		fail(r, EINVAL, "pages: seq= needs client= (sequence ids are per client)");
		return;
	}
	struct kvd_client *one = cl >= 0 ? client_by_id(d, (uint32_t)cl) : NULL;
	if (cl >= 0 && !one) {
		fail(r, ENOENT, "no client %lld attached", (long long)cl);
		return;
	}
	if (sq >= 0 && !seq_of(one, (uint32_t)sq)) {
		fail(r, ENOENT, "client %lld has no sequence %lld", (long long)cl,
			    (long long)sq);
		return;
	}
	struct page_list pl = {.j = j, .layer = (int)layer, .tier = tier,
			       .limit = limit >= 0 ? (uint64_t)limit : 10000};
	kvt_json_obj(j, NULL);
	kvt_json_arr(j, "pages");
	struct kvd_client *o;
	kvt_list_for_each_entry(o, &d->clients, link)
	{
		if (!o->attached || o->dead || (one && o != one))
			continue;
		for (uint32_t i = 0; i < o->nseqs; i++) {
			struct kvd_seq *q = o->seqs[i];
			if (!q || (sq >= 0 && q->id != (uint32_t)sq))
				continue;
			pl.client = o->id;
			pl.seq = q->id;
			for (uint32_t ri = 0; ri < q->nrefs; ri++)
				kvt_store_foreach(d->store, o->tenant->id, q->refs[ri]->sseq, list_page,
						  &pl);
		}
	}
	kvt_json_end(j);
	kvt_json_u64(j, "matched", pl.matched);
	kvt_json_bool(j, "truncated", pl.matched > pl.listed);
	kvt_json_end(j);
}

static void cmd_stats(struct req *r)
{
	REQ_VARS;
	struct kvd *d = c->d;
	struct kvt_store_stats st;
	kvt_store_stats(d->store, &st);
	struct kvtier_prefetch_stats pf = d->pf_gone;
	uint64_t requests = 0, bad = 0, clients = 0;
	struct kvd_client *o;
	kvt_list_for_each_entry(o, &d->clients, link)
	{
		if (!o->attached)
			continue;
		clients += !o->dead;
		requests += o->requests;
		bad += o->bad_requests;
		kvd_pf_add(&pf, &o->pf);
	}
	kvt_json_obj(j, NULL);
	kvt_json_f64(j, "uptime_s", (double)(kvd_now_ns() - d->start_ns) / 1e9);
	kvt_json_obj(j, "store");
	kvt_json_u64(j, "pages", st.pages);
	kvt_json_u64(j, "pages_filling", st.pages_filling);
	kvt_json_u64(j, "pages_dirty", st.pages_dirty);
	kvt_json_u64(j, "sequences", st.seqs);
	kvt_json_u64(j, "puts", st.puts);
	kvt_json_u64(j, "appends", st.appends);
	kvt_json_u64(j, "writebacks", st.writebacks);
	kvt_json_str(j, "write_policy", d->cfg.write_policy);
	kvt_json_u64(j, "writes_for_room", st.writes_for_room);
	kvt_json_u64(j, "drops", st.drops);
	kvt_json_u64(j, "pages_dropped", st.pages_dropped);
	kvt_json_u64(j, "enospc_refused", st.enospc_refused);
	kvt_json_u64(j, "diskfull_seq_evictions", st.diskfull_seq_evictions);
	kvt_json_u64(j, "read_errors", st.read_errors);
	kvt_json_u64(j, "write_errors", st.write_errors);
	kvt_json_u64(j, "pages_lost", st.pages_lost);
	kvt_json_u64(j, "recovered_pages", st.recovered_pages);
	kvt_json_u64(j, "recovered_bad", st.recovered_bad);
	kvt_json_u64(j, "backpressure", st.backpressure);
	kvt_json_u64(j, "reads_hurried", st.reads_hurried);
	kvt_json_hist(j, "hurried_read_latency", st.hurried_lat, KVT_HIST_BUCKETS, "us");
	kvt_json_hist(j, "hurried_read_disk_time", st.hurried_disk, KVT_HIST_BUCKETS, "us");
	kvt_json_u64(j, "meta_bytes", st.meta_bytes);
	kvt_json_hist(j, "page_lifetime", st.lifetime, KVT_HIST_BUCKETS, "ms");
	kvt_json_hist(j, "page_reuse_gap", st.reuse_gap, KVT_HIST_BUCKETS, "ms");
	kvt_json_end(j);
	struct tier_fault_cfg *fc = tier_fault_cfg(kvt_store_tier(d->store, TIER_NVME));
	if (fc) { /* store.fault_inject: what was injected so far */
		kvt_json_obj(j, "fault_injection");
		kvt_json_u64(j, "reads", fc->reads);
		kvt_json_u64(j, "writes", fc->writes);
		for (int k = 0; k < FAULT_MAX; k++)
			kvt_json_u64(j, tier_fault_kind_name(k), fc->injected[k]);
		kvt_json_u64(j, "hung_now", fc->hung_now);
		kvt_json_end(j);
	}
	uint64_t named_open = 0;
	for (uint32_t i = 0; i < d->nnamed; i++)
		named_open += d->named[i]->open != NULL;
	kvt_json_obj(j, "named_sequences");
	kvt_json_u64(j, "count", d->nnamed);
	kvt_json_u64(j, "open", named_open);
	kvt_json_u64(j, "recovered", d->recovery.seqs);
	kvt_json_u64(j, "recovered_pages", d->recovery.pages);
	kvt_json_u64(j, "dropped_unnamed_pages", d->recovery.unnamed_pages);
	kvt_json_u64(j, "dropped_past_gap_pages", d->recovery.cut_pages);
	kvt_json_u64(j, "journal_bad_records", d->recovery.journal_bad);
	kvt_json_u64(j, "reopened", d->recovery.opens);
	kvt_json_u64(j, "cut_on_open", d->recovery.open_cut);
	kvt_json_end(j);
	json_tiers(d, &st, j, "tiers", true);
	kvt_json_obj(j, "clients");
	kvt_json_u64(j, "attached", clients);
	kvt_json_u64(j, "accepted", d->accepted);
	kvt_json_u64(j, "rejected", d->rejected);
	kvt_json_u64(j, "disconnects", d->disconnects);
	kvt_json_obj(j, "disconnects_by_reason");
	for (int k = 0; k < KVD_DISC_MAX; k++)
		kvt_json_u64(j, kvd_disc_name((enum kvd_disc)k), d->disc[k]);
	kvt_json_end(j);
	kvt_json_u64(j, "requests", requests);
	kvt_json_u64(j, "bad_requests", bad);
	kvt_json_u64(j, "control_requests", d->ctl_requests);
	kvt_json_end(j);
	kvt_json_arr(j, "tenants");
	for (uint32_t t = 0; t < d->cfg.max_tenants; t++) {
		const struct kvd_tenant *tn = &d->tenants[t];
		if (!tn->used)
			continue;
		kvt_json_obj(j, NULL);
		kvt_json_u64(j, "id", t);
		kvt_json_str(j, "name", tn->name);
		kvt_json_u64(j, "uid", tn->uid);
		kvt_json_u64(j, "clients", tn->clients);
		kvt_json_u64(j, "pages", tn->disk_pages);
		kvt_json_u64(j, "gpu_arena_bytes", tn->pool_bytes);
		kvt_json_u64(j, "host_arena_bytes", tn->host_bytes);
		kvt_json_end(j);
	}
	kvt_json_end(j);
	kvt_json_hist(j, "select_latency", d->sel_lat, KVT_HIST_BUCKETS, "us");
	kvt_json_hist(j, "select_compute", d->sel_compute, KVT_HIST_BUCKETS, "us");
	kvt_json_hist(j, "attention_latency", d->attn, KVT_HIST_BUCKETS, "us");
	json_pf(j, "prefetch", &pf);
	kvt_json_end(j);
}

/* ---- config ---- */

struct cfg_ctx {
	struct kvt_json *j;
	const char *only;
	bool found;
};

static int cfg_one(void *arg, const char *name, const char *value, bool reloadable,
		   const char *help)
{
	struct cfg_ctx *x = arg;
	if (x->only && strcmp(x->only, name))
		return 0;
	x->found = true;
	kvt_json_obj(x->j, NULL);
	kvt_json_str(x->j, "name", name);
	kvt_json_str(x->j, "value", value);
	kvt_json_bool(x->j, "reloadable", reloadable);
	kvt_json_str(x->j, "help", help);
	kvt_json_end(x->j);
	return 0;
}

static bool operator(const struct kvd_client *c)
{
	return c->uid == 0 || c->uid == geteuid();
}

static void cmd_config(struct req *r)
{
	REQ_VARS;
	struct kvd *d = c->d;
	const char *verb = a->n > 1 && !strchr(a->w[1], '=') ? a->w[1] : "get";
	const char *name = arg(a, "name");
	if (!strcmp(verb, "get")) {
		struct cfg_ctx x = {.j = j, .only = name};
		kvt_json_arr(j, NULL);
		kvt_config_each(&d->cfg, cfg_one, &x);
		kvt_json_end(j);
		if (name && !x.found) {
			fail(r, ENOENT, "no option %s", name);
		}
		return;
	}
	if (strcmp(verb, "set")) {
		fail(r, EINVAL, "config: get or set");
		return;
	}
	const char *value = arg(a, "value");
	if (!name || !value) {
		fail(r, EINVAL, "config set: name= and value= are needed");
		return;
	}
	if (!operator(c)) {
		fail(r, EPERM, "config set: only root or the daemon's user (uid %u)",
			    (unsigned)geteuid());
		return;
	}
	const char *why = NULL;
	char old[512] = "";
	kvt_config_get(&d->cfg, name, old, sizeof(old));
	int ret = kvt_config_set(&d->cfg, name, value, true, &why);
	if (ret < 0) {
		fail(r, -ret, "config set %s: %s", name,
			    ret == -ENOENT ? "no such option" : why ? why : strerror(-ret));
		return;
	}
	if (!strcmp(name, "daemon.log_level"))
		kvt_log_set_level((int)d->cfg.log_level);
	char now[512];
	kvt_config_get(&d->cfg, name, now, sizeof(now));
	kvt_notice("ctl", "uid %u set %s = %s (was %s)", (unsigned)c->uid, name, now, old);
	kvt_json_obj(j, NULL);
	kvt_json_str(j, "name", name);
	kvt_json_str(j, "value", now);
	kvt_json_str(j, "previous", old);
	kvt_json_end(j);
}

/* ---- jobs ---- */

static void job_end(struct kvd_job *jb)
{
	jb->running = false;
	jb->t1_ns = kvd_now_ns();
	kvt_free(jb->keys);
	jb->keys = NULL;
	kvt_notice("ctl", "job %u (%s%s%s) %s: %llu done, %llu skipped, %llu failed", jb->id,
		   job_names[jb->kind], jb->kind == JOB_FLUSH ? "" : " ",
		   jb->kind == JOB_FLUSH ? "" : tier_name(jb->tier),
		   jb->cancelled ? "cancelled" : "finished", (unsigned long long)jb->done,
		   (unsigned long long)jb->skipped, (unsigned long long)jb->failed);
}

/* The page's copy in t goes, if another copy is left: done, skipped (busy) or failed. */
static void job_evict(struct kvd *d, struct kvd_job *jb, const struct page_key *k,
		      enum tier_id t)
{
	int ret = kvt_store_evict(d->store, k, t);
	if (ret == 0 || ret == -ENOENT)
		jb->done++;
	else if (ret == -EBUSY)
		jb->skipped++;
	else {
		jb->failed++;
		if (!jb->first_err)
			jb->first_err = ret;
	}
}

static void job_cb(void *arg, int res)
{
	struct job_op *op = arg;
	struct kvd_job *jb = &op->d->ctl->job;
	jb->inflight--;
	if (res < 0 && res != -ENOENT) {
		jb->failed++;
		if (!jb->first_err)
			jb->first_err = res;
	} else if (op->then_evict) {
		job_evict(op->d, jb, &op->k, op->evict_from);
	} else {
		jb->done++;
	}
	kvt_free(op);
}

/* Starts the work of one page. */
static void job_page(struct kvd *d, struct kvd_job *jb, const struct page_key *k)
{
	struct kvt_page_info pi;
	if (kvt_store_page_info(d->store, k, &pi) < 0) {
		jb->done++; /* gone meanwhile: nothing left to do */
		return;
	}
	if (jb->kind != JOB_FLUSH && !(pi.valid & (1u << jb->tier))) {
		jb->done++;
		return;
	}
	if (pi.state == KVT_PAGE_FILLING && (jb->kind == JOB_FLUSH || !(pi.valid & ~(1u << jb->tier)))) {
		jb->skipped++; /* tokens still coming: written back once full */
		return;
	}
	struct job_op *op = kvt_calloc(1, sizeof(*op));
	if (!op) {
		jb->failed++;
		jb->first_err = jb->first_err ? jb->first_err : -ENOMEM;
		return;
	}
	*op = (struct job_op){.d = d, .k = *k, .evict_from = jb->tier};
	int ret;
	if (jb->kind == JOB_FLUSH) {
		ret = kvt_store_writeback(d->store, k, job_cb, op);
	} else {
		op->then_evict = true;
		ret = -EAGAIN;
		/* drain moves a GPU copy down to host RAM where there is room now */
		if (jb->kind == JOB_DRAIN && jb->tier == TIER_GPU && !(pi.valid & (1u << TIER_HOST)))
			ret = kvt_store_prefetch(d->store, k, TIER_HOST, job_cb, op);
		if (ret == -EAGAIN) {
			if (pi.valid & ~(1u << jb->tier) & ((1u << TIER_HOST) | (1u << TIER_NVME))) {
				kvt_free(op);
				job_evict(d, jb, k, jb->tier);
				return;
			}
			ret = kvt_store_writeback(d->store, k, job_cb, op);
		}
	}
	if (ret < 0) {
		kvt_free(op);
		if (ret == -EINVAL) {
			jb->skipped++;
			return;
		}
		jb->failed++;
		if (!jb->first_err)
			jb->first_err = ret;
		return;
	}
	jb->inflight++;
}

static void job_run(struct kvd *d)
{
	struct kvd_job *jb = &d->ctl->job;
	if (!jb->running)
		return;
	/* bounded per tick, so that clients' requests are served between the pieces */
	for (unsigned i = 0; i < JOB_PER_TICK && !jb->cancelled && jb->next < jb->n &&
			     jb->inflight < JOB_INFLIGHT; i++)
		job_page(d, jb, &jb->keys[jb->next++]);
	if (jb->inflight == 0 && (jb->cancelled || jb->next == jb->n))
		job_end(jb);
}

struct collect {
	struct kvd_job *jb;
	uint64_t cap;
};

static int collect_page(void *arg, const struct page_key *k, const struct kvt_page_info *pi)
{
	struct collect *x = arg;
	struct kvd_job *jb = x->jb;
	if (jb->kind == JOB_FLUSH ? pi->state != KVT_PAGE_DIRTY : !(pi->valid & (1u << jb->tier)))
		return 0;
	if (jb->n == x->cap) {
		uint64_t cap = x->cap ? x->cap * 2 : 1024;
		struct page_key *nk = kvt_realloc(jb->keys, cap * sizeof(*nk));
		if (!nk)
			return -ENOMEM;
		jb->keys = nk;
		x->cap = cap;
	}
	jb->keys[jb->n++] = *k;
	return 0;
}

static void cmd_job_start(struct req *r, enum job_kind kind)
{
	REQ_VARS;
	struct kvd *d = c->d;
	struct kvd_job *jb = &d->ctl->job;
	const char *cmd = job_names[kind];
	int tier = parse_tier(arg(a, "tier"));
	int64_t cl = arg_num(a, "client"), sq = arg_num(a, "seq");
	if (!operator(c)) {
		fail(r, EPERM, "%s: only root or the daemon's user (uid %u)", cmd,
			    (unsigned)geteuid());
		return;
	}
	if (kind != JOB_FLUSH && tier < 0) {
		fail(r, EINVAL, "%s: tier= gpu or host is needed", cmd);
		return;
	}
	if (tier == TIER_NVME) {
		fail(r, EINVAL, "%s: nvme is the last tier: nothing below it to move to", cmd);
		return;
	}
	if (cl == -2 || sq == -2 || (sq >= 0 && cl < 0) || (kind == JOB_DRAIN && cl >= 0)) {
		fail(r, EINVAL, "%s: bad filter (client=N [seq=N]%s)", cmd,
			    kind == JOB_DRAIN ? "; drain takes the whole tier" : "");
		return;
	}
	if (jb->running) {
		fail(r, EBUSY, "job %u (%s) is running: wait for it or cancel it", jb->id,
			    job_names[jb->kind]);
		return;
	}
	struct kvd_client *one = cl >= 0 ? client_by_id(d, (uint32_t)cl) : NULL;
	if (cl >= 0 && !one) {
		fail(r, ENOENT, "no client %lld attached", (long long)cl);
		return;
	}
	*jb = (struct kvd_job){.id = ++d->ctl->next_job, .kind = kind,
			       .tier = tier < 0 ? TIER_NVME : (enum tier_id)tier, .running = true,
			       .t0_ns = kvd_now_ns()};
	struct collect x = {.jb = jb};
	int ret = 0;
	if (one) {
		snprintf(jb->filter, sizeof(jb->filter), "client=%lld", (long long)cl);
		bool any = false;
		for (uint32_t i = 0; i < one->nseqs && !ret; i++) {
			struct kvd_seq *q = one->seqs[i];
			if (!q || (sq >= 0 && q->id != (uint32_t)sq))
				continue;
			any = true;
			/* its own pages: shared prefixes belong to the sequence they came from */
			ret = kvt_store_foreach(d->store, one->tenant->id, q->own->sseq, collect_page,
						&x);
		}
		if (sq >= 0) {
			snprintf(jb->filter, sizeof(jb->filter), "client=%lld seq=%lld",
				 (long long)cl, (long long)sq);
			if (!any) {
				kvt_free(jb->keys);
				*jb = (struct kvd_job){0};
				fail(r, ENOENT, "client %lld has no sequence %lld", (long long)cl,
					    (long long)sq);
				return;
			}
		}
	} else {
		ret = kvt_store_foreach(d->store, UINT32_MAX, UINT64_MAX, collect_page, &x);
	}
	if (ret < 0) {
		kvt_free(jb->keys);
		*jb = (struct kvd_job){0};
		fail(r, -ret, "%s: %s", cmd, strerror(-ret));
		return;
	}
	kvt_notice("ctl", "uid %u started job %u: %s%s%s %s (%llu pages)", (unsigned)c->uid, jb->id,
		   cmd, kind == JOB_FLUSH ? "" : " ", kind == JOB_FLUSH ? "" : tier_name(jb->tier),
		   jb->filter, (unsigned long long)jb->n);
	job_run(d);
	json_job(j, NULL, jb);
}

static void cmd_cancel(struct req *r)
{
	REQ_VARS;
	struct kvd_job *jb = &c->d->ctl->job;
	if (!operator(c)) {
		fail(r, EPERM, "cancel: only root or the daemon's user (uid %u)",
			    (unsigned)geteuid());
		return;
	}
	if (jb->running && !jb->cancelled) {
		jb->cancelled = true;
		job_run(c->d);
	}
	json_job(j, NULL, jb);
}

/* ---- entry points ---- */

void kvd_ctl_request(struct kvd_client *c, const uint8_t *payload, uint32_t len)
{
	struct kvd *d = c->d;
	c->ctl = true;
	d->ctl_requests++;
	struct req *r = kvt_calloc(1, sizeof(*r));
	char *copy = kvt_malloc(len + 1);
	if (!r || !copy) {
		kvt_free(r);
		kvt_free(copy);
		kvd_client_kill(c, KVD_DISC_ERROR, "control request: out of memory");
		return;
	}
	r->c = c;
	memcpy(copy, payload, len);
	copy[len] = 0;
	/* words end with NUL; the last may lack one */
	for (uint32_t i = 0; i < len && r->a.n < ARGS_MAX;) {
		r->a.w[r->a.n++] = copy + i;
		i += (uint32_t)strlen(copy + i) + 1;
	}
	kvt_json_init(&r->j, &r->b);
	const char *cmd = r->a.n ? r->a.w[0] : "";
	if (!strcmp(cmd, "status"))
		cmd_status(r);
	else if (!strcmp(cmd, "tiers"))
		cmd_tiers(r);
	else if (!strcmp(cmd, "clients"))
		cmd_clients(r);
	else if (!strcmp(cmd, "seqs"))
		cmd_seqs(r);
	else if (!strcmp(cmd, "names"))
		cmd_names(r);
	else if (!strcmp(cmd, "pages"))
		cmd_pages(r);
	else if (!strcmp(cmd, "stats"))
		cmd_stats(r);
	else if (!strcmp(cmd, "metrics"))
		kvd_metrics_render(d, &r->b);
	else if (!strcmp(cmd, "config"))
		cmd_config(r);
	else if (!strcmp(cmd, "flush"))
		cmd_job_start(r, JOB_FLUSH);
	else if (!strcmp(cmd, "evict"))
		cmd_job_start(r, JOB_EVICT);
	else if (!strcmp(cmd, "drain"))
		cmd_job_start(r, JOB_DRAIN);
	else if (!strcmp(cmd, "job"))
		json_job(&r->j, NULL, &d->ctl->job);
	else if (!strcmp(cmd, "cancel"))
		cmd_cancel(r);
	else
		fail(r, EINVAL, "unknown command \"%.32s\"", cmd);
	if (!r->err && (r->b.oom || r->j.depth))
		fail(r, ENOMEM, "%s: answer too large or out of memory", cmd);
	if (r->err)
		reply_error(c, r->err, r->why);
	else
		reply(c, 0, &r->b);
	if (r->err)
		kvt_info("ctl", "uid %u: %s: %s", (unsigned)c->uid, cmd, r->why);
	kvt_buf_free(&r->b);
	kvt_free(r);
	kvt_free(copy);
}

void kvd_ctl_forget(struct kvd_client *c)
{
	kvt_buf_free(&c->tx);
	c->tx_off = 0;
}

/* Every tick: the job's next pages, and a bandwidth sample each second. */
void kvd_ctl_tick(struct kvd *d)
{
	struct kvd_ctl *x = d->ctl;
	if (!x)
		return;
	job_run(d);
	uint64_t now = kvd_now_ns();
	if (x->nsmp && now - x->smp[x->head].ns < 1000000000ull)
		return;
	x->head = (x->head + 1) % BW_SAMPLES;
	struct bw_sample *s = &x->smp[x->head];
	s->ns = now;
	for (int t = 0; t < TIER_MAX; t++) {
		/* the tiers' own counters: kvt_store_stats would walk every page */
		struct tier *tr = kvt_store_tier(d->store, (enum tier_id)t);
		struct tier_usage u = {0};
		if (tr)
			tr->ops->usage(tr, &u);
		s->rd[t] = u.read_bytes;
		s->wr[t] = u.write_bytes;
	}
	if (x->nsmp < BW_SAMPLES)
		x->nsmp++;
}

bool kvd_ctl_busy(struct kvd *d)
{
	const struct kvd_job *jb = d->ctl ? &d->ctl->job : NULL;
	return jb && jb->running && !jb->cancelled && jb->next < jb->n;
}

int kvd_ctl_start(struct kvd *d)
{
	d->ctl = kvt_calloc(1, sizeof(*d->ctl));
	return d->ctl ? 0 : -ENOMEM;
}

/* After the store closed: no job callback can run any more. */
void kvd_ctl_stop(struct kvd *d)
{
	if (!d->ctl)
		return;
	kvt_free(d->ctl->job.keys);
	kvt_free(d->ctl);
	d->ctl = NULL;
}
