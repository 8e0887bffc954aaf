"""Black-box QA of the event formats a data team feeds (cdc-events.md), under SIGKILLs.

Only the public surface: the CLI (`processor`, `gateway`, `token`, `verify`), the config
YAML, records on Kafka, the sync protocol (qa-scenario.py's client, checksums verified at
every checkpoint_complete). Five connectors, one table each, mixed formats:

* `<tag>pg.public.notes` PostgreSQL, JSON with schemas, 2 partitions: Decimal (base64),
  Date, MicroTimestamp, Uuid (sometimes upper case), boolean; updates without before
  (REPLICA IDENTITY DEFAULT) carrying the unchanged-TOAST placeholder for a large `body`;
  deletes whose before holds only the key and fallback values; tombstones; primary-key
  changes (d + tombstone with `__debezium.newkey`, c with `__debezium.oldkey`); snapshot
  reads; with --tx BEGIN/END markers on `<tag>pg.transaction` and transaction blocks.
  Plus the heartbeat topic and `<tag>pg.message` (op m).
* `<tag>cr.public.contacts` PostgreSQL, schemaless JSON (`schemas.enable=false`), 1
  partition: a numeric(12,2) as base64 and a date as a day number, typed by
  `kafka.type_hints` (--no-hints: the decimal as string text, the date left an integer),
  booleans, arrays/objects (compact JSON text, key order and non-ASCII kept), fractional
  numbers, TRUNCATEs (null key), empty records. `kafka.connector_kinds` names every
  prefix's kind (not with --no-hints).
* `<tag>my.inventory.products` MySQL, JSON with schemas, 2 partitions: full before
  images, Decimal, int8, Timestamp (ms), ZonedTimestamp with offsets (to UTC),
  primary-key changes, and DDL events on the schema-change topic `<tag>my`.
* `<tag>mg.catalog.items` MongoDB, schemaless, 2 partitions: ObjectId, string and int `_id`
  keys, Extended JSON v1 documents in `after` (inserts, full-document updates), partial
  updates without post-image (`updateDescription`: relaxed v2 fields, removed fields ->
  NULL, a dotted path patching a JSON column, the bucket parameter set/unset), deletes,
  tombstones.
* `<tag>fl.public.gadgets` ExtractNewRecordState output, schemaless, 1 partition: rows with
  and without `__` metadata, deletes as `__deleted: "true"`, `__op: d`, JSON `null`
  values and Kafka tombstones; a global bucket (featured = 1).

Bad records (invalid JSON, missing/unknown op, c without after, not an object, null key,
bad base64 decimal, MongoDB update with neither after nor updateDescription, oversize)
are interleaved: each must reach the dead-letter topic with its reason, and no good
record may. owner_id is NULL for some rows (no bucket, sync-protocol.md §8.5).

The model of the source tables is written from the spec, not from pipeline code.
A backlog is produced, 1-3 `bucketsync processor`s start on it while more is fed live,
are SIGKILLed at random and restarted; at the end every user's rows (live stream and a
fresh one) must equal the model, `bucketsync verify` must pass and the dead letters must
be exactly the bad records. Prints one JSON line; exit 0 when all agree. Run directory
(configs, logs) under $QA_RUNS (default /tmp/qa-runs), kept on failure.

usage: scripts/qa-formats.py --seed N [--driver kafka|faust] [--procs 1-3] [--kills K]
       [--tx] [--source-rows all|auto] [--dynamic] [--steps N] [--live N] [--replays P]
       [--no-hints] [--pk-toast]

--replays P: with chance P per step the PostgreSQL connector "restarts" and sends its last
5-60 records again (new offsets, same bytes), as Debezium does after a crash.
--pk-toast: primary-key changes may carry the TOAST placeholder (the new key's partition
may run ahead of the old key's: the create half waits for its delete half, docs/debezium.md).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("qa_scenario", HERE / "qa-scenario.py")
assert _spec and _spec.loader
qs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qs)

BOOT = qs.BOOT
REPO = qs.REPO
jd = qs.jd
USERS = ["u1", "u2", "u3", "u4"]
PH = "__debezium_unavailable_value"
EPOCH = dt.datetime(1970, 1, 1)

RULES = """bucket_definitions:
  by_user:
    parameters: SELECT request.user_id() AS user_id
    data:
      - SELECT id, owner_id, title, body, amount, due, ext, ts, flag FROM notes WHERE owner_id = bucket.user_id
      - SELECT id, owner_id, name, credit, active, birthday, tags, meta, ratio FROM contacts WHERE owner_id = bucket.user_id
      - SELECT id, owner_id, name, price, in_stock, released, updated_at FROM products WHERE owner_id = bucket.user_id
      - SELECT _id AS id, owner_id, sku, qty, price, updated, dims, promo FROM items WHERE owner_id = bucket.user_id
      - SELECT id, owner_id, label, featured, price FROM gadgets WHERE owner_id = bucket.user_id
  featured:
    data:
      - SELECT id, label FROM gadgets WHERE featured = 1
"""

COLS = {
    "notes": ["id", "owner_id", "title", "body", "amount", "due", "ext", "ts", "flag"],
    "contacts": ["id", "owner_id", "name", "credit", "active", "birthday", "tags", "meta", "ratio"],
    "products": ["id", "owner_id", "name", "price", "in_stock", "released", "updated_at"],
    "items": ["id", "owner_id", "sku", "qty", "price", "updated", "dims", "promo"],
    "gadgets": ["id", "owner_id", "label", "featured", "price"],
}


# ------------------------------------------------------------ canonical values (cdc-events.md §3.5)


def dec_b64(unscaled: int) -> str:
    n = max(1, (unscaled.bit_length() + 8) // 8)
    return base64.b64encode(unscaled.to_bytes(n, "big", signed=True)).decode()


def dec_text(unscaled: int, scale: int) -> str:
    sign = "-" if unscaled < 0 else ""
    a = abs(unscaled)
    return f"{sign}{a // 10**scale}.{a % 10**scale:0{scale}d}"


def date_text(days: int) -> str:
    return (dt.date(1970, 1, 1) + dt.timedelta(days=days)).isoformat()


def micro_ts_text(us: int) -> str:
    return (EPOCH + dt.timedelta(microseconds=us)).strftime("%Y-%m-%dT%H:%M:%S.%f")


def milli_ts_text(ms: int) -> str:
    return (EPOCH + dt.timedelta(milliseconds=ms)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]


def mongo_date_text(ms: int) -> str:
    return milli_ts_text(ms) + "Z"


def zoned(us: int, offset_min: int) -> tuple[str, str]:
    """(wire text with an offset, canonical UTC text) of one instant."""
    t = EPOCH.replace(tzinfo=dt.UTC) + dt.timedelta(microseconds=us)
    local = t.astimezone(dt.timezone(dt.timedelta(minutes=offset_min)))
    frac = f"{local.microsecond:06d}".rstrip("0")
    wire = local.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "")
    off = local.strftime("%z")
    wire += "Z" if offset_min == 0 else f"{off[:3]}:{off[3:]}"
    return wire, t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def compact(v: Any) -> str:
    return json.dumps(v, separators=(",", ":"), ensure_ascii=False)


# ------------------------------------------------------------ schemas (JSON converter)


def fld(name: str, typ: str, optional: bool = True, sem: str | None = None, **params: str) -> dict:
    f: dict[str, Any] = {"type": typ, "optional": optional, "field": name}
    if sem:
        f["name"] = sem
        f["version"] = 1
    if params:
        f["parameters"] = params
    return f


NOTES_FIELDS = [
    fld("id", "int64", False),
    fld("owner_id", "string"),
    fld("title", "string", False),
    fld("body", "string"),
    fld("amount", "bytes", False, "org.apache.kafka.connect.data.Decimal", scale="2"),
    fld("due", "int32", True, "io.debezium.time.Date"),
    fld("ext", "string", True, "io.debezium.data.Uuid"),
    fld("ts", "int64", False, "io.debezium.time.MicroTimestamp"),
    fld("flag", "boolean", False),
]
PRODUCTS_FIELDS = [
    fld("id", "int32", False),
    fld("owner_id", "string"),
    fld("name", "string", False),
    fld("price", "bytes", False, "org.apache.kafka.connect.data.Decimal", scale="2"),
    fld("in_stock", "int8", False),
    fld("released", "int64", True, "io.debezium.time.Timestamp"),
    fld("updated_at", "string", True, "io.debezium.time.ZonedTimestamp"),
]


def envelope_schema(name: str, fields: list[dict], kind: str) -> dict:
    val = {"type": "struct", "fields": fields, "optional": True, "name": f"{name}.Value"}
    src = [
        fld(f, "string", False) for f in ("version", "connector", "name", "db", "table", "snapshot")
    ]
    src += [fld(f, "int64") for f in ("ts_ms", "txId", "lsn", "pos", "row", "server_id")]
    src += [fld(f, "string") for f in ("schema", "file", "gtid", "sequence")]
    return {
        "type": "struct",
        "name": f"{name}.Envelope",
        "optional": False,
        "version": 2,
        "fields": [
            dict(val, field="before"),
            dict(val, field="after"),
            {
                "type": "struct",
                "optional": False,
                "field": "source",
                "name": f"io.debezium.connector.{kind}.Source",
                "fields": src,
            },
            {
                "type": "struct",
                "optional": True,
                "field": "transaction",
                "name": "event.block",
                "version": 1,
                "fields": [
                    fld("id", "string", False),
                    fld("total_order", "int64", False),
                    fld("data_collection_order", "int64", False),
                ],
            },
            fld("op", "string", False),
            fld("ts_ms", "int64"),
        ],
    }


def key_schema(name: str, typ: str) -> dict:
    return {
        "type": "struct",
        "name": f"{name}.Key",
        "optional": False,
        "fields": [fld("id", typ, False)],
    }


# ------------------------------------------------------------ generator + model


Rec = tuple[str, int | None, bytes | None, bytes | None, list[tuple[str, bytes]] | None]


class Gen:
    """Produces records and keeps the model: the source tables as canonical rows."""

    def __init__(
        self, tag: str, rnd: random.Random, tx: bool, pk_toast: bool, hints: bool = True
    ) -> None:
        self.tag, self.rnd, self.tx, self.pk_toast, self.hints = tag, rnd, tx, pk_toast, hints
        self.pg, self.cr, self.my, self.mg, self.fl = (
            f"{tag}pg",
            f"{tag}cr",
            f"{tag}my",
            f"{tag}mg",
            f"{tag}fl",
        )
        self.topics = {
            "notes": (f"{self.pg}.public.notes", 2),
            "contacts": (f"{self.cr}.public.contacts", 1),
            "products": (f"{self.my}.inventory.products", 2),
            "items": (f"{self.mg}.catalog.items", 2),
            "gadgets": (f"{self.fl}.public.gadgets", 1),
        }
        self.extra_topics = {
            f"{self.pg}.transaction": 1,
            f"__debezium-heartbeat.{self.pg}": 1,
            f"{self.pg}.message": 1,
            self.my: 1,  # MySQL schema-change topic (named exactly like the prefix)
        }
        self.out: list[Rec] = []
        self.bad: list[tuple[int, str]] = []  # (index in out, expected reason)
        #: source state: raw python values per table (notes/products/contacts/gadgets) and
        #: canonical rows (the model) per table
        self.raw: dict[str, dict[Any, dict[str, Any]]] = {t: {} for t in COLS}
        self.model: dict[str, dict[Any, dict[str, Any]]] = {t: {} for t in COLS}
        self.lsn = 10_000
        self.txid = 700
        self.binlog_pos = 4
        self.mongo_ord = 0
        self.next_id = {"notes": 1, "products": 1, "contacts": 1, "gadgets": 1}
        self.counts: dict[str, int] = {}

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    def owner(self) -> str | None:
        return self.rnd.choice([*USERS, *USERS, None])

    def emit(self, topic: str, part: int | None, key: Any, value: Any, headers=None) -> None:
        k = None if key is None else (key if isinstance(key, bytes) else jd(key).encode())
        v = None if value is None else (value if isinstance(value, bytes) else jd(value).encode())
        self.out.append((topic, part, k, v, headers))

    def bad_record(self, topic: str, part: int, key: Any, value: Any, reason: str) -> None:
        self.bad.append((len(self.out), reason))
        self.emit(topic, part, key, value)
        self.count("bad:" + reason)

    # ---------------------------------------------------------------- notes (PostgreSQL)

    def pg_source(self, table: str, snapshot: str = "false") -> dict[str, Any]:
        self.lsn += self.rnd.randint(8, 90)
        return {
            "version": "3.3.2.Final",
            "connector": "postgresql",
            "name": self.pg,
            "ts_ms": 1718000000000,
            "snapshot": snapshot,
            "db": "app",
            "sequence": jd([str(self.lsn - 5), str(self.lsn)]),
            "schema": "public",
            "table": table,
            "txId": self.txid,
            "lsn": self.lsn,
        }

    def note_wire(self, r: dict[str, Any], toast: bool) -> dict[str, Any]:
        ext = r["ext"]
        if ext is not None and self.rnd.random() < 0.2:
            ext = ext.upper()
        return {
            "id": r["id"],
            "owner_id": r["owner_id"],
            "title": r["title"],
            "body": PH if toast else r["body"],
            "amount": dec_b64(r["amount"]),
            "due": r["due"],
            "ext": ext,
            "ts": r["ts"],
            "flag": r["flag"],
        }

    @staticmethod
    def note_canon(r: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": r["id"],
            "owner_id": r["owner_id"],
            "title": r["title"],
            "body": r["body"],
            "amount": dec_text(r["amount"], 2),
            "due": None if r["due"] is None else date_text(r["due"]),
            "ext": r["ext"],
            "ts": micro_ts_text(r["ts"]),
            "flag": 1 if r["flag"] else 0,
        }

    def note_fallback(self, nid: int) -> dict[str, Any]:
        """before of a delete under REPLICA IDENTITY DEFAULT: key + fallback values."""
        return {
            "id": nid,
            "owner_id": None,
            "title": "",
            "body": None,
            "amount": dec_b64(0),
            "due": None,
            "ext": None,
            "ts": 0,
            "flag": False,
        }

    def notes_record(
        self, op: str, nid: int, before, after, txb, headers=None, snapshot: str = "false"
    ) -> None:
        topic, parts = self.topics["notes"]
        name = f"{self.pg}.public.notes"
        value = {
            "schema": envelope_schema(name, NOTES_FIELDS, "postgresql"),
            "payload": {
                "before": before,
                "after": after,
                "source": self.pg_source("notes", snapshot),
                "transaction": txb,
                "op": op,
                "ts_ms": 1718000000001,
            },
        }
        key = {"schema": key_schema(name, "int64"), "payload": {"id": nid}}
        self.emit(topic, nid % parts, key, value, headers)

    def notes_tomb(self, nid: int, headers=None) -> None:
        topic, parts = self.topics["notes"]
        key = {"schema": key_schema(f"{self.pg}.public.notes", "int64"), "payload": {"id": nid}}
        self.emit(topic, nid % parts, key, None, headers)

    def new_note(self, nid: int) -> dict[str, Any]:
        rnd = self.rnd
        big = rnd.random() < 0.5
        return {
            "id": nid,
            "owner_id": self.owner(),
            "title": rnd.choice(["plan", "ünï ☃", 'q"uote', f"t{rnd.randint(0, 999)}"]),
            "body": (f"B{rnd.randint(0, 9999)}-" * rnd.randint(450, 700))
            if big
            else f"small {rnd.randint(0, 99)}",
            "amount": rnd.randint(-50_000, 5_000_000),
            "due": rnd.choice([None, rnd.randint(-400, 25_000)]),
            "ext": rnd.choice([None, str(uuid.UUID(int=rnd.getrandbits(128), version=4))]),
            "ts": rnd.randint(0, 2_000_000_000) * 1_000_000 + rnd.randint(0, 999_999),
            "flag": rnd.random() < 0.5,
        }

    def notes_tx(self, snapshot: bool = False) -> None:
        """One source transaction on notes: 1-3 changes (insert/update/TOAST/delete/PK)."""
        rnd = self.rnd
        self.txid += 1
        tx = self.tx and not snapshot
        begin_lsn = self.lsn
        data: list[str] = []  # table per counted data event
        if tx:
            self.emit(
                f"{self.pg}.transaction",
                0,
                {"id": f"{self.txid}:{begin_lsn}"},
                {
                    "status": "BEGIN",
                    "id": f"{self.txid}:{begin_lsn}",
                    "event_count": None,
                    "data_collections": None,
                    "ts_ms": 1,
                },
            )

        def txb() -> dict | None:
            if not tx:
                return None
            data.append("notes")
            return {
                "id": f"{self.txid}:{self.lsn + 3}",
                "total_order": len(data),
                "data_collection_order": len(data),
            }

        touched: set[int] = set()
        for _ in range(1 if snapshot else rnd.randint(1, 3)):
            live = [i for i in self.raw["notes"] if i not in touched]
            kind = rnd.random()
            if snapshot or not live or kind < 0.3:
                nid = self.next_id["notes"]
                self.next_id["notes"] += 1
                r = self.new_note(nid)
                self.notes_record(
                    "r" if snapshot else "c",
                    nid,
                    None,
                    self.note_wire(r, False),
                    txb(),
                    snapshot="true" if snapshot else "false",
                )
                self.count("notes:" + ("r" if snapshot else "c"))
            elif kind < 0.75:
                nid = rnd.choice(live)
                r = dict(self.raw["notes"][nid])
                big = len(r["body"] or "") > 2000
                toast = big and rnd.random() < 0.6
                if not toast and rnd.random() < 0.5:
                    r["body"] = rnd.choice(
                        [f"edited {rnd.randint(0, 99)}", "E" * rnd.randint(2100, 3000), None]
                    )
                r["owner_id"] = self.owner() if rnd.random() < 0.3 else r["owner_id"]
                r["title"] = f"t{rnd.randint(0, 999)}"
                r["amount"] = rnd.randint(-50_000, 5_000_000)
                r["flag"] = not r["flag"]
                r["ts"] += 1
                before = (
                    None if rnd.random() < 0.7 else self.note_wire(self.raw["notes"][nid], False)
                )
                self.notes_record("u", nid, before, self.note_wire(r, toast), txb())
                self.count("notes:u-toast" if toast else "notes:u")
            elif kind < 0.88:
                nid = rnd.choice(live)
                self.notes_record("d", nid, self.note_fallback(nid), None, txb())
                if rnd.random() < 0.8:
                    self.notes_tomb(nid)
                del self.raw["notes"][nid]
                self.count("notes:d")
                touched.add(nid)
                continue
            else:  # primary-key change: d(old) + tombstone(old) + c(new)
                old = rnd.choice(live)
                nid = self.next_id["notes"]
                self.next_id["notes"] += 1
                r = dict(self.raw["notes"].pop(old))
                r["id"] = nid
                big = len(r["body"] or "") > 2000
                toast = self.pk_toast and big and rnd.random() < 0.6
                nk = jd({"id": nid}).encode()
                ok = jd({"id": old}).encode()
                self.notes_record(
                    "d",
                    old,
                    self.note_fallback(old),
                    None,
                    txb(),
                    headers=[("__debezium.newkey", nk)],
                )
                self.notes_tomb(old, headers=[("__debezium.newkey", nk)])
                self.notes_record(
                    "c",
                    nid,
                    None,
                    self.note_wire(r, toast),
                    txb(),
                    headers=[("__debezium.oldkey", ok)],
                )
                self.count("notes:pk-toast" if toast else "notes:pk")
                touched.update((old, nid))
                self.raw["notes"][nid] = r
                continue
            self.raw["notes"][nid] = r
            touched.add(nid)
        if tx:
            self.lsn += 5
            self.emit(
                f"{self.pg}.transaction",
                0,
                {"id": f"{self.txid}:{self.lsn}"},
                {
                    "status": "END",
                    "id": f"{self.txid}:{self.lsn}",
                    "event_count": len(data),
                    "data_collections": [
                        {"data_collection": "public.notes", "event_count": len(data)}
                    ]
                    if data
                    else [],
                    "ts_ms": 1,
                },
            )

    # ---------------------------------------------------------------- contacts (schemaless PG)

    def contact_row(self, cid: int) -> dict[str, Any]:
        rnd = self.rnd
        return {
            "id": cid,
            "owner_id": self.owner(),
            "name": rnd.choice(["Kwame Mensah", "Inès Ortega", "李雷", f"n{rnd.randint(0, 99)}"]),
            "credit": rnd.randint(-999, 9_999_999),  # unscaled, scale 2
            "active": rnd.random() < 0.5,
            "birthday": rnd.choice([None, rnd.randint(-3000, 20000)]),
            "tags": rnd.choice([[], ["vip"], ["a", "ü"], [1, 2, 3]]),
            "meta": rnd.choice([None, {"z": 1, "a": "é", "vip": True}, {"n": [1, {"x": None}]}]),
            "ratio": rnd.choice([None, rnd.randint(0, 4000) / 8]),
        }

    def contact_wire(self, r: dict[str, Any]) -> dict[str, Any]:
        """Schemaless: with hints numeric(12,2) as Debezium's precise base64, else as
        decimal.handling.mode=string text; a date is the bare day number either way."""
        w = dict(r)
        w["credit"] = dec_b64(r["credit"]) if self.hints else dec_text(r["credit"], 2)
        return w

    def contact_canon(self, r: dict[str, Any]) -> dict[str, Any]:
        c = dict(r)
        c["credit"] = dec_text(r["credit"], 2)
        if self.hints and r["birthday"] is not None:
            c["birthday"] = date_text(r["birthday"])
        c["active"] = 1 if r["active"] else 0
        c["tags"] = compact(r["tags"])
        c["meta"] = None if r["meta"] is None else compact(r["meta"])
        return c

    def contacts_step(self, snapshot: bool = False) -> None:
        rnd = self.rnd
        topic, _ = self.topics["contacts"]
        live = list(self.raw["contacts"])
        x = rnd.random()
        if not snapshot and x < 0.01 and live:
            self.txid += 1
            src = self.pg_source("contacts")
            src["name"] = self.cr
            self.emit(
                topic,
                0,
                None,
                {"before": None, "after": None, "op": "t", "ts_ms": 2, "source": src},
            )
            self.raw["contacts"].clear()
            self.count("contacts:t")
            return
        if not snapshot and x < 0.02:
            self.emit(topic, 0, None, None)  # null key and null value: ignored
            self.count("contacts:empty")
            return
        src = self.pg_source("contacts", "true" if snapshot else "false")
        src["name"] = self.cr
        if snapshot or not live or x < 0.35:
            cid = self.next_id["contacts"]
            self.next_id["contacts"] += 1
            r = self.contact_row(cid)
            op, before, after = ("r" if snapshot else "c"), None, self.contact_wire(r)
        elif x < 0.8:
            cid = rnd.choice(live)
            r = self.contact_row(cid)
            if rnd.random() < 0.5:
                r["owner_id"] = self.raw["contacts"][cid]["owner_id"]
            op, before, after = "u", None, self.contact_wire(r)
        else:
            cid = rnd.choice(live)
            fb = {
                "id": cid,
                "owner_id": None,
                "name": "",
                "credit": dec_b64(0) if self.hints else "0",
                "active": False,
                "birthday": None,
                "tags": [],
                "meta": None,
                "ratio": None,
            }
            self.emit(
                topic,
                0,
                {"id": cid},
                {"before": fb, "after": None, "op": "d", "ts_ms": 2, "source": src},
            )
            if rnd.random() < 0.7:
                self.emit(topic, 0, {"id": cid}, None)
            del self.raw["contacts"][cid]
            self.count("contacts:d")
            return
        self.emit(
            topic,
            0,
            {"id": cid},
            {"before": before, "after": after, "op": op, "ts_ms": 2, "source": src},
        )
        self.raw["contacts"][cid] = r
        self.count("contacts:" + op)

    # ---------------------------------------------------------------- products (MySQL)

    def my_source(self, snapshot: str = "false") -> dict[str, Any]:
        self.binlog_pos += self.rnd.randint(100, 900)
        return {
            "version": "3.3.2.Final",
            "connector": "mysql",
            "name": self.my,
            "ts_ms": 1718000000000,
            "snapshot": snapshot,
            "db": "inventory",
            "table": "products",
            "server_id": 223344,
            "gtid": None,
            "file": "mysql-bin.000003",
            "pos": self.binlog_pos,
            "row": 0,
        }

    def product_row(self, pid: int) -> dict[str, Any]:
        rnd = self.rnd
        return {
            "id": pid,
            "owner_id": self.owner(),
            "name": rnd.choice(["Trail Runner", "Mug «Blk»", f"p{rnd.randint(0, 999)}"]),
            "price": rnd.randint(0, 999_999),
            "in_stock": rnd.randint(0, 1),
            "released": rnd.choice([None, rnd.randint(0, 2_000_000_000_000)]),
            "updated_at": rnd.choice(
                [
                    None,
                    rnd.randint(0, 2_000_000_000) * 1_000_000 + rnd.choice([0, 250_000, 123_456]),
                ]
            ),
            "tz": rnd.choice([0, 120, -330, 60]),
        }

    @staticmethod
    def product_wire(r: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": r["id"],
            "owner_id": r["owner_id"],
            "name": r["name"],
            "price": dec_b64(r["price"]),
            "in_stock": r["in_stock"],
            "released": r["released"],
            "updated_at": None if r["updated_at"] is None else zoned(r["updated_at"], r["tz"])[0],
        }

    @staticmethod
    def product_canon(r: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": r["id"],
            "owner_id": r["owner_id"],
            "name": r["name"],
            "price": dec_text(r["price"], 2),
            "in_stock": r["in_stock"],
            "released": None if r["released"] is None else milli_ts_text(r["released"]),
            "updated_at": None if r["updated_at"] is None else zoned(r["updated_at"], 0)[1],
        }

    def products_record(self, op, pid, before, after, headers=None, snapshot="false", src=None):
        topic, parts = self.topics["products"]
        name = f"{self.my}.inventory.products"
        value = None
        if op is not None:
            value = {
                "schema": envelope_schema(name, PRODUCTS_FIELDS, "mysql"),
                "payload": {
                    "before": before,
                    "after": after,
                    "source": src or self.my_source(snapshot),
                    "transaction": None,
                    "op": op,
                    "ts_ms": 1718000000001,
                },
            }
        key = {"schema": key_schema(name, "int32"), "payload": {"id": pid}}
        self.emit(topic, pid % parts, key, value, headers)

    def products_step(self, snapshot: bool = False) -> None:
        rnd = self.rnd
        live = list(self.raw["products"])
        x = rnd.random()
        if not snapshot and x < 0.03:
            self.emit(
                self.my,
                0,
                {"databaseName": "inventory"},
                {
                    "source": self.my_source(),
                    "databaseName": "inventory",
                    "schemaName": None,
                    "ddl": "ALTER TABLE products ADD COLUMN note varchar(20)",
                    "tableChanges": [],
                },
            )
            self.count("products:ddl")
            return
        if snapshot or not live or x < 0.35:
            pid = self.next_id["products"]
            self.next_id["products"] += 1
            r = self.product_row(pid)
            op = "r" if snapshot else "c"
            self.products_record(
                op, pid, None, self.product_wire(r), snapshot="true" if snapshot else "false"
            )
            self.raw["products"][pid] = r
            self.count("products:" + op)
        elif x < 0.75:
            pid = rnd.choice(live)
            old = self.raw["products"][pid]
            r = self.product_row(pid)
            if rnd.random() < 0.5:
                r["owner_id"] = old["owner_id"]
            self.products_record("u", pid, self.product_wire(old), self.product_wire(r))
            self.raw["products"][pid] = r
            self.count("products:u")
        elif x < 0.9:
            pid = rnd.choice(live)
            self.products_record("d", pid, self.product_wire(self.raw["products"][pid]), None)
            self.products_record(None, pid, None, None)  # tombstone
            del self.raw["products"][pid]
            self.count("products:d")
        else:  # primary-key change: all three records share one binlog position
            old = rnd.choice(live)
            pid = self.next_id["products"]
            self.next_id["products"] += 1
            r = dict(self.raw["products"].pop(old))
            before = self.product_wire(r)
            r["id"] = pid
            r["name"] = r["name"] + "*"
            src = self.my_source()
            nk = jd({"id": pid}).encode()
            okey = jd({"id": old}).encode()
            self.products_record(
                "d", old, before, None, headers=[("__debezium.newkey", nk)], src=src
            )
            self.products_record(None, old, None, None, headers=[("__debezium.newkey", nk)])
            self.products_record(
                "c", pid, None, self.product_wire(r), headers=[("__debezium.oldkey", okey)], src=src
            )
            self.raw["products"][pid] = r
            self.count("products:pk")

    # ---------------------------------------------------------------- items (MongoDB)

    def mg_source(self) -> dict[str, Any]:
        self.mongo_ord += 1
        return {
            "version": "3.3.2.Final",
            "connector": "mongodb",
            "name": self.mg,
            "ts_ms": 1718000000000 + self.mongo_ord // 7 * 1000,
            "snapshot": "false",
            "db": "catalog",
            "collection": "items",
            "ord": self.mongo_ord % 7,
        }

    def mongo_key(self, _id: str | int) -> tuple[dict[str, str], int]:
        """The key's ``id``: the ``_id`` as Extended JSON (an ObjectId, a string, an int)."""
        if isinstance(_id, int):
            ext = str(_id)
        else:
            ext = compact({"$oid": _id}) if len(_id) == 24 else compact(_id)
        return {"id": ext}, sum(str(_id).encode()) % self.topics["items"][1]

    def item_doc(self, _id: str | int) -> tuple[dict[str, Any], dict[str, Any]]:
        """(Extended JSON v1 document, canonical row) of a fresh document."""
        rnd = self.rnd
        doc: dict[str, Any] = {
            "_id": {"$oid": _id} if isinstance(_id, str) and len(_id) == 24 else _id
        }
        row: dict[str, Any] = {"id": _id}
        own = self.owner()
        if own is not None:
            doc["owner_id"] = own
            row["owner_id"] = own
        doc["sku"] = row["sku"] = rnd.choice(["TEE-RED-M", "MUG-BLK", "T-shirt « Classic »"])
        q = rnd.randint(0, 10_000)
        doc["qty"] = {"$numberLong": str(q)} if rnd.random() < 0.5 else q
        row["qty"] = q
        p = f"{rnd.randint(0, 999)}.{rnd.randint(0, 99):02d}"
        doc["price"] = {"$numberDecimal": p}
        row["price"] = p
        ms = rnd.randint(1_500_000_000_000, 1_800_000_000_000)
        doc["updated"] = {"$date": ms}
        row["updated"] = mongo_date_text(ms)
        if rnd.random() < 0.7:
            dims = {"w": rnd.randint(1, 99), "h": rnd.randint(1, 99)}
            doc["dims"] = dims
            row["dims"] = compact(dims)
        if rnd.random() < 0.5:
            doc["promo"] = rnd.random() < 0.5
            row["promo"] = 1 if doc["promo"] else 0
        return doc, row

    def items_record(self, _id: str | int, value: Any) -> None:
        key, part = self.mongo_key(_id)
        self.emit(self.topics["items"][0], part, key, value)

    def items_step(self) -> None:
        rnd = self.rnd
        live = list(self.model["items"])
        x = rnd.random()
        if not live or x < 0.3:
            _id = (
                f"{rnd.getrandbits(96):024x}"
                if rnd.random() < 0.6
                else rnd.choice([f"s{rnd.randint(0, 10**6)}", rnd.randint(-5, 10**6)])
            )
            if _id in self.model["items"]:
                return
            doc, row = self.item_doc(_id)
            self.items_record(
                _id,
                {
                    "before": None,
                    "after": compact(doc),
                    "updateDescription": None,
                    "source": self.mg_source(),
                    "op": "c",
                    "ts_ms": 1,
                },
            )
            self.model["items"][_id] = row
            self.count("items:c")
        elif x < 0.5:  # update, change_streams_update_full: after is the whole document
            _id = rnd.choice(live)
            doc, row = self.item_doc(_id)
            ud = {
                "removedFields": None,
                "updatedFields": compact({"qty": row["qty"]}),
                "truncatedArrays": None,
            }
            self.items_record(
                _id,
                {
                    "before": None,
                    "after": compact(doc),
                    "updateDescription": ud,
                    "source": self.mg_source(),
                    "op": "u",
                    "ts_ms": 1,
                },
            )
            self.model["items"][_id] = row
            self.count("items:u-full")
        elif x < 0.85:  # update without post-image: updateDescription only (relaxed v2)
            _id = rnd.choice(live)
            row = dict(self.model["items"][_id])
            upd: dict[str, Any] = {}
            removed: list[str] = []
            if rnd.random() < 0.6:
                q = rnd.randint(0, 10_000)
                upd["qty"] = q
                row["qty"] = q
            if rnd.random() < 0.4:
                p = f"{rnd.randint(0, 999)}.{rnd.randint(0, 99):02d}"
                upd["price"] = {"$numberDecimal": p}
                row["price"] = p
            if rnd.random() < 0.3:
                ms = rnd.randint(1_500_000_000, 1_800_000_000) * 1000
                upd["updated"] = {
                    "$date": dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime(
                        "%Y-%m-%dT%H:%M:%SZ"
                    )
                }
                row["updated"] = mongo_date_text(ms)
            if rnd.random() < 0.25:
                own = self.owner()
                if own is None:
                    removed.append("owner_id")
                    row.pop("owner_id", None)
                else:
                    upd["owner_id"] = own
                    row["owner_id"] = own
            if rnd.random() < 0.3 and row.get("dims"):
                w = rnd.randint(100, 199)
                upd["dims.w"] = w
                d = json.loads(row["dims"])
                d["w"] = w
                row["dims"] = compact(d)
            if rnd.random() < 0.2 and "promo" in row:
                removed.append("promo")
                row.pop("promo")
            if not upd and not removed:
                upd["sku"] = row["sku"] = "MUG-WHT"
            ud = {"removedFields": removed, "updatedFields": compact(upd), "truncatedArrays": []}
            self.items_record(
                _id,
                {
                    "before": None,
                    "after": None,
                    "updateDescription": ud,
                    "source": self.mg_source(),
                    "op": "u",
                    "ts_ms": 1,
                },
            )
            self.model["items"][_id] = row
            self.count("items:u-partial")
        else:
            _id = rnd.choice(live)
            self.items_record(
                _id,
                {
                    "before": None,
                    "after": None,
                    "updateDescription": None,
                    "source": self.mg_source(),
                    "op": "d",
                    "ts_ms": 1,
                },
            )
            if rnd.random() < 0.8:
                self.items_record(_id, None)
            del self.model["items"][_id]
            self.count("items:d")

    # ---------------------------------------------------------------- gadgets (flattened)

    def gadgets_step(self) -> None:
        rnd = self.rnd
        topic, _ = self.topics["gadgets"]
        live = list(self.raw["gadgets"])
        x = rnd.random()
        if not live or x < 0.65:
            if live and rnd.random() < 0.5:
                gid = rnd.choice(live)
                op = "u"
            else:
                gid = self.next_id["gadgets"]
                self.next_id["gadgets"] += 1
                op = "c"
            r = {
                "id": gid,
                "owner_id": self.owner(),
                "label": rnd.choice(["Desk lamp", "Bookshelf", "Ünï"]),
                "featured": rnd.choice([0, 1, None]),
                "price": f"{rnd.randint(0, 999)}.{rnd.randint(0, 9)}0",
            }
            v = dict(r)
            if rnd.random() < 0.7:  # add.fields=op,table,lsn,source.ts_ms + rewrite mode
                v.update(
                    {
                        "__deleted": "false",
                        "__op": op,
                        "__table": "gadgets",
                        "__lsn": self.lsn,
                        "__source_ts_ms": 1718000000000,
                    }
                )
            self.emit(topic, 0, {"id": gid}, v)
            self.raw["gadgets"][gid] = r
            self.count("gadgets:" + op)
        else:
            gid = rnd.choice(live)
            mode = rnd.choice(["rewrite", "op", "json-null", "tombstone"])
            if mode == "rewrite":
                v = dict(self.raw["gadgets"][gid], __deleted="true", __op="d", __table="gadgets")
                self.emit(topic, 0, {"id": gid}, v)
            elif mode == "op":
                self.emit(
                    topic,
                    0,
                    {"id": gid},
                    {
                        "id": gid,
                        "owner_id": None,
                        "label": "",
                        "featured": None,
                        "price": None,
                        "__op": "d",
                    },
                )
            elif mode == "json-null":
                self.emit(topic, 0, {"id": gid}, b"null")
            else:
                self.emit(topic, 0, {"id": gid}, None)
            del self.raw["gadgets"][gid]
            self.count("gadgets:d-" + mode)

    # ---------------------------------------------------------------- noise and bad records

    def noise_step(self) -> None:
        rnd = self.rnd
        x = rnd.random()
        if x < 0.5:
            self.emit(
                f"__debezium-heartbeat.{self.pg}",
                0,
                {"serverName": self.pg},
                {"ts_ms": 1718000000000},
            )
            self.count("heartbeat")
        elif x < 0.7:
            self.emit(
                f"{self.pg}.message",
                0,
                {"prefix": "audit"},
                {
                    "op": "m",
                    "ts_ms": 1,
                    "source": dict(self.pg_source(""), schema="", table=""),
                    "message": {"prefix": "audit", "content": "aGVsbG8="},
                },
            )
            self.count("message")
        else:
            self.bad_step()

    def bad_step(self) -> None:
        rnd = self.rnd
        nt, np_ = self.topics["notes"]
        ct = self.topics["contacts"][0]
        it = self.topics["items"][0]
        kind = rnd.choice(
            [
                "invalid_json",
                "missing_op",
                "unknown_op",
                "envelope_inconsistent",
                "not_an_envelope",
                "missing_key",
                "type_conversion_error",
                "mongo_inconsistent",
                "oversize",
            ]
        )
        src = self.pg_source("contacts")
        src["name"] = self.cr
        # keys of bad row events never name a live row (a dead-lettered event changes nothing
        # in the model); ids far above any generated id
        bid = 10_000_000 + len(self.out)
        if kind == "invalid_json":
            self.bad_record(ct, 0, {"id": bid}, b'{"before":null,"after":{"id":', kind)
        elif kind == "missing_op":
            self.bad_record(
                ct, 0, {"id": bid}, {"before": None, "after": {"id": bid}, "source": src}, kind
            )
        elif kind == "unknown_op":
            self.bad_record(
                ct,
                0,
                {"id": bid},
                {"before": None, "after": {"id": bid}, "source": src, "op": "x"},
                kind,
            )
        elif kind == "envelope_inconsistent":
            self.bad_record(
                ct, 0, {"id": bid}, {"before": None, "after": None, "source": src, "op": "c"}, kind
            )
        elif kind == "not_an_envelope":
            self.bad_record(ct, 0, {"id": bid}, [1, 2, 3], kind)
        elif kind == "oversize":
            self.bad_record(
                ct,
                0,
                {"id": bid},
                {
                    "before": None,
                    "after": {"id": bid, "name": "x" * 1_100_000},
                    "source": src,
                    "op": "c",
                },
                kind,
            )
        elif kind == "missing_key":
            r = self.new_note(bid)
            r["owner_id"] = "u1"
            name = f"{self.pg}.public.notes"
            value = {
                "schema": envelope_schema(name, NOTES_FIELDS, "postgresql"),
                "payload": {
                    "before": None,
                    "after": self.note_wire(r, False),
                    "source": self.pg_source("notes"),
                    "op": "c",
                    "ts_ms": 1,
                },
            }
            self.bad_record(nt, bid % np_, None, value, kind)
        elif kind == "type_conversion_error":
            r = self.new_note(bid)
            r["owner_id"] = "u1"
            w = self.note_wire(r, False)
            w["amount"] = "!!not base64!!"
            name = f"{self.pg}.public.notes"
            value = {
                "schema": envelope_schema(name, NOTES_FIELDS, "postgresql"),
                "payload": {
                    "before": None,
                    "after": w,
                    "source": self.pg_source("notes"),
                    "op": "c",
                    "ts_ms": 1,
                },
            }
            key = {"schema": key_schema(name, "int64"), "payload": {"id": bid}}
            self.bad_record(nt, bid % np_, key, value, kind)
        else:
            _id = f"{bid + (1 << 90):024x}"
            key, part = self.mongo_key(_id)
            self.bad_record(
                it,
                part,
                key,
                {
                    "before": None,
                    "after": None,
                    "updateDescription": None,
                    "source": self.mg_source(),
                    "op": "u",
                    "ts_ms": 1,
                },
                "envelope_inconsistent",
            )

    # ---------------------------------------------------------------- driver

    def snapshot(self, n: int) -> None:
        for _ in range(n):
            self.notes_tx(snapshot=True)
            self.contacts_step(snapshot=True)
            self.products_step(snapshot=True)

    def replay(self) -> None:
        """A restart of the PostgreSQL connector (``<tag>pg``): Debezium resumes from its
        last flushed offset and sends everything after it again, with new Kafka offsets
        (cdc-events.md §6): the last 5-60 records of its data and transaction topics, in
        order. The hand-made bad records among them are left out (their dead letters are
        checked one per record). The model does not change: a replayed suffix ends in the
        same state."""
        bad = {j for j, _ in self.bad}
        mine = [
            j
            for j, r in enumerate(self.out)
            if r[0].startswith(self.pg + ".") and r[0] != f"{self.pg}.message" and j not in bad
        ]
        n = self.rnd.randint(5, 60)
        for j in mine[-n:]:
            self.out.append(self.out[j])
        self.count("replays")
        self.count("replayed", min(n, len(mine)))

    def build(self, steps: int, replays: float = 0.0) -> None:
        rnd = self.rnd
        for _ in range(steps):
            x = rnd.random()
            if replays and rnd.random() < replays:
                self.replay()
            if x < 0.3:
                self.notes_tx()
            elif x < 0.45:
                self.contacts_step()
            elif x < 0.6:
                self.products_step()
            elif x < 0.8:
                self.items_step()
            elif x < 0.93:
                self.gadgets_step()
            else:
                self.noise_step()

    def final_model(self) -> dict[str, dict[Any, dict[str, Any]]]:
        m: dict[str, dict[Any, dict[str, Any]]] = {}
        m["notes"] = {k: self.note_canon(r) for k, r in self.raw["notes"].items()}
        m["contacts"] = {k: self.contact_canon(r) for k, r in self.raw["contacts"].items()}
        m["products"] = {k: self.product_canon(r) for k, r in self.raw["products"].items()}
        m["items"] = {k: dict(r) for k, r in self.model["items"].items()}
        m["gadgets"] = {k: dict(r) for k, r in self.raw["gadgets"].items()}
        return m


def expected_for(user: str, model: dict[str, dict[Any, dict[str, Any]]]) -> dict:
    """The rules by hand: (bucket, object_type, object_id) -> data without NULL columns."""
    exp: dict[tuple[str, str, str], dict[str, Any]] = {}
    ub = f"by_user[{jd(user)}]"
    for table, rows in model.items():
        for rid, row in rows.items():
            if row.get("owner_id") == user:
                data = {c: row.get(c) for c in COLS[table]}
                exp[(ub, table, str(rid))] = {k: v for k, v in data.items() if v is not None}
            if table == "gadgets" and row.get("featured") == 1:
                exp[("featured[]", "gadgets", str(rid))] = {"id": row["id"], "label": row["label"]}
    return exp


def normal(vis: dict) -> dict:
    return {k: {c: v for c, v in d.items() if v is not None} for k, d in vis.items()}


def _short(v: Any) -> Any:
    return v[:40] + f"...({len(v)})" if isinstance(v, str) and len(v) > 60 else v


def diff(vis: dict, exp: dict) -> dict[str, Any]:
    missing = [k for k in exp if k not in vis]
    extra = [k for k in vis if k not in exp]
    wrong = [k for k in exp if k in vis and vis[k] != exp[k]]
    out: dict[str, Any] = {"n": [len(vis), len(exp)]}
    if missing:
        out["missing"] = [list(k) for k in missing[:5]] + (
            [f"+{len(missing) - 5}"] if len(missing) > 5 else []
        )
    if extra:
        out["extra"] = [list(k) for k in extra[:5]] + (
            [f"+{len(extra) - 5}"] if len(extra) > 5 else []
        )
    if wrong:
        out["wrong"] = [
            [
                list(k),
                {
                    c: (_short(vis[k].get(c)), _short(exp[k].get(c)))
                    for c in set(vis[k]) | set(exp[k])
                    if vis[k].get(c) != exp[k].get(c)
                },
            ]
            for k in wrong[:4]
        ]
        out["n_wrong"] = len(wrong)
    return out


def read_dead_letters(topic: str) -> list[tuple[str, int, int, str]]:
    c = Consumer(
        {
            "bootstrap.servers": BOOT,
            "group.id": "qa-dlq-" + uuid.uuid4().hex,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        md = c.list_topics(topic, timeout=10)
        if topic not in md.topics or md.topics[topic].error is not None:
            return []
        parts = list(md.topics[topic].partitions)
        ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        out = []
        done = {p for p, e in ends.items() if e == 0}
        deadline = time.monotonic() + 30
        while len(done) < len(parts) and time.monotonic() < deadline:
            m = c.poll(1.0)
            if m is None or m.error():
                continue
            h = {k: (v or b"").decode("utf-8", "replace") for k, v in (m.headers() or [])}
            out.append(
                (
                    h.get("bucketsync.source.topic", "?"),
                    int(h.get("bucketsync.source.partition", -1)),
                    int(h.get("bucketsync.source.offset", -1)),
                    h.get("bucketsync.reason", "?"),
                )
            )
            if m.offset() + 1 >= ends[m.partition()]:
                done.add(m.partition())
        return out
    finally:
        c.close()


def produce(
    records: list[Rec], where: dict[int, tuple[str, int, int]] | None, pace: float = 0
) -> None:
    """Produce in order; ``pace`` > 0: about that many records per second."""
    p = Producer(
        {
            "bootstrap.servers": BOOT,
            "linger.ms": 5 if pace else 20,
            "enable.idempotence": True,
            "message.max.bytes": 4_000_000,
        }
    )
    for j, (topic, part, k, v, h) in enumerate(records):
        cb = None
        if where is not None:

            def cb(err: Any, msg: Any, j: int = j) -> None:
                if err is None:
                    where[j] = (msg.topic(), msg.partition(), msg.offset())

        p.produce(topic, v, k, partition=part if part is not None else 0, headers=h, on_delivery=cb)
        if j % 20 == 0:
            p.poll(0)
            if pace:
                time.sleep(20 / pace)
    left = p.flush(120)
    if left:
        raise RuntimeError(f"{left} records not delivered")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--driver", default="kafka", choices=["kafka", "faust"])
    ap.add_argument("--procs", type=int, default=1, help="processors (1-3)")
    ap.add_argument("--kills", type=int, default=3, help="SIGKILLs of a random processor")
    ap.add_argument(
        "--tx",
        action="store_true",
        help="transaction metadata on notes (BEGIN/END) and kafka.consistency: transaction",
    )
    ap.add_argument(
        "--source-rows", default="all", choices=["all", "auto"], help="processor.source_rows"
    )
    ap.add_argument(
        "--dynamic", action="store_true", help='processor.instance_id: "" (kills rebalance)'
    )
    ap.add_argument("--snapshot", type=int, default=30, help="snapshot reads per snapshotted table")
    ap.add_argument("--steps", type=int, default=4000, help="backlog steps (source transactions)")
    ap.add_argument("--live", type=int, default=4000, help="steps produced while processors run")
    ap.add_argument("--pace", type=float, default=800, help="live records per second")
    ap.add_argument(
        "--kill-gap", type=float, default=4.0, help="seconds between kills: uniform(0.3, this)"
    )
    ap.add_argument(
        "--replays",
        type=float,
        default=0.0,
        help="chance per step of a PostgreSQL connector restart (resends its last records)",
    )
    ap.add_argument(
        "--no-hints",
        action="store_true",
        help="no kafka.type_hints / kafka.connector_kinds (schemaless values stay JSON-native)",
    )
    ap.add_argument(
        "--pk-toast",
        action="store_true",
        help="let a primary-key change carry the TOAST placeholder (docs: known gap)",
    )
    ap.add_argument("--compact-interval", type=float, default=2.0, help="compaction.interval_s")
    a = ap.parse_args()
    rnd = random.Random(a.seed)
    tag = f"qf{a.seed}{a.driver[0]}{'t' if a.tx else 'e'}{uuid.uuid4().hex[:5]}"
    work = Path(os.environ.get("QA_RUNS", "/tmp/qa-runs")) / tag
    work.mkdir(parents=True)
    gen = Gen(tag, rnd, a.tx, a.pk_toast, not a.no_hints)
    gen.snapshot(a.snapshot)
    gen.build(a.steps, a.replays)
    backlog, bad_backlog = list(gen.out), list(gen.bad)
    gen.out.clear()
    gen.bad.clear()
    gen.build(a.live, a.replays)
    live_msgs, bad_live = list(gen.out), list(gen.bad)
    model = gen.final_model()

    admin = AdminClient({"bootstrap.servers": BOOT})
    big = {"max.message.bytes": "4000000"}
    new = [NewTopic(t, n, 1, config=big) for t, n in gen.topics.values()]
    new += [NewTopic(t, n, 1) for t, n in gen.extra_topics.items()]
    for f in admin.create_topics(new).values():
        f.result()
    where_b: dict[int, tuple[str, int, int]] = {}
    produce(backlog, where_b)
    (work / "rules.yaml").write_text(RULES)
    port = qs.free_port()
    dynamic = {"instance_id": "", "session_timeout_ms": 6000} if a.dynamic else {}
    topics = [t for t, _ in gen.topics.values()] + list(gen.extra_topics)
    if not a.tx:
        topics.remove(f"{gen.pg}.transaction")
    cfg = {
        "kafka": {
            "bootstrap_servers": BOOT,
            "topics": topics,
            "group_id": f"g-{tag}",
            "dead_letter_topic": f"{tag}.dlq",
            "consistency": "transaction" if a.tx else "event",
        },
        "redis": {"url": "redis://127.0.0.1:6379/0", "prefix": tag},
        "sync_rules": "rules.yaml",
        "auth": {"hs256_secret": "qa-secret-" + tag},
        "gateway": {"port": port},
        "processor": {
            "driver": a.driver,
            "metrics_port": 0,
            "source_rows": a.source_rows,
            **dynamic,
        },
        "compaction": {"interval_s": a.compact_interval},
    }
    import yaml

    if not a.no_hints:
        cfg["kafka"]["type_hints"] = {
            f"{gen.cr}.public.contacts": {
                "birthday": "io.debezium.time.Date",
                "credit": "org.apache.kafka.connect.data.Decimal;scale=2",
            }
        }
        cfg["kafka"]["connector_kinds"] = {
            gen.pg: "postgresql",
            gen.cr: "postgresql",
            gen.my: "mysql",
            gen.mg: "mongodb",
        }
    cfgp = work / "bucketsync.yaml"
    cfgp.write_text(yaml.safe_dump(cfg))
    logs = [open(work / f"proc{i}.log", "ab") for i in range(a.procs)]  # noqa: SIM115
    procs = [
        qs.cli(cfgp, "processor", stdout=logs[i], stderr=subprocess.STDOUT) for i in range(a.procs)
    ]
    glog = open(work / "gateway.log", "ab")  # noqa: SIM115
    gw = qs.cli(cfgp, "gateway", stdout=glog, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    tokens = qs.mint_tokens(cfgp, dict.fromkeys(USERS))
    qs.wait_for_gateway(url)
    watchers = [qs.Stream(url, tokens[u], u, False) for u in USERS]
    for w in watchers:
        threading.Thread(target=w.watch, daemon=True).start()
    where_l: dict[int, tuple[str, int, int]] = {}
    feeder = threading.Thread(target=produce, args=(live_msgs, where_l, a.pace), daemon=True)
    feeder.start()
    kills = 0
    t0 = time.monotonic()
    while kills < a.kills:
        time.sleep(rnd.uniform(0.3, a.kill_gap))
        i = rnd.randrange(a.procs)
        procs[i].send_signal(signal.SIGKILL)
        procs[i].wait()
        kills += 1
        time.sleep(rnd.choice([0, 0, 0.5, 2]))
        procs[i] = qs.cli(cfgp, "processor", stdout=logs[i], stderr=subprocess.STDOUT)
    feeder.join()
    exp = {u: expected_for(u, model) for u in USERS}
    deadline = time.monotonic() + 150
    ok = False
    while time.monotonic() < deadline:
        if all(normal(w.visible) == exp[w.user] for w in watchers):
            ok = True
            break
        time.sleep(0.5)
    elapsed = time.monotonic() - t0
    live_diffs = {
        w.user: diff(normal(w.visible), exp[w.user])
        for w in watchers
        if normal(w.visible) != exp[w.user]
    }
    for w in watchers:
        w.stop = True
    fresh_diffs: dict[str, Any] = {}
    for u in USERS:
        s = qs.Stream(url, tokens[u], u, False)
        s.run_once(True)
        if normal(s.visible) != exp[u]:
            fresh_diffs[u] = diff(normal(s.visible), exp[u])
        if s.errors:
            fresh_diffs[u + ":errors"] = s.errors[:3]
    verify = qs.cli(cfgp, "verify", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    vout = verify.communicate()[0].decode()
    # dead letters: exactly the bad records (a record may be dead-lettered twice after a kill)
    want: dict[tuple[str, int, int], str] = {}
    for j, reason in bad_backlog:
        want[where_b[j]] = reason
    for j, reason in bad_live:
        want[where_l[j]] = reason
    got = read_dead_letters(f"{tag}.dlq")
    got_map: dict[tuple[str, int, int], set[str]] = {}
    for t, p, o, reason in got:
        got_map.setdefault((t, p, o), set()).add(reason)
    dl_missing = [[*k, r] for k, r in want.items() if k not in got_map][:5]
    dl_wrong = [
        [*k, r, sorted(got_map[k])] for k, r in want.items() if k in got_map and got_map[k] != {r}
    ][:5]
    dl_unexpected = [[*k, sorted(v)] for k, v in got_map.items() if k not in want][:5]
    for p in [*procs, gw]:
        p.terminate()
    for p in [*procs, gw]:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
    errs = [e for w in watchers for e in w.errors]
    res: dict[str, Any] = {
        "tag": tag,
        "seed": a.seed,
        "driver": a.driver,
        "tx": a.tx,
        "procs": a.procs,
        "source_rows": a.source_rows,
        "dynamic": a.dynamic,
        "kills": kills,
        "records": len(backlog) + len(live_msgs),
        "converged": ok,
        "elapsed_s": round(elapsed, 1),
        "rows": {t: len(r) for t, r in model.items()},
        "expected_rows": {u: len(e) for u, e in exp.items()},
        "dead_letters": [len(want), len(got)],
        "stream_errors": errs[:6],
        "n_stream_errors": len(errs),
        "verify_rc": verify.returncode,
        "completes": sum(w.completes for w in watchers),
        # transactions applied incomplete after processor.transaction_grace_s (a stall of the
        # connector's partitions; seen after a restart meets a replayed transaction fragment)
        "tx_grace_escapes": sum(
            (work / f"proc{i}.log").read_text(errors="replace").count("incomplete after")
            for i in range(a.procs)
        ),
    }
    bad = False
    for name, v in (
        ("live_diffs", live_diffs if not ok else {}),
        ("fresh_diffs", fresh_diffs),
        ("dl_missing", dl_missing),
        ("dl_wrong", dl_wrong),
        ("dl_unexpected", dl_unexpected),
    ):
        if v:
            res[name] = v
            bad = True
    if verify.returncode:
        res["verify_out"] = vout[-800:]
    (work / "counts.json").write_text(json.dumps(gen.counts, indent=1, sort_keys=True))
    if os.environ.get("QA_COUNTS"):
        res["counts"] = gen.counts
    print(json.dumps(res, default=str))
    (work / "result.json").write_text(json.dumps(res, default=str))
    if ok and not bad and not errs and verify.returncode == 0:
        qs.drop_run_keys("redis://127.0.0.1:6379/0", tag)
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
