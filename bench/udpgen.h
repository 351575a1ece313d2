/* udpgen.h: what udpgen's parts share (udpgen.c says what udpgen is).
 *
 * udpgen is split by concern: udpgen.c the command line, udpgen_util.c errors, time,
 * addresses, sockets, pacing and JSON, udpgen_frame.c data packets and Ethernet/IPv4/UDP
 * frames with their checksums, udpgen_stun.c STUN Binding Requests and usernames,
 * udpgen_send.c the send loops, udpgen_sink.c the sink and echo, udpgen_ping.c the
 * pinger.  What runs once per packet is here as static inline, so the split adds no
 * call per packet.
 */
#ifndef UDPGEN_H
#define UDPGEN_H

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <linux/if_packet.h>
#include <math.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef PACKET_QDISC_BYPASS
#define PACKET_QDISC_BYPASS 20
#endif

#define MAX_BATCH 1024
#define MAX_PACKET_FLOWS 2000000L
#define MAX_USERNAME 512         /* RFC 8489: USERNAME < 513 bytes */
#define SLOT 9216                /* receive slot: longer datagrams are counted whole, reflected truncated */
#define FLOWSET_MAX (1u << 21)   /* distinct sources the sink remembers */
#define MIN_SIZE 28
#define STUN_MAGIC 0x2112A442u
#define STUN_FP_XOR 0x5354554Eu
#define STUN_PRIORITY 0x6E0001FFu
#define STUN_MAX (20 + 4 + MAX_USERNAME + 8 + 8)

/* ---------------------------------------------------------------- errors -- */

void usage_error(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
void *xcalloc(size_t n, size_t size);

/* ------------------------------------------------------------ time, etc -- */

extern volatile sig_atomic_t g_stop;
void on_signal(int sig);

static inline uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Sleep until the absolute CLOCK_MONOTONIC time t (returns early on a stop signal). */
void sleep_until(uint64_t t);

static inline void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline void put32(uint8_t *p, uint32_t v) { put16(p, (uint16_t)(v >> 16)); put16(p + 2, (uint16_t)v); }
static inline void put64(uint8_t *p, uint64_t v) { put32(p, (uint32_t)(v >> 32)); put32(p + 4, (uint32_t)v); }
static inline uint32_t get32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* xorshift64*: transaction ids and the --shuffle permutation; seeded, so runs can repeat. */
uint64_t rng_next(uint64_t *s);
uint64_t rng_seed_random(void);

static inline uint64_t mix64(uint64_t x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdull;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ull;
	x ^= x >> 33;
	return x;
}

/* -------------------------------------------------------------- options -- */

enum mode { M_SINK = 1, M_ECHO = 2, M_SEND = 4, M_PING = 8 };
#define M_ALL (M_SINK | M_ECHO | M_SEND | M_PING)

enum opt_id {
	O_CPU = 1, O_DURATION, O_BATCH, O_READY, O_BIND, O_IDLE, O_ANSWER, O_DST, O_FLOWS, O_SRC_IP,
	O_SRC_PORT, O_SIZE, O_RATE, O_USER, O_USERS, O_OPEN_TIMEOUT, O_IFACE, O_SRC_MAC, O_DST_MAC,
	O_PPI, O_SHUFFLE, O_SEED, O_OPEN_ROUNDS, O_COUNT, O_INTERVAL, O_TIMEOUT, O_NEW_FLOW, O_SAMPLES,
	O_HELP, O_NUM
};

/* Usernames from --stun-username or --usernames FILE (one per line, cycled per flow). */
struct users {
	char **name;
	size_t *len;
	size_t n;
};

struct cfg {
	enum mode mode;
	const char *mode_name;
	bool given[O_NUM];
	long cpu;
	double duration;
	long batch;
	const char *ready_file;
	struct sockaddr_storage bind, dst, src;
	socklen_t bind_len, dst_len, src_len;
	double idle;
	long flows, src_port, size, count, ports_per_ip, open_rounds, interval_us, timeout_ms;
	double rate, open_timeout;
	const char *username, *usernames_file, *iface, *samples;
	uint8_t src_mac[6], dst_mac[6];
	bool answer_stun, shuffle, new_flow_each;
	uint64_t seed;
	struct users users;
};

/* ------------------------------------------------------------ addresses -- */

uint16_t sa_port(const struct sockaddr_storage *sa);
void sa_set_port(struct sockaddr_storage *sa, uint16_t port);
const char *sa_str(const struct sockaddr_storage *sa, char *buf, size_t len);

/* ------------------------------------------------------------- sockets -- */

int udp_socket(int family);
void set_timeouts(int fd, long rcv_us, long snd_us);
void set_bufs(int fd, int rcv, int snd);
void bind_or_die(int fd, const struct sockaddr_storage *sa, socklen_t len);
void connect_or_die(int fd, const struct sockaddr_storage *sa, socklen_t len);
void write_ready(const char *path, int fd);
bool transient(int err);
void raise_nofile(long need);
long send_in_order(int fd, struct mmsghdr *msg, long n, uint64_t deadline, uint64_t *errors, const char *iface);

/* --------------------------------------------------------------- pacing -- */

/* Token bucket on CLOCK_MONOTONIC: `rate` tokens a second, at most `burst` banked.
 * pace() returns how many of `want` packets may go now (sleeping when none may),
 * or 0 once the deadline passed or a stop signal came. */
struct pacer {
	double rate, tokens, burst, chunk;
	uint64_t last;
};

void pacer_init(struct pacer *p, double rate, long batch);
long pace(struct pacer *p, long want, uint64_t deadline);
void pacer_spend(struct pacer *p, long n);

/* ----------------------------------------------------------------- JSON -- */

void json_num_or_null(const char *key, double v, bool valid, bool last);

/* ------------------------------------------------- frames and checksums -- */

/* Packet mode: Ethernet/IPv4/UDP frames written whole on an AF_PACKET socket. */
#define ETH_LEN 14
#define IP_OFF 14
#define UDP_OFF 34
#define PAY_OFF 42

void data_template(uint8_t *p, long size);

static inline void data_stamp(uint8_t *p, uint32_t seq, uint64_t ts)
{
	put32(p + 4, seq);
	put64(p + 12, ts);
}

uint32_t sum16(const uint8_t *p, size_t len, uint32_t sum);

static inline uint16_t fold(uint64_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xFFFF) + (sum >> 16);
	return (uint16_t)sum;
}

/* Headers for a payload of `plen` bytes; source address, port and checksums left zero. */
void frame_headers(uint8_t *f, const struct cfg *c, size_t plen);
/* Fill source address/port and compute both checksums from scratch (STUN frames). */
void frame_finish(uint8_t *f, uint32_t src_ip, uint16_t sport, size_t plen);

/* ----------------------------------------------------------------- STUN -- */

void crc32_init(void);
size_t stun_build(uint8_t *out, const char *user, size_t ulen, uint64_t *rng);
void users_load(struct users *us, const char *single, const char *file);

/* ---------------------------------------------------------------- modes -- */

int run_sink(const struct cfg *c, uint64_t deadline);
int run_echo(const struct cfg *c, uint64_t deadline);
int run_send_sockets(const struct cfg *c, uint64_t deadline);
int run_send_packets(const struct cfg *c, uint64_t deadline);
int run_ping(const struct cfg *c, uint64_t deadline);

#endif
