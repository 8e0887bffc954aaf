"""A ``processor.session_timeout_ms`` the broker rejects (below its
group.min.session.timeout.ms, 6,000 by default) is refused at start with one line naming the
key: librdkafka only logs the failed JoinGroup, and the processor ran without consuming."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.pipeline_helpers import write_rules
from tests.processes import child_argv, child_env, write_config
from tests.test_backlog import RULES

pytestmark = pytest.mark.stack


@pytest.mark.parametrize("driver", ["kafka", "faust"])
def test_a_session_timeout_the_broker_rejects_is_refused_at_start(
    driver: str, make_settings: Any, ns: Any, tmp_path: Path
) -> None:
    s = make_settings(
        kafka={"topics": [ns.topic("app.public.jobs")]},
        sync_rules=write_rules(tmp_path, RULES),
        processor={"metrics_port": 0},
    )
    cfg = write_config(
        tmp_path, s, "proc", processor={"session_timeout_ms": 3000, "heartbeat_interval_ms": 1000}
    )
    p = subprocess.run(
        child_argv("processor", str(cfg), "--driver", driver),
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    line = [ln for ln in p.stderr.splitlines() if ln.startswith("bucketsync: error:")]
    assert len(line) == 1 and "processor.session_timeout_ms" in line[0] and "6000" in line[0]
