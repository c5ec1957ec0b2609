/* decode_log (store.c): the attempt log blob of a row read back from the
 * store file, which may have been damaged or edited.
 *
 * Includes store.c to reach its static encode_log/decode_log. The input is
 * the blob (libFuzzer's buffer is exactly sized: ASan sees any overread).
 * Properties:
 *   - at most BPN_ATTEMPT_LOG_MAX records;
 *   - each record's fields are the bytes at its place, walking the blob
 *     record by record (18-byte head, then the error text of the length
 *     it gives); decoding stops at the first record that does not fit;
 *   - every error text is NUL-terminated within its buffer, and is the
 *     record's text cut at sizeof(error) - 1 bytes;
 *   - decode(encode(decode(blob))) == decode(blob) (with error texts
 *     compared as C strings: encoding stops at a NUL). */
#include "../csrc/core/store.c"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > 64 * 1024) return 0;
    bpn_attempt *log = NULL, *again = NULL;
    uint32_t n = 0, n2 = 0;
    CHECK(decode_log(size ? data : NULL, size, &log, &n) == 0, "decode");
    CHECK(n <= BPN_ATTEMPT_LOG_MAX, "%u records", n);
    CHECK(n == 0 || log, "records without an array");

    size_t off = 0;
    for (uint32_t i = 0; i < n; i++) {
        const bpn_attempt *a = &log[i];
        CHECK(size - off >= LOG_REC_HEAD, "record %u past the end", i);
        uint16_t elen;
        memcpy(&elen, data + off + 16, 2);
        CHECK(size - off - LOG_REC_HEAD >= elen, "record %u text past the end",
              i);
        CHECK(memcmp(&a->at, data + off, 8) == 0 &&
                  memcmp(&a->duration_ms, data + off + 8, 4) == 0 &&
                  memcmp(&a->status, data + off + 12, 4) == 0,
              "record %u fields", i);
        size_t keep = elen < sizeof(a->error) ? elen : sizeof(a->error) - 1;
        CHECK(memchr(a->error, '\0', sizeof(a->error)) != NULL,
              "record %u text not terminated", i);
        CHECK(memcmp(a->error, data + off + LOG_REC_HEAD, keep) == 0 &&
                  a->error[keep] == '\0',
              "record %u text", i);
        off += LOG_REC_HEAD + elen;
    }
    /* Stopped where the next record does not fit, or at the cap. */
    if (n < BPN_ATTEMPT_LOG_MAX && size - off >= LOG_REC_HEAD) {
        uint16_t elen;
        memcpy(&elen, data + off + 16, 2);
        CHECK(size - off - LOG_REC_HEAD < elen, "stopped at a whole record");
    }

    size_t len = encode_log(log, n, NULL);
    uint8_t *blob = malloc(len ? len : 1);
    if (!blob) abort();
    CHECK(encode_log(log, n, blob) == len, "encode length");
    CHECK(decode_log(len ? blob : NULL, len, &again, &n2) == 0, "re-decode");
    CHECK(n2 == n, "%u records, re-decoded %u", n, n2);
    for (uint32_t i = 0; i < n; i++) {
        CHECK(memcmp(&log[i].at, &again[i].at, 8) == 0 &&
                  log[i].duration_ms == again[i].duration_ms &&
                  log[i].status == again[i].status &&
                  strcmp(log[i].error, again[i].error) == 0,
              "record %u changed in a round trip", i);
    }
    free(blob);
    free(again);
    free(log);
    return 0;
}
