/* The local ceiling: the least an XDP relay on this lab can do per packet.
 *
 * Attached to the relay's public veth in place of the relay, it does only what
 * the relay's egress does to every data packet: rewrite both MACs and
 * XDP_REDIRECT through a devmap to the internal veth (bpf/relay.c's
 * tx_ports.redirect_map).  No parsing, no lookup, no NAT: the relay's delivered
 * rate divided by this one's is what the relay's own work costs (issue 12's
 * "local ceiling" row).  SRC_MAC/DST_MAC come as -D byte lists.
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>

BPF_DEVMAP(tx_port, 1);

int xdp_ceiling(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return XDP_DROP;
	unsigned char src[ETH_ALEN] = SRC_MAC;
	unsigned char dst[ETH_ALEN] = DST_MAC;
	__builtin_memcpy(eth->h_dest, dst, ETH_ALEN);
	__builtin_memcpy(eth->h_source, src, ETH_ALEN);
	return tx_port.redirect_map(0, 0);
}
