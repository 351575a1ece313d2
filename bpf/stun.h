/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * The STUN attribute walk: validate a message and find the server ufrag in its
 * USERNAME, for a client's Binding Request ("server:client") and for the
 * transceiver's own check toward a client ("client:server").  wire/stun.py is
 * its deliberate Python twin (the differential fuzz compares the two).
 *
 * stun_find_username and stun_server_ufrag decide (an action or
 * FURTHER_PROCESSING, consts.h); copy_ufrag and stun_backend_check_ufrag only
 * extract, returning a length or -1.  No map calls here (see maps.h).
 */
#ifndef SPLITRELAY_STUN_H
#define SPLITRELAY_STUN_H

#include "consts.h"
#include "structs.h"
#include "hint.h"
#include "parse.h"

/*
 * Validate a STUN message and, for a Binding Request, find its USERNAME value.
 * FURTHER_PROCESSING with the value's offset and length in *off_out and
 * *len_out, or with *off_out left 0 for valid STUN that is not a Binding Request
 * (a USERNAME value never starts before byte 24); XDP_DROP as bad_stun or
 * no_username.
 */
static __always_inline int stun_find_username(struct pkt *p, __u32 *off_out, __u32 *len_out)
{
	void *data_end = p->data_end;
	struct stun_hdr *h = (void *)p->payload;
	if ((void *)(h + 1) > data_end || p->payload_len < STUN_HDR_LEN)
		return verdict(p, SR_STAT_IN_DROP_BAD_STUN, XDP_DROP);
	__u32 msg_len = bpf_ntohs(h->len);
	if (h->cookie != bpf_htonl(STUN_MAGIC_COOKIE) || (msg_len & 3) ||
	    STUN_HDR_LEN + msg_len > p->payload_len)
		return verdict(p, SR_STAT_IN_DROP_BAD_STUN, XDP_DROP);
	if (h->type != bpf_htons(STUN_BINDING_REQ))
		return FURTHER_PROCESSING;

	if (msg_len > SR_STUN_MAX_MSG)
		return verdict(p, SR_STAT_IN_DROP_BAD_STUN, XDP_DROP);
	__u32 end_off = STUN_HDR_LEN + msg_len;   /* <= payload_len, <= 20 + SR_STUN_MAX_MSG */
	__u32 off = STUN_HDR_LEN;

	for (int i = 0; i < SR_STUN_MAX_ATTRS; i++) {
		if (off + sizeof(struct stun_attr) > end_off)
			break;
		/*
		 * The check below follows from the one above, so LLVM drops it, yet the
		 * verifier cannot derive it from a sum: 6.1 then saw the packet offset
		 * as off + alen + ... up to umax=131096 and refused the read ("R0
		 * offset is outside of the packet"; no range past 64 KiB).  The barrier
		 * keeps it, on the register that is added to the payload pointer.
		 */
		SR_BARRIER_VAR(off);
		if (off > STUN_HDR_LEN + SR_STUN_MAX_MSG)
			return verdict(p, SR_STAT_IN_DROP_BAD_STUN, XDP_DROP);
		struct stun_attr *a = (void *)(p->payload + off);
		if ((void *)(a + 1) > data_end)
			return verdict(p, SR_STAT_IN_DROP_BAD_STUN, XDP_DROP);
		__u32 alen = bpf_ntohs(a->len);
		if (off + sizeof(*a) + alen > end_off)
			return verdict(p, SR_STAT_IN_DROP_BAD_STUN, XDP_DROP);
		if (a->type == bpf_htons(STUN_ATTR_USERNAME)) {
			off += sizeof(*a);
			SR_BARRIER_VAR(off);   /* the same */
			if (off > STUN_HDR_LEN + SR_STUN_MAX_MSG)
				return verdict(p, SR_STAT_IN_DROP_BAD_STUN, XDP_DROP);
			*off_out = off;
			*len_out = alen;
			return FURTHER_PROCESSING;
		}
		off += sizeof(*a) + ((alen + 3) & ~3U);
	}
	return verdict(p, SR_STAT_IN_DROP_NO_USERNAME, XDP_DROP);
}

/*
 * Copy the ufrag at the start of v (value_len bytes left in the value) into key:
 * ice-chars up to a ':' (ends_at_colon) or up to the value's end.  Returns its
 * length (SR_UFRAG_MIN..SR_UFRAG_MAX) or -1.
 */
static __always_inline int copy_ufrag(unsigned char *v, __u32 value_len, void *data_end,
				      struct sr_ufrag_key *key, int ends_at_colon)
{
	__u32 len = 0;
	int colon = 0;
#pragma unroll
	for (int j = 0; j < SR_UFRAG_MAX + 1; j++) {
		if (j >= value_len)
			break;
		if ((void *)(v + j + 1) > data_end)
			return -1;
		unsigned char ch = v[j];
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

/*
 * A client's Binding Request: the server ufrag, before the ':' of USERNAME, into key.
 * FURTHER_PROCESSING with *ufrag_len > 0, or with *ufrag_len left 0 for valid STUN
 * that is not a Binding Request (routed by flow); XDP_DROP as bad_stun,
 * no_username or bad_username.
 */
static __always_inline int stun_server_ufrag(struct pkt *p, struct sr_ufrag_key *key, __u32 *ufrag_len)
{
	__u32 off = 0, value_len = 0;
	int act = stun_find_username(p, &off, &value_len);
	if (act != FURTHER_PROCESSING || !off)
		return act;
	int len = copy_ufrag(p->payload + off, value_len, p->data_end, key, 1);
	if (len < 0)
		return verdict(p, SR_STAT_IN_DROP_BAD_USERNAME, XDP_DROP);
	*ufrag_len = len;
	return FURTHER_PROCESSING;
}

/*
 * A transceiver's own connectivity check toward a client (USERNAME is
 * "client:server"): the server ufrag after the ':', into key.  Returns its
 * length or -1.  sc is the per-CPU scratch slot (map "scratch"): the offsets
 * round-trip through it so the verifier sees one unknown (re-checked) offset
 * instead of one state per attribute the walk stopped at.
 */
static __always_inline int stun_backend_check_ufrag(struct pkt *p, struct sr_ufrag_key *key,
						    struct sr_scratch *sc)
{
	void *data_end = p->data_end;
	__u32 off = 0, value_len = 0;
	if (p->payload_len < 1 || (void *)(p->payload + 1) > data_end || p->payload[0] > RFC7983_STUN_LAST)
		return -1;
	if (stun_find_username(p, &off, &value_len) != FURTHER_PROCESSING || !off)
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
	/* a bounded loop, kept rolled by the barrier on j: a `#pragma unroll` here only made
	 * clang warn "loop not unrolled" on every load (same bytecode without it) */
	for (int j = 0; j < SR_UFRAG_MAX + 1; j++) {
		SR_BARRIER_VAR(j);
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
	/*
	 * Forget which way the scan ended: each exit left v with another checked
	 * range and value_len with another lower bound (> j), so the verifier walked
	 * copy_ufrag once per colon position (over its 1M-insn limit on 6.18 once the
	 * scan kept its constant bound, parse.h).  Both round-trip through the
	 * scratch slot, and the ufrag's pointer is made afresh.
	 */
	*(volatile __u32 *)&sc->off = colon;
	colon = *(volatile __u32 *)&sc->off;
	value_len = *(volatile __u32 *)&sc->len;
	if (colon > SR_UFRAG_MAX || colon >= value_len)   /* neither happens: for the verifier */
		return -1;
	return copy_ufrag(p->payload + off + colon + 1, value_len - colon - 1, data_end, key, 0);
}

/*
 * A backend's packet that confirms a pending flow toward its destination: a Binding success
 * response (the transceiver checked that client's MESSAGE-INTEGRITY, which the relay cannot) or
 * the transceiver's own Binding Request toward it (it chose to talk there).  Header only: the
 * sender is the flow's backend, checked by the caller.
 */
static __always_inline int stun_confirms_flow(const struct pkt *p)
{
	struct stun_hdr *h = (void *)p->payload;
	if ((void *)(h + 1) > p->data_end || p->payload_len < STUN_HDR_LEN ||
	    h->cookie != bpf_htonl(STUN_MAGIC_COOKIE))
		return 0;
	return h->type == bpf_htons(STUN_BINDING_OK) || h->type == bpf_htons(STUN_BINDING_REQ);
}

#endif /* SPLITRELAY_STUN_H */
