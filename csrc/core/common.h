/* Shared definitions for the blueprint_notify core. Pure C11: no Python. */
#ifndef BPN_COMMON_H
#define BPN_COMMON_H

#include <stddef.h>
#include <stdint.h>

/* Error codes returned by core functions (0 is success). */
typedef enum {
    BPN_OK = 0,
    BPN_ENOMEM = -1,  /* an allocation failed */
    BPN_EINVAL = -2,  /* a field failed validation; see the message */
    BPN_ECLOSED = -3, /* the engine is closed */
    BPN_ELIMIT = -4,  /* the channel cap is reached */
    BPN_ESYS = -5,    /* a system call failed; errno is set */
    BPN_ECURL = -6,   /* libcurl could not be set up */
    BPN_EAUTH = -7,   /* unknown job or wrong token */
    BPN_ESTORE = -8,  /* the store cannot be used; see the message */
    BPN_ELOCKED = -9, /* the store is in use by another notifier */
} bpn_err;

/* Job statuses, in the order of the Python JobStatus enum. */
enum {
    BPN_STATUS_QUEUED = 0,
    BPN_STATUS_PROCESSING = 1,
    BPN_STATUS_COMPLETED = 2,
    BPN_STATUS_FAILED = 3,
    BPN_STATUS_CANCELLED = 4,
    BPN_STATUS_COUNT = 5,
};

#define BPN_STATUS_IS_TERMINAL(s) ((s) >= BPN_STATUS_COMPLETED)
#define BPN_JOB_ID_MAX            256
#define BPN_URL_MAX               4096
#define BPN_TOKEN_HEX_LEN         64

#define BPN_CONTAINER_OF(ptr, type, member) \
    ((type *)(void *)((char *)(ptr)-offsetof(type, member)))

/* Monotonic clock in milliseconds, and in microseconds. */
uint64_t bpn_now_ms(void);
/* Wall clock (CLOCK_REALTIME), microseconds since the epoch. */
uint64_t bpn_now_realtime_us(void);
uint64_t bpn_now_us(void);

/* Bumped in the child after fork(): objects from before are unusable there
 * (their threads did not survive). */
unsigned bpn_fork_generation(void);
/* Wall clock in seconds since the epoch, and as a double. */
int64_t bpn_wall_s(void);
double bpn_wall_f(void);

/* Fills buf with n bytes from the OS CSPRNG. Returns 0 or -1 (errno set). */
int bpn_random_bytes(void *buf, size_t n);

/* Writes 2*n lowercase hex chars (no terminator) of src into dst. */
void bpn_hex_encode(char *dst, const uint8_t *src, size_t n);

/* Writes the standard base64 (with padding) of src into dst, which needs
 * 4 * ((n + 2) / 3) bytes; returns the length written (no terminator). */
size_t bpn_base64_encode(char *dst, const uint8_t *src, size_t n);

/* 1 if s[0..n) is well-formed UTF-8 (what Python's strict decoder takes:
 * no overlong forms, surrogates or code points above U+10FFFF), else 0. */
int bpn_utf8_valid(const char *s, size_t n);

/* Returns a human-readable message for an error code. */
const char *bpn_strerror(int err);

#endif
