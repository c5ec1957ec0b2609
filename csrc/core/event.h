/* An event, built once by notify() and shared by the job's history ring,
 * its subscribers and its webhook delivery. Immutable after creation;
 * reference-counted with atomics so any thread may drop a reference. */
#ifndef BPN_EVENT_H
#define BPN_EVENT_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

/* SSE "event:" names, by status. */
extern const char *const bpn_status_names[];

typedef struct bpn_event {
    atomic_uint refs;
    int status;
    uint64_t seq;     /* per-job sequence number, 0 if the job has no channel */
    const char *json; /* the JobEvent JSON */
    size_t json_len;
    const char *payload; /* {"job_id":..,"event":..} or NULL */
    size_t payload_len;
    char *frame;      /* "id: N\nevent: S\ndata: JSON\n\n", set at publish */
    size_t frame_len; /* 0 until published to a channel */
    char data[];
} bpn_event;

/* Returns a new event with one reference, or NULL when out of memory. The
 * webhook payload is built only when with_payload is set. job_id must hold
 * no control characters (validated by the caller). */
bpn_event *bpn_event_new(int status, const char *json, size_t json_len,
                         const char *job_id, size_t job_len, int with_payload);
/* An event that only carries a webhook payload (a delivery read back from
 * the store). Returns it with one reference, or NULL. */
bpn_event *bpn_event_from_payload(const char *payload, size_t len);
/* Assigns the sequence number and renders the SSE frame into the space
 * reserved for it. Called once, by the channel, before anyone else sees ev. */
void bpn_event_set_seq(bpn_event *ev, uint64_t seq);
bpn_event *bpn_event_ref(bpn_event *ev);
void bpn_event_unref(bpn_event *ev);

#endif
