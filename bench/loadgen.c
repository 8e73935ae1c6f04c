/*
 * loadgen: a single-threaded epoll load generator for gaspar's wire protocol.
 *
 * Closed loop (default): --connections C clients, each with one request in flight
 * (plain: connect, send, read the reply until EOF, close, repeat), or with
 * --persistent one extended KEEPALIVE connection per client with --pipeline K
 * requests in flight.
 *
 * Open loop (--rate R): requests are scheduled every 1/R s, whatever the server
 * does; latency is measured from the *scheduled* time, so a stalled server shows
 * up in the latency (no coordinated omission). Plain requests take a free
 * connection slot out of C (or wait, their clock running, for one to free up);
 * persistent requests are spread round-robin over C keep-alive connections.
 *
 * --duration S counts the replies that arrive in S seconds after --warmup; requests
 * still in flight then are waited for (--drain) but not counted. --requests N sends N
 * requests and times them all. --ramp S spreads the first connects over S seconds.
 *
 * Every reply is checked (--verify equal|nonempty, or --expect TEXT). The result
 * is one JSON object on stdout. Build: cc -O2 -o loadgen loadgen.c
 *
 * For overload runs (bench/overload.py), one request per connection:
 *   --schedule R:S[,R:S...]  open loop whose rate changes: R/s for S seconds, then the
 *                            next, with no pause between (replaces --rate/--duration)
 *   --poisson [--seed N]     exponential gaps between arrivals instead of a fixed 1/R
 *   --give-up S              the client's own timeout: S s after a request is sent (its
 *                            connect), the client closes the socket and counts "give_up"
 *   --extended [--deadline-ms MS]  send gaspar's extended header (no KEEPALIVE) and read
 *                            a framed reply; with --deadline-ms, flag 0x4 and a fifth
 *                            word MS (the client's remaining time)
 *   --records FILE           one line per request: scheduled, sent and finished times
 *                            (us from the start; sent -1: never sent), outcome, status
 *   --source-ips N           connect from 127.0.0.1 .. 127.0.0.N in turn (the server is
 *                            still the --host): a server that holds the connections of
 *                            clients that left keeps their ports in FIN_WAIT_2 for a
 *                            minute, and one source address has only ~28,000 of them
 * --give-up, --extended, --records and --source-ips work in the closed loop too (no --rate
 * or --schedule; its records' scheduled time is when the request was sent): each client
 * sends its next request at once after a reply, a refusal (a reset, an error reply, a close)
 * or giving up, so refusals come straight back as new requests; only after a failed
 * connect does it wait 10 ms.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define TIMER_ID UINT32_MAX
#define READ_BUF (256 * 1024)
#define NS 1000000000LL

enum { ST_IDLE, ST_WAIT, ST_CONNECTING, ST_SENDING, ST_READING, ST_OPEN };
enum { V_EQUAL, V_NONEMPTY, V_EXPECT };
enum { E_CONNECT, E_RESET, E_EOF, E_MISMATCH, E_TIMEOUT, E_STATUS, E_GIVEUP, E_KINDS };
static const char *ERR_NAMES[E_KINDS] = {"connect", "reset", "early_eof", "mismatch", "timeout", "status", "give_up"};
/* outcomes in --records: "ok", an ERR_NAMES entry, or one of these */
#define O_OK (-1)
#define O_UNSENT (-2)      /* still waiting for a connection slot when the run ended */
#define O_UNFINISHED (-3)  /* in flight when the run ended (--drain ran out) */
#define FLAG_DEADLINE 0x4u
#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif
#define MAX_SEGMENTS 16

typedef struct {
    int64_t t0;   /* when the request was scheduled / started */
    int used;
} slot_t;

typedef struct {
    int fd;
    int state;
    uint32_t events;       /* epoll interest currently registered */
    int64_t t0;            /* plain: start of the request in flight */
    int64_t retry_at;      /* ST_WAIT: when to try again */
    int64_t progress;      /* last time bytes moved (timeouts) */
    size_t sent, got;      /* plain: request bytes written, reply bytes read */
    int bad;               /* plain: reply mismatched so far */
    int64_t sched;         /* plain: when the request was scheduled (records) */
    int64_t start;         /* plain: when it was sent (its connect) */
    uint64_t seq;          /* plain: which request this is (give-up entries) */
    /* persistent */
    slot_t *slots;
    uint32_t nslots, *free_slots, nfree;
    uint32_t *sendq;       /* slots waiting to be written */
    uint32_t sq_head, sq_len, sq_cap;
    size_t cur_off;        /* bytes of sendq[sq_head]'s request already written */
    unsigned char cur_hdr[16];
    unsigned char rhdr[9];
    int rhdr_got;
    uint32_t body_len, body_got, rtag;
    int rstatus, rbad;
    uint32_t inflight;     /* persistent: requests enqueued or on the wire */
    uint32_t want;         /* closed persistent: pipeline depth */
} conn_t;

/* options */
static const char *host = "127.0.0.1";
static int port = 0;
static int nconn = 1;
static int persistent = 0;
static int pipeline = 1;
static double rate = 0;
static double ramp = 0;
static double duration = 5, warmup = 0, drain = 15, req_timeout = 60, max_seconds = 600;
static long long count = 0;
static int verify = V_EQUAL;
static unsigned char *payload;
static size_t plen;
static unsigned char *expect;
static size_t elen;
static uint32_t timeout_ms = 0;
static int quiet = 0;
static int extended = 0;           /* --extended: one-shot extended requests, framed replies */
static long deadline_ms = -1;      /* --deadline-ms: FLAG_DEADLINE and its word */
static double give_up = 0;         /* --give-up: the client's own per-request timeout */
static int poisson = 0;
static uint64_t rng = 0x9E3779B97F4A7C15ull;
static const char *records_path = NULL;
static int source_ips = 0;         /* --source-ips */
static uint32_t source_rr = 0;
static int nseg = 0;               /* --schedule */
static double seg_rate[MAX_SEGMENTS], seg_secs[MAX_SEGMENTS];

/* state */
static int ep, tfd;
static conn_t *conns;
static struct sockaddr_in addr;
static unsigned char *plain_req;
static size_t plain_len;
static unsigned char *rbuf;
static int64_t t_start, t_warm, t_end, t_hard;
static int issuing = 1;
static long long issued = 0, finished = 0, inflight_total = 0;
static long long completed_window = 0, errors = 0, err_kind[E_KINDS];
static long long bytes_window = 0;
static int64_t *lat;
static size_t nlat, caplat;
static int64_t next_arrival, interval_ns;
static int64_t *backlog;           /* open loop plain: scheduled times waiting for a slot */
static size_t bl_head, bl_len, bl_cap;
static int *idle_stack;            /* open loop plain: free connection slots */
static int nidle;
static int rr = 0;
static int waiting = 0;            /* connections in ST_WAIT */
static int errors_printed = 0;
/* --give-up: (connection, request) pairs in the order they were sent; as every request
   gets the same time, their deadlines are in order too */
typedef struct {
    int64_t at;
    uint64_t seq;
    int idx;
} giveup_t;
static giveup_t *gq;
static size_t gq_head, gq_len, gq_cap;
static uint64_t next_seq = 1;
/* --records */
typedef struct {
    int64_t sched, start, end;
    int outcome, status;
} rec_t;
static rec_t *recs;
static size_t nrecs, caprecs;
/* --schedule */
static int64_t seg_end[MAX_SEGMENTS];
static int seg_cur = 0;
static long long seg_issued[MAX_SEGMENTS];
static double seg_cpu[MAX_SEGMENTS + 1];

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * NS + ts.tv_nsec;
}

static double cpu_now(double *user, double *sys) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    *user = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6;
    *sys = ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
    return *user + *sys;
}

static void die(const char *msg) {
    fprintf(stderr, "loadgen: %s: %s\n", msg, strerror(errno));
    exit(2);
}

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) {
        fprintf(stderr, "loadgen: out of memory\n");
        exit(2);
    }
    return q;
}

static void set_events(conn_t *c, int idx, uint32_t ev) {
    if (c->events == ev)
        return;
    struct epoll_event e = {.events = ev, .data.u32 = (uint32_t)idx};
    if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e) < 0)
        die("epoll_ctl MOD");
    c->events = ev;
}

static void record(int64_t t0, int64_t t, size_t reply_bytes) {
    if (t0 >= t_warm || count) {
        if (nlat == caplat) {
            caplat = caplat ? caplat * 2 : 65536;
            lat = xrealloc(lat, caplat * sizeof *lat);
        }
        lat[nlat++] = t - t0;
    }
    if (count || (t >= t_warm && t <= t_end)) {
        completed_window++;
        bytes_window += (long long)reply_bytes;
    }
    finished++;
    inflight_total--;
}

static void fail(int kind, const char *what, int n) {
    errors += n;
    err_kind[kind] += n;
    finished += n;
    inflight_total -= n;
    if (!quiet && errors_printed < 5) {
        errors_printed++;
        fprintf(stderr, "loadgen: error (%s): %s\n", ERR_NAMES[kind], what);
    }
}

static int want_more(void) {
    if (!issuing)
        return 0;
    if (count && issued >= count)
        return 0;
    return 1;
}

static void add_record(int64_t sched, int64_t start, int64_t end, int outcome, int status) {
    if (!records_path)
        return;
    if (nrecs == caprecs) {
        caprecs = caprecs ? caprecs * 2 : 65536;
        recs = xrealloc(recs, caprecs * sizeof *recs);
    }
    recs[nrecs++] = (rec_t){sched, start, end, outcome, status};
}

static void giveup_push(int64_t at, uint64_t seq, int idx) {
    if (gq_len == gq_cap) {
        size_t n = gq_cap ? gq_cap * 2 : 4096;
        giveup_t *q = xrealloc(NULL, n * sizeof *q);
        for (size_t i = 0; i < gq_len; i++)
            q[i] = gq[(gq_head + i) % gq_cap];
        free(gq);
        gq = q;
        gq_head = 0;
        gq_cap = n;
    }
    gq[(gq_head + gq_len) % gq_cap] = (giveup_t){at, seq, idx};
    gq_len++;
}

static int segment_of(int64_t at) {
    int k = 0;
    while (k < nseg - 1 && at >= seg_end[k])
        k++;
    return k;
}

/* The gap to the next arrival after one at `at`: 1/R, or exponential with mean 1/R. */
static int64_t gap_after(int64_t at) {
    double r = nseg ? seg_rate[segment_of(at)] : rate;
    double g = 1.0 / r;
    if (poisson) {
        rng ^= rng >> 12; /* xorshift64* */
        rng ^= rng << 25;
        rng ^= rng >> 27;
        double u = (double)((rng * 0x2545F4914F6CDD1Dull) >> 11) / 9007199254740992.0; /* [0, 1) */
        g = -log(1.0 - u) / r;
    }
    int64_t ns = (int64_t)(g * NS);
    return ns < 1 ? 1 : ns;
}

/* ---------------------------------------------------------------- connections */

static void close_conn(conn_t *c) {
    if (c->fd >= 0) {
        close(c->fd); /* also removes it from the epoll set */
        c->fd = -1;
    }
    c->events = 0;
}

/* Start a non-blocking connect and register the socket; -1 (errno set) if that failed.
 * Plain requests are sent at once: on loopback the handshake has usually completed by
 * the time connect() returns, which saves a trip through epoll per request. */
static int open_socket(conn_t *c, int idx) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    int one = 1;
    if (persistent)
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (source_ips > 0) { /* the port is still chosen by connect(), for the whole 4-tuple */
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        struct sockaddr_in src = {.sin_family = AF_INET};
        src.sin_addr.s_addr = htonl(0x7f000001u + source_rr++ % (uint32_t)source_ips);
        if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) {
            int err = errno;
            close(fd);
            errno = err;
            return -1;
        }
    }
    c->fd = fd;
    c->progress = now_ns();
    int r = connect(fd, (struct sockaddr *)&addr, sizeof addr);
    if (r < 0 && errno != EINPROGRESS)
        goto failed;
    uint32_t ev = EPOLLOUT;
    c->state = ST_CONNECTING;
    if (!persistent) {
        ssize_t n = send(fd, plain_req, plain_len, MSG_NOSIGNAL);
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
            goto failed;
        if (n > 0) {
            c->sent = (size_t)n;
            c->state = ST_SENDING;
            if (c->sent == plain_len) {
                c->state = ST_READING;
                ev = EPOLLIN | EPOLLRDHUP;
            }
        }
    }
    struct epoll_event e = {.events = ev, .data.u32 = (uint32_t)idx};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e) < 0)
        die("epoll_ctl ADD");
    c->events = ev;
    return 0;
failed:;
    int err = errno;
    close(fd);
    c->fd = -1;
    errno = err;
    return -1;
}

static void backoff(conn_t *c) {
    c->state = ST_WAIT;
    c->retry_at = now_ns() + 10 * 1000000LL;
    waiting++;
}

/* ---------------------------------------------------------------- plain */

static void plain_write(conn_t *c, int idx);

static void plain_start(conn_t *c, int idx, int64_t t0) {
    c->t0 = t0;
    c->sched = t0;
    c->sent = c->got = 0;
    c->bad = 0;
    c->rhdr_got = 0; /* --extended: the framed reply */
    c->body_len = c->body_got = 0;
    c->rstatus = -1;
    c->rbad = 0;
    c->seq = next_seq++;
    c->start = now_ns();
    if (open_socket(c, idx) < 0) {
        add_record(t0, c->start, now_ns(), E_CONNECT, -1);
        fail(E_CONNECT, strerror(errno), 1);
        backoff(c);
        return;
    }
    if (give_up > 0)
        giveup_push(c->start + (int64_t)(give_up * NS), c->seq, idx);
}

static void plain_next(conn_t *c, int idx);

static void plain_done(conn_t *c, int idx, int ok, int kind, const char *what) {
    close_conn(c);
    c->state = ST_IDLE;
    add_record(c->sched, c->start, now_ns(), ok ? O_OK : kind, extended ? c->rstatus : -1);
    if (ok)
        record(c->t0, now_ns(), c->got);
    else {
        fail(kind, what, 1);
        if (kind == E_CONNECT) {
            backoff(c);
            return;
        }
    }
    plain_next(c, idx);
}

static void plain_next(conn_t *c, int idx) {
    if (rate > 0) {
        if (bl_len > 0) {
            int64_t t0 = backlog[bl_head];
            bl_head = (bl_head + 1) % bl_cap;
            bl_len--;
            plain_start(c, idx, t0);
        } else {
            idle_stack[nidle++] = idx;
        }
    } else if (want_more()) {
        issued++;
        inflight_total++;
        plain_start(c, idx, now_ns());
    }
}

static void plain_write(conn_t *c, int idx) {
    while (c->sent < plain_len) {
        ssize_t n = send(c->fd, plain_req + c->sent, plain_len - c->sent, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                c->state = ST_SENDING;
                set_events(c, idx, EPOLLOUT);
                return;
            }
            if (errno == EINTR)
                continue;
            plain_done(c, idx, 0, E_RESET, strerror(errno));
            return;
        }
        c->sent += (size_t)n;
        c->progress = now_ns();
    }
    c->state = ST_READING;
    set_events(c, idx, EPOLLIN | EPOLLRDHUP);
}

static void check_chunk(const unsigned char *buf, size_t off, size_t n, int *bad) {
    if (*bad)
        return;
    if (verify == V_EQUAL) {
        if (off + n > plen || memcmp(buf, payload + off, n) != 0)
            *bad = 1;
    } else if (verify == V_EXPECT) {
        if (off + n > elen || memcmp(buf, expect + off, n) != 0)
            *bad = 1;
    }
}

static int reply_ok(size_t got, int bad) {
    if (bad)
        return 0;
    if (verify == V_EQUAL)
        return got == plen;
    if (verify == V_EXPECT)
        return got == elen;
    return got > 0;
}

/* --extended: take reply bytes; 1 once the framed reply (!IIB header, body) is complete. */
static int ext_consume(conn_t *c, const unsigned char *buf, size_t n) {
    size_t off = 0;
    while (off < n) {
        if (c->rhdr_got < 9) {
            size_t k = 9 - (size_t)c->rhdr_got;
            if (k > n - off)
                k = n - off;
            memcpy(c->rhdr + c->rhdr_got, buf + off, k);
            c->rhdr_got += (int)k;
            off += k;
            if (c->rhdr_got < 9)
                return 0;
            uint32_t w;
            memcpy(&w, c->rhdr, 4);
            c->body_len = ntohl(w);
            c->rstatus = c->rhdr[8];
            if (c->body_len == 0)
                return 1;
            continue;
        }
        size_t k = c->body_len - c->body_got;
        if (k > n - off)
            k = n - off;
        if (c->rstatus == 0)
            check_chunk(buf + off, c->body_got, k, &c->rbad);
        else if (!quiet && errors_printed < 5 && c->body_got == 0) {
            errors_printed++;
            fprintf(stderr, "loadgen: status %d: %.*s\n", c->rstatus, (int)(k > 300 ? 300 : k), (const char *)buf + off);
        }
        c->body_got += (uint32_t)k;
        off += k;
        if (c->body_got == c->body_len)
            return 1;
    }
    return 0;
}

static void plain_read(conn_t *c, int idx) {
    for (;;) {
        ssize_t n = recv(c->fd, rbuf, READ_BUF, 0);
        if (n > 0 && extended) {
            c->got += (size_t)n;
            c->progress = now_ns();
            if (ext_consume(c, rbuf, (size_t)n)) {
                if (c->rstatus != 0)
                    plain_done(c, idx, 0, E_STATUS, "error status in a reply");
                else if (!reply_ok(c->body_len, c->rbad))
                    plain_done(c, idx, 0, E_MISMATCH, "reply differs from the expected bytes");
                else {
                    c->got = c->body_len; /* the reply's bytes, as for a plain reply */
                    plain_done(c, idx, 1, 0, NULL);
                }
                return;
            }
            continue;
        }
        if (n == 0 && extended) {
            plain_done(c, idx, 0, E_EOF, "connection closed before the whole framed reply");
            return;
        }
        if (n > 0) {
            check_chunk(rbuf, c->got, (size_t)n, &c->bad);
            c->got += (size_t)n;
            c->progress = now_ns();
            continue;
        }
        if (n == 0) {
            if (reply_ok(c->got, c->bad))
                plain_done(c, idx, 1, 0, NULL);
            else if (c->got == 0)
                plain_done(c, idx, 0, E_EOF, "connection closed without a reply");
            else
                plain_done(c, idx, 0, E_MISMATCH, "reply differs from the expected bytes");
            return;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return;
        if (errno == EINTR)
            continue;
        plain_done(c, idx, 0, E_RESET, strerror(errno));
        return;
    }
}

/* ---------------------------------------------------------------- persistent */

static uint32_t slot_alloc(conn_t *c, int64_t t0) {
    if (c->nfree == 0) {
        uint32_t old = c->nslots, n = old ? old * 2 : 16;
        c->slots = xrealloc(c->slots, n * sizeof *c->slots);
        c->free_slots = xrealloc(c->free_slots, n * sizeof *c->free_slots);
        for (uint32_t i = n; i > old; i--) {
            c->slots[i - 1].used = 0;
            c->free_slots[c->nfree++] = i - 1;
        }
        c->nslots = n;
    }
    uint32_t s = c->free_slots[--c->nfree];
    c->slots[s].used = 1;
    c->slots[s].t0 = t0;
    return s;
}

static void slot_free(conn_t *c, uint32_t s) {
    c->slots[s].used = 0;
    c->free_slots[c->nfree++] = s;
}

static void pers_flush(conn_t *c, int idx);

static void pers_enqueue(conn_t *c, int idx, int64_t t0) {
    uint32_t s = slot_alloc(c, t0);
    if (c->sq_len == c->sq_cap) {
        uint32_t n = c->sq_cap ? c->sq_cap * 2 : 16;
        uint32_t *q = xrealloc(NULL, n * sizeof *q);
        for (uint32_t i = 0; i < c->sq_len; i++)
            q[i] = c->sendq[(c->sq_head + i) % c->sq_cap];
        free(c->sendq);
        c->sendq = q;
        c->sq_head = 0;
        c->sq_cap = n;
    }
    c->sendq[(c->sq_head + c->sq_len) % c->sq_cap] = s;
    c->sq_len++;
    if (c->inflight++ == 0)
        c->progress = now_ns(); /* the timeout runs from here, not from the last reply */
    if (c->state == ST_OPEN)
        pers_flush(c, idx);
}

static void pers_issue_closed(conn_t *c, int idx) {
    while (c->inflight < c->want && want_more()) {
        issued++;
        inflight_total++;
        pers_enqueue(c, idx, now_ns());
    }
}

static void pers_broken(conn_t *c, int idx, int kind, const char *what);

static void pers_connect(conn_t *c, int idx) {
    c->cur_off = 0; /* requests queued while disconnected stay queued */
    c->rhdr_got = 0;
    c->body_len = c->body_got = 0;
    if (open_socket(c, idx) < 0)
        pers_broken(c, idx, E_CONNECT, strerror(errno));
}

/* The connection broke: every request on it fails; connect again. */
static void pers_broken(conn_t *c, int idx, int kind, const char *what) {
    (void)idx;
    close_conn(c);
    int n = (int)c->inflight;
    for (uint32_t i = 0; i < c->nslots; i++)
        if (c->slots[i].used)
            slot_free(c, i);
    c->sq_len = 0;
    c->inflight = 0;
    if (n)
        fail(kind, what, n);
    else {
        errors++;
        err_kind[kind]++;
        if (!quiet && errors_printed < 5) {
            errors_printed++;
            fprintf(stderr, "loadgen: error (%s): %s\n", ERR_NAMES[kind], what);
        }
    }
    c->state = ST_IDLE;
    if (kind == E_CONNECT || issuing)
        backoff(c);
}

static void pers_flush(conn_t *c, int idx) {
    while (c->sq_len > 0) {
        uint32_t s = c->sendq[c->sq_head];
        size_t total = 16 + plen;
        if (c->cur_off == 0) {
            uint32_t w[4] = {htonl(0x80000000u | (uint32_t)plen), htonl(1u), htonl(timeout_ms), htonl(s)};
            memcpy(c->cur_hdr, w, 16);
        }
        struct iovec iov[2];
        int niov = 0;
        if (c->cur_off < 16) {
            iov[niov].iov_base = c->cur_hdr + c->cur_off;
            iov[niov++].iov_len = 16 - c->cur_off;
            if (plen) {
                iov[niov].iov_base = payload;
                iov[niov++].iov_len = plen;
            }
        } else {
            iov[niov].iov_base = payload + (c->cur_off - 16);
            iov[niov++].iov_len = total - c->cur_off;
        }
        struct msghdr mh = {.msg_iov = iov, .msg_iovlen = niov};
        ssize_t n = sendmsg(c->fd, &mh, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                set_events(c, idx, EPOLLIN | EPOLLOUT | EPOLLRDHUP);
                return;
            }
            if (errno == EINTR)
                continue;
            pers_broken(c, idx, E_RESET, strerror(errno));
            return;
        }
        c->cur_off += (size_t)n;
        if (c->cur_off == total) {
            c->cur_off = 0;
            c->sq_head = (c->sq_head + 1) % c->sq_cap;
            c->sq_len--;
        }
    }
    set_events(c, idx, EPOLLIN | EPOLLRDHUP);
}

static void pers_reply(conn_t *c, int idx) {
    uint32_t tag = c->rtag;
    if (tag >= c->nslots || !c->slots[tag].used) {
        pers_broken(c, idx, E_MISMATCH, "reply with an unknown tag");
        return;
    }
    int64_t t0 = c->slots[tag].t0;
    slot_free(c, tag);
    c->inflight--;
    if (c->rstatus != 0)
        fail(E_STATUS, "error status in a reply", 1);
    else if (!reply_ok(c->body_len, c->rbad))
        fail(E_MISMATCH, "reply differs from the expected bytes", 1);
    else
        record(t0, now_ns(), c->body_len);
    if (rate <= 0)
        pers_issue_closed(c, idx);
}

static void pers_read(conn_t *c, int idx) {
    for (;;) {
        ssize_t n = recv(c->fd, rbuf, READ_BUF, 0);
        if (n == 0) {
            pers_broken(c, idx, E_EOF, "server closed a keep-alive connection");
            return;
        }
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            if (errno == EINTR)
                continue;
            pers_broken(c, idx, E_RESET, strerror(errno));
            return;
        }
        c->progress = now_ns();
        size_t off = 0;
        while (off < (size_t)n) {
            if (c->rhdr_got < 9) {
                size_t k = 9 - (size_t)c->rhdr_got;
                if (k > (size_t)n - off)
                    k = (size_t)n - off;
                memcpy(c->rhdr + c->rhdr_got, rbuf + off, k);
                c->rhdr_got += (int)k;
                off += k;
                if (c->rhdr_got < 9)
                    break;
                uint32_t w[2];
                memcpy(w, c->rhdr, 8);
                c->body_len = ntohl(w[0]);
                c->rtag = ntohl(w[1]);
                c->rstatus = c->rhdr[8];
                c->body_got = 0;
                c->rbad = 0;
                if (c->body_len == 0) {
                    c->rhdr_got = 0;
                    pers_reply(c, idx);
                    if (c->fd < 0)
                        return;
                }
                continue;
            }
            size_t k = c->body_len - c->body_got;
            if (k > (size_t)n - off)
                k = (size_t)n - off;
            if (c->rstatus == 0)
                check_chunk(rbuf + off, c->body_got, k, &c->rbad);
            else if (!quiet && errors_printed < 5 && c->body_got == 0) {
                fprintf(stderr, "loadgen: status %d: %.*s\n", c->rstatus, (int)(k > 300 ? 300 : k),
                        (const char *)rbuf + off);
            }
            c->body_got += (uint32_t)k;
            off += k;
            if (c->body_got == c->body_len) {
                c->rhdr_got = 0;
                pers_reply(c, idx);
                if (c->fd < 0)
                    return;
            }
        }
    }
}

/* ---------------------------------------------------------------- events */

static void on_connected(conn_t *c, int idx) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
        if (persistent)
            pers_broken(c, idx, E_CONNECT, strerror(err));
        else
            plain_done(c, idx, 0, E_CONNECT, strerror(err));
        return;
    }
    c->progress = now_ns();
    if (persistent) {
        c->state = ST_OPEN;
        set_events(c, idx, EPOLLIN | EPOLLRDHUP);
        if (rate <= 0)
            pers_issue_closed(c, idx);
        pers_flush(c, idx);
    } else {
        plain_write(c, idx);
    }
}

static void on_event(int idx, uint32_t ev) {
    conn_t *c = &conns[idx];
    if (c->fd < 0)
        return;
    switch (c->state) {
    case ST_CONNECTING:
        on_connected(c, idx);
        break;
    case ST_SENDING:
        if (ev & (EPOLLERR | EPOLLHUP)) {
            plain_done(c, idx, 0, E_RESET, "connection reset while sending");
            break;
        }
        plain_write(c, idx);
        break;
    case ST_READING:
        plain_read(c, idx);
        break;
    case ST_OPEN:
        if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP))
            pers_read(c, idx);
        if (c->fd >= 0 && c->state == ST_OPEN && (ev & EPOLLOUT))
            pers_flush(c, idx);
        break;
    default:
        break;
    }
}

/* Open loop: issue every arrival that is due. */
static void issue_due(int64_t t) {
    while (want_more() && next_arrival <= t) {
        int64_t sched = next_arrival;
        if (nseg || poisson) {
            next_arrival += gap_after(sched);
            if (nseg)
                seg_issued[segment_of(sched)]++;
        } else
            next_arrival += interval_ns;
        issued++;
        inflight_total++;
        if (persistent) {
            int idx = rr;
            rr = (rr + 1) % nconn;
            pers_enqueue(&conns[idx], idx, sched);
        } else if (nidle > 0) {
            int idx = idle_stack[--nidle];
            plain_start(&conns[idx], idx, sched);
        } else {
            if (bl_len == bl_cap) {
                size_t n = bl_cap ? bl_cap * 2 : 1024;
                int64_t *q = xrealloc(NULL, n * sizeof *q);
                for (size_t i = 0; i < bl_len; i++)
                    q[i] = backlog[(bl_head + i) % bl_cap];
                free(backlog);
                backlog = q;
                bl_head = 0;
                bl_cap = n;
            }
            backlog[(bl_head + bl_len) % bl_cap] = sched;
            bl_len++;
        }
    }
}

static void arm_timer(int64_t at) {
    struct itimerspec its = {0};
    if (at > 0) {
        its.it_value.tv_sec = at / NS;
        its.it_value.tv_nsec = at % NS;
    }
    timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
}

/* Timeouts and reconnect back-off. */
static void housekeeping(int64_t t) {
    int64_t limit = (int64_t)(req_timeout * NS);
    for (int i = 0; i < nconn; i++) {
        conn_t *c = &conns[i];
        if (c->state == ST_WAIT) {
            if (t < c->retry_at)
                continue;
            waiting--;
            c->state = ST_IDLE;
            if (persistent) {
                if (issuing || c->inflight)
                    pers_connect(c, i);
            } else {
                plain_next(c, i);
            }
            continue;
        }
        if (c->fd < 0)
            continue;
        int busy = persistent ? (c->inflight > 0 || c->state == ST_CONNECTING) : 1;
        if (busy && t - c->progress > limit) {
            if (persistent)
                pers_broken(c, i, E_TIMEOUT, "no reply within --timeout");
            else
                plain_done(c, i, 0, E_TIMEOUT, "no reply within --timeout");
        }
    }
}

/* --give-up: close every request whose client timeout has passed. */
static void expire_give_ups(int64_t t) {
    while (gq_len && gq[gq_head].at <= t) {
        giveup_t g = gq[gq_head];
        gq_head = (gq_head + 1) % gq_cap;
        gq_len--;
        conn_t *c = &conns[g.idx];
        if (c->seq == g.seq && c->fd >= 0 &&
            (c->state == ST_CONNECTING || c->state == ST_SENDING || c->state == ST_READING))
            plain_done(c, g.idx, 0, E_GIVEUP, "client gave up (--give-up)");
    }
}

static const char *outcome_name(int o) {
    if (o == O_OK)
        return "ok";
    if (o == O_UNSENT)
        return "unsent";
    if (o == O_UNFINISHED)
        return "unfinished";
    return ERR_NAMES[o];
}

static int parse_schedule(const char *spec) {
    const char *p = spec;
    while (*p) {
        if (nseg == MAX_SEGMENTS)
            return -1;
        char *end;
        double r = strtod(p, &end);
        if (end == p || *end != ':')
            return -1;
        p = end + 1;
        double sec = strtod(p, &end);
        if (end == p || r <= 0 || sec <= 0)
            return -1;
        seg_rate[nseg] = r;
        seg_secs[nseg++] = sec;
        p = end;
        if (*p == ',')
            p++;
        else if (*p)
            return -1;
    }
    return nseg ? 0 : -1;
}

static unsigned char *literal(const char *s, size_t *len) {
    *len = strlen(s);
    unsigned char *p = xrealloc(NULL, *len + 1);
    memcpy(p, s, *len + 1);
    return p;
}

static void usage(int status) {
    fprintf(status ? stderr : stdout,
            "usage: loadgen --port P [--host H] [--connections C] [--persistent [--pipeline K]]\n"
            "               [--rate R] [--size N | --payload TEXT] [--duration S [--warmup S] | --requests N]\n"
            "               [--verify equal|nonempty | --expect TEXT] [--timeout S] [--drain S]\n"
            "               [--server-timeout-ms MS] [--max-seconds S] [--ramp S] [--quiet]\n"
            "               [--schedule R:S[,R:S...]] [--poisson [--seed N]] [--give-up S]\n"
            "               [--extended [--deadline-ms MS]] [--records FILE] [--source-ips N]\n"
            "Closed loop by default (one request in flight per connection, or --pipeline K);\n"
            "--rate R: open loop, latency from each request's scheduled time. Prints JSON.\n"
            "--schedule: open loop at R/s for S s, then the next rate, without a pause.\n"
            "--give-up S: close a request's connection S s after sending it (one-shot only;\n"
            "  closed loop too: the client sends its next request at once).\n"
            "--extended: one-shot extended requests (framed replies; --deadline-ms: flag 0x4).\n"
            "--records FILE: per request: scheduled/sent/done us, outcome, status.\n"
            "--source-ips N: connect from 127.0.0.1..N in turn (more client ports).\n");
    exit(status);
}

static int cmp64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static double pct(double p) {
    if (nlat == 0)
        return 0;
    size_t i = (size_t)ceil(p * (double)nlat);
    if (i < 1)
        i = 1;
    if (i > nlat)
        i = nlat;
    return lat[i - 1] / 1000.0;
}

int main(int argc, char **argv) {
    static struct option opts[] = {
        {"host", 1, 0, 'h'},       {"port", 1, 0, 'p'},     {"connections", 1, 0, 'c'},
        {"persistent", 0, 0, 'P'}, {"pipeline", 1, 0, 'k'}, {"rate", 1, 0, 'r'},
        {"size", 1, 0, 's'},       {"payload", 1, 0, 'm'},  {"duration", 1, 0, 'd'},
        {"warmup", 1, 0, 'w'},     {"requests", 1, 0, 'n'}, {"verify", 1, 0, 'v'},
        {"expect", 1, 0, 'e'},     {"timeout", 1, 0, 't'},  {"drain", 1, 0, 'D'},
        {"server-timeout-ms", 1, 0, 'T'}, {"quiet", 0, 0, 'q'}, {"max-seconds", 1, 0, 'M'}, {"ramp", 1, 0, 'R'}, {"help", 0, 0, 'H'},
        {"schedule", 1, 0, 'S'},   {"poisson", 0, 0, 'o'},  {"seed", 1, 0, 'x'},
        {"give-up", 1, 0, 'g'},    {"extended", 0, 0, 'E'}, {"deadline-ms", 1, 0, 'l'},
        {"records", 1, 0, 'F'},    {"source-ips", 1, 0, 'I'},
        {0, 0, 0, 0}};
    long size = 64;
    const char *literal_payload = NULL;
    int o;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case 'h': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'c': nconn = atoi(optarg); break;
        case 'P': persistent = 1; break;
        case 'k': pipeline = atoi(optarg); break;
        case 'r': rate = atof(optarg); break;
        case 's': size = atol(optarg); break;
        case 'm': literal_payload = optarg; break;
        case 'd': duration = atof(optarg); break;
        case 'w': warmup = atof(optarg); break;
        case 'n': count = atoll(optarg); break;
        case 'v':
            if (!strcmp(optarg, "equal")) verify = V_EQUAL;
            else if (!strcmp(optarg, "nonempty")) verify = V_NONEMPTY;
            else usage(2);
            break;
        case 'e': verify = V_EXPECT; expect = literal(optarg, &elen); break;
        case 't': req_timeout = atof(optarg); break;
        case 'D': drain = atof(optarg); break;
        case 'T': timeout_ms = (uint32_t)atol(optarg); break;
        case 'q': quiet = 1; break;
        case 'M': max_seconds = atof(optarg); break;
        case 'R': ramp = atof(optarg); break;
        case 'H': usage(0); break;
        case 'S':
            if (parse_schedule(optarg) < 0) {
                fprintf(stderr, "loadgen: bad --schedule %s (R:S[,R:S...], at most %d)\n", optarg, MAX_SEGMENTS);
                return 2;
            }
            break;
        case 'o': poisson = 1; break;
        case 'x': rng = (uint64_t)strtoull(optarg, NULL, 10) * 0x9E3779B97F4A7C15ull + 1; break;
        case 'g': give_up = atof(optarg); break;
        case 'E': extended = 1; break;
        case 'l': deadline_ms = atol(optarg); break;
        case 'F': records_path = optarg; break;
        case 'I': source_ips = atoi(optarg); break;
        default: usage(2);
        }
    }
    if (port <= 0 || nconn < 1 || pipeline < 1 || size < 0 || source_ips < 0 || source_ips > 254)
        usage(2);
    if (persistent && (extended || give_up > 0)) {
        fprintf(stderr, "loadgen: --extended and --give-up are for one request per connection, not --persistent\n");
        return 2;
    }
    if (deadline_ms >= 0 && !extended) {
        fprintf(stderr, "loadgen: --deadline-ms needs --extended\n");
        return 2;
    }
    if (nseg) { /* the schedule replaces --rate, --duration and --warmup */
        if (count) {
            fprintf(stderr, "loadgen: --schedule and --requests do not mix\n");
            return 2;
        }
        rate = seg_rate[0];
        duration = 0;
        for (int k = 0; k < nseg; k++)
            duration += seg_secs[k];
        warmup = 0;
    }
    signal(SIGPIPE, SIG_IGN);

    if (literal_payload) {
        payload = literal(literal_payload, &plen);
    } else {
        plen = (size_t)size;
        payload = xrealloc(NULL, plen + 1);
        for (size_t i = 0; i < plen; i++)
            payload[i] = (unsigned char)('a' + (i * 7 + i / 26) % 26);
    }
    if (extended) { /* one-shot extended: no KEEPALIVE; tag 1 (one request per connection) */
        size_t hl = deadline_ms >= 0 ? 20 : 16;
        uint32_t w[5] = {htonl(0x80000000u | (uint32_t)plen), htonl(deadline_ms >= 0 ? FLAG_DEADLINE : 0u),
                         htonl(timeout_ms), htonl(1u), htonl((uint32_t)(deadline_ms >= 0 ? deadline_ms : 0))};
        plain_len = hl + plen;
        plain_req = xrealloc(NULL, plain_len);
        memcpy(plain_req, w, hl);
        memcpy(plain_req + hl, payload, plen);
    } else {
        plain_len = 4 + plen;
        plain_req = xrealloc(NULL, plain_len);
        uint32_t be = htonl((uint32_t)plen);
        memcpy(plain_req, &be, 4);
        memcpy(plain_req + 4, payload, plen);
    }
    rbuf = xrealloc(NULL, READ_BUF);

    /* one descriptor per connection, plus a few */
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rlim_t need = (rlim_t)nconn + 64;
    if (rl.rlim_cur < need) {
        if (rl.rlim_max < need)
            rl.rlim_max = need; /* works as root */
        rl.rlim_cur = need;
        if (setrlimit(RLIMIT_NOFILE, &rl) < 0) {
            getrlimit(RLIMIT_NOFILE, &rl);
            rl.rlim_cur = rl.rlim_max;
            setrlimit(RLIMIT_NOFILE, &rl);
            if (rl.rlim_cur < need) {
                fprintf(stderr, "loadgen: RLIMIT_NOFILE %llu < %llu needed\n", (unsigned long long)rl.rlim_cur,
                        (unsigned long long)need);
                return 2;
            }
        }
    }

    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        fprintf(stderr, "loadgen: bad --host %s (an IPv4 address)\n", host);
        return 2;
    }

    ep = epoll_create1(EPOLL_CLOEXEC);
    tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (ep < 0 || tfd < 0)
        die("epoll/timerfd");
    struct epoll_event te = {.events = EPOLLIN, .data.u32 = TIMER_ID};
    epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &te);

    conns = calloc((size_t)nconn, sizeof *conns);
    idle_stack = xrealloc(NULL, (size_t)nconn * sizeof *idle_stack);
    for (int i = 0; i < nconn; i++) {
        conns[i].fd = -1;
        conns[i].want = (uint32_t)pipeline;
    }

    double u0, s0, uw = 0, sw = 0, ue = 0, se = 0;
    double cpu0 = cpu_now(&u0, &s0), cpu_w = cpu0, cpu_e = 0;
    t_start = now_ns();
    if (count) {
        warmup = 0;
        t_warm = t_start;
        t_end = INT64_MAX;
        t_hard = t_start + (int64_t)(max_seconds * NS);
    } else {
        t_warm = t_start + (int64_t)(warmup * NS);
        t_end = t_warm + (int64_t)(duration * NS);
        t_hard = t_end + (int64_t)(drain * NS);
    }
    int warm_seen = warmup <= 0, end_seen = 0;
    int64_t t_last = t_start;
    if (nseg) {
        double at = 0;
        for (int k = 0; k < nseg; k++) {
            at += seg_secs[k];
            seg_end[k] = t_start + (int64_t)(at * NS);
        }
        t_end = seg_end[nseg - 1];
        t_hard = t_end + (int64_t)(drain * NS);
        seg_cpu[0] = cpu0;
    }

    if (rate > 0) {
        interval_ns = (int64_t)(NS / rate);
        if (interval_ns < 1)
            interval_ns = 1;
        next_arrival = t_start;
        if (persistent)
            for (int i = 0; i < nconn; i++)
                pers_connect(&conns[i], i);
        else
            for (int i = nconn - 1; i >= 0; i--)
                idle_stack[nidle++] = i;
    } else {
        for (int i = 0; i < nconn; i++) {
            if (ramp > 0 && i > 0) { /* --ramp: spread the first connects out */
                conns[i].state = ST_WAIT;
                conns[i].retry_at = t_start + (int64_t)(ramp * NS * i / nconn);
                waiting++;
            } else if (persistent)
                pers_connect(&conns[i], i);
            else
                plain_next(&conns[i], i);
        }
    }

    struct epoll_event *evs = xrealloc(NULL, 1024 * sizeof *evs);
    int64_t last_house = t_start, armed = -1;
    for (;;) {
        int64_t t = now_ns();
        if (!warm_seen && t >= t_warm) {
            warm_seen = 1;
            cpu_w = cpu_now(&uw, &sw);
        }
        if (!count && !end_seen && t >= t_end) {
            end_seen = 1;
            issuing = 0;
            cpu_e = cpu_now(&ue, &se);
            /* open loop: arrivals still waiting for a slot run during the drain, their
               clocks running since their scheduled time */
        }
        while (seg_cur < nseg && t >= seg_end[seg_cur]) {
            double u, s;
            seg_cpu[++seg_cur] = cpu_now(&u, &s);
        }
        if (rate > 0 && want_more())
            issue_due(t);
        if (gq_len)
            expire_give_ups(t);
        if (count && issued >= count && inflight_total == 0)
            break;
        if (!issuing && inflight_total == 0)
            break;
        if (t >= t_hard)
            break;
        if (t - last_house >= 100000000LL || (waiting && t - last_house >= 5000000LL)) {
            housekeeping(t);
            last_house = t;
        }
        /* the timer wakes us for the next arrival and the end of warm-up/measurement;
           the epoll timeout for housekeeping and the hard deadline */
        int64_t wake = INT64_MAX;
        if (!warm_seen)
            wake = t_warm;
        if (!end_seen && !count && t_end < wake)
            wake = t_end;
        if (rate > 0 && want_more() && next_arrival < wake)
            wake = next_arrival;
        if (seg_cur < nseg && seg_end[seg_cur] < wake)
            wake = seg_end[seg_cur];
        if (gq_len && gq[gq_head].at < wake)
            wake = gq[gq_head].at;
        if (wake != armed) {
            arm_timer(wake == INT64_MAX ? 0 : wake);
            armed = wake;
        }
        int64_t ms = (t_hard - t) / 1000000 + 1;
        int timeout = waiting ? 5 : 100;
        if (ms < timeout)
            timeout = (int)ms;
        int n = epoll_wait(ep, evs, 1024, timeout);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            if (evs[i].data.u32 == TIMER_ID) {
                uint64_t x;
                ssize_t r = read(tfd, &x, sizeof x);
                (void)r;
                continue;
            }
            on_event((int)evs[i].data.u32, evs[i].events);
        }
        t_last = now_ns();
    }
    double uf, sf;
    double cpu_f = cpu_now(&uf, &sf);
    int64_t t_fin = now_ns();
    long long unfinished = inflight_total;
    if (records_path) {
        for (size_t i = 0; i < bl_len; i++)
            add_record(backlog[(bl_head + i) % bl_cap], -1, -1, O_UNSENT, -1);
        if (!persistent)
            for (int i = 0; i < nconn; i++)
                if (conns[i].fd >= 0)
                    add_record(conns[i].sched, conns[i].start, -1, O_UNFINISHED, -1);
        FILE *f = fopen(records_path, "w");
        if (!f)
            die("open --records");
        fprintf(f, "# sched_us start_us end_us outcome status\n");
        for (size_t i = 0; i < nrecs; i++) {
            rec_t *r = &recs[i];
            fprintf(f, "%lld %lld %lld %s %d\n", (long long)((r->sched - t_start) / 1000),
                    r->start < 0 ? -1LL : (long long)((r->start - t_start) / 1000),
                    r->end < 0 ? -1LL : (long long)((r->end - t_start) / 1000), outcome_name(r->outcome), r->status);
        }
        if (fclose(f) != 0)
            die("write --records");
    }
    for (int i = 0; i < nconn; i++)
        close_conn(&conns[i]);

    double seconds;
    double cpu_win, cpu_user, cpu_sys;
    if (count) {
        seconds = (t_last - t_start) / 1e9;
        cpu_win = cpu_f - cpu0;
        cpu_user = uf - u0;
        cpu_sys = sf - s0;
    } else {
        seconds = duration;
        if (!end_seen) { /* stopped early (all done, or hard deadline) */
            cpu_e = cpu_f;
            ue = uf;
            se = sf;
            seconds = (t_last - t_warm) / 1e9;
        }
        cpu_win = cpu_e - cpu_w;
        cpu_user = ue - uw;
        cpu_sys = se - sw;
    }
    if (seconds <= 0)
        seconds = 1e-9;

    qsort(lat, nlat, sizeof *lat, cmp64);
    double mean = 0;
    for (size_t i = 0; i < nlat; i++)
        mean += lat[i] / 1000.0;
    if (nlat)
        mean /= (double)nlat;

    printf("{\"mode\": \"%s\", \"persistent\": %s, \"pipeline\": %d, \"connections\": %d, \"rate\": %.1f, "
           "\"payload_bytes\": %zu, ",
           rate > 0 ? "open" : "closed", persistent ? "true" : "false", pipeline, nconn, rate, plen);
    printf("\"requests\": %lld, \"errors\": %lld, \"error_kinds\": {", completed_window, errors);
    for (int k = 0; k < E_KINDS; k++)
        printf("%s\"%s\": %lld", k ? ", " : "", ERR_NAMES[k], err_kind[k]);
    printf("}, \"unfinished\": %lld, \"issued\": %lld, \"seconds\": %.6f, \"throughput\": %.1f, "
           "\"mb_per_s\": %.3f, ",
           unfinished, issued, seconds, completed_window / seconds, bytes_window / seconds / 1e6);
    printf("\"samples\": %zu, \"p50_us\": %.1f, \"p90_us\": %.1f, \"p99_us\": %.1f, \"p999_us\": %.1f, "
           "\"max_us\": %.1f, \"mean_us\": %.1f, ",
           nlat, pct(0.50), pct(0.90), pct(0.99), pct(0.999), nlat ? lat[nlat - 1] / 1000.0 : 0.0, mean);
    printf("\"cpu_seconds\": %.4f, \"cpu_user\": %.4f, \"cpu_sys\": %.4f, \"cpu_share\": %.4f, "
           "\"cpu_total_seconds\": %.4f, \"wall_total_seconds\": %.4f",
           cpu_win, cpu_user, cpu_sys, cpu_win / seconds, cpu_f - cpu0, (t_fin - t_start) / 1e9);
    if (nseg) {
        printf(", \"segments\": [");
        for (int k = 0; k < nseg; k++) {
            double cpu = k < seg_cur ? seg_cpu[k + 1] - seg_cpu[k] : -1;
            printf("%s{\"rate\": %.1f, \"seconds\": %.3f, \"issued\": %lld, \"cpu_seconds\": %.4f}", k ? ", " : "",
                   seg_rate[k], seg_secs[k], seg_issued[k], cpu);
        }
        printf("], \"drain_cpu_seconds\": %.4f", seg_cur == nseg ? cpu_f - seg_cpu[nseg] : -1.0);
    }
    if (records_path) /* t_start_ns: CLOCK_MONOTONIC, the clock of Python's time.monotonic() */
        printf(", \"records\": %zu, \"t_start_ns\": %lld", nrecs, (long long)t_start);
    printf("}\n");
    return 0;
}
