/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * Header cursor and parse helpers.  Every read is preceded by a bounds check
 * against data_end, in a form the verifier can follow: the cursor only moves
 * forward by constant or explicitly bounded amounts.
 */
#ifndef SPLITRELAY_PARSE_H
#define SPLITRELAY_PARSE_H

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <linux/in.h>

#define SR_ETH_P_8021Q  0x8100
#define SR_ETH_P_8021AD 0x88A8
#define SR_IP_MF        0x2000
#define SR_IP_OFFSET    0x1FFF

struct cursor {
	void *pos;
	void *end;
};

struct vlan_hdr_sr {
	__be16 tci;
	__be16 proto;
};

/* Advance over len bytes and return where they start, or NULL if the packet is shorter. */
#define CURSOR_PULL(c, len) ({                          \
	void *__p = (c)->pos;                               \
	if (__p + (len) > (c)->end)                         \
		__p = NULL;                                     \
	else                                                \
		(c)->pos = __p + (len);                         \
	__p;                                                \
})

/* Ethernet plus at most one 802.1Q/802.1ad tag; returns the L3 protocol (host order) or -1. */
static __always_inline int parse_eth(struct cursor *c, struct ethhdr **eth, int *vlan)
{
	struct ethhdr *e = CURSOR_PULL(c, sizeof(*e));
	if (!e)
		return -1;
	*eth = e;
	*vlan = 0;
	__u16 proto = bpf_ntohs(e->h_proto);
	if (proto == SR_ETH_P_8021Q || proto == SR_ETH_P_8021AD) {
		struct vlan_hdr_sr *v = CURSOR_PULL(c, sizeof(*v));
		if (!v)
			return -1;
		*vlan = 1;
		proto = bpf_ntohs(v->proto);
	}
	return proto;
}

enum parse_l3 {
	L3_OK = 0,
	L3_SHORT = -1,      /* truncated or lying header */
	L3_FRAGMENT = -2,   /* IPv4 fragment: no (or no trustworthy) UDP header */
	L3_NOT_UDP = -3,
};

/* IPv4 with options; fragments are reported so the caller can count them. */
static __always_inline int parse_ipv4(struct cursor *c, struct iphdr **iph)
{
	struct iphdr *ip = CURSOR_PULL(c, sizeof(*ip));
	if (!ip)
		return L3_SHORT;
	__u32 hdr_len = ip->ihl * 4;
	if (hdr_len < sizeof(*ip) || ip->version != 4)
		return L3_SHORT;
	if (hdr_len > sizeof(*ip)) {
		__u32 opt_len = hdr_len - sizeof(*ip);
		if (opt_len > 40)
			return L3_SHORT;
		if (c->pos + opt_len > c->end)
			return L3_SHORT;
		c->pos += opt_len;
	}
	*iph = ip;
	if (ip->protocol != IPPROTO_UDP)
		return L3_NOT_UDP;
	if (bpf_ntohs(ip->frag_off) & (SR_IP_MF | SR_IP_OFFSET))
		return L3_FRAGMENT;
	return L3_OK;
}

/* IPv6 without extension headers: anything else is not ours to touch. */
static __always_inline int parse_ipv6(struct cursor *c, struct ipv6hdr **ip6h)
{
	struct ipv6hdr *ip6 = CURSOR_PULL(c, sizeof(*ip6));
	if (!ip6)
		return L3_SHORT;
	if (ip6->version != 6)
		return L3_SHORT;
	*ip6h = ip6;
	if (ip6->nexthdr != IPPROTO_UDP)
		return L3_NOT_UDP;
	return L3_OK;
}

/*
 * UDP header.  Returns 0 with *payload_len = the datagram length the header
 * claims (checked against the packet), 1 when the header is there but its
 * length lies, -1 when the header itself is cut off.
 */
static __always_inline int parse_udp(struct cursor *c, struct udphdr **udph, __u32 *payload_len)
{
	struct udphdr *udp = CURSOR_PULL(c, sizeof(*udp));
	if (!udp)
		return -1;
	*udph = udp;
	__u32 len = bpf_ntohs(udp->len);
	if (len < sizeof(*udp))
		return 1;
	len -= sizeof(*udp);
	if (c->pos + len > c->end)
		return 1;
	*payload_len = len;
	return 0;
}

#endif /* SPLITRELAY_PARSE_H */
