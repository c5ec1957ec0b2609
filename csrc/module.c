/* blueprint_notify._core: the CPython binding of the C core.
 *
 * Heap types, module state, multi-phase init. Core error codes become
 * Python exceptions here and nowhere else. The binding calls the core with
 * the GIL held, except around waits (flush, close), which release it. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <netinet/in.h>

#include "core/channel.h"
#include "core/common.h"
#include "core/engine.h"
#include "core/netguard.h"
#include "core/sign.h"
#include "core/url.h"

#define ERRLEN 256
/* Longest wait done without checking for signals (Ctrl-C), in ms. */
#define WAIT_SLICE_MS 100

typedef struct {
    PyTypeObject *engine_type;
    PyTypeObject *waker_type;
    PyTypeObject *subscriber_type;
    PyObject *channel_limit_error;
    PyObject *store_error;
    PyObject *store_locked_error;
    /* JobEvent's field names, interned (notify_plain reads them). */
    PyObject *str_status, *str_progress, *str_result, *str_error,
        *str_timestamp;
} module_state;

static struct PyModuleDef core_module;

static inline module_state *get_state(PyObject *module) {
    return (module_state *)PyModule_GetState(module);
}

static module_state *state_of_type(PyTypeObject *tp) {
    PyObject *m = PyType_GetModuleByDef(tp, &core_module);
    return m ? get_state(m) : NULL;
}

typedef struct {
    PyObject_HEAD bpn_engine *e;
    PyObject *log_sink; /* callable(list[(level, msg)]) */
    int closed;
} EngineObject;

typedef struct {
    PyObject_HEAD bpn_waker *w;
    EngineObject *engine;
    PyObject *on_drained;
    Py_ssize_t nsubs; /* subscribers attached; bounds a dispatch batch */
} WakerObject;

typedef struct {
    PyObject_HEAD bpn_sub *s;
    WakerObject *waker;
    PyObject *on_ready;
    PyObject *job_id;
} SubscriberObject;

#define ENGINE_CAST(o)     ((EngineObject *)(o))
#define WAKER_CAST(o)      ((WakerObject *)(o))
#define SUBSCRIBER_CAST(o) ((SubscriberObject *)(o))

/* ---- argument helpers ---------------------------------------------------- */

/* Returns 1 if min <= nargs <= max, else 0 with a TypeError. */
static int check_nargs(const char *name, Py_ssize_t nargs, Py_ssize_t min,
                       Py_ssize_t max) {
    if (nargs >= min && nargs <= max) return 1;
    PyErr_Format(PyExc_TypeError, "%s() takes %zd to %zd arguments (%zd given)",
                 name, min, max, nargs);
    return 0;
}

/* Borrows the UTF-8 of a str argument, raising TypeError naming the field. */
static int get_str(PyObject *o, const char *field, const char **s,
                   Py_ssize_t *n) {
    if (!PyUnicode_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be str, not %.100s", field,
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    *s = PyUnicode_AsUTF8AndSize(o, n);
    if (!*s && PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError,
                     "%s must be valid Unicode text (it contains a lone "
                     "surrogate, which has no UTF-8 form)",
                     field);
    }
    return *s ? 0 : -1;
}

/* Borrows a validated job id (TypeError / ValueError naming job_id). */
static int get_job_id(PyObject *o, const char **s, Py_ssize_t *n) {
    char err[ERRLEN];
    if (get_str(o, "job_id", s, n) < 0) return -1;
    if (bpn_job_id_check(*s, (size_t)*n, err, sizeof(err)) < 0) {
        PyErr_Format(PyExc_ValueError, "job_id %s", err);
        return -1;
    }
    return 0;
}

/* Converts None or a non-negative number of seconds to milliseconds (-1 for
 * None). Returns 0 or -1 with an exception. */
static int get_timeout_ms(PyObject *o, int64_t *ms) {
    if (o == Py_None) {
        *ms = -1;
        return 0;
    }
    double secs = PyFloat_AsDouble(o);
    if (secs == -1.0 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_SetString(PyExc_ValueError,
                            "timeout must be at most 1e9 seconds (None: no "
                            "limit)");
            return -1;
        }
        PyErr_Format(PyExc_TypeError, "timeout must be a number or None");
        return -1;
    }
    if (!(secs >= 0.0) || secs > 1e9) {
        PyErr_SetString(PyExc_ValueError,
                        "timeout must be a non-negative number of seconds, at "
                        "most 1e9 (None: no limit)");
        return -1;
    }
    *ms = (int64_t)(secs * 1000.0 + 0.5);
    return 0;
}

/* Raises the exception for a core error code; returns NULL. */
static PyObject *raise_core_error(int rc, PyTypeObject *tp) {
    module_state *st;
    switch (rc) {
        case BPN_ENOMEM: return PyErr_NoMemory();
        case BPN_ECLOSED:
            PyErr_SetString(PyExc_RuntimeError, "notifier is closed");
            return NULL;
        case BPN_ELIMIT:
            st = state_of_type(tp);
            if (st)
                PyErr_SetString(st->channel_limit_error,
                                "channel limit reached (max_channels live "
                                "channels exist and this job has none)");
            return NULL;
        case BPN_ESYS: return PyErr_SetFromErrno(PyExc_OSError);
        case BPN_EAUTH:
            PyErr_SetString(PyExc_PermissionError,
                            "unknown job or wrong token");
            return NULL;
        default:
            PyErr_SetString(PyExc_RuntimeError, bpn_strerror(rc));
            return NULL;
    }
}

/* Returns 1 if the engine may be used here, else 0 with RuntimeError: in a
 * fork() child the parent's notifier has no delivery thread. */
static int engine_usable(EngineObject *self) {
    if (!bpn_engine_forked(self->e)) return 1;
    PyErr_SetString(PyExc_RuntimeError,
                    "this JobNotifier was created before os.fork() and cannot "
                    "be used in the child process; create a new JobNotifier "
                    "in the child (e.g. in gunicorn's post_fork hook)");
    return 0;
}

#define REQUIRE_USABLE(self)                   \
    do {                                       \
        if (!engine_usable(self)) return NULL; \
    } while (0)

/* ---- logs ---------------------------------------------------------------- */

/* Hands the delivery thread's log records to the Python sink. Never raises:
 * a failing sink is reported as unraisable. */
static void pump_logs(EngineObject *self) {
    bpn_log_record *recs = NULL;
    size_t n = 0;
    PyObject *list = NULL, *res = NULL;
    if (!self->e || !self->log_sink || bpn_engine_forked(self->e) ||
        !bpn_delivery_has_logs(self->e->delivery))
        return;
    if (bpn_delivery_take_logs(self->e->delivery, &recs, &n) != BPN_OK) return;
    list = PyList_New((Py_ssize_t)n);
    if (!list) goto error;
    for (size_t i = 0; i < n; i++) {
        PyObject *msg =
            PyUnicode_DecodeUTF8(recs[i].msg, strlen(recs[i].msg), "replace");
        PyObject *item = msg ? Py_BuildValue("(iN)", recs[i].level, msg) : NULL;
        if (!item) goto error;
        PyList_SET_ITEM(list, (Py_ssize_t)i, item);
    }
    res = PyObject_CallOneArg(self->log_sink, list);
    if (!res) goto error;
    goto exit;
error:
    PyErr_WriteUnraisable(self->log_sink);
exit:
    Py_XDECREF(res);
    Py_XDECREF(list);
    free(recs);
}

/* ---- Engine -------------------------------------------------------------- */

/* O& converter: None stays NULL, else a file system path as bytes. */
static int fs_path_or_none(PyObject *o, void *out) {
    if (o == Py_None) {
        *(PyObject **)out = NULL;
        return 1;
    }
    return PyUnicode_FSConverter(o, out);
}

static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    EngineObject *self = NULL;
    static char *kwlist[] = {"signing_secret",
                             "max_retries",
                             "retry_base_ms",
                             "max_retry_delay_ms",
                             "timeout_ms",
                             "sse_capacity",
                             "max_channels",
                             "max_dead_letters",
                             "allow_private_networks",
                             "max_connections",
                             "max_connections_per_host",
                             "max_response_bytes",
                             "user_agent",
                             "log_sink",
                             "retention_ms",
                             "standard_key",
                             "schemes",
                             "store_path",
                             "store_sync",
                             "keep_delivered_ms",
                             "clock_ids",
                             NULL};
    const char *secret = "", *user_agent = "blueprint-notify";
    const char *std_key = NULL;
    Py_ssize_t secret_len = 0, std_key_len = 0;
    int schemes = BPN_SCHEME_BLUEPRINT | BPN_SCHEME_STANDARD;
    unsigned long long max_retries = 3, base = 1000, max_delay = 300000,
                       timeout = 10000, retention = 300000;
    Py_ssize_t capacity = 16, max_channels = 10000, max_dead = 1000,
               max_body = 65536;
    int allow_private = 0;
    unsigned int max_conns = 64, max_host = 8;
    PyObject *log_sink = Py_None, *store_path = NULL;
    int store_sync = 0;
    unsigned long long keep_delivered = 3600000;
    int clock_ids = 0;
    char err[ERRLEN];
    if (!PyArg_ParseTupleAndKeywords(
            args, kw, "|$y#KKKKnnnpIInsOKy#iO&pKp", kwlist, &secret,
            &secret_len, &max_retries, &base, &max_delay, &timeout, &capacity,
            &max_channels, &max_dead, &allow_private, &max_conns, &max_host,
            &max_body, &user_agent, &log_sink, &retention, &std_key,
            &std_key_len, &schemes, fs_path_or_none, &store_path, &store_sync,
            &keep_delivered, &clock_ids))
        return NULL;
    if (capacity < 1 || max_channels < 0 || max_dead < 0 || max_body < 0 ||
        max_conns < 1 || max_host < 1 || max_retries > UINT32_MAX ||
        timeout < 1) {
        PyErr_SetString(PyExc_ValueError, "engine option out of range");
        goto error;
    }
    if (log_sink != Py_None && !PyCallable_Check(log_sink)) {
        PyErr_SetString(PyExc_TypeError, "log_sink must be callable or None");
        goto error;
    }
    if (schemes < 1 || schemes > 3) {
        PyErr_SetString(PyExc_ValueError, "schemes out of range");
        goto error;
    }
    bpn_key key = {
        .key = (const uint8_t *)secret,
        .key_len = (size_t)secret_len,
        .std_key = (const uint8_t *)(std_key ? std_key : secret),
        .std_key_len = (size_t)(std_key ? std_key_len : secret_len),
        .expires_s = 0,
    };
    bpn_engine_config cfg = {
        .delivery =
            {
                .keys = &key,
                .nkeys = 1,
                .schemes = schemes,
                .max_retries = (uint32_t)max_retries,
                .retry_base_ms = base,
                .max_retry_delay_ms = max_delay,
                .timeout_ms = timeout,
                .max_dead_letters = (size_t)max_dead,
                .allow_private_networks = allow_private,
                .max_connections = max_conns,
                .max_connections_per_host = max_host,
                .max_response_bytes = (size_t)max_body,
                .user_agent = user_agent,
                .store_path = store_path ? PyBytes_AS_STRING(store_path) : NULL,
                .store_sync = store_sync,
                .keep_delivered_ms = keep_delivered,
            },
        .sse_capacity = (size_t)capacity,
        .max_channels = (size_t)max_channels,
        .retention_ms = retention,
        .clock_ids = clock_ids,
    };
    module_state *st = state_of_type(type);
    if (!st) goto error;
    self = (EngineObject *)type->tp_alloc(type, 0);
    if (!self) goto error;
    int rc;
    /* Opening the store reads it back: no Python needed meanwhile. */
    Py_BEGIN_ALLOW_THREADS
        rc = bpn_engine_new(&cfg, &self->e, err, sizeof(err));
    Py_END_ALLOW_THREADS
    if (rc != BPN_OK) {
        Py_CLEAR(self);
        if (rc == BPN_ENOMEM)
            PyErr_NoMemory();
        else if (rc == BPN_ELOCKED)
            PyErr_SetString(st->store_locked_error, err);
        else if (rc == BPN_ESTORE)
            PyErr_SetString(st->store_error, err);
        else
            PyErr_Format(PyExc_OSError, "could not start the notifier: %s",
                         err);
        goto error;
    }
    if (log_sink != Py_None) self->log_sink = Py_NewRef(log_sink);
error:
    Py_XDECREF(store_path);
    return (PyObject *)self;
}

static int Engine_traverse(PyObject *op, visitproc visit, void *arg) {
    Py_VISIT(Py_TYPE(op));
    Py_VISIT(ENGINE_CAST(op)->log_sink);
    return 0;
}

static int Engine_clear(PyObject *op) {
    Py_CLEAR(ENGINE_CAST(op)->log_sink);
    return 0;
}

static void Engine_dealloc(PyObject *op) {
    EngineObject *self = ENGINE_CAST(op);
    PyTypeObject *tp = Py_TYPE(op);
    PyObject_GC_UnTrack(op);
    if (self->e && bpn_engine_forked(self->e)) {
        bpn_engine_abandon(self->e); /* the parent's: not ours to free */
        self->e = NULL;
    }
    if (self->e && !self->closed) {
        /* Never closed: dead-letter what is pending and log it, so nothing
         * vanishes without a trace. */
        bpn_engine *e = self->e;
        Py_BEGIN_ALLOW_THREADS
            bpn_engine_close(e, 0);
        Py_END_ALLOW_THREADS
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        pump_logs(self);
        PyErr_Restore(et, ev, tb);
    }
    if (self->e) {
        bpn_engine *e = self->e;
        self->e = NULL;
        /* Joining the delivery thread needs no Python: let others run. */
        Py_BEGIN_ALLOW_THREADS
            bpn_engine_free(e);
        Py_END_ALLOW_THREADS
    }
    Engine_clear(op);
    tp->tp_free(op);
    Py_DECREF(tp);
}

static PyObject *Engine_register_job(PyObject *op, PyObject *job) {
    REQUIRE_USABLE(ENGINE_CAST(op));
    EngineObject *self = ENGINE_CAST(op);
    const char *id;
    Py_ssize_t len;
    char token[BPN_TOKEN_HEX_LEN];
    if (get_job_id(job, &id, &len) < 0) return NULL;
    int rc = bpn_hub_register(&self->e->hub, id, (size_t)len, token);
    if (rc != BPN_OK) return raise_core_error(rc, Py_TYPE(op));
    return PyUnicode_FromStringAndSize(token, BPN_TOKEN_HEX_LEN);
}

static PyObject *Engine_validate_job_token(PyObject *op, PyObject *const *args,
                                           Py_ssize_t nargs) {
    REQUIRE_USABLE(ENGINE_CAST(op));
    EngineObject *self = ENGINE_CAST(op);
    const char *id, *token;
    Py_ssize_t len, token_len;
    if (!check_nargs("validate_job_token", nargs, 2, 2)) return NULL;
    if (get_str(args[0], "job_id", &id, &len) < 0) return NULL;
    if (get_str(args[1], "token", &token, &token_len) < 0) return NULL;
    int ok = bpn_hub_check_token(&self->e->hub, id, (size_t)len, token,
                                 (size_t)token_len);
    return PyBool_FromLong(ok);
}

/* Publishes an event whose JSON is ready and, with a URL (None or str),
 * queues its webhook; in sync durability, returns once it is on disk.
 * Returns 0 with *seq set, or -1 with an exception. */
static int publish(EngineObject *self, PyObject *job, int status,
                   const char *json, size_t json_len, PyObject *url_obj,
                   uint64_t *seq) {
    const char *id, *url = NULL;
    Py_ssize_t len, url_len = 0;
    char origin[BPN_ORIGIN_MAX], err[ERRLEN];
    uint64_t delivery = 0;
    if (get_job_id(job, &id, &len) < 0) return -1;
    if (url_obj != Py_None) {
        if (get_str(url_obj, "webhook_url", &url, &url_len) < 0) return -1;
        if (bpn_url_check(url, (size_t)url_len, origin, err, sizeof(err)) < 0) {
            PyErr_Format(PyExc_ValueError, "webhook_url %s: %R", err, url_obj);
            return -1;
        }
    }
    int rc = bpn_engine_notify(self->e, id, (size_t)len, status, json, json_len,
                               url, (size_t)url_len, origin, seq, &delivery);
    if (rc != BPN_OK) {
        raise_core_error(rc, Py_TYPE(self));
        return -1;
    }
    if (delivery && bpn_delivery_sync_store(self->e->delivery)) {
        /* Sync durability: return once the delivery is on disk. */
        int ok = 0;
        while (!ok) {
            Py_BEGIN_ALLOW_THREADS
                ok = bpn_delivery_wait_stored(self->e->delivery, delivery,
                                              WAIT_SLICE_MS);
            Py_END_ALLOW_THREADS
            if (!ok && PyErr_CheckSignals() < 0) return -1;
        }
    }
    pump_logs(self);
    return 0;
}

/* notify(job_id, status, event_json, webhook_url) -> seq */
static PyObject *Engine_notify(PyObject *op, PyObject *const *args,
                               Py_ssize_t nargs) {
    REQUIRE_USABLE(ENGINE_CAST(op));
    uint64_t seq = 0;
    if (!check_nargs("notify", nargs, 4, 4)) return NULL;
    long status = PyLong_AsLong(args[1]);
    if (status == -1 && PyErr_Occurred()) return NULL;
    if (status < 0 || status >= BPN_STATUS_COUNT) {
        PyErr_SetString(PyExc_ValueError, "status code out of range");
        return NULL;
    }
    if (!PyBytes_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "event_json must be bytes");
        return NULL;
    }
    if (publish(ENGINE_CAST(op), args[0], (int)status,
                PyBytes_AS_STRING(args[2]), (size_t)PyBytes_GET_SIZE(args[2]),
                args[3], &seq) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(seq);
}

/* ingest(job_id, event_id, status, event_json, alias, prev) -> bool: an
 * event published through the broker, added to the job's channel at its
 * place by id; False when the channel holds it (or alias, if not 0) already
 * or the job has ended. prev: the id before it in the shared history (0:
 * none), see bpn_hub_ingest. */
static PyObject *Engine_ingest(PyObject *op, PyObject *const *args,
                               Py_ssize_t nargs) {
    REQUIRE_USABLE(ENGINE_CAST(op));
    EngineObject *self = ENGINE_CAST(op);
    const char *id;
    Py_ssize_t len;
    if (!check_nargs("ingest", nargs, 6, 6)) return NULL;
    if (get_job_id(args[0], &id, &len) < 0) return NULL;
    unsigned long long event_id = PyLong_AsUnsignedLongLong(args[1]);
    if (event_id == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    unsigned long long alias = PyLong_AsUnsignedLongLong(args[4]);
    if (alias == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    unsigned long long prev = PyLong_AsUnsignedLongLong(args[5]);
    if (prev == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    if (event_id == 0 || event_id > INT64_MAX || alias > INT64_MAX ||
        prev > INT64_MAX) {
        PyErr_SetString(PyExc_ValueError,
                        "event_id must be between 1 and 2**63-1");
        return NULL;
    }
    long status = PyLong_AsLong(args[2]);
    if (status == -1 && PyErr_Occurred()) return NULL;
    if (status < 0 || status >= BPN_STATUS_COUNT) {
        PyErr_SetString(PyExc_ValueError, "status code out of range");
        return NULL;
    }
    if (!PyBytes_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "event_json must be bytes");
        return NULL;
    }
    const char *json = PyBytes_AS_STRING(args[3]);
    size_t json_len = (size_t)PyBytes_GET_SIZE(args[3]);
    if (memchr(json, '\n', json_len) || memchr(json, '\r', json_len)) {
        /* One data: line per frame: a raw line break would split it. */
        PyErr_SetString(PyExc_ValueError,
                        "event_json must not contain line breaks");
        return NULL;
    }
    bpn_event *ev =
        bpn_event_new((int)status, json, json_len, id, (size_t)len, 0);
    if (!ev) return PyErr_NoMemory();
    int rc = bpn_hub_ingest(&self->e->hub, id, (size_t)len, ev, event_id, alias,
                            prev);
    bpn_event_unref(ev);
    if (rc < 0) return raise_core_error(rc, Py_TYPE(op));
    return PyBool_FromLong(rc);
}

/* Writes v in decimal at p; returns the end. */
static char *put_u64(char *p, uint64_t v) {
    char digits[20];
    size_t n = 0;
    do {
        digits[sizeof(digits) - ++n] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    memcpy(p, digits + sizeof(digits) - n, n);
    return p + n;
}

/* Reads an int field of a plain event: None (*has = 0) or an exact int in
 * [0, max]. Returns 0, or 1 when the field is not plain (borrowed o). */
static int plain_int(PyObject *o, unsigned long long max, int *has,
                     unsigned long long *v) {
    *has = 0;
    if (o == Py_None) return 0;
    if (!PyLong_CheckExact(o)) return 1;
    *v = PyLong_AsUnsignedLongLong(o);
    if (*v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 1;
    }
    *has = 1;
    return *v > max;
}

/* notify_plain(job_id, event, webhook_url, want_body) -> seq, (seq, body)
 * with want_body, or None when the event is not plain (a result or an
 * error, or fields of other types): the caller then encodes it itself. The
 * JSON is JobEvent.to_json()'s, formatted here. */
static PyObject *Engine_notify_plain(PyObject *op, PyObject *const *args,
                                     Py_ssize_t nargs) {
    REQUIRE_USABLE(ENGINE_CAST(op));
    module_state *st = state_of_type(Py_TYPE(op));
    PyObject *f[5] = {NULL, NULL, NULL, NULL, NULL}, *result = NULL;
    char json[96], *p = json;
    uint64_t seq = 0;
    int status = -1, has_progress, has_ts;
    unsigned long long progress = 0, ts = 0;
    if (!st || !check_nargs("notify_plain", nargs, 4, 4)) return NULL;
    PyObject *names[5] = {st->str_status, st->str_progress, st->str_result,
                          st->str_error, st->str_timestamp};
    for (int i = 0; i < 5; i++)
        if (!(f[i] = PyObject_GetAttr(args[1], names[i]))) goto exit;
    if (f[2] != Py_None || f[3] != Py_None || !PyUnicode_Check(f[0]) ||
        plain_int(f[1], 100, &has_progress, &progress) ||
        plain_int(f[4], (unsigned long long)INT64_MAX, &has_ts, &ts) ||
        !has_ts) {
        result = Py_NewRef(Py_None);
        goto exit;
    }
    Py_ssize_t nlen;
    const char *name = PyUnicode_AsUTF8AndSize(f[0], &nlen);
    if (!name) goto exit;
    for (int i = 0; i < BPN_STATUS_COUNT; i++)
        if ((size_t)nlen == strlen(bpn_status_names[i]) &&
            memcmp(name, bpn_status_names[i], (size_t)nlen) == 0)
            status = i;
    if (status < 0) {
        result = Py_NewRef(Py_None);
        goto exit;
    }
    memcpy(p, "{\"status\":\"", 11);
    p += 11;
    memcpy(p, name, (size_t)nlen);
    p += nlen;
    *p++ = '"';
    if (has_progress) {
        memcpy(p, ",\"progress\":", 12);
        p = put_u64(p + 12, progress);
    }
    memcpy(p, ",\"timestamp\":", 13);
    p = put_u64(p + 13, ts);
    *p++ = '}';
    if (publish(ENGINE_CAST(op), args[0], status, json, (size_t)(p - json),
                args[2], &seq) < 0)
        goto exit;
    int want_body = PyObject_IsTrue(args[3]);
    if (want_body < 0) goto exit;
    result = want_body ? Py_BuildValue("(Ky#)", (unsigned long long)seq, json,
                                       (Py_ssize_t)(p - json))
                       : PyLong_FromUnsignedLongLong(seq);
exit:
    for (int i = 0; i < 5; i++) Py_XDECREF(f[i]);
    return result;
}

static PyObject *Engine_active_channels(PyObject *op, PyObject *unused) {
    REQUIRE_USABLE(ENGINE_CAST(op));
    (void)unused;
    return PyLong_FromSize_t(bpn_hub_active(&ENGINE_CAST(op)->e->hub));
}

static PyObject *Engine_pending(PyObject *op, PyObject *unused) {
    REQUIRE_USABLE(ENGINE_CAST(op));
    bpn_delivery_stats st;
    (void)unused;
    bpn_delivery_stats_get(ENGINE_CAST(op)->e->delivery, &st);
    return PyLong_FromUnsignedLongLong(st.pending);
}

/* The value (ms) below which a fraction q of the latencies fall, from the
 * histogram (bucket midpoints), or 0 without data. */
static double latency_quantile(const bpn_delivery_stats *st, double q) {
    uint64_t total = 0;
    for (unsigned b = 0; b < BPN_LATENCY_BUCKETS; b++) total += st->latency[b];
    if (total == 0) return 0.0;
    uint64_t rank = (uint64_t)(q * (double)total);
    if (rank >= total) rank = total - 1;
    uint64_t seen = 0;
    for (unsigned b = 0; b < BPN_LATENCY_BUCKETS; b++) {
        seen += st->latency[b];
        if (seen > rank) {
            double lo = (double)bpn_latency_lower(b);
            double hi = (double)bpn_latency_lower(b + 1);
            return (lo + hi) / 2.0 / 1000.0;
        }
    }
    return 0.0;
}

static PyObject *Engine_stats(PyObject *op, PyObject *unused) {
    EngineObject *self = ENGINE_CAST(op);
    bpn_delivery_stats st;
    (void)unused;
    REQUIRE_USABLE(self);
    pump_logs(self);
    bpn_delivery_stats_get(self->e->delivery, &st);
    Py_ssize_t channels = (Py_ssize_t)bpn_hub_active(&self->e->hub);
    return Py_BuildValue(
        "{sKsKsKsKsKsKsKsKsKsKsnsnsnsdsdsdsdsKsKsKsK}", "enqueued",
        st.submitted, "submitted", st.submitted, "delivered", st.delivered,
        "retried", st.retried, "dead_lettered", st.dead_lettered,
        "dead_letters_evicted", st.evicted, "attempts", st.attempts,
        "failed_attempts", st.failed_attempts, "in_flight", st.in_flight,
        "pending", st.pending, "channels", channels, "active_channels",
        channels, "subscribers", (Py_ssize_t)bpn_hub_subscribers(&self->e->hub),
        "latency_p50_ms", latency_quantile(&st, 0.50), "latency_p90_ms",
        latency_quantile(&st, 0.90), "latency_p99_ms",
        latency_quantile(&st, 0.99), "latency_sum_ms",
        (double)st.latency_sum_us / 1000.0, "recovered", st.recovered,
        "left_in_store", st.left_in_store, "store_commits", st.store_commits,
        "store_errors", st.store_errors);
}

/* The attempt log as a list of (at, duration_ms, status, error). */
static PyObject *attempt_list(const bpn_attempt *log, uint32_t n) {
    PyObject *list = PyList_New((Py_ssize_t)n);
    if (!list) return NULL;
    for (uint32_t i = 0; i < n; i++) {
        PyObject *err =
            PyUnicode_DecodeUTF8(log[i].error, strlen(log[i].error), "replace");
        PyObject *item =
            err ? Py_BuildValue("(dIiN)", log[i].at, log[i].duration_ms,
                                log[i].status, err)
                : NULL;
        if (!item) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, item);
    }
    return list;
}

static PyObject *Engine_dead_letters(PyObject *op, PyObject *unused) {
    REQUIRE_USABLE(ENGINE_CAST(op));
    EngineObject *self = ENGINE_CAST(op);
    bpn_dead_letter *arr = NULL;
    size_t n = 0;
    PyObject *list = NULL;
    (void)unused;
    pump_logs(self);
    if (bpn_delivery_dead_snapshot(self->e->delivery, &arr, &n) != BPN_OK)
        return PyErr_NoMemory();
    list = PyList_New((Py_ssize_t)n);
    if (!list) goto exit;
    for (size_t i = 0; i < n; i++) {
        bpn_dead_letter *v = &arr[i];
        /* The error text may be cut inside a character (it is bounded), or
         * come damaged from the store: decoded leniently, like the log. */
        PyObject *last = PyUnicode_DecodeUTF8(
            v->last_error, (Py_ssize_t)strlen(v->last_error), "replace");
        PyObject *log = last ? attempt_list(v->log, v->nlog) : NULL;
        PyObject *item =
            log ? Py_BuildValue("(Ks#sINy#dsN)", (unsigned long long)v->id,
                                v->job_id, (Py_ssize_t)v->job_len, v->url,
                                (unsigned int)v->attempts, last, v->ev->payload,
                                (Py_ssize_t)v->ev->payload_len, v->failed_at,
                                v->msg_id, log)
                : NULL;
        if (!log) Py_XDECREF(last);
        if (!item) {
            Py_CLEAR(list);
            goto exit;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, item);
    }
exit:
    bpn_dead_letters_free(arr, n);
    return list;
}

/* redeliver(ids: sequence of int | None) -> number requeued */
static PyObject *Engine_redeliver(PyObject *op, PyObject *arg) {
    REQUIRE_USABLE(ENGINE_CAST(op));
    EngineObject *self = ENGINE_CAST(op);
    uint64_t *ids = NULL;
    Py_ssize_t n = 0;
    size_t count = 0;
    PyObject *seq = NULL, *result = NULL;
    if (arg != Py_None) {
        seq = PySequence_Fast(arg, "ids must be a sequence of ints");
        if (!seq) return NULL;
        n = PySequence_Fast_GET_SIZE(seq);
        ids = PyMem_Malloc(sizeof(*ids) * (size_t)(n ? n : 1));
        if (!ids) {
            PyErr_NoMemory();
            goto exit;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
            if (!PyLong_Check(item) || PyBool_Check(item)) {
                PyErr_SetString(PyExc_TypeError, "ids must be ints");
                goto exit;
            }
            ids[i] = PyLong_AsUnsignedLongLong(item);
            if (ids[i] == (uint64_t)-1 && PyErr_Occurred()) {
                PyErr_Clear();
                ids[i] = 0; /* negative or huge: matches no dead letter */
            }
        }
    }
    int rc = bpn_delivery_redeliver(
        self->e->delivery, arg == Py_None ? NULL : ids, (size_t)n, &count);
    if (rc != BPN_OK) {
        raise_core_error(rc, Py_TYPE(op));
        goto exit;
    }
    result = PyLong_FromSize_t(count);
exit:
    PyMem_Free(ids);
    Py_XDECREF(seq);
    return result;
}

/* set_keys([(key, std_key, expires_s), ...]): the first is current. */
static PyObject *Engine_set_keys(PyObject *op, PyObject *arg) {
    REQUIRE_USABLE(ENGINE_CAST(op));
    EngineObject *self = ENGINE_CAST(op);
    PyObject *seq = PySequence_Fast(arg, "keys must be a sequence");
    bpn_key *keys = NULL;
    PyObject *result = NULL;
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n < 1 || n > 8) {
        PyErr_SetString(PyExc_ValueError, "1 to 8 keys are needed");
        goto exit;
    }
    keys = PyMem_Calloc((size_t)n, sizeof(*keys));
    if (!keys) {
        PyErr_NoMemory();
        goto exit;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *k, *sk;
        Py_ssize_t klen, sklen;
        long long exp;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "y#y#L", &k,
                              &klen, &sk, &sklen, &exp))
            goto exit;
        keys[i] = (bpn_key){(const uint8_t *)k, (size_t)klen,
                            (const uint8_t *)sk, (size_t)sklen, (int64_t)exp};
    }
    int rc = bpn_delivery_set_keys(self->e->delivery, keys, (size_t)n);
    if (rc != BPN_OK) {
        raise_core_error(rc, Py_TYPE(op));
        goto exit;
    }
    result = Py_NewRef(Py_None);
exit:
    PyMem_Free(keys);
    Py_DECREF(seq);
    return result;
}

static PyObject *Engine_clear_dead_letters(PyObject *op, PyObject *unused) {
    REQUIRE_USABLE(ENGINE_CAST(op));
    (void)unused;
    int rc = bpn_delivery_clear_dead(ENGINE_CAST(op)->e->delivery);
    if (rc != BPN_OK) return raise_core_error(rc, Py_TYPE(op));
    Py_RETURN_NONE;
}

/* Waits until every delivery submitted before the call is finished,
 * releasing the GIL in slices so signals are seen. Returns 1 done, 0 timed
 * out, -1 with an exception. */
static int wait_drained(EngineObject *self, int64_t timeout_ms) {
    bpn_delivery *d = self->e->delivery;
    uint64_t ticket = bpn_delivery_ticket(d);
    uint64_t deadline =
        timeout_ms < 0 ? 0 : bpn_now_ms() + (uint64_t)timeout_ms;
    for (;;) {
        int64_t slice = WAIT_SLICE_MS;
        if (timeout_ms >= 0) {
            uint64_t now = bpn_now_ms();
            int64_t left = now >= deadline ? 0 : (int64_t)(deadline - now);
            if (left < slice) slice = left;
        }
        int ok;
        Py_BEGIN_ALLOW_THREADS
            ok = bpn_delivery_wait(d, ticket, slice);
        Py_END_ALLOW_THREADS
        if (ok) return 1;
        if (PyErr_CheckSignals() < 0) return -1;
        if (timeout_ms >= 0 && bpn_now_ms() >= deadline) return 0;
    }
}

static PyObject *Engine_flush(PyObject *op, PyObject *timeout) {
    REQUIRE_USABLE(ENGINE_CAST(op));
    EngineObject *self = ENGINE_CAST(op);
    int64_t ms;
    if (get_timeout_ms(timeout, &ms) < 0) return NULL;
    int ok = wait_drained(self, ms);
    pump_logs(self);
    if (ok < 0) return NULL;
    return PyBool_FromLong(ok);
}

static PyObject *Engine_close(PyObject *op, PyObject *timeout) {
    EngineObject *self = ENGINE_CAST(op);
    int64_t ms;
    if (get_timeout_ms(timeout, &ms) < 0) return NULL;
    if (self->closed || bpn_engine_forked(self->e)) Py_RETURN_NONE;
    self->closed = 1;
    bpn_hub_close(&self->e->hub); /* refuse new events, end subscriptions */
    int ok = wait_drained(self, ms);
    /* Even when interrupted, finish closing: nothing is left half-done. */
    Py_BEGIN_ALLOW_THREADS
        bpn_engine_close(self->e, 0);
    Py_END_ALLOW_THREADS
    pump_logs(self);
    if (ok < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *Engine_ticket(PyObject *op, PyObject *unused) {
    REQUIRE_USABLE(ENGINE_CAST(op));
    (void)unused;
    return PyLong_FromUnsignedLongLong(
        bpn_delivery_ticket(ENGINE_CAST(op)->e->delivery));
}

static PyObject *Engine_ticket_done(PyObject *op, PyObject *arg) {
    REQUIRE_USABLE(ENGINE_CAST(op));
    unsigned long long t = PyLong_AsUnsignedLongLong(arg);
    if (t == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    return PyBool_FromLong(
        bpn_delivery_ticket_done(ENGINE_CAST(op)->e->delivery, t));
}

static PyObject *Engine_watch(PyObject *op, PyObject *flag) {
    REQUIRE_USABLE(ENGINE_CAST(op));
    int on = PyObject_IsTrue(flag);
    if (on < 0) return NULL;
    bpn_delivery_watch(ENGINE_CAST(op)->e->delivery, on);
    Py_RETURN_NONE;
}

static PyObject *Engine_pump_logs(PyObject *op, PyObject *unused) {
    (void)unused;
    pump_logs(ENGINE_CAST(op));
    Py_RETURN_NONE;
}

static PyObject *Engine_get_closed(PyObject *op, void *closure) {
    (void)closure;
    EngineObject *self = ENGINE_CAST(op);
    return PyBool_FromLong(self->closed || bpn_engine_forked(self->e));
}

/* subscribe(job_id, waker, on_ready, token=None, after=-1) -> Subscriber
 * token: None (create the channel if needed) or the job's bearer token
 * (PermissionError if wrong or unknown job). after: -1 live, -2 from the
 * first event, or a sequence number already seen. */
static PyObject *Engine_subscribe(PyObject *op, PyObject *const *args,
                                  Py_ssize_t nargs) {
    REQUIRE_USABLE(ENGINE_CAST(op));
    EngineObject *self = ENGINE_CAST(op);
    module_state *st = state_of_type(Py_TYPE(op));
    const char *id, *token = NULL;
    Py_ssize_t len, token_len = 0;
    long long after = BPN_FROM_LIVE;
    if (!st) return NULL;
    if (!check_nargs("subscribe", nargs, 3, 5)) return NULL;
    if (get_job_id(args[0], &id, &len) < 0) return NULL;
    if (!PyObject_TypeCheck(args[1], st->waker_type)) {
        PyErr_SetString(PyExc_TypeError, "waker must be a Waker");
        return NULL;
    }
    WakerObject *waker = WAKER_CAST(args[1]);
    if (waker->engine != self || !waker->w) {
        PyErr_SetString(PyExc_ValueError,
                        "waker is closed or belongs to another engine");
        return NULL;
    }
    if (!PyCallable_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "on_ready must be callable");
        return NULL;
    }
    if (nargs > 3 && args[3] != Py_None &&
        get_str(args[3], "token", &token, &token_len) < 0)
        return NULL;
    if (nargs > 4) {
        after = PyLong_AsLongLong(args[4]);
        if (after == -1 && PyErr_Occurred()) return NULL;
        if (after < BPN_FROM_OLDEST) {
            PyErr_SetString(PyExc_ValueError, "after out of range");
            return NULL;
        }
    }
    SubscriberObject *sub =
        PyObject_GC_New(SubscriberObject, st->subscriber_type);
    if (!sub) return NULL;
    sub->s = NULL;
    sub->waker = (WakerObject *)Py_NewRef(waker);
    sub->on_ready = Py_NewRef(args[2]);
    sub->job_id = Py_NewRef(args[0]);
    int rc =
        bpn_sub_new(&self->e->hub, id, (size_t)len, token, (size_t)token_len,
                    (int64_t)after, waker->w, sub, &sub->s);
    if (rc != BPN_OK) {
        Py_DECREF(sub);
        return raise_core_error(rc, Py_TYPE(op));
    }
    waker->nsubs++;
    PyObject_GC_Track(sub);
    return (PyObject *)sub;
}

static PyObject *Engine_sweep(PyObject *op, PyObject *unused) {
    REQUIRE_USABLE(ENGINE_CAST(op));
    (void)unused;
    bpn_hub_sweep(&ENGINE_CAST(op)->e->hub);
    Py_RETURN_NONE;
}

static PyMethodDef Engine_methods[] = {
    {"register_job", Engine_register_job, METH_O,
     "register_job(job_id) -> token"},
    {"validate_job_token",
     (PyCFunction)(void (*)(void))Engine_validate_job_token, METH_FASTCALL,
     "validate_job_token(job_id, token) -> bool"},
    {"notify", (PyCFunction)(void (*)(void))Engine_notify, METH_FASTCALL,
     "notify(job_id, status, event_json, webhook_url) -> seq"},
    {"ingest", (PyCFunction)(void (*)(void))Engine_ingest, METH_FASTCALL,
     "ingest(job_id, event_id, status, event_json, alias, prev) -> bool"},
    {"notify_plain", (PyCFunction)(void (*)(void))Engine_notify_plain,
     METH_FASTCALL,
     "notify_plain(job_id, event, webhook_url, want_body) -> seq, (seq, "
     "body) or None (not a plain event)"},
    {"subscribe", (PyCFunction)(void (*)(void))Engine_subscribe, METH_FASTCALL,
     "subscribe(job_id, waker, on_ready, token=None, after=-1) -> Subscriber"},
    {"sweep", Engine_sweep, METH_NOARGS, "frees retained jobs past retention"},
    {"active_channels", Engine_active_channels, METH_NOARGS, NULL},
    {"pending", Engine_pending, METH_NOARGS, NULL},
    {"stats", Engine_stats, METH_NOARGS, NULL},
    {"dead_letters", Engine_dead_letters, METH_NOARGS, NULL},
    {"clear_dead_letters", Engine_clear_dead_letters, METH_NOARGS, NULL},
    {"redeliver", Engine_redeliver, METH_O,
     "redeliver(ids or None) -> number of dead letters requeued"},
    {"set_keys", Engine_set_keys, METH_O,
     "set_keys([(key, std_key, expires_s), ...]); the first is current"},
    {"flush", Engine_flush, METH_O, "flush(timeout) -> bool; releases the GIL"},
    {"close", Engine_close, METH_O, "close(timeout); releases the GIL"},
    {"pump_logs", Engine_pump_logs, METH_NOARGS, NULL},
    {"ticket", Engine_ticket, METH_NOARGS,
     "ticket() -> id of the last delivery submitted so far"},
    {"ticket_done", Engine_ticket_done, METH_O,
     "ticket_done(t) -> every delivery up to t is finished"},
    {"watch", Engine_watch, METH_O,
     "watch(on): while on, progress wakes drain waiters"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Engine_getset[] = {
    {"closed", Engine_get_closed, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot Engine_slots[] = {
    {Py_tp_new, Engine_new},
    {Py_tp_dealloc, Engine_dealloc},
    {Py_tp_traverse, Engine_traverse},
    {Py_tp_clear, Engine_clear},
    {Py_tp_methods, Engine_methods},
    {Py_tp_getset, Engine_getset},
    {Py_tp_doc, "The native notifier engine (internal)."},
    {0, NULL},
};

static PyType_Spec Engine_spec = {
    .name = "blueprint_notify._core.Engine",
    .basicsize = sizeof(EngineObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Engine_slots,
};

/* ---- Waker --------------------------------------------------------------- */

static PyObject *Waker_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    module_state *st = state_of_type(type);
    PyObject *engine, *on_drained;
    static char *kwlist[] = {"engine", "on_drained", NULL};
    if (!st) return NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!O", kwlist, st->engine_type,
                                     &engine, &on_drained))
        return NULL;
    if (!PyCallable_Check(on_drained)) {
        PyErr_SetString(PyExc_TypeError, "on_drained must be callable");
        return NULL;
    }
    if (!engine_usable(ENGINE_CAST(engine))) return NULL;
    WakerObject *self = (WakerObject *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    self->engine = (EngineObject *)Py_NewRef(engine);
    self->on_drained = Py_NewRef(on_drained);
    self->w = bpn_waker_new(&ENGINE_CAST(engine)->e->hub);
    if (!self->w) {
        Py_DECREF(self);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return (PyObject *)self;
}

static int Waker_traverse(PyObject *op, visitproc visit, void *arg) {
    Py_VISIT(Py_TYPE(op));
    Py_VISIT(WAKER_CAST(op)->engine);
    Py_VISIT(WAKER_CAST(op)->on_drained);
    return 0;
}

static int Waker_clear(PyObject *op) {
    /* The engine reference stays until dealloc: subscribers may still use
     * the native waker, which lives in the engine's hub. */
    Py_CLEAR(WAKER_CAST(op)->on_drained);
    return 0;
}

static void Waker_dealloc(PyObject *op) {
    WakerObject *self = WAKER_CAST(op);
    PyTypeObject *tp = Py_TYPE(op);
    PyObject_GC_UnTrack(op);
    /* Every subscriber holding it is gone. In a fork child, see
     * subscriber_detach. */
    bpn_engine *e = self->engine ? self->engine->e : NULL;
    if (e && !bpn_engine_forked(e)) bpn_waker_free(self->w);
    self->w = NULL;
    Waker_clear(op);
    Py_CLEAR(self->engine);
    tp->tp_free(op);
    Py_DECREF(tp);
}

static PyObject *Waker_fileno(PyObject *op, PyObject *unused) {
    (void)unused;
    if (!WAKER_CAST(op)->w) {
        PyErr_SetString(PyExc_ValueError, "waker is closed");
        return NULL;
    }
    return PyLong_FromLong(bpn_waker_fd(WAKER_CAST(op)->w));
}

typedef struct {
    PyObject **items;
    Py_ssize_t n, cap;
} ready_batch;

/* Called under the hub lock with the GIL held: only takes references. */
static void collect_ready(void *user, void *arg) {
    ready_batch *b = arg;
    if (b->n < b->cap) b->items[b->n++] = Py_NewRef((PyObject *)user);
}

static PyObject *Waker_dispatch(PyObject *op, PyObject *unused) {
    WakerObject *self = WAKER_CAST(op);
    (void)unused;
    if (!self->w) Py_RETURN_NONE;
    ready_batch b = {NULL, 0, self->nsubs};
    b.items = PyMem_Malloc(sizeof(PyObject *) * (size_t)(b.cap ? b.cap : 1));
    if (!b.items) return PyErr_NoMemory();
    int drained = bpn_waker_take(self->w, collect_ready, &b);
    for (Py_ssize_t i = 0; i < b.n; i++) {
        SubscriberObject *sub = SUBSCRIBER_CAST(b.items[i]);
        if (sub->on_ready) {
            PyObject *res = PyObject_CallNoArgs(sub->on_ready);
            if (res)
                Py_DECREF(res);
            else
                PyErr_WriteUnraisable(sub->on_ready);
        }
        Py_DECREF(b.items[i]);
    }
    PyMem_Free(b.items);
    if (drained && self->on_drained) {
        PyObject *res = PyObject_CallNoArgs(self->on_drained);
        if (res)
            Py_DECREF(res);
        else
            PyErr_WriteUnraisable(self->on_drained);
    }
    pump_logs(self->engine);
    Py_RETURN_NONE;
}

static PyObject *Waker_want_drain(PyObject *op, PyObject *flag) {
    int on = PyObject_IsTrue(flag);
    if (on < 0) return NULL;
    if (WAKER_CAST(op)->w) bpn_waker_want_drain(WAKER_CAST(op)->w, on);
    Py_RETURN_NONE;
}

static PyMethodDef Waker_methods[] = {
    {"fileno", Waker_fileno, METH_NOARGS, "The eventfd to watch."},
    {"dispatch", Waker_dispatch, METH_NOARGS,
     "Calls on_ready of ready subscribers and on_drained if signalled."},
    {"want_drain", Waker_want_drain, METH_O, NULL},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Waker_slots[] = {
    {Py_tp_new, Waker_new},
    {Py_tp_dealloc, Waker_dealloc},
    {Py_tp_traverse, Waker_traverse},
    {Py_tp_clear, Waker_clear},
    {Py_tp_methods, Waker_methods},
    {Py_tp_doc, "An eventfd that wakes one event loop (internal)."},
    {0, NULL},
};

static PyType_Spec Waker_spec = {
    .name = "blueprint_notify._core.Waker",
    .basicsize = sizeof(WakerObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Waker_slots,
};

/* ---- Subscriber ---------------------------------------------------------- */

/* Detaches from the channel; safe to call twice. */
static void subscriber_detach(SubscriberObject *self) {
    if (self->s) {
        /* In a fork child the hub's lock may be held by a thread that no
         * longer exists: leave the parent's native state alone. */
        bpn_engine *e = self->waker->engine->e;
        if (e && !bpn_engine_forked(e)) bpn_sub_free(self->s);
        self->s = NULL;
        self->waker->nsubs--;
    }
}

static int Subscriber_traverse(PyObject *op, visitproc visit, void *arg) {
    Py_VISIT(Py_TYPE(op));
    Py_VISIT(SUBSCRIBER_CAST(op)->waker);
    Py_VISIT(SUBSCRIBER_CAST(op)->on_ready);
    Py_VISIT(SUBSCRIBER_CAST(op)->job_id);
    return 0;
}

static int Subscriber_clear(PyObject *op) {
    SubscriberObject *self = SUBSCRIBER_CAST(op);
    subscriber_detach(self); /* before the waker can go */
    Py_CLEAR(self->on_ready);
    Py_CLEAR(self->job_id);
    Py_CLEAR(self->waker);
    return 0;
}

static void Subscriber_dealloc(PyObject *op) {
    PyTypeObject *tp = Py_TYPE(op);
    PyObject_GC_UnTrack(op);
    Subscriber_clear(op);
    PyObject_GC_Del(op);
    Py_DECREF(tp);
}

#define PULL_MAX 256

/* pull(max=64) -> (events, skipped, ended); events are (seq, status, json) */
static PyObject *Subscriber_pull(PyObject *op, PyObject *const *args,
                                 Py_ssize_t nargs) {
    SubscriberObject *self = SUBSCRIBER_CAST(op);
    bpn_event *evs[PULL_MAX];
    Py_ssize_t max = 64;
    PyObject *list = NULL, *result = NULL;
    if (!check_nargs("pull", nargs, 0, 1)) return NULL;
    if (nargs == 1) {
        max = PyLong_AsSsize_t(args[0]);
        if (max == -1 && PyErr_Occurred()) return NULL;
    }
    if (max < 1 || max > PULL_MAX) max = max < 1 ? 1 : PULL_MAX;
    if (!self->s) return Py_BuildValue("([]Ki)", 0ULL, 1);
    bpn_pull_result r = bpn_sub_pull(self->s, evs, (size_t)max);
    list = PyList_New((Py_ssize_t)r.n);
    if (!list) goto exit;
    for (size_t i = 0; i < r.n; i++) {
        PyObject *item = Py_BuildValue(
            "(Kiy#)", (unsigned long long)evs[i]->seq, evs[i]->status,
            evs[i]->json, (Py_ssize_t)evs[i]->json_len);
        if (!item) goto exit;
        PyList_SET_ITEM(list, (Py_ssize_t)i, item);
    }
    result =
        Py_BuildValue("(OKi)", list, (unsigned long long)r.skipped, r.ended);
exit:
    for (size_t i = 0; i < r.n; i++) bpn_event_unref(evs[i]);
    Py_XDECREF(list);
    return result;
}

/* pull_frames(max=64, max_bytes=0) -> (frames: bytes, skipped, ended,
 * last_seq): frames are the SSE frames of the events, concatenated; with
 * max_bytes > 0 no more events once they hold that many bytes (one event at
 * least). */
static PyObject *Subscriber_pull_frames(PyObject *op, PyObject *const *args,
                                        Py_ssize_t nargs) {
    SubscriberObject *self = SUBSCRIBER_CAST(op);
    bpn_event *evs[PULL_MAX];
    Py_ssize_t max = 64, max_bytes = 0;
    PyObject *frames = NULL, *result = NULL;
    if (!check_nargs("pull_frames", nargs, 0, 2)) return NULL;
    if (nargs >= 1) {
        max = PyLong_AsSsize_t(args[0]);
        if (max == -1 && PyErr_Occurred()) return NULL;
    }
    if (nargs == 2) {
        max_bytes = PyLong_AsSsize_t(args[1]);
        if (max_bytes == -1 && PyErr_Occurred()) return NULL;
    }
    if (max < 1 || max > PULL_MAX) max = max < 1 ? 1 : PULL_MAX;
    if (!self->s)
        return Py_BuildValue("(y#KiK)", "", (Py_ssize_t)0, 0ULL, 1, 0ULL);
    bpn_pull_result r =
        bpn_sub_pull_bytes(self->s, evs, (size_t)max,
                           max_bytes > 0 ? (size_t)max_bytes : SIZE_MAX);
    size_t total = 0;
    for (size_t i = 0; i < r.n; i++) total += evs[i]->frame_len;
    frames = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (!frames) goto exit;
    char *p = PyBytes_AS_STRING(frames);
    for (size_t i = 0; i < r.n; i++) {
        memcpy(p, evs[i]->frame, evs[i]->frame_len);
        p += evs[i]->frame_len;
    }
    result =
        Py_BuildValue("(OKiK)", frames, (unsigned long long)r.skipped, r.ended,
                      (unsigned long long)(r.n ? evs[r.n - 1]->seq : 0));
exit:
    for (size_t i = 0; i < r.n; i++) bpn_event_unref(evs[i]);
    Py_XDECREF(frames);
    return result;
}

static PyObject *Subscriber_close(PyObject *op, PyObject *unused) {
    (void)unused;
    subscriber_detach(SUBSCRIBER_CAST(op));
    Py_RETURN_NONE;
}

static PyObject *Subscriber_get_job_id(PyObject *op, void *closure) {
    (void)closure;
    PyObject *id = SUBSCRIBER_CAST(op)->job_id;
    return Py_NewRef(id ? id : Py_None);
}

static PyObject *Subscriber_get_closed(PyObject *op, void *closure) {
    (void)closure;
    return PyBool_FromLong(SUBSCRIBER_CAST(op)->s == NULL);
}

static PyMethodDef Subscriber_methods[] = {
    {"pull", (PyCFunction)(void (*)(void))Subscriber_pull, METH_FASTCALL,
     "pull(max=64) -> (events, skipped, ended)"},
    {"pull_frames", (PyCFunction)(void (*)(void))Subscriber_pull_frames,
     METH_FASTCALL,
     "pull_frames(max=64, max_bytes=0) -> (frames, skipped, ended, "
     "last_seq)"},
    {"close", Subscriber_close, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Subscriber_getset[] = {
    {"job_id", Subscriber_get_job_id, NULL, NULL, NULL},
    {"closed", Subscriber_get_closed, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot Subscriber_slots[] = {
    {Py_tp_dealloc, Subscriber_dealloc},
    {Py_tp_traverse, Subscriber_traverse},
    {Py_tp_clear, Subscriber_clear},
    {Py_tp_methods, Subscriber_methods},
    {Py_tp_getset, Subscriber_getset},
    {Py_tp_doc, "A cursor into one job's channel (internal)."},
    {0, NULL},
};

static PyType_Spec Subscriber_spec = {
    .name = "blueprint_notify._core.Subscriber",
    .basicsize = sizeof(SubscriberObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC |
             Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = Subscriber_slots,
};

/* ---- module functions ---------------------------------------------------- */

/* sign(secret: bytes, timestamp: int, body: bytes) -> hex str */
static PyObject *core_sign(PyObject *module, PyObject *args) {
    const char *key, *body;
    Py_ssize_t key_len, body_len;
    long long ts;
    char out[BPN_SIG_HEX_LEN + 1];
    (void)module;
    if (!PyArg_ParseTuple(args, "y#Ly#:sign", &key, &key_len, &ts, &body,
                          &body_len))
        return NULL;
    bpn_signer *s = bpn_signer_new((const uint8_t *)key, (size_t)key_len);
    if (!s) return PyErr_NoMemory();
    int rc = bpn_signer_hex(s, (int64_t)ts, body, (size_t)body_len, out);
    bpn_signer_free(s);
    if (rc < 0) {
        PyErr_SetString(PyExc_RuntimeError, "HMAC-SHA256 failed");
        return NULL;
    }
    return PyUnicode_FromStringAndSize(out, BPN_SIG_HEX_LEN);
}

/* sign_standard(key: bytes, msg_id: str, timestamp: int, body: bytes) ->
 * "v1,<base64>" */
static PyObject *core_sign_standard(PyObject *module, PyObject *args) {
    const char *key, *body, *msg_id;
    Py_ssize_t key_len, body_len;
    long long ts;
    char out[BPN_SIG_B64_LEN + 1];
    (void)module;
    if (!PyArg_ParseTuple(args, "y#sLy#:sign_standard", &key, &key_len, &msg_id,
                          &ts, &body, &body_len))
        return NULL;
    bpn_signer *s = bpn_signer_new((const uint8_t *)key, (size_t)key_len);
    if (!s) return PyErr_NoMemory();
    int rc =
        bpn_signer_std(s, msg_id, (int64_t)ts, body, (size_t)body_len, out);
    bpn_signer_free(s);
    if (rc < 0) {
        PyErr_SetString(PyExc_ValueError, "could not sign (msg_id too long?)");
        return NULL;
    }
    return PyUnicode_FromFormat("v1,%s", out);
}

/* check_address(ip: str) -> None if allowed, else the reason */
static PyObject *core_check_address(PyObject *module, PyObject *arg) {
    const char *text;
    Py_ssize_t len;
    struct sockaddr_in in4;
    struct sockaddr_in6 in6;
    (void)module;
    if (get_str(arg, "address", &text, &len) < 0) return NULL;
    memset(&in4, 0, sizeof(in4));
    memset(&in6, 0, sizeof(in6));
    const char *why;
    if (inet_pton(AF_INET, text, &in4.sin_addr) == 1) {
        in4.sin_family = AF_INET;
        why = bpn_netguard_check((struct sockaddr *)&in4, sizeof(in4));
    } else if (inet_pton(AF_INET6, text, &in6.sin6_addr) == 1) {
        in6.sin6_family = AF_INET6;
        why = bpn_netguard_check((struct sockaddr *)&in6, sizeof(in6));
    } else {
        PyErr_Format(PyExc_ValueError, "address is not an IP address: %R", arg);
        return NULL;
    }
    if (!why) Py_RETURN_NONE;
    return PyUnicode_FromString(why);
}

/* backoff_ms(base, failed_attempts, cap, rnd) -> int */
static PyObject *core_backoff_ms(PyObject *module, PyObject *args) {
    unsigned long long base, cap, rnd;
    unsigned int n;
    (void)module;
    if (!PyArg_ParseTuple(args, "KIKK:backoff_ms", &base, &n, &cap, &rnd))
        return NULL;
    return PyLong_FromUnsignedLongLong(bpn_backoff_ms(base, n, cap, rnd));
}

static PyMethodDef core_methods[] = {
    {"sign", core_sign, METH_VARARGS,
     "sign(secret, timestamp, body) -> hex HMAC-SHA256 of '{ts}.{body}'"},
    {"sign_standard", core_sign_standard, METH_VARARGS,
     "sign_standard(key, msg_id, timestamp, body) -> 'v1,<base64>'"},
    {"check_address", core_check_address, METH_O,
     "check_address(ip) -> None if webhooks may connect there, else why not"},
    {"backoff_ms", core_backoff_ms, METH_VARARGS,
     "backoff_ms(base, failed_attempts, cap, rnd) -> delay in ms"},
    {NULL, NULL, 0, NULL},
};

/* ---- module -------------------------------------------------------------- */

static int core_exec(PyObject *m) {
    module_state *st = get_state(m);
    st->engine_type =
        (PyTypeObject *)PyType_FromModuleAndSpec(m, &Engine_spec, NULL);
    if (!st->engine_type || PyModule_AddType(m, st->engine_type) < 0) return -1;
    st->waker_type =
        (PyTypeObject *)PyType_FromModuleAndSpec(m, &Waker_spec, NULL);
    if (!st->waker_type || PyModule_AddType(m, st->waker_type) < 0) return -1;
    st->subscriber_type =
        (PyTypeObject *)PyType_FromModuleAndSpec(m, &Subscriber_spec, NULL);
    if (!st->subscriber_type || PyModule_AddType(m, st->subscriber_type) < 0)
        return -1;
    st->channel_limit_error = PyErr_NewExceptionWithDoc(
        "blueprint_notify.ChannelLimitError",
        "Raised when max_channels live channels exist and a new job needs one.",
        PyExc_RuntimeError, NULL);
    if (!st->channel_limit_error ||
        PyModule_AddObjectRef(m, "ChannelLimitError", st->channel_limit_error) <
            0)
        return -1;
    st->store_error = PyErr_NewExceptionWithDoc(
        "blueprint_notify.StoreError",
        "The durable store (NotifierConfig.store_path) cannot be used: not "
        "a blueprint_notify store, corrupt, unreadable or unwritable.",
        PyExc_OSError, NULL);
    if (!st->store_error ||
        PyModule_AddObjectRef(m, "StoreError", st->store_error) < 0)
        return -1;
    st->store_locked_error = PyErr_NewExceptionWithDoc(
        "blueprint_notify.StoreLockedError",
        "Another notifier (in this or another process) has the store open.",
        st->store_error, NULL);
    if (!st->store_locked_error ||
        PyModule_AddObjectRef(m, "StoreLockedError", st->store_locked_error) <
            0)
        return -1;
    if (!(st->str_status = PyUnicode_InternFromString("status")) ||
        !(st->str_progress = PyUnicode_InternFromString("progress")) ||
        !(st->str_result = PyUnicode_InternFromString("result")) ||
        !(st->str_error = PyUnicode_InternFromString("error")) ||
        !(st->str_timestamp = PyUnicode_InternFromString("timestamp")))
        return -1;
    if (PyModule_AddIntConstant(m, "JOB_ID_MAX", BPN_JOB_ID_MAX) < 0) return -1;
    if (PyModule_AddIntConstant(m, "URL_MAX", BPN_URL_MAX) < 0) return -1;
    if (PyModule_AddIntConstant(m, "SCHEME_BLUEPRINT", BPN_SCHEME_BLUEPRINT) <
        0)
        return -1;
    if (PyModule_AddIntConstant(m, "SCHEME_STANDARD", BPN_SCHEME_STANDARD) < 0)
        return -1;
    return 0;
}

static int core_traverse(PyObject *m, visitproc visit, void *arg) {
    module_state *st = get_state(m);
    Py_VISIT(st->engine_type);
    Py_VISIT(st->waker_type);
    Py_VISIT(st->subscriber_type);
    Py_VISIT(st->channel_limit_error);
    Py_VISIT(st->store_error);
    Py_VISIT(st->store_locked_error);
    Py_VISIT(st->str_status);
    Py_VISIT(st->str_progress);
    Py_VISIT(st->str_result);
    Py_VISIT(st->str_error);
    Py_VISIT(st->str_timestamp);
    return 0;
}

static int core_clear(PyObject *m) {
    module_state *st = get_state(m);
    Py_CLEAR(st->engine_type);
    Py_CLEAR(st->waker_type);
    Py_CLEAR(st->subscriber_type);
    Py_CLEAR(st->channel_limit_error);
    Py_CLEAR(st->store_error);
    Py_CLEAR(st->store_locked_error);
    Py_CLEAR(st->str_status);
    Py_CLEAR(st->str_progress);
    Py_CLEAR(st->str_result);
    Py_CLEAR(st->str_error);
    Py_CLEAR(st->str_timestamp);
    return 0;
}

static void core_free(void *m) {
    core_clear((PyObject *)m);
}

static PyModuleDef_Slot core_slots[] = {
    {Py_mod_exec, core_exec},
#if PY_VERSION_HEX >= 0x030C0000
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
#if PY_VERSION_HEX >= 0x030D0000
    {Py_mod_gil, Py_MOD_GIL_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "blueprint_notify._core",
    .m_doc = "The C core of blueprint_notify.",
    .m_size = sizeof(module_state),
    .m_methods = core_methods,
    .m_slots = core_slots,
    .m_traverse = core_traverse,
    .m_clear = core_clear,
    .m_free = core_free,
};

PyMODINIT_FUNC PyInit__core(void) {
    return PyModuleDef_Init(&core_module);
}
