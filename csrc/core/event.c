#include "event.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

const char *const bpn_status_names[BPN_STATUS_COUNT] = {
    "queued", "processing", "completed", "failed", "cancelled",
};

/* "id: " + 20 digits + "\nevent: " + longest status + "\ndata: " + "\n\n" */
#define FRAME_OVERHEAD (4 + 20 + 8 + 10 + 7 + 2)

static const char payload_head[] = "{\"job_id\":\"";
static const char payload_mid[] = "\",\"event\":";

/* Number of bytes job_id takes as the inside of a JSON string. */
static size_t escaped_len(const char *s, size_t n) {
    size_t out = n;
    for (size_t i = 0; i < n; i++)
        if (s[i] == '"' || s[i] == '\\') out++;
    return out;
}

static char *escape_into(char *dst, const char *s, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '"' || s[i] == '\\') *dst++ = '\\';
        *dst++ = s[i];
    }
    return dst;
}

bpn_event *bpn_event_new(int status, const char *json, size_t json_len,
                         const char *job_id, size_t job_len, int with_payload) {
    size_t payload_len = 0;
    if (with_payload)
        payload_len = sizeof(payload_head) - 1 + escaped_len(job_id, job_len) +
                      sizeof(payload_mid) - 1 + json_len + 1;
    size_t frame_cap = FRAME_OVERHEAD + json_len + 1;
    bpn_event *ev =
        malloc(sizeof(*ev) + json_len + 1 + payload_len + 1 + frame_cap);
    if (!ev) return NULL;
    atomic_init(&ev->refs, 1);
    ev->status = status;
    ev->seq = 0;
    char *p = ev->data;
    memcpy(p, json, json_len);
    p[json_len] = '\0';
    ev->json = p;
    ev->json_len = json_len;
    p += json_len + 1;
    ev->payload = NULL;
    ev->payload_len = 0;
    ev->frame = p + (with_payload ? payload_len + 1 : 0);
    ev->frame_len = 0;
    if (with_payload) {
        char *q = p;
        memcpy(q, payload_head, sizeof(payload_head) - 1);
        q += sizeof(payload_head) - 1;
        q = escape_into(q, job_id, job_len);
        memcpy(q, payload_mid, sizeof(payload_mid) - 1);
        q += sizeof(payload_mid) - 1;
        memcpy(q, json, json_len);
        q += json_len;
        *q++ = '}';
        *q = '\0';
        ev->payload = p;
        ev->payload_len = payload_len;
    }
    return ev;
}

bpn_event *bpn_event_from_payload(const char *payload, size_t len) {
    bpn_event *ev = malloc(sizeof(*ev) + 1 + len + 1);
    if (!ev) return NULL;
    atomic_init(&ev->refs, 1);
    ev->status = 0;
    ev->seq = 0;
    ev->data[0] = '\0';
    ev->json = ev->data;
    ev->json_len = 0;
    memcpy(ev->data + 1, payload, len);
    ev->data[1 + len] = '\0';
    ev->payload = ev->data + 1;
    ev->payload_len = len;
    ev->frame = NULL;
    ev->frame_len = 0;
    return ev;
}

/* Appends s (n bytes) at p; returns the end. */
static char *put(char *p, const char *s, size_t n) {
    memcpy(p, s, n);
    return p + n;
}

void bpn_event_set_seq(bpn_event *ev, uint64_t seq) {
    /* Hand-formatted (snprintf was half of notify()'s native cost). The
     * JSON is compact (no raw newlines), so one data: line carries it. */
    char digits[20], *p = ev->frame;
    size_t nd = 0;
    uint64_t v = seq;
    do {
        digits[sizeof(digits) - ++nd] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    const char *name = bpn_status_names[ev->status];
    p = put(p, "id: ", 4);
    p = put(p, digits + sizeof(digits) - nd, nd);
    p = put(p, "\nevent: ", 8);
    p = put(p, name, strlen(name));
    p = put(p, "\ndata: ", 7);
    p = put(p, ev->json, ev->json_len);
    p = put(p, "\n\n", 2);
    ev->frame_len = (size_t)(p - ev->frame);
    ev->seq = seq;
}

bpn_event *bpn_event_ref(bpn_event *ev) {
    atomic_fetch_add_explicit(&ev->refs, 1, memory_order_relaxed);
    return ev;
}

void bpn_event_unref(bpn_event *ev) {
    if (ev &&
        atomic_fetch_sub_explicit(&ev->refs, 1, memory_order_acq_rel) == 1)
        free(ev);
}
