/* The durable outbox: one SQLite file (WAL) holding every webhook delivery
 * that is pending, dead-lettered or recently delivered. Opened on the
 * caller's thread (so a bad path fails at construction), then used by the
 * delivery thread alone; closed after that thread is joined. One process
 * and one notifier at a time: an flock on "<path>-lock" is held while the
 * store is open.
 *
 * Writes go into one open transaction, started by the first write after a
 * commit; bpn_store_commit ends it. What is committed survives kill -9 and
 * power loss (synchronous=FULL: the WAL is fsynced at each commit). */
#ifndef BPN_STORE_H
#define BPN_STORE_H

#include <stddef.h>
#include <stdint.h>

#include "delivery.h"
#include "url.h"

typedef struct bpn_store bpn_store;

/* Row states. */
enum { BPN_ROW_PENDING = 0, BPN_ROW_DELIVERED = 1, BPN_ROW_DEAD = 2 };

/* One row, as read back by bpn_store_load (borrowed: valid during the
 * callback only). */
typedef struct {
    uint64_t id;
    int state;
    const char *msg_id;
    const char *job_id;
    size_t job_len;
    const char *url;
    const char *origin;
    const char *payload;
    size_t payload_len;
    uint32_t attempts;
    int64_t due_ms; /* wall clock ms of the next attempt, 0: at once */
    double done_at; /* wall clock seconds (dead letters) */
    const char *last_error;
    const bpn_attempt *log;
    uint32_t nlog;
} bpn_stored;

/* 1 if a row read back holds what notify() would have accepted (job id,
 * webhook-id, URL; job id and URL valid UTF-8): the file may have been damaged
 * or edited, and these end up in request headers and the request line. Writes
 * the URL's origin, recomputed, into origin. Pure: no database involved. */
int bpn_store_row_valid(const bpn_stored *r, char origin[BPN_ORIGIN_MAX]);

/* Opens (creating if needed) the store at path, checks it (lock, format,
 * integrity, writability) and prunes delivered rows older than
 * keep_delivered_ms. Returns 0 and sets *out; else BPN_ELOCKED,
 * BPN_ESTORE or BPN_ENOMEM with a message naming the path in err. */
int bpn_store_open(const char *path, uint64_t keep_delivered_ms,
                   bpn_store **out, char *err, size_t errlen);
/* Commits what is open, closes the database and releases the lock. */
void bpn_store_close(bpn_store *s);

/* The store's webhook-id prefix (16 hex chars, fixed at creation) and the
 * highest delivery id it has ever handed out. */
const char *bpn_store_prefix(const bpn_store *s);
uint64_t bpn_store_last_id(const bpn_store *s);
const char *bpn_store_path(const bpn_store *s);

/* Calls cb for every pending row in id order, then every dead row oldest
 * first. A non-zero return from cb stops and is returned. Errors: BPN_ESTORE
 * (message in err). */
int bpn_store_load(bpn_store *s, int (*cb)(void *arg, const bpn_stored *row),
                   void *arg, char *err, size_t errlen);

/* Writes. Each returns 0, or -1 with the reason in bpn_store_error(s). */
int bpn_store_insert(bpn_store *s, uint64_t id, const char *msg_id,
                     const char *job_id, size_t job_len, const char *url,
                     size_t url_len, const char *origin, const char *payload,
                     size_t payload_len);
/* A dead letter back in the queue under a new id, attempts reset. */
int bpn_store_requeue(bpn_store *s, uint64_t old_id, uint64_t new_id);
/* A failed attempt that will be retried at due_ms (wall clock). */
int bpn_store_retry(bpn_store *s, uint64_t id, uint32_t attempts,
                    int64_t due_ms, const char *last_error,
                    const bpn_attempt *log, uint32_t nlog);
int bpn_store_delivered(bpn_store *s, uint64_t id, uint32_t attempts);
int bpn_store_dead(bpn_store *s, uint64_t id, uint32_t attempts, double done_at,
                   const char *last_error, const bpn_attempt *log,
                   uint32_t nlog);
int bpn_store_delete(bpn_store *s, uint64_t id);
/* Deletes up to `limit` delivered rows past their retention. Returns the
 * number deleted or -1. */
int bpn_store_prune(bpn_store *s, int limit);

/* 1 while a transaction is open; when it was opened (monotonic ms). */
int bpn_store_dirty(const bpn_store *s);
uint64_t bpn_store_dirty_since(const bpn_store *s);
/* Records last_id and commits the open transaction (if any). Returns 0 or
 * -1 (the transaction is rolled back). */
int bpn_store_commit(bpn_store *s, uint64_t last_id);
const char *bpn_store_error(const bpn_store *s);

#endif
