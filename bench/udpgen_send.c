/* udpgen_send.c: the send loops: many flows over UDP sockets (socket mode) or raw frames (packet mode). */
#include "udpgen.h"

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

int run_send_sockets(const struct cfg *c, uint64_t deadline)
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

int run_send_packets(const struct cfg *c, uint64_t deadline)
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
