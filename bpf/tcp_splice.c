/* ICE-TCP spliced in the kernel (issue 20; a bench-only experiment, edge/ice_tcp_splice.py).
 *
 * An RFC 4571 stream (16-bit length, then one packet) <-> UDP datagrams, without the agent.
 * Two sockhashes hold the pairs: udp_of_tcp[cookie of a client's TCP connection] = its UDP socket
 * toward the transceiver, tcp_of_udp[cookie of that UDP socket] = the TCP connection.  Both sides
 * run a verdict only (BPF_SK_SKB_VERDICT, one program run per received skb):
 *   TCP: an skb that is exactly one frame loses its 2-byte length (bpf_skb_adjust_room) and goes
 *        out of the paired UDP socket (one datagram);
 *   UDP: a datagram gets the length in front (bpf_skb_change_head) and goes out of the TCP socket.
 * Why no stream parser: with one (BPF_SK_SKB_STREAM_PARSER cutting at length + 2), popping the
 * header makes the kernel send the frame and then fail on the 2 bytes the parser's message length
 * still counts (sk_psock_backlog: EPIPE, the UDP socket's transmit side disabled for good; 6.18).
 * Without one, an skb holding anything but one whole frame (coalesced segments after a loss, a
 * frame split across segments) marks the connection desynced: from then on everything is passed
 * to the agent, which frames it itself (as edge/ice_tcp.py does).  Sizes come from Python
 * (-DSPLICE_MAX_FRAME = ice_tcp.MAX_FRAME, -DSPLICE_PAIRS).
 */
#include <uapi/linux/bpf.h>

BPF_SOCKHASH(udp_of_tcp, u64, SPLICE_PAIRS);
BPF_SOCKHASH(tcp_of_udp, u64, SPLICE_PAIRS);
BPF_HASH(desynced, u64, u8, SPLICE_PAIRS);     /* TCP cookies the agent frames from now on */

/* splice_stats slots: edge/ice_tcp_splice.py STATS names them */
#define S_IN 0            /* frames spliced client -> transceiver */
#define S_OUT 1           /* datagrams spliced transceiver -> client */
#define S_UNPAIRED 2      /* passed to the agent: no pair (not routed yet) */
#define S_DESYNC 3        /* connections marked desynced */
#define S_PASSED 4        /* skbs passed to the agent on a desynced connection */
#define S_BAD 5           /* dropped: a datagram of 0 or > SPLICE_MAX_FRAME bytes, or a helper failed */
BPF_ARRAY(splice_stats, u64, 6);

static __always_inline void count(int k)
{
    u64 *v = splice_stats.lookup(&k);
    if (v)
        __sync_fetch_and_add(v, 1);
}

int tcp_verdict(struct __sk_buff *skb)
{
    u64 cookie = bpf_get_socket_cookie(skb);
    if (desynced.lookup(&cookie)) {
        count(S_PASSED);
        return SK_PASS;
    }
    u8 hdr[2];
    u32 len = 0;
    if (bpf_skb_load_bytes(skb, 0, hdr, 2) == 0)
        len = ((u32)hdr[0] << 8) | hdr[1];
    if (len == 0 || len > SPLICE_MAX_FRAME || skb->len != len + 2) {
        u8 one = 1;
        desynced.update(&cookie, &one);
        count(S_DESYNC);
        return SK_PASS;
    }
    if (udp_of_tcp.sk_redirect_hash(skb, &cookie, 0) != SK_PASS) {
        count(S_UNPAIRED);
        return SK_PASS;
    }
    if (bpf_skb_adjust_room(skb, -2, 0, 0) < 0) {
        count(S_BAD);
        return SK_DROP;
    }
    count(S_IN);
    return SK_PASS;
}

int udp_verdict(struct __sk_buff *skb)
{
    u64 cookie = bpf_get_socket_cookie(skb);
    u32 len = skb->len;
    if (len == 0 || len > SPLICE_MAX_FRAME) {
        count(S_BAD);
        return SK_DROP;
    }
    if (tcp_of_udp.sk_redirect_hash(skb, &cookie, 0) != SK_PASS) {
        count(S_UNPAIRED);
        return SK_PASS;
    }
    u8 hdr[2] = {len >> 8, len & 0xff};
    if (bpf_skb_change_head(skb, 2, 0) < 0 || bpf_skb_store_bytes(skb, 0, hdr, 2, 0) < 0) {
        count(S_BAD);
        return SK_DROP;
    }
    count(S_OUT);
    return SK_PASS;
}
