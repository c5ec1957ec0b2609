/* bpn_job_id_check: every job id from Python (notify, register_job,
 * subscribe, the broker's ingest) passes here before it reaches a header
 * (X-Job-Id), a JSON payload or the channel table.
 *
 * Input: byte 0 sizes the reason buffer (1..64), the rest is the id, in an
 * exactly sized block (not NUL-terminated: the check must not need one).
 * Properties:
 *   - accepted iff 1..BPN_JOB_ID_MAX bytes and no byte < 0x20 or 0x7f;
 *   - a refusal leaves a NUL-terminated reason within the buffer, whatever
 *     its size, and a non-empty one when there is room. */
#include "../csrc/core/engine.h"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > 4 * BPN_JOB_ID_MAX) return 0;
    fuzz_in in = {data, size};
    size_t errlen = (size_t)(fuzz_u8(&in) % 64) + 1;
    const uint8_t *id_bytes;
    size_t len = fuzz_take(&in, size, &id_bytes);
    char *id = fuzz_dup(id_bytes, len, 0);
    char *err = malloc(errlen);
    if (!err) abort();

    int want = len >= 1 && len <= BPN_JOB_ID_MAX;
    for (size_t i = 0; want && i < len; i++)
        if (id_bytes[i] < 0x20 || id_bytes[i] == 0x7f) want = 0;
    int rc = bpn_job_id_check(id, len, err, errlen);
    CHECK(rc == 0 || rc == -1, "returned %d", rc);
    CHECK((rc == 0) == want, "%zu bytes: got %d, want %s", len, rc,
          want ? "accepted" : "refused");
    if (rc < 0) {
        CHECK(strnlen(err, errlen) < errlen, "reason not terminated");
        CHECK(errlen == 1 || err[0], "empty reason");
    }
    free(err);
    free(id);
    return 0;
}
