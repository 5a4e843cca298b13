/* SPDX-License-Identifier: MIT */
#ifndef KVT_FUZZ_DAEMON_H
#define KVT_FUZZ_DAEMON_H

/*
 * The real daemon in the fuzzer's process (daemon/daemon.c), on the cpu device, a
 * private socket and a small store: each input is fed to it over a real connection
 * and the loop turns until the daemon has answered or hung up.
 */
#include "daemon/kvtierd.h"

extern struct kvd *fz_d;
int fz_daemon_init(void);
/* A new connection to it (nonblocking), or -1. */
int fz_connect(void);
/* Turns the loop (each turn waits up to 1 ms for events) until fn(arg) is true or
 * n turns passed. */
void fz_turn(int n, bool (*fn)(void *), void *arg);
/* Reads and drops what fd has, closing any descriptors passed; false once it hung up. */
bool fz_drain(int fd);
/* After an input: the connection closed and the daemon back to no clients, its
 * reloadable settings as they were (a CTL "config set" may have changed them). */
void fz_settle(int fd);

#endif
