// SPDX-License-Identifier: MIT
#include "page_format.h"

#include <string.h>
#include "page_hash.h"

uint64_t page_key_hash(const struct page_key *k)
{
	uint64_t h = k->seq * 0x9e3779b97f4a7c15ull;
	h ^= ((uint64_t)k->tenant << 32 | k->index) * 0xc2b2ae3d27d4eb4full;
	h ^= ((uint64_t)k->layer << 16 | k->kv_head) * 0x165667b19e3779f9ull;
	h ^= h >> 29;
	h *= 0xbf58476d1ce4e5b9ull;
	return h ^ (h >> 32);
}

const char *page_check_str(enum page_check c)
{
	static const char *const s[PAGE_CHECK_MAX] = {
		[PAGE_OK] = "ok",
		[PAGE_EMPTY] = "empty",
		[PAGE_BAD_HDR] = "bad header",
		[PAGE_CORRUPT] = "checksum mismatch",
		[PAGE_STALE] = "stale page",
	};
	return (unsigned)c < PAGE_CHECK_MAX ? s[c] : "?";
}

static uint64_t seed_of(uint64_t slot, uint64_t epoch)
{
	return (slot + 1) * 0x9e3779b97f4a7c15ull ^ epoch * 0xd6e8feb86659fd93ull;
}

uint64_t page_csum(const struct page_hdr *h, const void *payload, uint64_t slot,
		   uint64_t epoch)
{
	struct page_hdr c = *h;
	c.csum = 0;
	return kvt_page_hash(seed_of(slot, epoch), &c, sizeof(c), payload, h->len);
}

static struct page_hdr hdr_of(uint16_t hdr_size, const void *payload,
			      const struct page_meta *m, uint64_t slot)
{
	struct page_hdr h = {
		.magic = PAGE_MAGIC,
		.version = PAGE_FORMAT_VERSION,
		.hdr_size = hdr_size,
		.len = m->len,
		.key = m->key,
		.epoch = m->epoch,
		.slot = slot,
	};
	h.key.pad = 0;
	h.csum = page_csum(&h, payload, slot, m->epoch);
	return h;
}

uint64_t page_hdr_stamp(void *hdr, uint16_t hdr_size, const void *payload,
			const struct page_meta *m, uint64_t slot)
{
	struct page_hdr h = hdr_of(hdr_size, payload, m, slot);
	memset(hdr, 0, hdr_size);
	memcpy(hdr, &h, sizeof(h));
	return h.csum;
}

enum page_check page_verify_payload(const void *payload, uint16_t hdr_size, uint64_t slot,
				    const struct page_meta *expect)
{
	return hdr_of(hdr_size, payload, expect, slot).csum == expect->csum ? PAGE_OK
									    : PAGE_CORRUPT;
}

enum page_check page_verify(const void *hdr, uint16_t hdr_size, const void *payload,
			    uint32_t max_len, uint64_t slot, const struct page_meta *expect,
			    struct page_meta *found)
{
	struct page_hdr h;
	memcpy(&h, hdr, sizeof(h));
	if (h.magic != PAGE_MAGIC)
		return PAGE_EMPTY;
	if (h.version != PAGE_FORMAT_VERSION || h.hdr_size != hdr_size || h.len > max_len)
		return PAGE_BAD_HDR;
	/*
	 * The checksum is seeded with the slot and epoch the header claims; a header
	 * copied whole from elsewhere fails on the slot, one left from an earlier write at
	 * this slot passes here and is told apart by its epoch below.
	 */
	if (h.slot != slot || page_csum(&h, payload, slot, h.epoch) != h.csum)
		return PAGE_CORRUPT;
	if (found) {
		found->key = h.key;
		found->epoch = h.epoch;
		found->len = h.len;
		found->csum = h.csum;
	}
	if (expect && (!page_key_eq(&h.key, &expect->key) || h.epoch != expect->epoch ||
		       h.len != expect->len))
		return PAGE_STALE;
	return PAGE_OK;
}
