/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * Structs of the data path alone: wire headers the uapi lacks and the parsed
 * packet the helpers pass around.  Map keys and values are in splitrelay.h.
 */
#ifndef SPLITRELAY_STRUCTS_H
#define SPLITRELAY_STRUCTS_H

struct vlan_hdr_sr {
	__be16 tci;
	__be16 proto;
};

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

struct sr_scratch {                 /* per-CPU working space (map "scratch"), not state */
	__u32 off;
	__u32 len;
};

/* One UDP packet to or from the relay, as parse_packet found it, and its verdict's reason. */
struct pkt {
	struct ethhdr  *eth;
	struct iphdr   *ip4;
	struct ipv6hdr *ip6;
	struct udphdr  *udp;
	unsigned char  *payload;        /* NULL unless the datagram is whole (broken == 0) */
	void           *data_end;
	__u32           payload_len;
	__u32           bytes;          /* the frame as it arrived: what every counter adds */
	__u32           broken;         /* 0, or the drop counter of a first fragment / lying length */
	__u32           stat;           /* enum sr_stat: why the program returns what it returns */
	int             vlan;
};

/* Decide: remember why, and return the action (see FURTHER_PROCESSING in consts.h). */
static __always_inline int verdict(struct pkt *p, __u32 stat, int action)
{
	p->stat = stat;
	return action;
}

#endif /* SPLITRELAY_STRUCTS_H */
