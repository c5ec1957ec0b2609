#include "delivery.h"

#include <curl/curl.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "common.h"
#include "map.h"
#include "netguard.h"
#include "retry_after.h"
#include "sign.h"
#include "store.h"
#include "url.h"

#define ERR_MAX     320
#define LOG_URL_MAX 1024 /* URLs in log lines are cut there */
#define LOG_RING    128

enum { LOG_INFO = 20, LOG_WARNING = 30, LOG_ERROR = 40 };

/* ---- types -------------------------------------------------------------- */

/* One webhook delivery of one event to one URL. */
typedef struct dlv {
    struct dlv *next;
    bpn_event *ev;
    uint64_t id;
    uint32_t attempts;
    double failed_at;
    size_t job_len, url_len;
    const char *job_id; /* key of the lane: job_id '\0' url */
    const char *url;
    const char *origin;
    uint64_t retry_after_ms; /* the receiver's Retry-After, for the next wait */
    uint64_t submitted_us;   /* monotonic, for the latency histogram */
    uint64_t requeue_from;   /* redelivered: its id as a dead letter */
    uint64_t resume_at_ms;   /* read back from the store: next attempt due */
    int stored;              /* its row exists in the store */
    bpn_attempt *log;        /* failed attempts, oldest first */
    uint32_t nlog;
    uint32_t log_cap; /* entries allocated: grows to BPN_ATTEMPT_LOG_MAX */
    char msg_id[40];
    char last_error[ERR_MAX];
    char strs[];
} dlv;

/* The signing keys in force, shared by reference so a rotation never
 * pulls them from under an attempt being signed. Signers are used by the
 * delivery thread only. */
typedef struct {
    atomic_uint refs;
    size_t n;
    struct {
        bpn_signer *bp, *std;
        int64_t expires_s;
    } k[];
} keyset;

typedef struct host host;
typedef struct transfer transfer;

enum lane_state { LANE_READY, LANE_BLOCKED, LANE_FLIGHT, LANE_WAIT };

/* Deliveries for one (job, url), in order; only the head is ever active. */
typedef struct lane {
    bpn_map_node node;
    host *host;
    dlv *head, *tail;
    enum lane_state state;
    transfer *xfer;     /* when in flight */
    struct lane *qnext; /* in the ready or a host's blocked FIFO */
    uint64_t due_ms;    /* when waiting for a retry */
    char key[];
} lane;

/* Connection accounting per origin. */
struct host {
    bpn_map_node node;
    unsigned refs; /* lanes pointing here */
    unsigned inflight;
    lane *blocked_head, *blocked_tail;
    char key[];
};

/* A pooled easy handle and the state of its current attempt. */
struct transfer {
    transfer *next_free;
    CURL *easy;
    struct curl_slist *headers;
    lane *lane;
    bpn_delivery *d;
    size_t body_bytes;
    int capped;
    int got_status;      /* a status line arrived */
    int headers_done;    /* the blank line after the final headers arrived */
    double started_at;   /* wall clock */
    const char *refused; /* netguard reason, static */
    char refused_addr[64];
    char errbuf[CURL_ERROR_SIZE];
};

typedef bpn_log_record log_rec;

struct bpn_delivery {
    /* Immutable after creation. */
    bpn_delivery_config cfg;
    char *user_agent;
    char id_prefix[17]; /* random, makes webhook-ids unique across engines */
    void (*on_drained)(void *);
    void *drained_arg;

    /* Shared with callers, under mu. */
    pthread_mutex_t mu;
    pthread_cond_t cond;
    dlv *submit_head, *submit_tail;
    int wake_posted;
    int stop;
    int thread_started, joined;
    uint64_t next_id;   /* id of the last delivery submitted */
    uint64_t low_water; /* every id below it is finished */
    unsigned waiters;   /* flush/drain waiters: publish low_water */
    bpn_delivery_stats stats;
    dlv **dead; /* ring of cfg.max_dead_letters */
    size_t dead_start, dead_count;
    log_rec logs[LOG_RING];
    size_t log_start, log_count;
    uint64_t logs_dropped;
    atomic_int has_logs;
    keyset *keys;
    dlv *forget;        /* dead letters to delete from the store, then free */
    uint64_t stored_id; /* every id up to it is written to the store */
    bpn_store *store;   /* NULL: in memory only; else the thread's alone,
                           the closer's once it is joined (then closed) */
    int has_store;      /* immutable: store was set at creation */

    /* Owned by the delivery thread alone. */
    pthread_t thread;
    CURLM *multi;
    bpn_map lanes;
    bpn_map hosts;
    lane *ready_head, *ready_tail;
    lane **heap; /* lanes waiting for a retry, by due_ms */
    size_t heap_len, heap_cap;
    transfer *pool;
    unsigned inflight;
    uint64_t done_unpublished;
    uint64_t absorbed_id; /* id of the last delivery taken into a lane */
    uint64_t rng;
    uint64_t next_prune_ms;
    uint64_t store_log_ms; /* when a store failure was last logged */
};

/* Webhook-ids read back from the store are checked against this size (see
 * bpn_store_row_valid). */
_Static_assert(sizeof(((dlv *)0)->msg_id) ==
                   sizeof(((bpn_dead_letter *)0)->msg_id),
               "webhook-id buffers differ");

/* ---- small helpers ------------------------------------------------------ */

/* Four buckets per power of two: about 19% wide. */
static unsigned latency_bucket(uint64_t us) {
    if (us < 4) return (unsigned)us;
    unsigned e = 63u - (unsigned)__builtin_clzll(us);
    unsigned m = (unsigned)(us >> (e - 2)) & 3u;
    unsigned b = 4u * (e - 1u) + m;
    return b < BPN_LATENCY_BUCKETS ? b : BPN_LATENCY_BUCKETS - 1;
}

uint64_t bpn_latency_lower(unsigned b) {
    if (b < 4) return b;
    unsigned e = b / 4 + 1, m = b % 4;
    return e >= 64 ? UINT64_MAX : (uint64_t)(4 + m) << (e - 2);
}

uint64_t bpn_backoff_ms(uint64_t base, uint32_t n, uint64_t cap, uint64_t rnd) {
    uint32_t shift = n > 0 ? n - 1 : 0;
    uint64_t delay;
    if (base == 0)
        delay = 0;
    else if (shift >= 63 || base > (cap >> shift))
        delay = cap;
    else
        delay = base << shift;
    if (delay > cap) delay = cap;
    /* Jitter in [0.8, 1.2): spreads retries of many jobs failing together.
     * Saturating: no wrap-around whatever the cap. */
    uint64_t lo = delay - delay / 5;
    uint64_t span = delay / 5 * 2;
    uint64_t add = span ? rnd % span : 0;
    uint64_t jittered = add > UINT64_MAX - lo ? UINT64_MAX : lo + add;
    return jittered > cap ? cap : jittered;
}

static uint64_t next_rand(bpn_delivery *d) {
    /* xorshift64*: jitter only, not security. */
    d->rng ^= d->rng >> 12;
    d->rng ^= d->rng << 25;
    d->rng ^= d->rng >> 27;
    return d->rng * 0x2545F4914F6CDD1DULL;
}

static void log_locked(bpn_delivery *d, int level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void log_locked(bpn_delivery *d, int level, const char *fmt, ...) {
    if (d->log_count == LOG_RING) {
        d->logs_dropped++;
        return;
    }
    log_rec *r = &d->logs[(d->log_start + d->log_count) % LOG_RING];
    r->level = level;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(r->msg, sizeof(r->msg), fmt, ap);
    va_end(ap);
    if (n >= (int)sizeof(r->msg)) {
        /* Truncated: drop an incomplete UTF-8 sequence at the end. */
        size_t end = sizeof(r->msg) - 1, lead = end;
        while (lead > 0 && ((unsigned char)r->msg[lead - 1] & 0xc0) == 0x80)
            lead--;
        if (lead > 0) {
            unsigned char c = (unsigned char)r->msg[lead - 1];
            size_t want = c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : c >= 0xc0 ? 2 : 1;
            if (lead - 1 + want > end) r->msg[lead - 1] = '\0';
        }
    }
    d->log_count++;
    atomic_store_explicit(&d->has_logs, 1, memory_order_release);
}

static void free_dead(bpn_delivery *d);
static void forget_now_locked(bpn_delivery *d);

static void dlv_free(dlv *x) {
    if (!x) return;
    bpn_event_unref(x->ev);
    free(x->log);
    free(x);
}

static void keyset_unref(keyset *ks) {
    if (!ks ||
        atomic_fetch_sub_explicit(&ks->refs, 1, memory_order_acq_rel) != 1)
        return;
    for (size_t i = 0; i < ks->n; i++) {
        bpn_signer_free(ks->k[i].bp);
        bpn_signer_free(ks->k[i].std);
    }
    free(ks);
}

/* Returns a keyset with one reference, or NULL when out of memory. */
static keyset *keyset_new(const bpn_key *keys, size_t n) {
    keyset *ks = calloc(1, sizeof(*ks) + n * sizeof(ks->k[0]));
    if (!ks) return NULL;
    atomic_init(&ks->refs, 1);
    ks->n = n;
    for (size_t i = 0; i < n; i++) {
        ks->k[i].bp = bpn_signer_new(keys[i].key, keys[i].key_len);
        ks->k[i].std = bpn_signer_new(keys[i].std_key, keys[i].std_key_len);
        ks->k[i].expires_s = keys[i].expires_s;
        if (!ks->k[i].bp || !ks->k[i].std) {
            keyset_unref(ks);
            return NULL;
        }
    }
    return ks;
}

/* Drops a dead letter: freed at once, or with a store handed to the thread
 * (or done here once the thread is gone), which deletes its row first. */
static void forget_locked(bpn_delivery *d, dlv *x) {
    if (!d->store) {
        dlv_free(x);
        return;
    }
    x->next = d->forget;
    d->forget = x;
}

/* Logs a failed store write (at most one line a second; all are counted).
 * Delivery goes on from memory. Delivery thread, d->mu not held. */
static void store_failed(bpn_delivery *d) {
    uint64_t now = bpn_now_ms();
    pthread_mutex_lock(&d->mu);
    d->stats.store_errors++;
    if (d->store_log_ms == 0 || now - d->store_log_ms >= 1000) {
        d->store_log_ms = now;
        log_locked(d, LOG_ERROR,
                   "store %s: %s; deliveries go on from memory (%" PRIu64
                   " failed store writes so far)",
                   bpn_store_path(d->store), bpn_store_error(d->store),
                   d->stats.store_errors);
    }
    pthread_mutex_unlock(&d->mu);
}

/* Commits the store's open transaction and publishes what is on disk:
 * every id absorbed so far (a failed write is logged and counted, and its
 * waiters released all the same: delivery goes on from memory). */
static void store_commit(bpn_delivery *d) {
    int committed = 0;
    if (!d->store) return;
    if (bpn_store_dirty(d->store)) {
        if (bpn_store_commit(d->store, d->absorbed_id) < 0)
            store_failed(d);
        else
            committed = 1;
    }
    if (!committed && d->stored_id == d->absorbed_id) return;
    pthread_mutex_lock(&d->mu);
    d->stats.store_commits += (uint64_t)committed;
    d->stored_id = d->absorbed_id;
    pthread_cond_broadcast(&d->cond);
    pthread_mutex_unlock(&d->mu);
}

/* Moves a finished-with-failure delivery to the dead-letter ring. */
static void dead_letter_locked(bpn_delivery *d, dlv *x) {
    if (x->failed_at == 0) x->failed_at = bpn_wall_f();
    x->next = NULL;
    d->stats.dead_lettered++;
    char shown[LOG_URL_MAX];
    bpn_url_redact(x->url, shown, sizeof(shown));
    log_locked(d, LOG_ERROR,
               "webhook dead-lettered after %" PRIu32
               " attempt(s): job_id=%s url=%s error=%s",
               x->attempts, x->job_id, shown, x->last_error);
    if (d->cfg.max_dead_letters == 0) {
        d->stats.evicted++;
        forget_locked(d, x);
        return;
    }
    if (d->dead_count == d->cfg.max_dead_letters) {
        forget_locked(d, d->dead[d->dead_start]);
        d->dead_start = (d->dead_start + 1) % d->cfg.max_dead_letters;
        d->dead_count--;
        d->stats.evicted++;
    }
    d->dead[(d->dead_start + d->dead_count) % d->cfg.max_dead_letters] = x;
    d->dead_count++;
}

/* Dead-letters x from the delivery thread: its row first (once x is in the
 * ring another thread may clear it), then the ring. */
static void dead_letter(bpn_delivery *d, dlv *x) {
    x->failed_at = bpn_wall_f();
    if (d->store && bpn_store_dead(d->store, x->id, x->attempts, x->failed_at,
                                   x->last_error, x->log, x->nlog) < 0)
        store_failed(d);
    pthread_mutex_lock(&d->mu);
    dead_letter_locked(d, x);
    pthread_mutex_unlock(&d->mu);
}

/* ---- lanes, hosts and the retry heap (delivery thread) ------------------ */

static void ready_push(bpn_delivery *d, lane *l) {
    l->state = LANE_READY;
    l->qnext = NULL;
    if (d->ready_tail)
        d->ready_tail->qnext = l;
    else
        d->ready_head = l;
    d->ready_tail = l;
}

static lane *ready_pop(bpn_delivery *d) {
    lane *l = d->ready_head;
    if (l) {
        d->ready_head = l->qnext;
        if (!d->ready_head) d->ready_tail = NULL;
        l->qnext = NULL;
    }
    return l;
}

static void blocked_push(host *h, lane *l) {
    l->state = LANE_BLOCKED;
    l->qnext = NULL;
    if (h->blocked_tail)
        h->blocked_tail->qnext = l;
    else
        h->blocked_head = l;
    h->blocked_tail = l;
}

static lane *blocked_pop(host *h) {
    lane *l = h->blocked_head;
    if (l) {
        h->blocked_head = l->qnext;
        if (!h->blocked_head) h->blocked_tail = NULL;
        l->qnext = NULL;
    }
    return l;
}

static void heap_swap(lane **a, size_t i, size_t j) {
    lane *t = a[i];
    a[i] = a[j];
    a[j] = t;
}

/* Returns 0, or -1 when the heap cannot grow. */
static int heap_push(bpn_delivery *d, lane *l) {
    if (d->heap_len == d->heap_cap) {
        size_t cap = d->heap_cap ? d->heap_cap * 2 : 64;
        lane **h = realloc(d->heap, cap * sizeof(*h));
        if (!h) return -1;
        d->heap = h;
        d->heap_cap = cap;
    }
    size_t i = d->heap_len++;
    d->heap[i] = l;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (d->heap[p]->due_ms <= d->heap[i]->due_ms) break;
        heap_swap(d->heap, p, i);
        i = p;
    }
    l->state = LANE_WAIT;
    return 0;
}

static lane *heap_pop(bpn_delivery *d) {
    if (d->heap_len == 0) return NULL;
    lane *top = d->heap[0];
    d->heap[0] = d->heap[--d->heap_len];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < d->heap_len && d->heap[l]->due_ms < d->heap[m]->due_ms) m = l;
        if (r < d->heap_len && d->heap[r]->due_ms < d->heap[m]->due_ms) m = r;
        if (m == i) break;
        heap_swap(d->heap, i, m);
        i = m;
    }
    return top;
}

/* Queues the lane's head: now, or at the due time it was stored with. */
static void lane_kick(bpn_delivery *d, lane *l) {
    uint64_t due = l->head->resume_at_ms;
    l->head->resume_at_ms = 0;
    if (due > bpn_now_ms()) {
        l->due_ms = due;
        if (heap_push(d, l) == 0) return;
    }
    ready_push(d, l);
}

static host *host_get(bpn_delivery *d, const char *origin) {
    size_t len = strlen(origin);
    bpn_map_node *n = bpn_map_get(&d->hosts, origin, len);
    host *h;
    if (n) {
        h = BPN_CONTAINER_OF(n, host, node);
    } else {
        h = calloc(1, sizeof(*h) + len + 1);
        if (!h) return NULL;
        memcpy(h->key, origin, len);
        h->node.key = h->key;
        h->node.klen = len;
        bpn_map_insert(&d->hosts, &h->node);
    }
    h->refs++;
    return h;
}

static void host_put(bpn_delivery *d, host *h) {
    if (--h->refs == 0 && h->inflight == 0) {
        bpn_map_remove(&d->hosts, &h->node);
        free(h);
    }
}

static void lane_free(bpn_delivery *d, lane *l) {
    bpn_map_remove(&d->lanes, &l->node);
    host_put(d, l->host);
    free(l);
}

/* Appends a submitted delivery to its lane, creating the lane. Returns 0,
 * or -1 when out of memory (the caller dead-letters x). */
static int lane_append(bpn_delivery *d, dlv *x) {
    size_t klen = x->job_len + 1 + x->url_len;
    bpn_map_node *n = bpn_map_get(&d->lanes, x->job_id, klen);
    lane *l;
    if (n) {
        l = BPN_CONTAINER_OF(n, lane, node);
        l->tail->next = x;
        l->tail = x;
        return 0;
    }
    l = calloc(1, sizeof(*l) + klen);
    if (!l) return -1;
    l->host = host_get(d, x->origin);
    if (!l->host) {
        free(l);
        return -1;
    }
    memcpy(l->key, x->job_id, klen);
    l->node.key = l->key;
    l->node.klen = klen;
    bpn_map_insert(&d->lanes, &l->node);
    l->head = l->tail = x;
    lane_kick(d, l);
    return 0;
}

/* ---- transfers ---------------------------------------------------------- */

static size_t on_body(char *ptr, size_t size, size_t nmemb, void *userp) {
    transfer *t = userp;
    size_t n = size * nmemb;
    (void)ptr;
    t->body_bytes += n;
    if (t->body_bytes > t->d->cfg.max_response_bytes) {
        /* The status is already known; stop reading an endless body. */
        t->capped = 1;
        return CURL_WRITEFUNC_ERROR;
    }
    return n;
}

/* Notes the response's status line and the blank line ending its headers:
 * libcurl 7.88 reports success for a response cut inside its headers. */
static size_t on_header(char *ptr, size_t size, size_t nmemb, void *userp) {
    transfer *t = userp;
    size_t n = size * nmemb;
    if (n >= 5 && memcmp(ptr, "HTTP/", 5) == 0) {
        t->got_status = 1;
        t->headers_done = 0; /* after a 1xx, the final response follows */
    } else if ((n == 2 && ptr[0] == '\r' && ptr[1] == '\n') ||
               (n == 1 && ptr[0] == '\n')) {
        t->headers_done = 1;
    }
    return n;
}

static curl_socket_t on_open_socket(void *clientp, curlsocktype purpose,
                                    struct curl_sockaddr *a) {
    transfer *t = clientp;
    if (purpose == CURLSOCKTYPE_IPCXN && !t->d->cfg.allow_private_networks) {
        const char *why = bpn_netguard_check(&a->addr, a->addrlen);
        if (why) {
            t->refused = why;
            bpn_netguard_format(&a->addr, a->addrlen, t->refused_addr,
                                sizeof(t->refused_addr));
            return CURL_SOCKET_BAD;
        }
    }
    return socket(a->family, a->socktype | SOCK_CLOEXEC, a->protocol);
}

static transfer *transfer_get(bpn_delivery *d) {
    transfer *t = d->pool;
    if (t) {
        d->pool = t->next_free;
        curl_easy_reset(t->easy);
    } else {
        t = calloc(1, sizeof(*t));
        if (!t) return NULL;
        t->easy = curl_easy_init();
        if (!t->easy) {
            free(t);
            return NULL;
        }
        t->d = d;
    }
    t->next_free = NULL;
    t->lane = NULL;
    t->body_bytes = 0;
    t->capped = 0;
    t->got_status = 0;
    t->headers_done = 0;
    t->refused = NULL;
    t->refused_addr[0] = '\0';
    t->errbuf[0] = '\0';
    return t;
}

static void transfer_put(bpn_delivery *d, transfer *t) {
    curl_slist_free_all(t->headers);
    t->headers = NULL;
    t->lane = NULL;
    t->next_free = d->pool;
    d->pool = t;
}

/* Appends "name: value" to the list. Returns the list or NULL. */
static struct curl_slist *add_header(struct curl_slist *list, const char *fmt,
                                     ...) __attribute__((format(printf, 2, 3)));

static struct curl_slist *add_header(struct curl_slist *list, const char *fmt,
                                     ...) {
    char buf[BPN_JOB_ID_MAX + 64];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    struct curl_slist *next = curl_slist_append(list, buf);
    if (!next) curl_slist_free_all(list);
    return next;
}

/* Signs and starts the head delivery of lane l. Returns 0, or -1 with an
 * error recorded on the delivery (the caller treats it as a failed
 * attempt). */
/* Builds the signature headers of one attempt into *h. Returns 0, or -1
 * with last_error set (the list is freed). */
static int sign_headers(bpn_delivery *d, dlv *x, int64_t ts,
                        struct curl_slist **h) {
    char sig[BPN_SIG_HEX_LEN + 1];
    /* "webhook-signature: " + up to 8 "v1,<44 chars>" */
    char line[32 + 8 * (BPN_SIG_B64_LEN + 4)];
    pthread_mutex_lock(&d->mu);
    keyset *ks = d->keys;
    atomic_fetch_add_explicit(&ks->refs, 1, memory_order_relaxed);
    pthread_mutex_unlock(&d->mu);
    int rc = -1;
    const char *body = x->ev->payload;
    size_t blen = x->ev->payload_len;
    if (d->cfg.schemes & BPN_SCHEME_BLUEPRINT) {
        if (bpn_signer_hex(ks->k[0].bp, ts, body, blen, sig) < 0) goto exit;
        *h = add_header(*h, "X-Webhook-Signature: sha256=%s", sig);
        if (*h) *h = add_header(*h, "X-Webhook-Timestamp: %lld", (long long)ts);
        if (!*h) goto exit;
    }
    if (d->cfg.schemes & BPN_SCHEME_STANDARD) {
        /* One v1 signature per live key: receivers accept any of them. */
        size_t n = (size_t)snprintf(line, sizeof(line), "webhook-signature:");
        for (size_t i = 0, used = 0; i < ks->n && used < 8; i++) {
            if (i > 0 && ks->k[i].expires_s && ks->k[i].expires_s <= ts)
                continue;
            char b64[BPN_SIG_B64_LEN + 1];
            if (bpn_signer_std(ks->k[i].std, x->msg_id, ts, body, blen, b64) <
                0)
                goto exit;
            n += (size_t)snprintf(line + n, sizeof(line) - n, "%sv1,%s",
                                  used ? " " : " ", b64);
            used++;
        }
        *h = add_header(*h, "webhook-id: %s", x->msg_id);
        if (*h) *h = add_header(*h, "webhook-timestamp: %lld", (long long)ts);
        if (*h) {
            struct curl_slist *next = curl_slist_append(*h, line);
            if (!next) curl_slist_free_all(*h);
            *h = next;
        }
        if (!*h) goto exit;
    }
    rc = 0;
exit:
    keyset_unref(ks);
    if (rc < 0) {
        if (*h) curl_slist_free_all(*h);
        *h = NULL;
        snprintf(x->last_error, ERR_MAX, "could not sign the payload");
    }
    return rc;
}

/* Signs and starts the head delivery of lane l. Returns 0, or -1 with an
 * error recorded on the delivery (the caller treats it as a failed
 * attempt). */
static int transfer_start(bpn_delivery *d, lane *l) {
    dlv *x = l->head;
    int64_t ts = bpn_wall_s();
    transfer *t = NULL;
    struct curl_slist *h = add_header(NULL, "Content-Type: application/json");
    if (!h) goto nomem;
    if (sign_headers(d, x, ts, &h) < 0) goto error;
    h = add_header(h, "X-Job-Id: %.*s", (int)x->job_len, x->job_id);
    if (h) h = add_header(h, "Expect:");
    if (!h) goto nomem;
    t = transfer_get(d);
    if (!t) goto nomem;
    t->headers = h;
    h = NULL;
    t->lane = l;
    t->started_at = bpn_wall_f();
    CURL *e = t->easy;
    curl_easy_setopt(e, CURLOPT_URL, x->url);
    curl_easy_setopt(e, CURLOPT_POST, 1L);
    curl_easy_setopt(e, CURLOPT_POSTFIELDS, x->ev->payload);
    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE,
                     (curl_off_t)x->ev->payload_len);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, t->headers);
    curl_easy_setopt(e, CURLOPT_USERAGENT, d->user_agent);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)d->cfg.timeout_ms);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_PROXY, "");
    curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, t);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, t);
    curl_easy_setopt(e, CURLOPT_OPENSOCKETFUNCTION, on_open_socket);
    curl_easy_setopt(e, CURLOPT_OPENSOCKETDATA, t);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, t->errbuf);
    curl_easy_setopt(e, CURLOPT_PRIVATE, t);
    curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
    if (curl_multi_add_handle(d->multi, e) != CURLM_OK) {
        snprintf(x->last_error, ERR_MAX, "could not start the transfer");
        goto error;
    }
    l->state = LANE_FLIGHT;
    l->xfer = t;
    l->host->inflight++;
    d->inflight++;
    return 0;
nomem:
    snprintf(x->last_error, ERR_MAX, "out of memory starting the transfer");
error:
    curl_slist_free_all(h);
    if (t) transfer_put(d, t);
    return -1;
}

/* ---- outcomes ----------------------------------------------------------- */

/* Ends the lane's head delivery: freed when delivered, else dead-lettered
 * with its last_error. Starts the next delivery of the lane or frees it. */
static void lane_finish(bpn_delivery *d, lane *l, int delivered) {
    dlv *x = l->head;
    l->head = x->next;
    if (!l->head) l->tail = NULL;
    d->done_unpublished++;
    if (delivered) {
        if (d->store && bpn_store_delivered(d->store, x->id, x->attempts) < 0)
            store_failed(d);
        dlv_free(x);
    } else {
        dead_letter(d, x);
    }
    if (l->head)
        lane_kick(d, l);
    else
        lane_free(d, l);
}

/* Records a failed attempt of the lane's head: retry later or give up. */
static void attempt_failed(bpn_delivery *d, lane *l, int final) {
    dlv *x = l->head;
    if (final || x->attempts > d->cfg.max_retries) {
        lane_finish(d, l, 0);
        return;
    }
    pthread_mutex_lock(&d->mu);
    d->stats.retried++;
    pthread_mutex_unlock(&d->mu);
    uint64_t delay = bpn_backoff_ms(d->cfg.retry_base_ms, x->attempts,
                                    d->cfg.max_retry_delay_ms, next_rand(d));
    if (x->retry_after_ms > delay) /* the receiver's hint, within the cap */
        delay = x->retry_after_ms < d->cfg.max_retry_delay_ms
                    ? x->retry_after_ms
                    : d->cfg.max_retry_delay_ms;
    x->retry_after_ms = 0;
    char shown[LOG_URL_MAX];
    bpn_url_redact(x->url, shown, sizeof(shown));
    pthread_mutex_lock(&d->mu);
    log_locked(d, LOG_WARNING,
               "webhook attempt %" PRIu32 " failed, retrying in %" PRIu64
               " ms: job_id=%s url=%s error=%s",
               x->attempts, delay, x->job_id, shown, x->last_error);
    pthread_mutex_unlock(&d->mu);
    l->due_ms = bpn_now_ms() + delay;
    if (d->store &&
        bpn_store_retry(d->store, x->id, x->attempts,
                        (int64_t)(bpn_wall_f() * 1000.0) + (int64_t)delay,
                        x->last_error, x->log, x->nlog) < 0)
        store_failed(d);
    if (heap_push(d, l) < 0)
        ready_push(d, l); /* retry now rather than lose it */
}

/* Takes the transfer off the multi handle and back to the pool. */
static void transfer_detach(bpn_delivery *d, transfer *t) {
    lane *l = t->lane;
    curl_multi_remove_handle(d->multi, t->easy);
    l->xfer = NULL;
    l->host->inflight--;
    d->inflight--;
    lane *unblocked = blocked_pop(l->host);
    if (unblocked) ready_push(d, unblocked);
    transfer_put(d, t);
}

/* Milliseconds the receiver asked us to wait (Retry-After: seconds or an
 * HTTP-date), or 0. */
static uint64_t retry_after_ms(CURL *easy) {
    struct curl_header *hdr = NULL;
    if (curl_easy_header(easy, "Retry-After", 0, CURLH_HEADER, -1, &hdr) !=
            CURLHE_OK ||
        !hdr || !hdr->value)
        return 0;
    return bpn_retry_after_parse(hdr->value, time(NULL));
}

/* Appends a failed attempt to the delivery's log (the newest kept). */
static void log_attempt(dlv *x, transfer *t, long status) {
    if (x->nlog == x->log_cap && x->log_cap < BPN_ATTEMPT_LOG_MAX) {
        /* Grown as needed (4, 8, ... 50): a dead letter keeps its log, and
         * most fail a few times only. */
        uint32_t cap = x->log_cap ? x->log_cap * 2 : 4;
        if (cap > BPN_ATTEMPT_LOG_MAX) cap = BPN_ATTEMPT_LOG_MAX;
        bpn_attempt *grown = realloc(x->log, cap * sizeof(*x->log));
        if (!grown) return; /* the log is best effort; last_error stays */
        x->log = grown;
        x->log_cap = cap;
    }
    if (x->nlog == BPN_ATTEMPT_LOG_MAX) {
        memmove(x->log, x->log + 1,
                (BPN_ATTEMPT_LOG_MAX - 1) * sizeof(*x->log));
        x->nlog--;
    }
    bpn_attempt *a = &x->log[x->nlog++];
    curl_off_t us = 0;
    curl_easy_getinfo(t->easy, CURLINFO_TOTAL_TIME_T, &us);
    a->at = t->started_at;
    a->duration_ms = (uint32_t)(us / 1000);
    a->status = (int)status;
    snprintf(a->error, sizeof(a->error), "%.*s", (int)sizeof(a->error) - 1,
             x->last_error);
}

static void on_done(bpn_delivery *d, CURLMsg *msg) {
    transfer *t = NULL;
    curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&t);
    CURLcode code = msg->data.result;
    lane *l = t->lane;
    dlv *x = l->head;
    long status = 0;
    curl_easy_getinfo(t->easy, CURLINFO_RESPONSE_CODE, &status);
    int answered = code == CURLE_OK || (code == CURLE_WRITE_ERROR && t->capped);
    int cut = code == CURLE_OK && !t->headers_done;
    if (cut) answered = 0; /* not an answer, whatever its status line */
    int delivered = answered && status >= 200 && status < 300;
    int final = t->refused != NULL;
    if (t->refused) {
        snprintf(x->last_error, ERR_MAX,
                 "refused to connect to %s: %s; webhooks to private and "
                 "special-purpose networks are blocked (set "
                 "allow_private_networks=True to allow them)",
                 t->refused_addr, t->refused);
    } else if (answered && status == 410) {
        /* The receiver says the endpoint is gone for good. */
        final = 1;
        snprintf(x->last_error, ERR_MAX,
                 "HTTP 410 Gone: the receiver asked for no further deliveries "
                 "to this URL; not retried");
    } else if (answered && !delivered) {
        snprintf(x->last_error, ERR_MAX, "HTTP %ld", status);
        if (status == 429 || status == 503)
            x->retry_after_ms = retry_after_ms(t->easy);
    } else if (cut) {
        snprintf(x->last_error, ERR_MAX,
                 "incomplete response: the connection ended inside its "
                 "headers%s",
                 t->got_status ? " (after the status line)" : "");
    } else if (code == CURLE_OUT_OF_MEMORY && t->got_status) {
        /* libcurl's limit on one header line (100 KB) reads as this. */
        snprintf(x->last_error, ERR_MAX,
                 "response headers too large (libcurl: %s)",
                 curl_easy_strerror(code));
    } else if (!delivered) {
        snprintf(x->last_error, ERR_MAX, "%s%s%s", curl_easy_strerror(code),
                 t->errbuf[0] ? ": " : "", t->errbuf);
    }
    if (!delivered) log_attempt(x, t, answered ? status : 0);
    transfer_detach(d, t);
    x->attempts++;
    pthread_mutex_lock(&d->mu);
    d->stats.attempts++;
    if (delivered) {
        d->stats.delivered++;
        uint64_t now = bpn_now_us();
        uint64_t us = now > x->submitted_us ? now - x->submitted_us : 0;
        d->stats.latency[latency_bucket(us)]++;
        d->stats.latency_sum_us += us;
    } else {
        d->stats.failed_attempts++;
    }
    pthread_mutex_unlock(&d->mu);
    if (delivered)
        lane_finish(d, l, 1);
    else
        attempt_failed(d, l, final);
}

/* ---- the thread --------------------------------------------------------- */

static void start_ready(bpn_delivery *d) {
    lane *l;
    while (d->inflight < d->cfg.max_connections && (l = ready_pop(d))) {
        if (l->host->inflight >= d->cfg.max_connections_per_host) {
            blocked_push(l->host, l);
            continue;
        }
        if (transfer_start(d, l) < 0) {
            l->head->attempts++;
            pthread_mutex_lock(&d->mu);
            d->stats.attempts++;
            d->stats.failed_attempts++;
            pthread_mutex_unlock(&d->mu);
            attempt_failed(d, l, 0);
        }
    }
}

static void fire_timers(bpn_delivery *d, uint64_t now) {
    while (d->heap_len > 0 && d->heap[0]->due_ms <= now)
        ready_push(d, heap_pop(d));
}

/* Returns the lowest id that may still be outstanding: the smallest lane
 * head, or the next id after everything absorbed. (Lanes hold ids in
 * increasing order; ids not yet absorbed are larger than any absorbed.) */
static void lane_low(bpn_map_node *node, void *arg) {
    uint64_t *low = arg;
    lane *l = BPN_CONTAINER_OF(node, lane, node);
    if (l->head && l->head->id < *low) *low = l->head->id;
}

static uint64_t compute_low_water(bpn_delivery *d) {
    uint64_t low = d->absorbed_id + 1;
    bpn_map_each(&d->lanes, lane_low, &low);
    return low;
}

/* Deletes the rows of forgotten dead letters and frees them. */
static void forget_rows(bpn_delivery *d, dlv *x) {
    while (x) {
        dlv *next = x->next;
        if (d->store && bpn_store_delete(d->store, x->id) < 0) store_failed(d);
        dlv_free(x);
        x = next;
    }
}

/* Writes a newly absorbed delivery to the store (a redelivered dead letter
 * takes its new id; one read back from the store is there already). */
static void store_absorb(bpn_delivery *d, dlv *x) {
    int rc = 0;
    if (x->requeue_from)
        rc = bpn_store_requeue(d->store, x->requeue_from, x->id);
    else if (!x->stored)
        rc = bpn_store_insert(d->store, x->id, x->msg_id, x->job_id, x->job_len,
                              x->url, x->url_len, x->origin, x->ev->payload,
                              x->ev->payload_len);
    x->requeue_from = 0;
    x->stored = 1;
    if (rc < 0) store_failed(d);
}

/* Batched durability: commits once the open transaction is
 * BPN_COMMIT_INTERVAL_MS old; prunes delivered rows once a second. */
static void store_tick(bpn_delivery *d) {
    uint64_t now = bpn_now_ms();
    if (bpn_store_dirty(d->store) &&
        now - bpn_store_dirty_since(d->store) >= BPN_COMMIT_INTERVAL_MS)
        store_commit(d);
    if (now >= d->next_prune_ms && d->cfg.keep_delivered_ms) {
        d->next_prune_ms = now + 1000;
        if (bpn_store_prune(d->store, 10000) < 0) store_failed(d);
    }
}

/* Takes submissions into lanes and publishes progress: the pending count
 * (waking flush() and drain waiters at zero) and, while someone waits on a
 * ticket, the low-water id. Returns 1 when asked to stop. */
static int sync_with_callers(bpn_delivery *d) {
    int signal = 0, stop, watched;
    pthread_mutex_lock(&d->mu);
    dlv *x = d->submit_head, *gone = d->forget;
    int absorbing = x != NULL;
    d->submit_head = d->submit_tail = NULL;
    d->forget = NULL;
    d->wake_posted = 0;
    stop = d->stop;
    d->stats.in_flight = d->inflight;
    if (d->done_unpublished) {
        d->stats.pending -= d->done_unpublished;
        d->done_unpublished = 0;
        if (d->stats.pending == 0) signal = 1;
    }
    watched = d->waiters > 0;
    pthread_mutex_unlock(&d->mu);
    forget_rows(d, gone);
    while (x) {
        dlv *next = x->next;
        x->next = NULL;
        d->absorbed_id = x->id;
        if (d->store) store_absorb(d, x);
        if (lane_append(d, x) < 0) {
            snprintf(x->last_error, ERR_MAX, "out of memory queueing delivery");
            dead_letter(d, x);
            d->done_unpublished++;
        }
        x = next;
    }
    /* Sync durability: the submitters wait for this commit. */
    if (absorbing && d->cfg.store_sync) store_commit(d);
    if (watched) {
        uint64_t low = compute_low_water(d);
        pthread_mutex_lock(&d->mu);
        if (low > d->low_water) {
            d->low_water = low;
            signal = 1;
        }
        pthread_mutex_unlock(&d->mu);
    }
    if (signal) {
        pthread_mutex_lock(&d->mu);
        pthread_cond_broadcast(&d->cond);
        pthread_mutex_unlock(&d->mu);
        if (d->on_drained) d->on_drained(d->drained_arg);
    }
    return stop;
}

/* Dead-letters every delivery of a lane because the notifier closed. */
static void abandon_lane(bpn_map_node *node, void *arg) {
    bpn_delivery *d = arg;
    lane *l = BPN_CONTAINER_OF(node, lane, node);
    const char *why = "before the delivery completed";
    if (l->xfer) {
        /* The attempt under way counts, and is on the attempt log. */
        dlv *x = l->head;
        char last[ERR_MAX];
        memcpy(last, x->last_error, sizeof(last));
        snprintf(x->last_error, ERR_MAX,
                 "abandoned: the notifier closed during this attempt");
        log_attempt(x, l->xfer, 0);
        memcpy(x->last_error, last, sizeof(last));
        x->attempts++;
        pthread_mutex_lock(&d->mu);
        d->stats.attempts++;
        d->stats.failed_attempts++;
        pthread_mutex_unlock(&d->mu);
        why = "while the delivery was in flight";
        transfer_detach(d, l->xfer);
    }
    for (dlv *x = l->head; x; x = l->head) {
        if (d->store) {
            /* Its row stays pending: the next start resumes it. */
            l->head = x->next;
            d->done_unpublished++;
            dlv_free(x);
            pthread_mutex_lock(&d->mu);
            d->stats.left_in_store++;
            pthread_mutex_unlock(&d->mu);
            continue;
        }
        char last[ERR_MAX];
        memcpy(last, x->last_error, sizeof(last));
        snprintf(x->last_error, ERR_MAX,
                 "notifier closed %s (%" PRIu32 " attempt(s) made%s%.200s)",
                 why, x->attempts, last[0] ? "; last error: " : "",
                 last[0] ? last : "");
        why = "before the delivery completed";
        l->head = x->next;
        d->done_unpublished++;
        pthread_mutex_lock(&d->mu);
        dead_letter_locked(d, x);
        pthread_mutex_unlock(&d->mu);
    }
    l->tail = NULL;
    bpn_map_remove(&d->lanes, &l->node);
    host_put(d, l->host);
    free(l);
}

static void unlink_blocked(bpn_map_node *node, void *arg) {
    host *h = BPN_CONTAINER_OF(node, host, node);
    (void)arg;
    h->blocked_head = h->blocked_tail = NULL;
}

static void *run(void *arg) {
    bpn_delivery *d = arg;
    while (!sync_with_callers(d)) {
        fire_timers(d, bpn_now_ms());
        start_ready(d);
        int running = 0;
        curl_multi_perform(d->multi, &running);
        CURLMsg *msg;
        int left;
        while ((msg = curl_multi_info_read(d->multi, &left)))
            if (msg->msg == CURLMSG_DONE) on_done(d, msg);
        if (d->store) store_tick(d);
        /* Publish finished work and start the next at once. Ready lanes
         * left over wait for a slot: a finished transfer frees one. */
        if (d->done_unpublished ||
            (d->ready_head && d->inflight < d->cfg.max_connections))
            continue;
        int timeout = 1000;
        if (d->heap_len > 0) {
            uint64_t now = bpn_now_ms(), due = d->heap[0]->due_ms;
            timeout = due <= now         ? 0
                      : due - now < 1000 ? (int)(due - now)
                                         : 1000;
        }
        if (d->store && bpn_store_dirty(d->store)) {
            /* Wake up for the commit. */
            uint64_t at =
                bpn_store_dirty_since(d->store) + BPN_COMMIT_INTERVAL_MS;
            uint64_t now = bpn_now_ms();
            int until = at <= now ? 0 : (int)(at - now);
            if (until < timeout) timeout = until;
        }
        curl_multi_poll(d->multi, NULL, 0, timeout, NULL);
    }
    /* Stop: everything still queued becomes a dead letter. The last sync
     * took every submission: the hub refuses new ones before stop is set.
     * Unlink every queue first: abandon_lane frees lanes in map order. */
    d->ready_head = d->ready_tail = NULL;
    d->heap_len = 0;
    bpn_map_each(&d->hosts, unlink_blocked, NULL);
    bpn_map_each(&d->lanes, abandon_lane, d);
    d->ready_head = d->ready_tail = NULL;
    sync_with_callers(d);
    if (d->store) {
        store_commit(d);
        pthread_mutex_lock(&d->mu);
        if (d->stats.left_in_store)
            log_locked(d, LOG_WARNING,
                       "%" PRIu64
                       " webhook deliveries left pending in the store %s; "
                       "they resume when a notifier opens it",
                       d->stats.left_in_store, bpn_store_path(d->store));
        pthread_mutex_unlock(&d->mu);
    }
    return NULL;
}

/* ---- public API --------------------------------------------------------- */

/* A delivery with its strings copied in and everything else zero. */
static dlv *dlv_new(const char *job_id, size_t job_len, const char *url,
                    size_t url_len, const char *origin) {
    size_t olen = strlen(origin);
    dlv *x = calloc(1, sizeof(*x) + job_len + 1 + url_len + 1 + olen + 1);
    if (!x) return NULL;
    char *p = x->strs;
    memcpy(p, job_id, job_len);
    p[job_len] = '\0';
    x->job_id = p;
    p += job_len + 1;
    memcpy(p, url, url_len);
    p[url_len] = '\0';
    x->url = p;
    p += url_len + 1;
    memcpy(p, origin, olen + 1);
    x->origin = p;
    x->job_len = job_len;
    x->url_len = url_len;
    return x;
}

/* Appends x to the submissions. Called with d->mu held. */
static void submit_locked(bpn_delivery *d, dlv *x) {
    x->next = NULL;
    if (d->submit_tail)
        d->submit_tail->next = x;
    else
        d->submit_head = x;
    d->submit_tail = x;
    d->stats.pending++;
}

/* bpn_store_load's callback, before the thread starts: pending rows become
 * submissions (their lanes resume in id order, at their due times), dead
 * ones the dead-letter ring (oldest first; beyond the cap, the oldest go). */
static int recover_row(void *arg, const bpn_stored *r) {
    bpn_delivery *d = arg;
    char origin[BPN_ORIGIN_MAX];
    if (!bpn_store_row_valid(r, origin)) return BPN_ESTORE;
    dlv *x = dlv_new(r->job_id, r->job_len, r->url, strlen(r->url), origin);
    if (!x) return BPN_ENOMEM;
    x->ev = bpn_event_from_payload(r->payload, r->payload_len);
    if (r->nlog) x->log = calloc(r->nlog, sizeof(*x->log));
    if (!x->ev || (r->nlog && !x->log)) {
        dlv_free(x);
        return BPN_ENOMEM;
    }
    if (r->nlog) memcpy(x->log, r->log, r->nlog * sizeof(*x->log));
    x->nlog = r->nlog;
    x->log_cap = r->nlog;
    x->id = r->id;
    x->stored = 1;
    x->attempts = r->attempts;
    x->submitted_us = bpn_now_us();
    snprintf(x->msg_id, sizeof(x->msg_id), "%s", r->msg_id);
    snprintf(x->last_error, ERR_MAX, "%s", r->last_error);
    if (r->state == BPN_ROW_DEAD) {
        x->failed_at = r->done_at;
        size_t cap = d->cfg.max_dead_letters;
        dlv *victim = x;
        if (cap && d->dead_count == cap) {
            victim = d->dead[d->dead_start];
            d->dead_start = (d->dead_start + 1) % cap;
            d->dead_count--;
        }
        if (cap) {
            d->dead[(d->dead_start + d->dead_count) % cap] = x;
            d->dead_count++;
        }
        if (victim == x && cap) return BPN_OK;
        d->stats.evicted++;
        if (bpn_store_delete(d->store, victim->id) < 0) d->stats.store_errors++;
        dlv_free(victim);
        return BPN_OK;
    }
    int64_t now = (int64_t)(bpn_wall_f() * 1000.0);
    if (r->due_ms > now)
        x->resume_at_ms = bpn_now_ms() + (uint64_t)(r->due_ms - now);
    submit_locked(d, x);
    d->stats.recovered++;
    return BPN_OK;
}

/* Opens the store and reads it back. Returns 0 or an error (message set). */
static int open_store(bpn_delivery *d, const bpn_delivery_config *cfg,
                      char *err, size_t errlen) {
    int rc = bpn_store_open(cfg->store_path, cfg->keep_delivered_ms, &d->store,
                            err, errlen);
    if (rc != BPN_OK) return rc;
    memcpy(d->id_prefix, bpn_store_prefix(d->store), sizeof(d->id_prefix));
    d->next_id = bpn_store_last_id(d->store);
    rc = bpn_store_load(d->store, recover_row, d, err, errlen);
    if (rc == BPN_OK && bpn_store_commit(d->store, d->next_id) < 0) {
        snprintf(err, errlen, "store_path %s: %s", cfg->store_path,
                 bpn_store_error(d->store));
        rc = BPN_ESTORE;
    }
    return rc;
}

int bpn_delivery_new(const bpn_delivery_config *cfg, void (*on_drained)(void *),
                     void *arg, bpn_delivery **out, char *err, size_t errlen) {
    int rc = BPN_ENOMEM;
    sigset_t all, old;
    bpn_delivery *d = calloc(1, sizeof(*d));
    *out = NULL;
    if (!d) goto error;
    d->cfg = *cfg;
    d->on_drained = on_drained;
    d->drained_arg = arg;
    d->user_agent = strdup(cfg->user_agent ? cfg->user_agent : "");
    if (!d->user_agent) goto error;
    d->cfg.user_agent = d->user_agent;
    d->cfg.keys = NULL;
    d->cfg.nkeys = 0;
    if (cfg->max_dead_letters) {
        d->dead = calloc(cfg->max_dead_letters, sizeof(*d->dead));
        if (!d->dead) goto error;
    }
    if (bpn_random_bytes(&d->rng, sizeof(d->rng)) < 0) {
        rc = BPN_ESYS;
        goto error;
    }
    d->rng |= 1;
    {
        uint8_t prefix[8];
        if (bpn_random_bytes(prefix, sizeof(prefix)) < 0) {
            rc = BPN_ESYS;
            goto error;
        }
        bpn_hex_encode(d->id_prefix, prefix, sizeof(prefix));
        d->id_prefix[16] = '\0';
    }
    d->low_water = 1; /* ids start at 1 */
    d->cfg.store_path = NULL;
    if (bpn_map_init(&d->lanes) < 0 || bpn_map_init(&d->hosts) < 0) goto error;
    if (cfg->store_path) {
        rc = open_store(d, cfg, err, errlen);
        if (rc != BPN_OK) goto error_store;
        d->low_water = d->submit_head ? d->submit_head->id : d->next_id + 1;
        d->has_store = 1;
        rc = BPN_ENOMEM;
    }
    if (pthread_mutex_init(&d->mu, NULL) != 0) goto error;
    if (pthread_cond_init(&d->cond, NULL) != 0) {
        pthread_mutex_destroy(&d->mu);
        goto error;
    }
    rc = BPN_ECURL;
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        snprintf(err, errlen, "curl_global_init failed");
        goto error_sync;
    }
    d->keys = cfg->nkeys ? keyset_new(cfg->keys, cfg->nkeys) : NULL;
    d->multi = curl_multi_init();
    if (!d->keys || !d->multi) {
        snprintf(err, errlen, "could not create the HMAC signer or curl multi");
        goto error_curl;
    }
    curl_multi_setopt(d->multi, CURLMOPT_MAX_TOTAL_CONNECTIONS,
                      (long)cfg->max_connections);
    curl_multi_setopt(d->multi, CURLMOPT_MAX_HOST_CONNECTIONS,
                      (long)cfg->max_connections_per_host);
    curl_multi_setopt(d->multi, CURLMOPT_MAXCONNECTS,
                      (long)cfg->max_connections);
    /* The thread must not take signals meant for the interpreter. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int prc = pthread_create(&d->thread, NULL, run, d);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (prc != 0) {
        rc = BPN_ESYS;
        errno = prc;
        snprintf(err, errlen, "could not start the delivery thread: %s",
                 strerror(prc));
        goto error_curl;
    }
    d->thread_started = 1;
    *out = d;
    return BPN_OK;
error_curl:
    curl_multi_cleanup(d->multi);
    keyset_unref(d->keys);
    curl_global_cleanup();
error_sync:
    pthread_cond_destroy(&d->cond);
    pthread_mutex_destroy(&d->mu);
error:
    if (rc == BPN_ENOMEM) snprintf(err, errlen, "out of memory");
error_store:
    if (d) {
        free_dead(d);
        bpn_store_close(d->store);
        bpn_map_fini(&d->lanes);
        bpn_map_fini(&d->hosts);
        free(d->dead);
        free(d->user_agent);
        free(d);
    }
    return rc;
}

int bpn_delivery_submit(bpn_delivery *d, const char *job_id, size_t job_len,
                        const char *url, size_t url_len, const char *origin,
                        bpn_event *ev, uint64_t *id) {
    dlv *x = dlv_new(job_id, job_len, url, url_len, origin);
    if (!x) return BPN_ENOMEM;
    int wake = 0;
    pthread_mutex_lock(&d->mu);
    if (d->stop) {
        pthread_mutex_unlock(&d->mu);
        free(x);
        return BPN_ECLOSED;
    }
    x->ev = bpn_event_ref(ev);
    /* Copied now: once d->mu is released x is the delivery thread's (it
     * may be sent, dead-lettered, redelivered under a new id or freed). */
    uint64_t new_id = x->id = ++d->next_id;
    x->submitted_us = bpn_now_us();
    snprintf(x->msg_id, sizeof(x->msg_id), "msg_%s%016llx", d->id_prefix,
             (unsigned long long)x->id);
    submit_locked(d, x);
    d->stats.submitted++;
    if (!d->wake_posted) {
        d->wake_posted = 1;
        wake = 1;
    }
    pthread_mutex_unlock(&d->mu);
    if (wake) curl_multi_wakeup(d->multi);
    if (id) *id = new_id;
    return BPN_OK;
}

/* The CLOCK_REALTIME time (pthread_cond_timedwait's) ms from now. */
static void deadline_in(int64_t ms, struct timespec *ts) {
    clock_gettime(CLOCK_REALTIME, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

int bpn_delivery_sync_store(const bpn_delivery *d) {
    return d->has_store && d->cfg.store_sync;
}

int bpn_delivery_wait_stored(bpn_delivery *d, uint64_t id, int64_t timeout_ms) {
    struct timespec deadline;
    if (!d->has_store) return 1;
    if (timeout_ms >= 0) deadline_in(timeout_ms, &deadline);
    pthread_mutex_lock(&d->mu);
    while (d->stored_id < id && !d->joined) {
        if (timeout_ms < 0)
            pthread_cond_wait(&d->cond, &d->mu);
        else if (pthread_cond_timedwait(&d->cond, &d->mu, &deadline) ==
                 ETIMEDOUT)
            break;
    }
    int done = d->stored_id >= id || d->joined;
    pthread_mutex_unlock(&d->mu);
    return done;
}

static int ticket_done_locked(bpn_delivery *d, uint64_t ticket) {
    return d->stats.pending == 0 || d->low_water > ticket;
}

/* Waits on the condition until the ticket is done (every delivery if
 * ticket is UINT64_MAX) or the deadline passes. Called with d->mu held. */
static int wait_locked(bpn_delivery *d, uint64_t ticket, int64_t timeout_ms) {
    struct timespec deadline;
    if (timeout_ms >= 0) deadline_in(timeout_ms, &deadline);
    while (!ticket_done_locked(d, ticket)) {
        if (timeout_ms < 0) {
            pthread_cond_wait(&d->cond, &d->mu);
        } else if (pthread_cond_timedwait(&d->cond, &d->mu, &deadline) ==
                   ETIMEDOUT) {
            break;
        }
    }
    return ticket_done_locked(d, ticket);
}

uint64_t bpn_delivery_ticket(bpn_delivery *d) {
    pthread_mutex_lock(&d->mu);
    uint64_t t = d->next_id;
    pthread_mutex_unlock(&d->mu);
    return t;
}

int bpn_delivery_ticket_done(bpn_delivery *d, uint64_t ticket) {
    pthread_mutex_lock(&d->mu);
    int done = ticket_done_locked(d, ticket);
    pthread_mutex_unlock(&d->mu);
    return done;
}

void bpn_delivery_watch(bpn_delivery *d, int on) {
    pthread_mutex_lock(&d->mu);
    if (on)
        d->waiters++;
    else if (d->waiters > 0)
        d->waiters--;
    pthread_mutex_unlock(&d->mu);
    /* The thread publishes the low-water id on its next round. */
    if (on) curl_multi_wakeup(d->multi);
}

int bpn_delivery_wait(bpn_delivery *d, uint64_t ticket, int64_t timeout_ms) {
    pthread_mutex_lock(&d->mu);
    int done = ticket_done_locked(d, ticket);
    pthread_mutex_unlock(&d->mu);
    if (done) return 1;
    bpn_delivery_watch(d, 1);
    pthread_mutex_lock(&d->mu);
    done = wait_locked(d, ticket, timeout_ms);
    pthread_mutex_unlock(&d->mu);
    bpn_delivery_watch(d, 0);
    return done;
}

int bpn_delivery_flush(bpn_delivery *d, int64_t timeout_ms) {
    return bpn_delivery_wait(d, bpn_delivery_ticket(d), timeout_ms);
}

void bpn_delivery_close(bpn_delivery *d, int64_t timeout_ms) {
    pthread_mutex_lock(&d->mu);
    /* wait_locked drops d->mu while it waits: another close may start
     * stopping the thread meanwhile, so look at stop after the wait. */
    if (!d->joined && !d->stop) wait_locked(d, UINT64_MAX, timeout_ms);
    if (d->joined || d->stop) {
        /* Another close is (or was) joining: only it may join the thread.
         * Wait for the end of that close (thread joined, store closed). */
        while (!d->joined) pthread_cond_wait(&d->cond, &d->mu);
        pthread_mutex_unlock(&d->mu);
        return;
    }
    d->stop = 1;
    pthread_mutex_unlock(&d->mu);
    curl_multi_wakeup(d->multi);
    pthread_join(d->thread, NULL);
    pthread_mutex_lock(&d->mu);
    d->joined = 1;
    if (d->store) {
        forget_now_locked(d); /* cleared while it was stopping */
        /* Release the file (and its lock): a new notifier may open it. */
        bpn_store_close(d->store);
        d->store = NULL;
    }
    pthread_cond_broadcast(&d->cond);
    pthread_mutex_unlock(&d->mu);
}

void bpn_delivery_free(bpn_delivery *d) {
    if (!d) return;
    if (d->thread_started && !d->joined) bpn_delivery_close(d, 0);
    for (transfer *t = d->pool; t;) {
        transfer *next = t->next_free;
        curl_easy_cleanup(t->easy);
        free(t);
        t = next;
    }
    curl_multi_cleanup(d->multi);
    keyset_unref(d->keys);
    curl_global_cleanup();
    free_dead(d);
    bpn_store_close(d->store);
    bpn_map_fini(&d->lanes);
    bpn_map_fini(&d->hosts);
    free(d->heap);
    free(d->dead);
    free(d->user_agent);
    pthread_cond_destroy(&d->cond);
    pthread_mutex_destroy(&d->mu);
    free(d);
}

int bpn_delivery_set_keys(bpn_delivery *d, const bpn_key *keys, size_t n) {
    if (n == 0) return BPN_EINVAL;
    keyset *ks = keyset_new(keys, n);
    if (!ks) return BPN_ENOMEM;
    pthread_mutex_lock(&d->mu);
    keyset *old = d->keys;
    d->keys = ks;
    pthread_mutex_unlock(&d->mu);
    keyset_unref(old);
    return BPN_OK;
}

void bpn_delivery_stats_get(bpn_delivery *d, bpn_delivery_stats *out) {
    pthread_mutex_lock(&d->mu);
    *out = d->stats;
    pthread_mutex_unlock(&d->mu);
}

void bpn_dead_letters_free(bpn_dead_letter *arr, size_t n) {
    if (!arr) return;
    for (size_t i = 0; i < n; i++) {
        free(arr[i].job_id);
        free(arr[i].url);
        free(arr[i].last_error);
        free(arr[i].log);
        bpn_event_unref(arr[i].ev);
    }
    free(arr);
}

int bpn_delivery_dead_snapshot(bpn_delivery *d, bpn_dead_letter **out,
                               size_t *n) {
    int rc = BPN_OK;
    pthread_mutex_lock(&d->mu);
    size_t count = d->dead_count;
    bpn_dead_letter *arr = calloc(count ? count : 1, sizeof(*arr));
    if (!arr) {
        rc = BPN_ENOMEM;
        count = 0;
        goto exit;
    }
    for (size_t i = 0; i < count; i++) {
        dlv *x = d->dead[(d->dead_start + i) % d->cfg.max_dead_letters];
        bpn_dead_letter *v = &arr[i];
        v->id = x->id;
        v->job_len = x->job_len;
        v->attempts = x->attempts;
        v->failed_at = x->failed_at;
        v->job_id = strdup(x->job_id);
        v->url = strdup(x->url);
        v->last_error = strdup(x->last_error);
        v->ev = bpn_event_ref(x->ev);
        memcpy(v->msg_id, x->msg_id, sizeof(v->msg_id));
        v->nlog = x->nlog;
        if (x->nlog) {
            v->log = malloc(x->nlog * sizeof(*v->log));
            if (v->log) memcpy(v->log, x->log, x->nlog * sizeof(*v->log));
        }
        if (!v->job_id || !v->url || !v->last_error || (x->nlog && !v->log)) {
            bpn_dead_letters_free(arr, i + 1);
            arr = NULL;
            count = 0;
            rc = BPN_ENOMEM;
            goto exit;
        }
    }
exit:
    pthread_mutex_unlock(&d->mu);
    *out = arr;
    *n = count;
    return rc;
}

/* Frees the dead letters, the forget list and unabsorbed submissions
 * (their rows stay in the store). Only once the thread is gone. */
static void free_dead(bpn_delivery *d) {
    for (size_t i = 0; i < d->dead_count; i++)
        dlv_free(d->dead[(d->dead_start + i) % d->cfg.max_dead_letters]);
    d->dead_start = d->dead_count = 0;
    for (dlv *x = d->forget, *next; x; x = next) {
        next = x->next;
        dlv_free(x);
    }
    for (dlv *x = d->submit_head, *next; x; x = next) {
        next = x->next;
        dlv_free(x);
    }
    d->forget = d->submit_head = d->submit_tail = NULL;
}

/* Once the thread is gone the store is the caller's: deletes the rows of
 * forgotten dead letters and commits. Called with d->mu held. */
static void forget_now_locked(bpn_delivery *d) {
    dlv *gone = d->forget;
    d->forget = NULL;
    for (dlv *x = gone, *next; x; x = next) {
        next = x->next;
        if (bpn_store_delete(d->store, x->id) < 0) d->stats.store_errors++;
        dlv_free(x);
    }
    if (bpn_store_commit(d->store, d->next_id) < 0) d->stats.store_errors++;
}

int bpn_delivery_clear_dead(bpn_delivery *d) {
    pthread_mutex_lock(&d->mu);
    if (d->has_store && d->joined) {
        /* The store is closed: its dead letters cannot be deleted now. */
        pthread_mutex_unlock(&d->mu);
        return BPN_ECLOSED;
    }
    for (size_t i = 0; i < d->dead_count; i++)
        forget_locked(d,
                      d->dead[(d->dead_start + i) % d->cfg.max_dead_letters]);
    d->dead_start = d->dead_count = 0;
    int wake = d->store != NULL;
    pthread_mutex_unlock(&d->mu);
    /* The thread deletes the rows on its next round. */
    if (wake) curl_multi_wakeup(d->multi);
    return BPN_OK;
}

static int wanted(const uint64_t *ids, size_t nids, uint64_t id) {
    if (!ids) return 1;
    for (size_t i = 0; i < nids; i++)
        if (ids[i] == id) return 1;
    return 0;
}

int bpn_delivery_redeliver(bpn_delivery *d, const uint64_t *ids, size_t nids,
                           size_t *count) {
    size_t moved = 0, kept = 0;
    int wake = 0;
    *count = 0;
    pthread_mutex_lock(&d->mu);
    if (d->stop) {
        pthread_mutex_unlock(&d->mu);
        return BPN_ECLOSED;
    }
    size_t cap = d->cfg.max_dead_letters;
    for (size_t i = 0; i < d->dead_count; i++) {
        dlv *x = d->dead[(d->dead_start + i) % cap];
        if (!wanted(ids, nids, x->id)) {
            /* Compact the ring in place, oldest first. */
            d->dead[(d->dead_start + kept++) % cap] = x;
            continue;
        }
        /* A fresh id keeps each lane's ids increasing (flush tickets rely
         * on it); the webhook-id stays, so receivers can deduplicate. */
        x->requeue_from = x->id;
        x->id = ++d->next_id;
        x->attempts = 0;
        x->nlog = 0;
        x->retry_after_ms = 0;
        x->failed_at = 0;
        x->last_error[0] = '\0';
        x->submitted_us = bpn_now_us();
        submit_locked(d, x);
        moved++;
    }
    d->dead_count = kept;
    if (moved && !d->wake_posted) {
        d->wake_posted = 1;
        wake = 1;
    }
    pthread_mutex_unlock(&d->mu);
    if (wake) curl_multi_wakeup(d->multi);
    *count = moved;
    return BPN_OK;
}

int bpn_delivery_has_logs(bpn_delivery *d) {
    return atomic_load_explicit(&d->has_logs, memory_order_acquire);
}

int bpn_delivery_take_logs(bpn_delivery *d, bpn_log_record **out, size_t *n) {
    int rc = BPN_OK;
    pthread_mutex_lock(&d->mu);
    size_t count = d->log_count + (d->logs_dropped ? 1 : 0);
    log_rec *arr = malloc((count ? count : 1) * sizeof(*arr));
    if (!arr) {
        rc = BPN_ENOMEM;
        count = 0;
        goto exit;
    }
    for (size_t i = 0; i < d->log_count; i++)
        arr[i] = d->logs[(d->log_start + i) % LOG_RING];
    if (d->logs_dropped) {
        arr[count - 1].level = LOG_WARNING;
        snprintf(arr[count - 1].msg, sizeof(arr[count - 1].msg),
                 "%" PRIu64
                 " delivery log records were dropped (log ring full)",
                 d->logs_dropped);
    }
    d->log_start = d->log_count = 0;
    d->logs_dropped = 0;
    atomic_store_explicit(&d->has_logs, 0, memory_order_release);
exit:
    pthread_mutex_unlock(&d->mu);
    *out = arr;
    *n = count;
    return rc;
}
