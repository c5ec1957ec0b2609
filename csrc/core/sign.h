/* Webhook signatures: HMAC-SHA256 over "{timestamp}.{body}".
 * A signer keeps a keyed EVP_MAC_CTX so each signature is init/update/final
 * with no key setup. One signer per thread. */
#ifndef BPN_SIGN_H
#define BPN_SIGN_H

#include <stddef.h>
#include <stdint.h>

#define BPN_SIG_HEX_LEN 64

typedef struct bpn_signer bpn_signer;

/* Returns a signer for this key (copied), or NULL if OpenSSL failed. */
bpn_signer *bpn_signer_new(const uint8_t *key, size_t key_len);
void bpn_signer_free(bpn_signer *s);

/* HMAC-SHA256 of prefix || body into out. Returns 0, or -1 if OpenSSL
 * failed. */
int bpn_signer_mac(bpn_signer *s, const char *prefix, size_t prefix_len,
                   const char *body, size_t body_len, uint8_t out[32]);

/* Writes the 64 lowercase hex chars of HMAC-SHA256(key, "{ts}.{body}") and
 * a terminator into out. Returns 0, or -1 if OpenSSL failed. */
int bpn_signer_hex(bpn_signer *s, int64_t ts, const char *body, size_t body_len,
                   char out[BPN_SIG_HEX_LEN + 1]);

/* Standard Webhooks: base64 of HMAC-SHA256(key, "{id}.{ts}.{body}") and a
 * terminator into out. Returns 0 or -1. */
#define BPN_SIG_B64_LEN 44
int bpn_signer_std(bpn_signer *s, const char *msg_id, int64_t ts,
                   const char *body, size_t body_len,
                   char out[BPN_SIG_B64_LEN + 1]);

#endif
