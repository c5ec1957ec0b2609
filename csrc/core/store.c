#include "store.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common.h"

#define APPLICATION_ID 0x42504e31 /* "BPN1" */
#define SCHEMA_VERSION 1

enum {
    S_BEGIN,
    S_COMMIT,
    S_ROLLBACK,
    S_META,
    S_INSERT,
    S_REQUEUE,
    S_RETRY,
    S_DELIVERED,
    S_DEAD,
    S_DELETE,
    S_PRUNE,
    S_COUNT
};

static const char *const sql_text[S_COUNT] = {
    [S_BEGIN] = "BEGIN IMMEDIATE",
    [S_COMMIT] = "COMMIT",
    [S_ROLLBACK] = "ROLLBACK",
    [S_META] = "INSERT OR REPLACE INTO meta(key, value) VALUES('last_id', ?1)",
    [S_INSERT] =
        "INSERT INTO deliveries(id, state, msg_id, job_id, url, "
        "origin, payload, created_at) VALUES(?1, 0, ?2, ?3, ?4, ?5, "
        "?6, ?7)",
    [S_REQUEUE] =
        "UPDATE deliveries SET id = ?2, state = 0, attempts = 0, "
        "due_ms = 0, done_at = NULL, last_error = NULL, log = NULL "
        "WHERE id = ?1",
    [S_RETRY] =
        "UPDATE deliveries SET attempts = ?2, due_ms = ?3, "
        "last_error = ?4, log = ?5 WHERE id = ?1",
    [S_DELIVERED] =
        "UPDATE deliveries SET state = 1, done_at = ?2, "
        "attempts = ?3, log = NULL WHERE id = ?1",
    [S_DEAD] =
        "UPDATE deliveries SET state = 2, attempts = ?2, done_at = ?3, "
        "last_error = ?4, log = ?5 WHERE id = ?1",
    [S_DELETE] = "DELETE FROM deliveries WHERE id = ?1",
    [S_PRUNE] =
        "DELETE FROM deliveries WHERE id IN (SELECT id FROM "
        "deliveries WHERE state = 1 AND done_at < ?1 LIMIT ?2)",
};

static const char schema_sql[] =
    "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value) "
    "WITHOUT ROWID;"
    "CREATE TABLE IF NOT EXISTS deliveries("
    " id INTEGER PRIMARY KEY,"   /* delivery id: the order of the queue */
    " state INTEGER NOT NULL,"   /* 0 pending, 1 delivered, 2 dead */
    " msg_id TEXT NOT NULL,"     /* webhook-id, the same on every attempt */
    " job_id TEXT NOT NULL,"     /* X-Job-Id */
    " url TEXT NOT NULL,"        /* where it goes */
    " origin TEXT NOT NULL,"     /* scheme://host:port, for connection caps */
    " payload TEXT NOT NULL,"    /* the exact body */
    " created_at REAL NOT NULL," /* wall clock seconds */
    " attempts INTEGER NOT NULL DEFAULT 0,"
    " due_ms INTEGER NOT NULL DEFAULT 0," /* next attempt, wall clock ms */
    " done_at REAL,"                      /* delivered or dead-lettered */
    " last_error TEXT,"
    " log BLOB);" /* failed attempts, see encode_log */
    "CREATE INDEX IF NOT EXISTS deliveries_delivered ON deliveries(done_at) "
    "WHERE state = 1;";

struct bpn_store {
    sqlite3 *db;
    sqlite3_stmt *st[S_COUNT];
    int lock_fd;
    int dirty;
    uint64_t dirty_since;
    uint64_t keep_delivered_ms;
    uint64_t last_id;
    uint64_t saved_last_id; /* the value in meta */
    char prefix[17];
    char *path;
    char err[256];
};

/* ---- attempt logs ------------------------------------------------------- */

/* Per attempt: f64 at, u32 duration_ms, i32 status, u16 length, the error
 * text (host byte order: the file is read back by this machine). */
#define LOG_REC_HEAD (8 + 4 + 4 + 2)

static size_t encode_log(const bpn_attempt *log, uint32_t n, uint8_t *out) {
    size_t len = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint16_t elen = (uint16_t)strnlen(log[i].error, sizeof(log[i].error));
        if (out) {
            uint8_t *p = out + len;
            memcpy(p, &log[i].at, 8);
            memcpy(p + 8, &log[i].duration_ms, 4);
            memcpy(p + 12, &log[i].status, 4);
            memcpy(p + 16, &elen, 2);
            memcpy(p + LOG_REC_HEAD, log[i].error, elen);
        }
        len += LOG_REC_HEAD + elen;
    }
    return len;
}

/* Decodes into a new array (*out, *n; free() it). Returns 0, or -1 when
 * out of memory. Malformed tails are ignored. */
static int decode_log(const uint8_t *p, size_t len, bpn_attempt **out,
                      uint32_t *n) {
    *out = NULL;
    *n = 0;
    if (!p || len == 0) return 0;
    bpn_attempt *log = calloc(BPN_ATTEMPT_LOG_MAX, sizeof(*log));
    if (!log) return -1;
    uint32_t count = 0;
    while (count < BPN_ATTEMPT_LOG_MAX && len >= LOG_REC_HEAD) {
        bpn_attempt *a = &log[count];
        uint16_t elen;
        memcpy(&a->at, p, 8);
        memcpy(&a->duration_ms, p + 8, 4);
        memcpy(&a->status, p + 12, 4);
        memcpy(&elen, p + 16, 2);
        if (len - LOG_REC_HEAD < elen) break;
        size_t keep = elen < sizeof(a->error) ? elen : sizeof(a->error) - 1;
        memcpy(a->error, p + LOG_REC_HEAD, keep);
        a->error[keep] = '\0';
        p += LOG_REC_HEAD + elen;
        len -= LOG_REC_HEAD + elen;
        count++;
    }
    *out = log;
    *n = count;
    return 0;
}

/* ---- errors and statements ------------------------------------------------
 */

static int fail(bpn_store *s, const char *what) {
    snprintf(s->err, sizeof(s->err), "%s: %s", what, sqlite3_errmsg(s->db));
    /* Some errors (full disk, I/O) roll the transaction back by themselves. */
    if (sqlite3_get_autocommit(s->db)) s->dirty = 0;
    return -1;
}

/* Runs a prepared statement to completion and resets it. */
static int run(bpn_store *s, int which, const char *what) {
    sqlite3_stmt *st = s->st[which];
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    if (rc != SQLITE_DONE && rc != SQLITE_ROW) return fail(s, what);
    return 0;
}

/* Opens the write transaction if none is open. */
static int begin(bpn_store *s) {
    if (s->dirty) return 0;
    if (run(s, S_BEGIN, "could not begin a transaction") < 0) return -1;
    s->dirty = 1;
    s->dirty_since = bpn_now_ms();
    return 0;
}

/* ---- opening ------------------------------------------------------------ */

/* Runs one SQL text (no results wanted). */
static int exec_sql(sqlite3 *db, const char *sql, const char *path,
                    const char *what, char *err, size_t errlen) {
    char *msg = NULL;
    if (sqlite3_exec(db, sql, NULL, NULL, &msg) == SQLITE_OK) return 0;
    snprintf(err, errlen, "store_path %s: %s (%s)", path, what,
             msg ? msg : sqlite3_errmsg(db));
    sqlite3_free(msg);
    return -1;
}

/* Reads one value of a one-row query: as text into buf (when buf) or as an
 * integer into *num. Returns 0, or -1 with the message set. */
static int query_one(sqlite3 *db, const char *sql, char *buf, size_t buflen,
                     int64_t *num, const char *path, const char *what,
                     char *err, size_t errlen) {
    sqlite3_stmt *st = NULL;
    int rc = sqlite3_prepare_v2(db, sql, -1, &st, NULL);
    if (rc == SQLITE_OK) rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        if (buf) {
            const unsigned char *t = sqlite3_column_text(st, 0);
            snprintf(buf, buflen, "%s", t ? (const char *)t : "");
        }
        if (num) *num = sqlite3_column_int64(st, 0);
        rc = SQLITE_OK;
    } else if (rc == SQLITE_DONE) {
        if (buf && buflen) buf[0] = '\0';
        if (num) *num = 0;
        rc = SQLITE_OK;
    }
    if (rc != SQLITE_OK) {
        int code = sqlite3_errcode(db) & 0xff;
        if (code == SQLITE_NOTADB)
            snprintf(err, errlen,
                     "store_path %s: is not a SQLite database (%s); move it "
                     "away or choose another path",
                     path, sqlite3_errmsg(db));
        else if (code == SQLITE_CORRUPT)
            snprintf(err, errlen, "store_path %s: the database is corrupt (%s)",
                     path, sqlite3_errmsg(db));
        else
            snprintf(err, errlen, "store_path %s: %s (%s)", path, what,
                     sqlite3_errmsg(db));
    }
    sqlite3_finalize(st);
    return rc == SQLITE_OK ? 0 : -1;
}

/* Checks the path before SQLite sees it: not a directory, its directory
 * exists. Returns 0 or -1 with the message set. */
static int check_path(const char *path, char *err, size_t errlen) {
    struct stat sb;
    if (stat(path, &sb) == 0) {
        if (S_ISDIR(sb.st_mode)) {
            snprintf(err, errlen,
                     "store_path %s: is a directory (give a file path, e.g. "
                     "%s/outbox.db)",
                     path, path);
            return -1;
        }
        if (!S_ISREG(sb.st_mode)) {
            snprintf(err, errlen, "store_path %s: is not a regular file", path);
            return -1;
        }
        if (access(path, R_OK | W_OK) != 0) {
            snprintf(err, errlen,
                     "store_path %s: is not readable and writable by this "
                     "process (%s)",
                     path, strerror(errno));
            return -1;
        }
    } else if (errno != ENOENT) {
        snprintf(err, errlen, "store_path %s: %s", path, strerror(errno));
        return -1;
    }
    /* SQLite creates "<path>-wal" and "<path>-shm" next to the file. */
    const char *slash = strrchr(path, '/');
    size_t dlen = !slash ? 1 : slash == path ? 1 : (size_t)(slash - path);
    char dir[4096];
    if (dlen >= sizeof(dir)) {
        snprintf(err, errlen, "store_path is too long");
        return -1;
    }
    memcpy(dir, slash ? path : ".", dlen);
    dir[dlen] = '\0';
    if (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode)) {
        snprintf(err, errlen,
                 "store_path %s: the directory %s does not exist (create it "
                 "first)",
                 path, dir);
        return -1;
    }
    if (access(dir, W_OK | X_OK) != 0) {
        snprintf(err, errlen,
                 "store_path %s: the directory %s is not writable by this "
                 "process (%s); SQLite keeps its -wal and -shm files there",
                 path, dir, strerror(errno));
        return -1;
    }
    return 0;
}

/* Takes the exclusive lock on "<path>-lock" and writes our pid into it.
 * Returns the descriptor, or -1 with the message set (*locked set when
 * another process or notifier holds it). */
/* The canonical name of path (symlinks resolved), also for a file not
 * created yet (its directory resolved); path itself if that fails. */
static void resolve(const char *path, char *out) {
    char dir[PATH_MAX], rdir[PATH_MAX];
    if (realpath(path, out)) return;
    const char *slash = strrchr(path, '/');
    const char *base = slash ? slash + 1 : path;
    size_t dlen = !slash ? 1 : slash == path ? 1 : (size_t)(slash - path);
    size_t plen = strlen(path);
    if (plen >= PATH_MAX) goto as_is;
    memcpy(dir, slash ? path : ".", dlen);
    dir[dlen] = '\0';
    if (!realpath(dir, rdir)) goto as_is;
    size_t rlen = strcmp(rdir, "/") == 0 ? 0 : strlen(rdir);
    size_t blen = strlen(base);
    if (rlen + 1 + blen >= PATH_MAX) goto as_is;
    memcpy(out, rdir, rlen);
    out[rlen] = '/';
    memcpy(out + rlen + 1, base, blen + 1);
    return;
as_is:
    memcpy(out, path, plen < PATH_MAX ? plen + 1 : PATH_MAX);
    out[PATH_MAX - 1] = '\0';
}

static int take_lock(const char *path, int *locked, char *err, size_t errlen) {
    char lock_path[PATH_MAX + 8], real[PATH_MAX];
    *locked = 0;
    /* Through symlinks, one file gets one lock. (Hard links to a SQLite
     * database are unsupported by SQLite itself.) */
    resolve(path, real);
    snprintf(lock_path, sizeof(lock_path), "%s-lock", real);
    int fd = open(lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) {
        snprintf(err, errlen, "store_path %s: cannot open the lock file %s: %s",
                 path, lock_path, strerror(errno));
        return -1;
    }
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        int e = errno;
        char pid[32] = "";
        ssize_t n = pread(fd, pid, sizeof(pid) - 1, 0);
        pid[n > 0 ? n : 0] = '\0';
        pid[strcspn(pid, "\n")] = '\0';
        if (e == EWOULDBLOCK) {
            *locked = 1;
            snprintf(err, errlen,
                     "store_path %s: is in use by another notifier (process "
                     "%s holds %s); one notifier per store: close the other "
                     "or give this one its own store_path",
                     path, pid[0] ? pid : "?", lock_path);
        } else {
            snprintf(err, errlen, "store_path %s: cannot lock %s: %s", path,
                     lock_path, strerror(e));
        }
        close(fd);
        return -1;
    }
    char pid[32];
    int n = snprintf(pid, sizeof(pid), "%ld\n", (long)getpid());
    if (ftruncate(fd, 0) != 0 || pwrite(fd, pid, (size_t)n, 0) != n) {
        /* Only informative; the lock is what matters. */
    }
    return fd;
}

/* Makes sure the file is ours (or new), in WAL mode, intact and writable,
 * with the schema in place. Returns 0 or -1 with the message set. */
static int prepare_db(bpn_store *s, char *err, size_t errlen) {
    sqlite3 *db = s->db;
    const char *path = s->path;
    int64_t app_id = 0, version = 0, tables = 0, max_id = 0, last_id = 0;
    char buf[64];
    if (sqlite3_db_readonly(db, "main") == 1) {
        snprintf(err, errlen,
                 "store_path %s: is not writable (check its permissions)",
                 path);
        return -1;
    }
    if (exec_sql(db, "PRAGMA busy_timeout = 2000", path, "cannot configure",
                 err, errlen) < 0 ||
        query_one(db, "PRAGMA application_id", NULL, 0, &app_id, path,
                  "cannot read the header", err, errlen) < 0 ||
        query_one(db, "PRAGMA user_version", NULL, 0, &version, path,
                  "cannot read the header", err, errlen) < 0 ||
        query_one(db, "SELECT count(*) FROM sqlite_master", NULL, 0, &tables,
                  path, "cannot read the schema", err, errlen) < 0)
        return -1;
    if (app_id != APPLICATION_ID && (app_id != 0 || tables > 0)) {
        snprintf(err, errlen,
                 "store_path %s: is a SQLite database of another application "
                 "(not a blueprint_notify store); choose another path",
                 path);
        return -1;
    }
    if (version > SCHEMA_VERSION) {
        snprintf(err, errlen,
                 "store_path %s: was written by a newer blueprint_notify "
                 "(schema %" PRId64 ", this one reads %d)",
                 path, version, SCHEMA_VERSION);
        return -1;
    }
    if (query_one(db, "PRAGMA journal_mode = WAL", buf, sizeof(buf), NULL, path,
                  "cannot switch to WAL mode", err, errlen) < 0)
        return -1;
    if (strcmp(buf, "wal") != 0) {
        snprintf(err, errlen,
                 "store_path %s: the file system does not support SQLite's "
                 "WAL mode (journal_mode is %s)",
                 path, buf);
        return -1;
    }
    if (exec_sql(db,
                 "PRAGMA synchronous = FULL; PRAGMA cache_size = -8192; "
                 "PRAGMA temp_store = MEMORY",
                 path, "cannot configure", err, errlen) < 0)
        return -1;
    if (query_one(db, "PRAGMA quick_check", buf, sizeof(buf), NULL, path,
                  "cannot check the database", err, errlen) < 0)
        return -1;
    if (strcmp(buf, "ok") != 0) {
        snprintf(err, errlen, "store_path %s: the database is corrupt (%s)",
                 path, buf);
        return -1;
    }
    /* A write transaction: proves the file and its directory are writable
     * (the WAL file is created here). */
    char sql[160];
    snprintf(sql, sizeof(sql),
             "BEGIN IMMEDIATE; PRAGMA application_id = %d; PRAGMA "
             "user_version = %d;",
             APPLICATION_ID, SCHEMA_VERSION);
    if (exec_sql(db, sql, path, "cannot write", err, errlen) < 0 ||
        exec_sql(db, schema_sql, path, "cannot create the tables", err,
                 errlen) < 0)
        goto rollback;
    if (query_one(db, "SELECT value FROM meta WHERE key = 'prefix'", s->prefix,
                  sizeof(s->prefix), NULL, path, "cannot read", err,
                  errlen) < 0)
        goto rollback;
    if (strlen(s->prefix) != 16) {
        uint8_t raw[8];
        if (bpn_random_bytes(raw, sizeof(raw)) < 0) {
            snprintf(err, errlen, "store_path %s: no random bytes: %s", path,
                     strerror(errno));
            goto rollback;
        }
        bpn_hex_encode(s->prefix, raw, sizeof(raw));
        s->prefix[16] = '\0';
        snprintf(sql, sizeof(sql),
                 "INSERT OR REPLACE INTO meta(key, value) VALUES('prefix', "
                 "'%s')",
                 s->prefix);
        if (exec_sql(db, sql, path, "cannot write", err, errlen) < 0)
            goto rollback;
    }
    if (query_one(db, "SELECT value FROM meta WHERE key = 'last_id'", NULL, 0,
                  &last_id, path, "cannot read", err, errlen) < 0 ||
        query_one(db, "SELECT coalesce(max(id), 0) FROM deliveries", NULL, 0,
                  &max_id, path, "cannot read", err, errlen) < 0)
        goto rollback;
    s->last_id = (uint64_t)(last_id > max_id ? last_id : max_id);
    s->saved_last_id = (uint64_t)last_id;
    if (exec_sql(db, "COMMIT", path, "cannot write", err, errlen) < 0)
        goto rollback;
    return 0;
rollback:
    sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
    return -1;
}

int bpn_store_open(const char *path, uint64_t keep_delivered_ms,
                   bpn_store **out, char *err, size_t errlen) {
    int rc = BPN_ESTORE, locked = 0;
    bpn_store *s = NULL;
    *out = NULL;
    if (check_path(path, err, errlen) < 0) goto error;
    rc = BPN_ENOMEM;
    s = calloc(1, sizeof(*s));
    if (s) s->lock_fd = -1;
    if (!s || !(s->path = strdup(path))) {
        snprintf(err, errlen, "out of memory");
        goto error;
    }
    s->keep_delivered_ms = keep_delivered_ms;
    rc = BPN_ESTORE;
    s->lock_fd = take_lock(path, &locked, err, errlen);
    if (s->lock_fd < 0) {
        if (locked) rc = BPN_ELOCKED;
        goto error;
    }
    int orc = sqlite3_open_v2(path, &s->db,
                              SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE |
                                  SQLITE_OPEN_NOMUTEX | SQLITE_OPEN_EXRESCODE,
                              NULL);
    if (orc != SQLITE_OK) {
        snprintf(err, errlen, "store_path %s: cannot open: %s", path,
                 s->db ? sqlite3_errmsg(s->db) : sqlite3_errstr(orc));
        goto error;
    }
    if (prepare_db(s, err, errlen) < 0) goto error;
    for (int i = 0; i < S_COUNT; i++) {
        if (sqlite3_prepare_v3(s->db, sql_text[i], -1,
                               SQLITE_PREPARE_PERSISTENT, &s->st[i],
                               NULL) != SQLITE_OK) {
            snprintf(err, errlen, "store_path %s: cannot prepare (%s)", path,
                     sqlite3_errmsg(s->db));
            goto error;
        }
    }
    /* Delivered rows past their retention, from earlier runs. */
    int n;
    while ((n = bpn_store_prune(s, 10000)) > 0)
        if (bpn_store_commit(s, s->last_id) < 0) break;
    if (n < 0 || bpn_store_commit(s, s->last_id) < 0) {
        snprintf(err, errlen, "store_path %s: %s", path, s->err);
        goto error;
    }
    *out = s;
    return BPN_OK;
error:
    bpn_store_close(s);
    return rc;
}

void bpn_store_close(bpn_store *s) {
    if (!s) return;
    if (s->dirty) bpn_store_commit(s, s->last_id);
    for (int i = 0; i < S_COUNT; i++) sqlite3_finalize(s->st[i]);
    sqlite3_close(s->db); /* checkpoints and removes the WAL */
    if (s->lock_fd >= 0) close(s->lock_fd);
    free(s->path);
    free(s);
}

const char *bpn_store_prefix(const bpn_store *s) {
    return s->prefix;
}

uint64_t bpn_store_last_id(const bpn_store *s) {
    return s->last_id;
}

const char *bpn_store_path(const bpn_store *s) {
    return s->path;
}

const char *bpn_store_error(const bpn_store *s) {
    return s->err;
}

int bpn_store_dirty(const bpn_store *s) {
    return s->dirty;
}

uint64_t bpn_store_dirty_since(const bpn_store *s) {
    return s->dirty_since;
}

/* ---- reading back ------------------------------------------------------- */

int bpn_store_row_valid(const bpn_stored *r, char origin[BPN_ORIGIN_MAX]) {
    char err[128];
    if (r->job_len == 0 || r->job_len > BPN_JOB_ID_MAX) return 0;
    for (size_t i = 0; i < r->job_len; i++) {
        unsigned char c = (unsigned char)r->job_id[i];
        if (c < 0x20 || c == 0x7f) return 0;
    }
    size_t n = strlen(r->msg_id);
    if (n == 0 || n >= sizeof(((bpn_dead_letter *)0)->msg_id)) return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)r->msg_id[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') ||
              (c >= 'A' && c <= 'Z') || c == '_' || c == '-'))
            return 0;
    }
    /* notify() takes Python str: its job ids and URLs are UTF-8, and the
     * binding decodes them strictly (dead_letters()). */
    size_t url_len = strlen(r->url);
    return bpn_utf8_valid(r->job_id, r->job_len) &&
           bpn_utf8_valid(r->url, url_len) &&
           bpn_url_check(r->url, url_len, origin, err, sizeof(err)) == 0;
}

static int load_state(bpn_store *s, const char *sql,
                      int (*cb)(void *, const bpn_stored *), void *arg,
                      char *err, size_t errlen) {
    sqlite3_stmt *st = NULL;
    bpn_attempt *log = NULL;
    int rc = sqlite3_prepare_v2(s->db, sql, -1, &st, NULL);
    int result = BPN_ESTORE;
    if (rc != SQLITE_OK) goto exit;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        bpn_stored row;
        const void *blob = sqlite3_column_blob(st, 11);
        size_t blen = (size_t)sqlite3_column_bytes(st, 11);
        free(log);
        if (decode_log(blob, blen, &log, &row.nlog) < 0) {
            result = BPN_ENOMEM;
            snprintf(err, errlen, "out of memory");
            goto exit;
        }
        row.log = log;
        row.id = (uint64_t)sqlite3_column_int64(st, 0);
        row.state = sqlite3_column_int(st, 1);
        row.msg_id = (const char *)sqlite3_column_text(st, 2);
        row.job_id = (const char *)sqlite3_column_text(st, 3);
        row.job_len = (size_t)sqlite3_column_bytes(st, 3);
        row.url = (const char *)sqlite3_column_text(st, 4);
        row.origin = (const char *)sqlite3_column_text(st, 5);
        row.payload = (const char *)sqlite3_column_text(st, 6);
        row.payload_len = (size_t)sqlite3_column_bytes(st, 6);
        row.attempts = (uint32_t)sqlite3_column_int64(st, 7);
        row.due_ms = sqlite3_column_int64(st, 8);
        row.done_at = sqlite3_column_double(st, 9);
        row.last_error = (const char *)sqlite3_column_text(st, 10);
        if (!row.msg_id || !row.job_id || !row.url || !row.origin ||
            !row.payload) {
            snprintf(err, errlen, "store_path %s: row %" PRIu64 " is damaged",
                     s->path, row.id);
            goto exit_set;
        }
        if (!row.last_error) row.last_error = "";
        int crc = cb(arg, &row);
        if (crc != 0) {
            result = crc;
            if (crc == BPN_ENOMEM)
                snprintf(err, errlen, "out of memory");
            else
                snprintf(err, errlen,
                         "store_path %s: row %" PRIu64
                         " is damaged (its job id, URL or webhook-id is not "
                         "one notify() would accept); move the file away",
                         s->path, row.id);
            goto exit_set;
        }
    }
    if (rc == SQLITE_DONE) result = BPN_OK;
exit:
    if (result == BPN_ESTORE)
        snprintf(err, errlen, "store_path %s: cannot read the deliveries (%s)",
                 s->path, sqlite3_errmsg(s->db));
exit_set:
    free(log);
    sqlite3_finalize(st);
    return result;
}

int bpn_store_load(bpn_store *s, int (*cb)(void *arg, const bpn_stored *row),
                   void *arg, char *err, size_t errlen) {
#define COLS                                                             \
    "SELECT id, state, msg_id, job_id, url, origin, payload, attempts, " \
    "due_ms, done_at, last_error, log FROM deliveries "
    int rc =
        load_state(s, COLS "WHERE state = 0 ORDER BY id", cb, arg, err, errlen);
    if (rc == BPN_OK)
        rc = load_state(s, COLS "WHERE state = 2 ORDER BY done_at, id", cb, arg,
                        err, errlen);
#undef COLS
    return rc;
}

/* ---- writes ------------------------------------------------------------- */

int bpn_store_insert(bpn_store *s, uint64_t id, const char *msg_id,
                     const char *job_id, size_t job_len, const char *url,
                     size_t url_len, const char *origin, const char *payload,
                     size_t payload_len) {
    if (begin(s) < 0) return -1;
    sqlite3_stmt *st = s->st[S_INSERT];
    sqlite3_bind_int64(st, 1, (sqlite3_int64)id);
    sqlite3_bind_text(st, 2, msg_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, job_id, (int)job_len, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, url, (int)url_len, SQLITE_STATIC);
    sqlite3_bind_text(st, 5, origin, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 6, payload, (int)payload_len, SQLITE_STATIC);
    sqlite3_bind_double(st, 7, bpn_wall_f());
    return run(s, S_INSERT, "could not store a delivery");
}

int bpn_store_requeue(bpn_store *s, uint64_t old_id, uint64_t new_id) {
    if (begin(s) < 0) return -1;
    sqlite3_bind_int64(s->st[S_REQUEUE], 1, (sqlite3_int64)old_id);
    sqlite3_bind_int64(s->st[S_REQUEUE], 2, (sqlite3_int64)new_id);
    return run(s, S_REQUEUE, "could not requeue a dead letter");
}

/* Binds the attempt log as a blob at index i. Returns 0 or -1. */
static int bind_log(bpn_store *s, sqlite3_stmt *st, int i,
                    const bpn_attempt *log, uint32_t nlog) {
    size_t len = encode_log(log, nlog, NULL);
    if (len == 0) return sqlite3_bind_null(st, i) == SQLITE_OK ? 0 : -1;
    uint8_t *buf = malloc(len);
    if (!buf) {
        snprintf(s->err, sizeof(s->err), "out of memory");
        return -1;
    }
    encode_log(log, nlog, buf);
    return sqlite3_bind_blob(st, i, buf, (int)len, free) == SQLITE_OK ? 0 : -1;
}

/* Binds what a failed attempt changes (?1 id, ?2 attempts, ?4 last error,
 * ?5 attempt log; the caller bound ?3) and runs the statement. */
static int write_failure(bpn_store *s, int which, uint64_t id,
                         uint32_t attempts, const char *last_error,
                         const bpn_attempt *log, uint32_t nlog,
                         const char *what) {
    sqlite3_stmt *st = s->st[which];
    sqlite3_bind_int64(st, 1, (sqlite3_int64)id);
    sqlite3_bind_int64(st, 2, attempts);
    sqlite3_bind_text(st, 4, last_error, -1, SQLITE_STATIC);
    if (bind_log(s, st, 5, log, nlog) < 0) {
        sqlite3_clear_bindings(st);
        return -1;
    }
    return run(s, which, what);
}

int bpn_store_retry(bpn_store *s, uint64_t id, uint32_t attempts,
                    int64_t due_ms, const char *last_error,
                    const bpn_attempt *log, uint32_t nlog) {
    if (begin(s) < 0) return -1;
    sqlite3_bind_int64(s->st[S_RETRY], 3, due_ms);
    return write_failure(s, S_RETRY, id, attempts, last_error, log, nlog,
                         "could not record a failed attempt");
}

int bpn_store_delivered(bpn_store *s, uint64_t id, uint32_t attempts) {
    if (s->keep_delivered_ms == 0) return bpn_store_delete(s, id);
    if (begin(s) < 0) return -1;
    sqlite3_bind_int64(s->st[S_DELIVERED], 1, (sqlite3_int64)id);
    sqlite3_bind_double(s->st[S_DELIVERED], 2, bpn_wall_f());
    sqlite3_bind_int64(s->st[S_DELIVERED], 3, attempts);
    return run(s, S_DELIVERED, "could not record a delivery");
}

int bpn_store_dead(bpn_store *s, uint64_t id, uint32_t attempts, double done_at,
                   const char *last_error, const bpn_attempt *log,
                   uint32_t nlog) {
    if (begin(s) < 0) return -1;
    sqlite3_bind_double(s->st[S_DEAD], 3, done_at);
    return write_failure(s, S_DEAD, id, attempts, last_error, log, nlog,
                         "could not record a dead letter");
}

int bpn_store_delete(bpn_store *s, uint64_t id) {
    if (begin(s) < 0) return -1;
    sqlite3_bind_int64(s->st[S_DELETE], 1, (sqlite3_int64)id);
    return run(s, S_DELETE, "could not delete a delivery");
}

int bpn_store_prune(bpn_store *s, int limit) {
    if (begin(s) < 0) return -1;
    double cutoff = bpn_wall_f() - (double)s->keep_delivered_ms / 1000.0;
    sqlite3_bind_double(s->st[S_PRUNE], 1, cutoff);
    sqlite3_bind_int(s->st[S_PRUNE], 2, limit);
    if (run(s, S_PRUNE, "could not prune delivered rows") < 0) return -1;
    return sqlite3_changes(s->db);
}

int bpn_store_commit(bpn_store *s, uint64_t last_id) {
    if (!s->dirty) return 0;
    if (last_id > s->last_id) s->last_id = last_id;
    /* A transaction that changed nothing commits without writing. */
    int meta = s->last_id != s->saved_last_id;
    if (meta) sqlite3_bind_int64(s->st[S_META], 1, (sqlite3_int64)s->last_id);
    if ((meta && run(s, S_META, "could not record the last id") < 0) ||
        run(s, S_COMMIT, "could not commit") < 0) {
        if (!sqlite3_get_autocommit(s->db))
            run(s, S_ROLLBACK, "could not roll back");
        s->dirty = 0;
        return -1;
    }
    s->saved_last_id = s->last_id;
    s->dirty = 0;
    return 0;
}
