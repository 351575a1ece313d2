/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * splitrelay XDP data plane.
 *
 * xdp_public   public interface: steer every WebRTC packet for the relay port to
 *              the transceiver that owns its session (STUN ufrag, routing hint,
 *              then the learned 5-tuple flow), DNAT + redirect (XDP_TX when the backend
 *              sits behind the same interface).
 * xdp_internal internal interface(s): SNAT transceiver replies to the relay's
 *              public address and port, redirect out of the public interface.
 *
 * All policy (which backends and sessions exist, ageing) lives in the Python
 * agent; this file only decides per packet.  Compiled by bcc with -I bpf/ and
 * -DSR_PIN_DIR="/sys/fs/bpf/splitrelay/<instance>".
 */
#include <uapi/linux/bpf.h>
#include "splitrelay.h"
#include "parse.h"
#include "csum.h"
#include "hint.h"

#ifndef SR_PIN_DIR
#error "SR_PIN_DIR must name the pin directory of this relay instance"
#endif

#define STUN_HDR_LEN        20
#define STUN_MAGIC_COOKIE   0x2112A442
#define STUN_BINDING_REQ    0x0001
#define STUN_ATTR_USERNAME  0x0006

/*
 * bcc 0.26 has no pinned devmap macro: BPF_TABLE_PINNED("devmap", ...) gives a
 * table without redirect_map(), BPF_DEVMAP() one that is never pinned.  bcc
 * reads "maps/<type>:<pin path>" from the section name and rewrites .lookup()
 * and .redirect_map() by member name, so this declares both on a pinned devmap
 * (the value the program reads back is the slot's ifindex).
 */
#define SR_DEVMAP_PINNED(_name, _max_entries, _path)                       \
	struct _name##_table_t {                                           \
		__u32 key;                                                 \
		__u32 leaf;                                                \
		__u32 *(*lookup)(__u32 *);                                 \
		__u64 (*redirect_map)(int, int);                           \
		__u32 max_entries;                                         \
	};                                                                 \
	__attribute__((section("maps/devmap:" _path)))                     \
	struct _name##_table_t _name = { .max_entries = (_max_entries) }

BPF_TABLE_PINNED("array", __u32, struct sr_config, config, 1, SR_PIN_DIR "/config");
BPF_TABLE_PINNED("hash", __u32, struct sr_backend, backends, SR_MAX_BACKENDS, SR_PIN_DIR "/backends");
BPF_TABLE_PINNED("hash", struct sr_addr_key, __u32, backend_addrs, SR_MAX_BACKENDS * 2,
		 SR_PIN_DIR "/backend_addrs");
BPF_TABLE_PINNED("hash", struct sr_ufrag_key, struct sr_session, sessions, SR_MAX_SESSIONS,
		 SR_PIN_DIR "/sessions");
/* A plain hash, not LRU: when it is full, new flows are refused and counted and no live call
 * is ever evicted to make room for a flood. */
BPF_TABLE_PINNED("hash", struct sr_addr_key, struct sr_flow, flows, SR_MAX_FLOWS, SR_PIN_DIR "/flows");
struct sr_scratch {
	__u32 off;
	__u32 len;
};
BPF_PERCPU_ARRAY(scratch, struct sr_scratch, 1);   /* per-packet working space, not state */
BPF_TABLE_PINNED("percpu_array", __u32, struct sr_counter, stats, SR_STAT__MAX, SR_PIN_DIR "/stats");
SR_DEVMAP_PINNED(tx_ports, SR_MAX_TX_PORTS, SR_PIN_DIR "/tx_ports");

struct stun_hdr {
	__be16 type;
	__be16 len;
	__be32 cookie;
	__u8   tid[12];
};

struct stun_attr {
	__be16 type;
	__be16 len;
};

/* One parsed UDP packet to or from the relay. */
struct pkt {
	struct ethhdr  *eth;
	struct iphdr   *ip4;
	struct ipv6hdr *ip6;
	struct udphdr  *udp;
	unsigned char  *payload;
	__u32           payload_len;
	__u32           bytes;
	int             vlan;
};

static __always_inline int count(__u32 stat, __u32 bytes, int verdict)
{
	struct sr_counter *c = stats.lookup(&stat);
	if (c) {
		c->packets += 1;
		c->bytes += bytes;
	}
	return verdict;
}

/*
 * Send the frame out of devmap slot `slot`: XDP_TX when that is the interface it
 * came in on, else bpf_redirect_map.  Anything else (an empty slot gives
 * XDP_ABORTED) is a failure the caller counts and drops.
 */
static __always_inline int redirect_slot(struct xdp_md *ctx, __u32 slot)
{
	__u32 *ifindex = tx_ports.lookup(&slot);
	if (!ifindex)
		return XDP_ABORTED;
	if (*ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	return tx_ports.redirect_map(slot, 0);
}

static __always_inline int sent(int act)
{
	return act == XDP_REDIRECT || act == XDP_TX;
}

/*
 * Parse Eth/VLAN/IP/UDP.  Returns 0 when p is complete, -1 when the packet is
 * not a UDP packet we can judge (pass it), or a stat index (> 0) when p->udp is
 * readable but the packet is a fragment or lies about its length.
 */
static __always_inline int parse_packet(struct xdp_md *ctx, struct pkt *p, __u32 frag_stat,
					__u32 malformed_stat)
{
	struct cursor c = { .pos = (void *)(long)ctx->data, .end = (void *)(long)ctx->data_end };
	p->bytes = ctx->data_end - ctx->data;
	int proto = parse_eth(&c, &p->eth, &p->vlan);
	int r;

	if (proto == ETH_P_IP)
		r = parse_ipv4(&c, &p->ip4);
	else if (proto == ETH_P_IPV6)
		r = parse_ipv6(&c, &p->ip6);
	else
		return -1;
	if (r == L3_NOT_UDP || r == L3_SHORT)
		return -1;
	if (r == L3_FRAGMENT && (p->ip4->frag_off & bpf_htons(SR_IP_OFFSET)))
		return -1;  /* a later fragment carries no port: the kernel reassembles or drops it */
	int u = parse_udp(&c, &p->udp, &p->payload_len);
	if (u < 0)
		return -1;
	if (r == L3_FRAGMENT)
		return frag_stat;
	if (u > 0)
		return malformed_stat;
	p->payload = c.pos;
	return 0;
}

static __always_inline void client_key(const struct pkt *p, struct sr_addr_key *k, int src)
{
	__builtin_memset(k, 0, sizeof(*k));
	if (p->ip4) {
		k->family = SR_FAMILY_V4;
		k->addr[0] = src ? p->ip4->saddr : p->ip4->daddr;
	} else if (p->ip6) {
		k->family = SR_FAMILY_V6;
		__builtin_memcpy(k->addr, src ? p->ip6->saddr.in6_u.u6_addr32 : p->ip6->daddr.in6_u.u6_addr32,
				 16);
	}
	k->port = src ? p->udp->source : p->udp->dest;
}

enum stun_result {
	STUN_ROUTE_BY_FLOW = 0,     /* valid STUN that is not a Binding Request */
	STUN_HAVE_UFRAG = 1,
};

/*
 * Validate a STUN message and, for a Binding Request, find its USERNAME value.
 * Returns STUN_ROUTE_BY_FLOW for valid STUN that is not a Binding Request,
 * STUN_HAVE_UFRAG with *off and *value_len set, or -stat on a drop.
 */
static __always_inline int stun_find_username(struct pkt *p, void *data_end, __u32 *off_out, __u32 *len_out)
{
	struct stun_hdr *h = (void *)p->payload;
	if ((void *)(h + 1) > data_end || p->payload_len < STUN_HDR_LEN)
		return -SR_STAT_IN_DROP_BAD_STUN;
	__u32 msg_len = bpf_ntohs(h->len);
	if (h->cookie != bpf_htonl(STUN_MAGIC_COOKIE) || (msg_len & 3) ||
	    STUN_HDR_LEN + msg_len > p->payload_len)
		return -SR_STAT_IN_DROP_BAD_STUN;
	if (h->type != bpf_htons(STUN_BINDING_REQ))
		return STUN_ROUTE_BY_FLOW;

	if (msg_len > SR_STUN_MAX_MSG)
		return -SR_STAT_IN_DROP_BAD_STUN;
	__u32 end_off = STUN_HDR_LEN + msg_len;   /* <= payload_len, <= 20 + SR_STUN_MAX_MSG */
	__u32 off = STUN_HDR_LEN;

	for (int i = 0; i < SR_STUN_MAX_ATTRS; i++) {
		if (off + sizeof(struct stun_attr) > end_off)
			break;
		if (off > STUN_HDR_LEN + SR_STUN_MAX_MSG)
			return -SR_STAT_IN_DROP_BAD_STUN;
		struct stun_attr *a = (void *)(p->payload + off);
		if ((void *)(a + 1) > data_end)
			return -SR_STAT_IN_DROP_BAD_STUN;
		__u32 alen = bpf_ntohs(a->len);
		if (off + sizeof(*a) + alen > end_off)
			return -SR_STAT_IN_DROP_BAD_STUN;
		if (a->type == bpf_htons(STUN_ATTR_USERNAME)) {
			off += sizeof(*a);
			if (off > STUN_HDR_LEN + SR_STUN_MAX_MSG)
				return -SR_STAT_IN_DROP_BAD_STUN;
			*off_out = off;
			*len_out = alen;
			return STUN_HAVE_UFRAG;
		}
		off += sizeof(*a) + ((alen + 3) & ~3U);
	}
	return -SR_STAT_IN_DROP_NO_USERNAME;
}

/*
 * Copy the ufrag that starts at v[from] into key: ice-chars up to a ':' (ends_at_colon)
 * or up to the value's end.  Returns its length (SR_UFRAG_MIN..SR_UFRAG_MAX) or -1.
 */
static __always_inline int copy_ufrag(unsigned char *v, __u32 from, __u32 value_len, void *data_end,
				      struct sr_ufrag_key *key, int ends_at_colon)
{
	__u32 len = 0;
	int colon = 0;
	if (from > SR_UFRAG_MAX + 1)
		return -1;
#pragma unroll
	for (int j = 0; j < SR_UFRAG_MAX + 1; j++) {
		__u32 at = from + j;
		if (at >= value_len)
			break;
		if ((void *)(v + at + 1) > data_end)
			return -1;
		unsigned char ch = v[at];
		if (ch == ':') {
			colon = 1;
			break;
		}
		if (j >= SR_UFRAG_MAX || ice_char_value(ch) < 0)
			return -1;
		key->ufrag[j] = ch;
		len = j + 1;
	}
	if (colon != ends_at_colon || len < SR_UFRAG_MIN)
		return -1;
	return len;
}

/* For a client's Binding Request: the server ufrag, before the ':' of USERNAME. */
static __always_inline int stun_server_ufrag(struct pkt *p, void *data_end, struct sr_ufrag_key *key,
					     __u32 *ufrag_len)
{
	__u32 off = 0, value_len = 0;
	int s = stun_find_username(p, data_end, &off, &value_len);
	if (s != STUN_HAVE_UFRAG)
		return s;
	int len = copy_ufrag(p->payload + off, 0, value_len, data_end, key, 1);
	if (len < 0)
		return -SR_STAT_IN_DROP_BAD_USERNAME;
	*ufrag_len = len;
	return STUN_HAVE_UFRAG;
}

/*
 * For a transceiver's own connectivity check toward a client (USERNAME is
 * "client:server"): the server ufrag after the ':'.  Returns its length or -1.
 */
static __always_inline int stun_check_ufrag_of_backend(struct pkt *p, void *data_end, struct sr_ufrag_key *key)
{
	__u32 off = 0, value_len = 0;
	if (p->payload_len < 1 || (void *)(p->payload + 1) > data_end || p->payload[0] > 3)
		return -1;
	if (stun_find_username(p, data_end, &off, &value_len) != STUN_HAVE_UFRAG)
		return -1;
	/* Round-trip the offsets through a scratch slot: the verifier then sees one unknown
	 * (re-checked) offset instead of one state per attribute the walk stopped at. */
	__u32 zero = 0;
	struct sr_scratch *sc = scratch.lookup(&zero);
	if (!sc)
		return -1;
	*(volatile __u32 *)&sc->off = off;
	*(volatile __u32 *)&sc->len = value_len;
	off = *(volatile __u32 *)&sc->off;
	value_len = *(volatile __u32 *)&sc->len;
	if (off > STUN_HDR_LEN + SR_STUN_MAX_MSG || value_len > SR_STUN_MAX_MSG)
		return -1;
	unsigned char *v = p->payload + off;
	__u32 colon = 0;
	int found = 0;
#pragma unroll
	for (int j = 0; j < SR_UFRAG_MAX + 1; j++) {
		if (j >= value_len)
			break;
		if ((void *)(v + j + 1) > data_end)
			return -1;
		if (v[j] == ':') {
			colon = j;
			found = 1;
			break;
		}
	}
	if (!found)
		return -1;
	*(volatile __u32 *)&sc->off = colon;   /* the same, for where the colon was */
	colon = *(volatile __u32 *)&sc->off;
	if (colon > SR_UFRAG_MAX)
		return -1;
	return copy_ufrag(v, colon + 1, value_len, data_end, key, 0);
}

/* DNAT toward the backend, rewrite MACs, drop a VLAN tag, and redirect. */
static __always_inline int forward_to_backend(struct xdp_md *ctx, struct pkt *p, struct sr_backend *b,
					      __u32 stat)
{
	__u32 delta = 0;
	if (p->ip4) {
		if (!(b->flags & SR_BACKEND_V4))
			return count(SR_STAT_IN_DROP_FAMILY, p->bytes, XDP_DROP);
		__u32 ipdelta = csum_delta32(0, p->ip4->daddr, b->addr4);
		delta = ipdelta;
		p->ip4->daddr = b->addr4;
		p->ip4->check = csum_apply(p->ip4->check, ipdelta);
	} else if (p->ip6) {
		if (!(b->flags & SR_BACKEND_V6))
			return count(SR_STAT_IN_DROP_FAMILY, p->bytes, XDP_DROP);
		delta = csum_delta_addr6(0, p->ip6->daddr.in6_u.u6_addr32, b->addr6);
		__builtin_memcpy(p->ip6->daddr.in6_u.u6_addr32, b->addr6, 16);
	} else {
		return count(SR_STAT_IN_DROP_MALFORMED, p->bytes, XDP_DROP);
	}
	delta = csum_delta16(delta, p->udp->dest, b->port);
	p->udp->dest = b->port;
	udp_csum_update(&p->udp->check, delta, p->ip6 != NULL);

	__builtin_memcpy(p->eth->h_dest, b->dmac, ETH_ALEN);
	__builtin_memcpy(p->eth->h_source, b->smac, ETH_ALEN);
	if (p->vlan) {
		/* The internal network is untagged: slide the MACs over the tag. */
		void *data = (void *)(long)ctx->data;
		void *data_end = (void *)(long)ctx->data_end;
		struct ethhdr *e = data;
		if ((void *)e + sizeof(*e) + sizeof(struct vlan_hdr_sr) > data_end)
			return count(SR_STAT_IN_DROP_MALFORMED, p->bytes, XDP_DROP);
		struct vlan_hdr_sr *vh = (void *)(e + 1);
		__be16 inner = vh->proto;
		unsigned char macs[2 * ETH_ALEN];
		__builtin_memcpy(macs, e, sizeof(macs));
		struct ethhdr *ne = (void *)e + sizeof(struct vlan_hdr_sr);
		__builtin_memcpy(ne, macs, sizeof(macs));
		ne->h_proto = inner;
		if (bpf_xdp_adjust_head(ctx, (int)sizeof(struct vlan_hdr_sr)))
			return count(SR_STAT_IN_DROP_MALFORMED, p->bytes, XDP_DROP);
	}
	int act = redirect_slot(ctx, b->tx_slot);
	if (!sent(act))
		return count(SR_STAT_IN_DROP_REDIRECT, p->bytes, XDP_DROP);
	return count(stat, p->bytes, act);
}

static __always_inline void flow_touch(struct sr_flow *f, __u32 bytes, __u64 now)
{
	f->last_seen_ns = now;
	__sync_fetch_and_add(&f->packets, 1);
	__sync_fetch_and_add(&f->bytes, bytes);
}

/*
 * A reply from a registered backend: SNAT to the relay's public address and
 * port and send it out of the public interface.  Returns -1 when the packet is
 * not from a backend (the caller passes it).
 */
static __always_inline int backend_reply(struct xdp_md *ctx, struct sr_config *cfg, struct pkt *pp,
					 const int learn_flows)
{
	struct pkt p = *pp;
	struct sr_addr_key bkey;
	client_key(&p, &bkey, 1);
	__u32 *backend_id = backend_addrs.lookup(&bkey);
	if (!backend_id)
		return -1;

	__u32 delta = 0;
	if (p.ip4) {
		if (!cfg->public_ip4)
			return count(SR_STAT_OUT_DROP_FAMILY, p.bytes, XDP_DROP);
		__u32 ipdelta = csum_delta32(0, p.ip4->saddr, cfg->public_ip4);
		delta = ipdelta;
		p.ip4->saddr = cfg->public_ip4;
		p.ip4->check = csum_apply(p.ip4->check, ipdelta);
	} else if (p.ip6) {
		if (!(cfg->public_ip6[0] | cfg->public_ip6[1] | cfg->public_ip6[2] | cfg->public_ip6[3]))
			return count(SR_STAT_OUT_DROP_FAMILY, p.bytes, XDP_DROP);
		delta = csum_delta_addr6(0, p.ip6->saddr.in6_u.u6_addr32, cfg->public_ip6);
		__builtin_memcpy(p.ip6->saddr.in6_u.u6_addr32, cfg->public_ip6, 16);
	} else {
		return XDP_PASS;
	}
	delta = csum_delta16(delta, p.udp->source, cfg->relay_port);
	p.udp->source = cfg->relay_port;
	udp_csum_update(&p.udp->check, delta, p.ip6 != NULL);

	struct sr_addr_key ckey;
	client_key(&p, &ckey, 0);
	__u32 stat = SR_STAT_OUT_FWD_NO_FLOW;
	struct sr_flow *f = flows.lookup(&ckey);
	if (f && f->backend_id == *backend_id) {
		__builtin_memcpy(p.eth->h_dest, f->client_mac, ETH_ALEN);
		__sync_fetch_and_add(&f->rx_packets, 1);
		__sync_fetch_and_add(&f->rx_bytes, p.bytes);
		stat = SR_STAT_OUT_FWD;
	} else {
		__builtin_memcpy(p.eth->h_dest, cfg->gateway_mac, ETH_ALEN);
		/*
		 * The transceiver checks a client candidate before the client's own request
		 * arrived: learn the flow now, so the client's answer is routed at once instead
		 * of being dropped until a retransmission (~500 ms of setup time).
		 */
		struct sr_ufrag_key ukey = {};
		if (learn_flows && !f && stun_check_ufrag_of_backend(&p, (void *)(long)ctx->data_end, &ukey) > 0) {
			struct sr_flow nf = {};
			__u64 now = bpf_ktime_get_ns();
			nf.backend_id = *backend_id;
			__builtin_memcpy(nf.client_mac, cfg->gateway_mac, ETH_ALEN);
			nf.created_ns = now;
			nf.last_seen_ns = now;
			nf.rx_packets = 1;
			nf.rx_bytes = p.bytes;
			nf.ufrag = ukey;
			flows.update(&ckey, &nf);  /* full table: just no shortcut */
		}
	}
	__builtin_memcpy(p.eth->h_source, cfg->public_mac, ETH_ALEN);
	int act = redirect_slot(ctx, cfg->public_slot);
	if (!sent(act))
		return count(SR_STAT_OUT_DROP_REDIRECT, p.bytes, XDP_DROP);
	return count(stat, p.bytes, act);
}

int xdp_public(struct xdp_md *ctx)
{
	__u32 zero = 0;
	struct sr_config *cfg = config.lookup(&zero);
	__u32 bytes = ctx->data_end - ctx->data;
	if (!cfg || !cfg->enabled)
		return count(SR_STAT_IN_PASS_DISABLED, bytes, XDP_PASS);

	struct pkt p = {};
	int r = parse_packet(ctx, &p, SR_STAT_IN_DROP_FRAGMENT, SR_STAT_IN_DROP_MALFORMED);
	if (r < 0)  /* not IP/UDP, a later IPv4 fragment, IPv6 with extension headers */
		return count(SR_STAT_IN_PASS_OTHER, bytes, XDP_PASS);
	if (r > 0) {
		/* A first fragment or a lying UDP length: ours to drop only if it is for the relay port. */
		if (p.udp->dest != cfg->relay_port)
			return count(SR_STAT_IN_PASS_OTHER, bytes, XDP_PASS);
		return count(r, p.bytes, XDP_DROP);
	}
	if (p.udp->dest != cfg->relay_port) {
		/* One interface may serve both sides: a backend's reply is SNATed here too. */
		int reply = backend_reply(ctx, cfg, &p, 0);
		if (reply >= 0)
			return reply;
		return count(SR_STAT_IN_PASS_OTHER, p.bytes, XDP_PASS);
	}

	void *data_end = (void *)(long)ctx->data_end;
	if (p.payload_len < 1 || (void *)(p.payload + 1) > data_end)
		return count(SR_STAT_IN_DROP_UNKNOWN_CLASS, p.bytes, XDP_DROP);
	__u8 first = p.payload[0];

	struct sr_addr_key fkey;
	client_key(&p, &fkey, 1);
	__u64 now = bpf_ktime_get_ns();

	if (first <= 3) {   /* RFC 7983: STUN */
		struct sr_ufrag_key ukey = {};
		__u32 ulen = 0;
		int s = stun_server_ufrag(&p, data_end, &ukey, &ulen);
		if (s < 0)
			return count(-s, p.bytes, XDP_DROP);
		if (s == STUN_HAVE_UFRAG) {
			__u32 backend_id = 0;
			__u32 stat = SR_STAT_IN_FWD_STUN_UFRAG;
			struct sr_session *sess = sessions.lookup(&ukey);
			if (sess) {
				backend_id = sess->backend_id;
			} else {
				int hinted = hint_decode(&ukey, ulen, cfg);
				if (hinted == HINT_FORGED)
					return count(SR_STAT_IN_DROP_FORGED_HINT, p.bytes, XDP_DROP);
				if (hinted <= 0)
					return count(SR_STAT_IN_DROP_UNKNOWN_UFRAG, p.bytes, XDP_DROP);
				backend_id = hinted;
				if (!backends.lookup(&backend_id))
					return count(SR_STAT_IN_DROP_NO_BACKEND, p.bytes, XDP_DROP);
				if (cfg->policy != SR_POLICY_HINT)
					return count(SR_STAT_IN_DROP_UNKNOWN_UFRAG, p.bytes, XDP_DROP);
				stat = SR_STAT_IN_FWD_STUN_HINT;
			}
			struct sr_backend *b = backends.lookup(&backend_id);
			if (!b)
				return count(SR_STAT_IN_DROP_NO_BACKEND, p.bytes, XDP_DROP);

			struct sr_flow *f = flows.lookup(&fkey);
			if (f && f->backend_id == backend_id) {
				/* consent check (or ICE restart on the same 5-tuple): refresh */
				flow_touch(f, p.bytes, now);
				__builtin_memcpy(f->client_mac, p.eth->h_source, ETH_ALEN);
				f->ufrag = ukey;
			} else {
				/* a new 5-tuple for a registered session: within the session's allowance */
				if (sess && !f && cfg->max_session_flows &&
				    sess->flows >= cfg->max_session_flows)
					return count(SR_STAT_IN_DROP_SESSION_FLOWS, p.bytes, XDP_DROP);
				struct sr_flow nf = {};
				nf.backend_id = backend_id;
				__builtin_memcpy(nf.client_mac, p.eth->h_source, ETH_ALEN);
				nf.created_ns = now;
				nf.last_seen_ns = now;
				nf.packets = 1;
				nf.bytes = p.bytes;
				nf.ufrag = ukey;
				if (flows.update(&fkey, &nf))
					return count(SR_STAT_IN_DROP_FLOW_FULL, p.bytes, XDP_DROP);
				if (sess && !f)
					__sync_fetch_and_add(&sess->flows, 1);
			}
			return forward_to_backend(ctx, &p, b, stat);
		}
		/* other STUN (consent responses, indications): by flow, below */
	} else if ((first >= 20 && first <= 63) || (first >= 128 && first <= 191)) {
		/* DTLS, RTP/RTCP: by flow */
	} else {
		/* ZRTP 16..19, TURN ChannelData 64..79, and everything unassigned */
		return count(SR_STAT_IN_DROP_UNKNOWN_CLASS, p.bytes, XDP_DROP);
	}

	struct sr_flow *f = flows.lookup(&fkey);
	if (!f)
		return count(SR_STAT_IN_DROP_NO_FLOW, p.bytes, XDP_DROP);
	__u32 backend_id = f->backend_id;
	struct sr_backend *b = backends.lookup(&backend_id);
	if (!b)
		return count(SR_STAT_IN_DROP_NO_BACKEND, p.bytes, XDP_DROP);
	flow_touch(f, p.bytes, now);
	return forward_to_backend(ctx, &p, b, SR_STAT_IN_FWD_FLOW);
}

int xdp_internal(struct xdp_md *ctx)
{
	__u32 zero = 0;
	struct sr_config *cfg = config.lookup(&zero);
	__u32 bytes = ctx->data_end - ctx->data;
	if (!cfg || !cfg->enabled)
		return count(SR_STAT_OUT_PASS_DISABLED, bytes, XDP_PASS);

	struct pkt p = {};
	int r = parse_packet(ctx, &p, SR_STAT_OUT_PASS_OTHER, SR_STAT_OUT_PASS_OTHER);
	if (r != 0)
		return count(SR_STAT_OUT_PASS_OTHER, bytes, XDP_PASS);
	r = backend_reply(ctx, cfg, &p, 1);
	if (r < 0)
		return count(SR_STAT_OUT_PASS_OTHER, p.bytes, XDP_PASS);
	return r;
}
