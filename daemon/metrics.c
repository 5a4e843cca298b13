// SPDX-License-Identifier: MIT
/*
 * Prometheus text exposition (version 0.0.4) of the daemon's counters, served over
 * HTTP by libmicrohttpd on the address metrics.listen names (a loopback address by
 * default) and through kvtierctl ("stats --prometheus"). libmicrohttpd runs in its
 * external-epoll mode: its epoll fd is polled by the daemon's own io_uring and
 * MHD_run is called from the event loop thread, so a scrape reads the counters
 * without locks and never races the store.
 */
#include "kvtierd.h"
#include "daemon/alloc.h"
#include "daemon/log.h"
#include "kvtier_config.h"
#include "tiers/device.h"

#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if HAVE_MHD
#include <microhttpd.h>
#endif

/* ---- rendering ---- */

static void head(struct kvt_buf *b, const char *name, const char *type, const char *help)
{
	kvt_buf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/*
 * A log2 histogram: bucket i of h counts [2^i, 2^(i+1)) units, so the cumulative
 * count at le = 2^(i+1) units is exact. scale turns units into seconds. sum < 0:
 * not kept, estimated from the bucket midpoints (said in the HELP text).
 */
static void hist(struct kvt_buf *b, const char *name, const char *labels, const uint64_t *h,
		 unsigned nb, double scale, double sum)
{
	uint64_t cum = 0;
	double est = 0;
	unsigned last = 0;
	for (unsigned i = 0; i < nb; i++)
		if (h[i])
			last = i;
	for (unsigned i = 0; i < nb; i++) {
		cum += h[i];
		est += (double)h[i] * 1.5 * ldexp(1, (int)i) * scale;
		/* every bound up to the highest used one, then +Inf */
		if (i + 1 < nb && i <= last + 1)
			kvt_buf_printf(b, "%s_bucket{%s%sle=\"%.9g\"} %llu\n", name, labels,
				       *labels ? "," : "", ldexp(1, (int)i + 1) * scale,
				       (unsigned long long)cum);
	}
	kvt_buf_printf(b, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", name, labels, *labels ? "," : "",
		       (unsigned long long)cum);
	kvt_buf_printf(b, "%s_sum{%s} %.9g\n", name, labels, sum >= 0 ? sum : est);
	kvt_buf_printf(b, "%s_count{%s} %llu\n", name, labels, (unsigned long long)cum);
}

/* Label values: backslash, quote and newline escaped. */
static void label_value(char *out, size_t len, const char *v)
{
	size_t n = 0;
	for (; *v && n + 3 < len; v++) {
		if (*v == '\\' || *v == '"') {
			out[n++] = '\\';
			out[n++] = *v;
		} else if (*v == '\n') {
			out[n++] = '\\';
			out[n++] = 'n';
		} else {
			out[n++] = *v;
		}
	}
	out[n] = 0;
}

/* A histogram in microseconds over every client, then one per client attached. */
static void hist_clients(struct kvt_buf *b, struct kvd *d, const char *name, const char *help,
			 const uint64_t *all, uint64_t all_sum_us, size_t h_off, size_t sum_off)
{
	char l[128];
	head(b, name, "histogram", help);
	hist(b, name, "", all, KVT_HIST_BUCKETS, 1e-6, (double)all_sum_us * 1e-6);
	struct kvd_client *c;
	kvt_list_for_each_entry(c, &d->clients, link)
	{
		if (!c->attached || c->dead)
			continue;
		snprintf(l, sizeof(l), "client=\"%u\",tenant=\"%u\"", c->id, c->tenant->id);
		hist(b, name, l, (const uint64_t *)((const char *)c + h_off), KVT_HIST_BUCKETS, 1e-6,
		     (double)*(const uint64_t *)((const char *)c + sum_off) * 1e-6);
	}
}

void kvd_metrics_render(struct kvd *d, struct kvt_buf *b)
{
	struct kvt_store_stats st;
	kvt_store_stats(d->store, &st);
	struct kvt_device *dev = kvt_store_device(d->store);
	char l[256], v[96];

	head(b, "kvtier_build_info", "gauge", "Version and device backend of kvtierd.");
	label_value(v, sizeof(v), dev->ops->describe(dev));
	kvt_buf_printf(b, "kvtier_build_info{version=\"%s\",backend=\"%s\",device=\"%s\"} 1\n",
		       KVT_VERSION, (dev->ops->caps & KVT_DEV_CAP_GPU) ? "cuda" : "cpu", v);
	head(b, "kvtier_uptime_seconds", "gauge", "Seconds since kvtierd started.");
	kvt_buf_printf(b, "kvtier_uptime_seconds %.3f\n", (double)(kvd_now_ns() - d->start_ns) / 1e9);

	/* tiers */
	static const struct {
		const char *name, *type, *help;
		size_t off;
	} tf[] = {
		{"kvtier_tier_capacity_bytes", "gauge", "Bytes of KV a tier can hold.",
		 offsetof(struct tier_usage, capacity_bytes)},
		{"kvtier_tier_used_bytes", "gauge", "Bytes of KV a tier holds.",
		 offsetof(struct tier_usage, used_bytes)},
		{"kvtier_tier_slots", "gauge", "Page slots of a tier.", offsetof(struct tier_usage, slots)},
		{"kvtier_tier_pages", "gauge", "Pages a tier holds (slots in use).",
		 offsetof(struct tier_usage, used)},
		{"kvtier_tier_reads_total", "counter", "Page copies out of a tier.",
		 offsetof(struct tier_usage, reads)},
		{"kvtier_tier_writes_total", "counter", "Page copies into a tier.",
		 offsetof(struct tier_usage, writes)},
		{"kvtier_tier_read_bytes_total", "counter", "Bytes copied out of a tier.",
		 offsetof(struct tier_usage, read_bytes)},
		{"kvtier_tier_written_bytes_total", "counter", "Bytes copied into a tier.",
		 offsetof(struct tier_usage, write_bytes)},
		{"kvtier_tier_poisoned_slots", "gauge", "Slots taken out of use after a failed write.",
		 offsetof(struct tier_usage, poisoned)},
	};
	for (size_t f = 0; f < sizeof(tf) / sizeof(tf[0]); f++) {
		head(b, tf[f].name, tf[f].type, tf[f].help);
		for (int t = 0; t < TIER_MAX; t++)
			kvt_buf_printf(b, "%s{tier=\"%s\"} %llu\n", tf[f].name, tier_name((enum tier_id)t),
				       (unsigned long long)*(const uint64_t *)((const char *)&st.tier[t] +
									       tf[f].off));
	}
	head(b, "kvtier_tier_errors_total", "counter", "I/O errors of a tier, by reason.");
	for (int t = 0; t < TIER_MAX; t++)
		for (int e = 0; e < TIER_ERR_MAX; e++)
			kvt_buf_printf(b, "kvtier_tier_errors_total{tier=\"%s\",reason=\"%s\"} %llu\n",
				       tier_name((enum tier_id)t), tier_err_name((enum tier_err)e),
				       (unsigned long long)st.tier[t].err[e]);
	head(b, "kvtier_tier_evictions_total", "counter", "Copies dropped from a tier, by reason.");
	for (int t = 0; t < TIER_MAX; t++)
		for (int r = 0; r < KVT_EVICT_MAX; r++)
			kvt_buf_printf(b, "kvtier_tier_evictions_total{tier=\"%s\",reason=\"%s\"} %llu\n",
				       tier_name((enum tier_id)t),
				       kvt_evict_reason_name((enum kvt_evict_reason)r),
				       (unsigned long long)st.evict_reason[t][r]);
	head(b, "kvtier_tier_promotions_total", "counter", "Pages brought up into a tier.");
	for (int t = 0; t < TIER_MAX; t++)
		kvt_buf_printf(b, "kvtier_tier_promotions_total{tier=\"%s\"} %llu\n",
			       tier_name((enum tier_id)t), (unsigned long long)st.promotions[t]);
	head(b, "kvtier_copy_duration_seconds", "histogram",
	     "Page copies performed by a tier (read: out of it; write: into it), queued to done.");
	for (int t = 0; t < TIER_MAX; t++)
		for (int dir = 0; dir < 2; dir++) {
			snprintf(l, sizeof(l), "tier=\"%s\",op=\"%s\"", tier_name((enum tier_id)t),
				 dir == TIER_READ ? "read" : "write");
			hist(b, "kvtier_copy_duration_seconds", l, st.lat[t][dir], KVT_HIST_BUCKETS, 1e-6,
			     (double)st.lat_sum_us[t][dir] * 1e-6);
		}

	/* store */
	static const struct {
		const char *name, *type, *help;
		size_t off;
	} sf[] = {
		{"kvtier_store_pages", "gauge", "Pages in the store.", offsetof(struct kvt_store_stats, pages)},
		{"kvtier_store_pages_dirty", "gauge", "Complete pages not yet on NVMe.",
		 offsetof(struct kvt_store_stats, pages_dirty)},
		{"kvtier_store_pages_filling", "gauge", "Pages still being appended to.",
		 offsetof(struct kvt_store_stats, pages_filling)},
		{"kvtier_store_sequences", "gauge", "Store sequences (forks share theirs).",
		 offsetof(struct kvt_store_stats, seqs)},
		{"kvtier_store_puts_total", "counter", "Pages stored.", offsetof(struct kvt_store_stats, puts)},
		{"kvtier_store_writebacks_total", "counter", "Pages written back to NVMe.",
		 offsetof(struct kvt_store_stats, writebacks)},
		{"kvtier_store_pages_dropped_total", "counter", "Pages freed with their sequence.",
		 offsetof(struct kvt_store_stats, pages_dropped)},
		{"kvtier_store_read_errors_total", "counter",
		 "Disk copies found bad (EIO, short, checksum, stale): counted misses, never data.",
		 offsetof(struct kvt_store_stats, read_errors)},
		{"kvtier_store_write_errors_total", "counter", "Write-backs that failed (retried elsewhere).",
		 offsetof(struct kvt_store_stats, write_errors)},
		{"kvtier_store_pages_lost_total", "counter", "Pages whose every copy was bad.",
		 offsetof(struct kvt_store_stats, pages_lost)},
		{"kvtier_store_writes_for_room_total", "counter",
		 "Write-backs started to free host RAM (store.write_policy=back).",
		 offsetof(struct kvt_store_stats, writes_for_room)},
		{"kvtier_store_enospc_total", "counter", "Pages refused: disk full.",
		 offsetof(struct kvt_store_stats, enospc_refused)},
		{"kvtier_store_diskfull_evictions_total", "counter",
		 "Sequences dropped to make room on a full disk.",
		 offsetof(struct kvt_store_stats, diskfull_seq_evictions)},
		{"kvtier_store_backpressure_total", "counter",
		 "Operations refused for a tier full of busy pages.",
		 offsetof(struct kvt_store_stats, backpressure)},
		{"kvtier_store_reads_hurried_total", "counter",
		 "NVMe reads moved ahead of the others: a client waited for their pages.",
		 offsetof(struct kvt_store_stats, reads_hurried)},
		{"kvtier_store_metadata_bytes", "gauge", "Bytes of the store's metadata.",
		 offsetof(struct kvt_store_stats, meta_bytes)},
	};
	for (size_t f = 0; f < sizeof(sf) / sizeof(sf[0]); f++) {
		head(b, sf[f].name, sf[f].type, sf[f].help);
		kvt_buf_printf(b, "%s %llu\n", sf[f].name,
			       (unsigned long long)*(const uint64_t *)((const char *)&st + sf[f].off));
	}
	const struct {
		const char *name, *help;
		const uint64_t *h;
		uint64_t sum;
		double unit; /* seconds of a bucket's unit */
	} sh[] = {
		{"kvtier_hurried_read_duration_seconds",
		 "NVMe reads a client waited for, from the hurry to done.", st.hurried_lat,
		 st.hurried_lat_sum_us, 1e-6},
		{"kvtier_hurried_read_disk_seconds",
		 "NVMe reads a client waited for: their time on the disk (handed to it to done).",
		 st.hurried_disk, st.hurried_disk_sum_us, 1e-6},
		{"kvtier_page_lifetime_seconds", "Pages from stored to dropped.", st.lifetime,
		 st.lifetime_sum_ms, 1e-3},
		{"kvtier_page_reuse_gap_seconds", "Time between two selections of the same page.",
		 st.reuse_gap, st.reuse_gap_sum_ms, 1e-3},
	};
	for (size_t i = 0; i < sizeof(sh) / sizeof(sh[0]); i++) {
		head(b, sh[i].name, "histogram", sh[i].help);
		hist(b, sh[i].name, "", sh[i].h, KVT_HIST_BUCKETS, sh[i].unit,
		     (double)sh[i].sum * sh[i].unit);
	}

	/* named sequences */
	head(b, "kvtier_named_sequences", "gauge", "Named sequences (kept across restarts).");
	kvt_buf_printf(b, "kvtier_named_sequences %u\n", d->nnamed);
	head(b, "kvtier_recovered_pages", "gauge",
	     "Pages of named sequences found intact on NVMe at start.");
	kvt_buf_printf(b, "kvtier_recovered_pages %llu\n", (unsigned long long)d->recovery.pages);
	head(b, "kvtier_recovery_dropped_pages", "gauge",
	     "Pages on NVMe at start that no sequence could use, by reason.");
	kvt_buf_printf(b, "kvtier_recovery_dropped_pages{reason=\"unnamed\"} %llu\n",
		       (unsigned long long)d->recovery.unnamed_pages);
	kvt_buf_printf(b, "kvtier_recovery_dropped_pages{reason=\"past_gap\"} %llu\n",
		       (unsigned long long)d->recovery.cut_pages);

	/* clients */
	unsigned attached = 0;
	struct kvd_client *c;
	kvt_list_for_each_entry(c, &d->clients, link)
		attached += c->attached && !c->dead;
	head(b, "kvtier_clients", "gauge", "Clients attached.");
	kvt_buf_printf(b, "kvtier_clients %u\n", attached);
	head(b, "kvtier_tenant_info", "gauge", "Tenants: id, name and uid.");
	for (uint32_t t = 0; t < d->cfg.max_tenants; t++) {
		if (!d->tenants[t].used)
			continue;
		label_value(v, sizeof(v), d->tenants[t].name);
		kvt_buf_printf(b, "kvtier_tenant_info{tenant=\"%u\",name=\"%s\",uid=\"%u\"} 1\n", t, v,
			       (unsigned)d->tenants[t].uid);
	}
	head(b, "kvtier_tenant_pages", "gauge", "Pages a tenant has in the store (its disk quota).");
	for (uint32_t t = 0; t < d->cfg.max_tenants; t++)
		if (d->tenants[t].used)
			kvt_buf_printf(b, "kvtier_tenant_pages{tenant=\"%u\"} %llu\n", t,
				       (unsigned long long)d->tenants[t].disk_pages);
	head(b, "kvtier_tenant_arena_bytes", "gauge", "A tenant's own arena in a memory tier.");
	for (uint32_t t = 0; t < d->cfg.max_tenants; t++) {
		if (!d->tenants[t].used)
			continue;
		kvt_buf_printf(b, "kvtier_tenant_arena_bytes{tenant=\"%u\",tier=\"gpu\"} %llu\n", t,
			       (unsigned long long)d->tenants[t].pool_bytes);
		kvt_buf_printf(b, "kvtier_tenant_arena_bytes{tenant=\"%u\",tier=\"host\"} %llu\n", t,
			       (unsigned long long)d->tenants[t].host_bytes);
	}
	head(b, "kvtier_connections_total", "counter", "Connections accepted.");
	kvt_buf_printf(b, "kvtier_connections_total %llu\n", (unsigned long long)d->accepted);
	head(b, "kvtier_connections_rejected_total", "counter",
	     "Connections refused (user not allowed, too many clients).");
	kvt_buf_printf(b, "kvtier_connections_rejected_total %llu\n", (unsigned long long)d->rejected);
	head(b, "kvtier_client_disconnects_total", "counter", "Clients gone, by reason.");
	for (int r = 0; r < KVD_DISC_MAX; r++)
		kvt_buf_printf(b, "kvtier_client_disconnects_total{reason=\"%s\"} %llu\n",
			       kvd_disc_name((enum kvd_disc)r), (unsigned long long)d->disc[r]);
	head(b, "kvtier_control_requests_total", "counter", "kvtierctl commands served.");
	kvt_buf_printf(b, "kvtier_control_requests_total %llu\n", (unsigned long long)d->ctl_requests);

	static const struct {
		const char *name, *help;
		size_t off;
	} cf[] = {
		{"kvtier_client_requests_total", "Requests taken from a client's ring.",
		 offsetof(struct kvd_client, requests)},
		{"kvtier_client_bad_requests_total", "Requests refused as malformed.",
		 offsetof(struct kvd_client, bad_requests)},
		{"kvtier_client_tokens_total", "Tokens appended.", offsetof(struct kvd_client, tokens)},
		{"kvtier_client_selects_total", "Selections answered.", offsetof(struct kvd_client, selects)},
		{"kvtier_client_selects_before_copies_total",
		 "Selections answered while copies of their pages into the GPU pool were under way "
		 "(the client's reads wait on the copy fence).",
		 offsetof(struct kvd_client, selects_early)},
		{"kvtier_client_pages_before_copies_total",
		 "Pages of those selections whose copies were under way.",
		 offsetof(struct kvd_client, pages_early)},
	};
	for (size_t f = 0; f < sizeof(cf) / sizeof(cf[0]); f++) {
		head(b, cf[f].name, "counter", cf[f].help);
		kvt_list_for_each_entry(c, &d->clients, link)
		{
			if (!c->attached || c->dead)
				continue;
			kvt_buf_printf(b, "%s{client=\"%u\",tenant=\"%u\"} %llu\n", cf[f].name, c->id,
				       c->tenant->id,
				       (unsigned long long)*(const uint64_t *)((const char *)c + cf[f].off));
		}
	}
	/* the prefetcher: clients attached, and the sum of those gone as client="gone" */
	static const struct {
		const char *name, *help;
		size_t off;
	} pf[] = {
		{"kvtier_select_steps_total", "Selections of one (sequence, layer).",
		 offsetof(struct kvtier_prefetch_stats, steps)},
		{"kvtier_select_pages_total", "Pages selected.",
		 offsetof(struct kvtier_prefetch_stats, selected)},
		{"kvtier_select_hits_total", "Selected pages already on the GPU.",
		 offsetof(struct kvtier_prefetch_stats, hit)},
		{"kvtier_select_late_total", "Selected pages whose prefetch was still in flight.",
		 offsetof(struct kvtier_prefetch_stats, late)},
		{"kvtier_select_host_reads_total", "Selected pages read in place from host RAM.",
		 offsetof(struct kvtier_prefetch_stats, host)},
		{"kvtier_select_disk_reads_total", "Selected pages read from NVMe before the answer.",
		 offsetof(struct kvtier_prefetch_stats, disk)},
		{"kvtier_select_substituted_total", "NVMe-only pages replaced by resident ones.",
		 offsetof(struct kvtier_prefetch_stats, substituted)},
		{"kvtier_prefetch_gpu_total", "Prefetches started to the GPU.",
		 offsetof(struct kvtier_prefetch_stats, prefetch_gpu)},
		{"kvtier_prefetch_host_total", "Prefetches started from NVMe to host RAM.",
		 offsetof(struct kvtier_prefetch_stats, prefetch_host)},
		{"kvtier_prefetch_used_total", "Prefetched pages selected afterwards.",
		 offsetof(struct kvtier_prefetch_stats, prefetch_used)},
		{"kvtier_prefetch_wasted_total", "Prefetched pages not selected in time.",
		 offsetof(struct kvtier_prefetch_stats, prefetch_wasted)},
		{"kvtier_prefetch_refused_total", "Prefetches the store had no room for.",
		 offsetof(struct kvtier_prefetch_stats, prefetch_refused)},
		{"kvtier_prefetch_h2d_bytes_total", "Bytes prefetched into the GPU.",
		 offsetof(struct kvtier_prefetch_stats, bytes_h2d)},
		{"kvtier_prefetch_nvme_bytes_total", "Bytes prefetched from NVMe.",
		 offsetof(struct kvtier_prefetch_stats, bytes_nvme)},
		{"kvtier_select_missed_total", "Pages a client's own selection went without (not leased yet).",
		 offsetof(struct kvtier_prefetch_stats, missed)},
	};
	for (size_t f = 0; f < sizeof(pf) / sizeof(pf[0]); f++) {
		head(b, pf[f].name, "counter", pf[f].help);
		kvt_list_for_each_entry(c, &d->clients, link)
		{
			if (!c->attached || c->dead)
				continue;
			kvt_buf_printf(b, "%s{client=\"%u\",tenant=\"%u\"} %llu\n", pf[f].name, c->id,
				       c->tenant->id,
				       (unsigned long long)*(const uint64_t *)((const char *)&c->pf +
									       pf[f].off));
		}
		kvt_buf_printf(b, "%s{client=\"gone\"} %llu\n", pf[f].name,
			       (unsigned long long)*(const uint64_t *)((const char *)&d->pf_gone +
								       pf[f].off));
	}
	head(b, "kvtier_prefetch_duration_seconds", "histogram",
	     "Prefetches from start to arrival, by destination tier (sum estimated from the "
	     "log2 buckets).");
	kvt_list_for_each_entry(c, &d->clients, link)
	{
		if (!c->attached || c->dead)
			continue;
		snprintf(l, sizeof(l), "client=\"%u\",tenant=\"%u\",tier=\"gpu\"", c->id, c->tenant->id);
		hist(b, "kvtier_prefetch_duration_seconds", l, c->pf.lat_gpu, KVTIER_LAT_BUCKETS, 1e-6, -1);
		snprintf(l, sizeof(l), "client=\"%u\",tenant=\"%u\",tier=\"host\"", c->id, c->tenant->id);
		hist(b, "kvtier_prefetch_duration_seconds", l, c->pf.lat_host, KVTIER_LAT_BUCKETS, 1e-6,
		     -1);
	}
	hist_clients(b, d, "kvtier_select_duration_seconds",
		     "Selections from the request taken to the answer posted (page waits included).",
		     d->sel_lat, d->sel_lat_sum_us, offsetof(struct kvd_client, sel_lat),
		     offsetof(struct kvd_client, sel_lat_sum_us));
	hist_clients(b, d, "kvtier_attention_duration_seconds",
		     "Sparse attention of one step (kvtier_attend), as the client timed it.", d->attn,
		     d->attn_sum_us, offsetof(struct kvd_client, attn),
		     offsetof(struct kvd_client, attn_sum_us));
	head(b, "kvtier_select_compute_seconds", "histogram",
	     "Of a selection: scoring and top-k, before any page move.");
	hist(b, "kvtier_select_compute_seconds", "", d->sel_compute, KVT_HIST_BUCKETS, 1e-6,
	     (double)d->sel_compute_sum_us * 1e-6);
}

/* ---- the HTTP endpoint ---- */

#if HAVE_MHD

struct kvd_metrics {
	struct MHD_Daemon *mhd;
	int epfd;
	struct kvt_op op;
	bool armed, ready;
	char addr[96];
	uint64_t scrapes;
};

static enum MHD_Result handle(void *cls, struct MHD_Connection *conn, const char *url,
			      const char *method, const char *version, const char *upload,
			      size_t *upload_len, void **state)
{
	(void)version;
	(void)upload;
	(void)state;
	struct kvd *d = cls;
	struct MHD_Response *r;
	unsigned code = MHD_HTTP_OK;
	if (*upload_len)
		return MHD_NO; /* no bodies here */
	if (strcmp(method, "GET") && strcmp(method, "HEAD")) {
		static const char msg[] = "only GET\n";
		r = MHD_create_response_from_buffer(sizeof(msg) - 1, (void *)msg, MHD_RESPMEM_PERSISTENT);
		code = MHD_HTTP_METHOD_NOT_ALLOWED;
	} else if (strcmp(url, "/metrics")) {
		static const char msg[] = "kvtierd: the metrics are at /metrics\n";
		r = MHD_create_response_from_buffer(sizeof(msg) - 1, (void *)msg, MHD_RESPMEM_PERSISTENT);
		code = MHD_HTTP_NOT_FOUND;
	} else {
		struct kvt_buf b = {0};
		kvd_metrics_render(d, &b);
		if (b.oom) {
			kvt_buf_free(&b);
			return MHD_NO;
		}
		d->metrics->scrapes++;
		r = MHD_create_response_from_buffer(b.len, b.p, MHD_RESPMEM_MUST_FREE);
		if (!r)
			kvt_buf_free(&b);
	}
	if (!r)
		return MHD_NO;
	MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE,
				code == MHD_HTTP_OK ? "text/plain; version=0.0.4; charset=utf-8"
						    : "text/plain");
	enum MHD_Result ret = MHD_queue_response(conn, code, r);
	MHD_destroy_response(r);
	return ret;
}

static void mhd_log(void *cls, const char *fmt, va_list ap)
{
	(void)cls;
	char msg[256];
	vsnprintf(msg, sizeof(msg), fmt, ap);
	size_t n = strlen(msg);
	while (n && msg[n - 1] == '\n')
		msg[--n] = 0;
	kvt_warn("metrics", "%s", msg);
}

static void op_fn(struct kvt_op *op, int res, uint32_t flags)
{
	(void)res;
	(void)flags;
	struct kvd_metrics *m = kvt_container_of(op, struct kvd_metrics, op);
	m->armed = false;
	m->ready = true;
}

int kvd_metrics_start(struct kvd *d)
{
	const char *spec = d->cfg.metrics_listen;
	if (!*spec || !strcmp(spec, "off"))
		return 0;
	char host[64];
	snprintf(host, sizeof(host), "%s", spec);
	char *colon = strrchr(host, ':');
	char *end = NULL;
	unsigned long port = colon ? strtoul(colon + 1, &end, 10) : 0;
	struct sockaddr_in sa = {.sin_family = AF_INET};
	if (!colon || !*(colon + 1) || *end || port > 65535 ||
	    (*colon = 0, inet_pton(AF_INET, host, &sa.sin_addr) != 1)) {
		kvt_err("metrics", "metrics.listen \"%s\": want IPV4ADDR:PORT or \"off\"", spec);
		return -EINVAL;
	}
	if ((ntohl(sa.sin_addr.s_addr) >> 24) != 127)
		kvt_warn("metrics", "metrics.listen %s is not a loopback address: the counters name "
				    "tenants and clients", spec);
	sa.sin_port = htons((uint16_t)port);
	struct kvd_metrics *m = kvt_calloc(1, sizeof(*m));
	if (!m)
		return -ENOMEM;
	m->mhd = MHD_start_daemon(MHD_USE_EPOLL | MHD_USE_ERROR_LOG, 0, NULL, NULL, handle, d,
				  MHD_OPTION_EXTERNAL_LOGGER, mhd_log, NULL, MHD_OPTION_SOCK_ADDR,
				  (struct sockaddr *)&sa, MHD_OPTION_CONNECTION_TIMEOUT, 10u,
				  MHD_OPTION_CONNECTION_LIMIT, 32u, MHD_OPTION_END);
	if (!m->mhd) {
		kvt_warn("metrics", "cannot listen on %s (in use?): no Prometheus endpoint; "
				    "kvtierctl stats --prometheus still works", spec);
		kvt_free(m);
		return -EADDRINUSE;
	}
	const union MHD_DaemonInfo *ep = MHD_get_daemon_info(m->mhd, MHD_DAEMON_INFO_EPOLL_FD);
	const union MHD_DaemonInfo *pi = MHD_get_daemon_info(m->mhd, MHD_DAEMON_INFO_BIND_PORT);
	m->epfd = ep ? ep->epoll_fd : -1;
	if (m->epfd < 0) {
		kvt_err("metrics", "libmicrohttpd gave no epoll fd");
		MHD_stop_daemon(m->mhd);
		kvt_free(m);
		return -EIO;
	}
	snprintf(m->addr, sizeof(m->addr), "%s:%u", host, pi ? (unsigned)pi->port : (unsigned)port);
	m->op.fn = op_fn;
	m->ready = true;
	d->metrics = m;
	kvt_notice("metrics", "Prometheus endpoint on http://%s/metrics", m->addr);
	return 0;
}

void kvd_metrics_tick(struct kvd *d)
{
	struct kvd_metrics *m = d->metrics;
	if (!m)
		return;
	/* connection timeouts need a run now and then even without events */
	m->ready = false;
	MHD_run(m->mhd);
	if (!m->armed) {
		struct io_uring_sqe *sqe = kvt_loop_sqe(d->loop, &m->op);
		io_uring_prep_poll_add(sqe, m->epfd, POLLIN);
		m->armed = true;
	}
}

void kvd_metrics_stop(struct kvd *d)
{
	struct kvd_metrics *m = d->metrics;
	if (!m)
		return;
	/* the poll on the epoll fd must complete before m goes */
	if (m->armed) {
		struct io_uring_sqe *sqe = kvt_loop_sqe(d->loop, NULL);
		io_uring_prep_poll_remove(sqe, (uint64_t)(uintptr_t)&m->op);
		kvt_loop_submit(d->loop);
		for (int i = 0; i < 100 && m->armed; i++)
			kvt_store_run(d->store, 10);
	}
	if (m->armed) {
		kvt_warn("metrics", "endpoint poll did not end; leaving it");
		return;
	}
	MHD_stop_daemon(m->mhd);
	kvt_free(m);
	d->metrics = NULL;
}

int kvd_metrics_address(struct kvd *d, char *buf, size_t len)
{
	if (!d->metrics)
		return -ENOENT;
	snprintf(buf, len, "%s", d->metrics->addr);
	return 0;
}

#else /* no libmicrohttpd: the text only through kvtierctl */

int kvd_metrics_start(struct kvd *d)
{
	if (*d->cfg.metrics_listen && strcmp(d->cfg.metrics_listen, "off"))
		kvt_notice("metrics", "built without libmicrohttpd: no HTTP endpoint (metrics.listen "
				      "%s ignored); kvtierctl stats --prometheus has the text",
			   d->cfg.metrics_listen);
	return 0;
}

void kvd_metrics_tick(struct kvd *d) { (void)d; }
void kvd_metrics_stop(struct kvd *d) { (void)d; }

int kvd_metrics_address(struct kvd *d, char *buf, size_t len)
{
	(void)d;
	(void)buf;
	(void)len;
	return -ENOENT;
}

#endif
