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
#include "udpgen.h"

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

/* -------------------------------------------------------------- options -- */

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
