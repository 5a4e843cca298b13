/* SPDX-License-Identifier: MIT */
#ifndef KVT_IPC_PATHS_H
#define KVT_IPC_PATHS_H

#include <stddef.h>

/*
 * The control socket's default path, the same for the daemon and its clients:
 * $XDG_RUNTIME_DIR/kvtier/kvtierd.sock, else /run/kvtier/kvtierd.sock as root, else
 * /tmp/kvtier-<uid>/kvtierd.sock.
 */
void kvt_default_socket(char *buf, size_t len);

#endif
