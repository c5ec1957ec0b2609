/* bpn_retry_after_parse: the Retry-After value of a 429/503 answer, which
 * any webhook receiver controls.
 *
 * Input: 8 bytes of "now" (any time_t), then the header value (copied into
 * an exactly sized, NUL-terminated block: reading past the NUL is a heap
 * overflow). Properties:
 *   - the same value and time give the same answer;
 *   - delta-seconds (optional spaces/tabs, then digits): exactly the number
 *     of seconds times 1000, saturating at UINT64_MAX, never wrapping; so
 *     one more digit never gives less;
 *   - HTTP-date: a whole number of seconds (or UINT64_MAX), and later
 *     "now"s never give more: one second later gives exactly 1000 ms less
 *     (until 0), or both saturate;
 *   - a realistic clock (2023) and the fuzzed one agree on the digits
 *     path, which does not depend on the time. */
#include <time.h>

#include "../csrc/core/retry_after.h"
#include "fuzz_util.h"

/* Saturating reference for the digits path, in 128 bits. */
static uint64_t ref_digits(const char *v) {
    unsigned __int128 secs = 0;
    const unsigned __int128 cap = UINT64_MAX;
    for (; *v >= '0' && *v <= '9'; v++) {
        secs = secs * 10 + (unsigned)(*v - '0');
        if (secs > cap) return UINT64_MAX;
    }
    unsigned __int128 ms = secs * 1000;
    return ms > cap ? UINT64_MAX : (uint64_t)ms;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > 4096) return 0;
    fuzz_in in = {data, size};
    time_t now = (time_t)fuzz_u64(&in);
    const uint8_t *rest;
    size_t n = fuzz_take(&in, size, &rest);
    char *v = fuzz_dup(rest, n, 1);

    uint64_t r = bpn_retry_after_parse(v, now);
    CHECK(r == bpn_retry_after_parse(v, now), "not deterministic");
    const char *p = v;
    while (*p == ' ' || *p == '\t') p++;
    if (*p >= '0' && *p <= '9') {
        uint64_t want = ref_digits(p);
        CHECK(r == want, "\"%s\": %llu ms, want %llu", v, (unsigned long long)r,
              (unsigned long long)want);
        CHECK(bpn_retry_after_parse(v, 1700000000) == r,
              "\"%s\": depends on the time", v);
    } else {
        CHECK(r == UINT64_MAX || r % 1000 == 0, "\"%s\": %llu ms", v,
              (unsigned long long)r);
        if (now < INT64_MAX) {
            uint64_t later = bpn_retry_after_parse(v, now + 1);
            if (r == 0) {
                CHECK(later == 0, "\"%s\": 0, a second later %llu", v,
                      (unsigned long long)later);
            } else if (r != UINT64_MAX) {
                CHECK(later == r - 1000, "\"%s\": %llu, a second later %llu", v,
                      (unsigned long long)r, (unsigned long long)later);
            } else {
                CHECK(later >= UINT64_MAX - 1000,
                      "\"%s\": saturated, then %llu", v,
                      (unsigned long long)later);
            }
        }
    }
    free(v);
    return 0;
}
