"""A config file that cannot be used is refused in one line naming the file (and where in
it), with exit status 2 and no traceback: a directory or unreadable path, bytes that are not
UTF-8, broken YAML (PyYAML's own message spans several lines with a caret drawing), and a key
given twice in one mapping (PyYAML keeps the last silently, so a second ``processor:`` block
would drop every key of the first). Pure logic: no services."""

from __future__ import annotations

from pathlib import Path

import pytest

from bucketsync import cli
from bucketsync.config import ConfigError, load_settings


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for k in list(os.environ):
        if k.startswith("BUCKETSYNC_") and not k.startswith("BUCKETSYNC_TEST_"):
            monkeypatch.delenv(k)


def _refused(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(ConfigError) as e:
        load_settings(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    assert cli.main(["--config", str(path), "token", "--sub", "u1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(path) in err, err
    return msg


def test_a_directory_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "bucketsync.yaml"
    d.mkdir()
    assert "cannot be read" in _refused(d, capsys)


def test_bytes_that_are_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "c.yaml"
    p.write_bytes(b"kafka:\n  group_id: \xff\xfe\n")
    assert "UTF-8" in _refused(p, capsys)


@pytest.mark.parametrize(
    "text,where",
    [
        ("processor: [\n", "line 2, column 1"),
        ("processor:\n  driver: kafka\n   batch_max_events: 5\n", "line 3, column"),
        ("processor:\n\tdriver: kafka\n", "line 2, column 1"),
    ],
)
def test_broken_yaml_in_one_line_with_its_position(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, where: str
) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    msg = _refused(p, capsys)
    assert "not valid YAML" in msg and where in msg, msg


@pytest.mark.parametrize(
    "text,key,line",
    [
        ("processor:\n  batch_max_events: 7\nprocessor:\n  driver: faust\n", "processor", 3),
        ("gateway:\n  port: 1\n  host: a\n  port: 2\n", "port", 4),
    ],
)
def test_a_key_given_twice_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str, line: int
) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    msg = _refused(p, capsys)
    assert f"'{key}' appears twice" in msg and f"line {line}," in msg, msg


def test_yaml_anchors_and_merge_keys_still_load(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(
        "kafka:\n  topics: &t [a.public.x]\n  group_id: g\n"
        "processor:\n  merge_tables: *t\n  batch_max_events: 3\n"
    )
    s = load_settings(p)
    assert s.processor.merge_tables == ["a.public.x"] and s.processor.batch_max_events == 3


def test_committed_configs_load() -> None:
    root = Path(__file__).resolve().parent.parent
    for name in ("bucketsync.example.yaml", "bucketsync.yaml"):
        load_settings(root / name)


def test_both_avro_schema_sources_are_refused(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("kafka:\n  schema_registry_url: http://127.0.0.1:8081\n  avro_schemas_dir: s\n")
    with pytest.raises(ConfigError) as e:
        load_settings(p)
    assert "kafka.schema_registry_url or kafka.avro_schemas_dir" in str(e.value), str(e.value)


def test_a_missing_avro_schemas_dir_is_refused_at_start(tmp_path: Path) -> None:
    from pipeline.processor import make_schema_resolver

    p = tmp_path / "c.yaml"
    p.write_text("kafka:\n  avro_schemas_dir: schemas/avro\n")
    s = load_settings(p)
    with pytest.raises(ConfigError) as e:
        make_schema_resolver(s)
    assert f"kafka.avro_schemas_dir {tmp_path / 'schemas/avro'} is not a directory" in str(e.value)
    (tmp_path / "schemas/avro").mkdir(parents=True)
    assert make_schema_resolver(s) is not None


@pytest.mark.parametrize(
    "text,expected",
    [
        ("procesor:\n  batch_max_events: 5\n", "'procesor' in {p} (did you mean 'processor'?)"),
        (
            "processor:\n  batch_max_event: 5\n",
            "'processor.batch_max_event' in {p} (did you mean 'processor.batch_max_events'?)",
        ),
        ("gateway:\n  zzz: 1\n", "'gateway.zzz' in {p}"),
    ],
)
def test_an_unknown_key_names_the_closest_known_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    msg = _refused(p, capsys)
    assert msg.endswith(expected.format(p=p)), msg


def test_an_unknown_env_key_names_the_closest_known_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUCKETSYNC_GATEWAY__STALL_TIMEOUT", "5")
    with pytest.raises(ConfigError) as e:
        load_settings()
    assert "did you mean 'gateway.stall_timeout_s'?" in str(e.value), str(e.value)
