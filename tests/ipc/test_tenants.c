// SPDX-License-Identifier: MIT
/*
 * Per-tenant disk quotas against a real kvtierd (tenant.disk_quota_bytes): a tenant
 * that reaches its quota gets -EDQUOT and keeps what it has, another tenant is not
 * touched, closing or removing gives the room back, a named sequence's pages count
 * while it is closed and again after a restart.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "reliability/harness.h"

/* 32 pages of 8 KiB: 128 tokens of the suite's model (2 layers x 2 heads x 16-token
 * pages) */
#define QUOTA_TOKENS 128

/* "pages" of tenant `name` in the daemon's stats, or -1. */
static long long tenant_pages(const struct rel_daemon *d, const char *name)
{
	char js[65536], pat[64];
	assert_int_equal(rel_ctl(d->sock, "stats", 6, js, sizeof(js)), 0);
	snprintf(pat, sizeof(pat), "\"name\":\"%s\"", name);
	const char *t = strstr(js, pat), *p = t ? strstr(t, "\"pages\":") : NULL;
	return p ? strtoll(p + 8, NULL, 10) : -1;
}

static void disk_quota(void **state)
{
	(void)state;
	struct rel_daemon d;
	const char *const opts[] = {"tenant.disk_quota_bytes=256K", NULL};
	assert_int_equal(rel_daemon_start(&d, opts, false), 0);
	struct kvtier_client *a = rel_attach(&d, "a", 0), *b = rel_attach(&d, "b", 0);
	assert_non_null(a);
	assert_non_null(b);
	uint32_t sa, sb, tok;
	assert_int_equal(kvtier_seq_create(a, &sa), 0);
	assert_int_equal(rel_append(a, sa, 1, 0, QUOTA_TOKENS), 0);
	assert_int_equal(tenant_pages(&d, "a"), 32);
	/* full: refused, and what it holds is intact */
	assert_int_equal(rel_append(a, sa, 1, QUOTA_TOKENS, REL_T), -EDQUOT);
	assert_int_equal(kvtier_seq_tokens(a, sa, 0, &tok), 0);
	assert_int_equal(tok, QUOTA_TOKENS);
	assert_int_equal(rel_verify(a, sa, 1, NULL), 0);
	/* another tenant has a quota of its own */
	assert_int_equal(kvtier_seq_create(b, &sb), 0);
	assert_int_equal(rel_append(b, sb, 2, 0, QUOTA_TOKENS), 0);
	assert_int_equal(rel_verify(b, sb, 2, NULL), 0);
	/* a close gives the room back */
	assert_int_equal(kvtier_seq_close(a, sa), 0);
	assert_int_equal(tenant_pages(&d, "a"), 0);
	/* a named sequence's pages count while it is closed */
	uint32_t sn;
	assert_int_equal(kvtier_seq_open(a, "big", KVTIER_SEQ_CREATE, &sn, &tok), 0);
	assert_int_equal(rel_append(a, sn, 3, 0, QUOTA_TOKENS), 0);
	assert_int_equal(kvtier_seq_close(a, sn), 0);
	assert_int_equal(tenant_pages(&d, "a"), 32);
	assert_int_equal(kvtier_seq_create(a, &sa), 0);
	assert_int_equal(rel_append(a, sa, 1, 0, REL_T), -EDQUOT);
	kvtier_detach(a);
	kvtier_detach(b);
	/* and after a restart */
	assert_int_equal(rel_daemon_stop(&d), 0);
	assert_int_equal(rel_daemon_start(&d, opts, true), 0);
	a = rel_attach(&d, "a", 0);
	assert_non_null(a);
	assert_int_equal(tenant_pages(&d, "a"), 32);
	assert_int_equal(kvtier_seq_create(a, &sa), 0);
	assert_int_equal(rel_append(a, sa, 1, 0, REL_T), -EDQUOT);
	/* a remove gives it back */
	assert_int_equal(kvtier_seq_remove(a, "big"), 0);
	assert_int_equal(tenant_pages(&d, "a"), 0);
	assert_int_equal(rel_append(a, sa, 1, 0, QUOTA_TOKENS), 0);
	assert_int_equal(rel_verify(a, sa, 1, NULL), 0);
	kvtier_detach(a);
	assert_int_equal(rel_daemon_stop(&d), 0);
	rel_daemon_cleanup(&d);
}

/* A fast-path client of tenant `name` (pages kept here until full, then handed over). */
static struct kvtier_client *attach_fast(const struct rel_daemon *d, const char *name)
{
	struct kvtier_layout lay = {REL_LAYERS, REL_HEADS, REL_GROUP, REL_D, KVTIER_F32, REL_T, 0, 2};
	struct kvtier_attach_opts o = {.socket = d->sock, .tenant = name, .max_live_seqs = 4,
				       .max_context = 16 * REL_T};
	struct kvtier_client *c = NULL;
	assert_int_equal(kvtier_attach(&lay, &o, &c), 0);
	return c;
}

/* One token to layer l of each of n sequences on the fast path: ids[i]'s token tok[i]
 * of salt[i]. */
static int batch_token(struct kvtier_client *c, const uint32_t *ids, const uint32_t *salt,
		       const uint32_t *tok, uint32_t n, uint32_t l)
{
	const size_t row = (size_t)REL_HEADS * REL_D;
	float k[4 * REL_HEADS * REL_D], v[4 * REL_HEADS * REL_D];
	for (uint32_t i = 0; i < n; i++)
		for (uint32_t h = 0; h < REL_HEADS; h++)
			for (uint32_t d = 0; d < REL_D; d++) {
				k[i * row + h * REL_D + d] = rel_kv(salt[i], l, h, tok[i], d, 0);
				v[i * row + h * REL_D + d] = rel_kv(salt[i], l, h, tok[i], d, 1);
			}
	return kvtier_append_batch_async(c, ids, n, l, k, v, NULL);
}

/*
 * On the fast path a filled page goes to the daemon without a wait. Pages it refuses at
 * the quota fail the next append call that reaps them (the layer's next), before that
 * call appends anything: the refused layer ends at the page's start (kvtier_seq_tokens),
 * the other layer keeps its pages, and what the daemon holds reads back intact.
 */
static void quota_in_flight(void **state)
{
	(void)state;
	struct rel_daemon d;
	const char *const opts[] = {"tenant.disk_quota_bytes=256K", NULL};
	assert_int_equal(rel_daemon_start(&d, opts, false), 0);
	struct kvtier_client *c = attach_fast(&d, "q");
	uint32_t ids[2], tok[2] = {7 * REL_T, 0}, n;
	const uint32_t salt[2] = {4, 5};
	for (int i = 0; i < 2; i++)
		assert_int_equal(kvtier_seq_create(c, &ids[i]), 0);
	assert_int_equal(rel_append(c, ids[0], salt[0], 0, 7 * REL_T), 0); /* 28 pages of 32 */
	/* a page of each, every layer: layer 0's 4 pages fit the quota, layer 1's do not */
	for (uint32_t t = 0; t < REL_T; t++) {
		for (uint32_t l = 0; l < REL_LAYERS; l++)
			assert_int_equal(batch_token(c, ids, salt, tok, 2, l), 0);
		tok[0]++;
		tok[1]++;
	}
	assert_int_equal(batch_token(c, ids, salt, tok, 2, 0), 0);
	assert_int_equal(batch_token(c, ids, salt, tok, 2, 1), -EDQUOT);
	const uint32_t want[2][REL_LAYERS] = {{8 * REL_T + 1, 7 * REL_T}, {REL_T + 1, 0}};
	for (int i = 0; i < 2; i++)
		for (uint32_t l = 0; l < REL_LAYERS; l++) {
			assert_int_equal(kvtier_seq_tokens(c, ids[i], l, &n), 0);
			assert_int_equal(n, want[i][l]);
		}
	assert_int_equal(tenant_pages(&d, "q"), 32);
	/* room again (the other sequence closed): the refused tokens sent again, from
	 * where the layer ends, and one more; then every page of both layers reads back */
	assert_int_equal(kvtier_seq_close(c, ids[1]), 0);
	for (uint32_t t = 7 * REL_T; t <= 8 * REL_T; t++)
		assert_int_equal(batch_token(c, ids, salt, &t, 1, 1), 0);
	assert_int_equal(kvtier_seq_tokens(c, ids[0], 1, &n), 0);
	assert_int_equal(n, 8 * REL_T + 1);
	assert_int_equal(tenant_pages(&d, "q"), 32);
	unsigned checked = 0;
	assert_int_equal(rel_verify(c, ids[0], salt[0], &checked), 0);
	assert_int_equal(checked, 8 * REL_LAYERS * REL_HEADS);
	kvtier_detach(c);
	assert_int_equal(rel_daemon_stop(&d), 0);
	rel_daemon_cleanup(&d);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(disk_quota),
		cmocka_unit_test(quota_in_flight),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
