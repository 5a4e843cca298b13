/* SPDX-License-Identifier: MIT */
#ifndef KVT_REL_HARNESS_H
#define KVT_REL_HARNESS_H

/*
 * The reliability suite's harness: a real kvtierd on a private socket and state dir,
 * raw access to its STATS and CTL messages, what /proc says about its resources, and
 * deterministic KV (every value a function of a sequence's salt and its position).
 *
 * Every case prints one line per measurement, "rel: <case>: <what>", which
 * tools/reliability.sh gathers into the table of tests/RELIABILITY.md.
 */

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "ipc/kvtier.h"
#include "ipc/wire.h"

/* The model of every case: f32 so that results compare bit for bit. */
#define REL_LAYERS 2
#define REL_HEADS  2
#define REL_GROUP  2
#define REL_D      64
#define REL_T      16
#define REL_PB     (2 * REL_T * REL_D * 4) /* 8 KiB */

struct rel_daemon {
	pid_t pid;
	char dir[64];    /* socket dir, under /tmp */
	char sock[108];
	char state[512]; /* store dir, on a file system that takes O_DIRECT */
	char log[600];   /* the daemon's stderr */
};

/*
 * Starts kvtierd with the suite's small tiers (8 KiB pages; per tenant GPU pool 1 MiB,
 * host arena 2 MiB; NVMe 64 MiB) plus extra "-o name=value" options (NULL-ended, may be
 * NULL). keep_state: reuse d->state (a restart) instead of making a fresh one. Waits
 * until it answers STATS: 0, or -1 (it exited or never answered).
 */
int rel_daemon_start(struct rel_daemon *d, const char *const *extra, bool keep_state);
/* Runs in the daemon's process before exec (limits, seccomp), when set. */
extern void (*rel_daemon_preexec)(void);
/* SIGTERM and wait: 0 when it exited 0. The state dir is kept (rel_daemon_cleanup). */
int rel_daemon_stop(struct rel_daemon *d);
void rel_daemon_kill9(struct rel_daemon *d);
void rel_daemon_cleanup(struct rel_daemon *d);
bool rel_daemon_alive(struct rel_daemon *d);

int rel_connect(const char *sock);
int rel_stats(const char *sock, struct kvt_wire_stats *w);
/* A control command (words, each NUL-ended): its last piece's status; the answer's
 * first outlen-1 bytes in out when out is not NULL. */
int rel_ctl(const char *sock, const char *words, size_t len, char *out, size_t outlen);

struct rel_proc {
	long fds;
	long rss_kb, pin_kb, lck_kb;
};
int rel_proc(pid_t pid, struct rel_proc *out);

/* A handshake by hand, so that a test can write anything into the ring: HELLO with
 * the suite's layout (head_dim and the wire version chosen), the WELCOME's fds kept,
 * the ring mapped. 0, the daemon's -errno (its ERROR), or -EPROTO/-ECONNRESET. */
struct rel_raw {
	int sock, fds[KVT_FD_MAX];
	struct kvt_welcome w;
	uint8_t *ring;
};
int rel_raw_attach(struct rel_raw *r, const char *sock, uint16_t version, uint32_t head_dim,
		   const char *tenant);
void rel_raw_close(struct rel_raw *r);

/* The address of a table entry's page: a GPU pool slot, or a KVTIER_SLOT_HOST slot
 * read in place from the host arena. */
const float *rel_slot_page(const struct kvtier_memory *m, int32_t slot);

/* Attach with the suite's layout. NULL on failure (the reason on stderr). */
struct kvtier_client *rel_attach(const struct rel_daemon *d, const char *tenant, uint32_t flags);

/* K (v = 0) or V (v = 1) of token tok, channel ch, of (salt, layer, head). */
float rel_kv(uint32_t salt, uint32_t layer, uint32_t head, uint32_t tok, uint32_t ch, int v);
/* Appends tokens [from, from + n) of salt to every layer of seq. */
int rel_append(struct kvtier_client *c, uint32_t seq, uint32_t salt, uint32_t from, uint32_t n);
/* Reads every full page of every layer of seq (one select of them all, pinned until
 * the next select of that layer) and checks it against salt's KV: the count of wrong
 * or missing pages, or -errno. */
int rel_verify(struct kvtier_client *c, uint32_t seq, uint32_t salt, unsigned *checked);
/* The same with pages below `from` of salt a, the others of salt b. */
int rel_verify_split(struct kvtier_client *c, uint32_t seq, uint32_t a, uint32_t b,
		     uint32_t from, unsigned *checked);
/* A query for every (head, group) of one sequence: [HEADS][GROUP][D]. */
void rel_query(uint32_t salt, uint32_t step, uint32_t layer, float *q);
/* Whether a page (K then V, page_tokens x D each) holds page idx of (salt, layer, head). */
bool rel_page_ok(const float *page, uint32_t salt, uint32_t layer, uint32_t head, uint32_t idx);

/* Scale: the count of a quick case, or the long count under KVT_REL_LONG=1. */
unsigned rel_scale(unsigned quick, unsigned lng);
uint64_t rel_rand(void); /* xorshift, seeded from KVT_REL_SEED (printed) */
double rel_now(void);

#endif
