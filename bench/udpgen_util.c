/* udpgen_util.c: what every mode uses: errors, time, random numbers, addresses, sockets, pacing, JSON. */
#include "udpgen.h"

/* ---------------------------------------------------------------- errors -- */

void usage_error(const char *fmt, ...)
{
	va_list ap;
	fputs("udpgen: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputs(" (see udpgen --help)\n", stderr);
	exit(2);
}

void die(const char *fmt, ...)
{
	va_list ap;
	fputs("udpgen: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

void *xcalloc(size_t n, size_t size)
{
	void *p = calloc(n ? n : 1, size ? size : 1);
	if (!p)
		die("out of memory (%zu x %zu bytes)", n, size);
	return p;
}

/* ------------------------------------------------------------ time, etc -- */

volatile sig_atomic_t g_stop;

void on_signal(int sig)
{
	(void)sig;
	g_stop = 1;
}

void sleep_until(uint64_t t)
{
	struct timespec ts = { .tv_sec = (time_t)(t / 1000000000ull), .tv_nsec = (long)(t % 1000000000ull) };
	while (!g_stop && clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
		;
}

uint64_t rng_next(uint64_t *s)
{
	uint64_t x = *s;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*s = x;
	return x * 0x2545F4914F6CDD1Dull;
}

uint64_t rng_seed_random(void)
{
	uint64_t s = 0;
	if (getrandom(&s, sizeof s, 0) != (ssize_t)sizeof s)
		s = now_ns() ^ (uint64_t)getpid() << 32;
	return s ? s : 0x9E3779B97F4A7C15ull;
}

/* ------------------------------------------------------------ addresses -- */

uint16_t sa_port(const struct sockaddr_storage *sa)
{
	return ntohs(sa->ss_family == AF_INET ? ((const struct sockaddr_in *)sa)->sin_port
					      : ((const struct sockaddr_in6 *)sa)->sin6_port);
}

void sa_set_port(struct sockaddr_storage *sa, uint16_t port)
{
	if (sa->ss_family == AF_INET)
		((struct sockaddr_in *)sa)->sin_port = htons(port);
	else
		((struct sockaddr_in6 *)sa)->sin6_port = htons(port);
}

const char *sa_str(const struct sockaddr_storage *sa, char *buf, size_t len)
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

/* ------------------------------------------------------------ sockets -- */

int udp_socket(int family)
{
	int fd = socket(family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		die("socket: %s", strerror(errno));
	return fd;
}

void set_timeouts(int fd, long rcv_us, long snd_us)
{
	struct timeval r = { rcv_us / 1000000, rcv_us % 1000000 }, s = { snd_us / 1000000, snd_us % 1000000 };
	if (rcv_us)
		setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &r, sizeof r);
	if (snd_us)
		setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &s, sizeof s);
}

void set_bufs(int fd, int rcv, int snd)
{
	/* *FORCE ignore rmem_max/wmem_max as root; else the plain option (capped by the kernel) */
	if (rcv && setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcv, sizeof rcv) != 0)
		setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof rcv);
	if (snd && setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &snd, sizeof snd) != 0)
		setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &snd, sizeof snd);
}

void bind_or_die(int fd, const struct sockaddr_storage *sa, socklen_t len)
{
	char buf[80];
	if (bind(fd, (const struct sockaddr *)sa, len) != 0)
		die("bind %s: %s", sa_str(sa, buf, sizeof buf), strerror(errno));
}

void connect_or_die(int fd, const struct sockaddr_storage *sa, socklen_t len)
{
	char buf[80];
	if (connect(fd, (const struct sockaddr *)sa, len) != 0)
		die("connect %s: %s", sa_str(sa, buf, sizeof buf), strerror(errno));
}

/* The ready file says "IP:PORT" of the bound socket; written to a temporary name and
 * renamed, so whoever awaits it never reads half of it. */
void write_ready(const char *path, int fd)
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

bool transient(int err)
{
	/* back-pressure (full socket/qdisc/device), a send timeout, a signal, or a soft error
	 * (an ICMP error reported on a connected socket, a neighbour that did not answer ARP yet):
	 * the next send goes out normally.  No route at all (ENETUNREACH) is a setup error. */
	return err == EAGAIN || err == EWOULDBLOCK || err == ENOBUFS || err == EINTR || err == ECONNREFUSED ||
	       err == EHOSTUNREACH;
}

void raise_nofile(long need)
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

/* Send msg[0..n) in order: what the kernel pushes back (full buffers) is retried and counted in
 * *errors, the deadline or a signal stops it, anything else is fatal.  Returns how many went out. */
long send_in_order(int fd, struct mmsghdr *msg, long n, uint64_t deadline, uint64_t *errors,
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

/* --------------------------------------------------------------- pacing -- */

void pacer_init(struct pacer *p, double rate, long batch)
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

long pace(struct pacer *p, long want, uint64_t deadline)
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

void pacer_spend(struct pacer *p, long n)
{
	p->tokens -= (double)n;
}

/* ---------------------------------------------------------------- JSON -- */

void json_num_or_null(const char *key, double v, bool valid, bool last)
{
	if (valid)
		printf("\"%s\":%.3f%s", key, v, last ? "" : ",");
	else
		printf("\"%s\":null%s", key, last ? "" : ",");
}
