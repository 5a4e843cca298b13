// SPDX-License-Identifier: MIT
/*
 * Named sequences: the ones a client opens by name (kvtier_seq_open) and finds again
 * after it detached, after the daemon stopped and after the daemon was killed. Their
 * pages are in the store like any other (every full page is written back to NVMe);
 * what survives the daemon besides them is this journal: one fixed-size record per
 * name made or removed, each with its own checksum, appended and fdatasync'ed before
 * the client hears of it. At start the journal is read (a torn last record is what a
 * kill during its write leaves: it is ignored), rewritten with only the live names,
 * and the store's scan of the disk is matched against it: each named sequence keeps
 * the longest prefix of pages complete in every layer and head; every other page
 * (unnamed sequences, pages past a write that never completed) is dropped, so that
 * nothing half-written is ever served.
 */
#include "kvtierd.h"
#include "daemon/alloc.h"
#include "daemon/log.h"
#include "tiers/page_hash.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define NAMES_MAGIC 0x31454d414e54564bull /* "KVTNAME1" */

enum { REC_MADE = 1, REC_REMOVED = 2, REC_CUT = 3 };

struct names_rec {
	uint64_t magic;
	uint32_t kind;
	uint32_t tenant;
	uint32_t uid;
	uint32_t name_len;
	uint64_t sseq;
	struct kvt_wire_layout layout;
	char tname[KVT_TENANT_NAME_MAX];
	char name[KVT_SEQ_NAME_MAX];
	uint64_t cut_keep, cut_epoch; /* REC_CUT: struct kvd_cut */
	uint64_t pad;
	uint64_t csum; /* XXH3 of everything before it */
};
_Static_assert(sizeof(struct names_rec) == 256, "journal format");

static uint64_t rec_csum(const struct names_rec *r)
{
	return kvt_page_hash(NAMES_MAGIC, r, offsetof(struct names_rec, csum), NULL, 0);
}

static void rec_fill(struct names_rec *r, uint32_t kind, const struct kvd_named *n)
{
	memset(r, 0, sizeof(*r));
	r->magic = NAMES_MAGIC;
	r->kind = kind;
	r->tenant = n->tenant;
	r->uid = (uint32_t)n->uid;
	r->name_len = (uint32_t)strlen(n->name);
	r->sseq = n->sseq;
	r->layout = n->layout;
	memcpy(r->tname, n->tname, sizeof(r->tname));
	memcpy(r->name, n->name, r->name_len);
	r->csum = rec_csum(r);
}

static bool rec_ok(const struct names_rec *r)
{
	return r->magic == NAMES_MAGIC && r->csum == rec_csum(r) &&
	       (r->kind == REC_MADE || r->kind == REC_REMOVED || r->kind == REC_CUT) && r->name_len &&
	       r->name_len <= KVT_SEQ_NAME_MAX && r->tname[KVT_TENANT_NAME_MAX - 1] == 0 &&
	       (r->sseq >> 63);
}

static int write_full(int fd, const void *p, size_t n)
{
	const uint8_t *b = p;
	while (n) {
		ssize_t w = write(fd, b, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return w < 0 ? -errno : -EIO;
		b += w;
		n -= (size_t)w;
	}
	return 0;
}

/* ---- the registry ---- */

struct kvd_named *kvd_named_find(struct kvd *d, uint32_t tenant, const char *name)
{
	for (uint32_t i = 0; i < d->nnamed; i++)
		if (d->named[i]->tenant == tenant && !strcmp(d->named[i]->name, name))
			return d->named[i];
	return NULL;
}

static struct kvd_named *find_sseq(struct kvd *d, uint32_t tenant, uint64_t sseq)
{
	for (uint32_t i = 0; i < d->nnamed; i++)
		if (d->named[i]->sseq == sseq && d->named[i]->tenant == tenant)
			return d->named[i];
	return NULL;
}

static int named_add(struct kvd *d, struct kvd_named *n)
{
	if (d->nnamed == d->named_cap) {
		uint32_t nc = d->named_cap ? d->named_cap * 2 : 16;
		struct kvd_named **p = kvt_realloc(d->named, nc * sizeof(*p));
		if (!p)
			return -ENOMEM;
		d->named = p;
		d->named_cap = nc;
	}
	d->named[d->nnamed++] = n;
	return 0;
}

static void named_free(struct kvd_named *n)
{
	kvt_free(n->cuts);
	kvt_free(n);
}

static void named_forget(struct kvd *d, struct kvd_named *n)
{
	for (uint32_t i = 0; i < d->nnamed; i++) {
		if (d->named[i] != n)
			continue;
		d->named[i] = d->named[--d->nnamed];
		named_free(n);
		return;
	}
}

static int cut_add(struct kvd_named *n, uint32_t keep, uint64_t epoch)
{
	struct kvd_cut *c = kvt_realloc(n->cuts, (n->ncuts + 1) * sizeof(*c));
	if (!c)
		return -ENOMEM;
	n->cuts = c;
	n->cuts[n->ncuts++] = (struct kvd_cut){keep, epoch};
	return 0;
}

static int journal(struct kvd *d, uint32_t kind, const struct kvd_named *n,
		   const struct kvd_cut *cut)
{
	struct names_rec r;
	rec_fill(&r, kind, n);
	if (cut) {
		r.cut_keep = cut->keep;
		r.cut_epoch = cut->epoch;
		r.csum = rec_csum(&r);
	}
	int ret = d->names_fd < 0 ? -EBADF : write_full(d->names_fd, &r, sizeof(r));
	if (ret == 0 && fdatasync(d->names_fd) < 0)
		ret = -errno;
	if (ret < 0)
		kvt_err("names", "journal %s: %s", d->names_path, strerror(-ret));
	return ret;
}

int kvd_named_create(struct kvd *d, const struct kvd_tenant *t, const char *name,
		     const struct kvt_wire_layout *layout, struct kvd_named **out)
{
	struct kvd_named *n = kvt_calloc(1, sizeof(*n));
	if (!n)
		return -ENOMEM;
	/* bit 63 keeps named store sequences apart from unnamed ones, and the clock-based
	 * counter keeps a removed name's sequence from ever coming back */
	n->sseq = (1ull << 63) | d->sseq_next++;
	n->tenant = t->id;
	n->uid = t->uid;
	memcpy(n->tname, t->name, sizeof(n->tname));
	snprintf(n->name, sizeof(n->name), "%s", name);
	n->layout = *layout;
	int ret = named_add(d, n);
	if (ret == 0 && (ret = journal(d, REC_MADE, n, NULL)) < 0)
		d->nnamed--; /* unknown to anyone: the record may be torn, never matched */
	if (ret < 0) {
		kvt_free(n);
		return ret;
	}
	*out = n;
	return 0;
}

int kvd_named_remove(struct kvd *d, struct kvd_named *n)
{
	int ret = journal(d, REC_REMOVED, n, NULL);
	if (ret < 0)
		return ret;
	named_forget(d, n);
	return 0;
}

/* ---- the journal at start ---- */

static void names_path(struct kvd *d)
{
	if (d->cfg.names_path[0]) {
		snprintf(d->names_path, sizeof(d->names_path), "%s", d->cfg.names_path);
		return;
	}
	struct stat st;
	if (stat(d->cfg.nvme_path, &st) == 0 && S_ISBLK(st.st_mode)) {
		char tmp[sizeof(d->cfg.nvme_path)];
		snprintf(tmp, sizeof(tmp), "%s", d->cfg.nvme_path);
		snprintf(d->names_path, sizeof(d->names_path), "%s/%s.names", d->cfg.state_dir,
			 basename(tmp));
		return;
	}
	snprintf(d->names_path, sizeof(d->names_path), "%s.names", d->cfg.nvme_path);
}

/* Writes the live names to a new journal and puts it in place of the old one. */
static int compact(struct kvd *d)
{
	char tmp[sizeof(d->names_path) + 8];
	snprintf(tmp, sizeof(tmp), "%s.new", d->names_path);
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0)
		return -errno;
	int ret = 0;
	for (uint32_t i = 0; i < d->nnamed && !ret; i++) {
		const struct kvd_named *n = d->named[i];
		struct names_rec r;
		rec_fill(&r, REC_MADE, n);
		ret = write_full(fd, &r, sizeof(r));
		for (uint32_t c = 0; c < n->ncuts && !ret; c++) {
			rec_fill(&r, REC_CUT, n);
			r.cut_keep = n->cuts[c].keep;
			r.cut_epoch = n->cuts[c].epoch;
			r.csum = rec_csum(&r);
			ret = write_full(fd, &r, sizeof(r));
		}
	}
	if (!ret && fsync(fd) < 0)
		ret = -errno;
	close(fd);
	if (!ret && rename(tmp, d->names_path) < 0)
		ret = -errno;
	if (ret) {
		unlink(tmp);
		return ret;
	}
	char dir[sizeof(d->names_path)];
	snprintf(dir, sizeof(dir), "%s", d->names_path);
	int dfd = open(dirname(dir), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd >= 0) {
		fsync(dfd);
		close(dfd);
	}
	return 0;
}

int kvd_names_load(struct kvd *d)
{
	d->names_fd = -1;
	names_path(d);
	int fd = open(d->names_path, O_RDONLY | O_CLOEXEC);
	if (fd < 0 && errno != ENOENT) {
		kvt_err("names", "journal %s: %s", d->names_path, strerror(errno));
		return -errno;
	}
	uint64_t recs = 0;
	while (fd >= 0) {
		struct names_rec r;
		ssize_t got = read(fd, &r, sizeof(r));
		if (got == 0)
			break;
		if (got != (ssize_t)sizeof(r) || !rec_ok(&r)) {
			/* A kill during an append leaves a torn last record; anything else bad
			 * is corruption: either way nothing after it is trusted. */
			d->recovery.journal_bad++;
			kvt_warn("names", "journal %s: record %llu %s: ignored from there", d->names_path,
				 (unsigned long long)recs, got < 0 ? strerror(errno) : "torn or corrupt");
			break;
		}
		recs++;
		char name[KVT_SEQ_NAME_MAX + 1] = {0};
		memcpy(name, r.name, r.name_len);
		struct kvd_named *n = find_sseq(d, r.tenant, r.sseq);
		if (r.kind == REC_REMOVED) {
			if (n)
				named_forget(d, n);
			continue;
		}
		if (r.kind == REC_CUT) {
			if (n && (r.cut_keep > UINT32_MAX ||
				  cut_add(n, (uint32_t)r.cut_keep, r.cut_epoch) < 0)) {
				close(fd);
				return -ENOMEM;
			}
			continue;
		}
		if (n || kvd_named_find(d, r.tenant, name))
			continue; /* a second record of one name: the first stands */
		if (!(n = kvt_calloc(1, sizeof(*n))) || named_add(d, n) < 0) {
			kvt_free(n);
			close(fd);
			return -ENOMEM;
		}
		n->sseq = r.sseq;
		n->tenant = r.tenant;
		n->uid = (uid_t)r.uid;
		memcpy(n->tname, r.tname, sizeof(n->tname));
		memcpy(n->name, name, sizeof(n->name));
		n->layout = r.layout;
		if ((r.sseq & ~(1ull << 63)) >= d->sseq_next)
			d->sseq_next = (r.sseq & ~(1ull << 63)) + 1;
	}
	if (fd >= 0)
		close(fd);
	if (recs)
		kvt_notice("names", "journal %s: %llu records, %u named sequences", d->names_path,
			   (unsigned long long)recs, d->nnamed);
	return (int)d->nnamed;
}

void kvd_names_close(struct kvd *d)
{
	for (uint32_t i = 0; i < d->nnamed; i++)
		named_free(d->named[i]);
	kvt_free(d->named);
	d->named = NULL;
	d->nnamed = d->named_cap = 0;
	if (d->names_fd >= 0)
		close(d->names_fd);
	d->names_fd = -1;
}

/* ---- matching the store's scan ---- */

struct pair {
	uint32_t tenant;
	uint64_t seq;
};

struct pairs {
	struct pair *p;
	size_t n, cap;
};

static int collect_pair(void *arg, const struct page_key *k, const struct kvt_page_info *pi)
{
	(void)pi;
	struct pairs *ps = arg;
	if (ps->n && ps->p[ps->n - 1].seq == k->seq && ps->p[ps->n - 1].tenant == k->tenant)
		return 0;
	if (ps->n == ps->cap) {
		size_t nc = ps->cap ? ps->cap * 2 : 256;
		struct pair *p = kvt_realloc(ps->p, nc * sizeof(*p));
		if (!p)
			return -ENOMEM;
		ps->p = p;
		ps->cap = nc;
	}
	ps->p[ps->n++] = (struct pair){k->tenant, k->seq};
	return 0;
}

static int pair_cmp(const void *a, const void *b)
{
	const struct pair *x = a, *y = b;
	if (x->tenant != y->tenant)
		return x->tenant < y->tenant ? -1 : 1;
	return x->seq < y->seq ? -1 : x->seq > y->seq;
}

struct cut {
	uint32_t keep;
	struct page_key *k;
	size_t n, cap;
	int err;
};

static int collect_cut(void *arg, const struct page_key *k, const struct kvt_page_info *pi)
{
	(void)pi;
	struct cut *c = arg;
	if (k->index < c->keep)
		return 0;
	if (c->n == c->cap) {
		size_t nc = c->cap ? c->cap * 2 : 64;
		struct page_key *p = kvt_realloc(c->k, nc * sizeof(*p));
		if (!p)
			return c->err = -ENOMEM;
		c->k = p;
		c->cap = nc;
	}
	c->k[c->n++] = *k;
	return 0;
}

static uint64_t cut_pages(struct kvd *d, const struct kvd_named *n, uint32_t keep)
{
	struct cut c = {.keep = keep};
	kvt_store_foreach(d->store, n->tenant, n->sseq, collect_cut, &c);
	if (c.err)
		kvt_warn("names", "\"%s\": cut at page %u: %s", n->name, keep, strerror(-c.err));
	uint64_t dropped = 0;
	for (size_t i = 0; i < c.n; i++) {
		int ret = kvt_store_drop_page(d->store, &c.k[i]);
		if (ret == 0)
			dropped++;
		else
			kvt_warn("names", "\"%s\": drop of page %u (layer %u head %u): %s", n->name,
				 c.k[i].index, c.k[i].layer, c.k[i].kv_head, strerror(-ret));
	}
	kvt_free(c.k);
	return dropped;
}

uint64_t kvd_named_cut(struct kvd *d, struct kvd_named *n, uint32_t keep)
{
	uint64_t dropped = cut_pages(d, n, keep);
	if (!dropped)
		return 0;
	/* Their disk copies are wiped in the background: until that lands, a crash
	 * leaves them on disk, so the next start must know them for dropped ones. */
	struct kvd_cut cut = {keep, kvt_store_epoch(d->store)};
	if (cut_add(n, cut.keep, cut.epoch) < 0 || journal(d, REC_CUT, n, &cut) < 0)
		kvt_warn("names", "\"%s\": cut at page %u not journaled: a crash before the wipes "
			 "land could bring dropped pages back", n->name, keep);
	return dropped;
}

/* Full pages of every (layer, head), from 0 up to the first one missing anywhere, or
 * left from before a cut at or below its index. */
static uint32_t complete_prefix(struct kvd *d, const struct kvd_named *n)
{
	const struct kvt_wire_layout *l = &n->layout;
	const uint32_t bytes = 2u * l->page_tokens * l->head_dim * kvt_dtype_size(l->dtype);
	if (!l->layers || !l->kv_heads || !bytes)
		return 0; /* no layout a client could attach with */
	for (uint32_t i = 0;; i++)
		for (uint32_t layer = 0; layer < l->layers; layer++)
			for (uint32_t h = 0; h < l->kv_heads; h++) {
				struct page_key k = {.tenant = n->tenant, .layer = (uint16_t)layer,
						     .kv_head = (uint16_t)h, .seq = n->sseq,
						     .index = i};
				struct kvt_page_info pi;
				if (kvt_store_page_info(d->store, &k, &pi) < 0 || pi.len != bytes)
					return i;
				for (uint32_t c = 0; c < n->ncuts; c++)
					if (i >= n->cuts[c].keep && pi.epoch <= n->cuts[c].epoch)
						return i;
			}
}

int kvd_names_recover(struct kvd *d)
{
	/* Every page whose sequence has no name is of a session that died with the daemon
	 * that served it: nobody can ask for it again. */
	struct pairs ps = {0};
	if (kvt_store_foreach(d->store, UINT32_MAX, UINT64_MAX, collect_pair, &ps) < 0)
		kvt_warn("names", "listing the store: out of memory; pages of unnamed sequences kept "
			 "until the next start");
	if (ps.n)
		qsort(ps.p, ps.n, sizeof(*ps.p), pair_cmp);
	for (size_t i = 0; i < ps.n; i++) {
		if (i && !pair_cmp(&ps.p[i], &ps.p[i - 1]))
			continue;
		if (find_sseq(d, ps.p[i].tenant, ps.p[i].seq))
			continue;
		struct cut c = {.keep = 0};
		kvt_store_foreach(d->store, ps.p[i].tenant, ps.p[i].seq, collect_cut, &c);
		kvt_free(c.k);
		if (kvt_store_drop_seq(d->store, ps.p[i].tenant, ps.p[i].seq) == 0)
			d->recovery.unnamed_pages += c.n;
	}
	kvt_free(ps.p);

	const uint64_t epoch = kvt_store_epoch(d->store);
	for (uint32_t i = 0; i < d->nnamed;) {
		struct kvd_named *n = d->named[i];
		struct kvd_tenant *t = n->tenant < d->cfg.max_tenants ? &d->tenants[n->tenant] : NULL;
		if (!t || (t->reserved && (t->uid != n->uid || strcmp(t->name, n->tname)))) {
			kvt_warn("names", "\"%s\": tenant id %u is %s: its pages dropped", n->name,
				 n->tenant, t ? "another tenant's" : "past tenants.max");
			cut_pages(d, n, 0);
			named_forget(d, n);
			continue;
		}
		n->pages = complete_prefix(d, n);
		d->recovery.cut_pages += cut_pages(d, n, n->pages);
		/* Every page now on disk past the prefix is one just dropped: one cut at the
		 * store's epoch says so for all of them, the older cuts included. */
		kvt_free(n->cuts);
		n->cuts = NULL;
		n->ncuts = 0;
		if (cut_add(n, n->pages, epoch) < 0)
			return -ENOMEM;
		uint64_t pages = (uint64_t)n->pages * n->layout.layers * n->layout.kv_heads;
		t->reserved = true;
		t->id = n->tenant;
		t->uid = n->uid;
		memcpy(t->name, n->tname, sizeof(t->name));
		t->disk_pages += pages;
		d->recovery.seqs++;
		d->recovery.pages += pages;
		i++;
	}
	/* The journal now names only what is kept, and the cuts as they stand. */
	int ret = compact(d);
	if (ret == 0 && (d->names_fd = open(d->names_path, O_WRONLY | O_APPEND | O_CLOEXEC)) < 0)
		ret = -errno;
	if (ret < 0) {
		kvt_err("names", "journal %s: %s", d->names_path, strerror(-ret));
		return ret;
	}
	if (!d->nnamed && !d->recovery.unnamed_pages)
		return 0;
	struct kvt_store_stats st;
	kvt_store_stats(d->store, &st);
	kvt_notice("names", "recovered %llu named sequences, %llu pages; dropped %llu pages of "
		   "unnamed sequences, %llu past an incomplete page; %llu bad on disk",
		   (unsigned long long)d->recovery.seqs, (unsigned long long)d->recovery.pages,
		   (unsigned long long)d->recovery.unnamed_pages,
		   (unsigned long long)d->recovery.cut_pages, (unsigned long long)st.recovered_bad);
	return 0;
}
