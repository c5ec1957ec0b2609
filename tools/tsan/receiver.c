/* See receiver.h. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "receiver.h"

#ifdef BPN_TSAN_HELGRIND /* see driver.c */
#include <valgrind/helgrind.h>
#define NOT_CHECKED(p, n) VALGRIND_HG_DISABLE_CHECKING((p), (n))
#else
#define NOT_CHECKED(p, n) ((void)(p), (void)(n))
#endif

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_SECRETS 8
#define BUF_MAX     (256 * 1024)
#define LANES       8192 /* order table slots (open addressing) */
#define BIG_BODY    (64 * 1024)

typedef struct conn {
    struct conn *next;
    receiver *rx;
    pthread_t thread;
    int fd;
    int done; /* under rx->mu: the thread closed fd */
} conn;

typedef struct {
    char key[16 + 1 + 300]; /* engine prefix '\0'-separated from job id */
    size_t klen;
    uint64_t last; /* highest webhook-id number seen on /ok */
} lane_slot;

struct receiver {
    int lfd;
    int port;
    pthread_t accept_thread;
    atomic_int stop;
    pthread_mutex_t mu; /* conns, lanes: receiver threads only */
    conn *conns;
    lane_slot *lanes;
    size_t nlanes;
    char *secrets[MAX_SECRETS];
    size_t secret_len[MAX_SECRETS];
    size_t nsecrets;
    atomic_ullong flaky_turn, busy_turn;
    rx_stats st;
};

static const char *const path_names[RX_PATHS] = {
    "/ok", "/flaky", "/busy", "/fail", "/gone", "/slow", "/big", "other",
};

const char *rx_path_name(int path) {
    return path >= 0 && path < RX_PATHS ? path_names[path] : "?";
}

static void inc(atomic_ullong *c) {
    atomic_fetch_add_explicit(c, 1, memory_order_relaxed);
}

static int send_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Finds a header's value (case-insensitive name) in [h, end): sets *v and
 * *vlen. Returns 1 if found. */
static int header(const char *h, const char *end, const char *name,
                  const char **v, size_t *vlen) {
    size_t nlen = strlen(name);
    const char *p = h;
    while (p < end) {
        const char *eol = memmem(p, (size_t)(end - p), "\r\n", 2);
        if (!eol) eol = end;
        if ((size_t)(eol - p) > nlen && p[nlen] == ':' &&
            strncasecmp(p, name, nlen) == 0) {
            const char *s = p + nlen + 1;
            while (s < eol && (*s == ' ' || *s == '\t')) s++;
            *v = s;
            *vlen = (size_t)(eol - s);
            return 1;
        }
        p = eol + 2;
    }
    return 0;
}

static int path_of(const char *p, size_t n) {
    for (int i = 0; i < RX_OTHER; i++) {
        size_t l = strlen(path_names[i]);
        if (n == l && memcmp(p, path_names[i], l) == 0) return i;
    }
    return RX_OTHER;
}

/* 1 if sig_hex is HMAC-SHA256(secret, "{ts}.{body}") for one secret. */
static int signature_ok(receiver *rx, const char *ts, size_t tslen,
                        const char *sig_hex, size_t siglen, const char *body,
                        size_t blen) {
    static const char hex[] = "0123456789abcdef";
    if (siglen != 7 + 64 || memcmp(sig_hex, "sha256=", 7) != 0) return 0;
    size_t mlen = tslen + 1 + blen;
    char *msg = malloc(mlen ? mlen : 1);
    if (!msg) return 0;
    memcpy(msg, ts, tslen);
    msg[tslen] = '.';
    memcpy(msg + tslen + 1, body, blen);
    int ok = 0;
    for (size_t i = 0; i < rx->nsecrets && !ok; i++) {
        unsigned char mac[32];
        unsigned int maclen = 0;
        char got[64];
        if (!HMAC(EVP_sha256(), rx->secrets[i], (int)rx->secret_len[i],
                  (const unsigned char *)msg, mlen, mac, &maclen) ||
            maclen != 32)
            continue;
        for (int j = 0; j < 32; j++) {
            got[2 * j] = hex[mac[j] >> 4];
            got[2 * j + 1] = hex[mac[j] & 15];
        }
        ok = memcmp(got, sig_hex + 7, 64) == 0;
    }
    free(msg);
    return ok;
}

static uint64_t hash_bytes(const char *p, size_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)p[i]) * 1099511628211ULL;
    return h;
}

/* /ok: per (engine prefix, job) the webhook-id numbers never go down (a
 * repeat is allowed: at-least-once after a close cut a transfer). */
static void check_order(receiver *rx, const char *msg_id, size_t mlen,
                        const char *job, size_t jlen) {
    if (mlen != 4 + 16 + 16 || memcmp(msg_id, "msg_", 4) != 0 || jlen > 300)
        return;
    char num[17];
    memcpy(num, msg_id + 20, 16);
    num[16] = '\0';
    uint64_t id = strtoull(num, NULL, 16);
    char key[sizeof(((lane_slot *)0)->key)];
    memcpy(key, msg_id + 4, 16);
    key[16] = '\0';
    memcpy(key + 17, job, jlen);
    size_t klen = 17 + jlen;
    pthread_mutex_lock(&rx->mu);
    size_t i = hash_bytes(key, klen) % LANES;
    for (size_t probes = 0; probes < LANES; probes++, i = (i + 1) % LANES) {
        lane_slot *s = &rx->lanes[i];
        if (s->klen == 0) {
            if (rx->nlanes + 1 >= LANES) break; /* full: stop checking */
            memcpy(s->key, key, klen);
            s->klen = klen;
            s->last = id;
            rx->nlanes++;
            break;
        }
        if (s->klen == klen && memcmp(s->key, key, klen) == 0) {
            if (id < s->last)
                inc(&rx->st.order_violation);
            else
                s->last = id;
            break;
        }
    }
    pthread_mutex_unlock(&rx->mu);
}

/* Answers one complete request. Returns 0, or -1 to drop the connection. */
static int handle(receiver *rx, int fd, const char *req, size_t hlen,
                  const char *body, size_t blen) {
    const char *sp1 = memchr(req, ' ', hlen);
    if (!sp1) return -1;
    const char *path = sp1 + 1;
    const char *sp2 = memchr(path, ' ', hlen - (size_t)(path - req));
    if (!sp2) return -1;
    int which = path_of(path, (size_t)(sp2 - path));
    const char *hend = req + hlen;
    const char *sig = NULL, *ts = NULL, *mid = NULL, *job = NULL;
    size_t siglen = 0, tslen = 0, midlen = 0, joblen = 0;
    int have = header(req, hend, "X-Webhook-Signature", &sig, &siglen) &
               header(req, hend, "X-Webhook-Timestamp", &ts, &tslen) &
               header(req, hend, "webhook-id", &mid, &midlen) &
               header(req, hend, "X-Job-Id", &job, &joblen);
    inc(&rx->st.requests);
    inc(&rx->st.by_path[which]);
    if (!have)
        inc(&rx->st.missing_headers);
    else if (!signature_ok(rx, ts, tslen, sig, siglen, body, blen))
        inc(&rx->st.bad_signature);

    int status = 200;
    const char *extra = "";
    size_t body_out = 2;
    switch (which) {
        case RX_FLAKY:
            if (atomic_fetch_add_explicit(&rx->flaky_turn, 1,
                                          memory_order_relaxed) %
                    2 ==
                0)
                status = 500;
            break;
        case RX_BUSY:
            if (atomic_fetch_add_explicit(&rx->busy_turn, 1,
                                          memory_order_relaxed) %
                    2 ==
                0) {
                status = 503;
                extra = "Retry-After: 1\r\n";
            }
            break;
        case RX_FAIL: status = 500; break;
        case RX_GONE: status = 410; break;
        case RX_SLOW: {
            struct timespec t = {0, 20 * 1000 * 1000};
            nanosleep(&t, NULL);
            break;
        }
        case RX_BIG: body_out = BIG_BODY; break;
        default: break;
    }
    if (status == 200 && which == RX_OK && have)
        check_order(rx, mid, midlen, job, joblen);
    if (status / 100 == 2) inc(&rx->st.status_2xx);
    if (status == 410) inc(&rx->st.status_410);
    if (status == 500) inc(&rx->st.status_500);
    if (status == 503) inc(&rx->st.status_503);

    char head[256];
    int n = snprintf(head, sizeof(head),
                     "HTTP/1.1 %d X\r\n%sContent-Length: %zu\r\n"
                     "Content-Type: text/plain\r\n\r\n",
                     status, extra, body_out);
    if (send_all(fd, head, (size_t)n) < 0) return -1;
    if (body_out == 2) return send_all(fd, "ok", 2);
    static const char chunk[4096] = {'x'};
    for (size_t left = body_out; left > 0;) {
        size_t k = left < sizeof(chunk) ? left : sizeof(chunk);
        if (send_all(fd, chunk, k) < 0) return -1;
        left -= k;
    }
    return 0;
}

static void *conn_main(void *arg) {
    conn *c = arg;
    receiver *rx = c->rx;
    char *buf = malloc(BUF_MAX);
    size_t len = 0;
    if (!buf) goto exit;
    for (;;) {
        char *hdr_end = len ? memmem(buf, len, "\r\n\r\n", 4) : NULL;
        if (hdr_end) {
            size_t hlen = (size_t)(hdr_end - buf) + 2; /* keep last CRLF */
            const char *cl = NULL;
            size_t cllen = 0;
            size_t clen = 0;
            if (header(buf, buf + hlen, "Content-Length", &cl, &cllen))
                clen = strtoul(cl, NULL, 10);
            size_t total = hlen + 2 + clen;
            if (total > BUF_MAX) {
                inc(&rx->st.bad_requests);
                break;
            }
            if (len >= total) {
                if (handle(rx, c->fd, buf, hlen, buf + hlen + 2, clen) < 0)
                    break;
                memmove(buf, buf + total, len - total);
                len -= total;
                continue;
            }
        } else if (len == BUF_MAX) {
            inc(&rx->st.bad_requests);
            break;
        }
        ssize_t r = recv(c->fd, buf + len, BUF_MAX - len, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        len += (size_t)r;
    }
exit:
    free(buf);
    pthread_mutex_lock(&rx->mu);
    close(c->fd);
    c->done = 1;
    pthread_mutex_unlock(&rx->mu);
    return NULL;
}

/* Joins the connection threads that ended: TSan has ~8K thread ids and
 * reuses one only once its thread is joined. */
static void reap(receiver *rx) {
    conn *done = NULL;
    pthread_mutex_lock(&rx->mu);
    for (conn **pp = &rx->conns; *pp;) {
        conn *c = *pp;
        if (c->done) {
            *pp = c->next;
            c->next = done;
            done = c;
        } else {
            pp = &c->next;
        }
    }
    pthread_mutex_unlock(&rx->mu);
    for (conn *c = done, *next; c; c = next) {
        next = c->next;
        pthread_join(c->thread, NULL);
        free(c);
    }
}

static void *accept_main(void *arg) {
    receiver *rx = arg;
    unsigned n = 0;
    while (!atomic_load_explicit(&rx->stop, memory_order_relaxed)) {
        struct pollfd p = {rx->lfd, POLLIN, 0};
        if (++n % 16 == 0) reap(rx);
        if (poll(&p, 1, 50) <= 0) continue;
        int fd = accept4(rx->lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) continue;
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        conn *c = calloc(1, sizeof(*c));
        if (!c) {
            close(fd);
            continue;
        }
        c->rx = rx;
        c->fd = fd;
        pthread_mutex_lock(&rx->mu);
        c->next = rx->conns;
        rx->conns = c;
        if (pthread_create(&c->thread, NULL, conn_main, c) != 0) {
            rx->conns = c->next;
            close(fd);
            free(c);
        } else {
            inc(&rx->st.connections);
        }
        pthread_mutex_unlock(&rx->mu);
    }
    return NULL;
}

receiver *rx_start(const char *const *secrets, size_t nsecrets) {
    receiver *rx = calloc(1, sizeof(*rx));
    if (!rx || nsecrets > MAX_SECRETS) goto error;
    rx->lanes = calloc(LANES, sizeof(*rx->lanes));
    if (!rx->lanes) goto error;
    NOT_CHECKED(&rx->stop, sizeof(rx->stop));
    NOT_CHECKED(&rx->flaky_turn, sizeof(rx->flaky_turn));
    NOT_CHECKED(&rx->busy_turn, sizeof(rx->busy_turn));
    NOT_CHECKED(&rx->st, sizeof(rx->st));
    for (size_t i = 0; i < nsecrets; i++) {
        rx->secrets[i] = strdup(secrets[i]);
        rx->secret_len[i] = strlen(secrets[i]);
    }
    rx->nsecrets = nsecrets;
    pthread_mutex_init(&rx->mu, NULL);
    rx->lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (rx->lfd < 0) goto error;
    int one = 1;
    setsockopt(rx->lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t alen = sizeof(a);
    if (bind(rx->lfd, (struct sockaddr *)&a, sizeof(a)) < 0 ||
        listen(rx->lfd, 128) < 0 ||
        getsockname(rx->lfd, (struct sockaddr *)&a, &alen) < 0)
        goto error;
    rx->port = ntohs(a.sin_port);
    if (pthread_create(&rx->accept_thread, NULL, accept_main, rx) != 0)
        goto error;
    return rx;
error:
    perror("receiver");
    free(rx ? rx->lanes : NULL);
    free(rx);
    return NULL;
}

int rx_port(const receiver *rx) {
    return rx->port;
}

rx_stats *rx_stats_of(receiver *rx) {
    return &rx->st;
}

void rx_stop(receiver *rx) {
    atomic_store_explicit(&rx->stop, 1, memory_order_relaxed);
    pthread_join(rx->accept_thread, NULL);
    close(rx->lfd);
    pthread_mutex_lock(&rx->mu);
    for (conn *c = rx->conns; c; c = c->next)
        if (!c->done) shutdown(c->fd, SHUT_RDWR);
    pthread_mutex_unlock(&rx->mu);
    for (conn *c = rx->conns, *next; c; c = next) {
        next = c->next;
        pthread_join(c->thread, NULL);
        free(c);
    }
    for (size_t i = 0; i < rx->nsecrets; i++) free(rx->secrets[i]);
    free(rx->lanes);
    pthread_mutex_destroy(&rx->mu);
    free(rx);
}
