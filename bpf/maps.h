/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * Every map of the data path, pinned under SR_PIN_DIR so a program reload or an
 * agent restart keeps them (the agent lists the names in edge/datapath.py MAP_NAMES;
 * keys and values are defined in splitrelay.h).
 *
 * bcc rewrites map calls (flows.lookup(), tx_ports.redirect_map()) only in the
 * file it compiles, relay.c: declarations may live here, but every helper that
 * reads or writes a map is in relay.c (a call from a header compiles and is
 * rejected at load).
 */
#ifndef SPLITRELAY_MAPS_H
#define SPLITRELAY_MAPS_H

#ifndef SR_PIN_DIR
#error "SR_PIN_DIR must name the pin directory of this relay instance"
#endif

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
/* Each ufrag's ring of its last pending flows (LRU: forged hint ufrags push out only each other's
 * rings and the hint ufrags' confirmed counts; a session's allowance is counted in its entry). */
BPF_TABLE_PINNED("lru_hash", struct sr_ufrag_key, struct sr_pending, pending, SR_MAX_PENDING_UFRAGS,
		 SR_PIN_DIR "/pending");
/* The relay's own addresses (port 0) that backends may send to: passed to the kernel, never forwarded. */
BPF_TABLE_PINNED("hash", struct sr_addr_key, __u32, local_addrs, SR_MAX_LOCAL_ADDRS, SR_PIN_DIR "/local_addrs");
/* Translation: the free ports (each in the queue xor held by one flow; the agent fills it and
 * returns a port only after a quarantine, edge/ports.py), and the reply side's reverse slots. */
/* Both sized for the configured address sets (SR_XLATE_ADDRS): 24 B of slot and 4 B of queue per pair. */
BPF_QUEUESTACK_PINNED("queue", port_pool, __u32, SR_XLATE_ADDRS * SR_PORT_SLOTS, 0, SR_PIN_DIR "/port_pool");
BPF_TABLE_PINNED("array", __u32, struct sr_port_slot, port_slots, SR_XLATE_ADDRS * SR_PORT_SLOTS,
		 SR_PIN_DIR "/port_slots");
BPF_PERCPU_ARRAY(scratch, struct sr_scratch, 1);   /* per-packet working space, not state */
BPF_TABLE_PINNED("percpu_array", __u32, struct sr_counter, stats, SR_STAT__MAX, SR_PIN_DIR "/stats");
SR_DEVMAP_PINNED(tx_ports, SR_MAX_TX_PORTS, SR_PIN_DIR "/tx_ports");

#endif /* SPLITRELAY_MAPS_H */
