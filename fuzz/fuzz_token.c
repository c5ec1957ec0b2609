/* bpn_token_equal: the bearer token of an SSE client against the job's.
 *
 * Input: 64 bytes of expected token, then the candidate (any length, in an
 * exactly sized block: a read past its length is a heap overflow; the
 * candidate is read only when its length is right). Properties:
 *   - equal iff the candidate is exactly 64 bytes and the same bytes;
 *   - a fresh token (bpn_token_new) is 64 lowercase hex characters, equal
 *     to itself and (but for a 2^-256 chance) not to the input. */
#include "../csrc/core/token.h"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > 4096) return 0;
    fuzz_in in = {data, size};
    char expected[BPN_TOKEN_HEX_LEN];
    memset(expected, 0, sizeof(expected));
    const uint8_t *p;
    size_t got = fuzz_take(&in, BPN_TOKEN_HEX_LEN, &p);
    memcpy(expected, p, got);
    size_t clen = fuzz_take(&in, size, &p);
    char *cand = fuzz_dup(p, clen, 0);

    int want = clen == BPN_TOKEN_HEX_LEN &&
               memcmp(expected, cand, BPN_TOKEN_HEX_LEN) == 0;
    int eq = bpn_token_equal(expected, cand, clen);
    CHECK(eq == want, "candidate of %zu bytes: got %d, want %d", clen, eq,
          want);

    char fresh[BPN_TOKEN_HEX_LEN];
    CHECK(bpn_token_new(fresh) == 0, "bpn_token_new failed");
    for (size_t i = 0; i < sizeof(fresh); i++)
        CHECK((fresh[i] >= '0' && fresh[i] <= '9') ||
                  (fresh[i] >= 'a' && fresh[i] <= 'f'),
              "token byte 0x%02x", (unsigned char)fresh[i]);
    CHECK(bpn_token_equal(fresh, fresh, sizeof(fresh)) == 1, "token != self");
    CHECK(bpn_token_equal(fresh, cand, clen) == 0, "guessed a fresh token");
    free(cand);
    return 0;
}
