/* Webhook URL validation, shared by notify() (to reject bad input at once)
 * and the delivery engine (to key connection limits by origin). */
#ifndef BPN_URL_H
#define BPN_URL_H

#include <stddef.h>

#define BPN_ORIGIN_MAX 512

/* Checks that url is an absolute http(s) URL with a host, a port other
 * than 0 and no control characters or spaces, and writes its origin
 * "scheme://host:port" into origin. url[len] must be readable and '\0' (a
 * NUL before it is refused). Returns 0, or -1 with a reason in err
 * (errlen >= 1). */
int bpn_url_check(const char *url, size_t len, char origin[BPN_ORIGIN_MAX],
                  char *err, size_t errlen);

/* Copies url into out (NUL-terminated, cut to outlen - 1 bytes) with its
 * userinfo, if any, replaced by three asterisks: the user and password of
 * an http URL never reach a log line; scheme, host and path do. */
void bpn_url_redact(const char *url, char *out, size_t outlen);

#endif
