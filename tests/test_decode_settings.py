"""``kafka.type_hints`` and ``kafka.connector_kinds`` reach the processor's decoder
(cdc-events.md §2.3, §1.2): a hinted schemaless column is converted as its semantic type,
and a MongoDB tombstone whose key holds an integer ``_id`` deletes that document (without
the connector's kind, ``{"id": "1004"}`` reads as a relational key ``id = "1004"``, which
names no row: after log compaction left only the tombstone, the document stayed)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from tests.pipeline_helpers import produce, run_processor, store_view

pytestmark = pytest.mark.stack

RULES = """
bucket_definitions:
  everything:
    data:
      - SELECT id, birthday, credit FROM contacts
      - SELECT _id AS id, sku FROM items
"""


def test_type_hints_and_connector_kinds(make_settings, create_topic, ns, tmp_path: Path) -> None:
    contacts = create_topic(ns.topic("crm.public.contacts"))
    items = create_topic(ns.topic("cat.c.items"))
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    table_id = f"{ns.prefix}.crm.public.contacts"  # the topic: no source block needed
    s = make_settings(
        kafka={
            "topics": [contacts, items],
            "type_hints": {
                table_id: {
                    "birthday": "io.debezium.time.Date",
                    "credit": "org.apache.kafka.connect.data.Decimal;scale=2",
                }
            },
            "connector_kinds": {f"{ns.prefix}.cat": "mongodb"},
        },
        sync_rules=str(rules),
    )
    # a flattened schemaless row (ExtractNewRecordState): the table id is the topic's
    flat = {"id": 7, "birthday": 19884, "credit": "AeI=", "__deleted": "false"}
    produce(s.kafka.bootstrap_servers, contacts, [(b'{"id":7}', orjson.dumps(flat))])
    doc = {
        "op": "c",
        "after": orjson.dumps({"_id": 1004, "sku": "MUG"}).decode(),
        "source": {"connector": "mongodb", "name": f"{ns.prefix}.cat", "db": "c",
                   "collection": "items"},
    }  # fmt: skip
    key = orjson.dumps({"id": "1004"})
    produce(s.kafka.bootstrap_servers, items, [(key, orjson.dumps(doc))])
    asyncio.run(run_processor(s, expect_events=2, idle_exit_s=6))
    got = asyncio.run(store_view(s, ["everything[]"]))["everything[]"]
    live = {(op[3], op[4]): orjson.loads(op[5]) for op in got["ops"] if op[1] == "PUT"}
    # 19884 days after 1970-01-01; 0x01E2 = 482 unscaled, scale 2
    assert live[("contacts", "7")] == {"id": 7, "birthday": "2024-06-10", "credit": "4.82"}
    assert live[("items", "1004")] == {"id": 1004, "sku": "MUG"}

    produce(s.kafka.bootstrap_servers, items, [(key, None)])  # only the tombstone
    asyncio.run(run_processor(s, expect_events=1, idle_exit_s=6))
    got = asyncio.run(store_view(s, ["everything[]"]))["everything[]"]
    live = {(op[3], op[4]) for op in got["ops"] if op[1] == "PUT"}
    assert live == {("contacts", "7")}
