#include "engine.h"

#include <stdio.h>
#include <stdlib.h>

static void on_drained(void *arg) {
    bpn_engine *e = arg;
    bpn_hub_signal_drained(&e->hub);
}

int bpn_engine_new(const bpn_engine_config *cfg, bpn_engine **out, char *err,
                   size_t errlen) {
    int rc;
    bpn_engine *e = calloc(1, sizeof(*e));
    *out = NULL;
    if (!e) {
        snprintf(err, errlen, "out of memory");
        return BPN_ENOMEM;
    }
    rc = bpn_hub_init(&e->hub, cfg->sse_capacity, cfg->max_channels,
                      cfg->retention_ms, cfg->clock_ids);
    if (rc != BPN_OK) {
        snprintf(err, errlen, "out of memory");
        free(e);
        return rc;
    }
    rc = bpn_delivery_new(&cfg->delivery, on_drained, e, &e->delivery, err,
                          errlen);
    if (rc != BPN_OK) {
        bpn_hub_fini(&e->hub);
        free(e);
        return rc;
    }
    e->fork_generation = bpn_fork_generation();
    *out = e;
    return BPN_OK;
}

static bpn_engine *abandoned;

void bpn_engine_abandon(bpn_engine *e) {
    e->abandoned_next = abandoned;
    abandoned = e;
}

int bpn_engine_forked(const bpn_engine *e) {
    return e->fork_generation != bpn_fork_generation();
}

void bpn_engine_free(bpn_engine *e) {
    if (!e || bpn_engine_forked(e)) return;
    bpn_hub_close(&e->hub);
    bpn_delivery_free(e->delivery);
    bpn_hub_fini(&e->hub);
    free(e);
}

int bpn_job_id_check(const char *id, size_t len, char *err, size_t errlen) {
    if (len == 0 || len > BPN_JOB_ID_MAX) {
        snprintf(err, errlen, "must be 1 to %d bytes of UTF-8, got %zu",
                 BPN_JOB_ID_MAX, len);
        return -1;
    }
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)id[i];
        if (c < 0x20 || c == 0x7f) {
            snprintf(err, errlen,
                     "must not contain control characters (found 0x%02x at "
                     "byte %zu)",
                     c, i);
            return -1;
        }
    }
    return 0;
}

int bpn_engine_notify(bpn_engine *e, const char *id, size_t len, int status,
                      const char *json, size_t json_len, const char *url,
                      size_t url_len, const char *origin, uint64_t *seq,
                      uint64_t *delivery) {
    int rc = BPN_OK;
    *delivery = 0;
    bpn_event *ev = bpn_event_new(status, json, json_len, id, len, url != NULL);
    if (!ev) return BPN_ENOMEM;
    bpn_hub_lock(&e->hub);
    if (e->hub.closed) {
        rc = BPN_ECLOSED;
        goto exit;
    }
    /* Publish first: the sequence number is set before another thread
     * can see the event. */
    bpn_hub_publish_locked(&e->hub, id, len, ev);
    *seq = ev->seq;
    if (url)
        rc = bpn_delivery_submit(e->delivery, id, len, url, url_len, origin, ev,
                                 delivery);
exit:
    bpn_hub_unlock(&e->hub);
    bpn_event_unref(ev);
    return rc;
}

void bpn_engine_close(bpn_engine *e, int64_t timeout_ms) {
    bpn_hub_close(&e->hub);
    bpn_delivery_close(e->delivery, timeout_ms);
}
