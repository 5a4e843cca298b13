// SPDX-License-Identifier: MIT
/*
 * kvtierd: keeps the KV caches of inference processes in GPU HBM, pinned host RAM and
 * NVMe, and serves their selections. Runs with no configuration at all; see
 * `kvtierd --help` and `kvtierd --dump-config`.
 */
#include "kvtierd.h"
#include "daemon/alloc.h"
#include "daemon/log.h"
#include "kvtier_config.h"
#include "tiers/device.h"

#include <errno.h>
#include <execinfo.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t got_term, got_hup;

/*
 * A crash (a bug: nothing a client or a disk does may cause one) leaves its stack in
 * the log before the default action (a core where enabled) runs: only async-signal-
 * safe calls here. Addresses resolve with addr2line -e kvtierd.
 */
static __attribute__((unused)) void on_crash(int sig)
{
	static const char head[] = "<2>kvtierd: crashed, stack:\n";
	void *frames[64];
	if (write(2, head, sizeof(head) - 1) < 0) {
		/* nothing more to do */
	}
	int n = backtrace(frames, 64);
	backtrace_symbols_fd(frames, n, 2);
	signal(sig, SIG_DFL);
	raise(sig);
}

static void on_signal(int sig)
{
	if (sig == SIGHUP)
		got_hup = 1;
	else
		got_term = 1;
}

static void usage(FILE *f)
{
	fprintf(f,
		"usage: kvtierd [options]\n"
		"  -c, --config FILE     read options from an INI file (default: the first of\n"
		"                        $XDG_CONFIG_HOME/kvtier/kvtierd.conf, /etc/kvtier/kvtierd.conf)\n"
		"  -o, --set NAME=VALUE  set one option (after the file; repeatable)\n"
		"      --socket PATH     same as -o ipc.socket=PATH\n"
		"      --state-dir DIR   same as -o store.state_dir=DIR\n"
		"      --device NAME     same as -o store.device=NAME (auto, cuda, cpu)\n"
		"      --dump-config     print every option with its value and exit\n"
		"  -V, --version\n"
		"  -h, --help\n"
		"Signals: SIGTERM/SIGINT stop (in-flight I/O finished, dirty pages written back);\n"
		"SIGHUP re-reads the config file and applies the reloadable options.\n");
}

static int mkdirs(const char *path, mode_t mode)
{
	char p[256];
	snprintf(p, sizeof(p), "%s", path);
	for (char *s = p + 1; *s; s++) {
		if (*s != '/')
			continue;
		*s = 0;
		if (mkdir(p, mode) < 0 && errno != EEXIST)
			return -errno;
		*s = '/';
	}
	if (mkdir(p, mode) < 0 && errno != EEXIST)
		return -errno;
	return 0;
}

static const char *default_config_file(char *buf, size_t len)
{
	const char *x = getenv("XDG_CONFIG_HOME");
	const char *home = getenv("HOME");
	if (x && *x)
		snprintf(buf, len, "%s/kvtier/kvtierd.conf", x);
	else if (home && *home)
		snprintf(buf, len, "%s/.config/kvtier/kvtierd.conf", home);
	else
		buf[0] = 0;
	if (buf[0] && access(buf, R_OK) == 0)
		return buf;
	if (access("/etc/kvtier/kvtierd.conf", R_OK) == 0)
		return "/etc/kvtier/kvtierd.conf";
	return NULL;
}

static int apply_sets(struct kvt_config *c, char **sets, int n)
{
	for (int i = 0; i < n; i++) {
		char *eq = strchr(sets[i], '=');
		if (!eq) {
			fprintf(stderr, "kvtierd: -o %s: expected NAME=VALUE\n", sets[i]);
			return -EINVAL;
		}
		*eq = 0;
		const char *why;
		int ret = kvt_config_set(c, sets[i], eq + 1, false, &why);
		*eq = '=';
		if (ret < 0) {
			fprintf(stderr, "kvtierd: %s: %s\n", sets[i], why);
			return ret;
		}
	}
	return 0;
}

static void reload(struct kvd *d, char **sets, int nsets)
{
	struct kvt_config fresh;
	kvt_config_defaults(&fresh);
	if (d->config_path && kvt_config_load(&fresh, d->config_path, false) < 0) {
		kvt_err("kvtierd", "SIGHUP: %s not reloaded", d->config_path);
		return;
	}
	if (apply_sets(&fresh, sets, nsets) < 0)
		return;
	int n = kvt_config_reload(&d->cfg, &fresh);
	kvt_log_set_level((enum kvt_log_level)d->cfg.log_level);
	kvt_notice("kvtierd", "SIGHUP: %d option%s changed", n, n == 1 ? "" : "s");
}

int main(int argc, char **argv)
{
	static const struct option lopts[] = {
		{"config", required_argument, NULL, 'c'},
		{"set", required_argument, NULL, 'o'},
		{"socket", required_argument, NULL, 1},
		{"state-dir", required_argument, NULL, 2},
		{"device", required_argument, NULL, 3},
		{"dump-config", no_argument, NULL, 4},
		{"version", no_argument, NULL, 'V'},
		{"help", no_argument, NULL, 'h'},
		{0},
	};
	struct kvd *d = kvt_calloc(1, sizeof(*d));
	if (!d)
		return 1;
	char **sets = calloc((size_t)argc + 1, sizeof(char *));
	char shortcut[3][300];
	int nsets = 0, opt;
	bool dump = false;
	const char *cfile = NULL;
	while ((opt = getopt_long(argc, argv, "c:o:Vh", lopts, NULL)) != -1) {
		switch (opt) {
		case 'c': cfile = optarg; break;
		case 'o': sets[nsets++] = optarg; break;
		case 1: case 2: case 3:
			snprintf(shortcut[opt - 1], sizeof(shortcut[0]), "%s=%s",
				 opt == 1 ? "ipc.socket" : opt == 2 ? "store.state_dir" : "store.device",
				 optarg);
			sets[nsets++] = shortcut[opt - 1];
			break;
		case 4: dump = true; break;
		case 'V': printf("kvtierd %s\n", KVT_VERSION); return 0;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (optind < argc) {
		usage(stderr);
		return 2;
	}
	char cbuf[300];
	d->config_path = cfile ? cfile : default_config_file(cbuf, sizeof(cbuf));
	kvt_config_defaults(&d->cfg);
	if (d->config_path && kvt_config_load(&d->cfg, d->config_path, false) < 0)
		return 2;
	if (apply_sets(&d->cfg, sets, nsets) < 0)
		return 2;
	if (!d->cfg.nvme_path[0])
		snprintf(d->cfg.nvme_path, sizeof(d->cfg.nvme_path), "%s/store.kvt", d->cfg.state_dir);
	if (dump) {
		kvt_config_dump(&d->cfg, stdout);
		return 0;
	}
	if (strcmp(d->cfg.disk_full, "refuse") && strcmp(d->cfg.disk_full, "evict")) {
		fprintf(stderr, "kvtierd: store.disk_full: refuse or evict\n");
		return 2;
	}
	if (strcmp(d->cfg.write_policy, "through") && strcmp(d->cfg.write_policy, "back")) {
		fprintf(stderr, "kvtierd: store.write_policy: through or back\n");
		return 2;
	}
	kvt_log_set_level((enum kvt_log_level)d->cfg.log_level);

	int ret = mkdirs(d->cfg.state_dir, 0700);
	if (ret < 0) {
		kvt_err("kvtierd", "state dir %s: %s", d->cfg.state_dir, strerror(-ret));
		return 1;
	}
	if ((ret = kvd_start(d)) < 0)
		return 1;
	kvd_metrics_start(d);
	struct kvt_device *dev = kvt_store_device(d->store);
	const char *backend = (dev->ops->caps & KVT_DEV_CAP_GPU) ? "cuda" : "cpu";
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__) /* theirs report better */
	/* backtrace() loads libgcc on its first call: not in a signal handler */
	void *warm[1];
	backtrace(warm, 1);
	struct sigaction crash = {.sa_handler = on_crash, .sa_flags = SA_RESETHAND | SA_NODEFER};
	sigemptyset(&crash.sa_mask);
	for (int s = 0, sigs[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT}; s < 5; s++)
		sigaction(sigs[s], &crash, NULL);
#endif
	struct sigaction sa = {.sa_handler = on_signal};
	sigemptyset(&sa.sa_mask);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGHUP, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	kvt_notice("kvtierd", "ready: device %s, compute %s, store %s (%llu MiB), per tenant host "
		   "%llu MiB gpu %llu MiB", dev->ops->describe(dev), backend, d->cfg.nvme_path,
		   (unsigned long long)(d->cfg.nvme_bytes >> 20),
		   (unsigned long long)(d->cfg.host_bytes >> 20),
		   (unsigned long long)(d->cfg.gpu_bytes >> 20));

	uint64_t last_err_ns = 0;
	while (!got_term) {
		ret = kvd_iterate(d, 200);
		if (ret == -ENOMEM || ret == -EAGAIN || ret == -EBUSY) {
			/* short of memory for now: the daemon goes on, its clients with it */
			if (kvd_now_ns() - last_err_ns > 1000000000ull)
				kvt_warn("kvtierd", "event loop: %s: going on", strerror(-ret));
			last_err_ns = kvd_now_ns();
			usleep(1000);
			continue;
		}
		if (ret < 0 && ret != -EINTR) {
			kvt_err("kvtierd", "event loop: %s", strerror(-ret));
			break;
		}
		if (got_hup) {
			got_hup = 0;
			reload(d, sets, nsets);
		}
	}
	kvt_notice("kvtierd", "stopping");
	kvd_metrics_stop(d);
	kvd_stop(d);
	kvt_notice("kvtierd", "stopped");
	free(sets);
	kvt_free(d);
	return 0;
}
