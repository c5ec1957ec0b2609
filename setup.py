"""Builds the C extension; metadata lives in pyproject.toml.

Flags come from pkg-config (libcurl, libcrypto, sqlite3). Environment switches:
  BPN_DEV=1    -Werror (dev and CI builds)
  BPN_DEBUG=1  -O0 -g3 -UNDEBUG
  BPN_ASAN=1   AddressSanitizer + UndefinedBehaviorSanitizer
"""

import glob
import os
import shlex
import subprocess

from setuptools import Extension, setup


def pkg_config(*args: str) -> list[str]:
    try:
        out = subprocess.run(
            ["pkg-config", *args, "libcurl", "libcrypto", "sqlite3"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(
            "blueprint_notify needs libcurl, OpenSSL and SQLite development files "
            "and pkg-config (Debian: apt-get install libcurl4-openssl-dev libssl-dev "
            f"libsqlite3-dev pkg-config): {exc}"
        ) from exc
    return shlex.split(out)


def flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


compile_args = ["-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-fvisibility=hidden"]
link_args: list[str] = []
if flag("BPN_DEV") or flag("BPN_ASAN"):
    compile_args.append("-Werror")
if flag("BPN_DEBUG"):
    compile_args += ["-O0", "-g3", "-UNDEBUG"]
if flag("BPN_ASAN"):
    san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    # CPython's flags include -fwrapv, which would hide signed overflow from UBSan.
    compile_args += san + ["-O1", "-g", "-fno-wrapv"]
    link_args += san

cflags = pkg_config("--cflags")
libs = pkg_config("--libs")

setup(
    ext_modules=[
        Extension(
            "blueprint_notify._core",
            sources=["csrc/module.c", *sorted(glob.glob("csrc/core/*.c"))],
            depends=sorted(glob.glob("csrc/core/*.h")),
            include_dirs=["csrc"],
            extra_compile_args=cflags + compile_args,
            extra_link_args=libs + link_args + ["-lpthread"],
        )
    ],
)
