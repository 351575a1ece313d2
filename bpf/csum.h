/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * Incremental Internet checksum updates (RFC 1624: HC' = ~(~HC + ~m + m')).
 * Words are taken as they sit in memory (network order); the one's complement
 * sum is byte-order independent as long as every word is read the same way.
 */
#ifndef SPLITRELAY_CSUM_H
#define SPLITRELAY_CSUM_H

static __always_inline __u32 csum_delta16(__u32 acc, __u16 old, __u16 new)
{
	return acc + (__u16)~old + new;
}

static __always_inline __u32 csum_delta32(__u32 acc, __u32 old, __u32 new)
{
	acc = csum_delta16(acc, old >> 16, new >> 16);
	return csum_delta16(acc, old & 0xffff, new & 0xffff);
}

static __always_inline __u32 csum_delta_addr6(__u32 acc, const __be32 *old, const __be32 *new)
{
#pragma unroll
	for (int i = 0; i < 4; i++)
		acc = csum_delta32(acc, old[i], new[i]);
	return acc;
}

static __always_inline __u16 csum_fold32(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

/* Apply an accumulated delta to a stored checksum. */
static __always_inline __u16 csum_apply(__u16 check, __u32 delta)
{
	__u32 sum = (__u16)~check;
	sum += csum_fold32(delta);
	return ~csum_fold32(sum);
}

/* UDP: an IPv4 checksum of 0 means "none" and stays 0; a computed 0 is sent as 0xffff. */
static __always_inline void udp_csum_update(__u16 *check, __u32 delta, int is_v6)
{
	if (!is_v6 && *check == 0)
		return;
	__u16 c = csum_apply(*check, delta);
	*check = c ? c : 0xffff;
}

#endif /* SPLITRELAY_CSUM_H */
