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
    bpn_map jobs;    /* job id -> bpn_job, live (non-terminal) jobs */
    size_t capacity; /* history ring size per job (sse_capacity) */
    size_t max_channels;
    int closed;
    bpn_waker *wakers; /* every waker, for drain signals and close */
} bpn_hub;

/* Returns 0 or BPN_ENOMEM. */
int bpn_hub_init(bpn_hub *hub, size_t capacity, size_t max_channels);
/* Frees the jobs still in the table. Subscribers and wakers must be gone. */
void bpn_hub_fini(bpn_hub *hub);

void bpn_hub_lock(bpn_hub *hub);
void bpn_hub_unlock(bpn_hub *hub);

/* Stores a fresh token for the job (creating its channel) and copies it to
 * token_out. Returns 0, BPN_ELIMIT, BPN_ECLOSED, BPN_ENOMEM or BPN_ESYS. */
int bpn_hub_register(bpn_hub *hub, const char *id, size_t len,
                     char token_out[BPN_TOKEN_HEX_LEN]);
/* Returns 1 if the job is live and has this token, in constant time. */
int bpn_hub_check_token(bpn_hub *hub, const char *id, size_t len,
                        const char *token, size_t token_len);
/* Number of live channels. */
size_t bpn_hub_active(bpn_hub *hub);

/* Appends ev to the job's history (if the job has a channel), assigns its
 * sequence number, marks the job's subscribers ready and, for a terminal
 * event, removes the job from the table. Takes a reference to ev when it
 * keeps it. */
void bpn_hub_publish_locked(bpn_hub *hub, const char *id, size_t len,
                            bpn_event *ev);

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

/* Subscribes to a job, creating its channel if needed. The cursor starts at
 * the next event. user is handed back by bpn_waker_take. Returns 0 and sets
 * *out, or BPN_ELIMIT, BPN_ECLOSED, BPN_ENOMEM. */
int bpn_sub_new(bpn_hub *hub, const char *id, size_t len, bpn_waker *w,
                void *user, bpn_sub **out);
/* Detaches and frees the subscriber. */
void bpn_sub_free(bpn_sub *s);

typedef struct {
    size_t n;         /* events written to out */
    uint64_t skipped; /* events lost to lag before out[0] */
    int ended;        /* no event will follow the ones returned */
} bpn_pull_result;

/* Copies up to max event references after the cursor into out (the caller
 * unrefs them) and advances the cursor. */
bpn_pull_result bpn_sub_pull(bpn_sub *s, bpn_event **out, size_t max);

#endif
