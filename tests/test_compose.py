"""docker-compose.yml: structure, commands and environment (pure; no Docker engine here).

Every bucketsync service's ``command`` must parse with the real CLI parser (nothing runs)
and its ``BUCKETSYNC_*`` environment must be accepted by the settings loader, both without
a config file and over the config file the image ships (``bucketsync.example.yaml``).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from bucketsync.cli import build_parser
from bucketsync.config import ENV_PREFIX, ConfigError, Settings, load_settings
from pipeline.store import redis_encoding_args

ROOT = Path(__file__).resolve().parent.parent
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
BUCKETSYNC = sorted(
    name
    for name, svc in SERVICES.items()
    if isinstance(svc.get("command"), list) and svc["command"][:1] == ["bucketsync"]
)
PROCESSORS = sorted(n for n in BUCKETSYNC if SERVICES[n]["command"][1] == "processor")
GATEWAYS = sorted(n for n in BUCKETSYNC if SERVICES[n]["command"][1] == "gateway")


def _profiles(name: str) -> list[str]:
    return list(SERVICES[name].get("profiles", []))


def _env(name: str) -> dict[str, str]:
    env = SERVICES[name].get("environment") or {}
    assert isinstance(env, dict), f"{name}: environment must be a mapping"
    return {str(k): str(v) for k, v in env.items()}


def _parse(command: list[str]) -> argparse.Namespace:
    try:
        return build_parser().parse_args(command[1:])
    except SystemExit as exc:  # argparse reports the error on stderr and exits
        raise AssertionError(f"command does not parse: {command}") from exc


def _load(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str], path: Path | None
) -> Settings:
    import os

    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)  # no ./bucketsync.yaml: the config-file-less path
    return load_settings(path)


def test_default_topology_and_loadtest_profile() -> None:
    default = {n for n in SERVICES if not _profiles(n)}
    loadtest = {n for n in SERVICES if "loadtest" in _profiles(n)}
    assert {"kafka", "redis", "redis-replica"} <= default
    assert len([p for p in PROCESSORS if p in default]) >= 2
    assert len([g for g in GATEWAYS if g in default]) >= 2
    assert {n: SERVICES[n]["command"][1] for n in loadtest} == {
        "loadgen": "loadgen",
        "simulator": "simulate",
    }
    for name, svc in SERVICES.items():
        assert set(svc.get("profiles", [])) <= {"loadtest"}, name


def test_kafka_is_kraft_and_redis_has_a_replica() -> None:
    kafka = SERVICES["kafka"]["environment"]
    assert "controller" in kafka["KAFKA_PROCESS_ROLES"]
    assert "KAFKA_ZOOKEEPER_CONNECT" not in kafka
    assert kafka["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"
    replica = SERVICES["redis-replica"]["command"]
    assert replica[replica.index("--replicaof") + 1 :][:2] == ["redis", "6379"]
    assert SERVICES["redis-replica"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_gateways_read_from_the_replica_and_processors_write_the_primary(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in BUCKETSYNC:
        s = _load(monkeypatch, tmp_path, _env(name), None)
        assert s.redis.url == "redis://redis:6379/0"
        if name in GATEWAYS:
            assert s.redis.replica_urls == ["redis://redis-replica:6379/0"], name
            assert SERVICES[name]["depends_on"]["redis-replica"]["condition"] == "service_healthy"
        else:
            assert s.redis.replica_urls == [], name


def test_redis_services_use_the_store_encodings() -> None:
    """Both Redis services run with the encodings the store is sized for (REDIS_ENCODING)."""
    want = redis_encoding_args()
    for name in ("redis", "redis-replica"):
        cmd = SERVICES[name]["command"]
        pairs = {(cmd[i], cmd[i + 1]) for i in range(len(cmd) - 1)}
        assert all((want[i], want[i + 1]) in pairs for i in range(0, len(want), 2)), name


def test_depends_on_names_real_services_with_valid_conditions() -> None:
    conditions = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, svc in SERVICES.items():
        deps = svc.get("depends_on", {})
        for dep, spec in deps.items() if isinstance(deps, dict) else ((d, {}) for d in deps):
            assert dep in SERVICES, f"{name} depends on unknown {dep}"
            assert dep != name
            assert spec.get("condition", "service_started") in conditions, (name, dep)
            if spec.get("condition") == "service_healthy":
                assert "healthcheck" in SERVICES[dep], f"{name} waits for {dep}'s health"
            # a default service never waits for one that only a profile starts
            if not _profiles(name):
                assert not _profiles(dep), f"{name} depends on profile-only {dep}"
    for name in BUCKETSYNC:
        deps = SERVICES[name]["depends_on"]
        if name in PROCESSORS or name == "loadgen":
            assert deps["topics"]["condition"] == "service_completed_successfully", name
        if name in PROCESSORS or name in GATEWAYS:
            assert deps["redis"]["condition"] == "service_healthy", name


def test_published_ports_are_unique_and_gateways_listen_where_published() -> None:
    host_ports: list[str] = []
    for name, svc in SERVICES.items():
        for spec in svc.get("ports", []):
            host, container = str(spec).rsplit(":", 1)
            host_ports.append(host)
            if name in GATEWAYS:
                settings_port = _env(name).get("BUCKETSYNC_GATEWAY__PORT", "8080")
                assert container == settings_port, name
    assert len(host_ports) == len(set(host_ports)), host_ports
    for name in GATEWAYS:
        assert SERVICES[name]["ports"], f"{name} is not reachable from the host"
        assert _env(name)["BUCKETSYNC_GATEWAY__HOST"] == "0.0.0.0", name


@pytest.mark.parametrize("name", BUCKETSYNC)
def test_command_parses_with_the_cli(name: str) -> None:
    svc = SERVICES[name]
    args = _parse(svc["command"])
    assert args.command == svc["command"][1]
    assert callable(args.handler)
    if name in GATEWAYS:
        assert (args.workers or 1) >= 1
    if name == "simulator":
        assert sorted(args.url) == sorted(f"http://{g}:8080" for g in GATEWAYS)
    if name == "loadgen":
        assert args.topic in _loaded_topics(name)


def _loaded_topics(name: str) -> list[str]:
    return list(yaml.safe_load(_env(name)["BUCKETSYNC_KAFKA__TOPICS"]))


@pytest.mark.parametrize("name", BUCKETSYNC)
@pytest.mark.parametrize("config", ["none", "image"])
def test_environment_is_accepted_by_the_settings_loader(
    name: str, config: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env = _env(name)
    assert env, f"{name} has no environment"
    for key in env:
        assert key.startswith(ENV_PREFIX), f"{name}: {key} is not a bucketsync setting"
        assert re.fullmatch(r"BUCKETSYNC_[A-Z0-9_]+__[A-Z0-9_]+", key), key
    path = ROOT / "bucketsync.example.yaml" if config == "image" else None
    settings = _load(monkeypatch, tmp_path, env, path)
    # every variable landed on the key it names, with the value given
    for key, raw in env.items():
        section, field = key[len(ENV_PREFIX) :].lower().split("__", 1)
        value = getattr(getattr(settings, section), field)
        expected = yaml.safe_load(raw) if raw.startswith("[") else raw
        assert str(value) == str(expected) or value == expected, (key, value, raw)
    assert settings.redis.url.startswith("redis://redis:")
    assert settings.kafka.bootstrap_servers == "kafka:9092"
    assert settings.auth.hs256_secret and settings.auth.hs256_secret != "change-me"


def test_services_share_one_group_secret_and_store() -> None:
    shared = (
        "BUCKETSYNC_KAFKA__BOOTSTRAP_SERVERS",
        "BUCKETSYNC_KAFKA__TOPICS",
        "BUCKETSYNC_REDIS__URL",
        "BUCKETSYNC_AUTH__HS256_SECRET",
    )
    for key in shared:
        assert len({_env(n).get(key) for n in BUCKETSYNC}) == 1, key
    ids = [_env(p).get("BUCKETSYNC_PROCESSOR__INSTANCE_ID") for p in PROCESSORS]
    assert all(ids) and len(set(ids)) == len(ids), f"static member ids must be unique: {ids}"


def test_the_loader_refuses_an_unknown_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The check above means something: a misspelt variable fails to load."""
    for bad in ("BUCKETSYNC_GATEWAY__HOSTNAME", "BUCKETSYNC_GATEWAYS__HOST"):
        with pytest.raises(ConfigError, match="unknown config key"):
            _load(monkeypatch, tmp_path, {bad: "0.0.0.0"}, None)


def test_healthchecks_use_the_real_probes() -> None:
    for name in GATEWAYS:
        test = " ".join(SERVICES[name]["healthcheck"]["test"])
        assert "http://127.0.0.1:8080/probes/readiness" in test, name
    for name in PROCESSORS:
        test = " ".join(SERVICES[name]["healthcheck"]["test"])
        port = Settings().processor.metrics_port
        assert f"http://127.0.0.1:{port}/metrics" in test, name
    for name in ("kafka", "redis", "redis-replica"):
        assert SERVICES[name]["healthcheck"]["test"], name
    # the probe paths exist in the gateway's own OpenAPI document
    from gateway.openapi import openapi_document

    assert "/probes/readiness" in openapi_document()["paths"]


def test_dockerfile_installs_the_package_with_the_config_it_names() -> None:
    lines = [
        line.strip()
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert lines[0].startswith("FROM python:3.11")
    copied = " ".join(line for line in lines if line.startswith("COPY"))
    for part in ("pyproject.toml", "bucketsync", "pipeline", "gateway"):
        assert re.search(rf"\b{part}\b", copied), part
    assert any(re.fullmatch(r"RUN pip install .*\s\.", line) for line in lines)
    # the config file the image ships, and the sync rules it points at
    example = yaml.safe_load((ROOT / "bucketsync.example.yaml").read_text())
    assert "COPY bucketsync.example.yaml bucketsync.yaml" in lines
    assert any(line.startswith(f"COPY {example['sync_rules']} ") for line in lines)
    for name in BUCKETSYNC:
        assert SERVICES[name].get("build") == ".", name
