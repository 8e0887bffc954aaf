"""Environment overrides (``BUCKETSYNC_<SECTION>__<KEY>``): a bad value is refused with a
message naming the environment variable (not the YAML file, which may not even set the key),
and a list key given as plain text (``BUCKETSYNC_KAFKA__TOPICS=a,b``, what a user types) is a
ConfigError naming it, never a pydantic traceback. Pure logic: no services."""

from __future__ import annotations

from pathlib import Path

import pytest

from bucketsync.config import ConfigError, load_settings


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for k in list(__import__("os").environ):
        if k.startswith("BUCKETSYNC_") and not k.startswith("BUCKETSYNC_TEST_"):
            monkeypatch.delenv(k)
    p = tmp_path / "bucketsync.yaml"
    p.write_text("kafka:\n  topics: [a.public.t]\n")
    return p


def test_invalid_env_value_names_the_variable(cfg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUCKETSYNC_PROCESSOR__DRIVER", "fast")
    with pytest.raises(ConfigError) as e:
        load_settings(cfg)
    msg = str(e.value)
    assert "processor.driver" in msg and "BUCKETSYNC_PROCESSOR__DRIVER" in msg, msg
    assert str(cfg) not in msg, msg


def test_yaml_value_still_names_the_file(cfg: Path) -> None:
    cfg.write_text("processor:\n  driver: fast\n")
    with pytest.raises(ConfigError) as e:
        load_settings(cfg)
    assert "processor.driver" in str(e.value) and str(cfg) in str(e.value)


def test_unknown_env_key_in_a_known_section_names_the_variable(
    cfg: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BUCKETSYNC_PROCESSOR__DRVIER", "faust")
    with pytest.raises(ConfigError) as e:
        load_settings(cfg)
    assert "BUCKETSYNC_PROCESSOR__DRVIER" in str(e.value), str(e.value)


@pytest.mark.parametrize("value", ["a.public.t,b.public.u", "a.public.t, b.public.u"])
def test_list_key_as_comma_separated_text(
    cfg: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("BUCKETSYNC_KAFKA__TOPICS", value)
    assert load_settings(cfg).kafka.topics == ["a.public.t", "b.public.u"]


def test_list_key_as_json_and_single_name(cfg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUCKETSYNC_KAFKA__TOPICS", '["x.public.a", "x.public.b"]')
    assert load_settings(cfg).kafka.topics == ["x.public.a", "x.public.b"]
    monkeypatch.setenv("BUCKETSYNC_KAFKA__TOPICS", "x.public.a")
    assert load_settings(cfg).kafka.topics == ["x.public.a"]


def test_unparsable_env_value_is_a_config_error(cfg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUCKETSYNC_AUTH__AUDIENCE", "[unclosed")
    with pytest.raises(ConfigError) as e:
        load_settings(cfg)
    assert "BUCKETSYNC_AUTH__AUDIENCE" in str(e.value), str(e.value)


def test_null_disables_an_optional_key_from_the_environment(
    cfg: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BUCKETSYNC_GATEWAY__MAX_CONNECTIONS_PER_USER", "null")
    assert load_settings(cfg).gateway.max_connections_per_user is None


@pytest.mark.parametrize(
    "var,value,key",
    [
        ("BUCKETSYNC_REDIS__URL", "http://127.0.0.1:6379/0", "redis.url"),
        ("BUCKETSYNC_REDIS__URL", "127.0.0.1:6379", "redis.url"),
        ("BUCKETSYNC_REDIS__REPLICA_URLS", "redis://a:6380/0,localhost:6381", "redis.replica_urls"),
    ],
)
def test_a_redis_url_without_a_redis_scheme_is_a_config_error(
    cfg: Path, monkeypatch: pytest.MonkeyPatch, var: str, value: str, key: str
) -> None:
    """Not a ValueError traceback from redis-py when the first command runs (the gateway
    and processor printed one), but a ConfigError naming the key and the variable."""
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as e:
        load_settings(cfg)
    msg = str(e.value)
    assert key in msg and var in msg and "redis://" in msg, msg


def test_redis_urls_with_valid_schemes_load(cfg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUCKETSYNC_REDIS__URL", "rediss://h:6379/1")
    monkeypatch.setenv("BUCKETSYNC_REDIS__REPLICA_URLS", "redis://a:6380/0,unix:///tmp/r.sock")
    s = load_settings(cfg)
    assert s.redis.url == "rediss://h:6379/1"
    assert s.redis.replica_urls == ["redis://a:6380/0", "unix:///tmp/r.sock"]
