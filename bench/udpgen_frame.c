/* udpgen_frame.c: data packets, and Ethernet/IPv4/UDP frames with their checksums (packet mode). */
#include "udpgen.h"

void data_template(uint8_t *p, long size)
{
	memset(p, 0, (size_t)size);
	p[0] = 0x80;
	p[1] = 0x60;
}

uint32_t sum16(const uint8_t *p, size_t len, uint32_t sum)
{
	while (len > 1) {
		sum += (uint32_t)p[0] << 8 | p[1];
		p += 2;
		len -= 2;
	}
	if (len)
		sum += (uint32_t)p[0] << 8;
	return sum;
}

void frame_headers(uint8_t *f, const struct cfg *c, size_t plen)
{
	memcpy(f, c->dst_mac, 6);
	memcpy(f + 6, c->src_mac, 6);
	put16(f + 12, ETHERTYPE_IP);
	uint8_t *ip = f + IP_OFF;
	ip[0] = 0x45;
	ip[1] = 0;
	put16(ip + 2, (uint16_t)(20 + 8 + plen));
	put16(ip + 4, 0);
	put16(ip + 6, 0x4000); /* DF */
	ip[8] = 64;
	ip[9] = IPPROTO_UDP;
	put16(ip + 10, 0);
	put32(ip + 12, 0);
	memcpy(ip + 16, &((const struct sockaddr_in *)&c->dst)->sin_addr, 4);
	uint8_t *udp = f + UDP_OFF;
	put16(udp, 0);
	put16(udp + 2, sa_port(&c->dst));
	put16(udp + 4, (uint16_t)(8 + plen));
	put16(udp + 6, 0);
}

void frame_finish(uint8_t *f, uint32_t src_ip, uint16_t sport, size_t plen)
{
	uint8_t *ip = f + IP_OFF, *udp = f + UDP_OFF;
	put32(ip + 12, src_ip);
	put16(ip + 10, 0);
	put16(ip + 10, (uint16_t)~fold(sum16(ip, 20, 0)));
	put16(udp, sport);
	put16(udp + 6, 0);
	uint32_t s = sum16(ip + 12, 8, 0) + IPPROTO_UDP + (uint32_t)(8 + plen);
	uint16_t ck = (uint16_t)~fold(sum16(udp, 8 + plen, s));
	put16(udp + 6, ck ? ck : 0xFFFF);
}
