"""Schema resolvers: LocalSchemaDir and HttpSchemaRegistry against a local registry stub."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from pipeline.cdc import (
    HttpSchemaRegistry,
    InvalidSchema,
    KafkaRecord,
    LocalSchemaDir,
    RegistryUnavailable,
    SchemaResolver,
    UnknownSchemaId,
    decode_record,
)
from tests.helpers.fixtures import load_fixture

FIXTURES = Path(__file__).parent / "fixtures" / "cdc"
SCHEMA_DIR = FIXTURES / "avro-schemas"
EXPECTED: dict[str, Any] = json.loads((FIXTURES / "expected.json").read_text(encoding="utf-8"))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the timeout test's client hangs up before the answer: expected


class Stub:
    """Registry stub per the fixtures README, plus failure modes on special ids."""

    def __init__(self) -> None:
        self.hits: Counter[int] = Counter()
        self.auth: list[str | None] = []
        self.server = _Server(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _send(self, status: int, doc: Any, ctype: str = "application/json") -> None:
                body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                prefix = "/schemas/ids/"
                if not self.path.startswith(prefix):
                    self._send(404, b"<html>no such page</html>", "text/html")
                    return
                sid = int(self.path[len(prefix) :])
                stub.hits[sid] += 1
                stub.auth.append(self.headers.get("Authorization"))
                if sid == 500:
                    self._send(500, {"error_code": 50001, "message": "store error"})
                elif sid == 777:
                    time.sleep(1.0)
                    self._send(200, {"schema": '"string"'})
                elif sid == 404:
                    self._send(404, b"<html>not found</html>", "text/html")
                elif sid == 88:
                    self._send(
                        200,
                        {
                            "schema": '{"type": "record", "name": "X", "fields": [{"name": "a", "type": "nope"}]}'
                        },
                    )
                elif sid == 89:
                    self._send(200, {"schema": "syntax = 'proto3';", "schemaType": "PROTOBUF"})
                elif (SCHEMA_DIR / f"{sid}.avsc").is_file():
                    self._send(200, {"schema": (SCHEMA_DIR / f"{sid}.avsc").read_text()})
                else:
                    self._send(404, {"error_code": 40403, "message": "Schema not found"})

        return Handler


@pytest.fixture()
def stub() -> Iterator[Stub]:
    s = Stub()
    try:
        yield s
    finally:
        s.close()


def registry(url: str, **kw: Any) -> HttpSchemaRegistry:
    opts: dict[str, Any] = {
        "timeout": 2,
        "max_attempts": 3,
        "backoff_initial": 0.01,
        "backoff_max": 0.05,
        "not_found_attempts": 2,
        "not_found_delay": 0.01,
    }
    opts.update(kw)
    return HttpSchemaRegistry(url, **opts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def frame(schema_id: int, body: bytes = b"\x02") -> bytes:
    return b"\x00" + schema_id.to_bytes(4, "big") + body


# ---------------------------------------------------------------------------------------
# LocalSchemaDir
# ---------------------------------------------------------------------------------------


def test_local_dir_reads_and_caches() -> None:
    res = LocalSchemaDir(SCHEMA_DIR)
    assert isinstance(res, SchemaResolver)
    s42 = res.get(42)
    assert s42["name"] == "billing.public.invoices.Envelope"
    assert res.get(42) is s42
    assert res.get(41)["name"] == "billing.public.invoices.Key"
    with pytest.raises(UnknownSchemaId) as exc:
        res.get(999)
    assert exc.value.schema_id == 999


def test_local_dir_registry_index_and_response_files(tmp_path: Path) -> None:
    (tmp_path / "key-v1.json").write_text(
        json.dumps({"schema": (SCHEMA_DIR / "41.avsc").read_text()})
    )
    (tmp_path / "registry.json").write_text(
        json.dumps({"7": {"subject": "t-key", "version": 1, "file": "key-v1.json"}})
    )
    (tmp_path / "8.avsc").write_text("{not json")
    res = LocalSchemaDir(tmp_path)
    assert res.get(7)["name"] == "billing.public.invoices.Key"
    with pytest.raises(InvalidSchema):
        res.get(8)
    # a schema added later is found without restarting
    (tmp_path / "9.avsc").write_text('"string"')
    assert res.get(9) == {"type": "string"}


def test_invalid_schema_dead_letters_as_avro_decode_error(tmp_path: Path) -> None:
    (tmp_path / "8.avsc").write_text(
        '{"type": "record", "name": "X", "fields": [{"name": "a", "type": "nope"}]}'
    )
    got = decode_record(
        KafkaRecord("b.p.t", 0, 0, None, frame(8)), schemas=LocalSchemaDir(tmp_path)
    )
    assert (got["reason"], got["schema_id"]) == ("avro_decode_error", 8)


# ---------------------------------------------------------------------------------------
# HttpSchemaRegistry
# ---------------------------------------------------------------------------------------


def test_http_fetches_parses_and_caches(stub: Stub) -> None:
    reg = registry(stub.url)
    s = reg.get(42)
    assert s["name"] == "billing.public.invoices.Envelope"
    assert reg.get(42) is s
    assert stub.hits[42] == 1


@pytest.mark.parametrize(
    "name",
    ["36-avro-create", "37-avro-update-evolved-schema", "38-avro-delete", "39-avro-tombstone"],
)
def test_http_decodes_avro_fixtures(stub: Stub, name: str) -> None:
    got = decode_record(load_fixture(FIXTURES / f"{name}.json"), schemas=registry(stub.url))
    expected = EXPECTED["fixtures"][name]
    assert {k: got[k] for k in expected} == expected


def test_http_404_is_unknown_schema_id(stub: Stub) -> None:
    reg = registry(stub.url)
    got = decode_record(load_fixture(FIXTURES / "46-bad-avro-unknown-schema-id.json"), schemas=reg)
    assert got["action"] == "dead_letter"
    assert (got["reason"], got["schema_id"]) == ("unknown_schema_id", 999)
    assert got["message"]
    assert stub.hits[999] == 2  # a 404 is retried once (registry lag) before it is final
    with pytest.raises(UnknownSchemaId):
        reg.get(999)
    assert stub.hits[999] == 2  # negative cache


def test_http_500_raises_registry_unavailable(stub: Stub) -> None:
    reg = registry(stub.url)
    with pytest.raises(RegistryUnavailable):
        decode_record(KafkaRecord("billing.public.invoices", 0, 0, None, frame(500)), schemas=reg)
    assert stub.hits[500] == 3  # retried with back-off up to max_attempts
    # not cached: the next call asks again
    with pytest.raises(RegistryUnavailable):
        reg.get(500)
    assert stub.hits[500] == 6


def test_http_backoff_is_exponential_and_bounded(stub: Stub) -> None:
    sleeps: list[float] = []
    reg = registry(
        stub.url, max_attempts=5, backoff_initial=0.1, backoff_max=0.3, sleep=sleeps.append
    )
    with pytest.raises(RegistryUnavailable):
        reg.get(500)
    assert sleeps == [0.1, 0.2, 0.3, 0.3]


def test_http_connection_refused_is_unavailable() -> None:
    reg = registry(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(RegistryUnavailable):
        reg.get(42)


def test_http_timeout_is_unavailable(stub: Stub) -> None:
    reg = registry(stub.url, timeout=0.2, max_attempts=2)
    with pytest.raises(RegistryUnavailable):
        reg.get(777)


def test_http_404_without_registry_body_is_unavailable(stub: Stub) -> None:
    """A 404 that is not a registry answer (wrong URL) must not dead-letter records."""
    with pytest.raises(RegistryUnavailable):
        registry(stub.url + "/wrong-prefix").get(42)
    with pytest.raises(RegistryUnavailable):
        registry(stub.url).get(404)


def test_http_bad_schemas_are_invalid(stub: Stub) -> None:
    reg = registry(stub.url)
    with pytest.raises(InvalidSchema):
        reg.get(88)
    with pytest.raises(InvalidSchema):
        reg.get(89)


def test_http_basic_auth_from_url(stub: Stub) -> None:
    reg = registry(stub.url.replace("http://", "http://user:s%40cret@"))
    reg.get(41)
    assert stub.auth[-1] == "Basic dXNlcjpzQGNyZXQ="  # user:s@cret
