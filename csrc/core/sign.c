#include "sign.h"

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <stdio.h>
#include <stdlib.h>

#include "common.h"

struct bpn_signer {
    EVP_MAC *mac;
    EVP_MAC_CTX *ctx;
};

bpn_signer *bpn_signer_new(const uint8_t *key, size_t key_len) {
    static const uint8_t empty_key = 0;
    char digest[] = "SHA256";
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0),
        OSSL_PARAM_construct_end(),
    };
    bpn_signer *s = calloc(1, sizeof(*s));
    if (!s) goto error;
    s->mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
    if (!s->mac) goto error;
    s->ctx = EVP_MAC_CTX_new(s->mac);
    if (!s->ctx) goto error;
    /* HMAC accepts an empty key; OpenSSL wants a non-NULL pointer. */
    if (!EVP_MAC_init(s->ctx, key_len ? key : &empty_key, key_len, params))
        goto error;
    return s;
error:
    bpn_signer_free(s);
    return NULL;
}

void bpn_signer_free(bpn_signer *s) {
    if (!s) return;
    EVP_MAC_CTX_free(s->ctx);
    EVP_MAC_free(s->mac);
    free(s);
}

int bpn_signer_mac(bpn_signer *s, const char *prefix, size_t prefix_len,
                   const char *body, size_t body_len, uint8_t out[32]) {
    size_t mac_len = 0;
    /* A NULL key re-initialises with the key already set. */
    if (!EVP_MAC_init(s->ctx, NULL, 0, NULL)) return -1;
    if (!EVP_MAC_update(s->ctx, (const uint8_t *)prefix, prefix_len)) return -1;
    if (!EVP_MAC_update(s->ctx, (const uint8_t *)body, body_len)) return -1;
    if (!EVP_MAC_final(s->ctx, out, &mac_len, 32)) return -1;
    return mac_len == 32 ? 0 : -1;
}

int bpn_signer_hex(bpn_signer *s, int64_t ts, const char *body, size_t body_len,
                   char out[BPN_SIG_HEX_LEN + 1]) {
    char prefix[24];
    uint8_t mac[32];
    int plen = snprintf(prefix, sizeof(prefix), "%lld.", (long long)ts);
    if (bpn_signer_mac(s, prefix, (size_t)plen, body, body_len, mac) < 0)
        return -1;
    bpn_hex_encode(out, mac, sizeof(mac));
    out[BPN_SIG_HEX_LEN] = '\0';
    return 0;
}

int bpn_signer_std(bpn_signer *s, const char *msg_id, int64_t ts,
                   const char *body, size_t body_len,
                   char out[BPN_SIG_B64_LEN + 1]) {
    char prefix[160];
    uint8_t mac[32];
    int plen =
        snprintf(prefix, sizeof(prefix), "%s.%lld.", msg_id, (long long)ts);
    if (plen < 0 || (size_t)plen >= sizeof(prefix)) return -1;
    if (bpn_signer_mac(s, prefix, (size_t)plen, body, body_len, mac) < 0)
        return -1;
    size_t n = bpn_base64_encode(out, mac, sizeof(mac));
    out[n] = '\0';
    return 0;
}
