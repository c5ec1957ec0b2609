/* ThreadSanitizer driver for the pure C core (csrc/core): every threaded
 * path of the public API (engine.h, channel.h, delivery.h, store.h), run
 * concurrently against a loopback webhook receiver (receiver.c), in rounds
 * that differ in the engine's configuration:
 *
 *   memory | store batched | store sync   x   sequential ids | clock ids
 *
 * Store rounds share one file, so every store round after the first also
 * resumes what the previous one left pending (recovery path).
 *
 * Each round starts an engine, a shared waker, and these threads:
 *   producers   (+ one slow one, pausing 5-20 ms after each call)
 *               bpn_engine_notify on overlapping jobs, with and without
 *               webhook URLs (200, 500/200, 503+Retry-After/200, 500, 410,
 *               slow, oversized body, connection refused), sync-store waits
 *               (bpn_delivery_wait_stored), and a few raw
 *               bpn_delivery_submit calls ("any thread" per delivery.h);
 *               they keep calling while the engine closes (BPN_ECLOSED)
 *   subscribers bpn_sub_new (live, oldest, Last-Event-ID, with a token) /
 *               bpn_sub_pull / bpn_sub_free in a loop, on the shared waker
 *               or on a private one (created and freed in the loop), reading
 *               every pulled event's frame and checking the ids increase
 *   loop        reads the shared waker's eventfd, bpn_waker_take
 *   registrar   bpn_hub_register / bpn_hub_check_token (right and wrong
 *               tokens) / bpn_hub_active / bpn_hub_subscribers / sweep
 *   ingest      (clock-id rounds) bpn_hub_ingest as the broker thread does:
 *               fresh, older (inserted), duplicate and aliased ids, prev
 *   admin       dead letters: snapshot (reading every field), redeliver
 *               (some, all), clear, bpn_delivery_set_keys (rotation),
 *               stats, take_logs
 *   flusher     tickets: bpn_delivery_wait, bpn_delivery_flush, and the
 *               drain() path (watch + a want_drain waker + ticket_done)
 *   closer      a second bpn_engine_close, concurrent with main's
 *   churn       other engines created, used, closed and freed meanwhile
 *               (bpn_engine_new/free run with the GIL released in the
 *               binding); every other one without allow_private_networks,
 *               so its deliveries take the SSRF guard's refusal path
 * while main closes the engine once the producers made --ops calls (close
 * timeout 300 ms or 0, by round), then stops and joins everyone and frees
 * the engine. A watchdog aborts with the phase main is stuck in if closing,
 * joining or freeing takes 20 s (a double join, a lost wake-up).
 *
 * The driver's own cross-thread state is relaxed atomics only (no locks,
 * no acquire/release), so it adds no happens-before edge between threads
 * that could hide a race in the core.
 *
 * At the end of each round the counts must add up:
 *   submitted + redelivered + recovered
 *       == delivered + dead_lettered + left_in_store,  pending == 0
 *   submitted == the driver's successful notify-with-URL + raw submits
 *   recovered == what the previous store round left in the store
 *   (store) the file's pending rows == left_in_store, its dead rows == the
 *   dead-letter ring
 * Exit status: 0 if every check holds, 1 otherwise (TSan exits 66 on a
 * report by itself). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <time.h>
#include <unistd.h>

#ifdef BPN_TSAN_HELGRIND
/* The helgrind cross-check (tools/tsan.sh --helgrind): helgrind does not
 * model C11 atomics, so the driver's own relaxed counters and flags are
 * excluded from its checking (never the core's memory). */
#include <valgrind/helgrind.h>
#define NOT_CHECKED(p, n) VALGRIND_HG_DISABLE_CHECKING((p), (n))
#else
#define NOT_CHECKED(p, n) ((void)(p), (void)(n))
#endif

#include "channel.h"
#include "common.h"
#include "delivery.h"
#include "engine.h"
#include "event.h"
#include "receiver.h"
#include "store.h"
#include "url.h"

/* ---- options ------------------------------------------------------------ */

static struct {
    int rounds;
    unsigned long ops; /* notify calls per round, before the close */
    int producers;
    int subscribers;
    double rate;        /* notify calls per second, all producers */
    double max_round_s; /* safety: close anyway after this long */
    int verbose;
    const char *tmpdir;
} opt = {4, 3000, 4, 2, 700.0, 30.0, 0, NULL};

/* What main is doing, for the watchdog: a hang (a lost wake-up, a double
 * join) becomes a message and an abort instead of a silent CI timeout. */
static _Atomic(const char *) phase = "starting";
static atomic_int phase_round;
static atomic_llong phase_since_ms;

static long long mono_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void set_phase(int round, const char *what) {
    atomic_store_explicit(&phase_round, round, memory_order_relaxed);
    atomic_store_explicit(&phase, what, memory_order_relaxed);
    atomic_store_explicit(&phase_since_ms, mono_ms(), memory_order_relaxed);
    if (opt.verbose) printf("  [round %d] %s\n", round, what);
}

static const char running_phase[] = "running (producers making --ops calls)";

static void *watchdog_main(void *arg) {
    (void)arg;
    for (;;) {
        sleep(1);
        long long since =
            atomic_load_explicit(&phase_since_ms, memory_order_relaxed);
        const char *what = atomic_load_explicit(&phase, memory_order_relaxed);
        /* Closing, joining, freeing take well under a second: 20 s is a
         * hang (a double join, a lost wake-up), not a slow machine. */
        long long limit_ms = what == running_phase
                                 ? (long long)(opt.max_round_s * 1000) + 20000
                                 : 20000;
        if (since && mono_ms() - since > limit_ms) {
            fprintf(stderr,
                    "WATCHDOG: round %d stuck for %lld s in: %s\n",
                    atomic_load_explicit(&phase_round, memory_order_relaxed),
                    (mono_ms() - since) / 1000,
                    atomic_load_explicit(&phase, memory_order_relaxed));
            fflush(NULL);
            abort();
        }
    }
    return NULL;
}

/* ---- counters ----------------------------------------------------------- */

#define COUNTERS(X)                                                        \
    X(notify_ok)                                                           \
    X(notify_with_url)                                                     \
    X(notify_closed)                                                       \
    X(notify_error)                                                        \
    X(raw_submit_ok)                                                       \
    X(raw_submit_closed)                                                   \
    X(wait_stored_ok)                                                      \
    X(wait_stored_timeout)                                                 \
    X(register_ok)                                                         \
    X(register_limit)                                                      \
    X(register_closed)                                                     \
    X(token_ok)                                                            \
    X(token_replaced)                                                      \
    X(wrong_token_accepted)                                                \
    X(active_calls)                                                        \
    X(sweeps)                                                              \
    X(sub_new_ok)                                                          \
    X(sub_new_auth)                                                        \
    X(sub_new_limit)                                                       \
    X(sub_new_closed)                                                      \
    X(sub_pulls)                                                           \
    X(sub_events)                                                          \
    X(sub_skipped)                                                         \
    X(sub_ended)                                                           \
    X(sub_order_violation)                                                 \
    X(frame_mismatch)                                                      \
    X(waker_takes)                                                         \
    X(ready_callbacks)                                                     \
    X(drain_signals)                                                       \
    X(waker_churn)                                                         \
    X(ingest_added)                                                        \
    X(ingest_ignored)                                                      \
    X(ingest_limit)                                                        \
    X(ingest_closed)                                                       \
    X(snapshots)                                                           \
    X(dead_letters_read)                                                   \
    X(redeliver_calls)                                                     \
    X(redelivered)                                                         \
    X(redeliver_closed)                                                    \
    X(clear_calls)                                                         \
    X(clear_closed)                                                        \
    X(set_keys)                                                            \
    X(log_records)                                                         \
    X(stats_calls)                                                         \
    X(flush_waits)                                                         \
    X(flush_done)                                                          \
    X(flush_timeout)                                                       \
    X(drain_waits)                                                         \
    X(drain_done)                                                          \
    X(close_calls)                                                         \
    X(churn_engines)                                                       \
    X(churn_refused)                                                       \
    X(churn_delivered)                                                     \
    X(churn_mismatch)                                                      \
    X(threads)

typedef struct {
#define DECL(n) atomic_ullong n;
    COUNTERS(DECL)
#undef DECL
} counters;

typedef struct {
#define DECL(n) unsigned long long n;
    COUNTERS(DECL)
#undef DECL
} counts;

#define ADD(c, field, v) \
    atomic_fetch_add_explicit(&(c)->field, (v), memory_order_relaxed)
#define INC(c, field) ADD(c, field, 1)

static void snapshot_counters(counters *c, counts *out) {
#define COPY(n) out->n = atomic_load_explicit(&c->n, memory_order_relaxed);
    COUNTERS(COPY)
#undef COPY
}

static void add_counts(counts *total, const counts *c) {
#define SUM(n) total->n += c->n;
    COUNTERS(SUM)
#undef SUM
}

/* ---- small helpers ------------------------------------------------------ */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void nap_us(long us) {
    struct timespec t = {us / 1000000, (us % 1000000) * 1000};
    nanosleep(&t, NULL);
}

typedef struct {
    uint64_t s;
} rng;

static uint64_t rnd(rng *r) {
    r->s ^= r->s >> 12;
    r->s ^= r->s << 25;
    r->s ^= r->s >> 27;
    return r->s * 0x2545F4914F6CDD1DULL;
}

static unsigned below(rng *r, unsigned n) {
    return (unsigned)(rnd(r) % n);
}

static rng rng_for(int round, int who) {
    rng r = {0x9E3779B97F4A7C15ULL ^ ((uint64_t)round << 32) ^
             (uint64_t)(who + 1) * 0xBF58476D1CE4E5B9ULL};
    if (!r.s) r.s = 1;
    for (int i = 0; i < 4; i++) rnd(&r);
    return r;
}

/* ---- jobs, URLs, secrets ------------------------------------------------ */

#define NJOBS 48
static char job_ids[NJOBS][32];
static size_t job_lens[NJOBS];

static void init_jobs(void) {
    for (int i = 0; i < NJOBS; i++) {
        /* A few ids need escaping in the payload JSON. */
        if (i % 16 == 15)
            snprintf(job_ids[i], sizeof(job_ids[i]), "job\"q\\%02d", i);
        else
            snprintf(job_ids[i], sizeof(job_ids[i]), "job-%02d", i);
        job_lens[i] = strlen(job_ids[i]);
    }
}

enum { U_NONE = -1, U_OK, U_FLAKY, U_BUSY, U_FAIL, U_GONE, U_SLOW, U_BIG,
       U_REFUSED, U_COUNT };
static const char *const url_paths[U_COUNT] = {
    "/ok", "/flaky", "/busy", "/fail", "/gone", "/slow", "/big", "/refused",
};
/* Weights out of 100 (the rest: no URL). */
static const unsigned url_weights[U_COUNT] = {30, 12, 5, 6, 3, 4, 3, 2};

static char urls[U_COUNT][128];
static size_t url_lens[U_COUNT];
static char origins[U_COUNT][BPN_ORIGIN_MAX];

#define NSECRETS 4
static const char *const secrets[NSECRETS] = {
    "tsan-secret-0", "tsan-secret-1-longer", "tsan-secret-2", "k3",
};

static int pick_url(rng *r) {
    unsigned x = below(r, 100), acc = 0;
    for (int u = 0; u < U_COUNT; u++) {
        acc += url_weights[u];
        if (x < acc) return u;
    }
    return U_NONE;
}

/* A loopback port nobody listens on (bound, then closed). */
static int closed_port(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {0};
    socklen_t alen = sizeof(a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 ||
        getsockname(fd, (struct sockaddr *)&a, &alen) < 0) {
        perror("closed_port");
        exit(2);
    }
    close(fd);
    return ntohs(a.sin_port);
}

static void init_urls(int port) {
    int dead = closed_port();
    for (int u = 0; u < U_COUNT; u++) {
        char err[128];
        snprintf(urls[u], sizeof(urls[u]), "http://127.0.0.1:%d%s",
                 u == U_REFUSED ? dead : port, url_paths[u]);
        url_lens[u] = strlen(urls[u]);
        if (bpn_url_check(urls[u], url_lens[u], origins[u], err,
                          sizeof(err)) < 0) {
            fprintf(stderr, "url %s: %s\n", urls[u], err);
            exit(2);
        }
    }
}

/* ---- a round ------------------------------------------------------------ */

enum { STORE_NONE, STORE_BATCHED, STORE_SYNC };
static const char *const store_names[] = {"memory", "store-batched",
                                          "store-sync"};

typedef struct {
    int round;
    int store_mode;
    int clock_ids;
    bpn_engine *e;
    bpn_waker *shared; /* the loop thread's */
    atomic_int closing; /* main started closing */
    atomic_int stop;    /* every thread: finish */
    atomic_ullong notifies;
    atomic_ullong last_seq[NJOBS]; /* newest seq a producer got, per job */
    atomic_uint key_turn;
    counters c;
} round_ctx;

typedef struct {
    round_ctx *ctx;
    int index;
    int slow; /* a producer that pauses after each call (see producer_main) */
} thread_arg;

static int should_stop(round_ctx *x) {
    return atomic_load_explicit(&x->stop, memory_order_relaxed);
}

static int is_closing(round_ctx *x) {
    return atomic_load_explicit(&x->closing, memory_order_relaxed);
}

/* The per-subscriber user data handed back by bpn_waker_take. */
typedef struct {
    atomic_uint wakeups;
} sub_user;

/* bpn_waker_take callback: under the hub lock, must not call the hub. */
static void on_ready(void *user, void *arg) {
    round_ctx *x = arg;
    sub_user *u = user;
    atomic_fetch_add_explicit(&u->wakeups, 1, memory_order_relaxed);
    INC(&x->c, ready_callbacks);
}

/* ---- producers ---------------------------------------------------------- */

static const int status_pick[20] = {
    BPN_STATUS_PROCESSING, BPN_STATUS_PROCESSING, BPN_STATUS_PROCESSING,
    BPN_STATUS_PROCESSING, BPN_STATUS_PROCESSING, BPN_STATUS_PROCESSING,
    BPN_STATUS_PROCESSING, BPN_STATUS_PROCESSING, BPN_STATUS_PROCESSING,
    BPN_STATUS_PROCESSING, BPN_STATUS_PROCESSING, BPN_STATUS_PROCESSING,
    BPN_STATUS_PROCESSING, BPN_STATUS_PROCESSING, BPN_STATUS_PROCESSING,
    BPN_STATUS_QUEUED,     BPN_STATUS_QUEUED,     BPN_STATUS_COMPLETED,
    BPN_STATUS_FAILED,     BPN_STATUS_CANCELLED,
};

static void *producer_main(void *arg) {
    thread_arg *ta = arg;
    round_ctx *x = ta->ctx;
    rng r = rng_for(x->round, 100 + ta->index);
    int closed_seen = 0, burst = 0;
    unsigned long n = 0;
    unsigned pace_us = (unsigned)(1e6 * opt.producers / opt.rate);
    while (!should_stop(x)) {
        if (is_closing(x)) {
            /* Keep calling while the engine closes: BPN_ECLOSED, no crash. */
            if (closed_seen >= 16) break;
            nap_us(500);
        }
        int j = (int)below(&r, NJOBS);
        int status = status_pick[below(&r, 20)];
        int u = pick_url(&r);
        /* The slow producer (a job runner notifying once per step) pauses
         * after each call; its deliveries go to /ok (delivered, freed) or
         * /gone (dead-lettered at once, then redelivered by the admin).
         * Whatever the caller reads of a delivery after submitting it must
         * have been copied under d->mu: the pause leaves the delivery
         * thread and the admin time to free or requeue it first, with no
         * later release of d->mu by this thread to order the two. */
        if (ta->slow) u = n % 2 ? U_GONE : U_OK;
        char json[160];
        int jl = snprintf(json, sizeof(json),
                          "{\"status\":\"%s\",\"p\":%d,\"n\":%lu}",
                          bpn_status_names[status], ta->index, n++);
        atomic_fetch_add_explicit(&x->notifies, 1, memory_order_relaxed);
        uint64_t seq = 0, delivery = 0;
        int rc;
        if (u != U_NONE && (ta->slow ? (n / 2) % 2 : below(&r, 10) == 0)) {
            /* delivery.h: bpn_delivery_submit from any thread. */
            bpn_event *ev = bpn_event_new(status, json, (size_t)jl, job_ids[j],
                                          job_lens[j], 1);
            rc = bpn_delivery_submit(x->e->delivery, job_ids[j], job_lens[j],
                                     urls[u], url_lens[u], origins[u], ev,
                                     &delivery);
            bpn_event_unref(ev);
            if (rc == BPN_OK)
                INC(&x->c, raw_submit_ok);
            else if (rc == BPN_ECLOSED) {
                INC(&x->c, raw_submit_closed);
                closed_seen++;
            } else
                INC(&x->c, notify_error);
        } else {
            rc = bpn_engine_notify(
                x->e, job_ids[j], job_lens[j], status, json, (size_t)jl,
                u == U_NONE ? NULL : urls[u], u == U_NONE ? 0 : url_lens[u],
                u == U_NONE ? NULL : origins[u], &seq, &delivery);
            if (rc == BPN_OK) {
                INC(&x->c, notify_ok);
                if (u != U_NONE) INC(&x->c, notify_with_url);
                if (seq)
                    atomic_store_explicit(&x->last_seq[j], seq,
                                          memory_order_relaxed);
            } else if (rc == BPN_ECLOSED) {
                INC(&x->c, notify_closed);
                closed_seen++;
            } else {
                INC(&x->c, notify_error);
            }
        }
        if ((n & 63) == 0 && bpn_delivery_has_logs(x->e->delivery)) {
            /* The binding's pump_logs after notify(). */
            bpn_log_record *recs = NULL;
            size_t nrec = 0;
            if (bpn_delivery_take_logs(x->e->delivery, &recs, &nrec) == BPN_OK)
                ADD(&x->c, log_records, nrec);
            free(recs);
        }
        if (rc == BPN_OK && delivery &&
            bpn_delivery_sync_store(x->e->delivery)) {
            /* As the binding does in sync durability (in 100 ms slices). */
            double until = now_s() + 10.0;
            int ok = 0;
            while (!ok && now_s() < until)
                ok = bpn_delivery_wait_stored(x->e->delivery, delivery, 100);
            if (ok)
                INC(&x->c, wait_stored_ok);
            else
                INC(&x->c, wait_stored_timeout);
        }
        /* Paced at --rate overall, with bursts (lanes queue up, hosts
         * hit their connection cap). */
        if (ta->slow)
            nap_us(5000 + (long)below(&r, 15000));
        else if (burst > 0)
            burst--;
        else if (below(&r, 40) == 0)
            burst = 8 + (int)below(&r, 24);
        else
            nap_us((long)below(&r, 2 * pace_us + 1));
    }
    return NULL;
}

/* ---- registrar ---------------------------------------------------------- */

static void *registrar_main(void *arg) {
    thread_arg *ta = arg;
    round_ctx *x = ta->ctx;
    rng r = rng_for(x->round, 200);
    bpn_hub *hub = &x->e->hub;
    while (!should_stop(x)) {
        int j = (int)below(&r, NJOBS);
        char tok[BPN_TOKEN_HEX_LEN], wrong[BPN_TOKEN_HEX_LEN];
        int rc = bpn_hub_register(hub, job_ids[j], job_lens[j], tok);
        if (rc == BPN_OK) {
            INC(&x->c, register_ok);
            if (bpn_hub_check_token(hub, job_ids[j], job_lens[j], tok,
                                    sizeof(tok)))
                INC(&x->c, token_ok);
            else /* registered again, ended and swept meanwhile */
                INC(&x->c, token_replaced);
            memcpy(wrong, tok, sizeof(wrong));
            wrong[below(&r, sizeof(wrong))] ^= 1;
            if (bpn_hub_check_token(hub, job_ids[j], job_lens[j], wrong,
                                    sizeof(wrong)) ||
                bpn_hub_check_token(hub, job_ids[j], job_lens[j], tok,
                                    sizeof(tok) - 1))
                INC(&x->c, wrong_token_accepted);
        } else if (rc == BPN_ELIMIT) {
            INC(&x->c, register_limit);
        } else if (rc == BPN_ECLOSED) {
            INC(&x->c, register_closed);
        }
        (void)bpn_hub_active(hub);
        (void)bpn_hub_subscribers(hub);
        INC(&x->c, active_calls);
        if (below(&r, 4) == 0) {
            bpn_hub_sweep(hub);
            INC(&x->c, sweeps);
        }
        nap_us(100 + below(&r, 400));
    }
    return NULL;
}

/* ---- subscribers and the loop ------------------------------------------- */

/* Checks a pulled event: ids increase, the frame matches the id. */
static void check_event(round_ctx *x, const bpn_event *ev, uint64_t *last) {
    char head[32];
    int hl = snprintf(head, sizeof(head), "id: %" PRIu64 "\n", ev->seq);
    if (ev->seq <= *last) INC(&x->c, sub_order_violation);
    *last = ev->seq;
    if (ev->frame_len < (size_t)hl || memcmp(ev->frame, head, (size_t)hl) ||
        memcmp(ev->frame + ev->frame_len - 2, "\n\n", 2) ||
        !memmem(ev->frame, ev->frame_len, ev->json, ev->json_len))
        INC(&x->c, frame_mismatch);
}

static void *subscriber_main(void *arg) {
    thread_arg *ta = arg;
    round_ctx *x = ta->ctx;
    rng r = rng_for(x->round, 300 + ta->index);
    bpn_hub *hub = &x->e->hub;
    bpn_waker *mine = bpn_waker_new(hub);
    sub_user *u = calloc(1, sizeof(*u));
    unsigned iter = 0;
    if (u) NOT_CHECKED(u, sizeof(*u));
    if (!mine || !u) {
        fprintf(stderr, "subscriber: out of memory\n");
        exit(2);
    }
    while (!should_stop(x)) {
        int j = (int)below(&r, NJOBS);
        int kind = (int)below(&r, 4);
        bpn_waker *w = (kind == 0 || kind == 3) ? x->shared : mine;
        int64_t from = BPN_FROM_LIVE;
        const char *token = NULL;
        char tok[BPN_TOKEN_HEX_LEN];
        if (kind == 1) from = BPN_FROM_OLDEST;
        if (kind == 2) {
            uint64_t s =
                atomic_load_explicit(&x->last_seq[j], memory_order_relaxed);
            uint64_t back = below(&r, 6);
            from = s > back ? (int64_t)(s - back) : 0;
        }
        if (kind == 3) {
            /* An SSE client: token from register, checked in sub_new. */
            if (bpn_hub_register(hub, job_ids[j], job_lens[j], tok) == BPN_OK)
                token = tok;
            from = BPN_FROM_OLDEST;
        }
        bpn_sub *s = NULL;
        int rc = bpn_sub_new(hub, job_ids[j], job_lens[j], token,
                             token ? sizeof(tok) : 0, from, w, u, &s);
        if (rc != BPN_OK) {
            if (rc == BPN_EAUTH)
                INC(&x->c, sub_new_auth);
            else if (rc == BPN_ELIMIT)
                INC(&x->c, sub_new_limit);
            else if (rc == BPN_ECLOSED)
                INC(&x->c, sub_new_closed);
            nap_us(200);
            continue;
        }
        INC(&x->c, sub_new_ok);
        uint64_t last = 0;
        unsigned pulls = 4 + below(&r, 24);
        for (unsigned p = 0; p < pulls && !should_stop(x); p++) {
            if (w == mine) {
                struct pollfd pf = {bpn_waker_fd(mine), POLLIN, 0};
                poll(&pf, 1, 2);
                INC(&x->c, waker_takes);
                bpn_waker_take(mine, on_ready, x);
            } else {
                unsigned seen =
                    atomic_load_explicit(&u->wakeups, memory_order_relaxed);
                for (int k = 0; k < 4 && atomic_load_explicit(
                                             &u->wakeups,
                                             memory_order_relaxed) == seen;
                     k++)
                    nap_us(500);
            }
            bpn_event *evs[16];
            bpn_pull_result pr = bpn_sub_pull(s, evs, 16);
            INC(&x->c, sub_pulls);
            ADD(&x->c, sub_events, pr.n);
            ADD(&x->c, sub_skipped, pr.skipped);
            for (size_t i = 0; i < pr.n; i++) {
                check_event(x, evs[i], &last);
                bpn_event_unref(evs[i]);
            }
            if (pr.ended) {
                INC(&x->c, sub_ended);
                break;
            }
        }
        bpn_sub_free(s);
        if (++iter % 8 == 0) {
            /* A loop going away and a new one coming: waker churn. */
            bpn_waker_free(mine);
            mine = bpn_waker_new(hub);
            if (!mine) {
                fprintf(stderr, "subscriber: bpn_waker_new failed\n");
                exit(2);
            }
            INC(&x->c, waker_churn);
        }
    }
    bpn_waker_free(mine);
    free(u);
    return NULL;
}

/* The event loop of the shared waker: eventfd readable -> take. */
static void *loop_main(void *arg) {
    thread_arg *ta = arg;
    round_ctx *x = ta->ctx;
    while (!should_stop(x)) {
        struct pollfd pf = {bpn_waker_fd(x->shared), POLLIN, 0};
        if (poll(&pf, 1, 5) <= 0) continue;
        INC(&x->c, waker_takes);
        if (bpn_waker_take(x->shared, on_ready, x)) INC(&x->c, drain_signals);
    }
    return NULL;
}

/* ---- ingest (the broker thread) ----------------------------------------- */

static void *ingest_main(void *arg) {
    thread_arg *ta = arg;
    round_ctx *x = ta->ctx;
    rng r = rng_for(x->round, 400);
    bpn_hub *hub = &x->e->hub;
    uint64_t n = 0;
    while (!should_stop(x)) {
        int j = (int)below(&r, NJOBS);
        uint64_t now = bpn_now_realtime_us();
        uint64_t mine =
            atomic_load_explicit(&x->last_seq[j], memory_order_relaxed);
        uint64_t id, alias = 0, prev = 0;
        switch (below(&r, 5)) {
            case 0: id = now - 1 - below(&r, 20000); break; /* late: inserted */
            case 1: id = mine ? mine : now; break; /* our own event: dup */
            case 2:
                id = now + below(&r, 1000);
                alias = mine; /* renumbered by the broker */
                break;
            default: id = now + below(&r, 1000); break;
        }
        if (below(&r, 4) == 0) prev = id - 1 - below(&r, 5000);
        int status = below(&r, 12) == 0 ? BPN_STATUS_COMPLETED
                                        : BPN_STATUS_PROCESSING;
        char json[96];
        int jl = snprintf(json, sizeof(json),
                          "{\"status\":\"%s\",\"remote\":%" PRIu64 "}",
                          bpn_status_names[status], n++);
        bpn_event *ev = bpn_event_new(status, json, (size_t)jl, job_ids[j],
                                      job_lens[j], 0);
        int rc = bpn_hub_ingest(hub, job_ids[j], job_lens[j], ev, id, alias,
                                prev);
        bpn_event_unref(ev);
        if (rc == 1)
            INC(&x->c, ingest_added);
        else if (rc == 0)
            INC(&x->c, ingest_ignored);
        else if (rc == BPN_ELIMIT)
            INC(&x->c, ingest_limit);
        else if (rc == BPN_ECLOSED)
            INC(&x->c, ingest_closed);
        nap_us(100 + below(&r, 300));
    }
    return NULL;
}

/* ---- dead letters, keys, stats, logs ------------------------------------ */

static void rotate_keys(round_ctx *x, rng *r) {
    /* Current first, then 0-2 older ones still in their overlap. */
    unsigned turn = atomic_fetch_add_explicit(&x->key_turn, 1,
                                              memory_order_relaxed) + 1;
    size_t n = 1 + below(r, 3);
    bpn_key keys[3];
    for (size_t i = 0; i < n; i++) {
        const char *s = secrets[(turn + NSECRETS - i) % NSECRETS];
        keys[i] = (bpn_key){(const uint8_t *)s, strlen(s), (const uint8_t *)s,
                            strlen(s),
                            i ? bpn_wall_s() + (int64_t)below(r, 3) : 0};
    }
    if (bpn_delivery_set_keys(x->e->delivery, keys, n) == BPN_OK)
        INC(&x->c, set_keys);
}

static void *admin_main(void *arg) {
    thread_arg *ta = arg;
    round_ctx *x = ta->ctx;
    rng r = rng_for(x->round, 500);
    bpn_delivery *d = x->e->delivery;
    while (!should_stop(x)) {
        if (bpn_delivery_has_logs(d)) {
            bpn_log_record *recs = NULL;
            size_t n = 0;
            if (bpn_delivery_take_logs(d, &recs, &n) == BPN_OK) {
                size_t sum = 0;
                for (size_t i = 0; i < n; i++) sum += strlen(recs[i].msg);
                (void)sum;
                ADD(&x->c, log_records, n);
            }
            free(recs);
        }
        bpn_dead_letter *dl = NULL;
        size_t ndl = 0;
        if (bpn_delivery_dead_snapshot(d, &dl, &ndl) == BPN_OK) {
            INC(&x->c, snapshots);
            ADD(&x->c, dead_letters_read, ndl);
            unsigned sum = 0; /* read every field of every copy */
            for (size_t i = 0; i < ndl; i++) {
                sum += (unsigned)strlen(dl[i].job_id) + dl[i].attempts +
                       (unsigned)strlen(dl[i].url) +
                       (unsigned)strlen(dl[i].last_error) +
                       (unsigned)strlen(dl[i].msg_id);
                for (size_t k = 0; k < dl[i].ev->payload_len; k++)
                    sum += (unsigned char)dl[i].ev->payload[k];
                for (uint32_t k = 0; k < dl[i].nlog; k++)
                    sum += (unsigned)dl[i].log[k].status +
                           (unsigned)strlen(dl[i].log[k].error);
            }
            (void)sum;
        }
        unsigned act = below(&r, 100);
        if (act < 35 && ndl) {
            uint64_t ids[64];
            size_t nids = 0;
            for (size_t i = 0; i < ndl && nids < 63; i += 2)
                ids[nids++] = dl[i].id;
            ids[nids++] = 999999999; /* an unknown id matches nothing */
            size_t moved = 0;
            int rc = bpn_delivery_redeliver(d, ids, nids, &moved);
            INC(&x->c, redeliver_calls);
            if (rc == BPN_ECLOSED) INC(&x->c, redeliver_closed);
            ADD(&x->c, redelivered, moved);
        } else if (act < 45) {
            size_t moved = 0;
            int rc = bpn_delivery_redeliver(d, NULL, 0, &moved);
            INC(&x->c, redeliver_calls);
            if (rc == BPN_ECLOSED) INC(&x->c, redeliver_closed);
            ADD(&x->c, redelivered, moved);
        } else if (act < 53) {
            INC(&x->c, clear_calls);
            if (bpn_delivery_clear_dead(d) == BPN_ECLOSED)
                INC(&x->c, clear_closed);
        } else if (act < 68) {
            rotate_keys(x, &r);
        } else {
            bpn_delivery_stats st;
            bpn_delivery_stats_get(d, &st);
            INC(&x->c, stats_calls);
        }
        bpn_dead_letters_free(dl, ndl);
        nap_us(1000 + below(&r, 3000));
    }
    return NULL;
}

/* ---- flush and drain waiters -------------------------------------------- */

static void *flusher_main(void *arg) {
    thread_arg *ta = arg;
    round_ctx *x = ta->ctx;
    rng r = rng_for(x->round, 600);
    bpn_delivery *d = x->e->delivery;
    bpn_waker *w = bpn_waker_new(&x->e->hub);
    if (!w) {
        fprintf(stderr, "flusher: bpn_waker_new failed\n");
        exit(2);
    }
    bpn_waker_want_drain(w, 1);
    while (!should_stop(x)) {
        unsigned mode = below(&r, 3);
        if (mode == 0) {
            /* flush(): a ticket, waited for in slices. */
            uint64_t t = bpn_delivery_ticket(d);
            double until = now_s() + 2.0;
            int done = 0;
            INC(&x->c, flush_waits);
            while (!done && !should_stop(x) && now_s() < until)
                done = bpn_delivery_wait(d, t, 100);
            if (done)
                INC(&x->c, flush_done);
            else
                INC(&x->c, flush_timeout);
        } else if (mode == 1) {
            INC(&x->c, flush_waits);
            if (bpn_delivery_flush(d, 30))
                INC(&x->c, flush_done);
            else
                INC(&x->c, flush_timeout);
        } else {
            /* drain(): watch + the loop's drain signal + ticket_done. */
            uint64_t t = bpn_delivery_ticket(d);
            double until = now_s() + 2.0;
            int done = bpn_delivery_ticket_done(d, t);
            INC(&x->c, drain_waits);
            bpn_delivery_watch(d, 1);
            while (!done && !should_stop(x) && now_s() < until) {
                struct pollfd pf = {bpn_waker_fd(w), POLLIN, 0};
                poll(&pf, 1, 20);
                if (bpn_waker_take(w, on_ready, x)) INC(&x->c, drain_signals);
                done = bpn_delivery_ticket_done(d, t);
            }
            bpn_delivery_watch(d, 0);
            if (done) INC(&x->c, drain_done);
        }
        nap_us(2000 + below(&r, 8000));
    }
    bpn_waker_want_drain(w, 0);
    bpn_waker_free(w);
    return NULL;
}

/* ---- engine churn -------------------------------------------------------- */

/* Other notifiers come and go while this round's engine runs (the binding
 * creates and frees engines with the GIL released): curl_global_init and
 * cleanup, OpenSSL fetches, pthread_once, concurrent with everything else.
 * Every other one refuses private networks: the SSRF guard's path (each
 * delivery dead-lettered at once, no retry). */
static void *churn_main(void *arg) {
    thread_arg *ta = arg;
    round_ctx *x = ta->ctx;
    rng r = rng_for(x->round, 700);
    unsigned k = 0;
    while (!should_stop(x)) {
        int guarded = k++ % 2;
        const char *sec = secrets[k % NSECRETS];
        bpn_key key = {(const uint8_t *)sec, strlen(sec), (const uint8_t *)sec,
                       strlen(sec), 0};
        bpn_engine_config cfg = {
            .delivery = {.keys = &key,
                         .nkeys = 1,
                         .schemes = BPN_SCHEME_BLUEPRINT | BPN_SCHEME_STANDARD,
                         .max_retries = 1,
                         .retry_base_ms = 1,
                         .max_retry_delay_ms = 5,
                         .timeout_ms = 2000,
                         .max_dead_letters = 8,
                         .allow_private_networks = !guarded,
                         .max_connections = 2,
                         .max_connections_per_host = 2,
                         .max_response_bytes = 1024,
                         .user_agent = "bpn-tsan-churn"},
            .sse_capacity = 4,
            .max_channels = 8,
            .retention_ms = 0,
            .clock_ids = (int)(k % 3 == 0),
        };
        bpn_engine *e = NULL;
        char err[256];
        if (bpn_engine_new(&cfg, &e, err, sizeof(err)) != BPN_OK) {
            fprintf(stderr, "churn: bpn_engine_new: %s\n", err);
            INC(&x->c, churn_mismatch);
            break;
        }
        unsigned sent = 0, n = 2 + below(&r, 6);
        for (unsigned i = 0; i < n; i++) {
            int j = (int)below(&r, NJOBS);
            uint64_t seq = 0, id = 0;
            static const char json[] = "{\"status\":\"processing\"}";
            if (bpn_engine_notify(e, job_ids[j], job_lens[j],
                                  BPN_STATUS_PROCESSING, json,
                                  sizeof(json) - 1, urls[U_OK], url_lens[U_OK],
                                  origins[U_OK], &seq, &id) == BPN_OK)
                sent++;
        }
        bpn_delivery_flush(e->delivery, below(&r, 2) ? 500 : 0);
        bpn_engine_close(e, below(&r, 2) ? 200 : 0);
        bpn_delivery_stats st;
        bpn_delivery_stats_get(e->delivery, &st);
        if (st.submitted != sent || st.pending != 0 ||
            st.submitted != st.delivered + st.dead_lettered ||
            (guarded && st.delivered != 0))
            INC(&x->c, churn_mismatch);
        if (guarded) ADD(&x->c, churn_refused, st.dead_lettered);
        ADD(&x->c, churn_delivered, st.delivered);
        bpn_engine_free(e);
        INC(&x->c, churn_engines);
        nap_us(5000 + below(&r, 20000));
    }
    return NULL;
}

/* ---- the second closer -------------------------------------------------- */

static void *closer_main(void *arg) {
    thread_arg *ta = arg;
    round_ctx *x = ta->ctx;
    while (!is_closing(x) && !should_stop(x)) nap_us(500);
    nap_us(20000);
    bpn_engine_close(x->e, 100);
    INC(&x->c, close_calls);
    return NULL;
}

/* ---- the store, read back ----------------------------------------------- */

typedef struct {
    unsigned long long pending, delivered, dead;
} row_counts;

static int count_row(void *arg, const bpn_stored *row) {
    row_counts *rc = arg;
    if (row->state == BPN_ROW_PENDING) rc->pending++;
    if (row->state == BPN_ROW_DELIVERED) rc->delivered++;
    if (row->state == BPN_ROW_DEAD) rc->dead++;
    return 0;
}

static int read_store(const char *path, row_counts *out) {
    bpn_store *s = NULL;
    char err[512];
    memset(out, 0, sizeof(*out));
    int rc = bpn_store_open(path, 3600000, &s, err, sizeof(err));
    if (rc == BPN_OK) rc = bpn_store_load(s, count_row, out, err, sizeof(err));
    if (rc != BPN_OK) fprintf(stderr, "store read back: %s\n", err);
    bpn_store_close(s);
    return rc;
}

/* ---- main --------------------------------------------------------------- */

static int failures;

#define CHECK(cond, ...)                          \
    do {                                          \
        if (!(cond)) {                            \
            failures++;                           \
            printf("  CHECK FAILED: " __VA_ARGS__); \
            printf("\n");                         \
        }                                         \
    } while (0)

typedef struct {
    bpn_delivery_stats st;
    counts c;
    double seconds, close_ms;
    unsigned long threads;
    size_t dead_final;
} round_result;

static void run_round(int round, int store_mode, int clock_ids,
                      int64_t close_ms, const char *store_path,
                      uint64_t prev_left, round_result *res) {
    round_ctx *x = calloc(1, sizeof(*x));
    NOT_CHECKED(&x->closing, (size_t)((char *)(x + 1) - (char *)&x->closing));
    x->round = round;
    x->store_mode = store_mode;
    x->clock_ids = clock_ids;
    bpn_key key = {(const uint8_t *)secrets[0], strlen(secrets[0]),
                   (const uint8_t *)secrets[0], strlen(secrets[0]), 0};
    bpn_engine_config cfg = {
        .delivery =
            {
                .keys = &key,
                .nkeys = 1,
                .schemes = BPN_SCHEME_BLUEPRINT | BPN_SCHEME_STANDARD,
                .max_retries = 2,
                .retry_base_ms = 5,
                .max_retry_delay_ms = 40,
                .timeout_ms = 5000,
                .max_dead_letters = 64,
                .allow_private_networks = 1,
                .max_connections = 12,
                .max_connections_per_host = 6,
                .max_response_bytes = 4096,
                .user_agent = "bpn-tsan-driver",
                .store_path = store_mode ? store_path : NULL,
                .store_sync = store_mode == STORE_SYNC,
                .keep_delivered_ms = 200,
            },
        .sse_capacity = 8,
        .max_channels = 32,
        .retention_ms = 30,
        .clock_ids = clock_ids,
    };
    char err[512];
    double t0 = now_s();
    set_phase(round, "bpn_engine_new");
    if (bpn_engine_new(&cfg, &x->e, err, sizeof(err)) != BPN_OK) {
        fprintf(stderr, "bpn_engine_new: %s\n", err);
        exit(2);
    }
    x->shared = bpn_waker_new(&x->e->hub);
    if (!x->shared) {
        perror("bpn_waker_new");
        exit(2);
    }
    bpn_waker_want_drain(x->shared, 1);

    enum { MAXT = 64 };
    pthread_t th[MAXT];
    thread_arg args[MAXT];
    int nt = 0;
#define SPAWN_SLOW(fn, idx, slow)                                       \
    do {                                                                \
        args[nt] = (thread_arg){x, (idx), (slow)};                      \
        if (pthread_create(&th[nt], NULL, fn, &args[nt]) != 0) {        \
            perror("pthread_create");                                   \
            exit(2);                                                    \
        }                                                               \
        nt++;                                                           \
    } while (0)
#define SPAWN(fn, idx) SPAWN_SLOW(fn, idx, 0)
    for (int i = 0; i < opt.producers; i++) SPAWN(producer_main, i);
    SPAWN_SLOW(producer_main, opt.producers, 1);
    for (int i = 0; i < opt.subscribers; i++) SPAWN(subscriber_main, i);
    SPAWN(loop_main, 0);
    SPAWN(registrar_main, 0);
    SPAWN(admin_main, 0);
    SPAWN(flusher_main, 0);
    SPAWN(closer_main, 0);
    SPAWN(churn_main, 0);
    if (clock_ids) SPAWN(ingest_main, 0);
#undef SPAWN
#undef SPAWN_SLOW

    set_phase(round, running_phase);
    while (atomic_load_explicit(&x->notifies, memory_order_relaxed) <
               opt.ops &&
           now_s() - t0 < opt.max_round_s)
        nap_us(5000);
    if (now_s() - t0 >= opt.max_round_s)
        printf("  note: round time limit reached before --ops calls\n");

    /* Close while every thread is still calling. */
    atomic_store_explicit(&x->closing, 1, memory_order_relaxed);
    double c0 = now_s();
    set_phase(round, "bpn_engine_close (main) while every thread calls");
    bpn_engine_close(x->e, close_ms);
    INC(&x->c, close_calls);
    res->close_ms = (now_s() - c0) * 1000.0;
    nap_us(30000); /* producers see BPN_ECLOSED, the rest run on closed */
    atomic_store_explicit(&x->stop, 1, memory_order_relaxed);
    set_phase(round, "joining the driver's threads");
    for (int i = 0; i < nt; i++) pthread_join(th[i], NULL);
    ADD(&x->c, threads, (unsigned long long)nt + 1); /* + delivery thread */

    bpn_delivery_stats_get(x->e->delivery, &res->st);
    bpn_dead_letter *dl = NULL;
    size_t ndl = 0;
    bpn_delivery_dead_snapshot(x->e->delivery, &dl, &ndl);
    bpn_dead_letters_free(dl, ndl);
    res->dead_final = ndl;
    set_phase(round, "bpn_engine_free");
    bpn_waker_free(x->shared);
    bpn_engine_free(x->e);
    set_phase(round, "checking the counts");
    res->seconds = now_s() - t0;
    snapshot_counters(&x->c, &res->c);
    res->threads = (unsigned long)nt + 1;

    /* ---- the counts add up ---- */
    const bpn_delivery_stats *s = &res->st;
    const counts *c = &res->c;
    printf("round %d: %s, %s ids, close timeout %lld ms: %.2f s (close took "
           "%.0f ms), %d threads\n",
           round, store_names[store_mode], clock_ids ? "clock" : "sequential",
           (long long)close_ms, res->seconds, res->close_ms, nt + 1);
    printf("  notify: %llu ok (%llu with URL) + %llu raw submits, %llu "
           "ECLOSED after close, %llu other errors\n",
           c->notify_ok, c->notify_with_url, c->raw_submit_ok,
           c->notify_closed + c->raw_submit_closed, c->notify_error);
    printf("  deliveries: submitted %" PRIu64 " + redelivered %llu + "
           "recovered %" PRIu64 " = delivered %" PRIu64
           " + dead-lettered %" PRIu64 " + left in store %" PRIu64
           "; pending %" PRIu64 ", in flight %" PRIu64 "\n",
           s->submitted, c->redelivered, s->recovered, s->delivered,
           s->dead_lettered, s->left_in_store, s->pending, s->in_flight);
    printf("  attempts %" PRIu64 " (failed %" PRIu64 ", retried %" PRIu64
           "), dead letters evicted %" PRIu64 ", left in ring %zu, store "
           "commits %" PRIu64 ", store errors %" PRIu64 "\n",
           s->attempts, s->failed_attempts, s->retried, s->evicted,
           res->dead_final, s->store_commits, s->store_errors);
    if (opt.verbose) {
#define SHOW(n) printf("    %-22s %llu\n", #n, c->n);
        COUNTERS(SHOW)
#undef SHOW
    }
    CHECK(c->notify_error == 0, "%llu notify/submit errors", c->notify_error);
    CHECK(s->pending == 0, "pending %" PRIu64 " after close", s->pending);
    CHECK(s->in_flight == 0, "in flight %" PRIu64 " after close",
          s->in_flight);
    CHECK(s->submitted == c->notify_with_url + c->raw_submit_ok,
          "submitted %" PRIu64 " != notify with URL %llu + raw %llu",
          s->submitted, c->notify_with_url, c->raw_submit_ok);
    CHECK(s->submitted + c->redelivered + s->recovered ==
              s->delivered + s->dead_lettered + s->left_in_store,
          "in %llu != out %llu",
          (unsigned long long)(s->submitted + c->redelivered + s->recovered),
          (unsigned long long)(s->delivered + s->dead_lettered +
                               s->left_in_store));
    CHECK(s->recovered == prev_left,
          "recovered %" PRIu64 " != left in store by the previous round %" PRIu64,
          s->recovered, prev_left);
    CHECK(s->store_errors == 0, "%" PRIu64 " store errors", s->store_errors);
    CHECK(c->wait_stored_timeout == 0, "%llu sync-store waits timed out",
          c->wait_stored_timeout);
    CHECK(c->wrong_token_accepted == 0, "a wrong token was accepted %llu times",
          c->wrong_token_accepted);
    CHECK(c->sub_order_violation == 0, "%llu pulls went back in ids",
          c->sub_order_violation);
    CHECK(c->frame_mismatch == 0, "%llu frames did not match their event",
          c->frame_mismatch);
    CHECK(c->churn_mismatch == 0,
          "%llu churned engines whose counts did not add up",
          c->churn_mismatch);
    CHECK(c->notify_closed + c->raw_submit_closed > 0,
          "no producer saw BPN_ECLOSED (close did not overlap producers)");
    CHECK(s->delivered > 0 && s->dead_lettered > 0 && s->retried > 0,
          "a path was not exercised (delivered/dead/retried)");
    if (store_mode) {
        row_counts rows;
        if (read_store(store_path, &rows) == BPN_OK) {
            printf("  store file: %llu pending, %llu dead, %llu delivered rows\n",
                   rows.pending, rows.dead, rows.delivered);
            CHECK(rows.pending == s->left_in_store,
                  "pending rows %llu != left_in_store %" PRIu64, rows.pending,
                  s->left_in_store);
            CHECK(rows.dead == res->dead_final,
                  "dead rows %llu != dead letters in the ring %zu", rows.dead,
                  res->dead_final);
        } else {
            failures++;
        }
    }
    free(x);
}

static void usage(const char *argv0) {
    fprintf(stderr,
            "usage: %s [--rounds N] [--ops N] [--producers N] "
            "[--subscribers N] [--rate CALLS_PER_S] [--max-round-seconds S] "
            "[--tmpdir DIR] [-v]\n",
            argv0);
    exit(2);
}

static char tmpdir_buf[512];

static void cleanup_store(const char *path) {
    static const char *const suffix[] = {"", "-wal", "-shm", "-lock",
                                         "-journal"};
    char p[600];
    for (size_t i = 0; i < sizeof(suffix) / sizeof(suffix[0]); i++) {
        snprintf(p, sizeof(p), "%s%s", path, suffix[i]);
        unlink(p);
    }
    rmdir(tmpdir_buf);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--rounds") && v) opt.rounds = atoi(argv[++i]);
        else if (!strcmp(a, "--ops") && v) opt.ops = strtoul(argv[++i], NULL, 10);
        else if (!strcmp(a, "--producers") && v) opt.producers = atoi(argv[++i]);
        else if (!strcmp(a, "--subscribers") && v)
            opt.subscribers = atoi(argv[++i]);
        else if (!strcmp(a, "--rate") && v) opt.rate = atof(argv[++i]);
        else if (!strcmp(a, "--max-round-seconds") && v)
            opt.max_round_s = atof(argv[++i]);
        else if (!strcmp(a, "--tmpdir") && v) opt.tmpdir = argv[++i];
        else if (!strcmp(a, "-v")) opt.verbose = 1;
        else usage(argv[0]);
    }
    if (opt.rounds < 1 || opt.producers < 1 || opt.subscribers < 0 ||
        opt.rate <= 0 ||
        opt.producers + opt.subscribers > 48)
        usage(argv[0]);
    setvbuf(stdout, NULL, _IOLBF, 0);

    const char *base = opt.tmpdir ? opt.tmpdir : getenv("TMPDIR");
    snprintf(tmpdir_buf, sizeof(tmpdir_buf), "%s/bpn-tsan.XXXXXX",
             base && *base ? base : "/tmp");
    if (!mkdtemp(tmpdir_buf)) {
        perror("mkdtemp");
        return 2;
    }
    char store_path[600];
    snprintf(store_path, sizeof(store_path), "%s/outbox.db", tmpdir_buf);

    NOT_CHECKED(&phase, sizeof(phase));
    NOT_CHECKED(&phase_round, sizeof(phase_round));
    NOT_CHECKED(&phase_since_ms, sizeof(phase_since_ms));
    pthread_t wd;
    if (pthread_create(&wd, NULL, watchdog_main, NULL) != 0) {
        perror("pthread_create");
        return 2;
    }
    pthread_detach(wd);
    init_jobs();
    receiver *rx = rx_start(secrets, NSECRETS);
    if (!rx) return 2;
    init_urls(rx_port(rx));

    /* Round configurations, cycled: store rounds share the file. */
    /* close_ms 0: what is queued at the close is dead-lettered (memory)
     * or left in the store, which the next store round resumes. */
    static const struct {
        int store, clock;
        int64_t close_ms;
    } plan[] = {
        {STORE_NONE, 0, 300},   {STORE_NONE, 1, 0},  {STORE_BATCHED, 1, 0},
        {STORE_SYNC, 0, 300},   {STORE_BATCHED, 0, 0}, {STORE_SYNC, 1, 0},
    };
    const int nplan = (int)(sizeof(plan) / sizeof(plan[0]));
    double t0 = now_s();
    counts total = {0};
    unsigned long long delivered = 0, dead = 0, submitted = 0, attempts = 0,
                       redelivered = 0, recovered = 0, threads = 0;
    uint64_t left = 0;
    for (int r = 0; r < opt.rounds; r++) {
        int store = plan[r % nplan].store, clock = plan[r % nplan].clock;
        round_result res;
        memset(&res, 0, sizeof(res));
        run_round(r, store, clock, plan[r % nplan].close_ms, store_path,
                  store ? left : 0, &res);
        if (store) left = res.st.left_in_store;
        add_counts(&total, &res.c);
        delivered += res.st.delivered;
        dead += res.st.dead_lettered;
        submitted += res.st.submitted;
        attempts += res.st.attempts;
        recovered += res.st.recovered;
        redelivered += res.c.redelivered;
        threads += res.threads;
    }
    rx_stats *rs = rx_stats_of(rx);
    unsigned long long rx_req = atomic_load(&rs->requests),
                       rx_2xx = atomic_load(&rs->status_2xx),
                       rx_bad = atomic_load(&rs->bad_signature),
                       rx_missing = atomic_load(&rs->missing_headers),
                       rx_order = atomic_load(&rs->order_violation),
                       rx_conns = atomic_load(&rs->connections),
                       rx_badreq = atomic_load(&rs->bad_requests);
    unsigned long long by_path[RX_PATHS];
    for (int i = 0; i < RX_PATHS; i++) by_path[i] = atomic_load(&rs->by_path[i]);
    rx_stop(rx);
    cleanup_store(store_path);
    double secs = now_s() - t0;

    printf("\n==== summary ====\n");
    printf("rounds %d, %.1f s, threads started %llu by the driver (+ %llu "
           "receiver connection threads)\n",
           opt.rounds, secs, threads, rx_conns);
    printf("operations: notify %llu (+%llu raw submits, %llu ECLOSED), "
           "subscriptions %llu (%llu pulls, %llu events, %llu skipped), "
           "waker takes %llu, registers %llu, token checks %llu, ingests %llu "
           "(%llu added), dead-letter snapshots %llu, redeliver calls %llu, "
           "clears %llu, key rotations %llu, flush/drain waits %llu, closes "
           "%llu, engines churned %llu (%llu deliveries refused by the SSRF "
           "guard)\n",
           total.notify_ok, total.raw_submit_ok,
           total.notify_closed + total.raw_submit_closed, total.sub_new_ok,
           total.sub_pulls, total.sub_events, total.sub_skipped,
           total.waker_takes, total.register_ok,
           total.token_ok + total.token_replaced, total.ingest_added +
           total.ingest_ignored, total.ingest_added, total.snapshots,
           total.redeliver_calls, total.clear_calls, total.set_keys,
           total.flush_waits + total.drain_waits, total.close_calls,
           total.churn_engines, total.churn_refused);
    printf("deliveries: submitted %llu, redelivered %llu, recovered %llu -> "
           "delivered %llu, dead-lettered %llu; attempts %llu (+ %llu "
           "delivered by churned engines)\n",
           submitted, redelivered, recovered, delivered, dead, attempts,
           total.churn_delivered);
    printf("receiver: %llu requests, %llu answered 2xx; by path:", rx_req,
           rx_2xx);
    for (int i = 0; i < RX_PATHS; i++)
        if (by_path[i]) printf(" %s %llu", rx_path_name(i), by_path[i]);
    printf("\n");
    CHECK(rx_bad == 0, "receiver: %llu requests with a bad signature", rx_bad);
    CHECK(rx_missing == 0, "receiver: %llu requests without signature headers",
          rx_missing);
    CHECK(rx_order == 0, "receiver: %llu out-of-order deliveries on a lane",
          rx_order);
    CHECK(rx_badreq == 0, "receiver: %llu unparseable requests", rx_badreq);
    /* A 2xx the engine did not count: its transfer was cut by the close. */
    CHECK(rx_2xx >= delivered + total.churn_delivered,
          "receiver answered 2xx %llu < delivered %llu (+ %llu by churned "
          "engines)",
          rx_2xx, delivered, total.churn_delivered);
    printf("checks: %s\n", failures ? "FAILED" : "all counts add up");
    return failures ? 1 : 0;
}
