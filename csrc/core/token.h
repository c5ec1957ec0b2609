/* Per-job bearer tokens: 32 bytes from the OS CSPRNG as 64 hex chars,
 * compared in constant time. */
#ifndef BPN_TOKEN_H
#define BPN_TOKEN_H

#include <stddef.h>

#include "common.h"

/* Writes a fresh token (64 hex chars, no terminator). Returns 0 or -1. */
int bpn_token_new(char out[BPN_TOKEN_HEX_LEN]);

/* Returns 1 if candidate equals expected. Time depends only on the lengths
 * (which are public), never on where the bytes differ. */
int bpn_token_equal(const char expected[BPN_TOKEN_HEX_LEN],
                    const char *candidate, size_t candidate_len);

#endif
