/* The engine behind one JobNotifier: the channel hub and the delivery
 * thread, composed so that an event gets its sequence number and its place
 * in its delivery lane in one critical section (SSE order == webhook
 * order). */
#ifndef BPN_ENGINE_H
#define BPN_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "channel.h"
#include "delivery.h"

typedef struct {
    bpn_delivery_config delivery;
    size_t sse_capacity;
    size_t max_channels;
    uint64_t retention_ms;
    int clock_ids; /* see bpn_hub_init */
} bpn_engine_config;

typedef struct {
    bpn_hub hub;
    bpn_delivery *delivery;
    unsigned fork_generation; /* at creation; see bpn_engine_forked */
    void *abandoned_next;     /* see bpn_engine_abandon */
} bpn_engine;

/* In a fork child, where a pre-fork engine must not be freed (its locks
 * may be held by threads that no longer exist, its sockets are shared with
 * the parent): keeps it reachable, on purpose, for the child's lifetime.
 * Call with the host's lock (the GIL) held. */
void bpn_engine_abandon(bpn_engine *e);

/* 1 if this process is a fork() child of the one that created the engine:
 * its delivery thread is gone and its locks may be in any state. */
int bpn_engine_forked(const bpn_engine *e);

/* Returns 0 and sets *out, or an error code with a message in err. */
int bpn_engine_new(const bpn_engine_config *cfg, bpn_engine **out, char *err,
                   size_t errlen);
/* Stops the delivery thread if needed and frees everything. Subscribers
 * and wakers must have been freed first. In a fork child it frees nothing
 * (the parent's threads and connections are not the child's to touch). */
void bpn_engine_free(bpn_engine *e);

/* Checks a job id: 1..256 bytes, no control characters. Returns 0, or -1
 * with the reason in err. */
int bpn_job_id_check(const char *id, size_t len, char *err, size_t errlen);

/* Publishes an event to the job's channel and, when url is not NULL,
 * queues its webhook delivery (origin from bpn_url_check). Sets *seq to the
 * event's id (0 when the job has no channel, unless the hub has clock ids)
 * and *delivery to
 * the delivery's id (0 without url). Returns 0, BPN_ECLOSED or BPN_ENOMEM.
 * Any thread; never blocks beyond the locks (with a store in sync mode the
 * caller then waits with bpn_delivery_wait_stored). */
int bpn_engine_notify(bpn_engine *e, const char *id, size_t len, int status,
                      const char *json, size_t json_len, const char *url,
                      size_t url_len, const char *origin, uint64_t *seq,
                      uint64_t *delivery);

/* Refuses new events, ends subscriptions, waits up to timeout_ms for
 * pending deliveries and dead-letters the rest. Blocks; idempotent. */
void bpn_engine_close(bpn_engine *e, int64_t timeout_ms);

#endif
