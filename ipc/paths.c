// SPDX-License-Identifier: MIT
#include "paths.h"

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

void kvt_default_socket(char *buf, size_t len)
{
	const char *run = getenv("XDG_RUNTIME_DIR");
	if (run && *run)
		snprintf(buf, len, "%s/kvtier/kvtierd.sock", run);
	else if (geteuid() == 0)
		snprintf(buf, len, "/run/kvtier/kvtierd.sock");
	else
		snprintf(buf, len, "/tmp/kvtier-%u/kvtierd.sock", (unsigned)geteuid());
}
