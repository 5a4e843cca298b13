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
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/*
 * Whether another process holds the store (its lock: tier_nvme.c). One killed with
 * the store open holds it until the kernel tears its io_uring down, after its exit:
 * that is allowed a second, as the store's own open does.
 */
static bool store_locked(const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return false;
	bool locked = true;
	for (int i = 0; locked && i < 100; i++) {
		struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
		locked = fcntl(fd, F_OFD_GETLK, &fl) == 0 && fl.l_type != F_UNLCK;
		if (locked)
			usleep(10000);
	}
	close(fd);
	return locked;
}

int kvd_start(struct kvd *d)
{
	int ret;
	d->sseq_next = (uint64_t)time(NULL) << 24;
	int named = kvd_names_load(d);
	if (named < 0)
		return named;
	/* Unnamed sequences do not outlive the daemon (their clients re-attach and
	 * re-prefill): with no named sequence to recover, the pages of the last run are
	 * never read again, and the store starts empty instead of scanning the disk. */
	struct stat st;
	if (!named && stat(d->cfg.nvme_path, &st) == 0 && S_ISREG(st.st_mode) &&
	    !store_locked(d->cfg.nvme_path))
		unlink(d->cfg.nvme_path);
	struct kvt_store_params sp = {
		.device = d->cfg.device,
		.nvme_path = d->cfg.nvme_path,
		.nvme_bytes = d->cfg.nvme_bytes,
		.host_bytes = d->cfg.host_bytes,
		.gpu_bytes = d->cfg.gpu_bytes,
		.page_bytes = (uint32_t)d->cfg.page_bytes,
		.queue_depth = d->cfg.queue_depth,
		.background_depth = d->cfg.background_depth,
		.disk_full = strcmp(d->cfg.disk_full, "evict") ? KVT_DISKFULL_REFUSE
							      : KVT_DISKFULL_EVICT_SEQ,
		.write_policy = strcmp(d->cfg.write_policy, "back") ? KVT_WRITE_THROUGH
								    : KVT_WRITE_BACK,
		.durable = d->cfg.durable,
		.faults = d->cfg.fault_inject,
	};
	if ((ret = kvt_store_open(&sp, &d->store)) < 0) {
		kvt_err("kvtierd", "store %s: %s%s", d->cfg.nvme_path, strerror(-ret),
			named && ret == -EINVAL ? " (it holds named sequences: start with the "
						  "store's page size, or remove it and its journal)"
						: "");
		kvd_names_close(d);
		return ret;
	}
	if ((ret = kvd_names_recover(d)) < 0) {
		kvt_store_close(d->store);
		kvd_names_close(d);
		return ret;
	}
	struct kvt_device *dev = kvt_store_device(d->store);
	const char *backend = (dev->ops->caps & KVT_DEV_CAP_GPU) ? "cuda" : "cpu";
	if ((ret = kvt_compute_open(backend, &d->cc)) < 0) {
		kvt_err("kvtierd", "compute backend %s: %s", backend, strerror(-ret));
		kvt_store_close(d->store);
		kvd_names_close(d);
		return ret;
	}
	if ((ret = kvd_pool_new(d->cfg.fast_threads, &d->pool)) < 0) {
		kvt_err("kvtierd", "fast.threads=%u: %s", d->cfg.fast_threads, strerror(-ret));
		kvt_compute_close(d->cc);
		kvt_store_close(d->store);
		kvd_names_close(d);
		return ret;
	}
	d->lsock = -1;
	d->start_ns = kvd_now_ns();
	if ((ret = kvd_ctl_start(d)) < 0 || (ret = kvd_server_start(d)) < 0) {
		kvd_pool_free(d->pool);
		d->pool = NULL;
		kvt_compute_close(d->cc);
		kvt_store_close(d->store);
		kvd_ctl_stop(d);
		kvd_names_close(d);
		return ret;
	}
	return 0;
}

int kvd_iterate(struct kvd *d, int idle_ms)
{
	bool waiting = !kvt_list_empty(&d->zombies), spin = false;
	struct kvd_client *c;
	kvt_list_for_each_entry(c, &d->clients, link) {
		waiting |= c->busy != NULL || c->dead || c->ndeferred || kvd_fast_waiting(c);
		/* a feedback waits for a kernel of microseconds; a client's stream for an ack */
		spin |= c->nfb != 0 || c->nacks != 0;
	}
	waiting |= kvd_ctl_busy(d);
	d->now_ns = kvd_now_ns();
	int ret = kvt_store_run(d->store, spin ? 0 : waiting ? (idle_ms < 2 ? idle_ms : 2) : idle_ms);
	kvd_server_tick(d);
	return ret;
}

void kvd_stop(struct kvd *d)
{
	kvd_server_stop(d);
	/* Only named sequences outlive the daemon (kvd_start drops the rest): with the
	 * write-back policy and none, the pages only in RAM (most of them) stay unwritten. */
	int ret = 0;
	if (d->nnamed || strcmp(d->cfg.write_policy, "back"))
		ret = kvt_store_flush(d->store);
	if (ret < 0)
		kvt_warn("kvtierd", "write-back at exit: %s", strerror(-ret));
	kvd_pool_free(d->pool);
	d->pool = NULL;
	kvt_compute_close(d->cc);
	kvt_store_close(d->store);
	kvd_ctl_stop(d);
	kvd_names_close(d);
}
