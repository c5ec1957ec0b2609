/* The Retry-After header of a 429/503 answer (RFC 9110 10.2.3), parsed
 * apart from libcurl's header API so it can be tested and fuzzed alone. */
#ifndef BPN_RETRY_AFTER_H
#define BPN_RETRY_AFTER_H

#include <stdint.h>
#include <time.h>

/* Milliseconds the receiver asks us to wait, from the header's value (a
 * NUL-terminated string): delta-seconds or an HTTP-date, judged against
 * now (wall clock seconds). 0 when the value is neither or the date has
 * passed. */
uint64_t bpn_retry_after_parse(const char *value, time_t now);

#endif
