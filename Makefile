# blueprint_notify: build, test and demo.
#
#   make test        system packages (if missing), .venv, editable install,
#                    extension built in place with BPN_DEV=1 (-Werror), pytest
#   make test-asan   the same suite against an ASan+UBSan build (see below)
#   make asan-selfcheck  proves the ASan run reports leaks and UB in csrc/
#   make demo        the web demo (python -m blueprint_notify demo); with CI
#                    set: its scripted run (--once), which exits by itself
#   make demo-terminal  examples/orchestrator.py, the terminal-only demo
#   make bench       every benchmark (bench/run.py), writes docs/BENCHMARKS.md
#                    (installs .[bench], nginx-light, wrk, valgrind)
#   make tsan        ThreadSanitizer run of the C core's threads (tools/tsan.sh)
#   make fuzz        libFuzzer on every C parser, 5 min each (tools/fuzz.sh)
#   make soak        1,000,000 events with a flaky receiver (tools/soak.py)
#   make clean       build outputs (keeps .venv); distclean also removes .venv
#
# Second runs are cheap. The install is stamped in .venv and redone only when
# pyproject.toml or setup.py change. The extension is rebuilt only when
# something under csrc/ or setup.py is newer than it, or when the build
# flavour (normal or asan, recorded in .build-flavor) is not the one wanted;
# a flavour change rebuilds everything (--force). So `make test` after
# `make test-asan` rebuilds the normal extension, and vice versa.
#
# Variables: PYTHON (interpreter for the venv, default python3), VENV,
# PYTEST_ARGS (extra pytest arguments, e.g. PYTEST_ARGS='-k lag -x'),
# BENCH_ARGS (e.g. BENCH_ARGS=--quick), JOBS (parallel compile jobs),
# DEMO_ARGS (e.g. DEMO_ARGS='--port 0 --no-browser'; default --once in CI).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := test
MAKEFLAGS += --no-print-directory

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
DEMO_ARGS ?= $(if $(filter-out 0 false,$(CI)),--once)

VENV_STAMP := $(VENV)/.bpn-venv-stamp
INSTALL_STAMP := $(VENV)/.bpn-install-stamp
BENCH_STAMP := $(VENV)/.bpn-bench-stamp
FLAVOR_FILE := .build-flavor

export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PIP_NO_INPUT := 1

# ---- ASan + UBSan ---------------------------------------------------------
#
# test-asan builds the extension with BPN_ASAN=1 (setup.py: -fsanitize=
# address,undefined -fno-sanitize-recover=all) and runs the suite under
# tools/asan-env, which preloads the gcc ASan and UBSan runtimes (the
# interpreter is not instrumented), sets PYTHONMALLOC=malloc so Python's
# allocations go through the intercepted malloc, and sets
#   ASAN_OPTIONS   detect_leaks=1 abort_on_error=1 halt_on_error=1
#                  detect_stack_use_after_return=1 malloc_context_size=2
#                  allow_user_segv_handler=0 use_sigaltstack=0 log_path=...
#   LSAN_OPTIONS   suppressions=tools/lsan.supp
#   UBSAN_OPTIONS  print_stacktrace=1 halt_on_error=1 log_path=...
# Any ASan error or UB aborts the process; a leak fails it at exit. Reports
# are written to files and printed when the run ends, so one from a child
# process or from inside pytest's output capture is not lost; pytest runs
# with --capture=sys so a crash report is not swallowed by fd capture.
#
# What the leak suppressions cover, and why. CPython does not free all of
# its memory at exit, so LeakSanitizer would fail every run on the
# interpreter's own blocks. tools/lsan.supp suppresses a leak only when the
# direct caller of malloc is the interpreter (libpython or the python
# binary) or a standard-library extension module (lib-dynload). That test
# is exact only because malloc_context_size=2 keeps nothing but malloc and
# its direct caller in each stack: with longer stacks every allocation made
# by our code would also show the interpreter frame that called into it,
# and be suppressed. Still reported: blocks whose direct allocator is
# csrc/ (malloc/calloc/strdup, and PyMem_Malloc, which tail-calls malloc),
# libcurl or OpenSSL. Not covered: Python objects leaked through a missing
# Py_DECREF (the interpreter allocated them); tests catch those by counting
# references. `make asan-selfcheck` proves all this on throwaway builds with
# deliberate leaks and UB, and runs in CI.
ASAN_RUN := tools/asan-env

.PHONY: test test-asan asan-selfcheck demo demo-terminal bench build build-asan install sysdeps \
	tsan fuzz soak clean distclean help

help:
	@sed -n '2,15s/^# \{0,1\}//p' $(firstword $(MAKEFILE_LIST))

# ---- setup ------------------------------------------------------------------

# apt packages when something is missing (apt-get update once, root only).
sysdeps:
	@PYTHON='$(PYTHON)' tools/sysdeps.sh

$(VENV_STAMP): | sysdeps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	@touch $@

# The editable install also compiles the extension in place; forget its
# flavour so the next build step rebuilds it with the flags wanted.
$(INSTALL_STAMP): pyproject.toml setup.py $(VENV_STAMP) | sysdeps
	$(PY) -m pip install -q -e '.[test]'
	@rm -f $(FLAVOR_FILE)
	@touch $@

install: $(INSTALL_STAMP)

# $(call build_ext,FLAVOR,ENV): builds the extension in place unless it is
# already this flavour and newer than csrc/ and setup.py.
define build_ext
	@so=$$(ls blueprint_notify/_core*.so 2>/dev/null | head -n1 || true); \
	have=$$(cat $(FLAVOR_FILE) 2>/dev/null || true); \
	if [ "$$have" != "$(1)" ]; then why="flavour $${have:-unknown} -> $(1)"; \
	elif [ -z "$$so" ]; then why="not built"; \
	elif [ -n "$$(find csrc setup.py -newer "$$so" -print -quit)" ]; then why="sources changed"; \
	else exit 0; fi; \
	echo "building blueprint_notify._core ($(1): $$why)"; \
	rm -f $(FLAVOR_FILE); \
	$(2) $(PY) setup.py -q build_ext --inplace --force --parallel $(JOBS); \
	echo $(1) > $(FLAVOR_FILE)
endef

build: $(INSTALL_STAMP)
	$(call build_ext,normal,BPN_DEV=1)

build-asan: $(INSTALL_STAMP)
	$(call build_ext,asan,BPN_DEV=1 BPN_ASAN=1)

# ---- targets ----------------------------------------------------------------

test: build
	$(PY) -m pytest $(PYTEST_ARGS)

test-asan: build-asan
	$(ASAN_RUN) $(PY) -m pytest --capture=sys $(PYTEST_ARGS)

# Builds throwaway copies in a temp dir; the in-place extension is untouched.
asan-selfcheck: $(INSTALL_STAMP)
	tools/asan-selfcheck $(PY)

# The web demo serves until Ctrl-C; --once (CI) drives it over HTTP, checks
# the outcome and exits 0 if all is well.
demo: build
	$(PY) -m blueprint_notify demo $(DEMO_ARGS)

demo-terminal: build
	$(PY) examples/orchestrator.py

# The bench extra (aiohttp, httpx, uvloop, uvicorn) for the peers compared,
# and nginx-light, wrk and valgrind (tools/sysdeps.sh --bench).
$(BENCH_STAMP): pyproject.toml setup.py $(INSTALL_STAMP)
	PYTHON=$(PYTHON) tools/sysdeps.sh --bench
	$(PY) -m pip install -q -e '.[bench]'
	@rm -f $(FLAVOR_FILE)
	@touch $@

# Every case in one run (bench/run.py): prints the tables and writes
# docs/BENCHMARKS.md. BENCH_ARGS=--quick for a short run (it then writes
# nothing unless --out is given).
bench: $(BENCH_STAMP)
	@$(MAKE) build
	$(PY) bench/run.py $(BENCH_ARGS)

# ---- hardening (docs/RELIABILITY.md) -----------------------------------------

# A C driver over the core's threaded paths, built with -fsanitize=thread
# (not the extension). TSAN_ARGS=--long for a longer run.
tsan:
	tools/tsan.sh $(TSAN_ARGS)

# libFuzzer harnesses (clang; installed as root if missing), 5 minutes per
# target; FUZZ_ARGS=--ci for the one-minute run of CI, --time S per target.
fuzz:
	tools/fuzz.sh $(FUZZ_ARGS)

# 1,000,000 events, a quarter to a flaky receiver, SSE subscribers
# attached; every count must add up and RSS grow < 10 %. SOAK_ARGS=--ci
# for the one-minute run of CI.
soak: build
	$(PY) tools/soak.py $(SOAK_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache $(FLAVOR_FILE)
	rm -f blueprint_notify/_core*.so
	find . -path ./$(VENV) -prune -o -path ./.git -prune -o \
		-name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
