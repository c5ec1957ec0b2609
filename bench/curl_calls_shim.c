/* LD_PRELOAD interposer for diagnosing the delivery thread: counts (and
 * times, wall clock) the libcurl multi calls blueprint_notify makes, and the
 * zero-timeout single-fd poll()s libcurl 7.x makes inside
 * curl_multi_perform (one per in-flight transfer per call). Prints a summary
 * to stderr at exit. Diagnosis only; see bench/README.md.
 *
 *   gcc -O2 -shared -fPIC -o /tmp/curl_calls_shim.so bench/curl_calls_shim.c -ldl
 *   LD_PRELOAD=/tmp/curl_calls_shim.so .venv/bin/python bench/throughput.py \
 *       --only bpn --reps 1
 *
 * libcurl is loaded RTLD_LOCAL by the extension, so the real functions are
 * looked up in it by handle, not with RTLD_NEXT. */
#define _GNU_SOURCE
#include <curl/curl.h>
#include <dlfcn.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <time.h>

static _Atomic unsigned long n_perform, n_poll, n_add, n_remove, n_poll0;
static _Atomic unsigned long ns_perform, ns_poll;

static unsigned long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (unsigned long)t.tv_sec * 1000000000UL + (unsigned long)t.tv_nsec;
}

static void *libcurl(void) {
    static void *h;
    if (!h) h = dlopen("libcurl.so.4", RTLD_NOW | RTLD_NOLOAD);
    return h;
}

#define REAL(name)                  \
    static __typeof__(name) *real;  \
    if (!real) real = (__typeof__(name) *)dlsym(libcurl(), #name)

CURLMcode curl_multi_perform(CURLM *m, int *running) {
    REAL(curl_multi_perform);
    unsigned long t = now_ns();
    CURLMcode rc = real(m, running);
    ns_perform += now_ns() - t;
    n_perform++;
    return rc;
}

CURLMcode curl_multi_poll(CURLM *m, struct curl_waitfd extra[], unsigned n,
                          int timeout_ms, int *ret) {
    REAL(curl_multi_poll);
    unsigned long t = now_ns();
    CURLMcode rc = real(m, extra, n, timeout_ms, ret);
    ns_poll += now_ns() - t;
    n_poll++;
    return rc;
}

CURLMcode curl_multi_add_handle(CURLM *m, CURL *e) {
    REAL(curl_multi_add_handle);
    n_add++;
    return real(m, e);
}

CURLMcode curl_multi_remove_handle(CURLM *m, CURL *e) {
    REAL(curl_multi_remove_handle);
    n_remove++;
    return real(m, e);
}

int poll(struct pollfd *fds, nfds_t n, int timeout) {
    static int (*real)(struct pollfd *, nfds_t, int);
    if (!real) real = (int (*)(struct pollfd *, nfds_t, int))dlsym(RTLD_NEXT, "poll");
    if (n == 1 && timeout == 0) n_poll0++;
    return real(fds, n, timeout);
}

__attribute__((destructor)) static void report(void) {
    if (!n_add) return;
    fprintf(stderr,
            "[curl shim] transfers %lu (removed %lu)\n"
            "[curl shim] curl_multi_perform: %lu calls, %.3f s, %.1f transfers/call\n"
            "[curl shim] curl_multi_poll: %lu calls, %.3f s\n"
            "[curl shim] poll(1 fd, timeout 0): %lu = %.1f per transfer\n",
            n_add, n_remove, n_perform, ns_perform / 1e9,
            n_perform ? (double)n_add / n_perform : 0.0, n_poll, ns_poll / 1e9,
            n_poll0, (double)n_poll0 / n_add);
}
