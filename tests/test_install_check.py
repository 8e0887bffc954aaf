"""scripts/demo decides whether to install from the project's metadata, not from an import
that the source tree satisfies (a fresh venv used to skip the install and then crash)."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "scripts" / "install-check.py"


def _check(python: str, *extras: str) -> subprocess.CompletedProcess[str]:
    # run from the repository root, where `import bucketsync` would succeed from source
    return subprocess.run(
        [python, "-I", str(CHECK), *extras], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_fresh_venv_needs_install(tmp_path: Path) -> None:
    venv.EnvBuilder(with_pip=False).create(tmp_path / "venv")
    py = str(tmp_path / "venv" / "bin" / "python3")
    # the naive check the demo used to make passes from the root: that was the bug
    naive = subprocess.run([py, "-c", "import bucketsync"], cwd=ROOT, capture_output=True)
    assert naive.returncode == 0
    res = _check(py, "dev")
    assert res.returncode == 1, res
    assert "not installed" in res.stdout


def test_this_environment_is_complete() -> None:
    """After `pip install -e .[dev]` (what scripts/test does) nothing is missing. In a copy
    of the tree tested against another clone's install, the only finding allowed is that
    the install is that other clone's (scripts/demo would then reinstall)."""
    res = _check(sys.executable, "dev")
    if res.returncode != 0:
        assert res.returncode == 1, res.stderr
        lines = res.stdout.splitlines()
        assert len(lines) == 1 and lines[0].endswith(f"not from {ROOT}"), res.stdout
        assert f"from {ROOT}," not in lines[0]
