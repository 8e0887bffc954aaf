"""Wiring between the top-level packages: the gateway loads sync rules from pipeline.rules,
not from the processor module (which registered 64 processor metrics on the gateway's
/metrics), and a missing rules file is a clear error naming the config key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline.rules import RulesError, load_sync_rules
from pipeline.store import Store


def test_gateway_does_not_import_the_processor() -> None:
    code = (
        "import sys, gateway.server, prometheus_client as p; "
        "names = [m.name for m in p.REGISTRY.collect()]; "
        "print('pipeline.processor' in sys.modules, "
        "any(n.startswith('bucketsync_processor') for n in names))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_missing_rules_file_names_the_key(tmp_path: Path) -> None:
    class S:
        sync_rules_path = tmp_path / "nope.yaml"

    with pytest.raises(RulesError, match="config key sync_rules"):
        load_sync_rules(S())


def test_rules_load_from_settings(make_settings: Any, tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text("bucket_definitions:\n  g:\n    data: [SELECT * FROM todos]\n")
    rules = load_sync_rules(make_settings(sync_rules=str(p)))
    assert [d.name for d in rules.definitions] == ["g"]


def test_every_command_opens_the_store_its_settings_describe(tmp_path: Path) -> None:
    """``compact --defragment`` used ``Store.from_url`` without ``changes_maxlen`` and so
    trimmed the change stream to the default 10,000 entries; every process now opens the
    store through ``Store.from_settings``."""
    from bucketsync.config import load_settings
    from pipeline import compaction

    cfg = tmp_path / "c.yaml"
    cfg.write_text("redis:\n  prefix: t-wiring\n  changes_maxlen: 123\n")
    settings = load_settings(cfg)
    store = compaction._store(settings)
    assert (store.prefix, store.changes_maxlen) == ("t-wiring", 123)
    assert Store.from_settings(settings, prefix="other").prefix == "other"


class _Recorded:
    """A dead-letter writer that keeps what it is given (the applier's injected sink)."""

    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.flushes = 0

    def send(self, dl: Any) -> None:
        self.sent.append(dl)

    def flush(self, timeout: float = 30.0) -> None:
        self.flushes += 1


def test_applier_uses_the_injected_dead_letter_sink_and_watermarks(
    make_settings: Any, tmp_path: Path
) -> None:
    """No Kafka producer of its own: a record the decoder refuses goes to the given sink
    (flushed before the batch's offsets are applied), and lag comes from the given
    watermark source."""
    import asyncio

    from pipeline.cdc import KafkaRecord
    from pipeline.processor import LAG, BatchApplier, Watermarks

    p = tmp_path / "r.yaml"
    p.write_text("bucket_definitions:\n  g:\n    data: [SELECT * FROM todos]\n")
    settings = make_settings(sync_rules=str(p))
    sink = _Recorded()
    seen: list[tuple[str, int]] = []

    def high(topic: str, partition: int) -> int:
        seen.append((topic, partition))
        return 10

    async def go() -> dict[str, int]:
        store = Store.from_settings(settings)
        applier = BatchApplier(
            settings,
            store,
            load_sync_rules(settings),
            dead_letters=sink,
            watermarks=Watermarks(high),
            probe=lambda _t, _p, _o: asyncio.sleep(0, result=None),
        )
        try:
            await applier.load_offsets()
            applier.resume_positions([("app.public.todos", 0)])
            await applier.handle(
                [KafkaRecord("app.public.todos", 0, 0, b'{"id": 1}', b"{not json")]
            )
            return await store.applied_offsets()
        finally:
            applier.close()
            await store.close()

    offsets = asyncio.run(go())
    assert [d.reason for d in sink.sent] == ["invalid_json"] and sink.flushes == 1
    assert offsets == {"app.public.todos/0": 0}
    assert seen == [("app.public.todos", 0)]
    assert LAG.labels("app.public.todos/0")._value.get() == 9


def test_a_batch_planned_again_sends_its_dead_letters_once(
    make_settings: Any, tmp_path: Path
) -> None:
    """Another processor applied one partition of the batch first: the store refuses the
    batch as stale and the rest is planned again, dead letters included. They went to the
    dead-letter topic again every time (the formats QA counted up to 8 copies of a record
    with 3 processors starting together)."""
    import asyncio

    from pipeline.cdc import KafkaRecord
    from pipeline.processor import BatchApplier

    p = tmp_path / "r.yaml"
    p.write_text("bucket_definitions:\n  g:\n    data: [SELECT * FROM todos]\n")
    settings = make_settings(sync_rules=str(p))
    sink, other_sink = _Recorded(), _Recorded()
    bad = KafkaRecord("app.public.todos", 0, 0, b'{"id": 1}', b"{not json")
    good = [
        KafkaRecord(
            "app.public.todos",
            1,
            o,
            b'{"id": %d}' % (10 + o),
            b'{"op":"c","after":{"id":%d},"source":{"connector":"postgresql","name":"app",'
            b'"schema":"public","table":"todos"}}' % (10 + o),
        )
        for o in range(3)
    ]

    async def go() -> dict[str, int]:
        store = Store.from_settings(settings)
        probe = lambda _t, _p, _o: asyncio.sleep(0, result=None)  # noqa: E731
        rules = load_sync_rules(settings)
        a = BatchApplier(settings, store, rules, dead_letters=sink, probe=probe)
        b = BatchApplier(settings, store, rules, dead_letters=other_sink, probe=probe)
        try:
            await a.load_offsets()  # a knows nothing applied ...
            await b.load_offsets()
            await b.handle(good)  # ... and b applies partition 1 meanwhile
            await a.handle([bad, *good])  # stale for partition 1: planned again
            return await store.applied_offsets()
        finally:
            a.close()
            b.close()
            await store.close()

    offsets = asyncio.run(go())
    assert offsets == {"app.public.todos/0": 0, "app.public.todos/1": 2}
    assert [(d.record.partition, d.record.offset) for d in sink.sent] == [(0, 0)]
