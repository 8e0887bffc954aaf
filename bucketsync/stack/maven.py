"""Jars from Maven Central: the broker, the Connect worker and the Debezium plugin.

Owns :func:`assemble` (``mvn dependency:copy-dependencies`` of a small pom into a directory,
skipped while a sha256 stamp of the pom matches and the jars pass a check), the rendering of
the Kafka-version poms (Kafka's own Log4j 2 version), and the jar checks. Shared by
``bucketsync.stack.kafka`` and ``bucketsync.stack.connect``: one copy of the download, stamp
and error handling. A download lands in ``<dir>.tmp`` and replaces ``<dir>`` only when checked.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from bucketsync.errors import UserError
from bucketsync.stack.console import say
from bucketsync.stack.layout import template

DOWNLOAD_TIMEOUT_S = 1800.0


def find_mvn() -> str | None:
    return shutil.which("mvn")


def log4j_version_for(kafka_version: str) -> str:
    """The Log4j 2 version Kafka itself ships with (2.24.3 up to 4.1.x, 2.25.3 from 4.2)."""
    nums = [int(x) for x in re.findall(r"\d+", kafka_version)[:2]] + [0, 0]
    return "2.25.3" if (nums[0], nums[1]) >= (4, 2) else "2.24.3"


def render_kafka_pom(name: str, kafka_version: str) -> str:
    """Template ``name`` with ``@KAFKA_VERSION@``/``@LOG4J_VERSION@``; the version is validated."""
    if not re.fullmatch(r"[0-9A-Za-z.\-]+", kafka_version):
        raise UserError(f"stack.kafka_version '{kafka_version}' is not a version like 4.1.1")
    return (
        template(name)
        .replace("@KAFKA_VERSION@", kafka_version)
        .replace("@LOG4J_VERSION@", log4j_version_for(kafka_version))
    )


def jar_problem(libs: Path, pattern: str, classes: tuple[str, ...]) -> str | None:
    """None if a jar matching glob ``pattern`` in ``libs`` holds all ``classes``, else why not."""
    jars = sorted(libs.glob(pattern))
    if not jars:
        return f"no {pattern}"
    try:
        with zipfile.ZipFile(jars[0]) as zf:
            names = set(zf.namelist())
    except (OSError, zipfile.BadZipFile) as exc:
        return f"{jars[0].name} unreadable ({exc})"
    for cls in classes:
        if cls not in names:
            return f"{cls} not in {jars[0].name}"
    return None


def missing_jars(libs: Path, prefixes: tuple[str, ...]) -> str | None:
    """``no <prefix>*.jar`` for the first prefix without a jar in ``libs``, else None."""
    for prefix in prefixes:
        if not any(libs.glob(f"{prefix}*.jar")):
            return f"no {prefix}*.jar"
    return None


def _mvn_reason(output: str) -> str:
    errors = [ln.removeprefix("[ERROR]").strip() for ln in output.splitlines() if "[ERROR]" in ln]
    errors = [e for e in errors if e]
    hint = next(
        (
            e
            for e in errors
            if re.search(r"unknown host|could not transfer|connect|timed out|resolve", e, re.I)
        ),
        None,
    )
    reason = hint or (errors[0] if errors else (output.strip().splitlines() or ["mvn failed"])[-1])
    return reason if len(reason) <= 400 else reason[:397] + "..."


def assemble(
    what: str,
    pom: str,
    pom_path: Path,
    out_dir: Path,
    stamp_path: Path,
    problem: Callable[[Path], str | None],
    mvn: str | None,
    *,
    label: str,
    incomplete_hint: str = "",
) -> bool:
    """``mvn dependency:copy-dependencies`` of ``pom`` into ``out_dir`` unless the stamp matches.

    ``problem(dir)`` checks a download (None: usable). True if it downloaded.
    """
    digest = hashlib.sha256(pom.encode()).hexdigest()
    pom_path.parent.mkdir(parents=True, exist_ok=True)
    if not pom_path.exists() or pom_path.read_text() != pom:
        pom_path.write_text(pom)
    try:
        stamp = stamp_path.read_text().strip()
    except OSError:
        stamp = ""
    if stamp == digest and problem(out_dir) is None:
        return False
    mvn = mvn or find_mvn()
    if not mvn:
        raise UserError(
            f"mvn (Apache Maven) not found on PATH; it downloads the {what} jars once: "
            "apt-get install -y maven (or install Maven 3.8+), then run the command again"
        )
    say(f"{label}: downloading {what} jars from Maven Central (first run, ~1 min)...")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        mvn, "-q", "-B", "-f", str(pom_path), "dependency:copy-dependencies",
        "-DincludeScope=runtime", f"-DoutputDirectory={tmp}",
    ]  # fmt: skip
    t0 = time.monotonic()
    try:
        res = subprocess.run(
            cmd, cwd=pom_path.parent, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise UserError(
            f"could not download {what} jars from Maven Central: mvn timed out after "
            f"{DOWNLOAD_TIMEOUT_S:.0f} s; check network/proxy or ~/.m2/settings.xml"
        ) from None
    except OSError as exc:
        raise UserError(
            f"could not run {mvn} ({exc}); install Maven 3.8+ (apt-get install -y maven)"
        ) from None
    if res.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(
            f"could not download {what} jars from Maven Central: "
            f"{_mvn_reason(res.stdout + res.stderr)}; check network/proxy or ~/.m2/settings.xml"
        )
    bad = problem(tmp)
    if bad:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{what} jars from Maven Central are incomplete ({bad}){incomplete_hint}")
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp.replace(out_dir)
    stamp_path.write_text(digest + "\n")
    n = len(list(out_dir.glob("*.jar")))
    say(f"{label}: {n} {what} jars in {out_dir} ({time.monotonic() - t0:.1f} s)")
    return True
