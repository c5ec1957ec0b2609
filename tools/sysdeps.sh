#!/usr/bin/env bash
# Checks the system packages the build needs and installs the missing ones
# with apt (running `apt-get update` once first) when run as root on Debian
# or Ubuntu. Otherwise prints what to install and fails. Quiet when nothing
# is missing.
#
#   libcurl4-openssl-dev libssl-dev pkg-config   libcurl and OpenSSL flags
#   libsqlite3-dev                               the durable store (SQLite)
#   gcc                                          the C compiler
#   redis-server                                 the broker tests (tests/test_broker*.py
#                                                start a real one; they skip without it
#                                                outside CI); make bench's scale-out case
#   python3-dev python3-venv                     only for the system python3
#   nginx-light wrk valgrind                     with --bench: make bench's receiver, the
#                                                wire's limit, the instruction counts
#   chromium                                     the browser test (tests/test_browser.py,
#                                                Playwright drives /usr/bin/chromium)
# chromium and redis-server are only for tests that skip without them outside
# CI: when they cannot be installed (not root, no apt) that is a note, not a
# failure.
set -euo pipefail

PYTHON=${PYTHON:-python3}
missing=()

if ! command -v pkg-config >/dev/null 2>&1; then
    missing+=(pkg-config libcurl4-openssl-dev libssl-dev libsqlite3-dev)
else
    pkg-config --exists libcurl || missing+=(libcurl4-openssl-dev)
    pkg-config --exists libcrypto || missing+=(libssl-dev)
    pkg-config --exists sqlite3 || missing+=(libsqlite3-dev)
fi
command -v gcc >/dev/null 2>&1 || missing+=(gcc)

# Headers and venv support of Debian's own interpreter come as packages;
# an interpreter built from source (pyenv, python.org) has both.
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "sysdeps: $PYTHON not found (set PYTHON=...)" >&2
    exit 1
fi
if [[ "$("$PYTHON" -c 'import sys; print(sys.base_prefix)')" == /usr ]]; then
    "$PYTHON" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
        || missing+=(python3-dev)
    "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
fi

can_apt=0
[[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1 && can_apt=1
# --bench: what `make bench` starts and measures with.
if [[ ${1:-} == --bench ]]; then
    command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || missing+=(nginx-light)
    command -v wrk >/dev/null 2>&1 || missing+=(wrk)
    command -v valgrind >/dev/null 2>&1 || missing+=(valgrind)
fi
if ! command -v redis-server >/dev/null 2>&1 && [[ ! -x /usr/bin/redis-server ]]; then
    if [[ $can_apt -eq 1 ]]; then
        missing+=(redis-server)
    else
        echo "sysdeps: note: no redis-server; the broker tests are skipped (outside CI)" \
            "until it is installed, e.g. sudo apt-get install redis-server" >&2
    fi
fi
if [[ ! -x ${BPN_CHROMIUM:-/usr/bin/chromium} ]]; then
    if [[ $can_apt -eq 1 ]]; then
        missing+=(chromium)
    else
        echo "sysdeps: note: no ${BPN_CHROMIUM:-/usr/bin/chromium}; the browser test is skipped" \
            "(outside CI) until it is installed, e.g. sudo apt-get install chromium" >&2
    fi
fi

[[ ${#missing[@]} -eq 0 ]] && exit 0

echo "sysdeps: missing: ${missing[*]}"
if [[ $can_apt -eq 0 ]]; then
    echo "sysdeps: install them first, e.g. sudo apt-get install ${missing[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends --no-upgrade "${missing[@]}" </dev/null
