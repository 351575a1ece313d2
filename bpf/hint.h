/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * Routing hint decoder (format in splitrelay.h; encoder in wire/hint.py).
 * Lets a relay with no session state route a session's first STUN request.
 */
#ifndef SPLITRELAY_HINT_H
#define SPLITRELAY_HINT_H

/* ice-char -> 6-bit value in base64 order, or -1. */
static __always_inline int ice_char_value(unsigned char c)
{
	if (c >= 'A' && c <= 'Z')
		return c - 'A';
	if (c >= 'a' && c <= 'z')
		return c - 'a' + 26;
	if (c >= '0' && c <= '9')
		return c - '0' + 52;
	if (c == '+')
		return 62;
	if (c == '/')
		return 63;
	return -1;
}

#define SIP_ROTL(x, b) (__u64)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIP_ROUND(v0, v1, v2, v3)                                              \
	do {                                                                   \
		v0 += v1; v1 = SIP_ROTL(v1, 13); v1 ^= v0; v0 = SIP_ROTL(v0, 32); \
		v2 += v3; v3 = SIP_ROTL(v3, 16); v3 ^= v2;                     \
		v0 += v3; v3 = SIP_ROTL(v3, 21); v3 ^= v0;                     \
		v2 += v1; v1 = SIP_ROTL(v1, 17); v1 ^= v2; v2 = SIP_ROTL(v2, 32); \
	} while (0)

static __always_inline __u64 le64(const __u8 *p, int n)
{
	__u64 v = 0;
#pragma unroll
	for (int i = 0; i < 8; i++)
		if (i < n)
			v |= (__u64)p[i] << (8 * i);
	return v;
}

/* SipHash-2-4 of exactly SR_HINT_MSG_LEN (12) bytes: one full block and a 4-byte tail. */
static __always_inline __u64 siphash24_12(const __u8 *m, const __u8 *key)
{
	__u64 k0 = le64(key, 8), k1 = le64(key + 8, 8);
	__u64 v0 = 0x736f6d6570736575ULL ^ k0, v1 = 0x646f72616e646f6dULL ^ k1;
	__u64 v2 = 0x6c7967656e657261ULL ^ k0, v3 = 0x7465646279746573ULL ^ k1;
	__u64 b = le64(m, 8);

	v3 ^= b;
	SIP_ROUND(v0, v1, v2, v3);
	SIP_ROUND(v0, v1, v2, v3);
	v0 ^= b;
	b = ((__u64)SR_HINT_MSG_LEN << 56) | le64(m + 8, 4);
	v3 ^= b;
	SIP_ROUND(v0, v1, v2, v3);
	SIP_ROUND(v0, v1, v2, v3);
	v0 ^= b;
	v2 ^= 0xff;
	SIP_ROUND(v0, v1, v2, v3);
	SIP_ROUND(v0, v1, v2, v3);
	SIP_ROUND(v0, v1, v2, v3);
	SIP_ROUND(v0, v1, v2, v3);
	return v0 ^ v1 ^ v2 ^ v3;
}

static __always_inline int hint_chars(const struct sr_ufrag_key *key, int from)
{
	int a = ice_char_value(key->ufrag[from]);
	int b = ice_char_value(key->ufrag[from + 1]);
	int c = ice_char_value(key->ufrag[from + 2]);
	if (a < 0 || b < 0 || c < 0)
		return -1;
	return (a << 12) | (b << 6) | c;
}

enum hint_result {
	HINT_NONE = 0,      /* no hint (or one this relay does not accept): unknown ufrag */
	HINT_FORGED = -1,   /* a keyed hint whose tag does not check */
};

/*
 * Backend id named by the ufrag's hint (> 0), HINT_NONE, or HINT_FORGED.  Without a key,
 * v1 hints route; with a key, only v2 hints with a valid tag do.
 */
static __always_inline int hint_decode(const struct sr_ufrag_key *key, __u32 len, const struct sr_config *cfg)
{
	if (len != SR_HINT_V1_LEN)
		return HINT_NONE;
	int version = ice_char_value(key->ufrag[0]);
	int id = hint_chars(key, 1);
	if (id <= 0)
		return HINT_NONE;
	if (version == SR_HINT_V1)
		return cfg->hint_key_set ? HINT_NONE : id;
	if (version != SR_HINT_V2 || !cfg->hint_key_set)
		return HINT_NONE;
	int hi = ice_char_value(key->ufrag[12]);
	int lo = hint_chars(key, 13);
	if (hi < 0 || lo < 0)
		return HINT_FORGED;
	__u32 tag = ((__u32)hi << 18) | (__u32)lo;
	__u64 h = siphash24_12((const __u8 *)key->ufrag, cfg->hint_key);
	return ((__u32)h & 0xffffff) == tag ? id : HINT_FORGED;
}

#endif /* SPLITRELAY_HINT_H */
