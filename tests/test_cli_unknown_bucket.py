"""``compact``, ``verify`` and ``inspect`` with ``--bucket B`` naming no bucket of the store
(a typo, a wrong prefix) are refused naming the bucket and the prefix, exit 2: they reported
"compacted 1 bucket(s)" / "verified 1 bucket(s): 0 difference(s)" (exit 0) for a bucket that
is not there. A bucket that exists still works."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from bucketsync import cli
from pipeline.store import Store
from tests.gateway_helpers import feed, todo
from tests.processes import write_config
from tests.test_gateway_protocol import RULES

pytestmark = pytest.mark.stack


@pytest.fixture
def cfg(make_settings: Any, tmp_path: Path) -> tuple[Path, str]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    s = make_settings(sync_rules=str(rules))
    asyncio.run(feed(s, [todo("t1", "u1")]))

    async def buckets() -> list[str]:
        store = Store.from_settings(s)
        try:
            return await store.all_buckets()
        finally:
            await store.close()

    names = asyncio.run(buckets())
    assert names
    return write_config(tmp_path, s, "bucketsync"), names[0]


@pytest.mark.parametrize("command", ["compact", "verify", "inspect"])
def test_an_unknown_bucket_is_refused(
    cfg: tuple[Path, str], command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path, known = cfg
    typo = known + "x"
    assert cli.main(["--config", str(path), command, "--bucket", typo]) == 2
    out = capsys.readouterr()
    assert f"no bucket {typo!r}" in out.err and "redis.prefix" in out.err, out.err
    assert cli.main(["--config", str(path), command, "--bucket", known]) == 0
