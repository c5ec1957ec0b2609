/* bpn_event_new / bpn_event_set_seq / bpn_event_from_payload: the event
 * JSON comes from Python (notify) or from another process through Redis
 * (the broker's ingest), the payload from the store file.
 *
 * Input: status (byte 0, mod 5), sequence number (8 bytes), with_payload
 * (byte 9), job id length (byte 10), the job id, then the JSON (any bytes).
 * Properties:
 *   - json is a NUL-terminated copy, json_len right;
 *   - the frame is exactly "id: <seq>\nevent: <status>\ndata: <json>\n\n"
 *     and frame_len its length (it is rendered into space reserved at
 *     allocation: ASan sees any overflow);
 *   - when the JSON has no CR or LF (what the binding lets through), the
 *     frame has exactly 4 LFs and no CR, so one data: line carries it;
 *   - the payload is exactly {"job_id":"<id, " and \ escaped>","event":
 *     <json>}, NUL-terminated, and un-escaping gives the job id back;
 *   - bpn_event_from_payload keeps the bytes, NUL-terminated. */
#include "../csrc/core/common.h"
#include "../csrc/core/event.h"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > 8192) return 0;
    fuzz_in in = {data, size};
    int status = fuzz_u8(&in) % BPN_STATUS_COUNT;
    uint64_t seq = fuzz_u64(&in);
    int with_payload = fuzz_u8(&in) & 1;
    const uint8_t *job, *json;
    size_t job_len = fuzz_take(&in, fuzz_u8(&in), &job);
    size_t json_len = fuzz_take(&in, size, &json);
    char *job_copy = fuzz_dup(job, job_len, 0);
    char *json_copy = fuzz_dup(json, json_len, 0);

    bpn_event *ev = bpn_event_new(status, json_copy, json_len, job_copy,
                                  job_len, with_payload);
    CHECK(ev, "out of memory");
    CHECK(ev->json_len == json_len && memcmp(ev->json, json, json_len) == 0 &&
              ev->json[json_len] == '\0',
          "json copy");
    CHECK(ev->frame_len == 0 && ev->seq == 0, "published before set_seq");

    bpn_event_set_seq(ev, seq);
    CHECK(ev->seq == seq, "seq");
    size_t cap = 64 + json_len;
    char *want = malloc(cap);
    if (!want) abort();
    int head = snprintf(want, cap,
                        "id: %llu\nevent: %s\ndata: ", (unsigned long long)seq,
                        bpn_status_names[status]);
    memcpy(want + head, json, json_len);
    memcpy(want + head + json_len, "\n\n", 2);
    size_t want_len = (size_t)head + json_len + 2;
    CHECK(ev->frame_len == want_len, "frame_len %zu, want %zu", ev->frame_len,
          want_len);
    CHECK(memcmp(ev->frame, want, want_len) == 0, "frame differs");
    if (!memchr(json, '\n', json_len) && !memchr(json, '\r', json_len)) {
        size_t lf = 0;
        for (size_t i = 0; i < ev->frame_len; i++) {
            CHECK(ev->frame[i] != '\r', "CR in frame");
            lf += ev->frame[i] == '\n';
        }
        CHECK(lf == 4, "%zu line feeds in the frame", lf);
    }

    if (with_payload) {
        static const char head_s[] = "{\"job_id\":\"";
        static const char mid_s[] = "\",\"event\":";
        const char *p = ev->payload;
        CHECK(p && p[ev->payload_len] == '\0', "payload not terminated");
        CHECK(ev->payload_len >= sizeof(head_s) - 1 + sizeof(mid_s) - 1 +
                                     job_len + json_len + 1,
              "payload too short");
        CHECK(memcmp(p, head_s, sizeof(head_s) - 1) == 0, "payload head");
        size_t i = sizeof(head_s) - 1, j = 0;
        while (j < job_len) {
            char c = p[i++];
            if (c == '\\') {
                c = p[i++];
                CHECK(c == '"' || c == '\\', "stray escape");
            } else {
                CHECK(c != '"', "unescaped quote in the job id");
            }
            CHECK(c == (char)job[j], "job id byte %zu", j);
            j++;
        }
        CHECK(memcmp(p + i, mid_s, sizeof(mid_s) - 1) == 0, "payload middle");
        i += sizeof(mid_s) - 1;
        CHECK(memcmp(p + i, json, json_len) == 0, "payload event");
        i += json_len;
        CHECK(p[i] == '}' && i + 1 == ev->payload_len, "payload end");
    } else {
        CHECK(!ev->payload && ev->payload_len == 0, "payload without asking");
    }
    bpn_event_unref(bpn_event_ref(ev));
    bpn_event_unref(ev);

    bpn_event *pe = bpn_event_from_payload(json_copy, json_len);
    CHECK(pe, "out of memory");
    CHECK(pe->payload_len == json_len &&
              memcmp(pe->payload, json, json_len) == 0 &&
              pe->payload[json_len] == '\0' && pe->frame_len == 0,
          "payload event");
    bpn_event_unref(pe);
    free(want);
    free(job_copy);
    free(json_copy);
    return 0;
}
