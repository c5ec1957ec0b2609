#include "common.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/random.h>
#include <time.h>

uint64_t bpn_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

uint64_t bpn_now_realtime_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

uint64_t bpn_now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static atomic_uint fork_generation;
static pthread_once_t fork_once = PTHREAD_ONCE_INIT;

static void on_fork_child(void) {
    atomic_fetch_add_explicit(&fork_generation, 1, memory_order_relaxed);
}

static void register_fork_handler(void) {
    pthread_atfork(NULL, NULL, on_fork_child);
}

unsigned bpn_fork_generation(void) {
    pthread_once(&fork_once, register_fork_handler);
    return atomic_load_explicit(&fork_generation, memory_order_relaxed);
}

int64_t bpn_wall_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec;
}

double bpn_wall_f(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int bpn_random_bytes(void *buf, size_t n) {
    uint8_t *p = buf;
    while (n > 0) {
        ssize_t got = getrandom(p, n, 0);
        if (got < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += got;
        n -= (size_t)got;
    }
    return 0;
}

void bpn_hex_encode(char *dst, const uint8_t *src, size_t n) {
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        dst[2 * i] = digits[src[i] >> 4];
        dst[2 * i + 1] = digits[src[i] & 0x0f];
    }
}

size_t bpn_base64_encode(char *dst, const uint8_t *src, size_t n) {
    static const char tbl[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0, i = 0;
    for (; i + 2 < n; i += 3) {
        uint32_t v = (uint32_t)src[i] << 16 | (uint32_t)src[i + 1] << 8 |
                     (uint32_t)src[i + 2];
        dst[o++] = tbl[v >> 18];
        dst[o++] = tbl[(v >> 12) & 63];
        dst[o++] = tbl[(v >> 6) & 63];
        dst[o++] = tbl[v & 63];
    }
    if (i < n) {
        uint32_t v = (uint32_t)src[i] << 16;
        if (i + 1 < n) v |= (uint32_t)src[i + 1] << 8;
        dst[o++] = tbl[v >> 18];
        dst[o++] = tbl[(v >> 12) & 63];
        dst[o++] = i + 1 < n ? tbl[(v >> 6) & 63] : '=';
        dst[o++] = '=';
    }
    return o;
}

int bpn_utf8_valid(const char *s, size_t n) {
    /* The well-formed byte sequences of Unicode's table 3-7. */
    const unsigned char *p = (const unsigned char *)s, *end = p + n;
    while (p < end) {
        unsigned c = *p;
        if (c < 0x80) {
            p++;
            continue;
        }
        size_t k;                      /* continuation bytes */
        unsigned lo = 0x80, hi = 0xbf; /* range of the second byte */
        if (c >= 0xc2 && c <= 0xdf) {
            k = 1;
        } else if (c >= 0xe0 && c <= 0xef) {
            k = 2;
            if (c == 0xe0) lo = 0xa0; /* overlong */
            if (c == 0xed) hi = 0x9f; /* surrogates */
        } else if (c >= 0xf0 && c <= 0xf4) {
            k = 3;
            if (c == 0xf0) lo = 0x90; /* overlong */
            if (c == 0xf4) hi = 0x8f; /* above U+10FFFF */
        } else {
            return 0;
        }
        if ((size_t)(end - p) <= k || p[1] < lo || p[1] > hi) return 0;
        for (size_t i = 2; i <= k; i++)
            if ((p[i] & 0xc0) != 0x80) return 0;
        p += k + 1;
    }
    return 1;
}

const char *bpn_strerror(int err) {
    switch (err) {
        case BPN_OK: return "success";
        case BPN_ENOMEM: return "out of memory";
        case BPN_EINVAL: return "invalid argument";
        case BPN_ECLOSED: return "notifier is closed";
        case BPN_ELIMIT: return "channel limit reached";
        case BPN_ESYS: return "system call failed";
        case BPN_ECURL: return "libcurl initialisation failed";
        case BPN_EAUTH: return "unknown job or wrong token";
        case BPN_ESTORE: return "the store cannot be used";
        case BPN_ELOCKED: return "the store is in use by another notifier";
        default: return "unknown error";
    }
}
