/* bpn_hub_ingest and the subscribers behind it: events published by other
 * processes arrive through Redis (the broker) with ids, aliases and "prev"
 * ids another process chose, in any order, duplicated or with gaps.
 *
 * Includes channel.c to see the rings. The input is a program for a clock-
 * ids hub (ring size 1..6, 1..3 live channels, three job ids): ingest
 * (small ids, so they collide, or any id up to 2^63-1), local publish,
 * subscribe (live, oldest, or after an id), pull (1..4 events), take the
 * waker, unsubscribe. After every step:
 *   - every ring holds its events in strictly increasing id order, at most
 *     the ring size, and the job's last id is its newest event's;
 *   - the hub's live count is its non-terminal jobs, within max_channels;
 *   - a subscriber gets events of its own job only, in strictly increasing
 *     id order (never a duplicate, never an older one after a newer one),
 *     and nothing more once a pull said the job ended;
 *   - no lost wake-up: a subscriber with an event to read is marked ready,
 *     or was handed to the loop (waker take) or is new, and has not pulled
 *     since (readers pull before they wait, and again while a pull comes
 *     back full);
 *   - no silent skip: an event a subscriber could read (in its job's ring,
 *     id above its cursor) stays readable until it is read or evicted from
 *     the ring. */
#include "../csrc/core/channel.c"
#include "fuzz_util.h"

#define MAX_SUBS 6
#define RING_MAX 6

static const char *const job_names[] = {"a", "b", "c"};

/* FUZZ_TRACE=1 prints each step (to read a saved input). */
static int tracing = -1;
#define TRACE(...)                                               \
    do {                                                         \
        if (tracing < 0) tracing = getenv("FUZZ_TRACE") != NULL; \
        if (tracing) fprintf(stderr, __VA_ARGS__);               \
    } while (0)

typedef struct {
    bpn_sub *s;
    int job;
    uint64_t last; /* id of the last event pulled */
    int ended;     /* a pull said nothing will follow */
    int notified;  /* handed to the loop by a take, not pulled since */
    size_t nowed;  /* events it could read after the previous step */
    uint64_t owed[RING_MAX];
    uint64_t pulled[4]; /* what the last pull returned (this step only) */
    size_t npulled;
} sub_model;

typedef struct {
    bpn_hub *hub;
    size_t live;
} count_arg;

static void check_job(bpn_map_node *node, void *arg) {
    count_arg *c = arg;
    bpn_job *job = BPN_CONTAINER_OF(node, bpn_job, node);
    CHECK(job->count <= c->hub->capacity, "ring over capacity");
    for (size_t i = 0; i < job->count; i++) {
        bpn_event *ev = ring_at(c->hub, job, i);
        CHECK(ev && ev->frame_len > 0, "empty slot %zu", i);
        if (i)
            CHECK(ring_at(c->hub, job, i - 1)->seq < ev->seq,
                  "ring out of order at %zu", i);
        CHECK(ev->json_len == 3 && ev->json[1] == job->id[0],
              "event of another job in the ring");
    }
    if (job->count)
        CHECK(job->last_id == ring_at(c->hub, job, job->count - 1)->seq,
              "last_id %llu, newest %llu", (unsigned long long)job->last_id,
              (unsigned long long)ring_at(c->hub, job, job->count - 1)->seq);
    if (!job->terminal) c->live++;
}

/* The events of sub's job it could read now (ids above its cursor). */
static size_t readable(bpn_hub *hub, bpn_sub *s, uint64_t *out) {
    size_t n = 0;
    for (size_t i = ring_after(hub, s->job, s->cursor); i < s->job->count; i++)
        out[n++] = ring_at(hub, s->job, i)->seq;
    return n;
}

static void take_one(void *user, void *arg) {
    (void)arg;
    ((sub_model *)user)->notified = 1;
}

static void check_subs(bpn_hub *hub, sub_model *subs) {
    for (int k = 0; k < MAX_SUBS; k++) {
        sub_model *m = &subs[k];
        if (!m->s) continue;
        uint64_t now[RING_MAX];
        bpn_hub_lock(hub);
        size_t n = readable(hub, m->s, now);
        int ready = m->s->ready;
        /* Every event owed before this step is still owed, read in it,
         * or gone from the ring. */
        for (size_t i = 0; i < m->nowed; i++) {
            uint64_t id = m->owed[i];
            int read = 0, still = 0;
            for (size_t j = 0; j < m->npulled; j++) read |= m->pulled[j] == id;
            for (size_t j = 0; j < n; j++) still |= now[j] == id;
            int held = m->s->job->count > 0 && ring_holds(hub, m->s->job, id);
            CHECK(read || still || !held,
                  "subscriber %d: event %llu, held in the ring, skipped "
                  "(cursor %llu)",
                  k, (unsigned long long)id, (unsigned long long)m->s->cursor);
        }
        bpn_hub_unlock(hub);
        if (n) CHECK(ready || m->notified, "subscriber %d: lost wake-up", k);
        memcpy(m->owed, now, n * sizeof(now[0]));
        m->nowed = n;
        m->npulled = 0;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > 2048) return 0;
    fuzz_in in = {data, size};
    size_t capacity = (size_t)(fuzz_u8(&in) % RING_MAX) + 1;
    size_t max_channels = (size_t)(fuzz_u8(&in) % 3) + 1;
    bpn_hub hub;
    CHECK(bpn_hub_init(&hub, capacity, max_channels, 3600 * 1000, 1) == 0,
          "init");
    bpn_waker *w = bpn_waker_new(&hub);
    CHECK(w, "waker");
    sub_model subs[MAX_SUBS];
    memset(subs, 0, sizeof(subs));

    while (in.n) {
        uint8_t op = fuzz_u8(&in);
        int j = (op >> 4) % 3;
        const char *job = job_names[j];
        char json[4] = {'"', job[0], '"', '\0'};
        switch (op % 7) {
            case 0:
            case 1: { /* ingest */
                uint8_t f = fuzz_u8(&in);
                uint64_t id = f & 0x80 ? fuzz_u64(&in) & INT64_MAX
                                       : (uint64_t)(fuzz_u8(&in) % 40);
                uint64_t alias = f & 0x40 ? fuzz_u8(&in) % 40 : 0;
                uint64_t prev = f & 0x20 ? fuzz_u8(&in) % 48 : 0;
                if (id == 0) id = 1; /* the binding refuses 0 */
                int status = f % BPN_STATUS_COUNT;
                bpn_event *ev = bpn_event_new(status, json, 3, job, 1, 0);
                CHECK(ev, "out of memory");
                int rc = bpn_hub_ingest(&hub, job, 1, ev, id, alias, prev);
                TRACE("ingest %s id %llu alias %llu prev %llu status %d: %d\n",
                      job, (unsigned long long)id, (unsigned long long)alias,
                      (unsigned long long)prev, status, rc);
                CHECK(rc == 0 || rc == 1 || rc == BPN_ELIMIT, "ingest %d", rc);
                bpn_event_unref(ev);
                break;
            }
            case 2: { /* local publish (clock ids) */
                uint8_t f = fuzz_u8(&in);
                bpn_event *ev =
                    bpn_event_new(f % BPN_STATUS_COUNT, json, 3, job, 1, 0);
                CHECK(ev, "out of memory");
                bpn_hub_lock(&hub);
                bpn_hub_publish_locked(&hub, job, 1, ev);
                bpn_hub_unlock(&hub);
                TRACE("publish %s status %d: id %llu\n", job,
                      f % BPN_STATUS_COUNT, (unsigned long long)ev->seq);
                bpn_event_unref(ev);
                break;
            }
            case 3: { /* subscribe */
                int k = fuzz_u8(&in) % MAX_SUBS;
                uint8_t f = fuzz_u8(&in);
                if (subs[k].s) break;
                int64_t from = f % 3 == 0   ? BPN_FROM_LIVE
                               : f % 3 == 1 ? BPN_FROM_OLDEST
                                            : (int64_t)(f % 40);
                bpn_sub *s = NULL;
                int rc =
                    bpn_sub_new(&hub, job, 1, NULL, 0, from, w, &subs[k], &s);
                CHECK(rc == 0 || rc == BPN_ELIMIT, "subscribe %d", rc);
                TRACE("subscriber %d to %s from %lld: %d\n", k, job,
                      (long long)from, rc);
                if (rc == 0) {
                    memset(&subs[k], 0, sizeof(subs[k]));
                    subs[k].s = s;
                    subs[k].job = j;
                    /* A new reader pulls before it first waits. */
                    subs[k].notified = 1;
                }
                break;
            }
            case 4: { /* pull */
                sub_model *m = &subs[fuzz_u8(&in) % MAX_SUBS];
                size_t max = (size_t)(fuzz_u8(&in) % 4) + 1;
                if (!m->s) break;
                bpn_event *out[4];
                bpn_pull_result r = bpn_sub_pull(m->s, out, max);
                TRACE(
                    "subscriber %d pulls %zu: %zu events (first %llu), "
                    "skipped %llu, ended %d\n",
                    (int)(m - subs), max, r.n,
                    r.n ? (unsigned long long)out[0]->seq : 0ULL,
                    (unsigned long long)r.skipped, r.ended);
                CHECK(r.n <= max, "pulled %zu of %zu", r.n, max);
                if (m->ended) CHECK(r.n == 0, "events after the end");
                for (size_t i = 0; i < r.n; i++) {
                    CHECK(out[i]->seq > m->last,
                          "event %llu after %llu (out of order or twice)",
                          (unsigned long long)out[i]->seq,
                          (unsigned long long)m->last);
                    CHECK(out[i]->json[1] == job_names[m->job][0],
                          "event of another job");
                    m->last = out[i]->seq;
                    m->pulled[m->npulled++] = out[i]->seq;
                    bpn_event_unref(out[i]);
                }
                if (r.ended) m->ended = 1;
                /* The loop pulls again while a pull comes back full. */
                if (r.n < max) m->notified = 0;
                break;
            }
            case 5: /* the loop wakes up */
                bpn_waker_take(w, take_one, NULL);
                TRACE("take\n");
                break;
            case 6: { /* unsubscribe */
                sub_model *m = &subs[fuzz_u8(&in) % MAX_SUBS];
                if (m->s) TRACE("subscriber %d leaves\n", (int)(m - subs));
                bpn_sub_free(m->s);
                memset(m, 0, sizeof(*m));
                break;
            }
        }
        count_arg c = {&hub, 0};
        bpn_hub_lock(&hub);
        bpn_map_each(&hub.jobs, check_job, &c);
        CHECK(c.live == hub.live, "live %zu, counted %zu", hub.live, c.live);
        CHECK(hub.live <= max_channels, "live %zu > %zu", hub.live,
              max_channels);
        bpn_hub_unlock(&hub);
        check_subs(&hub, subs);
    }
    for (int k = 0; k < MAX_SUBS; k++) bpn_sub_free(subs[k].s);
    bpn_waker_free(w);
    bpn_hub_fini(&hub);
    return 0;
}
