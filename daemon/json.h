/* SPDX-License-Identifier: MIT */
#ifndef KVT_JSON_H
#define KVT_JSON_H

/*
 * A growable text buffer and a JSON writer over it, for the control answers and the
 * Prometheus text. The writer places commas itself: inside an object every value
 * takes a key, inside an array key is NULL. An allocation failure sets oom and makes
 * every later call a no-op, so callers check once at the end.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct kvt_buf {
	char *p;
	size_t len, cap;
	bool oom;
};

void kvt_buf_free(struct kvt_buf *b);
void kvt_buf_put(struct kvt_buf *b, const char *s, size_t n);
void kvt_buf_printf(struct kvt_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define KVT_JSON_DEPTH 16

struct kvt_json {
	struct kvt_buf *b;
	int depth;
	bool first[KVT_JSON_DEPTH];
	char close[KVT_JSON_DEPTH];
};

void kvt_json_init(struct kvt_json *j, struct kvt_buf *b);
void kvt_json_obj(struct kvt_json *j, const char *key);  /* { */
void kvt_json_arr(struct kvt_json *j, const char *key);  /* [ */
void kvt_json_end(struct kvt_json *j);                   /* } or ] */
void kvt_json_str(struct kvt_json *j, const char *key, const char *v);
void kvt_json_u64(struct kvt_json *j, const char *key, uint64_t v);
void kvt_json_i64(struct kvt_json *j, const char *key, int64_t v);
void kvt_json_f64(struct kvt_json *j, const char *key, double v); /* NaN, inf: null */
void kvt_json_bool(struct kvt_json *j, const char *key, bool v);
void kvt_json_null(struct kvt_json *j, const char *key);
/* A histogram of log2 buckets: {"unit": .., "buckets": [..], "count", "p50", "p90", "p99"}. */
void kvt_json_hist(struct kvt_json *j, const char *key, const uint64_t *h, unsigned nb,
		   const char *unit);
/* The q-quantile of a log2 histogram (bucket i: [2^i, 2^(i+1))), interpolated inside
 * its bucket; 0 when empty. */
double kvt_hist_quantile(const uint64_t *h, unsigned nb, double q);

#endif
