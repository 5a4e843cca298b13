// SPDX-License-Identifier: MIT
/*
 * kvtier-bench-ipc: round trips to a running kvtierd, p50 and p99: a request through
 * the shared-memory ring (NOP: submit, eventfd wake-up, completion) and a control
 * message over the socket (PING/PONG).
 *   kvtier-bench-ipc [socket] [iterations]
 */
#include "ipc/kvtier.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec * 1e-3;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static int run(const char *what, struct kvtier_client *c, int (*fn)(struct kvtier_client *),
	       int n)
{
	double *t = malloc(sizeof(double) * (size_t)n);
	for (int i = 0; i < n / 10; i++) /* warm-up */
		fn(c);
	for (int i = 0; i < n; i++) {
		double t0 = now_us();
		int ret = fn(c);
		t[i] = now_us() - t0;
		if (ret < 0) {
			fprintf(stderr, "%s: %s\n", what, strerror(-ret));
			return 1;
		}
	}
	qsort(t, (size_t)n, sizeof(double), cmp);
	printf("%-28s p50 %7.2f us   p99 %7.2f us   (%d round trips)\n", what, t[n / 2],
	       t[(size_t)n * 99 / 100], n);
	free(t);
	return 0;
}

int main(int argc, char **argv)
{
	struct kvtier_layout l = {2, 2, 2, 64, KVTIER_F16, 64, 0, 0};
	struct kvtier_attach_opts o = {.socket = argc > 1 ? argv[1] : NULL};
	int n = argc > 2 ? atoi(argv[2]) : 100000;
	struct kvtier_client *c;
	int ret = kvtier_attach(&l, &o, &c);
	if (ret < 0) {
		fprintf(stderr, "attach: %s\n", strerror(-ret));
		return 1;
	}
	ret = run("ring request (NOP)", c, kvtier_nop, n) ||
	      run("control message (PING)", c, kvtier_ping, n / 10);
	kvtier_detach(c);
	return ret;
}
