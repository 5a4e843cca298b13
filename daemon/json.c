// SPDX-License-Identifier: MIT
#include "json.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void kvt_buf_free(struct kvt_buf *b)
{
	free(b->p);
	*b = (struct kvt_buf){0};
}

static bool reserve(struct kvt_buf *b, size_t n)
{
	if (b->oom)
		return false;
	if (b->len + n + 1 <= b->cap)
		return true;
	size_t cap = b->cap ? b->cap : 4096;
	while (cap < b->len + n + 1)
		cap *= 2;
	char *p = realloc(b->p, cap); /* libc: the metrics endpoint hands it to libmicrohttpd */
	if (!p) {
		b->oom = true;
		return false;
	}
	b->p = p;
	b->cap = cap;
	return true;
}

void kvt_buf_put(struct kvt_buf *b, const char *s, size_t n)
{
	if (!n || !reserve(b, n))
		return;
	memcpy(b->p + b->len, s, n);
	b->len += n;
	b->p[b->len] = 0;
}

void kvt_buf_printf(struct kvt_buf *b, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	char small[256];
	int n = vsnprintf(small, sizeof(small), fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n < sizeof(small)) {
		kvt_buf_put(b, small, (size_t)n);
		return;
	}
	if (!reserve(b, (size_t)n))
		return;
	va_start(ap, fmt);
	vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
	va_end(ap);
	b->len += (size_t)n;
}

void kvt_json_init(struct kvt_json *j, struct kvt_buf *b)
{
	*j = (struct kvt_json){.b = b, .depth = 0};
	j->first[0] = true;
}

static void quoted(struct kvt_buf *b, const char *s)
{
	kvt_buf_put(b, "\"", 1);
	for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
		if (*p == '"' || *p == '\\') {
			char e[2] = {'\\', (char)*p};
			kvt_buf_put(b, e, 2);
		} else if (*p < 0x20) {
			kvt_buf_printf(b, "\\u%04x", *p);
		} else {
			kvt_buf_put(b, (const char *)p, 1);
		}
	}
	kvt_buf_put(b, "\"", 1);
}

static void key(struct kvt_json *j, const char *k)
{
	if (!j->first[j->depth])
		kvt_buf_put(j->b, ",", 1);
	j->first[j->depth] = false;
	if (k) {
		quoted(j->b, k);
		kvt_buf_put(j->b, ":", 1);
	}
}

static void open_(struct kvt_json *j, const char *k, char c)
{
	key(j, k);
	kvt_buf_put(j->b, &c, 1);
	if (j->depth + 1 >= KVT_JSON_DEPTH) {
		j->b->oom = true; /* too deep: a bug, reported as a failure */
		return;
	}
	j->depth++;
	j->first[j->depth] = true;
	j->close[j->depth] = c == '{' ? '}' : ']';
}

void kvt_json_obj(struct kvt_json *j, const char *k) { open_(j, k, '{'); }
void kvt_json_arr(struct kvt_json *j, const char *k) { open_(j, k, '['); }

void kvt_json_end(struct kvt_json *j)
{
	if (!j->depth) {
		j->b->oom = true; /* unbalanced: a bug, reported as a failure */
		return;
	}
	kvt_buf_put(j->b, &j->close[j->depth], 1);
	j->depth--;
}

void kvt_json_str(struct kvt_json *j, const char *k, const char *v)
{
	key(j, k);
	quoted(j->b, v ? v : "");
}

void kvt_json_u64(struct kvt_json *j, const char *k, uint64_t v)
{
	key(j, k);
	kvt_buf_printf(j->b, "%llu", (unsigned long long)v);
}

void kvt_json_i64(struct kvt_json *j, const char *k, int64_t v)
{
	key(j, k);
	kvt_buf_printf(j->b, "%lld", (long long)v);
}

void kvt_json_f64(struct kvt_json *j, const char *k, double v)
{
	key(j, k);
	if (isfinite(v))
		kvt_buf_printf(j->b, "%.6g", v);
	else
		kvt_buf_put(j->b, "null", 4);
}

void kvt_json_bool(struct kvt_json *j, const char *k, bool v)
{
	key(j, k);
	kvt_buf_put(j->b, v ? "true" : "false", v ? 4 : 5);
}

void kvt_json_null(struct kvt_json *j, const char *k)
{
	key(j, k);
	kvt_buf_put(j->b, "null", 4);
}

double kvt_hist_quantile(const uint64_t *h, unsigned nb, double q)
{
	uint64_t n = 0;
	for (unsigned i = 0; i < nb; i++)
		n += h[i];
	if (!n)
		return 0;
	double want = q * (double)n, seen = 0;
	for (unsigned i = 0; i < nb; i++) {
		if (!h[i])
			continue;
		if (seen + (double)h[i] >= want) {
			double lo = i ? ldexp(1, (int)i) : 0, hi = ldexp(1, (int)i + 1);
			return lo + (hi - lo) * ((want - seen) / (double)h[i]);
		}
		seen += (double)h[i];
	}
	return ldexp(1, (int)nb);
}

void kvt_json_hist(struct kvt_json *j, const char *k, const uint64_t *h, unsigned nb,
		   const char *unit)
{
	uint64_t n = 0;
	unsigned last = 0;
	for (unsigned i = 0; i < nb; i++) {
		n += h[i];
		if (h[i])
			last = i + 1;
	}
	kvt_json_obj(j, k);
	kvt_json_str(j, "unit", unit);
	kvt_json_u64(j, "count", n);
	kvt_json_f64(j, "p50", kvt_hist_quantile(h, nb, 0.50));
	kvt_json_f64(j, "p90", kvt_hist_quantile(h, nb, 0.90));
	kvt_json_f64(j, "p99", kvt_hist_quantile(h, nb, 0.99));
	kvt_json_arr(j, "log2_buckets"); /* [2^i, 2^(i+1)) units; trailing zeros left out */
	for (unsigned i = 0; i < last; i++)
		kvt_json_u64(j, NULL, h[i]);
	kvt_json_end(j);
	kvt_json_end(j);
}
