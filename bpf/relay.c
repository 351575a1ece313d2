/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * splitrelay XDP data plane.
 *
 * xdp_public   public interface: steer every WebRTC packet for the relay port to
 *              the transceiver that owns its session (STUN ufrag, routing hint,
 *              then the learned 5-tuple flow), DNAT + redirect (XDP_TX when the backend
 *              sits behind the same interface).
 * xdp_internal internal interface(s): SNAT transceiver replies to the relay's
 *              public address and port, redirect out of the public interface,
 *              only onto a flow of that transceiver (no reflector).
 * A client's request opens a *pending* flow (STUN only); its backend's answer
 * confirms it (issue 22 §3, docs/DESIGN.md "Pending and confirmed flows").
 * With sr_config.translate (issue 12 §1, docs/DESIGN.md) both sides translate:
 * inbound the source also becomes (relay internal address, a per-flow port from
 * the port_pool queue); outbound a reply to that port, from that flow's backend
 * only, goes back to the client (port_slots is the reverse table).
 *
 * All policy (which backends and sessions exist, ageing) lives in the Python
 * agent; this file only decides per packet.  Compiled by bcc with -I bpf/ and
 * -DSR_PIN_DIR="/sys/fs/bpf/splitrelay/<instance>".
 *
 * One return convention (consts.h): every decision helper returns an XDP action,
 * its reason set in pkt.stat by verdict(), or FURTHER_PROCESSING; the caller stops
 * at the first action.  Each program has one exit, record_verdict(), that counts
 * the packet under its reason.  Headers by concern: splitrelay.h (shared with
 * Python), consts.h, structs.h, maps.h, parse.h, csum.h, nat.h, stun.h, hint.h,
 * flow.h.  The helpers that call maps are here: bcc rewrites map calls only in
 * this file (maps.h).
 */
#include <uapi/linux/bpf.h>
#include "splitrelay.h"
#include "consts.h"
#include "structs.h"
#include "maps.h"
#include "parse.h"
#include "csum.h"
#include "hint.h"
#include "stun.h"
#include "nat.h"
#include "flow.h"

/* The one exit of each program (xdp-tutorial's xdp_stats_record_action): count the packet under its reason. */
static __always_inline int record_verdict(const struct pkt *p, int action)
{
	__u32 stat = p->stat;
	struct sr_counter *c = stats.lookup(&stat);
	if (c) {
		c->packets += 1;
		c->bytes += p->bytes;
	}
	return action;
}

/*
 * Send the frame out of devmap slot `slot`, counted as `stat`: XDP_TX when that is
 * the interface it came in on, else bpf_redirect_map.  An empty slot (XDP_ABORTED
 * from the map) or a failed redirect is dropped and counted as `fail_stat`.
 */
static __always_inline int send_to_slot(struct xdp_md *ctx, struct pkt *p, __u32 slot, __u32 stat,
					__u32 fail_stat)
{
	__u32 *ifindex = tx_ports.lookup(&slot);
	if (!ifindex)
		return verdict(p, fail_stat, XDP_DROP);
	if (*ifindex == ctx->ingress_ifindex)
		return verdict(p, stat, XDP_TX);
	int act = tx_ports.redirect_map(slot, 0);
	if (act != XDP_REDIRECT)
		return verdict(p, fail_stat, XDP_DROP);
	return verdict(p, stat, act);
}

/*
 * DNAT toward the backend (and with translation the source to the relay's internal address and
 * port of the flow's pair xpair), rewrite MACs, drop a VLAN tag, and send it out of the backend's slot.
 */
static __always_inline int forward_to_backend(struct xdp_md *ctx, struct pkt *p, const struct sr_config *cfg,
					      const struct sr_backend *b, __u32 xpair, __u32 stat)
{
	int act = rewrite_dst_to_backend(p, b);
	if (act != FURTHER_PROCESSING)
		return act;
	if (cfg->translate) {
		act = rewrite_src_to_internal(p, cfg, xpair);
		if (act != FURTHER_PROCESSING)
			return act;
	}
	set_macs(p->eth, b->dmac, b->smac);
	act = strip_vlan_tag(ctx, p);
	if (act != FURTHER_PROCESSING)
		return act;
	return send_to_slot(ctx, p, b->tx_slot, stat, SR_STAT_IN_DROP_REDIRECT);
}

/*
 * A ufrag no session holds: the backend its routing hint names, if this relay's
 * key and policy let hints route and that backend is registered.
 */
static __always_inline int backend_of_hint(struct pkt *p, const struct sr_config *cfg,
					   const struct sr_ufrag_key *ukey, __u32 ulen, __u32 *backend_id)
{
	int hinted = hint_decode(ukey, ulen, cfg);
	if (hinted == HINT_FORGED)
		return verdict(p, SR_STAT_IN_DROP_FORGED_HINT, XDP_DROP);
	if (hinted <= 0)
		return verdict(p, SR_STAT_IN_DROP_UNKNOWN_UFRAG, XDP_DROP);
	*backend_id = hinted;
	if (!backends.lookup(backend_id))
		return verdict(p, SR_STAT_IN_DROP_NO_BACKEND, XDP_DROP);
	if (cfg->policy != SR_POLICY_HINT)
		return verdict(p, SR_STAT_IN_DROP_UNKNOWN_UFRAG, XDP_DROP);
	return FURTHER_PROCESSING;
}

/*
 * Translate: take a free (address set, port) pair for the client's new flow toward backend_id and
 * point its reverse slot at them.  bpf_map_pop_elem is atomic, so two CPUs never get the same pair;
 * an empty pool refuses the flow (no live flow is ever evicted for a new one).
 */
static __always_inline int claim_port(struct pkt *p, const struct sr_addr_key *client, __u32 backend_id,
				      struct sr_flow *nf)
{
	__u32 got = 0;
	if (port_pool.pop(&got))
		return verdict(p, SR_STAT_IN_DROP_PORT_POOL_EMPTY, XDP_DROP);
	struct sr_port_slot *slot = port_slots.lookup(&got);
	if (!slot || !(got & 0xffff)) {   /* port 0 never names a flow: the agent never pushes it */
		return verdict(p, SR_STAT_IN_DROP_PORT_POOL_EMPTY, XDP_DROP);
	}
	slot->client = *client;
	slot->backend_id = backend_id;
	nf->xlate_port = bpf_htons((__u16)got);
	nf->xlate_addr = got >> 16;
	return FURTHER_PROCESSING;
}

/* Translate: a pair claimed for a flow that could not be stored goes straight back (no reply used it). */
static __always_inline void unclaim_port(__u32 pair)
{
	struct sr_port_slot *slot = port_slots.lookup(&pair);
	if (slot)
		slot->client.family = 0;
	port_pool.push(&pair, 0);
}

/* Translate: a flow that moves to another backend keeps its pair; replies must now come from there. */
static __always_inline void repoint_port(__u32 pair, __u32 backend_id)
{
	struct sr_port_slot *slot = port_slots.lookup(&pair);
	if (slot && (pair & 0xffff))
		slot->backend_id = backend_id;
}

static __always_inline int same_ufrag(const struct sr_ufrag_key *a, const struct sr_ufrag_key *b)
{
	const __u64 *x = (const __u64 *)a->ufrag, *y = (const __u64 *)b->ufrag;   /* both 8-aligned */
	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

static __always_inline int same_addr(const struct sr_addr_key *a, const struct sr_addr_key *b)
{
	return a->addr[0] == b->addr[0] && a->addr[1] == b->addr[1] && a->addr[2] == b->addr[2] &&
	       a->addr[3] == b->addr[3] && a->port == b->port && a->family == b->family;
}

/* The confirmed flows a ufrag holds: its session's count, else (a routing hint no session holds) its
 * pending state's. */
static __always_inline __u32 confirmed_flows(const struct sr_ufrag_key *ukey, const struct sr_session *sess)
{
	if (sess)
		return sess->flows;
	struct sr_pending *pd = pending.lookup((struct sr_ufrag_key *)ukey);
	if (!pd)
		return 0;
	return pd->confirmed;
}

/*
 * A pending flow enters its ufrag's ring, replacing the oldest: the flow that slot named goes if it
 * is still a pending flow of this ufrag (with its translation pair, straight back to the pool's
 * tail: it never forwarded media, and the FIFO pool hands it out again only after every other free
 * pair).  So a ufrag never holds more than SR_PENDING_FLOWS pending flows, and a new request, the
 * real client's too, always gets in.  Concurrent CPUs may race on the cursor: a slot is then
 * written twice and one flow waits for the agent's pending timeout instead.
 */
static __always_inline void enter_pending_ring(const struct sr_config *cfg, const struct sr_addr_key *client,
					       const struct sr_ufrag_key *ukey, __u64 now)
{
	struct sr_pending *pd = pending.lookup((struct sr_ufrag_key *)ukey);
	if (!pd) {
		struct sr_pending fresh = {};
		pending.update((struct sr_ufrag_key *)ukey, &fresh);
		pd = pending.lookup((struct sr_ufrag_key *)ukey);
		if (!pd)
			return;
	}
	__u32 i = pd->next & (SR_PENDING_FLOWS - 1);
	pd->next = i + 1;
	struct sr_addr_key old = pd->client[i];
	__u64 old_ns = pd->opened_ns[i];
	pd->client[i] = *client;
	pd->opened_ns[i] = now;
	if (!old.family || same_addr(&old, client))
		return;
	struct sr_flow *of = flows.lookup(&old);
	if (!of || !of->pending || of->created_ns != old_ns || !same_ufrag(&of->ufrag, ukey))
		return;
	__u32 pair = xlate_pair(of->xlate_addr, of->xlate_port);
	int had_port = of->xlate_port != 0;
	if (!flows.delete(&old) && cfg->translate && had_port)
		unclaim_port(pair);
}

/*
 * Open the client's flow toward backend_id, or refresh it when it already goes there (a consent
 * check, or an ICE restart on the same 5-tuple).  A new flow is pending until the backend answers
 * (reply_to_client); it enters the ufrag's ring of pending flows first.  A confirmed flow never moves
 * to another backend for a request (RTP-Bleed style takeover: flow_takeover), and a ufrag whose
 * confirmed flows fill the allowance opens no more; a full table refuses.
 */
static __always_inline int open_flow(struct pkt *p, const struct sr_config *cfg, struct sr_session *sess,
				     struct sr_addr_key *client, __u32 backend_id,
				     const struct sr_ufrag_key *ukey, __u64 now, __u32 *xpair)
{
	struct sr_flow *f = flows.lookup(client);
	if (f && f->backend_id == backend_id) {
		flow_touch(f, p->bytes, now);
		__builtin_memcpy(f->client_mac, p->eth->h_source, ETH_ALEN);
		if (f->pending && !same_ufrag(&f->ufrag, ukey)) {   /* stays bounded under its new ufrag */
			f->created_ns = now;
			enter_pending_ring(cfg, client, ukey, now);
		}
		f->ufrag = *ukey;
		*xpair = xlate_pair(f->xlate_addr, f->xlate_port);
		return FURTHER_PROCESSING;
	}
	if (f && !f->pending)
		return verdict(p, SR_STAT_IN_DROP_TAKEOVER, XDP_DROP);
	if (!f && cfg->max_session_flows && confirmed_flows(ukey, sess) >= cfg->max_session_flows)
		return verdict(p, SR_STAT_IN_DROP_SESSION_FLOWS, XDP_DROP);
	/* first into the ring: a full ring hands its oldest pending flow's port back before this one takes one */
	enter_pending_ring(cfg, client, ukey, now);
	struct sr_flow nf = {};
	flow_init(&nf, backend_id, p->eth->h_source, ukey, now);
	nf.packets = 1;
	nf.bytes = p->bytes;
	nf.pending = 1;
	if (cfg->translate) {
		if (f) {
			nf.xlate_port = f->xlate_port;
			nf.xlate_addr = f->xlate_addr;
			repoint_port(xlate_pair(f->xlate_addr, f->xlate_port), backend_id);
		} else {
			int act = claim_port(p, client, backend_id, &nf);
			if (act != FURTHER_PROCESSING)
				return act;
		}
		*xpair = xlate_pair(nf.xlate_addr, nf.xlate_port);
	}
	/* A new flow is inserted, never written over one another CPU opened meanwhile: that
	 * one's port would leak (the race costs this packet, counted as a full table). */
	if (f ? flows.update(client, &nf) : flows.insert(client, &nf)) {
		if (cfg->translate && !f)
			unclaim_port(xlate_pair(nf.xlate_addr, nf.xlate_port));
		return verdict(p, SR_STAT_IN_DROP_FLOW_FULL, XDP_DROP);
	}
	return FURTHER_PROCESSING;
}

/*
 * A client's STUN message: a Binding Request is routed by its server ufrag (the
 * session's backend, else the routing hint's), opening its flow.  Other valid
 * STUN (consent responses, indications) is left to the flow: FURTHER_PROCESSING.
 */
static __always_inline int route_binding_request(struct xdp_md *ctx, struct pkt *p, const struct sr_config *cfg,
						 struct sr_addr_key *client)
{
	struct sr_ufrag_key ukey __attribute__((aligned(8))) = {};
	__u32 ulen = 0;
	int act = stun_server_ufrag(p, &ukey, &ulen);
	if (act != FURTHER_PROCESSING || !ulen)
		return act;

	__u32 backend_id = 0;
	__u32 stat = SR_STAT_IN_FWD_STUN_UFRAG;
	struct sr_session *sess = sessions.lookup(&ukey);
	if (sess) {
		backend_id = sess->backend_id;
	} else {
		act = backend_of_hint(p, cfg, &ukey, ulen, &backend_id);
		if (act != FURTHER_PROCESSING)
			return act;
		stat = SR_STAT_IN_FWD_STUN_HINT;
	}
	struct sr_backend *b = backends.lookup(&backend_id);
	if (!b)
		return verdict(p, SR_STAT_IN_DROP_NO_BACKEND, XDP_DROP);
	__u32 xpair = 0;
	act = open_flow(p, cfg, sess, client, backend_id, &ukey, bpf_ktime_get_ns(), &xpair);
	if (act != FURTHER_PROCESSING)
		return act;
	return forward_to_backend(ctx, p, cfg, b, xpair, stat);
}

/*
 * Everything after a flow's first request: to the backend the client's flow goes to.
 *
 * The hot path (every media packet), so its clock is the coarse one: bpf_ktime_get_ns
 * cost 40-60 ns of the program's ~310 here (BPF_PROG_TEST_RUN, 10^6 repeats of an
 * established flow's RTP, 2026-11-28: 313 ns with it, 274 with the coarse clock, 255
 * with none; in the lab's kernel BPF stats, median of 4 alternating runs, 348 vs 385 ns
 * unpinned and 278 vs 322 pinned; BENCHMARKS.md "Local ceiling").  The coarse clock is
 * the same CLOCK_MONOTONIC read at the last tick (<= 4 ms old at HZ 250), and
 * last_seen_ns only ages flows in seconds.  A flow's opening and its consent checks
 * (route_binding_request) keep the precise clock.  A pending flow carries STUN only.
 */
static __always_inline int route_by_flow(struct xdp_md *ctx, struct pkt *p, const struct sr_config *cfg,
					 struct sr_addr_key *client, const int stun)
{
	struct sr_flow *f = flows.lookup(client);
	if (!f || (cfg->translate && !f->xlate_port))   /* translating, a flow without a port is none */
		return verdict(p, SR_STAT_IN_DROP_NO_FLOW, XDP_DROP);
	if (f->pending && !stun)   /* DTLS and media wait for the backend's answer (docs/DESIGN.md) */
		return verdict(p, SR_STAT_IN_DROP_PENDING, XDP_DROP);
	__u32 backend_id = f->backend_id;
	struct sr_backend *b = backends.lookup(&backend_id);
	if (!b)
		return verdict(p, SR_STAT_IN_DROP_NO_BACKEND, XDP_DROP);
	flow_touch(f, p->bytes, bpf_ktime_get_coarse_ns());
	return forward_to_backend(ctx, p, cfg, b, xlate_pair(f->xlate_addr, f->xlate_port), SR_STAT_IN_FWD_FLOW);
}

/*
 * The one packet a backend may send to an address no flow names (docs/DESIGN.md "no reflector"):
 * its own connectivity check (USERNAME "client:server") for a session it owns, before the
 * client's request arrived.  It opens a confirmed flow charged to that session's allowance, so the
 * client's answer is routed at once (~500 ms of setup otherwise); anything else is dropped.
 */
static __always_inline int learn_flow_from_backend_check(struct pkt *p, const struct sr_config *cfg,
							 struct sr_addr_key *client, __u32 backend_id)
{
	__u32 zero = 0;
	struct sr_scratch *sc = scratch.lookup(&zero);
	if (!sc)
		return verdict(p, SR_STAT_OUT_DROP_NO_FLOW, XDP_DROP);
	struct sr_ufrag_key ukey __attribute__((aligned(8))) = {};
	if (stun_backend_check_ufrag(p, &ukey, sc) <= 0)
		return verdict(p, SR_STAT_OUT_DROP_NO_FLOW, XDP_DROP);
	struct sr_session *sess = sessions.lookup(&ukey);
	if (!sess || sess->backend_id != backend_id)
		return verdict(p, SR_STAT_OUT_DROP_NO_FLOW, XDP_DROP);
	if (cfg->max_session_flows && sess->flows >= cfg->max_session_flows)
		return verdict(p, SR_STAT_OUT_DROP_SESSION_FLOWS, XDP_DROP);
	struct sr_flow nf = {};
	flow_init(&nf, backend_id, cfg->gateway_mac, &ukey, bpf_ktime_get_ns());
	nf.rx_packets = 1;
	nf.rx_bytes = p->bytes;
	if (flows.insert(client, &nf))
		return verdict(p, SR_STAT_OUT_DROP_NO_FLOW, XDP_DROP);   /* full, or another CPU's flow */
	__sync_fetch_and_add(&sess->flows, 1);
	return FURTHER_PROCESSING;
}

/*
 * The flow's backend answered on a pending flow: a success response or its own check
 * (stun_confirms_flow) makes it confirmed, charged to its ufrag's allowance (a full one drops the
 * answer, so that client never gets media through).  Anything else from the backend passes on,
 * the flow still pending.
 */
static __always_inline int confirm_flow(struct pkt *p, const struct sr_config *cfg, struct sr_flow *f,
					__u32 *stat)
{
	if (!stun_confirms_flow(p))
		return FURTHER_PROCESSING;
	__u32 max = cfg->max_session_flows;
	struct sr_session *sess = sessions.lookup(&f->ufrag);
	if (sess) {
		if (max && sess->flows >= max)
			return verdict(p, SR_STAT_OUT_DROP_SESSION_FLOWS, XDP_DROP);
		__sync_fetch_and_add(&sess->flows, 1);
	} else {
		struct sr_pending *pd = pending.lookup(&f->ufrag);
		if (!pd) {   /* a hint's state pushed out of the LRU: start it again */
			struct sr_pending fresh = {};
			pending.update(&f->ufrag, &fresh);
			pd = pending.lookup(&f->ufrag);
			if (!pd)
				return verdict(p, SR_STAT_OUT_DROP_SESSION_FLOWS, XDP_DROP);
		}
		if (max && pd->confirmed >= max)
			return verdict(p, SR_STAT_OUT_DROP_SESSION_FLOWS, XDP_DROP);
		__sync_fetch_and_add(&pd->confirmed, 1);
	}
	f->pending = 0;
	*stat = SR_STAT_OUT_FWD_CONFIRM;
	return FURTHER_PROCESSING;
}

/* Is the packet addressed to the relay itself (a translation address, or one the agent listed)? */
static __always_inline int to_relay_itself(const struct pkt *p, const struct sr_config *cfg,
					   const struct sr_addr_key *dst)
{
	if (cfg->translate && internal_addr_set(p, cfg) >= 0)
		return 1;
	struct sr_addr_key host = *dst;
	host.port = 0;
	return local_addrs.lookup(&host) != NULL;
}

/*
 * DNAT: a packet from backend backend_id to `client`: forwarded (SNAT to the relay's public address
 * and port, toward the flow's client MAC) only on a flow of that backend, confirming it if pending,
 * or as the backend's check that opens one (internal side only: on the public side a backend's
 * source may be forged).  A flow of another backend, or none, drops it: the relay reflects nothing;
 * without a flow, what goes to the relay itself is passed to the kernel.
 */
static __always_inline int reply_to_client(struct xdp_md *ctx, struct pkt *p, const struct sr_config *cfg,
					   __u32 backend_id, struct sr_addr_key *client, const int internal_side)
{
	__u32 stat = SR_STAT_OUT_FWD;
	const __u8 *dmac = cfg->gateway_mac;
	struct sr_flow *f = flows.lookup(client);
	if (!f) {   /* looked at only without a flow: the relay's own addresses cost the media path nothing */
		if (to_relay_itself(p, cfg, client))
			return verdict(p, SR_STAT_OUT_PASS_LOCAL, XDP_PASS);
		if (!internal_side)
			return verdict(p, SR_STAT_OUT_DROP_NO_FLOW, XDP_DROP);
		int act = learn_flow_from_backend_check(p, cfg, client, backend_id);
		if (act != FURTHER_PROCESSING)
			return act;
		stat = SR_STAT_OUT_FWD_NO_FLOW;
	} else if (f->backend_id != backend_id) {
		return verdict(p, SR_STAT_OUT_DROP_NOT_FLOW_BACKEND, XDP_DROP);
	} else {
		if (f->pending) {
			int act = confirm_flow(p, cfg, f, &stat);
			if (act != FURTHER_PROCESSING)
				return act;
		}
		dmac = f->client_mac;
		flow_touch_rx(f, p->bytes);
	}
	int act = rewrite_src_to_relay(p, cfg);
	if (act != FURTHER_PROCESSING)
		return act;
	set_macs(p->eth, dmac, cfg->public_mac);
	return send_to_slot(ctx, p, cfg->public_slot, stat, SR_STAT_OUT_DROP_REDIRECT);
}

/*
 * Translate: a packet to the relay's internal address of set S and port P is a reply on the flow
 * holding the pair (S, P), if it comes from that flow's backend (address and port): source -> the relay's public
 * (address, port), destination -> the client, out of the public interface.  A reply to a port no
 * flow holds, or from anyone else, is dropped and counted: the internal side opens nothing.
 * FURTHER_PROCESSING when the packet is not addressed to the internal address.
 */
static __always_inline int reply_translated(struct xdp_md *ctx, struct pkt *p, const struct sr_config *cfg)
{
	int set = internal_addr_set(p, cfg);
	if (set < 0)
		return FURTHER_PROCESSING;
	__u32 port = bpf_ntohs(p->udp->dest);
	if (port < cfg->port_first || port > cfg->port_last)
		return FURTHER_PROCESSING;
	__u32 idx = xlate_pair(set, p->udp->dest);
	struct sr_port_slot *slot = port_slots.lookup(&idx);
	if (!slot || slot->client.family != (p->ip4 ? SR_FAMILY_V4 : SR_FAMILY_V6))
		return verdict(p, SR_STAT_OUT_DROP_UNALLOCATED_PORT, XDP_DROP);
	struct sr_addr_key client = slot->client;
	__u32 backend_id = slot->backend_id;
	struct sr_backend *b = backends.lookup(&backend_id);
	if (!b || !from_backend(p, b))
		return verdict(p, SR_STAT_OUT_DROP_NOT_FLOW_BACKEND, XDP_DROP);
	struct sr_flow *f = flows.lookup(&client);
	if (!f || f->xlate_port != p->udp->dest || f->xlate_addr != set)
		return verdict(p, SR_STAT_OUT_DROP_UNALLOCATED_PORT, XDP_DROP);   /* flow deleted; the slot goes next */
	__u32 stat = SR_STAT_OUT_FWD;
	int act;
	if (f->pending) {
		act = confirm_flow(p, cfg, f, &stat);
		if (act != FURTHER_PROCESSING)
			return act;
	}
	act = rewrite_src_to_relay(p, cfg);
	if (act != FURTHER_PROCESSING)
		return act;
	rewrite_endpoint(p, ADDR_OF_DEST, client.addr[0], client.addr, client.port);
	set_macs(p->eth, f->client_mac, cfg->public_mac);
	flow_touch_rx(f, p->bytes);
	return send_to_slot(ctx, p, cfg->public_slot, stat, SR_STAT_OUT_DROP_REDIRECT);
}

/*
 * A packet on the internal side (or one interface for both) from a backend: translated (a reply to
 * a flow's pair), or DNAT (reply_to_client).  A backend's packet to the relay itself goes to the
 * kernel (relay_address: e.g. sockets on its internal address), one to anywhere else without a
 * flow is dropped.  On the public side a backend's source is accepted only when that backend sits
 * behind the public interface (one interface for both), else it is forged: backend_on_public.
 * FURTHER_PROCESSING when the source is not a backend.
 */
static __always_inline int reply_from_backend(struct xdp_md *ctx, struct pkt *p, const struct sr_config *cfg,
					      const int internal_side)
{
	struct sr_addr_key src;
	build_addr_key(p, &src, ADDR_OF_SOURCE);
	__u32 *backend_id = backend_addrs.lookup(&src);
	__u32 bid = backend_id ? *backend_id : 0;
	if (backend_id && !internal_side) {
		struct sr_backend *b = backends.lookup(&bid);
		if (!b || b->tx_slot != cfg->public_slot)
			return verdict(p, SR_STAT_IN_DROP_BACKEND_SPOOF, XDP_DROP);
	}
	if (cfg->translate) {
		int act = reply_translated(ctx, p, cfg);
		if (act != FURTHER_PROCESSING)
			return act;
	}
	if (!backend_id)
		return FURTHER_PROCESSING;
	struct sr_addr_key dst;
	build_addr_key(p, &dst, ADDR_OF_DEST);
	if (!cfg->translate)
		return reply_to_client(ctx, p, cfg, bid, &dst, internal_side);
	if (to_relay_itself(p, cfg, &dst))
		return verdict(p, SR_STAT_OUT_PASS_LOCAL, XDP_PASS);
	return verdict(p, SR_STAT_OUT_DROP_NO_FLOW, XDP_DROP);   /* translating, only through a flow's pair */
}

static __always_inline int process_public(struct xdp_md *ctx, struct pkt *p)
{
	__u32 zero = 0;
	struct sr_config *cfg = config.lookup(&zero);
	if (!cfg || !cfg->enabled)
		return verdict(p, SR_STAT_IN_PASS_DISABLED, XDP_PASS);
	int act = parse_packet(ctx, p, SR_STAT_IN_PASS_OTHER);
	if (act != FURTHER_PROCESSING)
		return act;
	if (p->udp->dest != cfg->relay_port) {
		/* One interface may serve both sides: a backend's reply is SNATed here too. */
		if (!p->broken) {
			act = reply_from_backend(ctx, p, cfg, 0);
			if (act != FURTHER_PROCESSING)
				return act;
		}
		return verdict(p, SR_STAT_IN_PASS_OTHER, XDP_PASS);
	}
	if (p->broken)  /* a first fragment or a lying UDP length, for the relay port */
		return verdict(p, p->broken, XDP_DROP);

	if (p->payload_len < 1 || (void *)(p->payload + 1) > p->data_end)
		return verdict(p, SR_STAT_IN_DROP_UNKNOWN_CLASS, XDP_DROP);
	__u8 first = p->payload[0];
	struct sr_addr_key client;
	build_addr_key(p, &client, ADDR_OF_SOURCE);

	if (first <= RFC7983_STUN_LAST) {
		act = route_binding_request(ctx, p, cfg, &client);
		if (act != FURTHER_PROCESSING)
			return act;
	} else if (!((first >= RFC7983_DTLS_FIRST && first <= RFC7983_DTLS_LAST) ||
		     (first >= RFC7983_RTP_FIRST && first <= RFC7983_RTP_LAST))) {
		/* ZRTP 16..19, TURN ChannelData 64..79, and everything unassigned */
		return verdict(p, SR_STAT_IN_DROP_UNKNOWN_CLASS, XDP_DROP);
	}
	return route_by_flow(ctx, p, cfg, &client, first <= RFC7983_STUN_LAST);
}

static __always_inline int process_internal(struct xdp_md *ctx, struct pkt *p)
{
	__u32 zero = 0;
	struct sr_config *cfg = config.lookup(&zero);
	if (!cfg || !cfg->enabled)
		return verdict(p, SR_STAT_OUT_PASS_DISABLED, XDP_PASS);
	int act = parse_packet(ctx, p, SR_STAT_OUT_PASS_OTHER);
	if (act != FURTHER_PROCESSING)
		return act;
	if (!p->broken) {
		act = reply_from_backend(ctx, p, cfg, 1);
		if (act != FURTHER_PROCESSING)
			return act;
	}
	return verdict(p, SR_STAT_OUT_PASS_OTHER, XDP_PASS);
}

int xdp_public(struct xdp_md *ctx)
{
	struct pkt p = { .bytes = ctx->data_end - ctx->data };
	return record_verdict(&p, process_public(ctx, &p));
}

int xdp_internal(struct xdp_md *ctx)
{
	struct pkt p = { .bytes = ctx->data_end - ctx->data };
	return record_verdict(&p, process_internal(ctx, &p));
}
