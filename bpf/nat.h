/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * Rewriting one side of the NAT, with incremental checksums (csum.h), and the
 * frame around it: MACs and the VLAN tag.  Decision helpers (an action or
 * FURTHER_PROCESSING, consts.h); no map calls here (see maps.h).
 */
#ifndef SPLITRELAY_NAT_H
#define SPLITRELAY_NAT_H

#include "consts.h"
#include "structs.h"
#include "csum.h"

/*
 * Rewrite the packet's source (ADDR_OF_SOURCE) or destination endpoint to (address
 * of its family, port), keeping the IPv4 and UDP checksums right (RFC 1624).
 */
static __always_inline void rewrite_endpoint(struct pkt *p, const int of_source, __be32 addr4,
					     const __be32 *addr6, __be16 port)
{
	__u32 delta = 0;
	if (p->ip4) {
		__be32 *a = of_source ? &p->ip4->saddr : &p->ip4->daddr;
		__u32 ipdelta = csum_delta32(0, *a, addr4);
		delta = ipdelta;
		*a = addr4;
		p->ip4->check = csum_apply(p->ip4->check, ipdelta);
	} else if (p->ip6) {
		__be32 *a = of_source ? p->ip6->saddr.in6_u.u6_addr32 : p->ip6->daddr.in6_u.u6_addr32;
		delta = csum_delta_addr6(0, a, addr6);
		__builtin_memcpy(a, addr6, 16);
	}
	__be16 *u = of_source ? &p->udp->source : &p->udp->dest;
	delta = csum_delta16(delta, *u, port);
	*u = port;
	udp_csum_update(&p->udp->check, delta, p->ip6 != NULL);
}

static __always_inline int addr6_set(const __be32 *a)
{
	return (a[0] | a[1] | a[2] | a[3]) != 0;
}

/* DNAT: the destination becomes the backend's (address, port) of the packet's family. */
static __always_inline int rewrite_dst_to_backend(struct pkt *p, const struct sr_backend *b)
{
	if (!(b->flags & (p->ip4 ? SR_BACKEND_V4 : SR_BACKEND_V6)))
		return verdict(p, SR_STAT_IN_DROP_FAMILY, XDP_DROP);
	rewrite_endpoint(p, ADDR_OF_DEST, b->addr4, b->addr6, b->port);
	return FURTHER_PROCESSING;
}

/* SNAT: the source becomes the relay's public (address, port) of the packet's family. */
static __always_inline int rewrite_src_to_relay(struct pkt *p, const struct sr_config *cfg)
{
	if (!(p->ip4 ? cfg->public_ip4 != 0 : addr6_set(cfg->public_ip6)))
		return verdict(p, SR_STAT_OUT_DROP_FAMILY, XDP_DROP);
	rewrite_endpoint(p, ADDR_OF_SOURCE, cfg->public_ip4, cfg->public_ip6, cfg->relay_port);
	return FURTHER_PROCESSING;
}

/* Translate: a flow's (address set, port) pair, as the pool and the reverse array hold it. */
static __always_inline __u32 xlate_pair(__u32 set, __be16 port)
{
	return (set << 16) | bpf_ntohs(port);
}

/* Translate, inbound: the source becomes the relay's internal (address of set, port) of the pair. */
static __always_inline int rewrite_src_to_internal(struct pkt *p, const struct sr_config *cfg, __u32 pair)
{
	__u32 set = (pair >> 16) & (SR_MAX_XLATE_ADDRS - 1);
	if (!(p->ip4 ? cfg->internal_ip4[set] != 0 : addr6_set(&cfg->internal_ip6[set * 4])))
		return verdict(p, SR_STAT_IN_DROP_FAMILY, XDP_DROP);
	rewrite_endpoint(p, ADDR_OF_SOURCE, cfg->internal_ip4[set], &cfg->internal_ip6[set * 4],
			 bpf_htons((__u16)pair));
	return FURTHER_PROCESSING;
}

/*
 * Translate, outbound: the address set whose internal address of the packet's family the packet
 * is addressed to, or -1.  At most SR_MAX_XLATE_ADDRS (16) compares, stopping at the configured
 * count: one for the default single set.  Straight-line code, not a loop: as a loop (even with
 * `#pragma unroll`) clang turned `i < 16 && i < n` into `i != n`, which 6.1's verifier cannot
 * bound ("invalid access to map value, value_size=388 off=388"); 6.12 and 6.18 accepted it.
 */
#define SR_SET4(i)                                                                    \
	do {                                                                          \
		if ((i) >= n)                                                         \
			return -1;                                                    \
		if (cfg->internal_ip4[i] && cfg->internal_ip4[i] == d4)              \
			return (i);                                                   \
	} while (0)
#define SR_SET6(i)                                                                    \
	do {                                                                          \
		if ((i) >= n)                                                         \
			return -1;                                                    \
		const __be32 *a = &cfg->internal_ip6[(i) * 4];                        \
		if (addr6_set(a) && d[0] == a[0] && d[1] == a[1] && d[2] == a[2] &&  \
		    d[3] == a[3])                                                     \
			return (i);                                                   \
	} while (0)
#define SR_SETS(CHECK)                                                                \
	CHECK(0); CHECK(1); CHECK(2); CHECK(3); CHECK(4); CHECK(5); CHECK(6); CHECK(7); \
	CHECK(8); CHECK(9); CHECK(10); CHECK(11); CHECK(12); CHECK(13); CHECK(14); CHECK(15)

static __always_inline int internal_addr_set(const struct pkt *p, const struct sr_config *cfg)
{
	_Static_assert(SR_MAX_XLATE_ADDRS == 16, "SR_SETS checks 16 address sets");
	__u32 n = cfg->xlate_addrs;
	if (p->ip4) {
		__be32 d4 = p->ip4->daddr;
		SR_SETS(SR_SET4);
		return -1;
	}
	if (!p->ip6)   /* never, after parse_packet; the verifier needs to see it */
		return -1;
	const __be32 *d = p->ip6->daddr.in6_u.u6_addr32;
	SR_SETS(SR_SET6);
	return -1;
}

/* Translate, outbound: does the packet come from backend b's (address, port) of its family? */
static __always_inline int from_backend(const struct pkt *p, const struct sr_backend *b)
{
	if (p->udp->source != b->port)
		return 0;
	if (p->ip4)
		return (b->flags & SR_BACKEND_V4) && p->ip4->saddr == b->addr4;
	if (!p->ip6)
		return 0;
	const __be32 *s = p->ip6->saddr.in6_u.u6_addr32;
	return (b->flags & SR_BACKEND_V6) && s[0] == b->addr6[0] && s[1] == b->addr6[1] &&
	       s[2] == b->addr6[2] && s[3] == b->addr6[3];
}

static __always_inline void set_macs(struct ethhdr *eth, const __u8 *dst, const __u8 *src)
{
	__builtin_memcpy(eth->h_dest, dst, ETH_ALEN);
	__builtin_memcpy(eth->h_source, src, ETH_ALEN);
}

/*
 * The internal network is untagged: slide the MACs over the frame's one VLAN tag
 * and drop it.  Every packet pointer in p is stale afterwards (only p->bytes and
 * p->stat may be used).
 */
static __always_inline int strip_vlan_tag(struct xdp_md *ctx, struct pkt *p)
{
	if (!p->vlan)
		return FURTHER_PROCESSING;
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *e = data;
	if ((void *)e + sizeof(*e) + sizeof(struct vlan_hdr_sr) > data_end)
		return verdict(p, SR_STAT_IN_DROP_MALFORMED, XDP_DROP);
	struct vlan_hdr_sr *vh = (void *)(e + 1);
	__be16 inner = vh->proto;
	unsigned char macs[2 * ETH_ALEN];
	__builtin_memcpy(macs, e, sizeof(macs));
	struct ethhdr *ne = (void *)e + sizeof(struct vlan_hdr_sr);
	__builtin_memcpy(ne, macs, sizeof(macs));
	ne->h_proto = inner;
	if (bpf_xdp_adjust_head(ctx, (int)sizeof(struct vlan_hdr_sr)))
		return verdict(p, SR_STAT_IN_DROP_MALFORMED, XDP_DROP);
	return FURTHER_PROCESSING;
}

#endif /* SPLITRELAY_NAT_H */
