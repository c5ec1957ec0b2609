/* Shared helpers of the libFuzzer harnesses (see tools/fuzz.sh).
 *
 * Every harness checks properties, not only the absence of crashes: a
 * violated property prints what was wrong and aborts, which libFuzzer
 * reports as a crash and saves the input. */
#ifndef BPN_FUZZ_UTIL_H
#define BPN_FUZZ_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(cond, ...)                                                      \
    do {                                                                      \
        if (!(cond)) {                                                        \
            fprintf(stderr, "\nPROPERTY VIOLATED at %s:%d: %s\n  ", __FILE__, \
                    __LINE__, #cond);                                         \
            fprintf(stderr, __VA_ARGS__);                                     \
            fputc('\n', stderr);                                              \
            abort();                                                          \
        }                                                                     \
    } while (0)

/* A heap copy of exactly n bytes (plus a NUL when nul is set), so ASan
 * reports a read one byte past what the callee was given. */
static inline char *fuzz_dup(const uint8_t *data, size_t n, int nul) {
    size_t size = n + (nul ? 1 : 0);
    char *p = malloc(size); /* ASan: even a 0-byte block has no readable byte */
    if (!p && size) abort();
    if (n) memcpy(p, data, n);
    if (nul) p[n] = '\0';
    return p;
}

/* Reads the input front to back; past the end every read gives zeros. */
typedef struct {
    const uint8_t *p;
    size_t n;
} fuzz_in;

static inline uint8_t fuzz_u8(fuzz_in *in) {
    if (!in->n) return 0;
    in->n--;
    return *in->p++;
}

static inline uint64_t fuzz_u64(fuzz_in *in) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = v << 8 | fuzz_u8(in);
    return v;
}

/* Takes up to n bytes; returns how many were taken. */
static inline size_t fuzz_take(fuzz_in *in, size_t n, const uint8_t **out) {
    if (n > in->n) n = in->n;
    *out = in->p;
    in->p += n;
    in->n -= n;
    return n;
}

/* 1 if s[0..n) is well-formed UTF-8 as Python's strict decoder sees it (no
 * overlong forms, no surrogates, nothing above U+10FFFF). Written as a
 * decoder, independently of the core's validator, to cross-check it. */
static inline int fuzz_utf8_ok(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint32_t c = s[i];
        size_t k;
        uint32_t min;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xe0) == 0xc0) {
            k = 1, min = 0x80, c &= 0x1f;
        } else if ((c & 0xf0) == 0xe0) {
            k = 2, min = 0x800, c &= 0x0f;
        } else if ((c & 0xf8) == 0xf0) {
            k = 3, min = 0x10000, c &= 0x07;
        } else {
            return 0;
        }
        if (i + k >= n) return 0; /* truncated sequence */
        for (size_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xc0) != 0x80) return 0;
            c = c << 6 | (s[i + j] & 0x3f);
        }
        if (c < min || c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff)) return 0;
        i += k + 1;
    }
    return 1;
}

#endif
