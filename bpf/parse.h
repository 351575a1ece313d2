/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * Header cursor and parse helpers.  Every read is preceded by a bounds check
 * against data_end, in a form the verifier can follow: the cursor only moves
 * forward by constant or explicitly bounded amounts.
 *
 * parse_eth/ipv4/ipv6/udp read one header each and return what they found;
 * parse_packet, the one the programs call, is a decision helper (an action or
 * FURTHER_PROCESSING, consts.h).  build_addr_key makes the (address, port) keys
 * of the flow and backend tables from a parsed packet.
 */
#ifndef SPLITRELAY_PARSE_H
#define SPLITRELAY_PARSE_H

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <linux/in.h>

#include "consts.h"
#include "structs.h"

struct cursor {
	void *pos;
	void *end;
};

/*
 * Hide what the compiler knows about var's value (no instruction is emitted, so
 * the verifier still knows it).  A loop counter behind it keeps its constant
 * bound check: LLVM otherwise folds `j < N && j < len` into one `j == min(N, len)`
 * exit that 6.1's verifier cannot decide for a variable len (it does not narrow
 * a range on `!=`), so it walks the loop until "The sequence of 8193 jumps is
 * too complex" (measured on Debian 12's 6.1 with its bcc 0.26/LLVM 14).
 * libbpf's barrier_var().
 */
#define SR_BARRIER_VAR(var) asm volatile("" : "+r"(var))

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
	L3_EXT_HEADER = -4, /* IPv6 with an extension header first: not parsed, passed */
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
	/*
	 * Options: the cursor moves to ip + hdr_len (<= 60: ihl is 4 bits), never by
	 * hdr_len - 20.  Debian 13's LLVM 19 computed that difference in a register
	 * the verifier saw as any u32 (umax=0xfffffffc), and a packet pointer whose
	 * offset may exceed 64 KiB gets no range from a data_end check, so the UDP
	 * header read after it was refused ("R5 offset is outside of the packet").
	 */
	if (hdr_len > sizeof(*ip)) {
		SR_BARRIER_VAR(hdr_len);   /* so the no-op mask below is emitted */
		void *l4 = (void *)ip + (hdr_len & 0x3c);
		if (l4 > c->end)
			return L3_SHORT;
		c->pos = l4;
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
	switch (ip6->nexthdr) {
	case IPPROTO_UDP:
		return L3_OK;
	case 0: case 43: case 44: case 50: case 51: case 60: case 135: case 139: case 140:
		return L3_EXT_HEADER;   /* hop-by-hop, routing, fragment, ESP, AH, destination, mobility, HIP, shim6 */
	default:
		return L3_NOT_UDP;
	}
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

/*
 * Parse Eth/VLAN/IP/UDP into p.  FURTHER_PROCESSING once p->udp is readable:
 * then p->broken is 0 for a whole datagram (p->payload set), or the drop counter
 * of a first IPv4 fragment or of a UDP length that lies, for the caller to apply
 * only to what is addressed to the relay port.  XDP_PASS, counted as pass_stat,
 * for what the relay cannot judge: not IP/UDP, a later IPv4 fragment (no port:
 * the kernel reassembles or drops it), IPv6 with extension headers.  On the public side
 * (pass_stat IN_PASS_OTHER) the last two have counters of their own, so a flood of them
 * is told apart from traffic for other ports.
 */
static __always_inline int parse_packet(struct xdp_md *ctx, struct pkt *p, __u32 pass_stat)
{
	struct cursor c = { .pos = (void *)(long)ctx->data, .end = (void *)(long)ctx->data_end };
	p->data_end = c.end;
	int proto = parse_eth(&c, &p->eth, &p->vlan);
	int r;

	if (proto == ETH_P_IP)
		r = parse_ipv4(&c, &p->ip4);
	else if (proto == ETH_P_IPV6)
		r = parse_ipv6(&c, &p->ip6);
	else
		return verdict(p, pass_stat, XDP_PASS);
	const int public_side = pass_stat == SR_STAT_IN_PASS_OTHER;
	if (r == L3_EXT_HEADER)
		return verdict(p, public_side ? SR_STAT_IN_PASS_IPV6_EXT : pass_stat, XDP_PASS);
	if (r == L3_NOT_UDP || r == L3_SHORT)
		return verdict(p, pass_stat, XDP_PASS);
	if (r == L3_FRAGMENT && (p->ip4->frag_off & bpf_htons(SR_IP_OFFSET)))
		return verdict(p, public_side ? SR_STAT_IN_PASS_LATER_FRAGMENT : pass_stat, XDP_PASS);
	int u = parse_udp(&c, &p->udp, &p->payload_len);
	if (u < 0)
		return verdict(p, pass_stat, XDP_PASS);
	if (r == L3_FRAGMENT)
		p->broken = SR_STAT_IN_DROP_FRAGMENT;
	else if (u > 0)
		p->broken = SR_STAT_IN_DROP_MALFORMED;
	else
		p->payload = c.pos;
	return FURTHER_PROCESSING;
}

#define ADDR_OF_SOURCE 1
#define ADDR_OF_DEST   0

/* The (address, port) the packet comes from (ADDR_OF_SOURCE) or goes to: a flow or backend key. */
static __always_inline void build_addr_key(const struct pkt *p, struct sr_addr_key *k, const int of_source)
{
	__builtin_memset(k, 0, sizeof(*k));
	if (p->ip4) {
		k->family = SR_FAMILY_V4;
		k->addr[0] = of_source ? p->ip4->saddr : p->ip4->daddr;
	} else if (p->ip6) {
		k->family = SR_FAMILY_V6;
		__builtin_memcpy(k->addr, of_source ? p->ip6->saddr.in6_u.u6_addr32 : p->ip6->daddr.in6_u.u6_addr32,
				 16);
	}
	k->port = of_source ? p->udp->source : p->udp->dest;
}

#endif /* SPLITRELAY_PARSE_H */
