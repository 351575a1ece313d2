/* Count (and drop) the data packets a relay sends toward the transceiver host.
 *
 * Attached to the far end of the relay's internal link (the lab switch's port
 * `rint`), it makes "delivered" mean "left the relay": both relays, and the
 * kernel-routing floor, are measured at the same point, and what lies behind
 * that point (bridge, receiving UDP stack) costs nothing, so on a 2-core veth
 * lab the relay rather than the receiver is what saturates.  UDP to SINK_PORT
 * is taken unless it is STUN (first payload byte 0..3), which passes on with
 * everything else (ARP, ...).  A forwarded frame may reach this program with
 * only its headers in the linear part (AF_PACKET frames through kernel
 * forwarding do): a payload we cannot see is counted as data.
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>

#ifndef SINK_PORT
#define SINK_PORT 5000
#endif

BPF_PERCPU_ARRAY(delivered, u64, 1);

int xdp_egress_count(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end || eth->h_proto != htons(ETH_P_IP))
		return XDP_PASS;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end || ip->ihl != 5 || ip->protocol != IPPROTO_UDP)
		return XDP_PASS;
	struct udphdr *udp = (void *)(ip + 1);
	if ((void *)(udp + 1) > data_end || udp->dest != htons(SINK_PORT))
		return XDP_PASS;
	unsigned char *payload = (void *)(udp + 1);
	if ((void *)(payload + 1) <= data_end && payload[0] < 4)
		return XDP_PASS;
	u32 key = 0;
	u64 *count = delivered.lookup(&key);
	if (count)
		*count += 1;
	return XDP_DROP;
}
