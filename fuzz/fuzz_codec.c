/* Hex, base64, UTF-8 validation and the webhook signatures (common.c,
 * sign.c), fed arbitrary keys, webhook-ids, timestamps and bodies.
 *
 * Input: key length (byte 0) and key, webhook-id length (byte 1) and id,
 * timestamp (8 bytes), then the body. Properties:
 *   - bpn_hex_encode writes exactly 2n lowercase hex digits that decode back
 *     to the input, and nothing past them;
 *   - bpn_base64_encode writes exactly 4*ceil(n/3) characters of the
 *     standard alphabet with correct padding, which decode back to the input
 *     (OpenSSL's EVP_DecodeBlock as the reference), and nothing past them;
 *   - bpn_signer_hex is the hex of HMAC-SHA256(key, "<ts>.<body>") and
 *     bpn_signer_std the base64 of HMAC-SHA256(key, "<id>.<ts>.<body>"),
 *     both NUL-terminated, checked against OpenSSL's one-shot HMAC();
 *     bpn_signer_std refuses (-1) exactly when "<id>.<ts>." does not fit
 *     its 160-byte prefix buffer;
 *   - a signer gives the same answer twice (the reused MAC context is
 *     reset between messages);
 *   - bpn_utf8_valid agrees with an independent decoder (fuzz_util.h) on
 *     the whole input and on every suffix of its first 16 bytes. */
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "../csrc/core/common.h"
#include "../csrc/core/sign.h"
#include "fuzz_util.h"

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

static void check_hex(const uint8_t *src, size_t n) {
    char *out = malloc(2 * n + 1);
    if (!out) abort();
    out[2 * n] = 'X';
    bpn_hex_encode(out, src, n);
    CHECK(out[2 * n] == 'X', "wrote past 2n");
    for (size_t i = 0; i < n; i++) {
        int hi = hexval(out[2 * i]), lo = hexval(out[2 * i + 1]);
        CHECK(hi >= 0 && lo >= 0, "not lowercase hex at %zu", i);
        CHECK((hi << 4 | lo) == src[i], "hex byte %zu", i);
    }
    free(out);
}

static void check_base64(const uint8_t *src, size_t n) {
    size_t want = 4 * ((n + 2) / 3);
    char *out = malloc(want + 1);
    if (!out) abort();
    out[want] = 'X';
    size_t got = bpn_base64_encode(out, src, n);
    CHECK(got == want, "%zu bytes gave %zu characters, want %zu", n, got, want);
    CHECK(out[want] == 'X', "wrote past the end");
    size_t pad = n % 3 == 0 ? 0 : 3 - n % 3;
    for (size_t i = 0; i < want; i++) {
        char c = out[i];
        int alpha = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
                    (c >= '0' && c <= '9') || c == '+' || c == '/';
        CHECK(i >= want - pad ? c == '=' : alpha, "character %zu: 0x%02x", i,
              (unsigned char)c);
    }
    uint8_t *back = malloc(want / 4 * 3 + 1);
    if (!back) abort();
    int dn = EVP_DecodeBlock(back, (const unsigned char *)out, (int)want);
    CHECK(dn == (int)(want / 4 * 3), "EVP_DecodeBlock gave %d", dn);
    CHECK(memcmp(back, src, n) == 0, "base64 does not decode back");
    free(back);
    free(out);
}

static void check_sign(const uint8_t *key, size_t klen, const char *id,
                       int64_t ts, const uint8_t *body, size_t blen) {
    bpn_signer *s = bpn_signer_new(key, klen);
    CHECK(s, "bpn_signer_new failed");
    uint8_t mac[32];
    unsigned mlen = 0;

    char *msg = malloc(256 + blen); /* "<id>.<ts>." < 180 + 22 */
    if (!msg) abort();
    int plen = snprintf(msg, 256, "%lld.", (long long)ts);
    memcpy(msg + plen, body, blen);
    HMAC(EVP_sha256(), klen ? key : (const uint8_t *)"", (int)klen,
         (const uint8_t *)msg, (size_t)plen + blen, mac, &mlen);
    char want_hex[65];
    bpn_hex_encode(want_hex, mac, 32);
    for (int round = 0; round < 2; round++) {
        char hex[BPN_SIG_HEX_LEN + 1];
        CHECK(bpn_signer_hex(s, ts, (const char *)body, blen, hex) == 0,
              "bpn_signer_hex failed");
        CHECK(hex[64] == '\0' && memcmp(hex, want_hex, 64) == 0,
              "blueprint signature differs (round %d)", round);
    }

    plen = snprintf(msg, 256, "%s.%lld.", id, (long long)ts);
    int fits = plen < 160;
    memcpy(msg + plen, body, blen);
    HMAC(EVP_sha256(), klen ? key : (const uint8_t *)"", (int)klen,
         (const uint8_t *)msg, (size_t)plen + blen, mac, &mlen);
    char want_b64[45];
    bpn_base64_encode(want_b64, mac, 32);
    want_b64[44] = '\0';
    for (int round = 0; round < 2; round++) {
        char b64[BPN_SIG_B64_LEN + 1];
        int rc = bpn_signer_std(s, id, ts, (const char *)body, blen, b64);
        CHECK(rc == (fits ? 0 : -1), "id of %zu bytes: rc %d", strlen(id), rc);
        if (fits)
            CHECK(strcmp(b64, want_b64) == 0,
                  "standard signature differs (round %d)", round);
    }
    free(msg);
    bpn_signer_free(s);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > 8192) return 0;
    fuzz_in in = {data, size};
    const uint8_t *key, *idb, *body;
    size_t klen = fuzz_take(&in, fuzz_u8(&in), &key);
    size_t idlen = fuzz_take(&in, fuzz_u8(&in) % 180, &idb);
    char id[192];
    memcpy(id, idb, idlen);
    id[idlen] = '\0'; /* the id is a C string: it ends at its first NUL */
    int64_t ts = (int64_t)fuzz_u64(&in);
    size_t blen = fuzz_take(&in, size, &body);

    for (size_t i = 0; i <= size && i < 16; i++)
        CHECK(bpn_utf8_valid((const char *)data + i, size - i) ==
                  fuzz_utf8_ok(data + i, size - i),
              "UTF-8 verdicts differ from byte %zu", i);
    check_hex(data, size);
    check_base64(data, size);
    check_sign(key, klen, id, ts, body, blen);
    return 0;
}
