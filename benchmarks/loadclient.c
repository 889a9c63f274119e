/* The fan-out benchmark's load client in C: what fanout.py's client_process does,
 * at a fraction of its CPU.
 *
 *     cc -O2 -o loadclient benchmarks/loadclient.c
 *     loadclient PORT COUNT SUBSCRIBE(0|1)
 *
 * One process holds COUNT WebSocket connections to 127.0.0.1:PORT. Control is
 * line-based, on stdin/stdout:
 *
 *   -> connected N        all connections open (HTTP upgrade answered with 101)
 *   <- subscribe          send each connection the subscription (if SUBSCRIBE)
 *   -> ready K            K connections have caught up (an event less than 0.5 s
 *                         old), at once if not subscribing, at most after 20 s
 *   <- start              reset the counts and the per-stream seqs; measure
 *   <- stop               stop measuring; answer with two lines:
 *   -> result DELIVERIES GAPS FRAMES CLOSED
 *   -> hist B:N B:N ...   the nonzero 10 us latency buckets
 *   <- quit               (or end of stdin) close everything and exit
 *   -> error MESSAGE      a connection could not be made
 *
 * Server frames: 7/16/64-bit lengths, fragmented messages (continuation frames,
 * FIN), pings answered with masked pongs carrying the same payload, a close frame
 * or end of stream counts the connection as closed. A message is one JSON object
 * or an array of them; objects without "seq" (welcome, ack, ...) are skipped. The
 * objects are walked, not parsed: top-level keys are read, values are skipped by
 * tracking strings (with escapes) and bracket depth, and only "type", "exchange",
 * "symbol", "seq" and "recv_ts" are taken.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <arpa/inet.h>
#include <time.h>
#include <unistd.h>

#define BUCKETS 200000         /* 10 us buckets: 0 .. 2 s, later ones in the last */
#define PER_SECOND_BUCKETS 1e5 /* 1,000,000 / BUCKET_US */
#define LIVE 0.5               /* seconds: events this fresh mean caught up */
#define CATCH_UP 20.0          /* seconds to wait for that at most */
#define RECV_SIZE (1 << 18)
#define NO_SEQ INT64_MIN

static const char SUBSCRIBE[] =
    "{\"op\":\"subscribe\",\"id\":1,\"channels\":[\"trades\",\"book\",\"ticker\","
    "\"system\"],\"symbols\":[\"*\"]}";

typedef struct {
    char *data;
    size_t len, cap;
} Buf;

typedef struct {
    int fd;
    Buf buf;        /* unparsed bytes */
    Buf parts;      /* a fragmented message so far */
    int64_t *seqs;  /* last seq per stream id, NO_SEQ if none */
    size_t nseqs;
    int closed, live, registered;
} Conn;

static struct {
    long long deliveries, gaps, frames, closed;
    long long *hist;
} counts;

static int measuring = 0;

/* -- small helpers ------------------------------------------------------------- */

static void die_oom(void) {
    fputs("error out of memory\n", stdout);
    fflush(stdout);
    exit(1);
}

static void buf_reserve(Buf *b, size_t extra) {
    if (b->len + extra <= b->cap) return;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra) cap *= 2;
    char *data = realloc(b->data, cap);
    if (!data) die_oom();
    b->data = data;
    b->cap = cap;
}

static void buf_append(Buf *b, const char *data, size_t n) {
    buf_reserve(b, n);
    memcpy(b->data + b->len, data, n);
    b->len += n;
}

static double now_epoch(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double now_mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stdout, fmt, ap);
    va_end(ap);
    fputc('\n', stdout);
    fflush(stdout);
}

static void random_bytes(unsigned char *out, size_t n) {
    while (n) {
        ssize_t got = getrandom(out, n, 0);
        if (got < 0) {
            if (errno == EINTR) continue;
            for (size_t i = 0; i < n; i++) out[i] = (unsigned char)rand();
            return;
        }
        out += got;
        n -= (size_t)got;
    }
}

/* Send everything, waiting (poll) while a non-blocking socket is full. */
static int send_all(int fd, const char *data, size_t n) {
    while (n) {
        ssize_t sent = send(fd, data, n, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                struct pollfd p = {.fd = fd, .events = POLLOUT};
                poll(&p, 1, 1000);
                continue;
            }
            return -1;
        }
        data += sent;
        n -= (size_t)sent;
    }
    return 0;
}

/* A masked client frame. */
static int send_frame(int fd, int opcode, const char *payload, size_t n) {
    unsigned char stack[256];
    size_t size = n + 14;
    unsigned char *out = size <= sizeof stack ? stack : malloc(size);
    if (!out) die_oom();
    size_t h = 0;
    out[h++] = (unsigned char)(0x80 | opcode);
    if (n < 126) {
        out[h++] = (unsigned char)(0x80 | n);
    } else if (n < 65536) {
        out[h++] = 0x80 | 126;
        out[h++] = (unsigned char)(n >> 8);
        out[h++] = (unsigned char)n;
    } else {
        out[h++] = 0x80 | 127;
        for (int i = 7; i >= 0; i--) out[h++] = (unsigned char)((uint64_t)n >> (8 * i));
    }
    unsigned char mask[4];
    random_bytes(mask, 4);
    memcpy(out + h, mask, 4);
    h += 4;
    for (size_t i = 0; i < n; i++) out[h + i] = (unsigned char)payload[i] ^ mask[i & 3];
    int rc = send_all(fd, (const char *)out, h + n);
    if (out != stack) free(out);
    return rc;
}

/* -- stream ids: (channel, exchange, symbol) interned once for all connections ---- */

typedef struct {
    char *key;
    size_t len;
    uint64_t hash;
    size_t id;
} Slot;

static Slot *slots;
static size_t slot_cap, nstreams;

static uint64_t fnv(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 1099511628211ULL;
    return h;
}

static void slots_insert(Slot s) {
    size_t i = s.hash & (slot_cap - 1);
    while (slots[i].key) i = (i + 1) & (slot_cap - 1);
    slots[i] = s;
}

static size_t stream_id(const char *key, size_t len) {
    uint64_t h = fnv(key, len);
    if (slot_cap) {
        for (size_t i = h & (slot_cap - 1); slots[i].key; i = (i + 1) & (slot_cap - 1))
            if (slots[i].hash == h && slots[i].len == len && !memcmp(slots[i].key, key, len))
                return slots[i].id;
    }
    if ((nstreams + 1) * 2 > slot_cap) {
        Slot *old = slots;
        size_t old_cap = slot_cap;
        slot_cap = slot_cap ? slot_cap * 2 : 256;
        slots = calloc(slot_cap, sizeof *slots);
        if (!slots) die_oom();
        for (size_t i = 0; i < old_cap; i++)
            if (old[i].key) slots_insert(old[i]);
        free(old);
    }
    Slot s = {.key = malloc(len ? len : 1), .len = len, .hash = h, .id = nstreams++};
    if (!s.key) die_oom();
    memcpy(s.key, key, len);
    slots_insert(s);
    return s.id;
}

/* -- the JSON walk ---------------------------------------------------------------- */

static const char *skip_ws(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
    return p;
}

/* p at an opening quote: the position after the closing one (or end). */
static const char *skip_string(const char *p, const char *end) {
    for (p++; p < end; p++) {
        if (*p == '\\') p++;
        else if (*p == '"') return p + 1;
    }
    return end;
}

/* Any value: a string, an object or array (depth counted, strings skipped), or a
 * scalar (up to the next delimiter). */
static const char *skip_value(const char *p, const char *end) {
    if (p >= end) return end;
    if (*p == '"') return skip_string(p, end);
    if (*p == '{' || *p == '[') {
        int depth = 0;
        while (p < end) {
            char c = *p;
            if (c == '"') {
                p = skip_string(p, end);
                continue;
            }
            if (c == '{' || c == '[') depth++;
            else if (c == '}' || c == ']') {
                if (--depth == 0) return p + 1;
            }
            p++;
        }
        return end;
    }
    while (p < end && *p != ',' && *p != '}' && *p != ']' && *p != ' ' && *p != '\n' &&
           *p != '\r' && *p != '\t')
        p++;
    return p;
}

typedef struct {
    const char *s;
    size_t n;
} Str;

static int str_is(Str s, const char *lit) {
    size_t n = strlen(lit);
    return s.n == n && !memcmp(s.s, lit, n);
}

/* The channel of an event type (fanout.py's CHANNEL), or the type itself. */
static Str channel_of(Str type) {
    static const char *const map[][2] = {
        {"trade", "trades"},   {"book_snapshot", "book"}, {"book_update", "book"},
        {"ticker", "ticker"},  {"feed_state", "system"},  {"gap", "system"},
    };
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++)
        if (str_is(type, map[i][0])) return (Str){map[i][1], strlen(map[i][1])};
    return type;
}

static void event(Conn *c, Str type, Str exchange, Str symbol, int64_t seq, int has_ts,
                  double recv_ts, double now) {
    char key[512];
    Str channel = channel_of(type);
    size_t len = 0;
    Str parts[3] = {channel, exchange, symbol};
    for (int i = 0; i < 3; i++) {
        size_t n = parts[i].n;
        if (len + n + 1 > sizeof key) n = sizeof key - len - 1; /* absurdly long: cut */
        memcpy(key + len, parts[i].s, n);
        len += n;
        key[len++] = '\0';
    }
    size_t id = stream_id(key, len);
    if (id >= c->nseqs) {
        size_t n = c->nseqs ? c->nseqs : 64;
        while (n <= id) n *= 2;
        int64_t *seqs = realloc(c->seqs, n * sizeof *seqs);
        if (!seqs) die_oom();
        for (size_t i = c->nseqs; i < n; i++) seqs[i] = NO_SEQ;
        c->seqs = seqs;
        c->nseqs = n;
    }
    int64_t last = c->seqs[id];
    c->seqs[id] = seq;
    if (last != NO_SEQ && seq != last + 1 && !(str_is(type, "book_snapshot") && seq == last))
        counts.gaps++;
    if (!has_ts) return;
    if (measuring) {
        counts.deliveries++;
        double b = (now - recv_ts) * PER_SECOND_BUCKETS;
        long bucket = b <= 0 ? 0 : b >= BUCKETS - 1 ? BUCKETS - 1 : (long)b;
        counts.hist[bucket]++;
    } else if (!c->live && now - recv_ts < LIVE) {
        c->live = 1;
    }
}

/* p at '{': take one object's keys; returns the position after it. */
static const char *object(Conn *c, const char *p, const char *end, double now) {
    Str type = {0}, exchange = {0}, symbol = {0};
    int has_seq = 0, has_ts = 0;
    int64_t seq = 0;
    double recv_ts = 0;
    p++;
    while (p < end) {
        p = skip_ws(p, end);
        if (p >= end) break;
        if (*p == '}') {
            p++;
            break;
        }
        if (*p == ',') {
            p++;
            continue;
        }
        if (*p != '"') { /* not a key: malformed, give up on this object */
            p = skip_value(p, end);
            continue;
        }
        const char *k = p + 1;
        p = skip_string(p, end);
        Str key = {k, (size_t)(p - 1 - k)};
        p = skip_ws(p, end);
        if (p < end && *p == ':') p++;
        p = skip_ws(p, end);
        const char *v = p;
        p = skip_value(p, end);
        if (v >= end) break;
        switch (key.n) {
        case 3:
            if (str_is(key, "seq") && (*v == '-' || (*v >= '0' && *v <= '9'))) {
                seq = strtoll(v, NULL, 10);
                has_seq = 1;
            }
            break;
        case 4:
            if (str_is(key, "type") && *v == '"') type = (Str){v + 1, (size_t)(p - v - 2)};
            break;
        case 6:
            if (str_is(key, "symbol") && *v == '"') symbol = (Str){v + 1, (size_t)(p - v - 2)};
            break;
        case 7:
            if (str_is(key, "recv_ts") && *v != 'n') {
                recv_ts = strtod(v, NULL);
                has_ts = 1;
            }
            break;
        case 8:
            if (str_is(key, "exchange") && *v == '"')
                exchange = (Str){v + 1, (size_t)(p - v - 2)};
            break;
        }
    }
    if (has_seq) event(c, type, exchange, symbol, seq, has_ts, recv_ts, now);
    return p;
}

static void message(Conn *c, const char *text, size_t n, double now) {
    const char *p = text, *end = text + n;
    if (measuring) counts.frames++;
    p = skip_ws(p, end);
    if (p >= end) return;
    if (*p == '{') {
        object(c, p, end, now);
        return;
    }
    if (*p != '[') return;
    p++;
    while (p < end) {
        p = skip_ws(p, end);
        if (p >= end || *p == ']') break;
        if (*p == ',') {
            p++;
            continue;
        }
        p = *p == '{' ? object(c, p, end, now) : skip_value(p, end);
    }
}

/* Parse every complete frame in data[0:n]; returns the bytes consumed. */
static size_t consume(Conn *c, const char *data, size_t n, double now) {
    const unsigned char *buf = (const unsigned char *)data;
    size_t pos = 0;
    while (n - pos >= 2) {
        unsigned b0 = buf[pos], b1 = buf[pos + 1];
        uint64_t length = b1 & 0x7F;
        size_t head = 2;
        if (length == 126) {
            if (n - pos < 4) break;
            length = ((uint64_t)buf[pos + 2] << 8) | buf[pos + 3];
            head = 4;
        } else if (length == 127) {
            if (n - pos < 10) break;
            length = 0;
            for (int i = 0; i < 8; i++) length = (length << 8) | buf[pos + 2 + i];
            head = 10;
        }
        if (n - pos < head || (uint64_t)(n - pos - head) < length) break;
        const char *payload = data + pos + head;
        pos += head + (size_t)length;
        unsigned opcode = b0 & 0x0F;
        if (opcode == 0x9) { /* ping */
            send_frame(c->fd, 0xA, payload, (size_t)length);
            continue;
        }
        if (opcode == 0x8) {
            c->closed = 1;
            counts.closed++;
            break;
        }
        if (opcode == 0x1 || opcode == 0x2 || opcode == 0x0) {
            if (!(b0 & 0x80)) {
                buf_append(&c->parts, payload, (size_t)length);
                continue;
            }
            if (c->parts.len) {
                buf_append(&c->parts, payload, (size_t)length);
                message(c, c->parts.data, c->parts.len, now);
                c->parts.len = 0;
            } else {
                message(c, payload, (size_t)length, now);
            }
        }
    }
    return pos;
}

/* -- connecting ------------------------------------------------------------------ */

static const char *connect_one(int port, Conn *c, char *err, size_t errlen) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return strerror(errno);
    struct timeval tv = {.tv_sec = 30};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        snprintf(err, errlen, "connect: %s", strerror(errno));
        close(fd);
        return err;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    unsigned char raw[16];
    random_bytes(raw, sizeof raw);
    static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    char key[25];
    size_t k = 0;
    for (size_t i = 0; i < 16; i += 3) {
        uint32_t v = (uint32_t)raw[i] << 16;
        if (i + 1 < 16) v |= (uint32_t)raw[i + 1] << 8;
        if (i + 2 < 16) v |= raw[i + 2];
        key[k++] = b64[(v >> 18) & 63];
        key[k++] = b64[(v >> 12) & 63];
        key[k++] = i + 1 < 16 ? b64[(v >> 6) & 63] : '=';
        key[k++] = i + 2 < 16 ? b64[v & 63] : '=';
    }
    key[k] = '\0';
    char request[512];
    int len = snprintf(request, sizeof request,
                       "GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
                       "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                       "Sec-WebSocket-Version: 13\r\n\r\n",
                       port, key);
    if (send_all(fd, request, (size_t)len) < 0) {
        snprintf(err, errlen, "send: %s", strerror(errno));
        close(fd);
        return err;
    }
    Buf head = {0};
    char *end = NULL;
    while (!end) {
        buf_reserve(&head, 4097);
        ssize_t got = recv(fd, head.data + head.len, 4096, 0);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) {
            snprintf(err, errlen, "%s", got ? strerror(errno) : "closed during the handshake");
            free(head.data);
            close(fd);
            return err;
        }
        head.len += (size_t)got;
        head.data[head.len] = '\0';
        end = memmem(head.data, head.len, "\r\n\r\n", 4);
    }
    char *eol = memmem(head.data, head.len, "\r\n", 2);
    size_t status_len = (size_t)(eol - head.data);
    char status[96];
    size_t shown = status_len < 80 ? status_len : 80;
    memcpy(status, head.data, shown);
    status[shown] = '\0';
    /* " 101 " in the status line (the line followed by a space, as fanout.py checks) */
    char line[256];
    size_t ln = status_len < sizeof line - 2 ? status_len : sizeof line - 2;
    memcpy(line, head.data, ln);
    line[ln] = ' ';
    line[ln + 1] = '\0';
    if (!strstr(line, " 101 ")) {
        snprintf(err, errlen, "handshake refused: %s", status);
        free(head.data);
        close(fd);
        return err;
    }
    memset(c, 0, sizeof *c);
    c->fd = fd;
    size_t rest = head.len - (size_t)(end + 4 - head.data);
    if (rest) buf_append(&c->buf, end + 4, rest);
    free(head.data);
    return NULL;
}

/* -- control ---------------------------------------------------------------------- */

static Buf input;

/* The next complete line from stdin's buffer into out (without the newline);
 * 1 if there was one. */
static int next_line(char *out, size_t outlen) {
    char *nl = input.len ? memchr(input.data, '\n', input.len) : NULL;
    if (!nl) return 0;
    size_t n = (size_t)(nl - input.data);
    size_t m = n < outlen - 1 ? n : outlen - 1;
    memcpy(out, input.data, m);
    out[m] = '\0';
    if (m && out[m - 1] == '\r') out[m - 1] = '\0';
    memmove(input.data, nl + 1, input.len - n - 1);
    input.len -= n + 1;
    return 1;
}

/* Read what stdin has; 0 at its end. */
static int read_input(void) {
    buf_reserve(&input, 4096);
    ssize_t got;
    do got = read(0, input.data + input.len, 4096);
    while (got < 0 && errno == EINTR);
    if (got <= 0) return got < 0 && errno == EAGAIN;
    input.len += (size_t)got;
    return 1;
}

static void report(void) {
    say("result %lld %lld %lld %lld", counts.deliveries, counts.gaps, counts.frames,
        counts.closed);
    fputs("hist", stdout);
    for (long i = 0; i < BUCKETS; i++)
        if (counts.hist[i]) printf(" %ld:%lld", i, counts.hist[i]);
    fputc('\n', stdout);
    fflush(stdout);
}

static void reset_counts(void) {
    counts.deliveries = counts.gaps = counts.frames = counts.closed = 0;
    memset(counts.hist, 0, BUCKETS * sizeof *counts.hist);
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s PORT COUNT SUBSCRIBE(0|1)\n", argv[0]);
        return 2;
    }
    int port = atoi(argv[1]);
    long count = atol(argv[2]);
    int subscribe = atoi(argv[3]) != 0;
    counts.hist = calloc(BUCKETS, sizeof *counts.hist);
    if (!counts.hist || count < 0) die_oom();
    struct rlimit rl;
    if (!getrlimit(RLIMIT_NOFILE, &rl) && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    /* every connection first, then the subscriptions (on the parent's word): a
     * server streaming to some clients may starve the handshakes of the others */
    Conn *conns = calloc((size_t)count + 1, sizeof *conns);
    if (!conns) die_oom();
    char err[256];
    for (long i = 0; i < count; i++) {
        const char *e = connect_one(port, &conns[i], err, sizeof err);
        if (e) {
            say("error %s", e);
            return 1;
        }
    }
    say("connected %ld", count);
    char line[256];
    while (!next_line(line, sizeof line))
        if (!read_input()) return 0;
    if (strcmp(line, "subscribe")) return 0;
    for (long i = 0; i < count; i++) {
        if (subscribe && send_frame(conns[i].fd, 0x1, SUBSCRIBE, sizeof SUBSCRIBE - 1) < 0) {
            say("error send: %s", strerror(errno));
            return 1;
        }
        fcntl(conns[i].fd, F_SETFL, fcntl(conns[i].fd, F_GETFL) | O_NONBLOCK);
    }

    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = UINT64_MAX};
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev);
    for (long i = 0; i < count; i++) {
        ev.data.u64 = (uint64_t)i;
        epoll_ctl(ep, EPOLL_CTL_ADD, conns[i].fd, &ev);
        conns[i].registered = 1;
    }
    char *rbuf = malloc(RECV_SIZE);
    if (!rbuf) die_oom();
    /* ready once every connection has caught up with the stream (its initial books
     * and history read), or after CATCH_UP seconds */
    double deadline = now_mono() + CATCH_UP;
    int ready = !subscribe;
    if (ready) say("ready %ld", count);
    struct epoll_event events[256];
    int quit = 0;
    /* connections already holding bytes from the handshake: parse them first */
    for (long i = 0; i < count; i++) {
        Conn *c = &conns[i];
        if (c->buf.len) {
            size_t used = consume(c, c->buf.data, c->buf.len, now_epoch());
            memmove(c->buf.data, c->buf.data + used, c->buf.len - used);
            c->buf.len -= used;
        }
    }
    while (!quit) {
        if (!ready) {
            long live = 0;
            for (long i = 0; i < count; i++) live += conns[i].live;
            if (now_mono() > deadline || live == count) {
                ready = 1;
                say("ready %ld", live);
            }
        }
        int nev = epoll_wait(ep, events, 256, 20);
        if (nev < 0 && errno != EINTR) break;
        for (int e = 0; e < nev && !quit; e++) {
            if (events[e].data.u64 == UINT64_MAX) {
                if (!read_input()) {
                    quit = 1; /* stdin closed: the parent is gone */
                    break;
                }
                while (next_line(line, sizeof line)) {
                    if (!strcmp(line, "start")) {
                        reset_counts();
                        for (long i = 0; i < count; i++) /* gaps are counted from here on */
                            for (size_t s = 0; s < conns[i].nseqs; s++) conns[i].seqs[s] = NO_SEQ;
                        measuring = 1;
                    } else if (!strcmp(line, "stop")) {
                        measuring = 0;
                        report();
                    } else if (!strcmp(line, "quit")) {
                        quit = 1;
                        break;
                    }
                }
                continue;
            }
            Conn *c = &conns[events[e].data.u64];
            ssize_t n = recv(c->fd, rbuf, RECV_SIZE, 0);
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) continue;
            if (n <= 0) {
                if (!c->closed) {
                    c->closed = 1;
                    counts.closed++;
                }
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                c->registered = 0;
                continue;
            }
            double now = now_epoch();
            if (c->buf.len) { /* a partial frame from before: append, parse there */
                buf_append(&c->buf, rbuf, (size_t)n);
                size_t used = consume(c, c->buf.data, c->buf.len, now);
                memmove(c->buf.data, c->buf.data + used, c->buf.len - used);
                c->buf.len -= used;
            } else { /* parse in place, keep the tail */
                size_t used = consume(c, rbuf, (size_t)n, now);
                if (used < (size_t)n) buf_append(&c->buf, rbuf + used, (size_t)n - used);
            }
        }
    }
    for (long i = 0; i < count; i++) close(conns[i].fd);
    return 0;
}
