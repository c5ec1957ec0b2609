/* A minimal loopback HTTP/1.1 webhook receiver for the ThreadSanitizer
 * driver: one accept thread, one thread per connection (libcurl keeps its
 * connections alive, so a few threads serve everything). Its threads run
 * under TSan too; it shares no memory with the core (only sockets) and its
 * own counters are relaxed atomics, so it adds no happens-before edges
 * between core threads.
 *
 * The path of the URL picks the answer:
 *   /ok      200
 *   /flaky   500 and 200 alternately (a global counter)
 *   /busy    503 with "Retry-After: 1" and 200 alternately
 *   /fail    500 always (retried, then dead-lettered)
 *   /gone    410 (dead-lettered at once)
 *   /slow    200 after 20 ms
 *   /big     200 with a 64 KiB body (cut by max_response_bytes)
 * Every request's X-Webhook-Signature is checked against the driver's
 * secrets (any of them: keys rotate while requests are in flight), and on
 * /ok the webhook-id numbers of each (engine prefix, job) must never go
 * down (per-lane order). */
#ifndef BPN_TSAN_RECEIVER_H
#define BPN_TSAN_RECEIVER_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

enum {
    RX_OK,
    RX_FLAKY,
    RX_BUSY,
    RX_FAIL,
    RX_GONE,
    RX_SLOW,
    RX_BIG,
    RX_OTHER,
    RX_PATHS
};

typedef struct {
    atomic_ullong requests;
    atomic_ullong by_path[RX_PATHS];
    atomic_ullong status_2xx, status_410, status_500, status_503;
    atomic_ullong bad_signature;   /* no secret of the driver signs it */
    atomic_ullong missing_headers; /* no signature, timestamp or webhook-id */
    atomic_ullong order_violation; /* /ok: a lane's webhook-id went down */
    atomic_ullong connections;
    atomic_ullong bad_requests; /* unparseable */
} rx_stats;

typedef struct receiver receiver;

/* Starts listening on 127.0.0.1 (ephemeral port). secrets: the blueprint
 * scheme keys any request may be signed with. Returns NULL on failure. */
receiver *rx_start(const char *const *secrets, size_t nsecrets);
int rx_port(const receiver *rx);
rx_stats *rx_stats_of(receiver *rx);
/* Stops accepting, ends every connection thread and joins them. */
void rx_stop(receiver *rx);

const char *rx_path_name(int path);

#endif
