/* Per-job channels: the job table, each job's token and history ring, its
 * subscribers (cursors into the ring) and the wakers that tell an event
 * loop which subscribers have something to read.
 *
 * One mutex (hub->mu) guards everything here. Functions named *_locked
 * expect the caller to hold it; the others take it themselves. No function
 * here blocks beyond that mutex or calls out while holding it, except the
 * take callback of bpn_waker_take, which must not call back into the hub. */
#ifndef BPN_CHANNEL_H
#define BPN_CHANNEL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "common.h"
#include "event.h"
#include "map.h"

typedef struct bpn_job bpn_job;
typedef struct bpn_sub bpn_sub;
typedef struct bpn_waker bpn_waker;

typedef struct bpn_hub {
    pthread_mutex_t mu;
    bpn_map jobs;        /* job id -> bpn_job: live and retained jobs */
    size_t live;         /* jobs without a terminal event */
    size_t capacity;     /* history ring size per job (sse_capacity) */
    size_t max_channels; /* cap of live jobs, and of retained jobs */
    uint64_t retention_ms;
    int clock_ids;    /* ids from the clock (see bpn_hub_init) */
    uint64_t last_id; /* clock mode: the newest id handed out or ingested */
    bpn_job *retained_head, *retained_tail; /* terminal jobs, oldest first */
    size_t retained;
    size_t subscribers;
    int closed;
    bpn_waker *wakers; /* every waker, for drain signals and close */
} bpn_hub;

/* Returns 0 or BPN_ENOMEM. Terminal jobs keep their history and token for
 * retention_ms (0: dropped at once).
 *
 * Event ids. By default a job's events are numbered 1, 2, 3... and only
 * events of a job with a channel get one. With clock_ids (several
 * processes share the jobs, see the broker) every event gets an id, from
 * the wall clock in microseconds, strictly increasing across the hub and
 * above every id ingested from elsewhere: ids are unique and ordered across
 * processes without asking anyone, and not consecutive. */
int bpn_hub_init(bpn_hub *hub, size_t capacity, size_t max_channels,
                 uint64_t retention_ms, int clock_ids);
/* Frees the jobs still in the table. Subscribers and wakers must be gone. */
void bpn_hub_fini(bpn_hub *hub);

void bpn_hub_lock(bpn_hub *hub);
void bpn_hub_unlock(bpn_hub *hub);

/* Stores a fresh token for the job (creating its channel; a retained
 * terminal job of that id is replaced by a new one) and copies it to
 * token_out. Returns 0, BPN_ELIMIT, BPN_ECLOSED, BPN_ENOMEM or BPN_ESYS. */
int bpn_hub_register(bpn_hub *hub, const char *id, size_t len,
                     char token_out[BPN_TOKEN_HEX_LEN]);
/* Returns 1 if the job is live or retained and has this token; the
 * comparison is constant time. */
int bpn_hub_check_token(bpn_hub *hub, const char *id, size_t len,
                        const char *token, size_t token_len);
/* Number of live (non-terminal) channels. Frees expired retained jobs. */
size_t bpn_hub_active(bpn_hub *hub);
/* Number of subscribers attached. */
size_t bpn_hub_subscribers(bpn_hub *hub);

/* Appends ev to the job's history (if the job has a live channel), assigns
 * its sequence number and SSE frame, and marks the job's subscribers ready.
 * A terminal event ends the job: it is retained (history and token) for
 * retention_ms, then freed. Events after the terminal one are not kept.
 * Takes a reference to ev when it keeps it. */
void bpn_hub_publish_locked(bpn_hub *hub, const char *id, size_t len,
                            bpn_event *ev);

/* Adds an event published elsewhere (another process) with its id: at its
 * place by id in the job's ring, creating the channel if needed. Ignored
 * (0) when the ring holds that id (or alias, when not 0: the id this
 * process gave the event before the broker renumbered it) already, when it is
 * older than what the ring dropped, or when the job has ended. Returns 1 when
 * added, 0 when ignored, or BPN_ELIMIT, BPN_ECLOSED, BPN_ENOMEM. */
int bpn_hub_ingest(bpn_hub *hub, const char *id, size_t len, bpn_event *ev,
                   uint64_t event_id, uint64_t alias, uint64_t prev);

/* Marks the hub closed and wakes every subscriber so it sees the end. */
void bpn_hub_close(bpn_hub *hub);

/* ---- wakers ------------------------------------------------------------ */

/* Returns a waker with its own eventfd, or NULL (errno set). */
bpn_waker *bpn_waker_new(bpn_hub *hub);
/* Unregisters and frees the waker; its subscribers must be gone. */
void bpn_waker_free(bpn_waker *w);
int bpn_waker_fd(const bpn_waker *w);
/* Asks for (or stops asking for) a wake-up when deliveries drain. */
void bpn_waker_want_drain(bpn_waker *w, int on);
/* Clears the eventfd, then calls fn(user) for every ready subscriber under
 * the lock (fn must not call into the hub) and returns 1 if a drain signal
 * was pending, else 0. */
int bpn_waker_take(bpn_waker *w, void (*fn)(void *user, void *arg), void *arg);
/* Signals every waker that asked for drain signals (takes the lock). */
void bpn_hub_signal_drained(bpn_hub *hub);

/* ---- subscribers ------------------------------------------------------- */

/* Where a new subscriber's cursor starts. */
#define BPN_FROM_LIVE   (-1) /* the next event published */
#define BPN_FROM_OLDEST (-2) /* the job's first event (lag if not retained) */

/* Subscribes to a job. With a token (an SSE client), the job must exist
 * (live or retained) and hold that token, checked in the same critical
 * section, else BPN_EAUTH; no channel is created. Without one, the channel
 * is created if needed. from is BPN_FROM_LIVE, BPN_FROM_OLDEST, or a
 * sequence number already seen (Last-Event-ID): the cursor starts after it
 * (without clock ids, at most at the next event). user is handed back by
 * bpn_waker_take. Returns 0 and sets *out, or BPN_EAUTH, BPN_ELIMIT,
 * BPN_ECLOSED, BPN_ENOMEM. */
int bpn_sub_new(bpn_hub *hub, const char *id, size_t len, const char *token,
                size_t token_len, int64_t from, bpn_waker *w, void *user,
                bpn_sub **out);
/* Detaches and frees the subscriber. */
void bpn_sub_free(bpn_sub *s);

typedef struct {
    size_t n;         /* events written to out */
    uint64_t skipped; /* events lost to lag before out[0] */
    int ended;        /* no event will follow the ones returned */
} bpn_pull_result;

/* Drops retained jobs whose time is up. Any thread. */
void bpn_hub_sweep(bpn_hub *hub);

/* Copies up to max event references after the cursor into out (the caller
 * unrefs them) and advances the cursor. */
bpn_pull_result bpn_sub_pull(bpn_sub *s, bpn_event **out, size_t max);

/* Like bpn_sub_pull, but stops once the events taken hold max_bytes of SSE
 * frames or more (at least one event is taken when there is one). */
bpn_pull_result bpn_sub_pull_bytes(bpn_sub *s, bpn_event **out, size_t max,
                                   size_t max_bytes);

#endif
