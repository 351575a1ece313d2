/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * Routing hint decoder (format in splitrelay.h; encoder in edge/hint.py).
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

/* Backend id named by a v1 hint, or 0 when the ufrag carries none. */
static __always_inline __u32 hint_decode(const struct sr_ufrag_key *key, __u32 len)
{
	if (len != SR_HINT_V1_LEN)
		return 0;
	if (ice_char_value(key->ufrag[0]) != SR_HINT_V1)
		return 0;
	int a = ice_char_value(key->ufrag[1]);
	int b = ice_char_value(key->ufrag[2]);
	int c = ice_char_value(key->ufrag[3]);
	if (a < 0 || b < 0 || c < 0)
		return 0;
	return ((__u32)a << 12) | ((__u32)b << 6) | (__u32)c;
}

#endif /* SPLITRELAY_HINT_H */
