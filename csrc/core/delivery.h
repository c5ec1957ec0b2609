/* The webhook delivery engine: one native thread that owns one libcurl
 * multi handle. Other threads only submit (under d->mu) and wake it with
 * curl_multi_wakeup. Per (job, url) lane at most one delivery is in flight,
 * which keeps per-job order; lanes of different jobs run in parallel up to
 * the connection limits. Failed attempts are retried with capped,
 * jittered exponential backoff and re-signed each time; what cannot be
 * delivered is dead-lettered. The thread never calls into Python. */
#ifndef BPN_DELIVERY_H
#define BPN_DELIVERY_H

#include <stddef.h>
#include <stdint.h>

#include "event.h"

/* Signature schemes (bit flags). */
enum { BPN_SCHEME_BLUEPRINT = 1, BPN_SCHEME_STANDARD = 2 };

/* A signing key: the raw secret for the blueprint scheme, the decoded key
 * for the standard one, and when it stops being used (wall clock seconds;
 * 0: never). The first key of a set is the current one. */
typedef struct {
    const uint8_t *key;
    size_t key_len;
    const uint8_t *std_key;
    size_t std_key_len;
    int64_t expires_s;
} bpn_key;

/* One failed attempt, as kept on a delivery (newest last). */
#define BPN_ATTEMPT_LOG_MAX 50
typedef struct {
    double at; /* wall clock, seconds, when the attempt started */
    uint32_t duration_ms;
    int status; /* HTTP status, 0 if none was received */
    char error[128];
} bpn_attempt;

typedef struct {
    const bpn_key *keys; /* at least one */
    size_t nkeys;
    int schemes;          /* BPN_SCHEME_* flags */
    uint32_t max_retries; /* extra attempts after the first */
    uint64_t retry_base_ms;
    uint64_t max_retry_delay_ms; /* cap of one backoff delay */
    uint64_t timeout_ms;         /* whole attempt, connect included */
    size_t max_dead_letters;
    int allow_private_networks;
    unsigned max_connections;
    unsigned max_connections_per_host;
    size_t max_response_bytes;
    const char *user_agent;
    /* The durable outbox (store.h), or NULL to keep everything in memory.
     * store_sync: commit each batch of submissions at once (callers wait
     * with bpn_delivery_wait_stored); else commit at most
     * BPN_COMMIT_INTERVAL_MS after the first write. Delivered rows are kept
     * keep_delivered_ms (0: deleted at once). */
    const char *store_path;
    int store_sync;
    uint64_t keep_delivered_ms;
} bpn_delivery_config;

/* Longest time a write waits in an open transaction (batched durability). */
#define BPN_COMMIT_INTERVAL_MS 10

typedef struct bpn_delivery bpn_delivery;

/* A copy of a dead letter, owned by whoever took the snapshot. */
typedef struct {
    uint64_t id;
    char *job_id;
    size_t job_len;
    char *url;
    uint32_t attempts;
    char *last_error;
    bpn_event *ev;    /* ev->payload is the exact body sent */
    double failed_at; /* wall clock, seconds */
    char msg_id[40];  /* webhook-id, the same for every attempt */
    bpn_attempt *log; /* the attempts' outcomes, oldest first */
    uint32_t nlog;
} bpn_dead_letter;

typedef struct {
    int level; /* Python logging's numbers */
    char msg[512];
} bpn_log_record;

#define BPN_LATENCY_BUCKETS 256

typedef struct {
    uint64_t submitted;
    uint64_t delivered;
    uint64_t dead_lettered;
    uint64_t evicted; /* dead letters dropped by the cap */
    uint64_t attempts;
    uint64_t failed_attempts;
    uint64_t retried; /* failed attempts followed by a retry */
    uint64_t pending;
    uint64_t in_flight; /* transfers on the wire */
    /* Latency from notify() to a 2xx, microseconds: bucket b counts values
     * in [bpn_latency_lower(b), bpn_latency_lower(b + 1)). */
    uint64_t latency[BPN_LATENCY_BUCKETS];
    uint64_t latency_sum_us;
    /* The store (all 0 without one). */
    uint64_t recovered;     /* pending deliveries loaded at start */
    uint64_t left_in_store; /* pending at close, resumed by the next start */
    uint64_t store_commits;
    uint64_t store_errors; /* failed writes (logged); delivery went on */
} bpn_delivery_stats;

uint64_t bpn_latency_lower(unsigned bucket);

/* Creates the engine and starts its thread. on_drained(arg) is called from
 * the delivery thread, with no lock held, each time the pending count
 * returns to zero or, while watched, the finished low-water id advances.
 * Returns 0 and sets *out, or an error with a message. */
int bpn_delivery_new(const bpn_delivery_config *cfg, void (*on_drained)(void *),
                     void *arg, bpn_delivery **out, char *err, size_t errlen);

/* Stops the thread (if running) and frees everything, dead letters too. */
void bpn_delivery_free(bpn_delivery *d);

/* Queues a delivery of ev's payload. origin comes from bpn_url_check. Takes
 * a reference to ev. Sets *id (when not NULL) to the delivery's id. Any
 * thread; never blocks beyond d->mu. Returns 0, BPN_ECLOSED or BPN_ENOMEM. */
int bpn_delivery_submit(bpn_delivery *d, const char *job_id, size_t job_len,
                        const char *url, size_t url_len, const char *origin,
                        bpn_event *ev, uint64_t *id);

/* 1 if the engine has a store in sync durability mode. */
int bpn_delivery_sync_store(const bpn_delivery *d);

/* Waits until the delivery with this id has been written to the store
 * (committed, or the write failed and was logged) or timeout_ms passes.
 * Returns 1 if so. Without a store: 1 at once. Blocks: call without the
 * GIL. */
int bpn_delivery_wait_stored(bpn_delivery *d, uint64_t id, int64_t timeout_ms);

/* Replaces the signing keys (rotation). Returns 0 or BPN_ENOMEM. */
int bpn_delivery_set_keys(bpn_delivery *d, const bpn_key *keys, size_t n);

/* Tickets: "everything submitted so far". ticket() is the id of the last
 * delivery submitted; a ticket is done once every delivery with an id up to
 * it is delivered or dead-lettered (deliveries submitted later do not
 * matter). While at least one watch is on, the thread publishes progress
 * and calls on_drained when it advances. */
uint64_t bpn_delivery_ticket(bpn_delivery *d);
int bpn_delivery_ticket_done(bpn_delivery *d, uint64_t ticket);
void bpn_delivery_watch(bpn_delivery *d, int on);

/* Waits until the ticket is done or timeout_ms passes (negative: no limit).
 * Returns 1 if done. Blocks: call without the GIL. */
int bpn_delivery_wait(bpn_delivery *d, uint64_t ticket, int64_t timeout_ms);
/* bpn_delivery_wait on a ticket taken now. */
int bpn_delivery_flush(bpn_delivery *d, int64_t timeout_ms);

/* Waits up to timeout_ms for pending deliveries, then stops the thread.
 * What is left is dead-lettered or, with a store, left pending there for
 * the next start. Blocks: call without the GIL. Idempotent. */
void bpn_delivery_close(bpn_delivery *d, int64_t timeout_ms);

void bpn_delivery_stats_get(bpn_delivery *d, bpn_delivery_stats *out);

/* Copies the dead letters, oldest first, into a new array (*out, *n).
 * Returns 0 or BPN_ENOMEM. Free with bpn_dead_letters_free. */
int bpn_delivery_dead_snapshot(bpn_delivery *d, bpn_dead_letter **out,
                               size_t *n);
void bpn_dead_letters_free(bpn_dead_letter *arr, size_t n);
/* Forgets every dead letter (and deletes them from the store). Returns 0,
 * or BPN_ECLOSED when the engine had a store and is closed. */
int bpn_delivery_clear_dead(bpn_delivery *d);

/* Moves the dead letters with these ids (all of them when ids is NULL)
 * back into the queue, at the end of their lanes, with their attempt count
 * and log reset and their webhook-id kept. Sets *count to how many were
 * requeued. Returns 0 or BPN_ECLOSED. Any thread. */
int bpn_delivery_redeliver(bpn_delivery *d, const uint64_t *ids, size_t nids,
                           size_t *count);

/* Log records produced by the thread, for the host to emit. has_logs is a
 * cheap unlocked hint; take_logs moves the records into a new array (*out,
 * *n; free() it) and returns 0 or BPN_ENOMEM (records are kept). */
int bpn_delivery_has_logs(bpn_delivery *d);
int bpn_delivery_take_logs(bpn_delivery *d, bpn_log_record **out, size_t *n);

/* Backoff before attempt n+1 after n failed attempts (n >= 1):
 * min(cap, base * 2^(n-1)) scaled by a jitter factor in [0.8, 1.2), then
 * capped again. rnd is any uniformly random 64-bit number. */
uint64_t bpn_backoff_ms(uint64_t base, uint32_t n, uint64_t cap, uint64_t rnd);

#endif
