#include "netguard.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

typedef struct {
    uint32_t net;
    unsigned bits;
    const char *why;
} v4_range;

/* Everything that is not global unicast (IANA special-purpose registry). */
static const v4_range v4_blocked[] = {
    {0x00000000u, 8, "\"this network\" address (0.0.0.0/8)"},
    {0x0a000000u, 8, "private network address (10.0.0.0/8)"},
    {0x64400000u, 10, "carrier-grade NAT address (100.64.0.0/10)"},
    {0x7f000000u, 8, "loopback address (127.0.0.0/8)"},
    {0xa9fe0000u, 16,
     "link-local address (169.254.0.0/16, includes cloud metadata)"},
    {0xac100000u, 12, "private network address (172.16.0.0/12)"},
    {0xc0000000u, 24, "IETF protocol assignment (192.0.0.0/24)"},
    {0xc0000200u, 24, "documentation address (192.0.2.0/24)"},
    {0xc0586300u, 24, "6to4 relay anycast address (192.88.99.0/24)"},
    {0xc0a80000u, 16, "private network address (192.168.0.0/16)"},
    {0xc6120000u, 15, "benchmarking address (198.18.0.0/15)"},
    {0xc6336400u, 24, "documentation address (198.51.100.0/24)"},
    {0xcb007100u, 24, "documentation address (203.0.113.0/24)"},
    {0xe0000000u, 4, "multicast address (224.0.0.0/4)"},
    {0xf0000000u, 4, "reserved address (240.0.0.0/4)"},
};

static const char *check_v4(uint32_t a) {
    for (size_t i = 0; i < sizeof(v4_blocked) / sizeof(v4_blocked[0]); i++) {
        uint32_t mask = 0xffffffffu << (32 - v4_blocked[i].bits);
        if ((a & mask) == v4_blocked[i].net) return v4_blocked[i].why;
    }
    return NULL;
}

static uint32_t load_be32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 |
           (uint32_t)p[3];
}

static int all_zero(const uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (p[i]) return 0;
    return 1;
}

static const char *check_v6(const uint8_t *b) {
    static const uint8_t mapped[12] = {0, 0, 0, 0, 0,    0,
                                       0, 0, 0, 0, 0xff, 0xff};
    static const uint8_t nat64[12] = {0x00, 0x64, 0xff, 0x9b, 0, 0,
                                      0,    0,    0,    0,    0, 0};
    if (memcmp(b, mapped, 12) == 0 || memcmp(b, nat64, 12) == 0)
        return check_v4(load_be32(b + 12));
    if (all_zero(b, 15)) {
        if (b[15] == 0) return "unspecified IPv6 address (::)";
        if (b[15] == 1) return "IPv6 loopback address (::1)";
    }
    if (all_zero(b, 12)) return "IPv4-compatible IPv6 address (::/96)";
    if (b[0] == 0x20 && b[1] == 0x02) { /* 6to4 carries an IPv4 address */
        const char *why = check_v4(load_be32(b + 2));
        if (why) return why;
    }
    if ((b[0] & 0xfe) == 0xfc) return "IPv6 unique local address (fc00::/7)";
    if (b[0] == 0xfe && (b[1] & 0xc0) == 0x80)
        return "IPv6 link-local address (fe80::/10)";
    if (b[0] == 0xfe && (b[1] & 0xc0) == 0xc0)
        return "IPv6 site-local address (fec0::/10)";
    if (b[0] == 0xff) return "IPv6 multicast address (ff00::/8)";
    if (b[0] == 0x01 && b[1] == 0x00 && all_zero(b + 2, 6))
        return "IPv6 discard-only address (100::/64)";
    if (b[0] == 0x20 && b[1] == 0x01 && b[2] == 0x0d && b[3] == 0xb8)
        return "IPv6 documentation address (2001:db8::/32)";
    if (b[0] == 0x20 && b[1] == 0x01 && b[2] < 0x02)
        return "IPv6 IETF protocol assignment (2001::/23)";
    return NULL;
}

const char *bpn_netguard_check(const struct sockaddr *sa, socklen_t len) {
    if (len < (socklen_t)sizeof(sa->sa_family))
        return "address too short to name its family";
    if (sa->sa_family == AF_INET &&
        len >= (socklen_t)sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *in =
            (const struct sockaddr_in *)(const void *)sa;
        return check_v4(ntohl(in->sin_addr.s_addr));
    }
    if (sa->sa_family == AF_INET6 &&
        len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *in6 =
            (const struct sockaddr_in6 *)(const void *)sa;
        return check_v6(in6->sin6_addr.s6_addr);
    }
    return "address family other than IPv4/IPv6";
}

void bpn_netguard_format(const struct sockaddr *sa, socklen_t len, char *buf,
                         size_t size) {
    const void *addr = NULL;
    int family =
        len >= (socklen_t)sizeof(sa->sa_family) ? sa->sa_family : AF_UNSPEC;
    if (family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in))
        addr = &((const struct sockaddr_in *)(const void *)sa)->sin_addr;
    else if (family == AF_INET6 &&
             len >= (socklen_t)sizeof(struct sockaddr_in6))
        addr = &((const struct sockaddr_in6 *)(const void *)sa)->sin6_addr;
    if (!addr || !inet_ntop(family, addr, buf, (socklen_t)size))
        snprintf(buf, size, "(unknown address)");
}
