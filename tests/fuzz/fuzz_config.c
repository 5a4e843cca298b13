// SPDX-License-Identifier: MIT
/*
 * The configuration parsers: the input as kvtierd.conf (INI), then each of its lines
 * as "name=value" the way -o and "kvtierctl config set" pass them, as a size, and as
 * a fault-injection spec.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "daemon/config.h"
#include "daemon/log.h"
#include "tiers/tier_fault.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static int fd = -1;
	kvt_log_set_level((enum kvt_log_level)(KVT_LOG_ERR - 1));
	if (fd < 0 && (fd = memfd_create("kvtier-fuzz.conf", MFD_CLOEXEC)) < 0)
		__builtin_trap();
	if (ftruncate(fd, 0) || pwrite(fd, data, size, 0) != (ssize_t)size)
		__builtin_trap();
	char path[64];
	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	struct kvt_config c, fresh;
	kvt_config_defaults(&c);
	kvt_config_load(&c, path, false);
	kvt_config_defaults(&fresh);
	kvt_config_load(&fresh, path, true);
	kvt_config_reload(&c, &fresh);
	char *text = malloc(size + 1);
	memcpy(text, data, size);
	text[size] = 0;
	char *save = NULL;
	for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		char *eq = strchr(line, '=');
		const char *why;
		if (eq) {
			*eq = 0;
			kvt_config_set(&c, line, eq + 1, true, &why);
			char out[600];
			kvt_config_get(&c, line, out, sizeof(out));
			*eq = '=';
		}
		uint64_t v;
		kvt_parse_size(line, &v);
		struct tier_fault_cfg fc;
		tier_fault_parse(line, &fc, &why);
	}
	free(text);
	return 0;
}
