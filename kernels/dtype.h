/* SPDX-License-Identifier: MIT */
#ifndef KVT_KERNELS_DTYPE_H
#define KVT_KERNELS_DTYPE_H

/* fp16 / bf16 <-> float on the host, round to nearest even (as CUDA's __float2half_rn). */

#include <stdint.h>
#include <string.h>

static inline float kvt_bits_f32(uint32_t u)
{
	float f;
	memcpy(&f, &u, 4);
	return f;
}

static inline uint32_t kvt_f32_bits(float f)
{
	uint32_t u;
	memcpy(&u, &f, 4);
	return u;
}

static inline float kvt_bf16_to_f32(uint16_t h)
{
	return kvt_bits_f32((uint32_t)h << 16);
}

static inline uint16_t kvt_f32_to_bf16(float f)
{
	uint32_t u = kvt_f32_bits(f);
	if ((u & 0x7fffffffu) > 0x7f800000u)
		return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
	u += 0x7fffu + ((u >> 16) & 1);
	return (uint16_t)(u >> 16);
}

static inline float kvt_f16_to_f32(uint16_t h)
{
	uint32_t sign = (uint32_t)(h & 0x8000) << 16;
	uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
	if (exp == 0x1f)
		return kvt_bits_f32(sign | 0x7f800000u | (man << 13));
	if (exp == 0) {
		if (!man)
			return kvt_bits_f32(sign);
		float f = (float)man * (1.0f / 16777216.0f); /* man * 2^-24 */
		return sign ? -f : f;
	}
	return kvt_bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

static inline uint16_t kvt_f32_to_f16(float f)
{
	uint32_t u = kvt_f32_bits(f);
	uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
	uint32_t a = u & 0x7fffffffu;
	if (a > 0x7f800000u)
		return sign | 0x7e00;
	if (a >= 0x477ff000u) /* rounds to >= 65520: inf */
		return sign | 0x7c00;
	if (a < 0x38800000u) { /* below 2^-14: subnormal or zero */
		if (a < 0x33000000u) /* below 2^-25: zero */
			return sign;
		uint32_t e = a >> 23, man = (a & 0x7fffff) | 0x800000;
		uint32_t shift = 126 - e; /* 14..24 */
		uint32_t r = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
		if (rem > half || (rem == half && (r & 1)))
			r++;
		return sign | (uint16_t)r;
	}
	uint32_t r = a - 0x38000000u; /* rebias 127 -> 15 */
	r += 0xfffu + ((r >> 13) & 1);
	return sign | (uint16_t)(r >> 13);
}

static inline float kvt_load_elem(const void *p, size_t i, uint32_t dtype)
{
	switch (dtype) {
	case 0:
		return kvt_f16_to_f32(((const uint16_t *)p)[i]);
	case 1:
		return kvt_bf16_to_f32(((const uint16_t *)p)[i]);
	default:
		return ((const float *)p)[i];
	}
}

static inline void kvt_store_elem(void *p, size_t i, uint32_t dtype, float v)
{
	switch (dtype) {
	case 0:
		((uint16_t *)p)[i] = kvt_f32_to_f16(v);
		break;
	case 1:
		((uint16_t *)p)[i] = kvt_f32_to_bf16(v);
		break;
	default:
		((float *)p)[i] = v;
	}
}

#endif
