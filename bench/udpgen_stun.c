/* udpgen_stun.c: STUN Binding Requests (USERNAME, PRIORITY, FINGERPRINT) and the usernames they carry. */
#include "udpgen.h"

static uint32_t crc_table[256];

void crc32_init(void)
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
size_t stun_build(uint8_t *out, const char *user, size_t ulen, uint64_t *rng)
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


static void users_check(const char *u, size_t len, const char *where)
{
	if (len == 0 || len > MAX_USERNAME)
		usage_error("%s: a username must have 1..%d bytes, got %zu", where, MAX_USERNAME, len);
	for (size_t i = 0; i < len; i++)
		if ((unsigned char)u[i] < 0x20)
			usage_error("%s: control character in a username", where);
}

void users_load(struct users *us, const char *single, const char *file)
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
