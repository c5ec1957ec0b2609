#include "channel.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "token.h"

struct bpn_job {
    bpn_map_node node;
    unsigned refs; /* the table's and each subscriber's */
    int in_table;
    int has_token;
    int terminal;
    char token[BPN_TOKEN_HEX_LEN];
    uint64_t last_id;     /* id of the newest event held (0: none yet) */
    uint64_t evicted;     /* events pushed out of the ring */
    uint64_t evicted_max; /* the newest id pushed out (0: none) */
    size_t head;          /* ring index of the oldest event */
    size_t count;         /* events held in the ring */
    bpn_event **ring;     /* hub->capacity slots, ids increasing from head */
    bpn_sub *subs;
    uint64_t expires_ms; /* when retained: end of retention */
    bpn_job *rnext;      /* in the hub's retained FIFO */
    size_t id_len;
    char id[];
};

struct bpn_sub {
    bpn_sub *prev, *next;   /* the job's subscribers */
    bpn_sub *rprev, *rnext; /* the waker's ready list */
    int ready;
    bpn_job *job;
    bpn_waker *waker;
    uint64_t cursor; /* id of the last event read (or skipped) */
    uint64_t start;  /* the cursor at creation: older events are not ours */
    uint64_t lost;   /* events skipped since the last pull (lag) */
    void *user;
};

struct bpn_waker {
    bpn_waker *prev, *next;
    bpn_hub *hub;
    int fd;
    int armed; /* the eventfd has been written since last take */
    int want_drain;
    int drained;
    bpn_sub *ready_head, *ready_tail;
};

/* ---- hub ---------------------------------------------------------------- */

int bpn_hub_init(bpn_hub *hub, size_t capacity, size_t max_channels,
                 uint64_t retention_ms, int clock_ids) {
    memset(hub, 0, sizeof(*hub));
    hub->clock_ids = clock_ids;
    hub->capacity = capacity ? capacity : 1;
    hub->max_channels = max_channels;
    hub->retention_ms = retention_ms;
    if (bpn_map_init(&hub->jobs) < 0) return BPN_ENOMEM;
    if (pthread_mutex_init(&hub->mu, NULL) != 0) {
        bpn_map_fini(&hub->jobs);
        return BPN_ENOMEM;
    }
    return BPN_OK;
}

static void job_free(bpn_hub *hub, bpn_job *job) {
    for (size_t i = 0; i < job->count; i++)
        bpn_event_unref(job->ring[(job->head + i) % hub->capacity]);
    free(job->ring);
    free(job);
}

static void job_unref(bpn_hub *hub, bpn_job *job) {
    if (--job->refs == 0) job_free(hub, job);
}

static void free_job_node(bpn_map_node *node, void *arg) {
    bpn_job *job = BPN_CONTAINER_OF(node, bpn_job, node);
    job_unref(arg, job);
}

void bpn_hub_fini(bpn_hub *hub) {
    bpn_map_each(&hub->jobs, free_job_node, hub);
    bpn_map_fini(&hub->jobs);
    pthread_mutex_destroy(&hub->mu);
}

void bpn_hub_lock(bpn_hub *hub) {
    pthread_mutex_lock(&hub->mu);
}
void bpn_hub_unlock(bpn_hub *hub) {
    pthread_mutex_unlock(&hub->mu);
}

static bpn_job *find_job(bpn_hub *hub, const char *id, size_t len) {
    bpn_map_node *n = bpn_map_get(&hub->jobs, id, len);
    return n ? BPN_CONTAINER_OF(n, bpn_job, node) : NULL;
}

/* Removes a job from the table (subscribers may still hold it). */
static void drop_from_table(bpn_hub *hub, bpn_job *job) {
    bpn_map_remove(&hub->jobs, &job->node);
    job->in_table = 0;
    job->has_token = 0;
    job_unref(hub, job);
}

/* Unlinks the oldest retained job and drops it from the table. */
static void drop_oldest_retained(bpn_hub *hub) {
    bpn_job *job = hub->retained_head;
    hub->retained_head = job->rnext;
    if (!hub->retained_head) hub->retained_tail = NULL;
    job->rnext = NULL;
    hub->retained--;
    drop_from_table(hub, job);
}

/* Unlinks a retained job from anywhere in the FIFO and drops it. */
static void drop_retained(bpn_hub *hub, bpn_job *job) {
    bpn_job **p = &hub->retained_head, *prev = NULL;
    while (*p && *p != job) {
        prev = *p;
        p = &(*p)->rnext;
    }
    if (!*p) return;
    *p = job->rnext;
    if (hub->retained_tail == job) hub->retained_tail = prev;
    job->rnext = NULL;
    hub->retained--;
    drop_from_table(hub, job);
}

static void sweep_locked(bpn_hub *hub) {
    if (!hub->retained_head) return;
    uint64_t now = bpn_now_ms();
    while (hub->retained_head && hub->retained_head->expires_ms <= now)
        drop_oldest_retained(hub);
}

void bpn_hub_sweep(bpn_hub *hub) {
    bpn_hub_lock(hub);
    sweep_locked(hub);
    bpn_hub_unlock(hub);
}

/* A terminal job: keep its history and token for the retention period. */
static void retain_locked(bpn_hub *hub, bpn_job *job) {
    hub->live--;
    if (hub->retention_ms == 0) {
        drop_from_table(hub, job);
        return;
    }
    job->expires_ms = bpn_now_ms() + hub->retention_ms;
    job->rnext = NULL;
    if (hub->retained_tail)
        hub->retained_tail->rnext = job;
    else
        hub->retained_head = job;
    hub->retained_tail = job;
    hub->retained++;
    if (hub->retained > hub->max_channels) drop_oldest_retained(hub);
}

/* Returns the job's live channel, creating it (a retained terminal job of
 * the same id gives way to the new one); NULL with *err set on failure. */
static bpn_job *get_or_create_job(bpn_hub *hub, const char *id, size_t len,
                                  int *err) {
    bpn_job *job = find_job(hub, id, len);
    if (job && !job->terminal) return job;
    if (hub->closed) {
        *err = BPN_ECLOSED;
        return NULL;
    }
    if (hub->live >= hub->max_channels) {
        *err = BPN_ELIMIT;
        return NULL;
    }
    bpn_job *fresh = calloc(1, sizeof(*fresh) + len + 1);
    if (!fresh) goto nomem;
    fresh->ring = calloc(hub->capacity, sizeof(*fresh->ring));
    if (!fresh->ring) goto nomem;
    if (job) drop_retained(hub, job);
    memcpy(fresh->id, id, len);
    fresh->id_len = len;
    fresh->refs = 1;
    fresh->in_table = 1;
    fresh->node.key = fresh->id;
    fresh->node.klen = len;
    bpn_map_insert(&hub->jobs, &fresh->node);
    hub->live++;
    return fresh;
nomem:
    free(fresh);
    *err = BPN_ENOMEM;
    return NULL;
}

int bpn_hub_register(bpn_hub *hub, const char *id, size_t len,
                     char token_out[BPN_TOKEN_HEX_LEN]) {
    int err = BPN_OK;
    char token[BPN_TOKEN_HEX_LEN];
    if (bpn_token_new(token) < 0) return BPN_ESYS;
    bpn_hub_lock(hub);
    sweep_locked(hub);
    bpn_job *job = get_or_create_job(hub, id, len, &err);
    if (job) {
        memcpy(job->token, token, sizeof(token));
        job->has_token = 1;
        memcpy(token_out, token, sizeof(token));
    }
    bpn_hub_unlock(hub);
    return err;
}

/* Returns 1 if the job holds this token. Caller holds the lock. */
static int token_ok_locked(bpn_job *job, const char *token, size_t token_len) {
    return job && job->has_token &&
           bpn_token_equal(job->token, token, token_len);
}

int bpn_hub_check_token(bpn_hub *hub, const char *id, size_t len,
                        const char *token, size_t token_len) {
    bpn_hub_lock(hub);
    sweep_locked(hub);
    int ok = token_ok_locked(find_job(hub, id, len), token, token_len);
    bpn_hub_unlock(hub);
    return ok;
}

size_t bpn_hub_active(bpn_hub *hub) {
    bpn_hub_lock(hub);
    sweep_locked(hub);
    size_t n = hub->live;
    bpn_hub_unlock(hub);
    return n;
}

/* ---- wakers ------------------------------------------------------------- */

static void waker_signal_locked(bpn_waker *w) {
    if (w->armed) return;
    w->armed = 1;
    uint64_t one = 1;
    /* EAGAIN means the counter is already non-zero: the loop will wake. */
    ssize_t rc = write(w->fd, &one, sizeof(one));
    (void)rc;
}

static void mark_ready_locked(bpn_sub *s) {
    if (s->ready) return;
    bpn_waker *w = s->waker;
    s->ready = 1;
    s->rnext = NULL;
    s->rprev = w->ready_tail;
    if (w->ready_tail)
        w->ready_tail->rnext = s;
    else
        w->ready_head = s;
    w->ready_tail = s;
    waker_signal_locked(w);
}

static void unmark_ready_locked(bpn_sub *s) {
    if (!s->ready) return;
    bpn_waker *w = s->waker;
    if (s->rprev)
        s->rprev->rnext = s->rnext;
    else
        w->ready_head = s->rnext;
    if (s->rnext)
        s->rnext->rprev = s->rprev;
    else
        w->ready_tail = s->rprev;
    s->rprev = s->rnext = NULL;
    s->ready = 0;
}

bpn_waker *bpn_waker_new(bpn_hub *hub) {
    bpn_waker *w = calloc(1, sizeof(*w));
    if (!w) {
        errno = ENOMEM;
        return NULL;
    }
    w->fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (w->fd < 0) {
        free(w);
        return NULL;
    }
    w->hub = hub;
    bpn_hub_lock(hub);
    w->next = hub->wakers;
    if (hub->wakers) hub->wakers->prev = w;
    hub->wakers = w;
    bpn_hub_unlock(hub);
    return w;
}

void bpn_waker_free(bpn_waker *w) {
    if (!w) return;
    bpn_hub *hub = w->hub;
    bpn_hub_lock(hub);
    if (w->prev)
        w->prev->next = w->next;
    else
        hub->wakers = w->next;
    if (w->next) w->next->prev = w->prev;
    bpn_hub_unlock(hub);
    close(w->fd);
    free(w);
}

int bpn_waker_fd(const bpn_waker *w) {
    return w->fd;
}

void bpn_waker_want_drain(bpn_waker *w, int on) {
    bpn_hub_lock(w->hub);
    w->want_drain = on;
    if (!on) w->drained = 0;
    bpn_hub_unlock(w->hub);
}

int bpn_waker_take(bpn_waker *w, void (*fn)(void *user, void *arg), void *arg) {
    uint64_t value;
    ssize_t rc = read(w->fd, &value, sizeof(value));
    (void)rc;
    bpn_hub_lock(w->hub);
    w->armed = 0;
    bpn_sub *s = w->ready_head;
    while (s) {
        bpn_sub *next = s->rnext;
        s->ready = 0;
        s->rprev = s->rnext = NULL;
        fn(s->user, arg);
        s = next;
    }
    w->ready_head = w->ready_tail = NULL;
    int drained = w->drained;
    w->drained = 0;
    bpn_hub_unlock(w->hub);
    return drained;
}

void bpn_hub_signal_drained(bpn_hub *hub) {
    bpn_hub_lock(hub);
    for (bpn_waker *w = hub->wakers; w; w = w->next) {
        if (!w->want_drain) continue;
        w->drained = 1;
        waker_signal_locked(w);
    }
    bpn_hub_unlock(hub);
}

size_t bpn_hub_subscribers(bpn_hub *hub) {
    bpn_hub_lock(hub);
    size_t n = hub->subscribers;
    bpn_hub_unlock(hub);
    return n;
}

/* ---- publish ------------------------------------------------------------ */

/* The next id of clock mode: microseconds since the epoch, strictly above
 * every id this hub has handed out or ingested. */
static uint64_t clock_id_locked(bpn_hub *hub) {
    uint64_t id = bpn_now_realtime_us();
    if (id <= hub->last_id) id = hub->last_id + 1;
    hub->last_id = id;
    return id;
}

static bpn_event *ring_at(const bpn_hub *hub, const bpn_job *job, size_t i) {
    return job->ring[(job->head + i) % hub->capacity];
}

/* Index (0..count) of the first event held with an id above `after`. */
static size_t ring_after(const bpn_hub *hub, const bpn_job *job,
                         uint64_t after) {
    size_t lo = 0, hi = job->count;
    if (hi == 0 || ring_at(hub, job, hi - 1)->seq <= after) return hi;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (ring_at(hub, job, mid)->seq <= after)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Counts the event with this id as lost for every subscriber that had not
 * read it yet (it is being evicted, or never made it into the ring). */
static void lose_locked(bpn_job *job, uint64_t id) {
    for (bpn_sub *s = job->subs; s; s = s->next) {
        if (s->cursor < id) {
            s->lost++;
            s->cursor = id;
        }
    }
    job->evicted++;
    if (id > job->evicted_max) job->evicted_max = id;
}

/* Counts events that never reached this process, up to id (dropped from
 * the shared history before we read them), as lost for every subscriber
 * that had not read that far. Unlike lose_locked the cursors stay where
 * they are: the events the ring holds below id are still there to read.
 * Those missing events are not taken in later (evicted_max). */
static void gap_locked(bpn_job *job, uint64_t id) {
    for (bpn_sub *s = job->subs; s; s = s->next)
        if (s->cursor < id) s->lost++;
    job->evicted++;
    if (id > job->evicted_max) job->evicted_max = id;
}

static void evict_oldest_locked(bpn_hub *hub, bpn_job *job) {
    bpn_event *old = job->ring[job->head];
    lose_locked(job, old->seq);
    bpn_event_unref(old);
    job->ring[job->head] = NULL;
    job->head = (job->head + 1) % hub->capacity;
    job->count--;
}

/* Puts ev (its id set, above the job's last) at the end of the ring. */
static void append_locked(bpn_hub *hub, bpn_job *job, bpn_event *ev) {
    if (job->count == hub->capacity) evict_oldest_locked(hub, job);
    job->ring[(job->head + job->count) % hub->capacity] = bpn_event_ref(ev);
    job->count++;
    job->last_id = ev->seq;
    for (bpn_sub *s = job->subs; s; s = s->next) mark_ready_locked(s);
    if (BPN_STATUS_IS_TERMINAL(ev->status)) {
        job->terminal = 1;
        retain_locked(hub, job);
    }
}

void bpn_hub_publish_locked(bpn_hub *hub, const char *id, size_t len,
                            bpn_event *ev) {
    sweep_locked(hub);
    bpn_job *job = find_job(hub, id, len);
    int live = job && !job->terminal;
    if (hub->clock_ids)
        bpn_event_set_seq(ev, clock_id_locked(hub));
    else if (live)
        bpn_event_set_seq(ev, job->last_id + 1);
    if (live) append_locked(hub, job, ev);
}

/* Inserts ev (id set, older than the job's newest, not held yet) at its
 * place by id. */
static void insert_locked(bpn_hub *hub, bpn_job *job, bpn_event *ev,
                          size_t pos) {
    size_t cap = hub->capacity;
    if (job->count == cap) {
        if (pos == 0) { /* older than all the ring holds: lost at once */
            lose_locked(job, ev->seq);
            return;
        }
        evict_oldest_locked(hub, job);
        pos--;
    }
    for (size_t i = job->count; i > pos; i--)
        job->ring[(job->head + i) % cap] = job->ring[(job->head + i - 1) % cap];
    job->ring[(job->head + pos) % cap] = bpn_event_ref(ev);
    job->count++;
    for (bpn_sub *s = job->subs; s; s = s->next) {
        if (s->cursor < ev->seq) {
            mark_ready_locked(s);
        } else if (s->start < ev->seq) {
            /* It came too late for this subscriber, which read past its
             * place (another process's event, delayed): say so. */
            s->lost++;
            mark_ready_locked(s);
        }
    }
}

/* 1 if the job's ring holds an event with this id. */
static int ring_holds(const bpn_hub *hub, const bpn_job *job, uint64_t id) {
    size_t pos = ring_after(hub, job, id - 1);
    return pos < job->count && ring_at(hub, job, pos)->seq == id;
}

int bpn_hub_ingest(bpn_hub *hub, const char *id, size_t len, bpn_event *ev,
                   uint64_t event_id, uint64_t alias, uint64_t prev) {
    int rc = 0;
    bpn_hub_lock(hub);
    sweep_locked(hub);
    if (event_id > hub->last_id) hub->last_id = event_id;
    bpn_job *job = find_job(hub, id, len);
    /* Nothing follows a terminal event; an older event still goes before
     * it (it was delayed on its way). */
    if (job && job->terminal && event_id > job->last_id) goto exit;
    if (!job) job = get_or_create_job(hub, id, len, &rc);
    if (!job) goto exit;
    if (ring_holds(hub, job, event_id) ||
        (alias && ring_holds(hub, job, alias)))
        goto exit; /* held already (our own event, or a replay) */
    if (job->evicted && event_id <= job->evicted_max)
        goto exit; /* older than what the ring dropped: seen and gone */
    if (prev > job->last_id && prev < event_id)
        /* The event before it never reached us: dropped from the shared
         * history meanwhile. Readers before it lagged (by at least one). */
        gap_locked(job, prev);
    size_t pos = ring_after(hub, job, event_id);
    bpn_event_set_seq(ev, event_id);
    if (pos == job->count)
        append_locked(hub, job, ev);
    else
        insert_locked(hub, job, ev, pos);
    rc = 1;
exit:
    bpn_hub_unlock(hub);
    return rc;
}

static void wake_job_subs(bpn_map_node *node, void *arg) {
    (void)arg;
    bpn_job *job = BPN_CONTAINER_OF(node, bpn_job, node);
    for (bpn_sub *s = job->subs; s; s = s->next) mark_ready_locked(s);
}

void bpn_hub_close(bpn_hub *hub) {
    bpn_hub_lock(hub);
    hub->closed = 1;
    bpn_map_each(&hub->jobs, wake_job_subs, NULL);
    bpn_hub_unlock(hub);
}

/* ---- subscribers -------------------------------------------------------- */

int bpn_sub_new(bpn_hub *hub, const char *id, size_t len, const char *token,
                size_t token_len, int64_t from, bpn_waker *w, void *user,
                bpn_sub **out) {
    int err = BPN_OK;
    bpn_job *job;
    bpn_sub *s = calloc(1, sizeof(*s));
    if (!s) return BPN_ENOMEM;
    bpn_hub_lock(hub);
    sweep_locked(hub);
    if (token) {
        job = find_job(hub, id, len);
        if (!token_ok_locked(job, token, token_len)) {
            err = BPN_EAUTH;
            goto exit;
        }
        if (hub->closed) {
            err = BPN_ECLOSED;
            goto exit;
        }
    } else {
        /* Resuming reads a retained job to its end; a live subscription to
         * a finished job starts the id's next lifecycle. */
        job = find_job(hub, id, len);
        if (!job || !job->terminal || from == BPN_FROM_LIVE)
            job = get_or_create_job(hub, id, len, &err);
        if (!job) goto exit;
    }
    job->refs++;
    s->job = job;
    s->waker = w;
    s->user = user;
    if (from == BPN_FROM_LIVE) {
        /* Clock mode: whatever is published from now on has a later id,
         * also events of other processes that are still on their way. */
        s->cursor = job->last_id;
        if (hub->clock_ids) {
            uint64_t now = bpn_now_realtime_us();
            if (now > s->cursor) s->cursor = now;
        }
        s->start = s->cursor;
    } else if (from < 0) {
        s->cursor = 0;
        s->lost = job->evicted;
    } else {
        s->cursor = (uint64_t)from;
        if (!hub->clock_ids && s->cursor > job->last_id)
            s->cursor = job->last_id; /* a future id: from the next event */
        s->start = s->cursor;
        if (s->cursor < job->evicted_max)
            /* Ids are consecutive without clock mode; with it, how many
             * were dropped after `from` is not known: at least one. */
            s->lost = hub->clock_ids ? 1 : job->evicted_max - s->cursor;
    }
    s->next = job->subs;
    if (job->subs) job->subs->prev = s;
    job->subs = s;
    hub->subscribers++;
exit:
    bpn_hub_unlock(hub);
    if (err != BPN_OK) {
        free(s);
        s = NULL;
    }
    *out = s;
    return err;
}

void bpn_sub_free(bpn_sub *s) {
    if (!s) return;
    bpn_hub *hub = s->waker->hub;
    bpn_hub_lock(hub);
    unmark_ready_locked(s);
    bpn_job *job = s->job;
    if (s->prev)
        s->prev->next = s->next;
    else
        job->subs = s->next;
    if (s->next) s->next->prev = s->prev;
    hub->subscribers--;
    if (job->in_table && !job->subs && !job->has_token && !job->terminal &&
        job->count == 0 && job->evicted == 0) {
        /* A channel made by subscribing, that never held anything: it
         * goes with its last subscriber instead of counting as live
         * forever (max_channels). */
        hub->live--;
        job->refs--; /* the subscriber's; the table's goes next */
        drop_from_table(hub, job);
    } else {
        job_unref(hub, job);
    }
    bpn_hub_unlock(hub);
    free(s);
}

bpn_pull_result bpn_sub_pull(bpn_sub *s, bpn_event **out, size_t max) {
    return bpn_sub_pull_bytes(s, out, max, SIZE_MAX);
}

bpn_pull_result bpn_sub_pull_bytes(bpn_sub *s, bpn_event **out, size_t max,
                                   size_t max_bytes) {
    bpn_pull_result r = {0, 0, 0};
    size_t bytes = 0;
    bpn_hub *hub = s->waker->hub;
    bpn_hub_lock(hub);
    bpn_job *job = s->job;
    r.skipped = s->lost;
    s->lost = 0;
    size_t pos = ring_after(hub, job, s->cursor);
    while (r.n < max && bytes < max_bytes && pos < job->count) {
        bpn_event *ev = ring_at(hub, job, pos++);
        bytes += ev->frame_len;
        out[r.n++] = bpn_event_ref(ev);
    }
    if (r.n) s->cursor = out[r.n - 1]->seq;
    r.ended = pos == job->count && (job->terminal || hub->closed);
    bpn_hub_unlock(hub);
    return r;
}
