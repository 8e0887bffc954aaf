"""The programs the stack runs but does not ship: Java, and system packages via apt.

Owns finding and checking Java (Kafka and Kafka Connect both need :data:`MIN_JAVA`+) and the
one way a missing system binary is installed (:func:`find_or_install`: ``apt-get`` when we are
root on Debian/Ubuntu, with services kept from starting), so Redis and PostgreSQL find their
server binaries the same way. Errors name the fix for the machine at hand.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from bucketsync.errors import UserError
from bucketsync.stack.console import say

MIN_JAVA = 17
JAVA_FIX = (
    "install Java 17+ (Debian/Ubuntu: apt-get install -y openjdk-17-jre-headless) or set JAVA_HOME"
)

T = TypeVar("T")


class SourceUnavailable(UserError):
    """A tool the CDC source needs (PostgreSQL server, Java) is missing and cannot be installed."""


def find_java() -> str | None:
    home = os.environ.get("JAVA_HOME")
    if home:
        cand = Path(home) / "bin" / "java"
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return shutil.which("java")


def parse_java_major(text: str) -> int | None:
    """Major version from ``java -version`` output (``1.8.0_292`` -> 8, ``17.0.15`` -> 17)."""
    m = re.search(r'version "([^"]+)"', text)
    if not m:
        return None
    ver = m.group(1)
    if ver.startswith("1."):
        ver = ver[2:]
    digits = re.match(r"\d+", ver)
    return int(digits.group()) if digits else None


def java_major(java: str) -> int | None:
    out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    return parse_java_major(out.stderr + out.stdout)


def check_java() -> str:
    """Path of a Java :data:`MIN_JAVA`+; UserError with the fix if there is none."""
    java = find_java()
    if not java:
        raise UserError(f"java not found on PATH; Kafka needs Java {MIN_JAVA}+: {JAVA_FIX}")
    try:
        major = java_major(java)
    except (OSError, subprocess.SubprocessError) as exc:
        raise UserError(f"could not run {java} -version ({exc}); {JAVA_FIX}") from None
    if major is None:
        raise UserError(f"could not read the version of {java}; {JAVA_FIX}")
    if major < MIN_JAVA:
        raise UserError(f"{java} is Java {major}, Kafka needs Java {MIN_JAVA}+: {JAVA_FIX}")
    return java


def apt_install(package: str) -> bool:
    """``apt-get install -y package`` (``apt-get update`` first if that fails); True on success.

    A temporary ``policy-rc.d`` keeps the package from starting a system-wide service
    that would take the port our stack wants.
    """
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = False
    if not policy.exists():
        with contextlib.suppress(OSError):
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
            made_policy = True
    try:
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]
        for step in (install, ["apt-get", "update", "-q"], install):
            res = subprocess.run(step, env=env, capture_output=True, text=True, timeout=900)
            if res.returncode == 0 and step is install:
                return True
        return False
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        if made_policy:
            with contextlib.suppress(OSError):
                policy.unlink()


def find_or_install(find: Callable[[], T | None], package: str, label: str, what: str) -> T | None:
    """``find()``; if nothing and we may use apt, install ``package`` and look again.

    ``label: what not found; running apt-get install ...`` is said before installing.
    """
    found = find()
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        say(f"{label}: {what} not found; running apt-get install -y {package} ...")
        if apt_install(package):
            return find()
    return None
