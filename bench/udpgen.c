/* udpgen: the benchmark's UDP load generator, sink, echo and pinger.
 *
 * One small C program (libc only) so the benchmark measures the relay, not the
 * generator: Python cannot send or count a million datagrams a second.  Every
 * mode ends by printing ONE JSON object on one stdout line, so the harness
 * (bench/loadgen.py) parses results instead of scraping text.
 *
 *   sink  count datagrams (recvmmsg), optionally answer STUN
 *   echo  reflect every datagram to its source
 *   send  many flows: N UDP sockets, or raw Ethernet frames on an interface
 *         (AF_PACKET) with per-flow source address/port, for millions of flows
 *   ping  round-trip times of data packets or of first STUN packets of new flows
 *
 * Exit status: 0 with the JSON object, 2 for usage errors, 1 for runtime
 * errors, each error one line on stderr.  `udpgen --help` explains everything.
 */
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

static const char *HELP =
"usage: udpgen <mode> [options]      modes: sink, echo, send, ping\n"
"\n"
"Prints one JSON object on one stdout line at the end.  Exit 0 on success, 2 on\n"
"usage errors, 1 on runtime errors (one line on stderr).  SIGINT/SIGTERM stop any\n"
"mode cleanly and still print the JSON.  Addresses are IP:PORT or [IPv6]:PORT.\n"
"\n"
"Data packets carry byte 0 = 0x80, byte 1 = 0x60 (RTP v2, payload type 96, so\n"
"RFC 7983 classifies them as RTP/SRTP), a big-endian u32 sequence number at\n"
"offset 4 (one sequence over all flows), the CLOCK_MONOTONIC send time in ns as a\n"
"big-endian u64 at offset 12, zeros elsewhere.  STUN Binding Requests carry\n"
"USERNAME, PRIORITY and FINGERPRINT with a random transaction id.\n"
"\n"
"common options\n"
"  --help              this text\n"
"  --cpu N             pin the process to CPU N (sched_setaffinity)\n"
"  --duration SEC      hard upper bound of the run time, float (default 10)\n"
"  --batch N           recvmmsg/sendmmsg vector size, 1..1024 (default 64)\n"
"  --ready-file PATH   written (atomically, \"IP:PORT\" of the bound socket) once\n"
"                      the sockets are bound; await it instead of sleeping\n"
"\n"
"sink --bind IP:PORT [--idle SEC] [--answer-stun]\n"
"  Count datagrams and bytes until --duration, a signal (then it still reads until\n"
"  50 ms pass without a datagram, at most 0.2 s, so nothing already delivered is\n"
"  missed), or --idle SEC without data once data arrived (default 0 = off).  --answer-stun sends datagrams whose\n"
"  first byte is 0 or 1 (STUN) back unchanged to their source; they count in\n"
"  stun_answered, not in packets.  JSON: mode, packets, bytes, stun_answered,\n"
"  elapsed_s (first to last data packet), pps (packets/elapsed_s, 0 below 2\n"
"  packets), max_seq_gap (largest run of sequence numbers skipped between two\n"
"  consecutive udpgen data packets; reordering is ignored), unique_flows\n"
"  (distinct source IP:port of data packets, remembered up to 2^21;\n"
"  unique_flows_capped says when that limit was hit).\n"
"\n"
"echo --bind IP:PORT\n"
"  Reflect every datagram to its source until --duration or a signal.\n"
"  JSON: mode, packets, send_errors.\n"
"\n"
"send --dst IP:PORT --flows N [options]\n"
"  --flows N           number of flows (default 1)\n"
"  --src-ip IP         source address (socket mode default 0.0.0.0 or ::)\n"
"  --src-port BASE     first source port (default 20000; 0 = ephemeral ports,\n"
"                      socket mode only; packet mode defaults to the highest\n"
"                      base below 20000 that fits when BASE + P would pass 65535)\n"
"  --size BYTES        UDP payload size of data packets, >= 28 (default 200)\n"
"  --rate PPS          token-bucket pacing on CLOCK_MONOTONIC, for STUN and data\n"
"                      together (default 0 = as fast as possible)\n"
"  --count N           stop after N data packets (default 0 = until --duration)\n"
"  --stun-username U   open every flow with a STUN Binding Request, USERNAME U\n"
"  --usernames FILE    like --stun-username, one username per line, cycled per flow\n"
"  --open-timeout SEC  socket mode: how long to wait for every flow's answer\n"
"                      (any datagram back; requests repeat every 100 ms; default 3)\n"
"  Socket mode (default): N UDP sockets bound to src-ip:BASE+i, connected to the\n"
"  destination; data goes round-robin, one sendmmsg batch per socket in turn, to\n"
"  every flow (opened or not).  Packet mode, IPv4 only, given --iface:\n"
"  --iface IFNAME --src-mac MAC --dst-mac MAC   raw Ethernet/IPv4/UDP frames with\n"
"                      correct IPv4 and UDP checksums on an AF_PACKET socket\n"
"                      (PACKET_QDISC_BYPASS when the kernel has it); needs --src-ip\n"
"  --ports-per-ip P    flow i comes from src-ip + i / P, port BASE + i %% P\n"
"                      (default 50000); N up to 2000000\n"
"  --shuffle           visit flows in a fixed pseudo-random order (see --seed)\n"
"  --seed S            permutation seed for --shuffle (default 1)\n"
"  --open-rounds K     with a username: K passes of one Binding Request per flow,\n"
"                      50 ms apart, before data, answers not awaited (default 1)\n"
"  ENOBUFS/EAGAIN count in send_errors and are retried until --duration.\n"
"  JSON: mode, sent (data packets), send_errors, elapsed_s and pps (of the data\n"
"  phase), flows, flows_open (socket mode with a username, else null), stun_sent,\n"
"  src_port (the BASE used).\n"
"\n"
"ping --dst IP:PORT [options]\n"
"  --count N           probes (default 1000)\n"
"  --interval-us U     pause between probes (default 1000)\n"
"  --timeout-ms T      a probe without its answer after T ms is lost (default 200)\n"
"  --size B            data packet size (default 200)\n"
"  --src-ip IP         source address of the socket(s)\n"
"  --stun-username U | --usernames FILE\n"
"                      open the flow with a STUN Binding Request first and await an\n"
"                      answer (repeats every 100 ms up to --open-timeout, default 3;\n"
"                      exit 1 without one)\n"
"  --new-flow-each     every probe is a Binding Request (usernames cycled) from a NEW\n"
"                      socket whose port no earlier probe used (a walk of the\n"
"                      ephemeral range); RTT = send to first answer\n"
"  --samples FILE      write every RTT in ns, one per line\n"
"  Default probes are data packets on one connected socket; the answer must carry\n"
"  the probe's sequence number (others are discarded).  JSON: mode, count (probes\n"
"  sent), received, lost, min_us, mean_us, p50_us, p90_us, p99_us, p999_us,\n"
"  max_us (nearest rank; null when nothing was received), send_errors.\n";

/* ---------------------------------------------------------------- errors -- */

static void usage_error(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));

static void usage_error(const char *fmt, ...)
{
	va_list ap;
	fputs("udpgen: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputs(" (see udpgen --help)\n", stderr);
	exit(2);
}

static void die(const char *fmt, ...)
{
	va_list ap;
	fputs("udpgen: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

static void *xcalloc(size_t n, size_t size)
{
	void *p = calloc(n ? n : 1, size ? size : 1);
	if (!p)
		die("out of memory (%zu x %zu bytes)", n, size);
	return p;
}

/* ------------------------------------------------------------ time, etc -- */

static volatile sig_atomic_t g_stop;

static void on_signal(int sig)
{
	(void)sig;
	g_stop = 1;
}

static inline uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Sleep until the absolute CLOCK_MONOTONIC time t (returns early on a stop signal). */
static void sleep_until(uint64_t t)
{
	struct timespec ts = { .tv_sec = (time_t)(t / 1000000000ull), .tv_nsec = (long)(t % 1000000000ull) };
	while (!g_stop && clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
		;
}

static inline void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline void put32(uint8_t *p, uint32_t v) { put16(p, (uint16_t)(v >> 16)); put16(p + 2, (uint16_t)v); }
static inline void put64(uint8_t *p, uint64_t v) { put32(p, (uint32_t)(v >> 32)); put32(p + 4, (uint32_t)v); }
static inline uint32_t get32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* xorshift64*: transaction ids and the --shuffle permutation; seeded, so runs can repeat. */
static uint64_t rng_next(uint64_t *s)
{
	uint64_t x = *s;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*s = x;
	return x * 0x2545F4914F6CDD1Dull;
}

static uint64_t rng_seed_random(void)
{
	uint64_t s = 0;
	if (getrandom(&s, sizeof s, 0) != (ssize_t)sizeof s)
		s = now_ns() ^ (uint64_t)getpid() << 32;
	return s ? s : 0x9E3779B97F4A7C15ull;
}

/* ------------------------------------------------------------------ STUN -- */

static uint32_t crc_table[256];

static void crc32_init(void)
{
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;
		for (int k = 0; k < 8; k++)
			c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
		crc_table[i] = c;
	}
}

static uint32_t crc32_buf(const uint8_t *p, size_t len)
{
	uint32_t c = 0xFFFFFFFFu;
	while (len--)
		c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
	return c ^ 0xFFFFFFFFu;
}

/* Binding Request: header, USERNAME, PRIORITY, FINGERPRINT (the header length
 * already counts the fingerprint when the CRC is taken).  Returns its length. */
static size_t stun_build(uint8_t *out, const char *user, size_t ulen, uint64_t *rng)
{
	size_t off = 20;
	put16(out + off, 0x0006);
	put16(out + off + 2, (uint16_t)ulen);
	memcpy(out + off + 4, user, ulen);
	size_t padded = (ulen + 3) & ~(size_t)3;
	memset(out + off + 4 + ulen, 0, padded - ulen);
	off += 4 + padded;
	put16(out + off, 0x0024);
	put16(out + off + 2, 4);
	put32(out + off + 4, STUN_PRIORITY);
	off += 8;
	put16(out, 0x0001);
	put16(out + 2, (uint16_t)(off - 20 + 8));
	put32(out + 4, STUN_MAGIC);
	uint64_t a = rng_next(rng), b = rng_next(rng);
	put64(out + 8, a);
	put32(out + 16, (uint32_t)b);
	uint32_t crc = crc32_buf(out, off) ^ STUN_FP_XOR;
	put16(out + off, 0x8028);
	put16(out + off + 2, 4);
	put32(out + off + 4, crc);
	return off + 8;
}

/* Usernames from --stun-username or --usernames FILE (one per line, cycled per flow). */
struct users {
	char **name;
	size_t *len;
	size_t n;
};

static void users_check(const char *u, size_t len, const char *where)
{
	if (len == 0 || len > MAX_USERNAME)
		usage_error("%s: a username must have 1..%d bytes, got %zu", where, MAX_USERNAME, len);
	for (size_t i = 0; i < len; i++)
		if ((unsigned char)u[i] < 0x20)
			usage_error("%s: control character in a username", where);
}

static void users_load(struct users *us, const char *single, const char *file)
{
	memset(us, 0, sizeof *us);
	if (single) {
		size_t len = strlen(single);
		users_check(single, len, "--stun-username");
		us->name = xcalloc(1, sizeof *us->name);
		us->len = xcalloc(1, sizeof *us->len);
		us->name[0] = (char *)single;
		us->len[0] = len;
		us->n = 1;
		return;
	}
	if (!file)
		return;
	FILE *f = fopen(file, "r");
	if (!f)
		die("--usernames %s: %s", file, strerror(errno));
	size_t cap = 64;
	us->name = xcalloc(cap, sizeof *us->name);
	us->len = xcalloc(cap, sizeof *us->len);
	char *line = NULL;
	size_t lcap = 0;
	ssize_t got;
	while ((got = getline(&line, &lcap, f)) >= 0) {
		while (got > 0 && (line[got - 1] == '\n' || line[got - 1] == '\r'))
			line[--got] = 0;
		if (got == 0)
			continue;
		users_check(line, (size_t)got, "--usernames");
		if (us->n == cap) {
			cap *= 2;
			us->name = realloc(us->name, cap * sizeof *us->name);
			us->len = realloc(us->len, cap * sizeof *us->len);
			if (!us->name || !us->len)
				die("out of memory reading --usernames");
		}
		us->name[us->n] = strdup(line);
		if (!us->name[us->n])
			die("out of memory reading --usernames");
		us->len[us->n++] = (size_t)got;
	}
	if (ferror(f))
		die("--usernames %s: read error", file);
	free(line);
	fclose(f);
	if (us->n == 0)
		die("--usernames %s: no usernames in the file", file);
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

static const struct {
	const char *name;
	int has_arg;
	int modes;
} OPTS[O_NUM] = {
	[O_CPU] = { "cpu", 1, M_ALL },
	[O_DURATION] = { "duration", 1, M_ALL },
	[O_BATCH] = { "batch", 1, M_ALL },
	[O_READY] = { "ready-file", 1, M_ALL },
	[O_BIND] = { "bind", 1, M_SINK | M_ECHO },
	[O_IDLE] = { "idle", 1, M_SINK },
	[O_ANSWER] = { "answer-stun", 0, M_SINK },
	[O_DST] = { "dst", 1, M_SEND | M_PING },
	[O_FLOWS] = { "flows", 1, M_SEND },
	[O_SRC_IP] = { "src-ip", 1, M_SEND | M_PING },
	[O_SRC_PORT] = { "src-port", 1, M_SEND },
	[O_SIZE] = { "size", 1, M_SEND | M_PING },
	[O_RATE] = { "rate", 1, M_SEND },
	[O_USER] = { "stun-username", 1, M_SEND | M_PING },
	[O_USERS] = { "usernames", 1, M_SEND | M_PING },
	[O_OPEN_TIMEOUT] = { "open-timeout", 1, M_SEND | M_PING },
	[O_IFACE] = { "iface", 1, M_SEND },
	[O_SRC_MAC] = { "src-mac", 1, M_SEND },
	[O_DST_MAC] = { "dst-mac", 1, M_SEND },
	[O_PPI] = { "ports-per-ip", 1, M_SEND },
	[O_SHUFFLE] = { "shuffle", 0, M_SEND },
	[O_SEED] = { "seed", 1, M_SEND },
	[O_OPEN_ROUNDS] = { "open-rounds", 1, M_SEND },
	[O_COUNT] = { "count", 1, M_SEND | M_PING },
	[O_INTERVAL] = { "interval-us", 1, M_PING },
	[O_TIMEOUT] = { "timeout-ms", 1, M_PING },
	[O_NEW_FLOW] = { "new-flow-each", 0, M_PING },
	[O_SAMPLES] = { "samples", 1, M_PING },
	[O_HELP] = { "help", 0, M_ALL },
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

static long parse_long(const char *opt, const char *s, long lo, long hi)
{
	char *end;
	errno = 0;
	long v = strtol(s, &end, 10);
	if (errno || end == s || *end || v < lo || v > hi)
		usage_error("--%s: expected an integer in [%ld, %ld], got '%s'", opt, lo, hi, s);
	return v;
}

static double parse_double(const char *opt, const char *s, double lo, double hi)
{
	char *end;
	errno = 0;
	double v = strtod(s, &end);
	if (errno || end == s || *end || !isfinite(v) || v < lo || v > hi)
		usage_error("--%s: expected a number in [%g, %g], got '%s'", opt, lo, hi, s);
	return v;
}

/* IP (v4 or v6) into sa with port 0. */
static bool parse_ip(const char *s, struct sockaddr_storage *sa, socklen_t *len)
{
	memset(sa, 0, sizeof *sa);
	struct sockaddr_in *v4 = (struct sockaddr_in *)sa;
	struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)sa;
	if (inet_pton(AF_INET, s, &v4->sin_addr) == 1) {
		v4->sin_family = AF_INET;
		*len = sizeof *v4;
		return true;
	}
	if (inet_pton(AF_INET6, s, &v6->sin6_addr) == 1) {
		v6->sin6_family = AF_INET6;
		*len = sizeof *v6;
		return true;
	}
	return false;
}

/* IP:PORT or [IPv6]:PORT. */
static void parse_addr(const char *opt, const char *s, struct sockaddr_storage *sa, socklen_t *len)
{
	char host[INET6_ADDRSTRLEN + 2];
	const char *colon = strrchr(s, ':');
	if (!colon || (size_t)(colon - s) >= sizeof host)
		usage_error("--%s: expected IP:PORT or [IPv6]:PORT, got '%s'", opt, s);
	size_t hl = (size_t)(colon - s);
	memcpy(host, s, hl);
	host[hl] = 0;
	char *h = host;
	if (hl >= 2 && host[0] == '[' && host[hl - 1] == ']') {
		host[hl - 1] = 0;
		h = host + 1;
	} else if (strchr(host, ':')) {
		usage_error("--%s: write IPv6 addresses as [IPv6]:PORT, got '%s'", opt, s);
	}
	char *end;
	errno = 0;
	long port = strtol(colon + 1, &end, 10);
	if (errno || end == colon + 1 || *end || port < 0 || port > 65535)
		usage_error("--%s: bad port in '%s'", opt, s);
	if (!parse_ip(h, sa, len))
		usage_error("--%s: bad IP address in '%s'", opt, s);
	if (sa->ss_family == AF_INET)
		((struct sockaddr_in *)sa)->sin_port = htons((uint16_t)port);
	else
		((struct sockaddr_in6 *)sa)->sin6_port = htons((uint16_t)port);
}

static void parse_mac(const char *opt, const char *s, uint8_t mac[6])
{
	unsigned int b[6];
	char tail;
	if (sscanf(s, "%2x:%2x:%2x:%2x:%2x:%2x%c", &b[0], &b[1], &b[2], &b[3], &b[4], &b[5], &tail) != 6)
		usage_error("--%s: expected a MAC like 02:00:00:00:00:01, got '%s'", opt, s);
	for (int i = 0; i < 6; i++)
		mac[i] = (uint8_t)b[i];
}

static uint16_t sa_port(const struct sockaddr_storage *sa)
{
	return ntohs(sa->ss_family == AF_INET ? ((const struct sockaddr_in *)sa)->sin_port
					      : ((const struct sockaddr_in6 *)sa)->sin6_port);
}

static void sa_set_port(struct sockaddr_storage *sa, uint16_t port)
{
	if (sa->ss_family == AF_INET)
		((struct sockaddr_in *)sa)->sin_port = htons(port);
	else
		((struct sockaddr_in6 *)sa)->sin6_port = htons(port);
}

static const char *sa_str(const struct sockaddr_storage *sa, char *buf, size_t len)
{
	char ip[INET6_ADDRSTRLEN];
	if (sa->ss_family == AF_INET) {
		inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, ip, sizeof ip);
		snprintf(buf, len, "%s:%u", ip, sa_port(sa));
	} else {
		inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)sa)->sin6_addr, ip, sizeof ip);
		snprintf(buf, len, "[%s]:%u", ip, sa_port(sa));
	}
	return buf;
}

static void parse_args(int argc, char **argv, struct cfg *c)
{
	if (argc < 2)
		usage_error("missing mode: sink, echo, send or ping");
	if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
		fputs(HELP, stdout);
		exit(0);
	}
	memset(c, 0, sizeof *c);
	c->mode_name = argv[1];
	if (!strcmp(argv[1], "sink"))
		c->mode = M_SINK;
	else if (!strcmp(argv[1], "echo"))
		c->mode = M_ECHO;
	else if (!strcmp(argv[1], "send"))
		c->mode = M_SEND;
	else if (!strcmp(argv[1], "ping"))
		c->mode = M_PING;
	else
		usage_error("unknown mode '%s': expected sink, echo, send or ping", argv[1]);
	c->cpu = -1;
	c->duration = 10;
	c->batch = 64;
	c->flows = 1;
	c->src_port = 20000;
	c->size = 200;
	c->open_timeout = 3;
	c->ports_per_ip = 50000;
	c->open_rounds = 1;
	c->count = c->mode == M_PING ? 1000 : 0;
	c->interval_us = 1000;
	c->timeout_ms = 200;
	c->seed = 1;

	struct option lo[O_NUM + 1];
	int n = 0;
	for (int i = 1; i < O_NUM; i++)
		lo[n++] = (struct option){ OPTS[i].name, OPTS[i].has_arg ? required_argument : no_argument, NULL, i };
	lo[n] = (struct option){ 0, 0, 0, 0 };

	int sub_argc = argc - 1;
	char **sub_argv = argv + 1;
	opterr = 0;
	optind = 1;
	int id;
	while ((id = getopt_long(sub_argc, sub_argv, ":", lo, NULL)) != -1) {
		if (id == '?')
			usage_error("unknown option '%s'", sub_argv[optind - 1]);
		if (id == ':')
			usage_error("option '%s' needs a value", sub_argv[optind - 1]);
		const char *name = OPTS[id].name;
		if (!(OPTS[id].modes & c->mode))
			usage_error("--%s is not an option of mode %s", name, c->mode_name);
		c->given[id] = true;
		switch (id) {
		case O_HELP: fputs(HELP, stdout); exit(0);
		case O_CPU: c->cpu = parse_long(name, optarg, 0, CPU_SETSIZE - 1); break;
		case O_DURATION: c->duration = parse_double(name, optarg, 0.001, 86400 * 7); break;
		case O_BATCH: c->batch = parse_long(name, optarg, 1, MAX_BATCH); break;
		case O_READY: c->ready_file = optarg; break;
		case O_BIND: parse_addr(name, optarg, &c->bind, &c->bind_len); break;
		case O_IDLE: c->idle = parse_double(name, optarg, 0, 86400 * 7); break;
		case O_ANSWER: c->answer_stun = true; break;
		case O_DST: parse_addr(name, optarg, &c->dst, &c->dst_len); break;
		case O_FLOWS: c->flows = parse_long(name, optarg, 1, MAX_PACKET_FLOWS); break;
		case O_SRC_IP:
			if (!parse_ip(optarg, &c->src, &c->src_len))
				usage_error("--src-ip: bad IP address '%s'", optarg);
			break;
		case O_SRC_PORT: c->src_port = parse_long(name, optarg, 0, 65535); break;
		case O_SIZE: c->size = parse_long(name, optarg, MIN_SIZE, 65507); break;
		case O_RATE: c->rate = parse_double(name, optarg, 0, 1e9); break;
		case O_USER: c->username = optarg; break;
		case O_USERS: c->usernames_file = optarg; break;
		case O_OPEN_TIMEOUT: c->open_timeout = parse_double(name, optarg, 0, 86400); break;
		case O_IFACE: c->iface = optarg; break;
		case O_SRC_MAC: parse_mac(name, optarg, c->src_mac); break;
		case O_DST_MAC: parse_mac(name, optarg, c->dst_mac); break;
		case O_PPI: c->ports_per_ip = parse_long(name, optarg, 1, 65536); break;
		case O_SHUFFLE: c->shuffle = true; break;
		case O_SEED: c->seed = (uint64_t)parse_long(name, optarg, 0, LONG_MAX); break;
		case O_OPEN_ROUNDS: c->open_rounds = parse_long(name, optarg, 1, 1000); break;
		case O_COUNT:
			c->count = c->mode == M_PING ? parse_long(name, optarg, 1, 10000000L)
						   : parse_long(name, optarg, 0, 1000000000000L);
			break;
		case O_INTERVAL: c->interval_us = parse_long(name, optarg, 0, 60000000L); break;
		case O_TIMEOUT: c->timeout_ms = parse_long(name, optarg, 1, 600000L); break;
		case O_NEW_FLOW: c->new_flow_each = true; break;
		case O_SAMPLES: c->samples = optarg; break;
		}
	}
	if (optind < sub_argc)
		usage_error("unexpected argument '%s'", sub_argv[optind]);

	if ((c->mode & (M_SINK | M_ECHO)) && !c->given[O_BIND])
		usage_error("mode %s needs --bind IP:PORT", c->mode_name);
	if ((c->mode & (M_SEND | M_PING)) && !c->given[O_DST])
		usage_error("mode %s needs --dst IP:PORT", c->mode_name);
	if (c->given[O_DST] && sa_port(&c->dst) == 0)
		usage_error("--dst needs a non-zero port");
	if (c->username && c->usernames_file)
		usage_error("give --stun-username or --usernames, not both");
	if (c->given[O_SRC_IP] && c->src.ss_family != c->dst.ss_family)
		usage_error("--src-ip and --dst are of different address families");

	bool packet = c->given[O_IFACE] || c->given[O_SRC_MAC] || c->given[O_DST_MAC];
	if (c->mode == M_SEND && packet) {
		if (!c->given[O_IFACE] || !c->given[O_SRC_MAC] || !c->given[O_DST_MAC])
			usage_error("packet mode needs all of --iface, --src-mac and --dst-mac");
		if (c->dst.ss_family != AF_INET)
			usage_error("packet mode is IPv4 only");
		if (!c->given[O_SRC_IP])
			usage_error("packet mode needs --src-ip (the first flow's source address)");
		if (c->src_port == 0)
			usage_error("packet mode needs a non-zero --src-port");
		if (strlen(c->iface) >= IF_NAMESIZE)
			usage_error("--iface: interface name '%s' is too long", c->iface);
		if (c->size > 9000)
			usage_error("--size: packet mode sends frames of at most 9000 bytes of payload");
		long per_ip = c->ports_per_ip < c->flows ? c->ports_per_ip : c->flows;
		/* the default base 20000 cannot hold 50000 ports per address: then the highest base that can */
		if (!c->given[O_SRC_PORT] && c->src_port + per_ip - 1 > 65535)
			c->src_port = 65536 - per_ip;
		if (c->src_port + per_ip - 1 > 65535)
			usage_error("--src-port %ld + --ports-per-ip %ld runs past port 65535", c->src_port, per_ip);
		uint32_t first = ntohl(((struct sockaddr_in *)&c->src)->sin_addr.s_addr);
		uint64_t last = (uint64_t)first + (uint64_t)(c->flows - 1) / (uint64_t)c->ports_per_ip;
		if (last > 0xFFFFFFFFull)
			usage_error("--flows %ld from --src-ip run past 255.255.255.255", c->flows);
	} else if (c->mode == M_SEND) {
		if (c->given[O_PPI] || c->given[O_SHUFFLE] || c->given[O_OPEN_ROUNDS] || c->given[O_SEED])
			usage_error("--ports-per-ip, --shuffle, --seed and --open-rounds need packet mode (--iface)");
		if (c->src_port && c->src_port + c->flows - 1 > 65535)
			usage_error("--src-port %ld + --flows %ld runs past port 65535", c->src_port, c->flows);
		if (c->flows > 65535)
			usage_error("socket mode has at most 65535 flows (use packet mode for more)");
	}
	if (c->mode == M_PING && c->new_flow_each && !c->username && !c->usernames_file)
		usage_error("--new-flow-each needs --stun-username or --usernames");
	if (!c->given[O_SRC_IP] && (c->mode & (M_SEND | M_PING))) {
		memset(&c->src, 0, sizeof c->src);
		c->src.ss_family = c->dst.ss_family;
		c->src_len = c->dst.ss_family == AF_INET ? sizeof(struct sockaddr_in) : sizeof(struct sockaddr_in6);
	}
}

/* ------------------------------------------------------------ sockets -- */

static int udp_socket(int family)
{
	int fd = socket(family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		die("socket: %s", strerror(errno));
	return fd;
}

static void set_timeouts(int fd, long rcv_us, long snd_us)
{
	struct timeval r = { rcv_us / 1000000, rcv_us % 1000000 }, s = { snd_us / 1000000, snd_us % 1000000 };
	if (rcv_us)
		setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &r, sizeof r);
	if (snd_us)
		setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &s, sizeof s);
}

static void set_bufs(int fd, int rcv, int snd)
{
	/* *FORCE ignore rmem_max/wmem_max as root; else the plain option (capped by the kernel) */
	if (rcv && setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcv, sizeof rcv) != 0)
		setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof rcv);
	if (snd && setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &snd, sizeof snd) != 0)
		setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &snd, sizeof snd);
}

static void bind_or_die(int fd, const struct sockaddr_storage *sa, socklen_t len)
{
	char buf[80];
	if (bind(fd, (const struct sockaddr *)sa, len) != 0)
		die("bind %s: %s", sa_str(sa, buf, sizeof buf), strerror(errno));
}

static void connect_or_die(int fd, const struct sockaddr_storage *sa, socklen_t len)
{
	char buf[80];
	if (connect(fd, (const struct sockaddr *)sa, len) != 0)
		die("connect %s: %s", sa_str(sa, buf, sizeof buf), strerror(errno));
}

/* The ready file says "IP:PORT" of the bound socket; written to a temporary name and
 * renamed, so whoever awaits it never reads half of it. */
static void write_ready(const char *path, int fd)
{
	if (!path)
		return;
	struct sockaddr_storage sa;
	socklen_t len = sizeof sa;
	char addr[80] = "", tmp[PATH_MAX];
	if (fd >= 0 && getsockname(fd, (struct sockaddr *)&sa, &len) == 0 &&
	    (sa.ss_family == AF_INET || sa.ss_family == AF_INET6))
		sa_str(&sa, addr, sizeof addr);
	if (snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid()) >= (int)sizeof tmp)
		die("--ready-file: path too long");
	FILE *f = fopen(tmp, "w");
	if (!f)
		die("--ready-file %s: %s", tmp, strerror(errno));
	fprintf(f, "%s\n", addr);
	if (fclose(f) != 0 || rename(tmp, path) != 0)
		die("--ready-file %s: %s", path, strerror(errno));
}

static bool transient(int err)
{
	/* back-pressure (full socket/qdisc/device), a send timeout, a signal, or a soft error
	 * (an ICMP error reported on a connected socket, a neighbour that did not answer ARP yet):
	 * the next send goes out normally.  No route at all (ENETUNREACH) is a setup error. */
	return err == EAGAIN || err == EWOULDBLOCK || err == ENOBUFS || err == EINTR || err == ECONNREFUSED ||
	       err == EHOSTUNREACH;
}

static void raise_nofile(long need)
{
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || (rl.rlim_cur != RLIM_INFINITY && (long)rl.rlim_cur >= need))
		return;
	rlim_t want = (rlim_t)need;
	rl.rlim_cur = want;
	if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < want)
		rl.rlim_max = want; /* root may raise the hard limit too */
	if (setrlimit(RLIMIT_NOFILE, &rl) != 0 && getrlimit(RLIMIT_NOFILE, &rl) == 0) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
}

/* --------------------------------------------------------------- pacing -- */

/* Token bucket on CLOCK_MONOTONIC: `rate` tokens a second, at most `burst` banked.
 * pace() returns how many of `want` packets may go now (sleeping when none may),
 * or 0 once the deadline passed or a stop signal came. */
/* Send msg[0..n) in order: what the kernel pushes back (full buffers) is retried and counted in
 * *errors, the deadline or a signal stops it, anything else is fatal.  Returns how many went out. */
static long send_in_order(int fd, struct mmsghdr *msg, long n, uint64_t deadline, uint64_t *errors,
			  const char *iface)
{
	long off = 0;
	while (off < n) {
		int k = sendmmsg(fd, msg + off, (unsigned int)(n - off), 0);
		if (k > 0) {
			off += k;
			continue;
		}
		if (k < 0 && !transient(errno))
			die("sendmmsg%s%s: %s", iface ? " on " : "", iface ? iface : "", strerror(errno));
		(*errors)++;
		if (g_stop || now_ns() >= deadline)
			break;
	}
	return off;
}

struct pacer {
	double rate, tokens, burst, chunk;
	uint64_t last;
};

static void pacer_init(struct pacer *p, double rate, long batch)
{
	p->rate = rate;
	p->burst = (double)batch;
	p->tokens = 1;
	/* wake at most every 200 us at high rates, so batches stay full without bursts */
	p->chunk = rate * 200e-6 < 1 ? 1 : rate * 200e-6;
	if (p->chunk > p->burst)
		p->chunk = p->burst;
	p->last = now_ns();
}

static long pace(struct pacer *p, long want, uint64_t deadline)
{
	if (p->rate <= 0)
		return want;
	for (;;) {
		uint64_t t = now_ns();
		if (t >= deadline || g_stop)
			return 0;
		p->tokens += (double)(t - p->last) * 1e-9 * p->rate;
		p->last = t;
		if (p->tokens > p->burst)
			p->tokens = p->burst;
		double need = p->chunk < (double)want ? p->chunk : (double)want;
		if (p->tokens >= need) {
			long n = (long)p->tokens;
			return n < want ? n : want;
		}
		uint64_t wait = (uint64_t)((need - p->tokens) / p->rate * 1e9) + 1;
		sleep_until(t + wait < deadline ? t + wait : deadline);
	}
}

static void pacer_spend(struct pacer *p, long n)
{
	p->tokens -= (double)n;
}

/* ---------------------------------------------------------------- JSON -- */

static void json_num_or_null(const char *key, double v, bool valid, bool last)
{
	if (valid)
		printf("\"%s\":%.3f%s", key, v, last ? "" : ",");
	else
		printf("\"%s\":null%s", key, last ? "" : ",");
}

/* ---------------------------------------------------------------- sink -- */

/* Distinct source addresses: open addressing over 64-bit keys (0 = empty), grown by doubling. */
/* How many data packets the next batch may carry: at most `batch`, no more than --count leaves,
 * as many as the pacer allows before the deadline; 0 when the run is over. */
static long next_batch(const struct cfg *c, uint64_t sent, struct pacer *pc, long batch, uint64_t deadline)
{
	long want = batch;
	if (c->count) {
		if (sent >= (uint64_t)c->count)
			return 0;
		if ((uint64_t)want > (uint64_t)c->count - sent)
			want = (long)((uint64_t)c->count - sent);
	}
	if (now_ns() >= deadline)
		return 0;
	return pace(pc, want, deadline);
}

struct flowset {
	uint64_t *slot;
	size_t cap, n;
	bool capped;
};

static inline uint64_t mix64(uint64_t x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdull;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ull;
	x ^= x >> 33;
	return x;
}

static void flowset_put(struct flowset *fs, uint64_t key);

static void flowset_grow(struct flowset *fs)
{
	uint64_t *old = fs->slot;
	size_t oldcap = fs->cap;
	fs->cap = oldcap ? oldcap * 2 : 4096;
	fs->slot = xcalloc(fs->cap, sizeof *fs->slot);
	fs->n = 0;
	for (size_t i = 0; i < oldcap; i++)
		if (old[i])
			flowset_put(fs, old[i]);
	free(old);
}

static void flowset_put(struct flowset *fs, uint64_t key)
{
	if ((fs->n + 1) * 2 > fs->cap) {
		if (fs->n >= FLOWSET_MAX) {
			fs->capped = true;
			return;
		}
		flowset_grow(fs);
	}
	size_t mask = fs->cap - 1, i = (size_t)mix64(key) & mask;
	while (fs->slot[i]) {
		if (fs->slot[i] == key)
			return;
		i = (i + 1) & mask;
	}
	fs->slot[i] = key;
	fs->n++;
}

static uint64_t flow_key(const struct sockaddr_storage *sa)
{
	if (sa->ss_family == AF_INET) {
		const struct sockaddr_in *v4 = (const struct sockaddr_in *)sa;
		return 1ull << 48 | (uint64_t)ntohl(v4->sin_addr.s_addr) << 16 | ntohs(v4->sin_port);
	}
	const struct sockaddr_in6 *v6 = (const struct sockaddr_in6 *)sa;
	uint64_t h = 0xcbf29ce484222325ull;
	for (int i = 0; i < 16; i++)
		h = (h ^ v6->sin6_addr.s6_addr[i]) * 0x100000001b3ull;
	h = mix64(h ^ ntohs(v6->sin6_port));
	return h | 1ull << 63;
}

struct rxbufs {
	struct mmsghdr *msg;
	struct iovec *iov;
	struct sockaddr_storage *name;
	uint8_t *data;
	long n;
};

static void rxbufs_init(struct rxbufs *b, long n)
{
	b->n = n;
	b->msg = xcalloc((size_t)n, sizeof *b->msg);
	b->iov = xcalloc((size_t)n, sizeof *b->iov);
	b->name = xcalloc((size_t)n, sizeof *b->name);
	b->data = xcalloc((size_t)n, SLOT);
}

static void rxbufs_reset(struct rxbufs *b)
{
	for (long i = 0; i < b->n; i++) {
		b->iov[i] = (struct iovec){ b->data + (size_t)i * SLOT, SLOT };
		b->msg[i].msg_hdr = (struct msghdr){ .msg_name = &b->name[i], .msg_namelen = sizeof b->name[i],
						     .msg_iov = &b->iov[i], .msg_iovlen = 1 };
		b->msg[i].msg_len = 0;
	}
}

static int bound_socket(const struct cfg *c)
{
	int fd = udp_socket(c->bind.ss_family);
	set_bufs(fd, 32 << 20, 4 << 20);
	set_timeouts(fd, 50000, 100000); /* wake every 50 ms to check the deadline, idle time, signals */
	bind_or_die(fd, &c->bind, c->bind_len);
	write_ready(c->ready_file, fd);
	return fd;
}

/* Send msg[0..n) (already addressed), skipping a message the kernel refuses outright;
 * returns how many went out, adds failures to *errors.  Bounded by the deadline. */
static long send_all(int fd, struct mmsghdr *msg, long n, uint64_t deadline, uint64_t *errors)
{
	long off = 0, sent = 0;
	while (off < n) {
		int r = sendmmsg(fd, msg + off, (unsigned int)(n - off), 0);
		if (r > 0) {
			off += r;
			sent += r;
			continue;
		}
		(*errors)++;
		if (r < 0 && (errno == EAGAIN || errno == ENOBUFS || errno == EINTR) && !g_stop &&
		    now_ns() < deadline)
			continue;
		off++; /* this destination is refused (no route, ...): skip it */
	}
	return sent;
}

static int run_sink(const struct cfg *c, uint64_t deadline)
{
	int fd = bound_socket(c);
	struct rxbufs rx;
	rxbufs_init(&rx, c->batch);
	struct mmsghdr *tx = xcalloc((size_t)c->batch, sizeof *tx);
	struct flowset flows = { 0 };
	uint64_t packets = 0, bytes = 0, answered = 0, first = 0, last = 0, errors = 0, max_gap = 0;
	uint32_t last_seq = 0;
	bool have_seq = false;
	uint64_t idle_ns = (uint64_t)(c->idle * 1e9);

	/* After a stop signal the sink still reads what the kernel queued or is about to queue for it
	 * (until 50 ms pass without a datagram, at most 200 ms): whoever stops it right after the
	 * sender finished gets every delivered datagram counted, however late the sink (or the
	 * softirq delivering to it) was scheduled. */
	uint64_t drain_until = 0;
	for (;;) {
		uint64_t t = now_ns();
		if (g_stop && !drain_until)
			drain_until = t + 200000000ull;
		if (t >= deadline || (drain_until && t >= drain_until))
			break;
		if (!drain_until && idle_ns && packets && t - last >= idle_ns)
			break;
		rxbufs_reset(&rx);
		int n = recvmmsg(fd, rx.msg, (unsigned int)rx.n, MSG_WAITFORONE | MSG_TRUNC, NULL);
		if (n < 0) {
			if (drain_until && (errno == EAGAIN || errno == EWOULDBLOCK))
				break; /* 50 ms (SO_RCVTIMEO) without a datagram */
			if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
				continue;
			die("recvmmsg: %s", strerror(errno));
		}
		t = now_ns();
		long ntx = 0;
		bool data = false;
		for (int i = 0; i < n; i++) {
			const uint8_t *p = rx.iov[i].iov_base;
			unsigned int len = rx.msg[i].msg_len;
			if (c->answer_stun && len > 0 && p[0] <= 1) {
				rx.iov[i].iov_len = len < SLOT ? len : SLOT;
				tx[ntx++].msg_hdr = rx.msg[i].msg_hdr;
				continue;
			}
			packets++;
			bytes += len;
			data = true;
			flowset_put(&flows, flow_key(&rx.name[i]));
			if (len >= 20 && p[0] == 0x80) {
				uint32_t seq = get32(p + 4);
				if (have_seq) {
					int32_t d = (int32_t)(seq - last_seq);
					if (d > 1 && (uint64_t)(d - 1) > max_gap)
						max_gap = (uint64_t)(d - 1);
					if (d > 0)
						last_seq = seq;
				} else {
					have_seq = true;
					last_seq = seq;
				}
			}
		}
		if (data) {
			if (!first)
				first = t;
			last = t;
		}
		if (ntx)
			answered += (uint64_t)send_all(fd, tx, ntx, deadline, &errors);
	}
	double elapsed = packets ? (double)(last - first) * 1e-9 : 0;
	double pps = packets >= 2 && elapsed > 0 ? (double)packets / elapsed : 0;
	printf("{\"mode\":\"sink\",\"packets\":%" PRIu64 ",\"bytes\":%" PRIu64 ",\"stun_answered\":%" PRIu64
	       ",\"elapsed_s\":%.6f,\"pps\":%.1f,\"max_seq_gap\":%" PRIu64 ",\"unique_flows\":%zu"
	       ",\"unique_flows_capped\":%s,\"send_errors\":%" PRIu64 "}\n",
	       packets, bytes, answered, elapsed, pps, max_gap, flows.n, flows.capped ? "true" : "false", errors);
	close(fd);
	return 0;
}

/* ---------------------------------------------------------------- echo -- */

static int run_echo(const struct cfg *c, uint64_t deadline)
{
	int fd = bound_socket(c);
	struct rxbufs rx;
	rxbufs_init(&rx, c->batch);
	uint64_t packets = 0, errors = 0;
	while (!g_stop && now_ns() < deadline) {
		rxbufs_reset(&rx);
		int n = recvmmsg(fd, rx.msg, (unsigned int)rx.n, MSG_WAITFORONE | MSG_TRUNC, NULL);
		if (n < 0) {
			if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
				continue;
			die("recvmmsg: %s", strerror(errno));
		}
		for (int i = 0; i < n; i++)
			rx.iov[i].iov_len = rx.msg[i].msg_len < SLOT ? rx.msg[i].msg_len : SLOT;
		packets += (uint64_t)n;
		send_all(fd, rx.msg, n, deadline, &errors);
	}
	printf("{\"mode\":\"echo\",\"packets\":%" PRIu64 ",\"send_errors\":%" PRIu64 "}\n", packets, errors);
	close(fd);
	return 0;
}

/* ---------------------------------------------------------------- send -- */

static void data_template(uint8_t *p, long size)
{
	memset(p, 0, (size_t)size);
	p[0] = 0x80;
	p[1] = 0x60;
}

static inline void data_stamp(uint8_t *p, uint32_t seq, uint64_t ts)
{
	put32(p + 4, seq);
	put64(p + 12, ts);
}

struct send_result {
	uint64_t sent, errors, stun_sent;
	long flows_open;  /* -1: not applicable */
	uint64_t t0, t1;  /* data phase */
};

static void print_send(const struct cfg *c, const struct send_result *r)
{
	double elapsed = r->t1 > r->t0 ? (double)(r->t1 - r->t0) * 1e-9 : 0;
	printf("{\"mode\":\"send\",\"sent\":%" PRIu64 ",\"send_errors\":%" PRIu64 ",\"elapsed_s\":%.6f,\"pps\":%.1f"
	       ",\"flows\":%ld,",
	       r->sent, r->errors, elapsed, elapsed > 0 ? (double)r->sent / elapsed : 0, c->flows);
	if (r->flows_open >= 0)
		printf("\"flows_open\":%ld,", r->flows_open);
	else
		printf("\"flows_open\":null,");
	printf("\"stun_sent\":%" PRIu64 ",\"src_port\":%ld}\n", r->stun_sent, c->src_port);
}

/* Socket mode: the STUN opening of every flow, requests repeated each 100 ms until each
 * socket got any datagram back.  Returns the number of open flows. */
static long open_flows(const struct cfg *c, int *fds, long nflows, uint64_t until, uint64_t *stun_sent,
		       uint64_t *errors, uint64_t *rng)
{
	int ep = epoll_create1(EPOLL_CLOEXEC);
	if (ep < 0)
		die("epoll_create1: %s", strerror(errno));
	for (long i = 0; i < nflows; i++) {
		struct epoll_event ev = { .events = EPOLLIN, .data.u64 = (uint64_t)i };
		if (epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev) != 0)
			die("epoll_ctl: %s", strerror(errno));
	}
	bool *open = xcalloc((size_t)nflows, sizeof *open);
	long nopen = 0;
	uint8_t req[STUN_MAX], junk[2048];
	struct epoll_event evs[256];
	while (nopen < nflows && !g_stop && now_ns() < until) {
		for (long i = 0; i < nflows; i++) {
			if (open[i])
				continue;
			size_t u = (size_t)i % c->users.n;
			size_t len = stun_build(req, c->users.name[u], c->users.len[u], rng);
			if (send(fds[i], req, len, MSG_DONTWAIT) == (ssize_t)len)
				(*stun_sent)++;
			else if (transient(errno))
				(*errors)++;
			else
				die("send STUN request: %s", strerror(errno));
		}
		uint64_t round_end = now_ns() + 100000000ull;
		if (round_end > until)
			round_end = until;
		for (uint64_t t = now_ns(); nopen < nflows && t < round_end && !g_stop; t = now_ns()) {
			int ms = (int)((round_end - t + 999999) / 1000000);
			int n = epoll_wait(ep, evs, 256, ms);
			if (n < 0 && errno != EINTR)
				die("epoll_wait: %s", strerror(errno));
			for (int k = 0; k < n; k++) {
				long i = (long)evs[k].data.u64;
				ssize_t got;
				bool any = false;
				/* drain; ECONNREFUSED (an ICMP error) is consumed and is no answer */
				while ((got = recv(fds[i], junk, sizeof junk, MSG_DONTWAIT)) >= 0 || errno == ECONNREFUSED)
					if (got >= 0)
						any = true;
				if (any && !open[i]) {
					open[i] = true;
					nopen++;
				}
			}
		}
	}
	free(open);
	close(ep);
	return nopen;
}

static int run_send_sockets(const struct cfg *c, uint64_t deadline)
{
	struct send_result r = { .flows_open = -1 };
	long nflows = c->flows;
	raise_nofile(nflows + 64);
	int *fds = xcalloc((size_t)nflows, sizeof *fds);
	for (long i = 0; i < nflows; i++) {
		fds[i] = socket(c->dst.ss_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
		if (fds[i] < 0)
			die("socket for flow %ld: %s (open-file limit?)", i, strerror(errno));
		set_timeouts(fds[i], 0, 100000); /* a blocked send gives up after 100 ms: EAGAIN, retried */
		struct sockaddr_storage src = c->src;
		sa_set_port(&src, c->src_port ? (uint16_t)(c->src_port + i) : 0);
		bind_or_die(fds[i], &src, c->src_len);
		connect_or_die(fds[i], &c->dst, c->dst_len);
	}
	write_ready(c->ready_file, fds[0]);
	uint64_t rng = rng_seed_random();
	if (c->users.n) {
		uint64_t until = now_ns() + (uint64_t)(c->open_timeout * 1e9);
		r.flows_open = open_flows(c, fds, nflows, until < deadline ? until : deadline, &r.stun_sent, &r.errors,
					  &rng);
	}

	long batch = c->batch;
	uint8_t *bufs = xcalloc((size_t)batch, (size_t)c->size);
	struct iovec *iov = xcalloc((size_t)batch, sizeof *iov);
	struct mmsghdr *msg = xcalloc((size_t)batch, sizeof *msg);
	for (long j = 0; j < batch; j++) {
		data_template(bufs + j * c->size, c->size);
		iov[j] = (struct iovec){ bufs + j * c->size, (size_t)c->size };
		msg[j].msg_hdr = (struct msghdr){ .msg_iov = &iov[j], .msg_iovlen = 1 };
	}
	struct pacer pc;
	pacer_init(&pc, c->rate, batch);
	uint32_t seq = 0;
	long flow = 0;
	r.t0 = now_ns();
	while (!g_stop) {
		long n = next_batch(c, r.sent, &pc, batch, deadline);
		if (n <= 0)
			break;
		uint64_t ts = now_ns();
		for (long j = 0; j < n; j++)
			data_stamp(bufs + j * c->size, seq + (uint32_t)j, ts);
		long off = send_in_order(fds[flow], msg, n, deadline, &r.errors, NULL);
		/* only what went out consumed sequence numbers: a partial batch never fakes a gap */
		seq += (uint32_t)off;
		r.sent += (uint64_t)off;
		pacer_spend(&pc, off);
		if (off > 0 && off < n) {
			/* re-stamp the unsent tail at the front next round: move on only after a full batch */
			continue;
		}
		if (++flow == nflows)
			flow = 0;
	}
	r.t1 = now_ns();
	print_send(c, &r);
	for (long i = 0; i < nflows; i++)
		close(fds[i]);
	return 0;
}

/* Packet mode: Ethernet/IPv4/UDP frames written whole on an AF_PACKET socket. */
#define ETH_LEN 14
#define IP_OFF 14
#define UDP_OFF 34
#define PAY_OFF 42

static uint32_t sum16(const uint8_t *p, size_t len, uint32_t sum)
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

static inline uint16_t fold(uint64_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xFFFF) + (sum >> 16);
	return (uint16_t)sum;
}

/* Headers for a payload of `plen` bytes; source address, port and checksums left zero. */
static void frame_headers(uint8_t *f, const struct cfg *c, size_t plen)
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

/* Fill source address/port and compute both checksums from scratch (STUN frames). */
static void frame_finish(uint8_t *f, uint32_t src_ip, uint16_t sport, size_t plen)
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

struct flowmap {
	uint32_t base_ip;
	long base_port, per_ip, n;
	uint32_t *perm; /* --shuffle: visiting order */
};

static inline void flow_src(const struct flowmap *fm, long pos, uint32_t *ip, uint16_t *port)
{
	uint32_t i = fm->perm ? fm->perm[pos] : (uint32_t)pos;
	*ip = fm->base_ip + i / (uint32_t)fm->per_ip;
	*port = (uint16_t)(fm->base_port + i % (uint32_t)fm->per_ip);
}

static int run_send_packets(const struct cfg *c, uint64_t deadline)
{
	struct send_result r = { .flows_open = -1 };
	int ifindex = (int)if_nametoindex(c->iface);
	if (!ifindex)
		die("--iface %s: %s", c->iface, strerror(errno));
	int fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0); /* protocol 0: this socket receives nothing */
	if (fd < 0)
		die("socket(AF_PACKET): %s", strerror(errno));
	int one = 1;
	setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof one); /* optional: falls back silently */
	set_bufs(fd, 0, 4 << 20);
	set_timeouts(fd, 0, 100000);
	struct sockaddr_ll ll = { .sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_IP), .sll_ifindex = ifindex,
				  .sll_halen = 6 };
	memcpy(ll.sll_addr, c->dst_mac, 6);
	struct sockaddr_ll bind_ll = { .sll_family = AF_PACKET, .sll_protocol = 0, .sll_ifindex = ifindex };
	if (bind(fd, (struct sockaddr *)&bind_ll, sizeof bind_ll) != 0)
		die("bind AF_PACKET to %s: %s", c->iface, strerror(errno));
	write_ready(c->ready_file, -1);

	struct flowmap fm = { .base_ip = ntohl(((const struct sockaddr_in *)&c->src)->sin_addr.s_addr),
			      .base_port = c->src_port, .per_ip = c->ports_per_ip, .n = c->flows };
	if (c->shuffle) {
		fm.perm = xcalloc((size_t)fm.n, sizeof *fm.perm);
		for (long i = 0; i < fm.n; i++)
			fm.perm[i] = (uint32_t)i;
		uint64_t s = mix64(c->seed + 0x9E3779B97F4A7C15ull);
		if (!s)
			s = 1;
		for (long i = fm.n - 1; i > 0; i--) {
			long j = (long)(rng_next(&s) % (uint64_t)(i + 1));
			uint32_t t = fm.perm[i];
			fm.perm[i] = fm.perm[j];
			fm.perm[j] = t;
		}
	}

	long batch = c->batch;
	struct iovec *iov = xcalloc((size_t)batch, sizeof *iov);
	struct mmsghdr *msg = xcalloc((size_t)batch, sizeof *msg);
	for (long j = 0; j < batch; j++)
		msg[j].msg_hdr = (struct msghdr){ .msg_name = &ll, .msg_namelen = sizeof ll, .msg_iov = &iov[j],
						  .msg_iovlen = 1 };
	struct pacer pc;
	pacer_init(&pc, c->rate, batch);
	uint64_t rng = rng_seed_random();

	/* STUN passes: one Binding Request per flow per round, answers not awaited */
	if (c->users.n) {
		size_t stride = (PAY_OFF + STUN_MAX + 63) & ~(size_t)63;
		uint8_t *sf = xcalloc((size_t)batch, stride);
		for (long round = 0; round < c->open_rounds && !g_stop; round++) {
			if (round) {
				uint64_t t = now_ns() + 50000000ull;
				sleep_until(t < deadline ? t : deadline);
			}
			long pos = 0;
			while (pos < fm.n && !g_stop && now_ns() < deadline) {
				long want = fm.n - pos < batch ? fm.n - pos : batch;
				long n = pace(&pc, want, deadline);
				if (n <= 0)
					break;
				for (long j = 0; j < n; j++) {
					uint8_t *f = sf + (size_t)j * stride;
					uint32_t ip;
					uint16_t port;
					long idx = fm.perm ? (long)fm.perm[pos + j] : pos + j;
					flow_src(&fm, pos + j, &ip, &port);
					size_t u = (size_t)idx % c->users.n;
					size_t plen = stun_build(f + PAY_OFF, c->users.name[u], c->users.len[u], &rng);
					frame_headers(f, c, plen);
					frame_finish(f, ip, port, plen);
					iov[j] = (struct iovec){ f, PAY_OFF + plen };
				}
				long off = send_in_order(fd, msg, n, deadline, &r.errors, c->iface);
				r.stun_sent += (uint64_t)off;
				pacer_spend(&pc, off);
				pos += off;
			}
		}
		free(sf);
	}

	/* data: per-flow fields patched into prebuilt frames, checksums updated incrementally */
	size_t plen = (size_t)c->size, flen = PAY_OFF + plen, stride = (flen + 63) & ~(size_t)63;
	uint8_t *frames = xcalloc((size_t)batch, stride);
	for (long j = 0; j < batch; j++) {
		uint8_t *f = frames + (size_t)j * stride;
		frame_headers(f, c, plen);
		data_template(f + PAY_OFF, c->size);
		iov[j] = (struct iovec){ f, flen };
	}
	/* sums of everything that never changes: source address, port, seq and time are zero here */
	uint32_t ip_const = fold(sum16(frames + IP_OFF, 20, 0));
	uint32_t udp_const = fold(sum16(frames + IP_OFF + 16, 4, 0) + IPPROTO_UDP + (uint32_t)(8 + plen) +
				  sum16(frames + UDP_OFF, 8 + plen, 0));
	uint32_t seq = 0;
	long pos = 0;
	r.t0 = now_ns();
	while (!g_stop) {
		long n = next_batch(c, r.sent, &pc, batch, deadline);
		if (n <= 0)
			break;
		uint64_t ts = now_ns();
		uint32_t ts_sum = (uint32_t)(ts >> 48) + (uint32_t)(ts >> 32 & 0xFFFF) + (uint32_t)(ts >> 16 & 0xFFFF) +
				  (uint32_t)(ts & 0xFFFF);
		long p = pos;
		for (long j = 0; j < n; j++) {
			uint8_t *f = frames + (size_t)j * stride;
			uint32_t ip, s = seq + (uint32_t)j;
			uint16_t port;
			flow_src(&fm, p, &ip, &port);
			if (++p == fm.n)
				p = 0;
			uint32_t ipw = (ip >> 16) + (ip & 0xFFFF);
			put32(f + IP_OFF + 12, ip);
			put16(f + IP_OFF + 10, (uint16_t)~fold(ip_const + ipw));
			put16(f + UDP_OFF, port);
			data_stamp(f + PAY_OFF, s, ts);
			uint16_t ck = (uint16_t)~fold((uint64_t)udp_const + ipw + port + (s >> 16) + (s & 0xFFFF) + ts_sum);
			put16(f + UDP_OFF + 6, ck ? ck : 0xFFFF);
		}
		long off = send_in_order(fd, msg, n, deadline, &r.errors, c->iface);
		/* flows and sequence numbers advance by what went out: the unsent tail is rebuilt next round */
		seq += (uint32_t)off;
		r.sent += (uint64_t)off;
		pacer_spend(&pc, off);
		pos = (long)(((uint64_t)pos + (uint64_t)off) % (uint64_t)fm.n);
	}
	r.t1 = now_ns();
	print_send(c, &r);
	close(fd);
	return 0;
}

/* ---------------------------------------------------------------- ping -- */

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

/* Wait for a datagram on fd until `until`; with want_seq, only a udpgen data packet
 * carrying that sequence number counts (others are discarded).  Returns its arrival time, 0 on timeout. */
static uint64_t await_answer(int fd, uint64_t until, bool match_seq, uint32_t want_seq)
{
	uint8_t buf[2048];
	for (;;) {
		uint64_t t = now_ns();
		if (t >= until || g_stop)
			return 0;
		struct pollfd pfd = { .fd = fd, .events = POLLIN };
		uint64_t left = until - t;
		struct timespec ts = { .tv_sec = (time_t)(left / 1000000000ull), .tv_nsec = (long)(left % 1000000000ull) };
		int n = ppoll(&pfd, 1, &ts, NULL);
		if (n < 0 && errno != EINTR)
			die("ppoll: %s", strerror(errno));
		if (n <= 0)
			continue;
		ssize_t got;
		while ((got = recv(fd, buf, sizeof buf, MSG_DONTWAIT)) >= 0 || errno == ECONNREFUSED) {
			if (got < 0)
				continue;
			uint64_t at = now_ns();
			if (!match_seq || (got >= 20 && buf[0] == 0x80 && get32(buf + 4) == want_seq))
				return at;
		}
	}
}

static int ping_socket(const struct cfg *c)
{
	int fd = udp_socket(c->dst.ss_family);
	if (c->given[O_SRC_IP])
		bind_or_die(fd, &c->src, c->src_len);
	connect_or_die(fd, &c->dst, c->dst_len);
	return fd;
}

/* The kernel picks a random ephemeral port per socket, so 30 new sockets repeat a port
 * about 1.5 % of the time (30*29/2 pairs over ~28k ports), and a repeated port is no new
 * flow to the relay. --new-flow-each walks the ephemeral range instead, from a random
 * start, skipping ports in use: every probe's port is distinct until the range wraps. */
struct port_walk { uint32_t first, span, next; };

static struct port_walk port_walk_start(uint64_t *rng)
{
	unsigned lo = 32768, hi = 60999;
	FILE *f = fopen("/proc/sys/net/ipv4/ip_local_port_range", "r");
	if (f) {
		if (fscanf(f, "%u %u", &lo, &hi) != 2 || lo == 0 || hi < lo || hi > 65535)
			lo = 32768, hi = 60999;
		fclose(f);
	}
	uint32_t span = hi - lo + 1;
	return (struct port_walk){ .first = lo, .span = span, .next = (uint32_t)(rng_next(rng) % span) };
}

static int ping_socket_new_port(const struct cfg *c, struct port_walk *w)
{
	char buf[80];
	for (uint32_t tries = 0; tries < w->span; tries++) {
		int fd = udp_socket(c->dst.ss_family);
		struct sockaddr_storage src = c->src;
		sa_set_port(&src, (uint16_t)(w->first + w->next));
		w->next = (w->next + 1) % w->span;
		if (bind(fd, (const struct sockaddr *)&src, c->src_len) == 0) {
			connect_or_die(fd, &c->dst, c->dst_len);
			return fd;
		}
		int err = errno;
		close(fd);
		if (err != EADDRINUSE)
			die("bind %s: %s", sa_str(&src, buf, sizeof buf), strerror(err));
	}
	die("no free source port in %u..%u", w->first, w->first + w->span - 1);
}

static int run_ping(const struct cfg *c, uint64_t deadline)
{
	uint64_t *rtt = xcalloc((size_t)c->count, sizeof *rtt);
	long sent = 0, received = 0;
	uint64_t errors = 0, rng = rng_seed_random();
	uint64_t timeout = (uint64_t)c->timeout_ms * 1000000ull;
	uint8_t stun[STUN_MAX];
	uint8_t *data = xcalloc(1, (size_t)c->size);
	data_template(data, c->size);
	int fd = -1;
	char dst[80];
	sa_str(&c->dst, dst, sizeof dst);
	struct port_walk ports = port_walk_start(&rng);

	if (!c->new_flow_each) {
		fd = ping_socket(c);
		write_ready(c->ready_file, fd);
		if (c->users.n) {
			uint64_t until = now_ns() + (uint64_t)(c->open_timeout * 1e9);
			if (until > deadline)
				until = deadline;
			bool open = false;
			while (!open && !g_stop && now_ns() < until) {
				size_t len = stun_build(stun, c->users.name[0], c->users.len[0], &rng);
				if (send(fd, stun, len, 0) < 0 && !transient(errno))
					die("send STUN request to %s: %s", dst, strerror(errno));
				uint64_t wait = now_ns() + 100000000ull;
				open = await_answer(fd, wait < until ? wait : until, false, 0) != 0;
			}
			if (!open && !g_stop)
				die("no answer to the STUN Binding Request from %s within %.3g s", dst, c->open_timeout);
		}
	} else {
		write_ready(c->ready_file, -1);
	}

	for (long k = 0; k < c->count && !g_stop && now_ns() < deadline; k++) {
		if (k && c->interval_us) {
			uint64_t t = now_ns() + (uint64_t)c->interval_us * 1000ull;
			sleep_until(t < deadline ? t : deadline);
			if (g_stop || now_ns() >= deadline)
				break;
		}
		uint64_t t0, at;
		if (c->new_flow_each) {
			int nfd = ping_socket_new_port(c, &ports);
			size_t u = (size_t)k % c->users.n;
			size_t len = stun_build(stun, c->users.name[u], c->users.len[u], &rng);
			t0 = now_ns();
			sent++;
			if (send(nfd, stun, len, 0) < 0) {
				if (!transient(errno))
					die("send to %s: %s", dst, strerror(errno));
				errors++;
				close(nfd);
				continue;
			}
			at = await_answer(nfd, t0 + timeout < deadline ? t0 + timeout : deadline, false, 0);
			close(nfd);
		} else {
			t0 = now_ns();
			data_stamp(data, (uint32_t)k, t0);
			sent++;
			if (send(fd, data, (size_t)c->size, 0) < 0) {
				if (!transient(errno))
					die("send to %s: %s", dst, strerror(errno));
				errors++;
				continue;
			}
			at = await_answer(fd, t0 + timeout < deadline ? t0 + timeout : deadline, true, (uint32_t)k);
		}
		if (at) {
			rtt[received++] = at - t0;
		} else if (g_stop || now_ns() - t0 < timeout) {
			sent--; /* cut short by --duration or a signal before its timeout: not a loss */
			break;
		}
	}
	if (fd >= 0)
		close(fd);

	if (c->samples) {
		FILE *f = fopen(c->samples, "w");
		if (!f)
			die("--samples %s: %s", c->samples, strerror(errno));
		for (long i = 0; i < received; i++)
			fprintf(f, "%" PRIu64 "\n", rtt[i]);
		if (fclose(f) != 0)
			die("--samples %s: %s", c->samples, strerror(errno));
	}
	qsort(rtt, (size_t)received, sizeof *rtt, cmp_u64);
	double sum = 0;
	for (long i = 0; i < received; i++)
		sum += (double)rtt[i];
	bool ok = received > 0;
	/* nearest rank: the smallest sample with at least q of all samples at or below it */
	static const struct { const char *key; long q; } P[] = {
		{ "p50_us", 5000 }, { "p90_us", 9000 }, { "p99_us", 9900 }, { "p999_us", 9990 } };
	printf("{\"mode\":\"ping\",\"count\":%ld,\"received\":%ld,\"lost\":%ld,", sent, received, sent - received);
	json_num_or_null("min_us", ok ? (double)rtt[0] / 1e3 : 0, ok, false);
	json_num_or_null("mean_us", ok ? sum / (double)received / 1e3 : 0, ok, false);
	for (size_t i = 0; i < sizeof P / sizeof P[0]; i++) {
		long rank = (P[i].q * received + 9999) / 10000;
		if (rank < 1)
			rank = 1;
		json_num_or_null(P[i].key, ok ? (double)rtt[rank - 1] / 1e3 : 0, ok, false);
	}
	json_num_or_null("max_us", ok ? (double)rtt[received - 1] / 1e3 : 0, ok, false);
	printf("\"send_errors\":%" PRIu64 "}\n", errors);
	free(rtt);
	free(data);
	return 0;
}

/* ---------------------------------------------------------------- main -- */

int main(int argc, char **argv)
{
	struct cfg c;
	parse_args(argc, argv, &c);
	uint64_t start = now_ns();
	uint64_t deadline = start + (uint64_t)(c.duration * 1e9);

	struct sigaction sa = { .sa_handler = on_signal }; /* no SA_RESTART: blocking calls return EINTR */
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	crc32_init();
	users_load(&c.users, c.username, c.usernames_file);

	if (c.cpu >= 0) {
		cpu_set_t set;
		CPU_ZERO(&set);
		CPU_SET((int)c.cpu, &set);
		if (sched_setaffinity(0, sizeof set, &set) != 0)
			die("--cpu %ld: %s", c.cpu, strerror(errno));
	}
	int rc;
	switch (c.mode) {
	case M_SINK: rc = run_sink(&c, deadline); break;
	case M_ECHO: rc = run_echo(&c, deadline); break;
	case M_SEND: rc = c.iface ? run_send_packets(&c, deadline) : run_send_sockets(&c, deadline); break;
	default: rc = run_ping(&c, deadline); break;
	}
	fflush(stdout);
	return rc;
}
