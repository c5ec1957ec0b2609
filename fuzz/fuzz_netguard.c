/* bpn_netguard_check / bpn_netguard_format: the SSRF guard, fed arbitrary
 * socket addresses (what libcurl's open-socket callback hands over).
 *
 * Input: byte 0 picks the family (AF_INET, AF_INET6 or the raw value of
 * byte 1), byte 2 the length handed over (any length up to a
 * sockaddr_storage, including too short ones), the rest the address bytes.
 * The address is an exactly sized heap block, so ASan sees any read past
 * the length the guard was given. Properties:
 *   - the verdict is deterministic, and NULL or a non-empty text;
 *   - an IPv4 address gets the same verdict as its IPv4-mapped
 *     (::ffff:a.b.c.d) and NAT64 (64:ff9b::a.b.c.d) forms; a blocked one
 *     stays blocked in its 6to4 form (2002:AABB:CCDD::);
 *   - a few must-block ranges are blocked whatever else the table says:
 *     0/8, 10/8, 127/8, 169.254/16, 172.16/12, 192.168/16, 224/4, 240/4,
 *     ::, ::1, fc00::/7, fe80::/10, ff00::/8;
 *   - a family other than IPv4/IPv6, or a length too short for the family,
 *     is refused;
 *   - the text form is NUL-terminated within any buffer size, and with room
 *     enough it parses back (inet_pton) to the same address. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "../csrc/core/netguard.h"
#include "fuzz_util.h"

static const char *check_exact(const void *sa, size_t len) {
    /* An exactly sized copy: reading past len is a heap overflow. */
    char *copy = fuzz_dup(sa, len, 0);
    const char *why =
        bpn_netguard_check((const struct sockaddr *)copy, (socklen_t)len);
    const char *again =
        bpn_netguard_check((const struct sockaddr *)copy, (socklen_t)len);
    CHECK(why == again, "not deterministic");
    CHECK(!why || why[0], "empty reason");
    free(copy);
    return why;
}

static void check_format(const void *sa, size_t len, int family,
                         const uint8_t *addr, size_t alen, size_t bufsize) {
    char *copy = fuzz_dup(sa, len, 0);
    char *buf = malloc(bufsize);
    if (!buf) abort();
    bpn_netguard_format((const struct sockaddr *)copy, (socklen_t)len, buf,
                        bufsize);
    CHECK(strnlen(buf, bufsize) < bufsize, "format not terminated in %zu",
          bufsize);
    if (bufsize >= INET6_ADDRSTRLEN && family) {
        uint8_t back[16];
        CHECK(inet_pton(family, buf, back) == 1, "format %s does not parse",
              buf);
        CHECK(memcmp(back, addr, alen) == 0, "format %s is another address",
              buf);
    }
    free(buf);
    free(copy);
}

static int v4_must_block(const uint8_t *a) {
    return a[0] == 0 || a[0] == 10 || a[0] == 127 ||
           (a[0] == 169 && a[1] == 254) || (a[0] == 172 && (a[1] >> 4) == 1) ||
           (a[0] == 192 && a[1] == 168) || a[0] >= 224;
}

static int v6_must_block(const uint8_t *a) {
    static const uint8_t zero[16];
    return (memcmp(a, zero, 15) == 0 && a[15] <= 1) || (a[0] & 0xfe) == 0xfc ||
           (a[0] == 0xfe && (a[1] & 0xc0) == 0x80) || a[0] == 0xff;
}

static const char *check_v6_bytes(const uint8_t b[16]) {
    struct sockaddr_in6 in6;
    memset(&in6, 0, sizeof(in6));
    in6.sin6_family = AF_INET6;
    memcpy(in6.sin6_addr.s6_addr, b, 16);
    return check_exact(&in6, sizeof(in6));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_in in = {data, size};
    uint8_t pick = fuzz_u8(&in), raw_family = fuzz_u8(&in);
    size_t len = fuzz_u8(&in) % (sizeof(struct sockaddr_storage) + 1);
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    const uint8_t *rest;
    size_t n = fuzz_take(&in, sizeof(ss), &rest);
    memcpy(&ss, rest, n);
    int family = pick % 3 == 0   ? AF_INET
                 : pick % 3 == 1 ? AF_INET6
                                 : raw_family;
    ss.ss_family = (sa_family_t)family;

    /* Whatever length, whatever family: no overread, a sane answer. */
    const char *why = check_exact(&ss, len);
    size_t need = family == AF_INET    ? sizeof(struct sockaddr_in)
                  : family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                       : 0;
    if (!need || len < need)
        CHECK(why, "family %d, length %zu: allowed", family, len);
    check_format(&ss, len, 0, NULL, 0, (size_t)(pick % 64) + 1);
    if (!need) return 0;

    /* The full address. */
    why = check_exact(&ss, need);
    if (family == AF_INET) {
        const struct sockaddr_in *in4 = (const struct sockaddr_in *)&ss;
        const uint8_t *a = (const uint8_t *)&in4->sin_addr;
        if (v4_must_block(a))
            CHECK(why, "%u.%u.%u.%u allowed", a[0], a[1], a[2], a[3]);
        uint8_t m[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
        memcpy(m + 12, a, 4);
        CHECK(check_v6_bytes(m) == why, "::ffff:%u.%u.%u.%u judged apart", a[0],
              a[1], a[2], a[3]);
        uint8_t nat64[16] = {0, 0x64, 0xff, 0x9b};
        memcpy(nat64 + 12, a, 4);
        CHECK(check_v6_bytes(nat64) == why, "64:ff9b::%u.%u.%u.%u judged apart",
              a[0], a[1], a[2], a[3]);
        uint8_t six[16] = {0x20, 0x02};
        memcpy(six + 2, a, 4);
        memcpy(six + 6, rest + (n > 10 ? n - 10 : 0), n > 10 ? 10 : 0);
        if (why)
            CHECK(check_v6_bytes(six), "6to4 of %u.%u.%u.%u allowed", a[0],
                  a[1], a[2], a[3]);
        check_format(&ss, need, AF_INET, a, 4, INET6_ADDRSTRLEN);
    } else {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)&ss;
        const uint8_t *a = in6->sin6_addr.s6_addr;
        if (v6_must_block(a)) CHECK(why, "IPv6 address allowed");
        check_format(&ss, need, AF_INET6, a, 16, INET6_ADDRSTRLEN);
    }
    for (size_t b = 1; b <= INET6_ADDRSTRLEN + 1; b += 7)
        check_format(&ss, need, 0, NULL, 0, b);
    return 0;
}
