#!/usr/bin/env bash
# Builds the libFuzzer harnesses of fuzz/ (clang, ASan + UBSan) into
# build/fuzz/ and runs each one, on a temporary copy of its seed corpus
# (fuzz/corpus/<target>/, so a run never changes the tree), with its
# dictionary (fuzz/dict/<target>.dict) when there is one. Before fuzzing, a
# target replays every input of fuzz/regressions/<target>/ (inputs that once
# broke a property; each must pass now).
#
#   tools/fuzz.sh                 every target, 300 s each
#   tools/fuzz.sh --ci            about 60 s in all (plus the build), split
#                                 evenly between the targets
#   tools/fuzz.sh --time SECS     SECS seconds per target
#   tools/fuzz.sh --replay        build, then replay corpus and regressions only
#   tools/fuzz.sh --merge         afterwards, fold the inputs that add coverage
#                                 into fuzz/corpus/<target>/ (to commit)
#   tools/fuzz.sh url ingest      only these targets (names: fuzz/fuzz_<name>.c)
#
# One libFuzzer process at a time (one core), at nice 10. Prints, per target,
# executions, exec/s, coverage (cov: edges, ft: features) and corpus size,
# then a summary table. Exits non-zero if a regression input fails or a run
# finds a crash, a property violation (an abort), a leak, a timeout (an input
# taking over 10 s) or runs out of memory (2 GB): libFuzzer's reproducer is
# kept in build/fuzz/artifacts/ and printed (path, hex dump, the command that
# replays it). A reproducer that is fixed becomes a regression: copy it to
# fuzz/regressions/<target>/ under a name that says what it broke.
#
# Needs clang with libFuzzer (Debian: apt-get install clang); installs it
# with apt-get when run as root and it is missing. Env: CC (default: clang),
# LIBFUZZER_FLAGS (extra libFuzzer flags, e.g. LIBFUZZER_FLAGS=-seed=1).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

mode=default
per_target=300
merge=0
targets=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --ci) mode=ci ;;
        --time)
            [[ $# -ge 2 && $2 =~ ^[0-9]+$ && $2 -gt 0 ]] || {
                echo "fuzz: --time needs a number of seconds" >&2
                exit 2
            }
            mode=time per_target=$2
            shift
            ;;
        --replay) mode=replay ;;
        --merge) merge=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        -*)
            echo "fuzz: unknown option $1 (see --help)" >&2
            exit 2
            ;;
        *) targets+=("$1") ;;
    esac
    shift
done

if [[ ${#targets[@]} -eq 0 ]]; then
    for f in fuzz/fuzz_*.c; do
        t=${f#fuzz/fuzz_}
        targets+=("${t%.c}")
    done
fi
for t in "${targets[@]}"; do
    [[ -f fuzz/fuzz_$t.c ]] || {
        echo "fuzz: no target $t (no fuzz/fuzz_$t.c)" >&2
        exit 2
    }
done
CI_BUDGET=60 # --ci: seconds for all the runs (the build comes on top)

OUT=build/fuzz
mkdir -p "$OUT/obj" "$OUT/artifacts" "$OUT/logs"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/bpn-fuzz.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# ---- toolchain ------------------------------------------------------------

CC=${CC:-clang}
SAN=(-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer)

probe() {
    command -v "$CC" >/dev/null 2>&1 || return 1
    printf 'int LLVMFuzzerTestOneInput(const unsigned char *d, unsigned long n)
{ (void)d; (void)n; return 0; }\n' >"$tmp/probe.c"
    "$CC" -fsanitize=fuzzer "${SAN[@]}" "$tmp/probe.c" -o "$tmp/probe" 2>"$tmp/probe.err"
}

if ! probe; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1 && [[ $CC == clang ]]; then
        echo "fuzz: installing clang (libFuzzer) with apt-get" >&2
        apt-get install -y -qq clang >/dev/null 2>&1 ||
            { apt-get update -qq && apt-get install -y -qq clang >/dev/null; }
        if ! probe; then
            # Newer Debian/Ubuntu ship the fuzzer runtime apart.
            v=$(clang --version | sed -n 's/.*clang version \([0-9]*\).*/\1/p' | head -n1)
            apt-get install -y -qq "libclang-rt-$v-dev" >/dev/null 2>&1 || true
        fi
    fi
    if ! probe; then
        echo "fuzz: $CC cannot build a libFuzzer target (-fsanitize=fuzzer):" >&2
        cat "$tmp/probe.err" >&2 2>/dev/null || true
        echo "fuzz: install clang with libFuzzer, e.g. sudo apt-get install clang" \
            "(on newer releases also libclang-rt-<version>-dev), or set CC" >&2
        exit 1
    fi
fi
if ! pkg-config --exists libcurl libcrypto sqlite3 2>/dev/null; then
    echo "fuzz: libcurl, OpenSSL or SQLite development files missing: run tools/sysdeps.sh" >&2
    exit 1
fi

# ---- build -----------------------------------------------------------------

read -r -a PKG_CFLAGS <<<"$(pkg-config --cflags libcurl libcrypto sqlite3)"
read -r -a PKG_LIBS <<<"$(pkg-config --libs libcurl libcrypto sqlite3)"
CFLAGS=(-std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -Icsrc -g -O1 "${SAN[@]}" "${PKG_CFLAGS[@]}")

# 1 if $1 is missing or older than any of the other files.
stale() {
    local target=$1 f
    shift
    [[ -e $target ]] || return 0
    for f in "$@"; do [[ $f -nt $target ]] && return 0; done
    return 1
}

build_start=$SECONDS
# The core, instrumented for coverage (fuzzer-no-link), as an archive: a
# harness that #includes a core .c file (to reach its static functions)
# takes that file's code from itself, not from the archive.
lib=$OUT/libbpn_core.a
headers=(csrc/core/*.h)
rebuilt=0
objs=()
for src in csrc/core/*.c; do
    obj=$OUT/obj/$(basename "${src%.c}").o
    objs+=("$obj")
    if stale "$obj" "$src" "${headers[@]}" "${BASH_SOURCE[0]}"; then
        echo "fuzz: cc $src"
        "$CC" "${CFLAGS[@]}" -fsanitize=fuzzer-no-link -c "$src" -o "$obj"
        rebuilt=1
    fi
done
if [[ $rebuilt -eq 1 || ! -e $lib ]]; then
    rm -f "$lib"
    ar rcs "$lib" "${objs[@]}"
fi
for t in "${targets[@]}"; do
    bin=$OUT/fuzz_$t
    if stale "$bin" "fuzz/fuzz_$t.c" fuzz/*.h "$lib" "${headers[@]}" csrc/core/*.c; then
        echo "fuzz: build $bin"
        "$CC" "${CFLAGS[@]}" -fsanitize=fuzzer "fuzz/fuzz_$t.c" "$lib" \
            "${PKG_LIBS[@]}" -lpthread -o "$bin"
    fi
done
build_secs=$((SECONDS - build_start))

# ---- run -------------------------------------------------------------------

# Our own sanitizer settings (an inherited ASAN_OPTIONS with log_path, as
# tools/asan-env sets, would hide the reports from the logs read here).
export ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1:handle_abort=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
read -r -a EXTRA <<<"${LIBFUZZER_FLAGS:-}"

failed=0
rows=()
run_start=$SECONDS
left=${#targets[@]}

# Prints where a libFuzzer reproducer is, its bytes and how to replay it.
show_artifact() {
    local t=$1 a=$2
    echo "fuzz: [$t] reproducer: $a ($(wc -c <"$a") bytes)"
    od -A x -t x1z -v "$a" | head -n 16 | sed 's/^/    /'
    [[ $(wc -c <"$a") -le 256 ]] || echo "    ..."
    echo "fuzz: [$t] replay: $OUT/fuzz_$t $a"
}

for t in "${targets[@]}"; do
    bin=$OUT/fuzz_$t
    log=$OUT/logs/$t.log
    status=ok
    if [[ $mode == ci ]]; then
        # What is left of the budget (replays included), shared by the
        # targets still to run (a run spends a second or two starting and
        # stopping).
        per_target=$(((run_start + CI_BUDGET - SECONDS) / left))
        [[ $per_target -ge 1 ]] || per_target=1
    fi
    left=$((left - 1))

    # Regressions, then the committed corpus: each input once, no fuzzing.
    shopt -s nullglob
    regressions=(fuzz/regressions/"$t"/*)
    seeds=(fuzz/corpus/"$t"/*)
    shopt -u nullglob
    replay=("${regressions[@]}" "${seeds[@]}")
    if [[ ${#replay[@]} -gt 0 ]]; then
        if ! "$bin" -timeout=10 -rss_limit_mb=2048 "${replay[@]}" >"$OUT/logs/$t.replay.log" 2>&1; then
            echo "fuzz: [$t] FAILED replaying fuzz/regressions/$t and fuzz/corpus/$t:"
            grep -a -E 'Running: |PROPERTY VIOLATED|ERROR: |SUMMARY: ' "$OUT/logs/$t.replay.log" | tail -n 8 | sed 's/^/    /'
            echo "fuzz: [$t] log: $OUT/logs/$t.replay.log"
            failed=1
            rows+=("$t|-|-|-|-|-|${#seeds[@]}|REGRESSION")
            continue
        fi
    fi
    if [[ $mode == replay ]]; then
        echo "fuzz: [$t] replayed ${#regressions[@]} regression(s) and ${#seeds[@]} seed(s): ok"
        rows+=("$t|0|${#replay[@]}|-|-|-|${#seeds[@]}|ok")
        continue
    fi

    work=$tmp/corpus-$t
    mkdir -p "$work"
    [[ ${#seeds[@]} -eq 0 ]] || cp "${seeds[@]}" "$work/"
    dict=()
    [[ -f fuzz/dict/$t.dict ]] && dict=(-dict="fuzz/dict/$t.dict")
    touch "$tmp/stamp"
    start=$SECONDS
    rc=0
    echo "fuzz: [$t] fuzzing for $per_target s"
    timeout -k 10 $((per_target + 120)) nice -n 10 "$bin" \
        -max_total_time="$per_target" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="$OUT/artifacts/$t-" \
        "${dict[@]}" "${EXTRA[@]}" "$work" >"$log" 2>&1 || rc=$?
    secs=$((SECONDS - start))

    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n1)
    last=$(grep -a -E '^#[0-9]+.* cov: ' "$log" | tail -n1 || true)
    [[ -n $execs ]] || execs=$(sed -n 's/^#\([0-9]*\).*/\1/p' <<<"$last")
    [[ -n $rate ]] || rate=$(sed -n 's/.*exec\/s: \([0-9]*\).*/\1/p' <<<"$last")
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    corp=$(find "$work" -type f | wc -l)
    seed=$(sed -n 's/^INFO: Seed: //p' "$log" | head -n1)

    mapfile -t found < <(find "$OUT/artifacts" -type f \( -name "$t-crash-*" -o -name "$t-leak-*" \
        -o -name "$t-timeout-*" -o -name "$t-oom-*" \) -newer "$tmp/stamp" 2>/dev/null)
    if [[ $rc -ne 0 || ${#found[@]} -gt 0 ]]; then
        failed=1
        status=FAILED
        [[ $rc -eq 124 || $rc -eq 137 ]] && status="HUNG (killed)"
        echo "fuzz: [$t] $status (exit $rc, seed ${seed:-?}); end of $log:"
        grep -a -v -E '^ +#[0-9]+ 0x' "$log" | grep -a -E 'PROPERTY|ERROR|SUMMARY|==[0-9]+==|^  ' |
            head -n 12 | sed 's/^/    /'
        for a in "${found[@]}"; do show_artifact "$t" "$a"; done
        if [[ ${#found[@]} -gt 0 ]]; then
            case ${found[0]} in
                *-leak-*) status=LEAK ;;
                *-timeout-*) status=TIMEOUT ;;
                *-oom-*) status=OOM ;;
                *) status=CRASH ;;
            esac
        fi
    fi
    printf 'fuzz: [%s] %s s, %s execs, %s exec/s, cov %s, ft %s, corpus %s -> %s, seed %s: %s\n' \
        "$t" "$secs" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "${#seeds[@]}" "$corp" \
        "${seed:-?}" "$status"
    rows+=("$t|$secs|${execs:-?}|${rate:-?}|${cov:-?}|${ft:-?}|${#seeds[@]} -> $corp|$status")

    if [[ $merge -eq 1 && $status == ok ]]; then
        mkdir -p "fuzz/corpus/$t"
        n0=$(find "fuzz/corpus/$t" -type f | wc -l)
        "$bin" -merge=1 -timeout=10 -rss_limit_mb=2048 "fuzz/corpus/$t" "$work" \
            >"$OUT/logs/$t.merge.log" 2>&1 ||
            {
                echo "fuzz: [$t] merge failed, see $OUT/logs/$t.merge.log"
                failed=1
            }
        n1=$(find "fuzz/corpus/$t" -type f | wc -l)
        echo "fuzz: [$t] merged $((n1 - n0)) new input(s) into fuzz/corpus/$t"
    fi
done

echo
printf '%-12s %6s %12s %8s %6s %7s %13s  %s\n' target secs execs exec/s cov ft corpus result
for r in "${rows[@]}"; do
    IFS='|' read -r t s e x c f k st <<<"$r"
    printf '%-12s %6s %12s %8s %6s %7s %13s  %s\n' "$t" "$s" "$e" "$x" "$c" "$f" "$k" "$st"
done
echo "fuzz: build ${build_secs} s, total $SECONDS s; logs in $OUT/logs"
if [[ $failed -ne 0 ]]; then
    echo "fuzz: FAILED (reproducers in $OUT/artifacts)"
    exit 1
fi
echo "fuzz: all targets passed"
