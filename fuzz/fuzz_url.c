/* bpn_url_check: webhook URLs from notify() and from store rows.
 *
 * Includes url.c to reach url_check_uncached, so the per-thread cache can
 * be checked against the parser behind it. Properties:
 *   - the cached and uncached answers agree (result and origin), and a
 *     second call (a cache hit) gives the same answer again;
 *   - an accepted URL is 1..BPN_URL_MAX bytes with no byte <= 0x20, 0x7f
 *     or NUL;
 *   - its origin is NUL-terminated within BPN_ORIGIN_MAX and reads
 *     "http://" or "https://", a host (no control characters, spaces, '/',
 *     '?', '#', '@' or '\\': no path or userinfo leaks into it; no DEL, which
 *     libcurl decodes from "%7f"), ':' and a
 *     port 1..65535 without leading zeros;
 *   - the origin's host is UTF-8 (libcurl decodes "%ff" into the host);
 *   - no ASCII capital in the origin: one origin (one connection cap) per
 *     host, however its URLs spell its case;
 *   - when the URL has no '%', its origin, as a URL with a "/" appended, is
 *     accepted with the same origin (origins are fixed points). libcurl
 *     percent-decodes hosts after normalizing numeric IPv4 forms, so with a
 *     '%' they are not: http://07064%33/ has the origin http://070643:80,
 *     which is http://0.0.113.163:80 when parsed again, and "%25bb" or
 *     "%2506" decode to "%bb" or "%06", other bytes on a second pass;
 *   - a refusal leaves a non-empty, NUL-terminated reason, even in a small
 *     err buffer (exactly sized, so ASan sees any overflow). */
#include "../csrc/core/url.c"
#include "fuzz_util.h"

static void check_origin(const char *origin, const char *url) {
    size_t olen = strnlen(origin, BPN_ORIGIN_MAX);
    CHECK(olen < BPN_ORIGIN_MAX, "origin not terminated for %s", url);
    const char *host;
    if (strncmp(origin, "http://", 7) == 0)
        host = origin + 7;
    else if (strncmp(origin, "https://", 8) == 0)
        host = origin + 8;
    else
        CHECK(0, "origin %s of %s has another scheme", origin, url);
    const char *colon = strrchr(host, ':');
    CHECK(colon && colon > host, "origin %s of %s: no host:port", origin, url);
    for (const char *c = host; c < colon; c++) {
        unsigned char b = (unsigned char)*c;
        CHECK(b > 0x20 && b != 0x7f && !strchr("/?#@\\", b),
              "origin %s of %s: byte 0x%02x in the host", origin, url, b);
    }
    CHECK(bpn_utf8_valid(host, (size_t)(colon - host)),
          "origin %s of %s: host is not UTF-8", origin, url);
    const char *port = colon + 1;
    size_t plen = strlen(port);
    CHECK(plen >= 1 && plen <= 5 && port[0] != '0' &&
              strspn(port, "0123456789") == plen,
          "origin %s of %s: bad port", origin, url);
    long p = strtol(port, NULL, 10);
    CHECK(p >= 1 && p <= 65535, "origin %s of %s: port %ld", origin, url, p);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > BPN_URL_MAX + 16) return 0;
    /* Callers hand a NUL-terminated string and its length. */
    char *url = fuzz_dup(data, size, 1);
    char origin[BPN_ORIGIN_MAX], origin2[BPN_ORIGIN_MAX],
        origin3[BPN_ORIGIN_MAX];
    char err[128];
    memset(origin, 0x55, sizeof(origin));

    int rc = url_check_uncached(url, size, origin, err, sizeof(err));
    int rc2 = bpn_url_check(url, size, origin2, err, sizeof(err));
    int rc3 = bpn_url_check(url, size, origin3, err, sizeof(err));
    CHECK(rc == rc2 && rc2 == rc3, "uncached %d, first %d, cached %d", rc, rc2,
          rc3);

    if (rc == 0) {
        CHECK(size >= 1 && size <= BPN_URL_MAX, "accepted %zu bytes", size);
        for (size_t i = 0; i < size; i++) {
            unsigned char c = data[i];
            CHECK(c > 0x20 && c != 0x7f, "accepted byte 0x%02x at %zu", c, i);
        }
        CHECK(strcmp(origin, origin2) == 0 && strcmp(origin2, origin3) == 0,
              "origins differ: %s / %s / %s", origin, origin2, origin3);
        check_origin(origin, url);

        for (const char *c = origin; *c; c++)
            CHECK(*c < 'A' || *c > 'Z', "capital in origin %s of %s", origin,
                  url);
        if (!memchr(data, '%', size)) {
            char again[BPN_ORIGIN_MAX + 2], origin4[BPN_ORIGIN_MAX];
            int n = snprintf(again, sizeof(again), "%s/", origin);
            int rc4 =
                bpn_url_check(again, (size_t)n, origin4, err, sizeof(err));
            CHECK(rc4 == 0, "origin %s of %s refused: %s", origin, url, err);
            CHECK(strcmp(origin, origin4) == 0,
                  "origin of %s is %s, of %s is %s", url, origin, again,
                  origin4);
        }
    } else {
        CHECK(strnlen(err, sizeof(err)) < sizeof(err) && err[0],
              "no reason for refusing %s", url);
        /* A small reason buffer, exactly sized. */
        size_t elen = size ? (size_t)(data[0] % 24) + 1 : 1;
        char *small = malloc(elen);
        if (!small) abort();
        int rcs = url_check_uncached(url, size, origin3, small, elen);
        CHECK(rcs == -1, "refused, then accepted");
        CHECK(strnlen(small, elen) < elen, "reason not terminated");
        free(small);
    }
    free(url);
    return 0;
}
