"""A gateway whose auth settings can accept no token (no ``auth.hs256_secret``,
``auth.jwks_file`` or ``auth.jwks_url``; or an empty ``auth.audience``) is refused at start
naming the keys, exit 2: it started and answered every client 401. Pure: the check runs
before Redis or a port is touched."""

from __future__ import annotations

from pathlib import Path

import pytest

from bucketsync import cli


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for k in list(os.environ):
        if k.startswith("BUCKETSYNC_") and not k.startswith("BUCKETSYNC_TEST_"):
            monkeypatch.delenv(k)


@pytest.mark.parametrize(
    "auth,expected",
    [
        ("  hs256_secret: null\n", "no token verification key: set auth.hs256_secret"),
        ("  audience: []\n", "auth.audience is empty"),
    ],
)
def test_a_gateway_that_accepts_no_token_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], auth: str, expected: str
) -> None:
    (tmp_path / "rules.yaml").write_text(
        "bucket_definitions:\n  g:\n    data: ['SELECT * FROM todos']\n"
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sync_rules: rules.yaml\nredis:\n  url: redis://127.0.0.1:1/0\nauth:\n" + auth)
    assert cli.main(["--config", str(cfg), "gateway", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err
