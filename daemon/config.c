// SPDX-License-Identifier: MIT
#include "config.h"
#include "log.h"
#include "ipc/paths.h"

#include <errno.h>
#include <ini.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>
#include <unistd.h>

enum opt_type {
	OPT_STR,
	OPT_U32,
	OPT_OCTAL,
	OPT_SIZE,
	OPT_BOOL,
	OPT_IDS, /* comma-separated numeric ids; count in the uint32_t right after the array */
};

struct opt {
	const char *name;
	enum opt_type type;
	size_t off;
	size_t size;       /* OPT_STR: buffer size */
	uint64_t min, max; /* numbers */
	bool reloadable;
	const char *help;
};

#define F(field) offsetof(struct kvt_config, field), sizeof(((struct kvt_config *)0)->field)
#define KiB	 (1ull << 10)
#define MiB	 (1ull << 20)
#define GiB	 (1ull << 30)
#define TiB	 (1ull << 40)

static const struct opt opts[] = {
	{"ipc.socket", OPT_STR, F(socket), 0, 0, false, "control socket path"},
	{"ipc.socket_mode", OPT_OCTAL, F(socket_mode), 0, 0777, false, "socket file mode"},
	{"ipc.allow_uids", OPT_IDS, F(allow_uids), 0, UINT32_MAX, true,
	 "uids allowed to attach besides root and the daemon's own"},
	{"ipc.allow_gids", OPT_IDS, F(allow_gids), 0, UINT32_MAX, true,
	 "gids whose members may attach"},
	{"ipc.max_clients", OPT_U32, F(max_clients), 1, 4096, true, "clients attached at once"},
	{"ipc.max_seqs", OPT_U32, F(max_seqs), 1, 1u << 20, false, "open sequences per client"},
	{"ipc.max_batch", OPT_U32, F(max_batch), 1, 65536, false, "sequences per batched request"},
	{"ipc.ring_entries", OPT_U32, F(ring_entries), 2, 4096, false,
	 "request ring entries per client (rounded to a power of two)"},
	{"ipc.data_bytes", OPT_SIZE, F(data_bytes), 64 * KiB, 4 * GiB, false,
	 "default data area per client"},
	{"ipc.data_bytes_max", OPT_SIZE, F(data_bytes_max), 64 * KiB, 4 * GiB, false,
	 "largest data area a client may ask for"},
	{"store.state_dir", OPT_STR, F(state_dir), 0, 0, false, "where the store lives"},
	{"store.nvme_path", OPT_STR, F(nvme_path), 0, 0, false,
	 "file or block device of the NVMe tier (default: state_dir/store.kvt)"},
	{"store.names_path", OPT_STR, F(names_path), 0, 0, false,
	 "journal of named sequences (default: nvme_path.names; state_dir/NAME.names for a "
	 "block device)"},
	{"store.device", OPT_STR, F(device), 0, 0, false, "auto, cuda or cpu"},
	{"store.nvme_bytes", OPT_SIZE, F(nvme_bytes), 16 * MiB, 64 * TiB, false,
	 "NVMe tier capacity when the store is made"},
	{"store.page_bytes", OPT_SIZE, F(page_bytes), 4 * KiB, 16 * MiB, false,
	 "largest page (2 * page_tokens * head_dim * dtype bytes)"},
	{"store.queue_depth", OPT_U32, F(queue_depth), 1, 4096, false, "NVMe I/Os in flight"},
	{"store.background_depth", OPT_U32, F(background_depth), 0, 4096, false,
	 "NVMe I/Os in flight that no one waits for (prefetches, write-back; 0: queue_depth): "
	 "the rest of queue_depth is kept for reads a client waits for"},
	{"store.disk_full", OPT_STR, F(disk_full), 0, 0, false,
	 "refuse (appends fail with ENOSPC) or evict (drop the coldest sequences)"},
	{"store.write_policy", OPT_STR, F(write_policy), 0, 0, false,
	 "through (a page goes to disk when it is sealed) or back (when the host tier needs "
	 "its room: the disk need hold only what host RAM does not; pages only in RAM are "
	 "written at a clean exit, lost if the daemon dies)"},
	{"store.durable", OPT_BOOL, F(durable), 0, 1, false, "write-backs with RWF_DSYNC"},
	{"store.fault_inject", OPT_STR, F(fault_inject), 0, 0, false,
	 "testing only: disk faults to inject, e.g. read_eio=0.01,write_hang=@5 (tiers/tier_fault.h)"},
	{"tenant.host_bytes", OPT_SIZE, F(host_bytes), 64 * KiB, 16 * TiB, false,
	 "host-RAM arena of each tenant"},
	{"tenant.gpu_bytes", OPT_SIZE, F(gpu_bytes), 64 * KiB, 16 * TiB, false,
	 "GPU pool of each tenant"},
	{"tenant.disk_quota_bytes", OPT_SIZE, F(disk_quota_bytes), 0, 64 * TiB, true,
	 "NVMe bytes each tenant may hold (0: no quota)"},
	{"tenant.max_tenants", OPT_U32, F(max_tenants), 1, 255, false, "tenants at once"},
	{"tenant.summary_bytes", OPT_SIZE, F(summary_bytes), 0, 1 * TiB, false,
	 "device memory for the page summaries a client may hold (0: enough for every page "
	 "the store's disk holds; the pool grows as pages come)"},
	{"prefetch.enable", OPT_BOOL, F(prefetch), 0, 1, true,
	 "after each selection, fetch the pages the next step is likely to need"},
	{"prefetch.gpu_margin_pct", OPT_U32, F(gpu_margin_pct), 0, 1000, true,
	 "next-best pages per row kept on the GPU, in percent of the step's budget"},
	{"prefetch.host_margin_pct", OPT_U32, F(host_margin_pct), 0, 10000, true,
	 "next-best pages per row brought from NVMe to host RAM (deeper: disk is slow)"},
	{"prefetch.drift_pct", OPT_U32, F(drift_pct), 0, 1000, true,
	 "weight of each page's score trend over the last step in the plan"},
	{"prefetch.wasted_steps", OPT_U32, F(wasted_steps), 1, 1000000, true,
	 "a prefetched page not selected within this many steps counts as wasted"},
	{"prefetch.max_disk_inflight", OPT_U32, F(max_disk_prefetch), 1, 65536, true,
	 "prefetches reading from NVMe at once (a step's own disk reads queue behind them)"},
	{"select.substitute_gap", OPT_U32, F(substitute_gap), 0, 1000, true,
	 "KVTIER_SEL_SUBSTITUTE replaces an NVMe-only page only when its score bound is at "
	 "least this many nats below the row's best page (0: any such page)"},
	{"fast.max_bytes", OPT_SIZE, F(fast_bytes_max), 0, 1 * TiB, false,
	 "largest fast-path region (summaries and page map in GPU memory) a client may have; "
	 "0: no fast path"},
	{"fast.lease_steps", OPT_U32, F(lease_steps), 1, 1000000, true,
	 "a fast-path lease (a page kept on the GPU for a client's own selection) not selected "
	 "in this many of its layer's steps is taken back"},
	{"fast.promote", OPT_BOOL, F(fast_promote), 0, 1, true,
	 "copy pages leased in host RAM to the GPU pool (off: the client reads them in place "
	 "from host RAM, leaving the pool to others)"},
	{"fast.warm", OPT_BOOL, F(fast_warm), 0, 1, true,
	 "the store lookups of the fast path's lease releases warmed into the CPU's cache a "
	 "few ahead of their turn (off: each on its own; for measuring it)"},
	{"fast.threads", OPT_U32, F(fast_threads), 1, 64, false,
	 "threads that read a fast-path report's sequences (what each selected, the store's "
	 "lookups of the pages to lease), the event loop's own among them (default: half the "
	 "CPUs, at most 8; 1 where there are fewer than 8)"},
	{"fast.disk_reads", OPT_U32, F(fast_disk_reads), 0, 65536, true,
	 "a page a fast-path client selected but whose score says it may not matter is read "
	 "from NVMe only while fewer than this many of the client's lease reads are under way "
	 "(pages that may matter are read regardless; fewer low ones queue ahead of them)"},
	{"metrics.listen", OPT_STR, F(metrics_listen), 0, 0, false,
	 "Prometheus endpoint: ADDR:PORT (a loopback address; port 0: any), or \"off\""},
	{"daemon.log_level", OPT_U32, F(log_level), 3, 7, true, "3 errors .. 7 debug"},
	{"daemon.promote_timeout_ms", OPT_U32, F(promote_timeout_ms), 10, 600000, true,
	 "a selection whose pages cannot be brought up in this time fails"},
};

static uint64_t clamp_u64(uint64_t v, uint64_t lo, uint64_t hi)
{
	return v < lo ? lo : v > hi ? hi : v;
}

void kvt_config_defaults(struct kvt_config *c)
{
	memset(c, 0, sizeof(*c));
	const char *state = getenv("XDG_STATE_HOME");
	const char *home = getenv("HOME");
	kvt_default_socket(c->socket, sizeof(c->socket));
	if (state && *state)
		snprintf(c->state_dir, sizeof(c->state_dir), "%s/kvtier", state);
	else if (geteuid() == 0)
		snprintf(c->state_dir, sizeof(c->state_dir), "/var/lib/kvtier");
	else if (home && *home)
		snprintf(c->state_dir, sizeof(c->state_dir), "%s/.local/state/kvtier", home);
	else
		snprintf(c->state_dir, sizeof(c->state_dir), "/tmp/kvtier-%u/state", geteuid());
	c->socket_mode = 0600;
	c->max_clients = 64;
	c->max_seqs = 1024;
	c->max_batch = 256;
	c->ring_entries = 64;
	c->data_bytes = 16 * MiB;
	c->data_bytes_max = 256 * MiB;
	snprintf(c->device, sizeof(c->device), "auto");
	snprintf(c->disk_full, sizeof(c->disk_full), "refuse");
	snprintf(c->write_policy, sizeof(c->write_policy), "through");
	c->page_bytes = 32 * KiB;
	c->queue_depth = 64;
	snprintf(c->metrics_listen, sizeof(c->metrics_listen), "127.0.0.1:9477");
	c->prefetch = true;
	c->gpu_margin_pct = 100;
	c->host_margin_pct = 200;
	c->max_disk_prefetch = 32;
	c->drift_pct = 100;
	c->wasted_steps = 16;
	c->fast_bytes_max = 4 * GiB;
	c->lease_steps = 8;
	c->fast_promote = true;
	c->fast_warm = true;
	c->fast_disk_reads = 256;
	const long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	c->fast_threads = ncpu >= 8 ? (ncpu / 2 < 8 ? (uint32_t)(ncpu / 2) : 8) : 1;

	/* Sized from the machine: an eighth of RAM for each tenant's host arena and a
	 * sixteenth for the (cpu device's) GPU pool, capped; a quarter of the free disk. */
	long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
	uint64_t ram = pages > 0 && psz > 0 ? (uint64_t)pages * (uint64_t)psz : 4 * GiB;
	c->host_bytes = clamp_u64(ram / 8, 64 * MiB, 32 * GiB);
	c->gpu_bytes = clamp_u64(ram / 16, 32 * MiB, 8 * GiB);
	struct statvfs vfs;
	uint64_t disk = 64 * GiB;
	if (statvfs("/", &vfs) == 0)
		disk = (uint64_t)vfs.f_bavail * vfs.f_frsize;
	c->nvme_bytes = clamp_u64(disk / 4, 256 * MiB, 256 * GiB);
	c->max_tenants = 16;
	c->summary_bytes = 0;
	c->log_level = (uint32_t)kvt_log_get_level();
	c->promote_timeout_ms = 10000;
}

int kvt_parse_size(const char *s, uint64_t *out)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 0);
	if (errno || end == s || *s == '-')
		return -EINVAL;
	unsigned shift = 0;
	switch (*end) {
	case 'k': case 'K': shift = 10; end++; break;
	case 'm': case 'M': shift = 20; end++; break;
	case 'g': case 'G': shift = 30; end++; break;
	case 't': case 'T': shift = 40; end++; break;
	}
	if (*end == 'i' || *end == 'B')
		end += *end == 'i' && end[1] == 'B' ? 2 : 1;
	if (*end)
		return -EINVAL;
	if (shift && v > (UINT64_MAX >> shift))
		return -EINVAL;
	*out = (uint64_t)v << shift;
	return 0;
}

static const struct opt *find(const char *name)
{
	for (size_t i = 0; i < sizeof(opts) / sizeof(opts[0]); i++)
		if (!strcmp(opts[i].name, name))
			return &opts[i];
	return NULL;
}

static int set_opt(struct kvt_config *c, const struct opt *o, const char *v, const char **why)
{
	char *p = (char *)c + o->off;
	uint64_t n = 0;
	char *end;
	switch (o->type) {
	case OPT_STR:
		if (strlen(v) >= o->size) {
			*why = "too long";
			return -EINVAL;
		}
		snprintf(p, o->size, "%s", v);
		return 0;
	case OPT_BOOL:
		if (!strcmp(v, "1") || !strcasecmp(v, "true") || !strcasecmp(v, "yes") ||
		    !strcasecmp(v, "on"))
			*(bool *)p = true;
		else if (!strcmp(v, "0") || !strcasecmp(v, "false") || !strcasecmp(v, "no") ||
			 !strcasecmp(v, "off"))
			*(bool *)p = false;
		else {
			*why = "not a boolean";
			return -EINVAL;
		}
		return 0;
	case OPT_U32:
	case OPT_OCTAL:
		errno = 0;
		n = strtoull(v, &end, o->type == OPT_OCTAL ? 8 : 0);
		if (errno || end == v || *end || *v == '-') {
			*why = "not a number";
			return -EINVAL;
		}
		break;
	case OPT_SIZE:
		if (kvt_parse_size(v, &n) < 0) {
			*why = "not a size";
			return -EINVAL;
		}
		break;
	case OPT_IDS: {
		uint32_t ids[KVT_MAX_ID_LIST], cnt = 0;
		const char *s = v;
		while (*s) {
			while (*s == ' ' || *s == ',')
				s++;
			if (!*s)
				break;
			errno = 0;
			unsigned long long id = strtoull(s, &end, 10);
			if (errno || end == s || id > UINT32_MAX || cnt == KVT_MAX_ID_LIST) {
				*why = "not a list of at most 16 numeric ids";
				return -EINVAL;
			}
			ids[cnt++] = (uint32_t)id;
			s = end;
			if (*s && *s != ',' && *s != ' ') {
				*why = "not a list of at most 16 numeric ids";
				return -EINVAL;
			}
		}
		memcpy(p, ids, cnt * sizeof(uint32_t));
		*(uint32_t *)(p + o->size) = cnt;
		return 0;
	}
	}
	if (n < o->min || n > o->max) {
		*why = "out of bounds";
		return -EINVAL;
	}
	if (o->type == OPT_SIZE)
		*(uint64_t *)p = n;
	else
		*(uint32_t *)p = (uint32_t)n;
	return 0;
}

int kvt_config_set(struct kvt_config *c, const char *name, const char *value, bool running,
		   const char **why)
{
	const char *dummy;
	if (!why)
		why = &dummy;
	*why = NULL;
	const struct opt *o = find(name);
	if (!o) {
		*why = "no such option";
		return -ENOENT;
	}
	if (running && !o->reloadable) {
		*why = "takes effect only at start";
		return -EPERM;
	}
	return set_opt(c, o, value, why);
}

static void format(const struct kvt_config *c, const struct opt *o, char *buf, size_t len)
{
	const char *p = (const char *)c + o->off;
	switch (o->type) {
	case OPT_STR:
		snprintf(buf, len, "%s", p);
		break;
	case OPT_BOOL:
		snprintf(buf, len, "%s", *(const bool *)p ? "true" : "false");
		break;
	case OPT_U32:
		snprintf(buf, len, "%" PRIu32, *(const uint32_t *)p);
		break;
	case OPT_OCTAL:
		snprintf(buf, len, "0%03" PRIo32, *(const uint32_t *)p);
		break;
	case OPT_SIZE: {
		uint64_t v = *(const uint64_t *)p;
		static const char sfx[] = "KMGT";
		int s = -1;
		while (v && v % 1024 == 0 && s < 3) {
			v /= 1024;
			s++;
		}
		if (s >= 0)
			snprintf(buf, len, "%" PRIu64 "%c", v, sfx[s]);
		else
			snprintf(buf, len, "%" PRIu64, v);
		break;
	}
	case OPT_IDS: {
		const uint32_t *ids = (const uint32_t *)p;
		uint32_t cnt = *(const uint32_t *)(p + o->size);
		size_t n = 0;
		buf[0] = 0;
		for (uint32_t i = 0; i < cnt && n < len; i++)
			n += (size_t)snprintf(buf + n, len - n, "%s%" PRIu32, i ? "," : "", ids[i]);
		break;
	}
	}
}

int kvt_config_get(const struct kvt_config *c, const char *name, char *buf, size_t len)
{
	const struct opt *o = find(name);
	if (!o)
		return -ENOENT;
	format(c, o, buf, len);
	return 0;
}

int kvt_config_each(const struct kvt_config *c,
		    int (*fn)(void *arg, const char *name, const char *value, bool reloadable,
			      const char *help),
		    void *arg)
{
	for (size_t i = 0; i < sizeof(opts) / sizeof(opts[0]); i++) {
		char v[512];
		format(c, &opts[i], v, sizeof(v));
		int r = fn(arg, opts[i].name, v, opts[i].reloadable, opts[i].help);
		if (r)
			return r;
	}
	return 0;
}

void kvt_config_dump(const struct kvt_config *c, FILE *f)
{
	const char *section = "";
	for (size_t i = 0; i < sizeof(opts) / sizeof(opts[0]); i++) {
		const char *dot = strchr(opts[i].name, '.');
		size_t sl = (size_t)(dot - opts[i].name);
		if (strncmp(section, opts[i].name, sl) || section[sl] != '.') {
			fprintf(f, "%s[%.*s]\n", i ? "\n" : "", (int)sl, opts[i].name);
			section = opts[i].name;
		}
		char v[512];
		format(c, &opts[i], v, sizeof(v));
		fprintf(f, "%s = %s%*s# %s%s\n", dot + 1, v,
			(int)(28 - (int)strlen(dot + 1) - (int)strlen(v)) > 1
				? 28 - (int)strlen(dot + 1) - (int)strlen(v) : 1,
			"", opts[i].help, opts[i].reloadable ? " (reloadable)" : "");
	}
}

struct load_ctx {
	struct kvt_config *c;
	const char *path;
	bool running;
	int errors;
};

static int on_ini(void *user, const char *section, const char *name, const char *value)
{
	struct load_ctx *l = user;
	char key[128];
	snprintf(key, sizeof(key), "%s.%s", section, name);
	const char *why;
	int ret = kvt_config_set(l->c, key, value, l->running, &why);
	if (ret == -EPERM && l->running)
		return 1; /* start-only options are simply not reloaded */
	if (ret < 0) {
		kvt_err("config", "%s: %s = %s: %s", l->path, key, value, why);
		l->errors++;
	}
	return 1;
}

int kvt_config_load(struct kvt_config *c, const char *path, bool running)
{
	struct load_ctx l = {c, path, running, 0};
	FILE *f = fopen(path, "r");
	if (!f) {
		int err = errno;
		kvt_err("config", "%s: %s", path, strerror(err));
		return -err;
	}
	int ret = ini_parse_file(f, on_ini, &l);
	fclose(f);
	if (ret > 0) {
		kvt_err("config", "%s:%d: not INI", path, ret);
		return -EINVAL;
	}
	if (ret < 0)
		return -EIO;
	return l.errors ? -EINVAL : 0;
}

int kvt_config_reload(struct kvt_config *live, const struct kvt_config *fresh)
{
	int changed = 0;
	for (size_t i = 0; i < sizeof(opts) / sizeof(opts[0]); i++) {
		const struct opt *o = &opts[i];
		if (!o->reloadable)
			continue;
		size_t sz = o->size + (o->type == OPT_IDS ? sizeof(uint32_t) : 0);
		if (memcmp((char *)live + o->off, (const char *)fresh + o->off, sz)) {
			memcpy((char *)live + o->off, (const char *)fresh + o->off, sz);
			char v[512];
			format(live, o, v, sizeof(v));
			kvt_notice("config", "%s = %s", o->name, v);
			changed++;
		}
	}
	return changed;
}
