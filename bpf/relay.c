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

/* DNAT toward the backend, rewrite MACs, drop a VLAN tag, and send it out of the backend's slot. */
static __always_inline int forward_to_backend(struct xdp_md *ctx, struct pkt *p, const struct sr_backend *b,
					      __u32 stat)
{
	int act = rewrite_dst_to_backend(p, b);
	if (act != FURTHER_PROCESSING)
		return act;
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
 * Open the client's flow toward backend_id, or refresh it when it already goes
 * there (a consent check, or an ICE restart on the same 5-tuple).  A new 5-tuple
 * of a registered session must fit the session's allowance; a full table refuses.
 */
static __always_inline int open_flow(struct pkt *p, const struct sr_config *cfg, struct sr_session *sess,
				     struct sr_addr_key *client, __u32 backend_id,
				     const struct sr_ufrag_key *ukey, __u64 now)
{
	struct sr_flow *f = flows.lookup(client);
	if (f && f->backend_id == backend_id) {
		flow_touch(f, p->bytes, now);
		__builtin_memcpy(f->client_mac, p->eth->h_source, ETH_ALEN);
		f->ufrag = *ukey;
		return FURTHER_PROCESSING;
	}
	if (sess && !f && cfg->max_session_flows && sess->flows >= cfg->max_session_flows)
		return verdict(p, SR_STAT_IN_DROP_SESSION_FLOWS, XDP_DROP);
	struct sr_flow nf = {};
	flow_init(&nf, backend_id, p->eth->h_source, ukey, now);
	nf.packets = 1;
	nf.bytes = p->bytes;
	if (flows.update(client, &nf))
		return verdict(p, SR_STAT_IN_DROP_FLOW_FULL, XDP_DROP);
	if (sess && !f)
		__sync_fetch_and_add(&sess->flows, 1);
	return FURTHER_PROCESSING;
}

/*
 * A client's STUN message: a Binding Request is routed by its server ufrag (the
 * session's backend, else the routing hint's), opening its flow.  Other valid
 * STUN (consent responses, indications) is left to the flow: FURTHER_PROCESSING.
 */
static __always_inline int route_binding_request(struct xdp_md *ctx, struct pkt *p, const struct sr_config *cfg,
						 struct sr_addr_key *client, __u64 now)
{
	struct sr_ufrag_key ukey = {};
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
	act = open_flow(p, cfg, sess, client, backend_id, &ukey, now);
	if (act != FURTHER_PROCESSING)
		return act;
	return forward_to_backend(ctx, p, b, stat);
}

/* Everything after a flow's first request: to the backend the client's flow goes to. */
static __always_inline int route_by_flow(struct xdp_md *ctx, struct pkt *p, struct sr_addr_key *client,
					 __u64 now)
{
	struct sr_flow *f = flows.lookup(client);
	if (!f)
		return verdict(p, SR_STAT_IN_DROP_NO_FLOW, XDP_DROP);
	__u32 backend_id = f->backend_id;
	struct sr_backend *b = backends.lookup(&backend_id);
	if (!b)
		return verdict(p, SR_STAT_IN_DROP_NO_BACKEND, XDP_DROP);
	flow_touch(f, p->bytes, now);
	return forward_to_backend(ctx, p, b, SR_STAT_IN_FWD_FLOW);
}

/*
 * The transceiver checks a client candidate before the client's own request
 * arrived: learn the flow from its check, so the client's answer is routed at
 * once instead of being dropped until a retransmission (~500 ms of setup time).
 * A full table or a check without a clean server ufrag just teaches nothing.
 */
static __always_inline void learn_flow_from_backend_check(struct pkt *p, const struct sr_config *cfg,
							  struct sr_addr_key *client, __u32 backend_id)
{
	__u32 zero = 0;
	struct sr_scratch *sc = scratch.lookup(&zero);
	if (!sc)
		return;
	struct sr_ufrag_key ukey = {};
	if (stun_backend_check_ufrag(p, &ukey, sc) <= 0)
		return;
	struct sr_flow nf = {};
	flow_init(&nf, backend_id, cfg->gateway_mac, &ukey, bpf_ktime_get_ns());
	nf.rx_packets = 1;
	nf.rx_bytes = p->bytes;
	flows.update(client, &nf);
}

/*
 * A packet from a registered backend: SNAT to the relay's public address and
 * port, toward the flow's client MAC (the gateway's when no flow of this backend
 * knows it), out of the public interface.  FURTHER_PROCESSING when the source is
 * not a backend.
 */
static __always_inline int reply_to_client(struct xdp_md *ctx, struct pkt *p, const struct sr_config *cfg,
					   const int learn_flows)
{
	struct sr_addr_key bkey;
	build_addr_key(p, &bkey, ADDR_OF_SOURCE);
	__u32 *backend_id = backend_addrs.lookup(&bkey);
	if (!backend_id)
		return FURTHER_PROCESSING;
	int act = rewrite_src_to_relay(p, cfg);
	if (act != FURTHER_PROCESSING)
		return act;

	struct sr_addr_key client;
	build_addr_key(p, &client, ADDR_OF_DEST);
	__u32 stat = SR_STAT_OUT_FWD_NO_FLOW;
	struct sr_flow *f = flows.lookup(&client);
	if (f && f->backend_id == *backend_id) {
		set_macs(p->eth, f->client_mac, cfg->public_mac);
		flow_touch_rx(f, p->bytes);
		stat = SR_STAT_OUT_FWD;
	} else {
		set_macs(p->eth, cfg->gateway_mac, cfg->public_mac);
		if (learn_flows && !f)
			learn_flow_from_backend_check(p, cfg, &client, *backend_id);
	}
	return send_to_slot(ctx, p, cfg->public_slot, stat, SR_STAT_OUT_DROP_REDIRECT);
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
			act = reply_to_client(ctx, p, cfg, 0);
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
	__u64 now = bpf_ktime_get_ns();

	if (first <= RFC7983_STUN_LAST) {
		act = route_binding_request(ctx, p, cfg, &client, now);
		if (act != FURTHER_PROCESSING)
			return act;
	} else if (!((first >= RFC7983_DTLS_FIRST && first <= RFC7983_DTLS_LAST) ||
		     (first >= RFC7983_RTP_FIRST && first <= RFC7983_RTP_LAST))) {
		/* ZRTP 16..19, TURN ChannelData 64..79, and everything unassigned */
		return verdict(p, SR_STAT_IN_DROP_UNKNOWN_CLASS, XDP_DROP);
	}
	return route_by_flow(ctx, p, &client, now);
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
		act = reply_to_client(ctx, p, cfg, 1);
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
