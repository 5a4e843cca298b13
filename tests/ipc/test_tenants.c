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

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(disk_quota),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
