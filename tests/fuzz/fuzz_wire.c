// SPDX-License-Identifier: MIT
/*
 * The control socket's decoder: the input is what a client sends on its connection
 * (message headers, HELLO, PING, STATS, CTL commands and their words, garbage), all of
 * it, then the client half-closes. The daemon must answer or hang up, never crash,
 * leak or hang; the sanitizers watch how it handles the bytes.
 */
#include "fuzz_daemon.h"

#include <errno.h>
#include <sys/socket.h>
#include <unistd.h>

static bool hung_up(void *arg)
{
	return !fz_drain(*(int *)arg);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (fz_daemon_init() < 0)
		__builtin_trap();
	int fd = fz_connect();
	if (fd < 0)
		__builtin_trap();
	size_t off = 0;
	for (int tries = 0; off < size && tries < 1000; tries++) {
		ssize_t n = send(fd, data + off, size - off, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n > 0)
			off += (size_t)n;
		else if (n < 0 && errno != EAGAIN)
			break;
		fz_turn(1, NULL, NULL);
		fz_drain(fd);
	}
	shutdown(fd, SHUT_WR);
	fz_turn(500, hung_up, &fd);
	fz_settle(fd);
	return 0;
}
