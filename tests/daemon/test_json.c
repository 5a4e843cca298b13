// SPDX-License-Identifier: MIT
/* The control answers' JSON writer and the log2 histograms' quantiles. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "daemon/json.h"
#include "tiers/store.h"

static void test_writer(void **state)
{
	(void)state;
	struct kvt_buf b = {0};
	struct kvt_json j;
	kvt_json_init(&j, &b);
	kvt_json_obj(&j, NULL);
	kvt_json_str(&j, "name", "a \"quoted\" \\ path\n\x01");
	kvt_json_u64(&j, "big", UINT64_MAX);
	kvt_json_i64(&j, "neg", -5);
	kvt_json_f64(&j, "nan", NAN);
	kvt_json_f64(&j, "half", 0.5);
	kvt_json_bool(&j, "yes", true);
	kvt_json_arr(&j, "list");
	kvt_json_u64(&j, NULL, 1);
	kvt_json_obj(&j, NULL);
	kvt_json_end(&j);
	kvt_json_null(&j, NULL);
	kvt_json_end(&j);
	kvt_json_end(&j);
	assert_false(b.oom);
	assert_int_equal(j.depth, 0);
	assert_string_equal(b.p, "{\"name\":\"a \\\"quoted\\\" \\\\ path\\u000a\\u0001\","
				 "\"big\":18446744073709551615,\"neg\":-5,\"nan\":null,"
				 "\"half\":0.5,\"yes\":true,\"list\":[1,{},null]}");
	kvt_buf_free(&b);
	/* closing what was never opened is reported, not written */
	kvt_json_init(&j, &b);
	kvt_json_end(&j);
	assert_true(b.oom);
	kvt_buf_free(&b);
}

static void test_long_printf(void **state)
{
	(void)state;
	struct kvt_buf b = {0};
	char big[5000];
	memset(big, 'x', sizeof(big) - 1);
	big[sizeof(big) - 1] = 0;
	kvt_buf_printf(&b, "<%s>", big);
	assert_int_equal(b.len, sizeof(big) + 1);
	assert_int_equal(b.p[0], '<');
	assert_int_equal(b.p[b.len - 1], '>');
	kvt_buf_free(&b);
}

static void test_hist(void **state)
{
	(void)state;
	assert_int_equal(kvt_hist_bucket(0), 0);
	assert_int_equal(kvt_hist_bucket(1), 0);
	assert_int_equal(kvt_hist_bucket(2), 1);
	assert_int_equal(kvt_hist_bucket(3), 1);
	assert_int_equal(kvt_hist_bucket(1024), 10);
	assert_int_equal(kvt_hist_bucket(UINT64_MAX), KVT_HIST_BUCKETS - 1);
	uint64_t h[KVT_HIST_BUCKETS] = {0};
	assert_true(kvt_hist_quantile(h, KVT_HIST_BUCKETS, 0.5) == 0);
	h[10] = 100; /* 100 values in [1024, 2048) */
	double p50 = kvt_hist_quantile(h, KVT_HIST_BUCKETS, 0.5);
	assert_true(p50 >= 1024 && p50 < 2048);
	h[3] = 100; /* and 100 in [8, 16): the median is at the edge */
	assert_true(kvt_hist_quantile(h, KVT_HIST_BUCKETS, 0.25) < 16);
	assert_true(kvt_hist_quantile(h, KVT_HIST_BUCKETS, 0.99) >= 1024);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_writer),
		cmocka_unit_test(test_long_printf),
		cmocka_unit_test(test_hist),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
