/* udpgen_ping.c: round-trip times of data packets, or of first STUN packets of new flows. */
#include "udpgen.h"

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

int run_ping(const struct cfg *c, uint64_t deadline)
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
