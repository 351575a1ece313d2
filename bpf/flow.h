/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * What a packet writes into a flow entry (struct sr_flow, splitrelay.h).  The
 * table calls (open, look up) are in relay.c: bcc rewrites map calls there only.
 */
#ifndef SPLITRELAY_FLOW_H
#define SPLITRELAY_FLOW_H

/* A new flow of client packets toward backend_id, opened by the session `ufrag`. */
static __always_inline void flow_init(struct sr_flow *f, __u32 backend_id, const __u8 *client_mac,
				      const struct sr_ufrag_key *ufrag, __u64 now)
{
	f->backend_id = backend_id;
	__builtin_memcpy(f->client_mac, client_mac, ETH_ALEN);
	f->created_ns = now;
	f->last_seen_ns = now;
	f->ufrag = *ufrag;
}

/*
 * A client packet forwarded on the flow (concurrent CPUs add atomically; last_seen may race, harmlessly).
 * `now` may come from the coarse clock (route_by_flow), up to a tick behind a precise stamp of a
 * consent check just before: last_seen never moves back.
 */
static __always_inline void flow_touch(struct sr_flow *f, __u32 bytes, __u64 now)
{
	if (now > f->last_seen_ns)
		f->last_seen_ns = now;
	__sync_fetch_and_add(&f->packets, 1);
	__sync_fetch_and_add(&f->bytes, bytes);
}

/* A reply forwarded on the flow toward its client. */
static __always_inline void flow_touch_rx(struct sr_flow *f, __u32 bytes)
{
	__sync_fetch_and_add(&f->rx_packets, 1);
	__sync_fetch_and_add(&f->rx_bytes, bytes);
}

#endif /* SPLITRELAY_FLOW_H */
