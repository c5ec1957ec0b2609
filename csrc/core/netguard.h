/* The SSRF guard: which peer addresses a webhook may connect to. */
#ifndef BPN_NETGUARD_H
#define BPN_NETGUARD_H

#include <sys/socket.h>

/* Returns NULL if the address is globally routable, else a short reason
 * ("loopback address", "private network (RFC 1918)", ...). IPv4-mapped,
 * IPv4-compatible, NAT64 and 6to4 IPv6 forms are judged by the IPv4 address
 * they carry. The result is a static string. */
const char *bpn_netguard_check(const struct sockaddr *sa, socklen_t len);

/* Renders the address (len bytes at sa) as text into buf, NUL-terminated
 * (size >= 1), for error messages. */
void bpn_netguard_format(const struct sockaddr *sa, socklen_t len, char *buf,
                         size_t size);

#endif
