#include "retry_after.h"

#include <curl/curl.h>

uint64_t bpn_retry_after_parse(const char *value, time_t now) {
    /* Any wait too long for 64-bit milliseconds is UINT64_MAX (the caller
     * caps it): wrapping around would turn a huge wait into a short one. */
    const uint64_t max_secs = UINT64_MAX / 1000;
    const char *v = value;
    while (*v == ' ' || *v == '\t') v++;
    if (*v >= '0' && *v <= '9') {
        uint64_t secs = 0;
        for (; *v >= '0' && *v <= '9'; v++) {
            unsigned digit = (unsigned)(*v - '0');
            if (secs > (max_secs - digit) / 10) return UINT64_MAX;
            secs = secs * 10 + digit;
        }
        return secs * 1000;
    }
    time_t when = curl_getdate(v, NULL);
    if (when == (time_t)-1 || when <= now) return 0;
    /* when > now: their difference fits in 64 unsigned bits. */
    uint64_t secs = (uint64_t)when - (uint64_t)now;
    return secs > max_secs ? UINT64_MAX : secs * 1000;
}
