// SPDX-License-Identifier: MIT
/*
 * The daemon's life, apart from its command line and signals (kvtierd.c): open the
 * store and the compute backend and start serving; one turn of the event loop; stop.
 * The fuzzers (tests/fuzz) run the same daemon in their own process through these.
 */
#include "kvtierd.h"
#include "daemon/log.h"
#include "tiers/device.h"

#include <errno.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int kvd_start(struct kvd *d)
{
	int ret;
	/* Sessions do not outlive the daemon (clients re-attach and re-prefill), so the
	 * pages of the last run are never read again: start from an empty store. */
	struct stat st;
	if (stat(d->cfg.nvme_path, &st) == 0 && S_ISREG(st.st_mode))
		unlink(d->cfg.nvme_path);
	struct kvt_store_params sp = {
		.device = d->cfg.device,
		.nvme_path = d->cfg.nvme_path,
		.nvme_bytes = d->cfg.nvme_bytes,
		.host_bytes = d->cfg.host_bytes,
		.gpu_bytes = d->cfg.gpu_bytes,
		.page_bytes = (uint32_t)d->cfg.page_bytes,
		.queue_depth = d->cfg.queue_depth,
		.disk_full = strcmp(d->cfg.disk_full, "evict") ? KVT_DISKFULL_REFUSE
							      : KVT_DISKFULL_EVICT_SEQ,
		.durable = d->cfg.durable,
		.faults = d->cfg.fault_inject,
	};
	if ((ret = kvt_store_open(&sp, &d->store)) < 0) {
		kvt_err("kvtierd", "store %s: %s", d->cfg.nvme_path, strerror(-ret));
		return ret;
	}
	struct kvt_device *dev = kvt_store_device(d->store);
	const char *backend = (dev->ops->caps & KVT_DEV_CAP_GPU) ? "cuda" : "cpu";
	if ((ret = kvt_compute_open(backend, &d->cc)) < 0) {
		kvt_err("kvtierd", "compute backend %s: %s", backend, strerror(-ret));
		kvt_store_close(d->store);
		return ret;
	}
	d->sseq_next = (uint64_t)time(NULL) << 24;
	d->lsock = -1;
	d->start_ns = kvd_now_ns();
	if ((ret = kvd_ctl_start(d)) < 0 || (ret = kvd_server_start(d)) < 0) {
		kvt_compute_close(d->cc);
		kvt_store_close(d->store);
		kvd_ctl_stop(d);
		return ret;
	}
	return 0;
}

int kvd_iterate(struct kvd *d, int idle_ms)
{
	bool waiting = !kvt_list_empty(&d->zombies);
	struct kvd_client *c;
	kvt_list_for_each_entry(c, &d->clients, link)
		waiting |= c->busy != NULL || c->dead;
	waiting |= kvd_ctl_busy(d);
	int ret = kvt_store_run(d->store, waiting ? (idle_ms < 2 ? idle_ms : 2) : idle_ms);
	kvd_server_tick(d);
	return ret;
}

void kvd_stop(struct kvd *d)
{
	kvd_server_stop(d);
	int ret = kvt_store_flush(d->store);
	if (ret < 0)
		kvt_warn("kvtierd", "write-back at exit: %s", strerror(-ret));
	kvt_compute_close(d->cc);
	kvt_store_close(d->store);
	kvd_ctl_stop(d);
}
