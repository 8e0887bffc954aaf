"""One-shot commands on a Redis that is not running: one line naming the URL, exit 2, no
traceback (``bucketsync compact`` printed redis-py's traceback)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("command", [["compact", "--all"], ["verify"]])
def test_one_shot_commands_say_redis_is_unreachable(command: list[str]) -> None:
    url = f"redis://127.0.0.1:{_closed_port()}/0"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUCKETSYNC_")}
    env["BUCKETSYNC_REDIS__URL"] = url
    p = subprocess.run(
        [sys.executable, "-m", "bucketsync.cli", *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("bucketsync: error:")]
    assert len(lines) == 1 and url in lines[0] and "unreachable" in lines[0], p.stderr
