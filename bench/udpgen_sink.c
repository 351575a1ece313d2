/* udpgen_sink.c: the sink (counts datagrams, optionally answers STUN) and the echo. */
#include "udpgen.h"

/* Distinct source addresses: open addressing over 64-bit keys (0 = empty), grown by doubling. */
struct flowset {
	uint64_t *slot;
	size_t cap, n;
	bool capped;
};

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

int run_sink(const struct cfg *c, uint64_t deadline)
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

int run_echo(const struct cfg *c, uint64_t deadline)
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
