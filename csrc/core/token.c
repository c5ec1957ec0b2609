#include "token.h"

#include <openssl/crypto.h>
#include <stdint.h>

int bpn_token_new(char out[BPN_TOKEN_HEX_LEN]) {
    uint8_t raw[BPN_TOKEN_HEX_LEN / 2];
    if (bpn_random_bytes(raw, sizeof(raw)) < 0) return -1;
    bpn_hex_encode(out, raw, sizeof(raw));
    OPENSSL_cleanse(raw, sizeof(raw));
    return 0;
}

int bpn_token_equal(const char expected[BPN_TOKEN_HEX_LEN],
                    const char *candidate, size_t candidate_len) {
    /* Compare against the expected token even on a length mismatch so the
     * work done is the same; the result is still false. */
    const char *cmp = candidate_len == BPN_TOKEN_HEX_LEN ? candidate : expected;
    int same = CRYPTO_memcmp(expected, cmp, BPN_TOKEN_HEX_LEN) == 0;
    return same && candidate_len == BPN_TOKEN_HEX_LEN;
}
