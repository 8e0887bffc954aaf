"""Command-line values out of range are refused by the parser, naming the option, before
anything runs (exit 2, no traceback): ``gateway --port 99999`` was a traceback from
``bind()``, ``bench ingest --runs 0`` wrote an empty report, ``loadgen --events -1`` said
it produced -1 events, ``compact --reappend-budget -1`` (a key whose config form must be
>= 0) ran. ``gateway --port 0`` means any free port, as ``gateway.port: 0`` does; it used
to fall back to ``gateway.port``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bucketsync.cli import build_parser
from tests.processes import child_env, free_port, write_config


@pytest.mark.parametrize(
    "argv,option",
    [
        (["gateway", "--port", "99999"], "--port"),
        (["gateway", "--port", "-1"], "--port"),
        (["gateway", "--workers", "0"], "--workers"),
        (["run", "--port", "70000"], "--port"),
        (["demo", "--duration", "0"], "--duration"),
        (["demo", "--duration", "nan"], "--duration"),
        (["token", "--sub", ""], "--sub"),
        (["compact", "--all", "--reappend-budget", "-1"], "--reappend-budget"),
        (["compact", "--all", "--reappend-target", "-0.5"], "--reappend-target"),
        (["inspect", "--limit", "-1"], "--limit"),
        (["loadgen", "--events", "-1"], "--events"),
        (["loadgen", "--rows", "0"], "--rows"),
        (["loadgen", "--rate", "-5"], "--rate"),
        (["simulate", "--clients", "0"], "--clients"),
        (["simulate", "--report-s", "0"], "--report-s"),
        (["bench", "ingest", "--runs", "0"], "--runs"),
        (["bench", "ingest", "--events", "0"], "--events"),
        (["bench", "cdc", "--rate", "0"], "--rate"),
        (["bench", "soak", "--minutes", "0"], "--minutes"),
        (["bench", "e2e", "--workers", "0"], "--workers"),
        (["bench", "fanout", "--levels", "1000,abc"], "--levels"),
        (["bench", "fanout", "--levels", "5000,1000"], "--levels"),
        (["bench", "fanout", "--gateway-workers", "0"], "--gateway-workers"),
        (["bench", "initial-sync", "--ops", "0"], "--ops"),
        (["bench", "store-layout", "--buckets", "0"], "--buckets"),
        (["bench", "reconnect", "--clients", "x"], "--clients"),
    ],
)
def test_out_of_range_values_are_refused_naming_the_option(
    argv: list[str], option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    "argv",
    [
        ["gateway", "--port", "0", "--workers", "1"],
        ["loadgen", "--rate", "0", "--events", "1"],
        ["simulate", "--duration", "0", "--ramp", "0", "--reconnect-s", "0"],
        ["compact", "--all", "--reappend-budget", "0", "--reappend-target", "0"],
        ["bench", "fanout", "--levels", "10,10,20", "--client-procs", "0"],
        ["bench", "e2e", "--batch-wait-ms", "0", "--rate", "0.5"],
        ["inspect", "--limit", "0"],
    ],
)
def test_boundary_values_that_mean_something_are_accepted(argv: list[str]) -> None:
    build_parser().parse_args(argv)


@pytest.mark.stack
def test_gateway_port_0_listens_on_a_free_port(make_settings, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("bucket_definitions:\n  g:\n    data: ['SELECT * FROM todos']\n")
    taken = socket.socket()
    taken.bind(("127.0.0.1", free_port()))
    taken.listen()
    configured = taken.getsockname()[1]
    s = make_settings(sync_rules=str(rules), gateway={"port": configured})
    cfg = write_config(tmp_path, s, "bucketsync")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bucketsync.cli", "--config", str(cfg), "gateway", "--port", "0"],
        env=child_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "listening on" in line or "error" in line:
                break
        text = "".join(lines)
        assert "listening on http://127.0.0.1:" in text, text
        port = int(text.rsplit("127.0.0.1:", 1)[1].split()[0])
        assert port not in (0, configured), text
    finally:
        proc.terminate()
        proc.wait(10)
        taken.close()


def test_a_closed_stdout_is_no_traceback(tmp_path: Path) -> None:
    """``bucketsync token ... | head -c0``: the reader left before the output; no traceback."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("auth:\n  hs256_secret: " + "s" * 40 + "\n")
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run(
            [sys.executable, "-m", "bucketsync.cli", "--config", str(cfg), "token", "--sub", "u"],
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
            timeout=60,
        )
    finally:
        os.close(w)
    assert p.returncode == 141 and p.stderr == "", p.stderr


def test_simulate_against_no_gateway_fails(tmp_path: Path) -> None:
    """``bucketsync simulate`` where no client ever completes a checkpoint (here: nothing
    listens at the URL) verified nothing and exits 1; it exited 0."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("auth:\n  hs256_secret: " + "s" * 40 + "\n")
    url = f"http://127.0.0.1:{free_port()}"
    argv = ["--config", str(cfg), "simulate", "--url", url, "--clients", "2", "--duration", "1"]
    p = subprocess.run(
        [sys.executable, "-m", "bucketsync.cli", *argv],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
    )
    assert p.returncode == 1 and "no client completed a checkpoint" in p.stdout, p.stdout


def test_token_longer_than_the_gateway_accepts_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``bucketsync token --ttl`` past ``auth.max_lifetime_s`` printed a token the gateway
    refuses (PSYNC_S2104)."""
    monkeypatch.delenv("BUCKETSYNC_AUTH__MAX_LIFETIME_S", raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("auth:\n  max_lifetime_s: 600\n  hs256_secret: " + "s" * 40 + "\n")
    from bucketsync import cli

    assert cli.main(["--config", str(cfg), "token", "--sub", "u", "--ttl", "601"]) == 2
    assert "auth.max_lifetime_s (600)" in capsys.readouterr().err
    assert cli.main(["--config", str(cfg), "token", "--sub", "u", "--ttl", "600"]) == 0


def test_loadgen_with_kafka_unreachable_is_one_line(tmp_path: Path) -> None:
    """``bucketsync loadgen`` against a broker that is not there: one line naming the setting
    and exit 2 (it was a KafkaException traceback after ~200 raw librdkafka lines)."""
    servers = f"127.0.0.1:{free_port()}"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"kafka:\n  bootstrap_servers: '{servers}'\n  topics: [a.public.t]\n")
    p = subprocess.run(
        [sys.executable, "-m", "bucketsync.cli", "--config", str(cfg), "loadgen", "--events", "1"],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=120,
    )
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.count("\n") == 1 and f"Kafka at {servers} is unreachable" in p.stderr, p.stderr[
        -2000:
    ]
