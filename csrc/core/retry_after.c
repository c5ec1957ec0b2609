#include "retry_after.h"

#include <curl/curl.h>

uint64_t bpn_retry_after_parse(const char *value, time_t now) {
    const char *v = value;
    while (*v == ' ' || *v == '\t') v++;
    if (*v >= '0' && *v <= '9') {
        uint64_t secs = 0;
        for (; *v >= '0' && *v <= '9'; v++) {
            if (secs > UINT64_MAX / 10000) return UINT64_MAX;
            secs = secs * 10 + (uint64_t)(*v - '0');
        }
        return secs * 1000;
    }
    time_t when = curl_getdate(v, NULL);
    if (when == (time_t)-1 || when <= now) return 0;
    return (uint64_t)(when - now) * 1000;
}
