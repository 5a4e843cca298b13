/* SPDX-License-Identifier: MIT */
#ifndef KVT_PAGE_FORMAT_H
#define KVT_PAGE_FORMAT_H

#include <stdbool.h>
#include <stdint.h>

/*
 * A page holds K and V of page_tokens tokens of one (tenant, sequence, layer, KV head).
 * The key names it everywhere: in the page map, on disk, and later on the wire.
 */
struct page_key {
	uint32_t tenant;
	uint16_t layer;
	uint16_t kv_head;
	uint64_t seq;
	uint32_t index; /* page index within the sequence: token / page_tokens */
	uint32_t pad;   /* zero */
};
_Static_assert(sizeof(struct page_key) == 24, "page_key is a wire/disk format");

static inline bool page_key_eq(const struct page_key *a, const struct page_key *b)
{
	return a->tenant == b->tenant && a->layer == b->layer && a->kv_head == b->kv_head &&
	       a->seq == b->seq && a->index == b->index;
}

uint64_t page_key_hash(const struct page_key *k);

/*
 * On-disk page header, at the start of every disk slot, the payload right after the
 * header block (hdr_size bytes: the file system's block, or the device's direct-I/O
 * alignment, at least 512). In RAM the two need not be side by side.
 * csum is XXH3-64 over the header (csum zeroed) and len payload bytes, seeded with the
 * slot number and the epoch: a flipped bit, a torn write (old header or old payload
 * beside new) and a stale page left at a reused slot all fail the check.
 * All fields little-endian.
 */
#define PAGE_MAGIC	    0x314547415054564bull /* "KVTPAGE1" */
#define PAGE_FORMAT_VERSION 1

struct page_hdr {
	uint64_t magic;
	uint16_t version;
	uint16_t hdr_size;
	uint32_t len;
	struct page_key key;
	uint64_t epoch;
	uint64_t slot;
	uint64_t csum;
};
_Static_assert(sizeof(struct page_hdr) == 64, "page_hdr is a disk format");

/*
 * What a read page is checked against; also what a write stamps. csum is the header's
 * checksum: a write (page_hdr_stamp) and a verify that finds a page fill it in; a
 * read given one (not 0) may read the payload alone and check it against it
 * (page_verify_payload), the header being known.
 */
struct page_meta {
	struct page_key key;
	uint64_t epoch;
	uint32_t len;
	uint64_t csum;
};

enum page_check {
	PAGE_OK = 0,
	PAGE_EMPTY,    /* no page ever written here (no magic) */
	PAGE_BAD_HDR,  /* magic right, version/sizes wrong */
	PAGE_CORRUPT,  /* checksum mismatch: bit flip or torn write */
	PAGE_STALE,    /* a valid page, but not the one expected (key/epoch/slot) */
	PAGE_CHECK_MAX,
};

const char *page_check_str(enum page_check c);

uint64_t page_csum(const struct page_hdr *h, const void *payload, uint64_t slot,
		   uint64_t epoch);
/* Fills the hdr_size bytes of header at hdr for payload; returns its checksum. */
uint64_t page_hdr_stamp(void *hdr, uint16_t hdr_size, const void *payload,
			const struct page_meta *m, uint64_t slot);
/*
 * Checks the page read from slot: its header at hdr, its payload at payload. If expect
 * is not NULL the page must be that key and epoch; found (may be NULL) gets what is
 * there.
 */
enum page_check page_verify(const void *hdr, uint16_t hdr_size, const void *payload,
			    uint32_t max_len, uint64_t slot, const struct page_meta *expect,
			    struct page_meta *found);
/*
 * Checks a payload read without its header against expect, whose csum must be set:
 * the checksum of the header the page must have had, over this payload. PAGE_OK or
 * PAGE_CORRUPT; a mismatch does not tell a flipped bit from a stale page or a torn
 * write: read the header to say which (page_verify).
 */
enum page_check page_verify_payload(const void *payload, uint16_t hdr_size, uint64_t slot,
				    const struct page_meta *expect);

#endif
