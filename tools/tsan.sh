#!/usr/bin/env bash
# ThreadSanitizer run of the C core's threaded paths.
#
# Builds csrc/core/*.c with the driver tools/tsan/driver.c and its loopback
# webhook receiver tools/tsan/receiver.c (gcc -fsanitize=thread -g -O1) into
# build/tsan/, then runs the driver: producers, subscribers, a waker loop,
# registrar, broker-style ingest, dead-letter admin (redeliver, clear, key
# rotation), flush/drain waiters, engines created and freed alongside, and
# two concurrent closers against one engine per round; rounds cover memory /
# store batched / store sync and sequential / clock ids (see the driver's
# header comment). Quick mode (CI): ~25 s on 2 cores, build included.
#
# Exits non-zero on any TSan report (data race, lock-order inversion,
# misuse of a mutex, thread leak, ...), on a hang (the driver's watchdog,
# then `timeout`), or when the driver's counts do not add up.
#
# Usage: tools/tsan.sh [--long] [--helgrind] [-- DRIVER_ARGS]
#   --long        a longer run (more rounds, more calls per round)
#   --helgrind    also run a short valgrind --tool=helgrind pass over an
#                 uninstrumented build (a cross-check; slow, not for CI)
#   DRIVER_ARGS   passed to the driver (--rounds N, --ops N, --rate N,
#                 --producers N, --subscribers N, --max-round-seconds S, -v)
# Environment: CC (default gcc), TSAN_EXTRA (appended to TSAN_OPTIONS).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=$root/build/tsan
CC=${CC:-gcc}
long=0 helgrind=0
driver_args=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --long) long=1 ;;
        --helgrind) helgrind=1 ;;
        --) shift; driver_args+=("$@"); break ;;
        -h|--help) sed -n '2,22s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "tsan.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

mkdir -p "$out"

# ---- the sanitizer runtime ------------------------------------------------
probe=$out/probe
if ! echo 'int main(void){return 0;}' |
        "$CC" -fsanitize=thread -x c - -o "$probe" 2>/dev/null; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "tsan.sh: installing libtsan2 (the gcc ThreadSanitizer runtime)"
        apt-get install -y -q libtsan2 >/dev/null ||
            { apt-get update -q >/dev/null && apt-get install -y -q libtsan2 >/dev/null; }
    fi
    echo 'int main(void){return 0;}' |
        "$CC" -fsanitize=thread -x c - -o "$probe" ||
        { echo "tsan.sh: $CC cannot link -fsanitize=thread (install libtsan2)" >&2; exit 2; }
fi
rm -f "$probe"

# ---- sources --------------------------------------------------------------
src=$root/csrc/core

# ---- build ----------------------------------------------------------------
libs=$(pkg-config --cflags --libs libcurl libcrypto sqlite3)
common=(-std=c11 -D_GNU_SOURCE -g -Wall -Wextra -Werror -I"$src" -I"$root/tools/tsan")
sources=("$src"/*.c "$root/tools/tsan/driver.c" "$root/tools/tsan/receiver.c")
t_build=$SECONDS
# shellcheck disable=SC2086
"$CC" "${common[@]}" -O1 -fsanitize=thread -fno-omit-frame-pointer \
    "${sources[@]}" -o "$out/driver" $libs -pthread
echo "tsan.sh: built build/tsan/driver in $((SECONDS - t_build)) s"

# ---- run ------------------------------------------------------------------
if [[ $long -eq 1 ]]; then
    args=(--rounds 12 --ops 15000 --rate 900 --producers 6 --subscribers 3 --max-round-seconds 120)
    limit=1800
else
    # CI: < 90 s on 2 cores, build included.
    args=(--rounds 4 --ops 8000 --rate 1500 --max-round-seconds 20)
    limit=240
fi
# The store files live in a temp dir of ours: a TSan report (halt_on_error)
# or the watchdog's abort ends the driver before its own cleanup.
tmp=$(mktemp -d "${TMPDIR:-/tmp}/bpn-tsan.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
args+=(--tmpdir "$tmp" "${driver_args[@]}")
log=$out/tsan.log
rm -f "$out"/tsan.report.*
# io_sync=0: no happens-before from a write to a read of the same fd (the
# wakers' eventfds, curl's wakeup socketpair, the HTTP sockets). The core
# must not rely on those for memory ordering, so a race they would hide is
# still reported. Reports go to build/tsan/tsan.report.<pid>.
export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 history_size=7 \
io_sync=0 suppressions=$root/tools/tsan/tsan.supp log_path=$out/tsan.report \
${TSAN_EXTRA:-}"
echo "tsan.sh: TSAN_OPTIONS=$TSAN_OPTIONS"
echo "tsan.sh: build/tsan/driver ${args[*]}"
t_run=$SECONDS
rc=0
timeout --signal=ABRT --kill-after=10 "$limit" "$out/driver" "${args[@]}" 2>&1 | tee "$log" || rc=${PIPESTATUS[0]}
elapsed=$((SECONDS - t_run))

reports=0
for f in "$out"/tsan.report.*; do
    [[ -e $f ]] || continue
    # Reports, and the runtime's own CHECK failures (e.g. pthread_join of a
    # thread joined already).
    reports=$((reports + $(grep -cE '^WARNING: ThreadSanitizer|^ThreadSanitizer: CHECK failed|^FATAL: ThreadSanitizer' "$f" || true)))
    echo "---- $f ----"
    cat "$f"
done
# print_suppressions (on by default) lists matched suppressions at exit.
supp=$(grep -h -A20 'ThreadSanitizer: Matched' "$out"/tsan.report.* 2>/dev/null || true)

echo
echo "tsan.sh: driver exit status $rc, $reports ThreadSanitizer report(s), run ${elapsed} s"
if [[ -n $supp ]]; then echo "tsan.sh: suppressions used:"; echo "$supp"; else
    echo "tsan.sh: suppressions used: none"; fi
status=0
if [[ $reports -gt 0 ]]; then
    echo "tsan.sh: FAILED: ThreadSanitizer reported (above; log in build/tsan/)"
    status=1
elif [[ $rc -eq 124 || $rc -eq 134 || $rc -eq 137 ]]; then
    echo "tsan.sh: FAILED: the driver hung (watchdog or timeout ${limit} s)"
    status=1
elif [[ $rc -ne 0 ]]; then
    echo "tsan.sh: FAILED: the driver exited with $rc (checks above)"
    status=1
else
    echo "tsan.sh: OK: no ThreadSanitizer report, every count adds up"
fi

# ---- optional: helgrind cross-check ---------------------------------------
# An uninstrumented build under valgrind --tool=helgrind (which sees pthread
# primitives only). tools/tsan/helgrind.supp says why each suppression is not
# a race; its `src:FILE:@{TEXT}` lines are pinned to the line holding TEXT.
if [[ $helgrind -eq 1 ]]; then
    command -v valgrind >/dev/null 2>&1 || { echo "tsan.sh: no valgrind" >&2; exit 2; }
    supp=$out/helgrind.supp
    : >"$supp"
    pin='^([[:space:]]*src:([A-Za-z0-9_]+\.c):)@\{(.*)\}$'
    while IFS= read -r line; do
        if [[ $line =~ $pin ]]; then
            file=${BASH_REMATCH[2]} text=${BASH_REMATCH[3]}
            lines=$(grep -nF -- "$text" "$src/$file" | cut -d: -f1 || true)
            if [[ $(printf '%s' "$lines" | grep -c .) -ne 1 ]]; then
                echo "tsan.sh: helgrind.supp: \"$text\" is not on exactly one line of $file" >&2
                exit 2
            fi
            line="${BASH_REMATCH[1]}$lines"
        fi
        printf '%s\n' "$line" >>"$supp"
    done <"$root/tools/tsan/helgrind.supp"
    # shellcheck disable=SC2086
    "$CC" "${common[@]}" -O1 -fno-omit-frame-pointer -DBPN_TSAN_HELGRIND \
        "${sources[@]}" -o "$out/driver-helgrind" $libs -pthread
    echo "tsan.sh: helgrind pass (4 short rounds; slow)"
    hg_rc=0
    t_hg=$SECONDS
    timeout 900 valgrind --tool=helgrind --error-exitcode=9 --suppressions="$supp" \
        --log-file="$out/helgrind.log" "$out/driver-helgrind" \
        --rounds 4 --ops 500 --rate 400 --max-round-seconds 120 --tmpdir "$tmp" \
        >"$out/helgrind.out" 2>&1 || hg_rc=$?
    tail -n 6 "$out/helgrind.out"
    errs=$(grep -E 'ERROR SUMMARY' "$out/helgrind.log" | tail -n1 | sed 's/^==[0-9]*== //')
    echo "tsan.sh: helgrind: exit $hg_rc in $((SECONDS - t_hg)) s; $errs (log: build/tsan/helgrind.log)"
    [[ $hg_rc -ne 0 ]] && status=1
fi
exit $status
