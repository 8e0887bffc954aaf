"""A processor pointed at no broker (a wrong ``kafka.bootstrap_servers``) says so in its own
log, rate limited, naming the setting: librdkafka printed a raw ``%3|...|FAIL|`` line to
stderr per connection attempt (hundreds in 30 s)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.pipeline_helpers import write_rules
from tests.processes import free_port, start_processor, stop, write_config
from tests.test_backlog import RULES

pytestmark = pytest.mark.stack


def test_an_unreachable_broker_is_one_line_naming_the_setting(
    make_settings: Any, tmp_path: Path
) -> None:
    servers = f"127.0.0.1:{free_port()}"
    s = make_settings(
        kafka={"topics": ["nowhere.public.jobs"], "bootstrap_servers": servers},
        sync_rules=write_rules(tmp_path, RULES),
        compaction={"interval_s": 0},
        processor={"metrics_port": 0, "instance_id": ""},
    )
    cfg = write_config(tmp_path, s, "proc")
    log_path = tmp_path / "proc.log"
    with log_path.open("ab") as log:
        p: subprocess.Popen[bytes] = start_processor(cfg, "kafka", log)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and "consuming" not in log_path.read_text():
                time.sleep(0.2)
            time.sleep(5)  # some connection attempts (librdkafka retries every ~0.1-1 s)
        finally:
            stop(p)
    text = log_path.read_text()
    assert f"(kafka.bootstrap_servers {servers}" in text, text[-2000:]
    raw = [line for line in text.splitlines() if line.startswith("%")]
    assert raw == [], raw[:5]


@pytest.mark.parametrize("driver", ["kafka", "faust"])
def test_sigterm_while_waiting_for_redis_at_start_stops_the_processor(
    driver: str, make_settings: Any, ns: Any, tmp_path: Path
) -> None:
    """A processor started with its Redis down waits for it; SIGTERM (or Ctrl-C) during that
    wait ends it (exit 0). It kept waiting: only SIGKILL stopped it."""
    s = make_settings(
        kafka={"topics": [ns.topic("app.public.jobs")]},
        redis={"url": f"redis://127.0.0.1:{free_port()}/0"},
        sync_rules=write_rules(tmp_path, RULES),
        compaction={"interval_s": 0},
        processor={"metrics_port": 0, "instance_id": ""},
    )
    cfg = write_config(tmp_path, s, "proc")
    log_path = tmp_path / "proc.log"
    with log_path.open("ab") as log:
        p: subprocess.Popen[bytes] = start_processor(cfg, driver, log)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and "store unreachable" not in log_path.read_text():
                time.sleep(0.2)
            assert "store unreachable" in log_path.read_text(), log_path.read_text()[-2000:]
            # well inside the wait; before the fix a stop right at the start got through
            # Faust's worker, which needs some 10 s to be fully up
            time.sleep(12 if driver == "faust" else 2)
            p.terminate()
            assert p.wait(60) == 0, log_path.read_text()[-2000:]
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(10)
