"""The 51-record fixture corpus (tests/fixtures/cdc) against expected.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bucketsync.bench.decode import bench_decode
from pipeline.cdc import KafkaRecord, LocalSchemaDir, decode_record
from tests.helpers.fixtures import load_fixture

FIXTURES = Path(__file__).parent / "fixtures" / "cdc"
EXPECTED: dict[str, Any] = json.loads((FIXTURES / "expected.json").read_text(encoding="utf-8"))
NAMES = sorted(p.stem for p in FIXTURES.glob("[0-9][0-9]-*.json"))

# "Settings the expected results assume" (fixtures README)
CONNECTOR_KINDS = {
    "shop": "postgresql",
    "crm": "postgresql",
    "flat": "postgresql",
    "mirror": "postgresql",
    "billing": "postgresql",
    "legacy": "mysql",
    "catalog": "mongodb",
    "catalog2": "mongodb",
}
TYPE_HINTS: dict[str, dict[str, str]] = EXPECTED["type_hints"]
MAX_BYTES: int = EXPECTED["limits"]["max_record_bytes"]
SCHEMAS = LocalSchemaDir(FIXTURES / "avro-schemas")
#: keys a result may carry beyond expected.json
ALLOWED_EXTRA = {"message", "source_table", "source_schema", "source_lsn", "source_name"}


def topic_format(topic: str) -> str:
    return "avro" if topic.startswith("billing.") else "json"


def decode_configured(rec: KafkaRecord) -> dict[str, Any]:
    return decode_record(
        rec,
        schemas=SCHEMAS,
        max_record_bytes=MAX_BYTES,
        topic_format=topic_format(rec.topic),  # type: ignore[arg-type]
        type_hints=TYPE_HINTS,
        connector_kinds=CONNECTOR_KINDS,
    )


def decode_auto(rec: KafkaRecord) -> dict[str, Any]:
    """No per-topic format and no connector map: auto-detection only."""
    return decode_record(rec, schemas=SCHEMAS, type_hints=TYPE_HINTS)


def with_duplicates(decoded: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``duplicate_of`` is stateful (§5.2 step 2 / §6): the pipeline recognises a replayed
    event by its identity ``(connector, transaction key, total_order)``. Replays the corpus
    in order, as the processor would, and annotates the later copies."""
    seen: dict[tuple[str, str, int], str] = {}
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(decoded):
        r = dict(decoded[name])
        tx = r.get("tx")
        if r.get("action") in ("upsert", "delete", "truncate") and tx:
            ident = (r["table"].partition(".")[0], tx["id"], tx["total_order"])
            if ident in seen:
                r["duplicate_of"] = seen[ident]
            else:
                seen[ident] = name
        out[name] = r
    return out


def check(name: str, got: dict[str, Any]) -> None:
    expected = EXPECTED["fixtures"][name]
    for k, v in expected.items():
        assert k in got, f"{name}: missing {k!r} in {got}"
        assert got[k] == v, f"{name}: {k!r} is {got[k]!r}, expected {v!r}"
    extra = set(got) - set(expected)
    assert extra <= ALLOWED_EXTRA, f"{name}: unexpected keys {extra - ALLOWED_EXTRA}"
    if got["action"] == "dead_letter":
        assert isinstance(got.get("message"), str) and got["message"].strip()
    else:
        assert "message" not in got


def test_corpus_is_complete() -> None:
    assert len(NAMES) == 51
    assert set(NAMES) == set(EXPECTED["fixtures"])


@pytest.fixture(scope="module")
def configured() -> dict[str, dict[str, Any]]:
    return with_duplicates(
        {n: decode_configured(load_fixture(FIXTURES / f"{n}.json")) for n in NAMES}
    )


@pytest.fixture(scope="module")
def auto() -> dict[str, dict[str, Any]]:
    return with_duplicates({n: decode_auto(load_fixture(FIXTURES / f"{n}.json")) for n in NAMES})


@pytest.mark.parametrize("name", NAMES)
def test_fixture(name: str, configured: dict[str, dict[str, Any]]) -> None:
    check(name, configured[name])


@pytest.mark.parametrize("name", NAMES)
def test_fixture_auto_detected(name: str, auto: dict[str, dict[str, Any]]) -> None:
    """Same results with topic_format="auto" and no connector map (headers and framing)."""
    check(name, auto[name])


@pytest.mark.parametrize("name", NAMES)
def test_decode_is_deterministic_and_cached(name: str) -> None:
    rec = load_fixture(FIXTURES / f"{name}.json")
    first = decode_configured(rec)
    assert decode_configured(rec) == first  # second call runs on cached plans


@pytest.mark.parametrize(
    ("name", "source_schema", "source_table"),
    [
        ("02-pg-schema-create", "public", "customers"),
        ("05-pg-schema-tombstone", "public", "customers"),
        ("06-pg-schema-truncate", "public", "customers"),
        ("13-tx-order-lines-create-1", "public", "order_lines"),
        ("17-pg-noschema-create", "public", "contacts"),
        ("22-mysql-schema-update", "inventory", "products"),
        ("23-mysql-pk-change-delete", "inventory", "products"),
        ("27-mongo-insert", "catalog", "items"),
        ("30-mongo-tombstone", "catalog", "items"),
        ("51-mongo-update-partial", "catalog", "items"),
        ("31-flat-create", "public", "products"),
        ("35-flat-delete-json-null", "public", "products"),
        ("36-avro-create", "public", "invoices"),
        ("39-avro-tombstone", "public", "invoices"),
    ],
)
def test_source_identity(
    name: str, source_schema: str, source_table: str, configured: dict[str, dict[str, Any]]
) -> None:
    got = configured[name]
    assert got["source_schema"] == source_schema
    assert got["source_table"] == source_table


def test_non_row_results_carry_no_source_identity(configured: dict[str, dict[str, Any]]) -> None:
    for name, got in configured.items():
        if got["action"] not in ("upsert", "delete", "truncate"):
            assert "source_table" not in got and "source_schema" not in got, name


def test_avro_topics_need_a_resolver() -> None:
    rec = load_fixture(FIXTURES / "36-avro-create.json")
    got = decode_record(rec)
    assert got["action"] == "dead_letter"
    assert got["reason"] == "unknown_schema_id"
    assert got["schema_id"] == 42
    assert "registry" in got["message"]


def test_json_format_forced_on_avro_bytes_is_invalid_json() -> None:
    rec = load_fixture(FIXTURES / "36-avro-create.json")
    got = decode_record(rec, topic_format="json")
    assert (got["action"], got["reason"]) == ("dead_letter", "invalid_json")


def test_avro_format_forced_on_json_is_wrong_magic_byte() -> None:
    rec = load_fixture(FIXTURES / "02-pg-schema-create.json")
    got = decode_record(rec, topic_format="avro", schemas=SCHEMAS)
    assert got["reason"] == "wrong_magic_byte"
    assert got["magic_byte"] == ord("{")


def test_oversize_is_checked_before_parsing() -> None:
    rec = load_fixture(FIXTURES / "40-bad-invalid-json.json")  # would be invalid_json
    got = decode_record(rec, max_record_bytes=100)
    assert got["reason"] == "oversize"
    assert got["limit_bytes"] == 100


def test_bench_decode_runs() -> None:
    assert bench_decode(200) > 0
