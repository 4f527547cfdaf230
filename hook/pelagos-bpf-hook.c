/*
 * pelagos-bpf-hook: the OCI hook runtimes exec (createRuntime/prestart and poststop).
 *
 * Why C, and static: a runtime execs its hook once per container stage, and a Python start
 * alone costs many times what a static binary's exec does (bench/bench_agent.py). This
 * program does no cgroup or BPF work: it forwards the OCI state (stdin) and the stage to
 * `pelagos-bpf agent` over its unix socket, prints the agent's message on stderr and exits
 * with the agent's exit code. The protocol is pelagos_bpf/agent/protocol.py's (docs/AGENT.md):
 * a 12-byte big-endian header (magic "PBA1", u16 version 1, u16 kind, u32 length), then the
 * payload; a HOOK request carries "STAGE\n" + state, its HOOK_REPLY one exit-code byte + text.
 *
 * Paths:
 *   - agent answers: its exit code and message;
 *   - no agent (no socket, or nobody listening): exec `pelagos-bpf oci-hook STAGE` of this
 *     installation with the same stdin bytes (a memfd as fd 0), unless
 *     PELAGOS_BPF_AGENT=required, which exits 2 instead;
 *   - the agent accepted, then closed early or missed the deadline: exit 2 with the reason.
 *
 * Environment: PELAGOS_BPF_AGENT_SOCKET (default /run/pelagos-bpf/agent.sock),
 * PELAGOS_BPF_AGENT_TIMEOUT (seconds, default 10: connect, send and reply together),
 * PELAGOS_BPF_AGENT (auto | required), PELAGOS_BPF_HOOK_FALLBACK (the `pelagos-bpf` to exec
 * when there is no agent; default: found relative to this binary).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAGIC "PBA1"
#define PROTO_VERSION 1
#define KIND_HOOK 1
#define KIND_HOOK_REPLY 0x8001
#define KIND_CALL_REPLY 0x8002
#define HEADER_SIZE 12
#define MAX_PAYLOAD (1u << 20)
#define DEFAULT_SOCKET "/run/pelagos-bpf/agent.sock"
#define DEFAULT_TIMEOUT_MS 10000
#define EXIT_FAIL 2

static const char *sock_path;
static long timeout_ms;
static struct timespec deadline;

static void fail(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));

static void fail(const char *fmt, ...)
{
	va_list ap;
	fputs("pelagos-bpf-hook: error: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(EXIT_FAIL);
}

static long ms_left(void)
{
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	long ms = (deadline.tv_sec - now.tv_sec) * 1000 + (deadline.tv_nsec - now.tv_nsec) / 1000000;
	return ms > 0 ? ms : 0;
}

static long parse_timeout(const char *s)
{
	char *end;
	errno = 0;
	double v = strtod(s, &end);
	if (errno || end == s || *end || !(v > 0) || v > 3600)
		fail("PELAGOS_BPF_AGENT_TIMEOUT=%s: want seconds, more than 0 and at most 3600", s);
	long ms = (long)(v * 1000);
	return ms > 0 ? ms : 1;
}

/* Read all of stdin (at most cap bytes) into a new buffer. */
static char *read_stdin(size_t cap, size_t *len)
{
	size_t size = 4096, n = 0;
	char *buf = malloc(size);
	if (!buf)
		fail("out of memory");
	for (;;) {
		if (n == size) {
			if (size > cap)
				fail("the OCI state on stdin exceeds %zu bytes", cap);
			size *= 2;
			buf = realloc(buf, size);
			if (!buf)
				fail("out of memory");
		}
		ssize_t r = read(0, buf + n, size - n);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			fail("reading the OCI state from stdin: %s", strerror(errno));
		if (r == 0)
			break;
		n += (size_t)r;
	}
	if (n > cap)
		fail("the OCI state on stdin exceeds %zu bytes", cap);
	*len = n;
	return buf;
}

/* The `pelagos-bpf` CLI of this installation: $PELAGOS_BPF_HOOK_FALLBACK, else beside the
 * interpreter of an install (<prefix>/lib/pythonX.Y/site-packages/pelagos_bpf/_bin/ ->
 * <prefix>/bin), else the bootstrap venv of a source checkout (<tree>/pelagos_bpf/_bin/ ->
 * <tree>/.venv/bin). */
static const char *fallback_cli(char *buf, size_t size)
{
	const char *env = getenv("PELAGOS_BPF_HOOK_FALLBACK");
	if (env && *env)
		return env;
	char self[PATH_MAX];
	ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
	if (n <= 0)
		return NULL;
	self[n] = 0;
	char *slash = strrchr(self, '/');
	if (!slash)
		return NULL;
	*slash = 0; /* self = .../pelagos_bpf/_bin */
	static const char *const rel[] = {"/../../../../../bin/pelagos-bpf",
					  "/../../.venv/bin/pelagos-bpf"};
	for (size_t i = 0; i < sizeof rel / sizeof rel[0]; i++) {
		if ((size_t)snprintf(buf, size, "%s%s", self, rel[i]) >= size)
			continue;
		char *real = realpath(buf, NULL);
		if (real && access(real, X_OK) == 0) {
			snprintf(buf, size, "%s", real);
			free(real);
			return buf;
		}
		free(real);
	}
	return NULL;
}

/* No agent: run today's in-process hook with the stdin bytes we already read. */
static void run_in_process(const char *stage, const char *state, size_t len, int why)
	__attribute__((noreturn));

static void run_in_process(const char *stage, const char *state, size_t len, int why)
{
	const char *mode = getenv("PELAGOS_BPF_AGENT");
	if (mode && strcmp(mode, "required") == 0)
		fail("no agent at %s (%s) and PELAGOS_BPF_AGENT=required: start `pelagos-bpf agent`",
		     sock_path, strerror(why));
	char buf[PATH_MAX];
	const char *cli = fallback_cli(buf, sizeof buf);
	if (!cli)
		fail("no agent at %s (%s), and no pelagos-bpf found to run the hook in-process "
		     "(set PELAGOS_BPF_HOOK_FALLBACK)",
		     sock_path, strerror(why));
	int fd = memfd_create("pelagos-bpf-hook-state", 0);
	if (fd < 0)
		fail("no agent at %s; memfd_create for the in-process hook: %s", sock_path,
		     strerror(errno));
	for (size_t off = 0; off < len;) {
		ssize_t w = write(fd, state + off, len - off);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0)
			fail("no agent at %s; writing the state for the in-process hook: %s", sock_path,
			     strerror(errno));
		off += (size_t)w;
	}
	if (lseek(fd, 0, SEEK_SET) != 0 || dup2(fd, 0) != 0)
		fail("no agent at %s; preparing stdin for the in-process hook: %s", sock_path,
		     strerror(errno));
	close(fd);
	char *const argv[] = {"pelagos-bpf", "oci-hook", (char *)stage, NULL};
	execv(cli, argv);
	fail("no agent at %s, and exec %s failed: %s", sock_path, cli, strerror(errno));
}

static void set_timeouts(int fd)
{
	long ms = ms_left();
	struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};
	if (ms == 0)
		tv.tv_usec = 1000;
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

/* Send the request; an agent that refuses early (another uid, too many connections) replies
 * and closes before reading it all, so a closed socket here still has its reply to read. */
static void send_all(int fd, const char *p, size_t len)
{
	while (len) {
		set_timeouts(fd);
		ssize_t w = send(fd, p, len, MSG_NOSIGNAL);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && (errno == EPIPE || errno == ECONNRESET))
			return;
		if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			fail("the agent at %s did not take the request within %ld ms", sock_path,
			     timeout_ms);
		if (w < 0)
			fail("sending to the agent at %s: %s", sock_path, strerror(errno));
		p += w;
		len -= (size_t)w;
	}
}

static void recv_all(int fd, char *p, size_t len, const char *what)
{
	while (len) {
		struct pollfd pfd = {.fd = fd, .events = POLLIN};
		int r = poll(&pfd, 1, (int)ms_left());
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			fail("waiting for the agent at %s: %s", sock_path, strerror(errno));
		if (r == 0)
			fail("no reply from the agent at %s within %ld ms (PELAGOS_BPF_AGENT_TIMEOUT)",
			     sock_path, timeout_ms);
		ssize_t n = recv(fd, p, len, 0);
		if (n < 0 && errno == EINTR)
			continue;
		/* An agent that dies (SIGKILL) with our request still unread in its socket makes the
		 * kernel reset the connection instead of closing it: the same event, one message. */
		if (n < 0 && errno == ECONNRESET)
			fail("the agent at %s closed the connection before its %s (reset: it died with "
			     "the request unread)",
			     sock_path, what);
		if (n < 0)
			fail("reading %s from the agent at %s: %s", what, sock_path, strerror(errno));
		if (n == 0)
			fail("the agent at %s closed the connection before its %s", sock_path, what);
		p += n;
		len -= (size_t)n;
	}
}

static uint16_t be16(const unsigned char *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t be32(const unsigned char *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

int main(int argc, char **argv)
{
	const char *stage = argc > 1 ? argv[1] : "auto";
	if (argc > 2 || (strcmp(stage, "create") && strcmp(stage, "poststop") && strcmp(stage, "auto")))
		fail("usage: %s [create|poststop|auto] (the OCI state on stdin)", argv[0]);
	sock_path = getenv("PELAGOS_BPF_AGENT_SOCKET");
	if (!sock_path || !*sock_path)
		sock_path = DEFAULT_SOCKET;
	const char *t = getenv("PELAGOS_BPF_AGENT_TIMEOUT");
	timeout_ms = t && *t ? parse_timeout(t) : DEFAULT_TIMEOUT_MS;
	const char *mode = getenv("PELAGOS_BPF_AGENT");
	if (mode && *mode && strcmp(mode, "auto") && strcmp(mode, "required"))
		fail("PELAGOS_BPF_AGENT=%s: want auto or required", mode);

	size_t stage_len = strlen(stage), state_len;
	char *state = read_stdin(MAX_PAYLOAD - stage_len - 1, &state_len);
	clock_gettime(CLOCK_MONOTONIC, &deadline);
	deadline.tv_sec += timeout_ms / 1000;
	deadline.tv_nsec += (timeout_ms % 1000) * 1000000;
	if (deadline.tv_nsec >= 1000000000) {
		deadline.tv_sec++;
		deadline.tv_nsec -= 1000000000;
	}

	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	if (strlen(sock_path) >= sizeof addr.sun_path)
		fail("PELAGOS_BPF_AGENT_SOCKET=%s: longer than %zu bytes", sock_path,
		     sizeof addr.sun_path - 1);
	strcpy(addr.sun_path, sock_path);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		fail("socket: %s", strerror(errno));
	set_timeouts(fd); /* a blocking connect waits for room in the agent's backlog this long */
	while (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
		if (errno == EINTR)
			continue;
		if (errno == ENOENT || errno == ECONNREFUSED) {
			close(fd);
			run_in_process(stage, state, state_len, errno);
		}
		if (errno == EAGAIN)
			fail("the agent at %s accepted no connection within %ld ms (overloaded?)",
			     sock_path, timeout_ms);
		fail("connecting to the agent at %s: %s", sock_path, strerror(errno));
	}

	size_t payload_len = stage_len + 1 + state_len;
	char *req = malloc(HEADER_SIZE + payload_len);
	if (!req)
		fail("out of memory");
	unsigned char *h = (unsigned char *)req;
	memcpy(h, MAGIC, 4);
	h[4] = 0, h[5] = PROTO_VERSION;
	h[6] = KIND_HOOK >> 8, h[7] = KIND_HOOK & 0xff;
	h[8] = (unsigned char)(payload_len >> 24), h[9] = (unsigned char)(payload_len >> 16);
	h[10] = (unsigned char)(payload_len >> 8), h[11] = (unsigned char)payload_len;
	memcpy(req + HEADER_SIZE, stage, stage_len);
	req[HEADER_SIZE + stage_len] = '\n';
	memcpy(req + HEADER_SIZE + stage_len + 1, state, state_len);
	send_all(fd, req, HEADER_SIZE + payload_len);

	unsigned char hdr[HEADER_SIZE];
	recv_all(fd, (char *)hdr, sizeof hdr, "reply");
	uint16_t kind = be16(hdr + 6);
	uint32_t len = be32(hdr + 8);
	if (memcmp(hdr, MAGIC, 4) || be16(hdr + 4) != PROTO_VERSION)
		fail("the agent at %s sent a reply this hook cannot read (magic or version)", sock_path);
	if ((kind != KIND_HOOK_REPLY && kind != KIND_CALL_REPLY) || len > MAX_PAYLOAD ||
	    (kind == KIND_HOOK_REPLY && len == 0))
		fail("the agent at %s sent a malformed reply (kind %#x, %u bytes)", sock_path, kind,
		     len);
	char *reply = malloc(len + 1);
	if (!reply)
		fail("out of memory");
	recv_all(fd, reply, len, "reply");
	close(fd);
	if (kind == KIND_CALL_REPLY) { /* refused before it read our frame: JSON with a message */
		reply[len] = 0;
		fail("the agent at %s refused the request: %s", sock_path, reply);
	}
	size_t text = len - 1;
	if (text) {
		fwrite(reply + 1, 1, text, stderr);
		if (reply[len - 1] != '\n')
			fputc('\n', stderr);
	}
	return (unsigned char)reply[0];
}
