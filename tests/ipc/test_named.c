// SPDX-License-Identifier: MIT
/*
 * Named sequences (kvtier_seq_open/sync/remove) against a real kvtierd: made, closed
 * and reopened with their pages read back and checked; kept across a clean restart
 * and a SIGKILL (what kvtier_seq_sync covered, at least); per tenant, with tenant ids
 * handed out in another order after the restart; a page corrupted on disk while the
 * daemon is down ends the sequence before it; removed for good; bad names and
 * layouts refused.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "reliability/harness.h"
#include "tiers/page_format.h"

static struct kvtier_client *attach(struct rel_daemon *d, const char *tenant)
{
	struct kvtier_client *c = rel_attach(d, tenant, 0);
	assert_non_null(c);
	return c;
}

/* Opens name and checks what it holds against salt: its token count. */
static uint32_t reopen_check(struct kvtier_client *c, const char *name, uint32_t salt,
			     uint32_t *seq)
{
	uint32_t tok = 12345;
	assert_int_equal(kvtier_seq_open(c, name, 0, seq, &tok), 0);
	assert_int_equal(tok % REL_T, 0);
	for (uint32_t l = 0; l < REL_LAYERS; l++) {
		uint32_t t;
		assert_int_equal(kvtier_seq_tokens(c, *seq, l, &t), 0);
		assert_int_equal(t, tok);
	}
	unsigned checked = 0;
	assert_int_equal(rel_verify(c, *seq, salt, &checked), 0);
	assert_int_equal(checked, tok / REL_T * REL_LAYERS * REL_HEADS);
	return tok;
}

static void open_close_reopen(void **state)
{
	(void)state;
	struct rel_daemon d;
	assert_int_equal(rel_daemon_start(&d, NULL, false), 0);
	struct kvtier_client *c = attach(&d, NULL);
	uint32_t s, s2, tok;
	assert_int_equal(kvtier_seq_open(c, "conv-1", 0, &s, &tok), -ENOENT);
	assert_int_equal(kvtier_seq_open(c, "conv-1", KVTIER_SEQ_CREATE, &s, &tok), 0);
	assert_int_equal(tok, 0);
	assert_int_equal(kvtier_seq_open(c, "conv-1", KVTIER_SEQ_CREATE, &s2, &tok), -EBUSY);
	assert_int_equal(kvtier_seq_open(c, "conv-1", KVTIER_SEQ_CREATE | KVTIER_SEQ_EXCL, &s2,
					 &tok),
			 -EEXIST);
	/* 100 tokens: 6 full pages and 4 tokens that are not kept */
	assert_int_equal(rel_append(c, s, 41, 0, 100), 0);
	assert_int_equal(kvtier_seq_sync(c, s, &tok), 0);
	assert_int_equal(tok, 96);
	assert_int_equal(rel_verify(c, s, 41, NULL), 0);
	assert_int_equal(kvtier_seq_close(c, s), 0);
	assert_int_equal(reopen_check(c, "conv-1", 41, &s), 96);
	/* appending goes on from there */
	assert_int_equal(rel_append(c, s, 41, 96, 64), 0);
	assert_int_equal(kvtier_seq_close(c, s), 0);
	kvtier_detach(c);
	/* another client of the same tenant finds it; a fork of it holds it */
	c = attach(&d, NULL);
	assert_int_equal(reopen_check(c, "conv-1", 41, &s), 160);
	uint32_t child;
	assert_int_equal(kvtier_seq_fork(c, s, 80, &child), 0);
	assert_int_equal(kvtier_seq_close(c, s), 0);
	assert_int_equal(kvtier_seq_open(c, "conv-1", 0, &s, &tok), -EBUSY);
	assert_int_equal(kvtier_seq_remove(c, "conv-1"), -EBUSY);
	unsigned checked = 0;
	assert_int_equal(rel_verify(c, child, 41, &checked), 0);
	assert_int_equal(checked, 5 * REL_LAYERS * REL_HEADS);
	assert_int_equal(kvtier_seq_close(c, child), 0);
	assert_int_equal(reopen_check(c, "conv-1", 41, &s), 160);
	assert_int_equal(kvtier_seq_close(c, s), 0);
	/* bad names */
	char lng[KVTIER_SEQ_NAME_MAX + 2];
	memset(lng, 'x', sizeof(lng) - 1);
	lng[sizeof(lng) - 1] = 0;
	assert_int_equal(kvtier_seq_open(c, lng, KVTIER_SEQ_CREATE, &s, &tok), -EINVAL);
	assert_int_equal(kvtier_seq_open(c, "", KVTIER_SEQ_CREATE, &s, &tok), -EINVAL);
	assert_int_equal(kvtier_seq_open(c, "a\nb", KVTIER_SEQ_CREATE, &s, &tok), -EINVAL);
	assert_int_equal(kvtier_seq_open(c, "ok", 0x80, &s, &tok), -EINVAL);
	lng[KVTIER_SEQ_NAME_MAX] = 0; /* the longest name is fine */
	assert_int_equal(kvtier_seq_open(c, lng, KVTIER_SEQ_CREATE, &s, &tok), 0);
	assert_int_equal(kvtier_seq_close(c, s), 0);
	assert_int_equal(kvtier_seq_remove(c, lng), 0);
	assert_int_equal(kvtier_seq_remove(c, lng), -ENOENT);
	kvtier_detach(c);
	/* a client of another layout may not open it */
	struct kvtier_layout lay = {REL_LAYERS, REL_HEADS, REL_GROUP, REL_D / 2, KVTIER_F32, REL_T,
				    0, 2};
	struct kvtier_attach_opts ao = {.socket = d.sock};
	assert_int_equal(kvtier_attach(&lay, &ao, &c), 0);
	assert_int_equal(kvtier_seq_open(c, "conv-1", 0, &s, &tok), -EINVAL);
	kvtier_detach(c);
	assert_int_equal(rel_daemon_stop(&d), 0);
	rel_daemon_cleanup(&d);
}

/* Flips a payload byte of page idx of (layer, head 0) of every named sequence in the
 * store file: the count of pages harmed. */
static int harm_page(const char *path, uint16_t layer, uint32_t idx)
{
	int fd = open(path, O_RDWR);
	assert_true(fd >= 0);
	off_t size = lseek(fd, 0, SEEK_END);
	int harmed = 0;
	for (off_t off = 1 << 20; off + (off_t)sizeof(struct page_hdr) <= size; off += 512) {
		struct page_hdr h;
		assert_int_equal(pread(fd, &h, sizeof(h), off), sizeof(h));
		if (h.magic != PAGE_MAGIC || !(h.key.seq >> 63) || h.key.layer != layer ||
		    h.key.kv_head != 0 || h.key.index != idx)
			continue;
		uint8_t b;
		off_t at = off + h.hdr_size + 100;
		assert_int_equal(pread(fd, &b, 1, at), 1);
		b ^= 0x10;
		assert_int_equal(pwrite(fd, &b, 1, at), 1);
		harmed++;
	}
	fsync(fd);
	close(fd);
	return harmed;
}

static long long json_num(const char *text, const char *key)
{
	char pat[80];
	snprintf(pat, sizeof(pat), "\"%s\":", key);
	const char *p = strstr(text, pat);
	return p ? strtoll(p + strlen(pat), NULL, 10) : -1;
}

static void restarts(void **state)
{
	(void)state;
	struct rel_daemon d;
	assert_int_equal(rel_daemon_start(&d, NULL, false), 0);
	/* tenant "a" is the daemon's first (id 0), "b" its second */
	struct kvtier_client *a = attach(&d, "a"), *b = attach(&d, "b");
	uint32_t sa, sb, sx, tok;
	assert_int_equal(kvtier_seq_open(a, "doc", KVTIER_SEQ_CREATE, &sa, &tok), 0);
	assert_int_equal(kvtier_seq_open(b, "doc", KVTIER_SEQ_CREATE, &sb, &tok), 0);
	assert_int_equal(kvtier_seq_open(a, "gone", KVTIER_SEQ_CREATE, &sx, &tok), 0);
	assert_int_equal(kvtier_seq_create(b, &tok), 0); /* unnamed: not kept */
	assert_int_equal(rel_append(b, tok, 9, 0, 64), 0);
	assert_int_equal(rel_append(a, sa, 1, 0, 200), 0);
	assert_int_equal(rel_append(b, sb, 2, 0, 130), 0);
	assert_int_equal(rel_append(a, sx, 3, 0, 32), 0);
	assert_int_equal(kvtier_seq_close(a, sx), 0);
	assert_int_equal(kvtier_seq_remove(a, "gone"), 0);
	kvtier_detach(a);
	kvtier_detach(b);
	assert_int_equal(rel_daemon_stop(&d), 0);

	/* a clean restart; "b" attaches first this time */
	assert_int_equal(rel_daemon_start(&d, NULL, true), 0);
	b = attach(&d, "b");
	a = attach(&d, "a");
	assert_int_equal(reopen_check(a, "doc", 1, &sa), 192);
	assert_int_equal(reopen_check(b, "doc", 2, &sb), 128);
	assert_int_equal(kvtier_seq_open(a, "gone", 0, &sx, &tok), -ENOENT);
	struct kvtier_client *e = attach(&d, "eve");
	assert_int_equal(kvtier_seq_open(e, "doc", 0, &sx, &tok), -ENOENT);
	kvtier_detach(e);
	/* more, synced; then more not synced; then SIGKILL */
	assert_int_equal(rel_append(a, sa, 1, 192, 128), 0);
	assert_int_equal(kvtier_seq_sync(a, sa, &tok), 0);
	assert_int_equal(tok, 320);
	assert_int_equal(rel_append(a, sa, 1, 320, 40), 0);
	char js[65536];
	rel_daemon_kill9(&d);
	kvtier_detach(a);
	kvtier_detach(b);

	assert_int_equal(rel_daemon_start(&d, NULL, true), 0);
	assert_int_equal(rel_ctl(d.sock, "stats", 6, js, sizeof(js)), 0);
	a = attach(&d, "a");
	tok = reopen_check(a, "doc", 1, &sa);
	assert_true(tok >= 320 && tok <= 352);
	b = attach(&d, "b");
	assert_int_equal(reopen_check(b, "doc", 2, &sb), 128);
	kvtier_detach(a);
	kvtier_detach(b);
	assert_int_equal(rel_daemon_stop(&d), 0);

	/* page 5 of layer 1 corrupted while the daemon is down: the scan finds it, "a/doc"
	 * and "b/doc" end before it */
	char path[700];
	snprintf(path, sizeof(path), "%s/store.kvt", d.state);
	assert_int_equal(harm_page(path, 1, 5), 2);
	assert_int_equal(rel_daemon_start(&d, NULL, true), 0);
	assert_int_equal(rel_ctl(d.sock, "stats", 6, js, sizeof(js)), 0);
	assert_true(json_num(js, "recovered_bad") >= 2);
	a = attach(&d, "a");
	assert_int_equal(reopen_check(a, "doc", 1, &sa), 5 * REL_T);
	assert_int_equal(rel_append(a, sa, 1, 5 * REL_T, 100), 0); /* it grows again */
	assert_int_equal(kvtier_seq_close(a, sa), 0);
	assert_int_equal(reopen_check(a, "doc", 1, &sa), 5 * REL_T + 96);
	kvtier_detach(a);
	assert_int_equal(rel_daemon_stop(&d), 0);
	rel_daemon_cleanup(&d);
}

/* The offset of page idx of (layer, head) of a named sequence whose first key channel
 * is salt, its header in *out; or -1. */
static off_t find_page(int fd, uint16_t layer, uint16_t head, uint32_t idx, uint32_t salt,
		       struct page_hdr *out)
{
	off_t size = lseek(fd, 0, SEEK_END);
	for (off_t off = 1 << 20; off + (off_t)sizeof(*out) <= size; off += 512) {
		struct page_hdr h;
		float k0;
		assert_int_equal(pread(fd, &h, sizeof(h), off), sizeof(h));
		if (h.magic != PAGE_MAGIC || !(h.key.seq >> 63) || h.key.layer != layer ||
		    h.key.kv_head != head || h.key.index != idx)
			continue;
		assert_int_equal(pread(fd, &k0, 4, off + h.hdr_size), 4);
		if (k0 != (float)salt)
			continue;
		*out = h;
		return off;
	}
	return -1;
}

#define NPH (REL_LAYERS * REL_HEADS)

/*
 * A sequence cut short and grown again with other KV, then the daemon dies before the
 * wipes of the dropped pages' disk copies land (made so by hand while it is down:
 * their old bytes put back in their old slots). The old pages must not come back as
 * pages of the grown sequence.
 */
static void stale_after_cut(void **state)
{
	(void)state;
	struct rel_daemon d;
	assert_int_equal(rel_daemon_start(&d, NULL, false), 0);
	struct kvtier_client *c = attach(&d, NULL);
	uint32_t s, tok;
	assert_int_equal(kvtier_seq_open(c, "s", KVTIER_SEQ_CREATE, &s, &tok), 0);
	assert_int_equal(rel_append(c, s, 7, 0, 160), 0);
	assert_int_equal(kvtier_seq_close(c, s), 0);
	kvtier_detach(c);
	assert_int_equal(rel_daemon_stop(&d), 0);
	/* the old copies of pages 6 and 7, every layer and head */
	char path[700];
	snprintf(path, sizeof(path), "%s/store.kvt", d.state);
	int fd = open(path, O_RDWR);
	assert_true(fd >= 0);
	off_t off[2][NPH];
	uint8_t *old[2][NPH];
	size_t span = 0;
	for (int i = 0; i < 2; i++)
		for (int j = 0; j < NPH; j++) {
			struct page_hdr h = {0};
			off[i][j] = find_page(fd, (uint16_t)(j / REL_HEADS), (uint16_t)(j % REL_HEADS),
					      6 + i, 7, &h);
			assert_true(off[i][j] > 0);
			span = h.hdr_size + h.len;
			old[i][j] = malloc(span);
			assert_int_equal(pread(fd, old[i][j], span, off[i][j]), (ssize_t)span);
		}
	close(fd);
	/* page 5 of layer 1 corrupt: the restart cuts the sequence at page 5 */
	assert_int_equal(harm_page(path, 1, 5), 1);
	assert_int_equal(rel_daemon_start(&d, NULL, true), 0);
	c = attach(&d, NULL);
	assert_int_equal(kvtier_seq_open(c, "s", 0, &s, &tok), 0);
	assert_int_equal(tok, 5 * REL_T);
	assert_int_equal(rel_append(c, s, 8, 5 * REL_T, REL_T + 4), 0); /* page 5, other KV */
	assert_int_equal(kvtier_seq_close(c, s), 0);
	kvtier_detach(c);
	assert_int_equal(rel_daemon_stop(&d), 0);
	/* the wipes of the old pages 6 and 7 never landed: their bytes go back in their
	 * slots, or, where the new page 5 took a slot (its wipe landed first: the order
	 * wipes land in is the disk's), in a free one, stamped for it */
	fd = open(path, O_RDWR);
	const struct page_hdr *h0 = (const void *)old[0][0], *h1 = (const void *)old[0][1];
	assert_true(h0->slot != h1->slot);
	const off_t slot_size = (off[0][0] - off[0][1]) / ((off_t)h0->slot - (off_t)h1->slot);
	const off_t data_off = off[0][0] - (off_t)h0->slot * slot_size;
	const off_t fsize = lseek(fd, 0, SEEK_END);
	unsigned back = 0, moved = 0;
	uint64_t idx = 0;
	for (int i = 0; i < 2; i++)
		for (int j = 0; j < NPH; j++) {
			struct page_hdr there;
			assert_int_equal(pread(fd, &there, sizeof(there), off[i][j]), sizeof(there));
			off_t at = off[i][j];
			if (there.magic == PAGE_MAGIC) {
				for (;; idx++) {
					at = data_off + (off_t)idx * slot_size;
					assert_true(at + slot_size <= fsize);
					assert_int_equal(pread(fd, &there, sizeof(there), at), sizeof(there));
					if (there.magic != PAGE_MAGIC)
						break;
				}
				const struct page_hdr *h = (const void *)old[i][j];
				const struct page_meta m = {.key = h->key, .epoch = h->epoch, .len = h->len};
				page_hdr_stamp(old[i][j], h->hdr_size, old[i][j] + h->hdr_size, &m, idx);
				moved++;
			}
			assert_int_equal(pwrite(fd, old[i][j], span, at), (ssize_t)span);
			back++;
			free(old[i][j]);
		}
	fsync(fd);
	close(fd);
	assert_int_equal(rel_daemon_start(&d, NULL, true), 0);
	/* found whole (those stamped by hand as well), then dropped as cut */
	char js[65536];
	assert_int_equal(rel_ctl(d.sock, "stats", 6, js, sizeof(js)), 0);
	assert_int_equal(json_num(js, "recovered_bad"), 0);
	assert_int_equal(json_num(js, "dropped_past_gap_pages"), 2 * NPH);
	c = attach(&d, NULL);
	assert_int_equal(kvtier_seq_open(c, "s", 0, &s, &tok), 0);
	printf("stale-after-cut: %u of %u dropped pages put back (%u in another slot); the "
	       "sequence holds %u tokens\n", back, 2 * NPH, moved, tok);
	assert_int_equal(back, 2 * NPH);
	assert_int_equal(tok, 6 * REL_T); /* pages 0-4 of salt 7, 5 of salt 8, nothing old */
	assert_int_equal(rel_verify_split(c, s, 7, 8, 5, NULL), 0);
	kvtier_detach(c);
	assert_int_equal(rel_daemon_stop(&d), 0);
	rel_daemon_cleanup(&d);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(open_close_reopen),
		cmocka_unit_test(restarts),
		cmocka_unit_test(stale_after_cut),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
