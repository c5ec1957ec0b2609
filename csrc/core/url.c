#include "url.h"

#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common.h"

/* The last URL that passed, per thread: orchestrators send most webhooks of
 * a run to the same few URLs, and curl_url parsing is most of notify()'s
 * native cost. */
#define CACHE_URL_MAX 512
static _Thread_local size_t cached_len;
static _Thread_local char cached_url[CACHE_URL_MAX];
static _Thread_local char cached_origin[BPN_ORIGIN_MAX];

static int url_check_uncached(const char *url, size_t len,
                              char origin[BPN_ORIGIN_MAX], char *err,
                              size_t errlen);

void bpn_url_redact(const char *url, char *out, size_t outlen) {
    if (outlen == 0) return;
    const char *auth = strstr(url, "://");
    const char *at = NULL;
    if (auth) {
        auth += 3;
        /* The authority ends at the path, query or fragment. */
        size_t n = strcspn(auth, "/?#");
        for (size_t i = 0; i < n; i++)
            if (auth[i] == '@') at = auth + i; /* the last one */
    }
    if (!at) {
        snprintf(out, outlen, "%s", url);
        return;
    }
    snprintf(out, outlen, "%.*s***%s", (int)(auth - url), url, at);
}

int bpn_url_check(const char *url, size_t len, char origin[BPN_ORIGIN_MAX],
                  char *err, size_t errlen) {
    if (len == cached_len && len > 0 && memcmp(url, cached_url, len) == 0) {
        memcpy(origin, cached_origin, strlen(cached_origin) + 1);
        return 0;
    }
    if (url_check_uncached(url, len, origin, err, errlen) < 0) return -1;
    if (len <= CACHE_URL_MAX) {
        memcpy(cached_url, url, len);
        memcpy(cached_origin, origin, strlen(origin) + 1);
        cached_len = len;
    }
    return 0;
}

static int url_check_uncached(const char *url, size_t len,
                              char origin[BPN_ORIGIN_MAX], char *err,
                              size_t errlen) {
    int rc = -1;
    char *scheme = NULL, *host = NULL, *port = NULL;
    CURLU *u = NULL;
    if (len == 0 || len > BPN_URL_MAX) {
        snprintf(err, errlen, "must be 1 to %d bytes long", BPN_URL_MAX);
        goto exit;
    }
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)url[i];
        if (c <= 0x20 || c == 0x7f) {
            snprintf(err, errlen,
                     "must not contain spaces or control characters");
            goto exit;
        }
    }
    if (strlen(url) != len) {
        snprintf(err, errlen, "must not contain NUL characters");
        goto exit;
    }
    u = curl_url();
    if (!u) {
        snprintf(err, errlen, "out of memory");
        goto exit;
    }
    if (curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK) {
        snprintf(err, errlen, "must be an absolute http:// or https:// URL");
        goto exit;
    }
    if (strcasecmp(scheme, "http") != 0 && strcasecmp(scheme, "https") != 0) {
        snprintf(err, errlen, "scheme must be http or https, not %.32s",
                 scheme);
        goto exit;
    }
    if (curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK || !*host) {
        snprintf(err, errlen, "must have a host");
        goto exit;
    }
    /* libcurl percent-decodes the host and refuses control characters in
     * it, but lets DEL and any byte >= 0x80 through: "a%7fb" or "%ff" can
     * never resolve and would carry raw bytes into errors and logs. UTF-8
     * stays (international names). */
    size_t hlen = strlen(host);
    if (memchr(host, 0x7f, hlen) || !bpn_utf8_valid(host, hlen)) {
        snprintf(err, errlen,
                 "host must not decode to DEL or bytes that are not UTF-8");
        goto exit;
    }
    /* libcurl takes port 0, where nothing can be reached: every attempt
     * would fail until the delivery is dead-lettered. */
    if (curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT) !=
            CURLUE_OK ||
        strtoul(port, NULL, 10) == 0) {
        snprintf(err, errlen, "has an invalid port");
        goto exit;
    }
    /* Host names are case-insensitive: one origin (one connection cap) per
     * host however its URLs spell it. libcurl lowercases the scheme. */
    for (char *c = host; *c; c++)
        if (*c >= 'A' && *c <= 'Z') *c = (char)(*c - 'A' + 'a');
    if ((size_t)snprintf(origin, BPN_ORIGIN_MAX, "%s://%s:%s", scheme, host,
                         port) >= BPN_ORIGIN_MAX) {
        snprintf(err, errlen, "host name is too long");
        goto exit;
    }
    rc = 0;
exit:
    curl_free(scheme);
    curl_free(host);
    curl_free(port);
    curl_url_cleanup(u);
    return rc;
}
