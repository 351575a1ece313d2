/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * Constants of the data path alone.  What Python reads too (map sizes, ufrag
 * limits, policies, counters) lives in splitrelay.h, the shared definitions.
 */
#ifndef SPLITRELAY_CONSTS_H
#define SPLITRELAY_CONSTS_H

/*
 * The one return convention of the decision helpers (Katran's FURTHER_PROCESSING):
 * a helper returns an XDP action, with the counter that explains it set in
 * pkt.stat by verdict(), or FURTHER_PROCESSING when it has not decided and the
 * caller goes on.  A caller stops at the first action; the program's one exit
 * counts it (record_verdict in relay.c).
 */
#define FURTHER_PROCESSING -1

/* Ethernet VLAN tags and IPv4 fragment bits, host order */
#define SR_ETH_P_8021Q  0x8100
#define SR_ETH_P_8021AD 0x88A8
#define SR_IP_MF        0x2000
#define SR_IP_OFFSET    0x1FFF

/* STUN (RFC 8489) */
#define STUN_HDR_LEN        20
#define STUN_MAGIC_COOKIE   0x2112A442
#define STUN_BINDING_REQ    0x0001
#define STUN_BINDING_OK     0x0101
#define STUN_ATTR_USERNAME  0x0006

/* RFC 7983 demultiplexing by the first payload byte */
#define RFC7983_STUN_LAST   3       /* 0..3 STUN */
#define RFC7983_DTLS_FIRST  20      /* 20..63 DTLS */
#define RFC7983_DTLS_LAST   63
#define RFC7983_RTP_FIRST   128     /* 128..191 RTP/RTCP */
#define RFC7983_RTP_LAST    191

#endif /* SPLITRELAY_CONSTS_H */
