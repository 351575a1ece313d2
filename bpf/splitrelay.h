/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * splitrelay: the single definition of every map key/value and counter that the
 * XDP programs and the Python agent share.  Python never re-declares these
 * structs: it takes the ctypes types bcc derives from this file (table.Key /
 * table.Leaf), and it reads the counter names from the SR_STATS X-macro below.
 *
 * Byte order: every address and port field is in network byte order (as on the
 * wire), so the data path copies them without conversion.  Times are
 * CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns == time.monotonic_ns()); a flow's
 * last_seen_ns from media is the coarse reading of that clock (<= one tick old, relay.c).
 */
#ifndef SPLITRELAY_H
#define SPLITRELAY_H

#define SR_UFRAG_MAX      32   /* RFC 8445 allows 4..256; we route on at most 32 */
#define SR_UFRAG_MIN      4
#define SR_STUN_MAX_ATTRS 16   /* bounded attribute walk before USERNAME */
#define SR_STUN_MAX_MSG   2048 /* longest Binding Request body routed by ufrag (ICE sends ~100 B) */
#define SR_MAX_BACKENDS   1024
#define SR_MAX_SESSIONS   65536
#ifndef SR_MAX_FLOWS
#define SR_MAX_FLOWS      1048576 /* the agent may compile a smaller table (-DSR_MAX_FLOWS=) */
#endif
#define SR_DEFAULT_SESSION_FLOWS 4 /* confirmed client 5-tuples one session may hold (ICE needs 1-2) */
/* Pending flows (opened by a client's Binding Request, not yet answered by the backend: STUN only).
 * Each ufrag keeps the last SR_PENDING_FLOWS of them in a ring; a new one replaces the oldest, so
 * spoofed requests can hold no more than that and never refuse the real client's (docs/DESIGN.md). */
#define SR_PENDING_FLOWS  4    /* power of two (ring index mask) */
#define SR_MAX_PENDING_UFRAGS 65536 /* LRU: ufrags with pending state (sessions, and hints no session holds) */
#define SR_MAX_LOCAL_ADDRS 64  /* the relay's own addresses a backend may send to (passed to the kernel) */
#define SR_MAX_TX_PORTS   64   /* devmap slots: 0 = public interface, 1.. = internal */
/* Translation (sr_config.translate): up to SR_MAX_XLATE_ADDRS internal addresses per family, paired
 * by position (set i = the i-th IPv4 and the i-th IPv6); each flow holds one (set, port) pair.  The
 * pool queue and the reverse array are sized for SR_XLATE_ADDRS sets (the agent compiles it from the
 * configured count, -DSR_XLATE_ADDRS=); a pair is (set << 16) | port, host order, the array index. */
#define SR_MAX_XLATE_ADDRS 16   /* 16 x 65,535 ports: the 1M-flow case; power of two (index mask) */
#ifndef SR_XLATE_ADDRS
#define SR_XLATE_ADDRS    1
#endif
#define SR_PORT_SLOTS     65536 /* reverse slots per address set, one per port */
#define SR_XLATE_PORT_MIN 10000 /* default range of flow ports, inclusive: below Linux's ephemeral */
#define SR_XLATE_PORT_MAX 32767 /* ports (32768..60999), so the relay host's own UDP keeps working */

#define SR_FAMILY_V4 4
#define SR_FAMILY_V6 6

/* sr_config.policy */
#define SR_POLICY_STRICT 0     /* only ufrags registered in the session map create flows */
#define SR_POLICY_HINT   1     /* a routing hint naming a registered backend may too */

/* Routing hint inside the server ufrag (see wire/hint.py for the encoder).
 * ufrag alphabet is the ice-char set A-Z a-z 0-9 + /, one char = 6 bits in
 * base64 order.  Version 1 is exactly 16 chars:
 *   [0]      version char, value 1 ('B')
 *   [1..3]   backend id, 18 bits big-endian (0 is reserved = "no backend")
 *   [4..15]  72 random bits
 */
#define SR_HINT_V1        1
#define SR_HINT_V1_LEN    16
#define SR_HINT_ID_BITS   18
/* Version 2 ('C'), keyed, also 16 chars:
 *   [0] version 2, [1..3] backend id (18 bits), [4..11] 48 random bits,
 *   [12..15] tag: low 24 bits of SipHash-2-4(hint_key, the 12 ASCII bytes [0..11]), big-endian.
 * A relay with a key routes only v2 hints whose tag checks, so a forged ufrag costs nothing. */
#define SR_HINT_V2        2
#define SR_HINT_MSG_LEN   12

/* sr_backend.flags */
#define SR_BACKEND_V4 0x1
#define SR_BACKEND_V6 0x2

struct sr_config {                  /* array map "config", single slot 0 */
	__be32 public_ip4;              /* relay's public IPv4 (SNAT source), 0 if none */
	__be32 public_ip6[4];           /* relay's public IPv6, all-zero if none */
	__be16 relay_port;              /* the one public UDP port */
	__u8   policy;                  /* SR_POLICY_* */
	__u8   enabled;                 /* 0 until the agent has written the config */
	__u8   public_mac[6];           /* source MAC for frames leaving the public iface */
	__u8   gateway_mac[6];          /* public next hop when no flow has learned one */
	__u32  public_slot;             /* devmap slot of the public interface */
	__u16  max_session_flows;       /* 0 = unlimited; new 5-tuples beyond it are refused */
	__u8   hint_key_set;            /* 1: only keyed (v2) hints route, and only if their tag checks */
	__u8   pad;
	__u8   hint_key[16];            /* SipHash-2-4 key shared by relays and transceivers */
	__be32 internal_ip4[SR_MAX_XLATE_ADDRS];    /* translate: set i's internal IPv4 (flows' source), 0 if none */
	__be32 internal_ip6[SR_MAX_XLATE_ADDRS * 4]; /* translate: set i's internal IPv6 at [4 i], all-zero if none
					     * (flat: bcc's ctypes mis-sizes a 2-D array member) */
	__u8   translate;               /* 1: translation on both sides (issue 12); 0: DNAT, client seen */
	__u8   xlate_addrs;             /* translate: address sets in use, 1..SR_XLATE_ADDRS */
	__u16  port_first;              /* translate: flow ports, host order; replies to the internal */
	__u16  port_last;               /* address outside them are the host's own (passed) */
};

struct sr_backend {                 /* hash "backends": __u32 backend id -> value */
	__be32 addr4;                   /* transceiver IPv4 (its one UDP mux port) */
	__be32 addr6[4];                /* transceiver IPv6, if SR_BACKEND_V6 */
	__be16 port;                    /* transceiver UDP mux port */
	__u8   flags;                   /* SR_BACKEND_* */
	__u8   pad;
	__u8   dmac[6];                 /* next-hop MAC toward the transceiver */
	__u8   smac[6];                 /* relay MAC on the internal iface */
	__u32  tx_slot;                 /* devmap slot of the internal iface */
};

struct sr_addr_key {                /* an (address, port) endpoint; v4 uses addr[0] only */
	__be32 addr[4];
	__be16 port;
	__u8   family;                  /* SR_FAMILY_* */
	__u8   pad;
};

struct sr_ufrag_key {               /* hash "sessions" key: server ufrag, zero padded */
	char ufrag[SR_UFRAG_MAX];
};

struct sr_session {                 /* hash "sessions" value */
	__u32 backend_id;
	__u32 flows;                    /* flows it opened; the agent recounts when it removes any */
	__u64 created_ns;
};

struct sr_flow {                    /* hash "flows" (full: refuse, never evict; maps.h): client sr_addr_key -> value */
	__u32 backend_id;
	__u8  client_mac[6];            /* source MAC the client's frames arrived with */
	__be16 xlate_port;              /* translate: the internal port it holds; 0 in DNAT */
	__u8  xlate_addr;               /* translate: ... on that address set (the pair's high half) */
	__u8  pending;                  /* 1: opened by a client's request, its backend has not answered yet:
					 * STUN only, no media (0 for entries pinned by older builds) */
	__u8  pad[2];                   /* (was alignment padding: the entry stays 184 B) */
	__u64 created_ns;
	__u64 last_seen_ns;             /* refreshed by every forwarded packet */
	__u64 packets;                  /* client -> transceiver */
	__u64 bytes;
	__u64 rx_packets;               /* transceiver -> client */
	__u64 rx_bytes;
	struct sr_ufrag_key ufrag;      /* session that created it, for cleanup */
};

struct sr_pending {                 /* LRU hash "pending": sr_ufrag_key -> value */
	__u32 next;                     /* ring cursor: the slot the next pending flow takes */
	__u32 confirmed;                /* a ufrag no session holds (routing hint): its confirmed flows */
	struct sr_addr_key client[SR_PENDING_FLOWS];   /* the ufrag's last pending flows (family 0: none) */
	__u64 opened_ns[SR_PENDING_FLOWS];             /* ... each flow's created_ns then: a slot evicts only
							* the flow it recorded, not a newer one of that client */
};

struct sr_port_slot {               /* array "port_slots", index = (address set << 16) | port, host order */
	struct sr_addr_key client;      /* the flow holding the port; family 0 = unallocated */
	__u32 backend_id;               /* the one backend whose replies may use it */
};

struct sr_counter {                 /* per-CPU array "stats", index = enum sr_stat */
	__u64 packets;
	__u64 bytes;
};

/* Every counter: X(enum suffix, direction, verdict, reason).  Python parses these
 * lines (edge/counters.py) to name the per-CPU slots; add new ones at the end. */
#define SR_STATS(X) \
	X(IN_FWD_STUN_UFRAG,   "ingress", "forwarded", "stun_ufrag")        \
	X(IN_FWD_STUN_HINT,    "ingress", "forwarded", "stun_hint")         \
	X(IN_FWD_FLOW,         "ingress", "forwarded", "flow")              \
	X(IN_DROP_NO_FLOW,     "ingress", "dropped",   "no_flow")           \
	X(IN_DROP_UNKNOWN_UFRAG, "ingress", "dropped", "unknown_ufrag")     \
	X(IN_DROP_NO_BACKEND,  "ingress", "dropped",   "unregistered_backend") \
	X(IN_DROP_BAD_STUN,    "ingress", "dropped",   "bad_stun")          \
	X(IN_DROP_NO_USERNAME, "ingress", "dropped",   "no_username")       \
	X(IN_DROP_BAD_USERNAME, "ingress", "dropped",  "bad_username")      \
	X(IN_DROP_UNKNOWN_CLASS, "ingress", "dropped", "unknown_class")     \
	X(IN_DROP_FRAGMENT,    "ingress", "dropped",   "fragment")          \
	X(IN_DROP_MALFORMED,   "ingress", "dropped",   "malformed")         \
	X(IN_DROP_FAMILY,      "ingress", "dropped",   "family_mismatch")   \
	X(IN_DROP_FLOW_FULL,   "ingress", "dropped",   "flow_table_full")   \
	X(IN_DROP_REDIRECT,    "ingress", "dropped",   "redirect_failed")   \
	X(IN_PASS_OTHER,       "ingress", "passed",    "not_relay_port")    \
	X(OUT_FWD,             "egress",  "forwarded", "backend")           \
	X(OUT_FWD_NO_FLOW,     "egress",  "forwarded", "backend_no_flow")   \
	X(OUT_DROP_FAMILY,     "egress",  "dropped",   "family_mismatch")   \
	X(OUT_DROP_REDIRECT,   "egress",  "dropped",   "redirect_failed")   \
	X(OUT_PASS_OTHER,      "egress",  "passed",    "not_backend")       \
	X(IN_PASS_DISABLED,    "ingress", "passed",    "not_configured")    \
	X(OUT_PASS_DISABLED,   "egress",  "passed",    "not_configured")    \
	X(IN_DROP_SESSION_FLOWS, "ingress", "dropped", "session_flow_limit") \
	X(IN_DROP_FORGED_HINT, "ingress", "dropped",   "forged_hint")       \
	X(IN_DROP_PORT_POOL_EMPTY, "ingress", "dropped", "port_pool_empty") \
	X(OUT_DROP_UNALLOCATED_PORT, "egress", "dropped", "unallocated_port") \
	X(OUT_DROP_NOT_FLOW_BACKEND, "egress", "dropped", "not_flow_backend") \
	X(IN_DROP_PENDING,     "ingress", "dropped",   "pending_flow")      \
	X(IN_DROP_TAKEOVER,    "ingress", "dropped",   "flow_takeover")     \
	X(IN_DROP_BACKEND_SPOOF, "ingress", "dropped", "backend_on_public") \
	X(IN_PASS_IPV6_EXT,    "ingress", "passed",    "ipv6_extension_header") \
	X(IN_PASS_LATER_FRAGMENT, "ingress", "passed", "later_fragment")    \
	X(OUT_FWD_CONFIRM,     "egress",  "forwarded", "confirmed")         \
	X(OUT_DROP_NO_FLOW,    "egress",  "dropped",   "no_flow")           \
	X(OUT_DROP_SESSION_FLOWS, "egress", "dropped", "session_flow_limit") \
	X(OUT_PASS_LOCAL,      "egress",  "passed",    "relay_address")

#define SR_STAT_ENUM(name, dir, verdict, reason) SR_STAT_##name,
enum sr_stat {
	SR_STATS(SR_STAT_ENUM)
	SR_STAT__MAX
};
#undef SR_STAT_ENUM

#endif /* SPLITRELAY_H */
