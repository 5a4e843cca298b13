// SPDX-License-Identifier: MIT
#include "log.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static _Atomic int log_level = -1;

static int level_from_env(void)
{
	const char *s = getenv("KVT_LOG_LEVEL");
	if (!s || !*s)
		return KVT_LOG_NOTICE;
	int v = atoi(s);
	return v < KVT_LOG_ERR ? KVT_LOG_ERR : v > KVT_LOG_DEBUG ? KVT_LOG_DEBUG : v;
}

void kvt_log_set_level(enum kvt_log_level lvl)
{
	atomic_store(&log_level, (int)lvl);
}

enum kvt_log_level kvt_log_get_level(void)
{
	int v = atomic_load(&log_level);
	if (v < 0) {
		v = level_from_env();
		atomic_store(&log_level, v);
	}
	return (enum kvt_log_level)v;
}

void kvt_log(enum kvt_log_level lvl, const char *sys, const char *fmt, ...)
{
	if ((int)lvl > (int)kvt_log_get_level())
		return;
	char line[1024];
	int n = snprintf(line, sizeof(line), "<%d>%s: ", (int)lvl, sys);
	va_list ap;
	va_start(ap, fmt);
	int m = vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
	va_end(ap);
	if (m < 0)
		m = 0;
	size_t len = (size_t)n + (size_t)m;
	if (len > sizeof(line) - 2)
		len = sizeof(line) - 2;
	line[len++] = '\n';
	/* One write per line so lines of several threads never interleave. */
	ssize_t r = write(STDERR_FILENO, line, len);
	(void)r;
}
