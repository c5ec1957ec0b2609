/* bpn_store_row_valid: a delivery read back from the store file, which may
 * have been damaged or edited. Its job id, URL and webhook-id end up in
 * request headers and the request line, and in Python (dead_letters()).
 *
 * Input: job id length (2 bytes, mod 300) and bytes (interior NULs
 * allowed, as SQLite text may hold them), webhook-id length (byte, mod 64)
 * and bytes (a C string), then the URL (a C string). Properties:
 *   - an accepted row holds what notify() would have accepted: the job id
 *     passes bpn_job_id_check, the URL bpn_url_check (with the same origin),
 *     the webhook-id is 1..39 characters of [A-Za-z0-9_-], and the job id
 *     and URL are valid UTF-8 (notify() takes Python str; the binding
 *     decodes them strictly);
 *   - and the converse: a row notify() could have written is accepted. */
#include "../csrc/core/engine.h"
#include "../csrc/core/store.h"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > BPN_URL_MAX + 512) return 0;
    fuzz_in in = {data, size};
    const uint8_t *p;
    size_t jlen = (size_t)(fuzz_u8(&in) << 8 | fuzz_u8(&in)) % 300;
    jlen = fuzz_take(&in, jlen, &p);
    char *job = fuzz_dup(p, jlen, 1);
    size_t mlen = fuzz_take(&in, fuzz_u8(&in) % 64, &p);
    char *msg = fuzz_dup(p, mlen, 1);
    size_t ulen = fuzz_take(&in, size, &p);
    char *url = fuzz_dup(p, ulen, 1);

    bpn_stored row;
    memset(&row, 0, sizeof(row));
    row.job_id = job;
    row.job_len = jlen;
    row.msg_id = msg;
    row.url = url;
    row.origin = "";
    row.payload = "{}";
    row.payload_len = 2;
    row.last_error = "";
    char origin[BPN_ORIGIN_MAX], origin2[BPN_ORIGIN_MAX], err[128];
    int ok = bpn_store_row_valid(&row, origin);

    size_t real_mlen = strlen(msg), real_ulen = strlen(url);
    int msg_ok = real_mlen >= 1 && real_mlen <= 39 &&
                 strspn(msg,
                        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                        "0123456789_-") == real_mlen;
    int job_ok = bpn_job_id_check(job, jlen, err, sizeof(err)) == 0 &&
                 fuzz_utf8_ok((const uint8_t *)job, jlen);
    int url_ok =
        bpn_url_check(url, real_ulen, origin2, err, sizeof(err)) == 0 &&
        fuzz_utf8_ok((const uint8_t *)url, real_ulen);
    int want = msg_ok && job_ok && url_ok;
    CHECK(ok == want,
          "row accepted %d, want %d (webhook-id ok %d, job id ok %d, URL ok "
          "%d)",
          ok, want, msg_ok, job_ok, url_ok);
    if (ok)
        CHECK(strcmp(origin, origin2) == 0, "origin %s, notify() gets %s",
              origin, origin2);
    free(job);
    free(msg);
    free(url);
    return 0;
}
