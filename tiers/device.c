// SPDX-License-Identifier: MIT
#include "device.h"
#include "daemon/log.h"
#include "kvtier_config.h"

#include <errno.h>
#include <string.h>

int kvt_device_open(const char *name, int ordinal, struct kvt_device **out)
{
	if (!name || !strcmp(name, "auto")) {
		if (kvt_device_cuda_ops) {
			int r = kvt_device_cuda_ops->open(out, ordinal);
			if (r == 0)
				return 0;
			kvt_notice("device", "no usable GPU (%s): using the cpu device",
				   strerror(-r));
		}
		return kvt_device_cpu_ops.open(out, ordinal);
	}
	if (!strcmp(name, "cpu"))
		return kvt_device_cpu_ops.open(out, ordinal);
	if (!strcmp(name, "cuda")) {
		if (!kvt_device_cuda_ops) {
			kvt_err("device", "built without CUDA");
			return -ENODEV;
		}
		return kvt_device_cuda_ops->open(out, ordinal);
	}
	kvt_err("device", "unknown device '%s' (auto, cuda, cpu)", name);
	return -EINVAL;
}

void kvt_device_close(struct kvt_device *d)
{
	if (d)
		d->ops->close(d);
}

#if !HAVE_CUDA
const struct kvt_device_ops *const kvt_device_cuda_ops = NULL;
#endif
