"""Writer-schema resolution for Confluent-framed Avro (cdc-events.md §3.2).

Resolvers return the writer schema parsed by :func:`fastavro.parse_schema` and cache it
(ids are global and immutable). ``UnknownSchemaId`` is permanent (the record is
dead-lettered); ``RegistryUnavailable`` is transient (the caller pauses and retries;
never dead-letter it).
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Mapping
from http.client import HTTPException
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import fastavro

__all__ = [
    "HttpSchemaRegistry",
    "InvalidSchema",
    "LocalSchemaDir",
    "RegistryUnavailable",
    "SchemaRegistryError",
    "SchemaResolver",
    "UnknownSchemaId",
    "parse_writer_schema",
]


#: key of the wrapper dict returned for a top-level union schema
UNION_KEY = "__bucketsync_union__"


class SchemaRegistryError(Exception):
    """Base class of schema lookup failures."""


class UnknownSchemaId(SchemaRegistryError):
    """The id is definitively unknown (HTTP 404 / error 40403 after retries, missing file)."""

    def __init__(self, schema_id: int, detail: str = "") -> None:
        self.schema_id = schema_id
        super().__init__(
            f"schema id {schema_id} is not registered" + (f": {detail}" if detail else "")
        )


class InvalidSchema(SchemaRegistryError):
    """The registry returned something that is not a usable Avro schema (permanent)."""

    def __init__(self, schema_id: int, detail: str) -> None:
        self.schema_id = schema_id
        super().__init__(f"schema id {schema_id} is not a usable Avro schema: {detail}")


class RegistryUnavailable(SchemaRegistryError):
    """Transient: timeout, connection refused, HTTP 5xx, ... Pause and retry; never dead-letter."""


@runtime_checkable
class SchemaResolver(Protocol):
    def get(self, schema_id: int) -> dict[str, Any]:
        """Parsed writer schema for ``schema_id``.

        Raises :class:`UnknownSchemaId` (permanent), :class:`InvalidSchema` (permanent)
        or :class:`RegistryUnavailable` (transient).
        """
        ...


def parse_writer_schema(schema_id: int, schema: Any, *, text: bool = False) -> dict[str, Any]:
    """``fastavro.parse_schema`` of a decoded schema object (or of JSON text if ``text``)."""
    try:
        if text:
            schema = json.loads(schema)
        parsed = fastavro.parse_schema(schema)
    except Exception as exc:  # fastavro raises a variety of types for bad schemas
        raise InvalidSchema(schema_id, f"{type(exc).__name__}: {exc}") from None
    if not isinstance(parsed, dict):
        # a bare primitive or union schema: wrap so that callers always get a dict
        # (fastavro reads ``{"type": "string"}``; unions are unwrapped by the decoder)
        return {"type": parsed} if isinstance(parsed, str) else {UNION_KEY: parsed}
    return parsed


class _LRU:
    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._d: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, k: int) -> dict[str, Any] | None:
        with self._lock:
            v = self._d.get(k)
            if v is not None:
                self._d.move_to_end(k)
            return v

    def put(self, k: int, v: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            old = self._d.get(k)
            if old is not None:  # keep the first object: callers cache plans by identity
                return old
            self._d[k] = v
            if len(self._d) > self.maxsize:
                self._d.popitem(last=False)
            return v


class LocalSchemaDir:
    """Schemas from a directory: ``<id>.avsc`` files, optionally indexed by ``registry.json``
    (``{"<id>": {"subject": ..., "version": ..., "file": "<name>.avsc"}}``).

    A file may hold the schema itself or a registry response ``{"schema": "<text>"}``.
    """

    def __init__(self, path: str | os.PathLike[str], *, cache_size: int = 10_000) -> None:
        self.path = Path(path)
        self._cache = _LRU(cache_size)
        self._index: dict[int, str] | None = None

    def _load_index(self) -> dict[int, str]:
        index: dict[int, str] = {}
        reg = self.path / "registry.json"
        try:
            raw = json.loads(reg.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return index
        except (OSError, ValueError) as exc:
            raise RegistryUnavailable(f"cannot read {reg}: {exc}") from None
        if isinstance(raw, dict):
            for k, v in raw.items():
                try:
                    sid = int(k)
                except ValueError:
                    continue
                if isinstance(v, dict) and isinstance(v.get("file"), str):
                    index[sid] = v["file"]
                elif isinstance(v, str):
                    index[sid] = v
        return index

    def _file_for(self, schema_id: int) -> Path | None:
        if self._index is None:
            self._index = self._load_index()
        name = self._index.get(schema_id)
        if name is None:
            # the index may have been extended since it was read
            self._index = self._load_index()
            name = self._index.get(schema_id)
        candidates = [self.path / name] if name else []
        candidates.append(self.path / f"{schema_id}.avsc")
        for p in candidates:
            if p.is_file():
                return p
        return None

    def get(self, schema_id: int) -> dict[str, Any]:
        cached = self._cache.get(schema_id)
        if cached is not None:
            return cached
        path = self._file_for(schema_id)
        if path is None:
            raise UnknownSchemaId(schema_id, f"no schema file in {self.path}")
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise RegistryUnavailable(f"cannot read {path}: {exc}") from None
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise InvalidSchema(schema_id, f"{path.name}: {exc}") from None
        if isinstance(obj, dict) and isinstance(obj.get("schema"), str) and "type" not in obj:
            st = obj.get("schemaType")
            if st not in (None, "AVRO"):
                raise InvalidSchema(schema_id, f"schemaType {st}")
            return self._cache.put(
                schema_id, parse_writer_schema(schema_id, obj["schema"], text=True)
            )
        return self._cache.put(schema_id, parse_writer_schema(schema_id, obj))


class _Transient(Exception):
    pass


class HttpSchemaRegistry:
    """Confluent Schema Registry client: ``GET <url>/schemas/ids/<id>`` via urllib.

    * 200 -> the ``schema`` member (a string) is parsed and cached for the process life.
    * 404 with ``error_code`` 40403 -> retried ``not_found_attempts`` times (registries behind
      a load balancer can lag), then :class:`UnknownSchemaId`; cached negatively for
      ``negative_ttl`` seconds so a burst of such records does not wait each time.
    * connection errors, timeouts, 408/429/5xx, and a 404 that is not a registry answer
      (wrong URL) -> retried with exponential back-off up to ``max_attempts``, then
      :class:`RegistryUnavailable`. 401/403 raise :class:`RegistryUnavailable` at once.
    """

    def __init__(
        self,
        url: str,
        timeout: float = 5,
        *,
        max_attempts: int = 5,
        backoff_initial: float = 0.2,
        backoff_max: float = 5.0,
        not_found_attempts: int = 3,
        not_found_delay: float = 2.0,
        negative_ttl: float = 60.0,
        cache_size: int = 10_000,
        headers: Mapping[str, str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        hdrs = {"Accept": "application/vnd.schemaregistry.v1+json, application/json"}
        if parts.username is not None:
            cred = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            hdrs["Authorization"] = "Basic " + base64.b64encode(cred.encode()).decode("ascii")
            netloc = parts.hostname or ""
            if parts.port:
                netloc += f":{parts.port}"
            parts = parts._replace(netloc=netloc)
        self.url = urllib.parse.urlunsplit(parts).rstrip("/")
        self.timeout = timeout
        self.max_attempts = max(1, max_attempts)
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.not_found_attempts = max(1, not_found_attempts)
        self.not_found_delay = not_found_delay
        self.negative_ttl = negative_ttl
        self._headers = {**hdrs, **(headers or {})}
        self._sleep = sleep
        self._cache = _LRU(cache_size)
        self._unknown: dict[int, float] = {}
        self._lock = threading.Lock()

    def get(self, schema_id: int) -> dict[str, Any]:
        cached = self._cache.get(schema_id)
        if cached is not None:
            return cached
        with self._lock:
            until = self._unknown.get(schema_id)
        if until is not None and time.monotonic() < until:
            raise UnknownSchemaId(schema_id, "recently answered 404")
        try:
            parsed = self._fetch(schema_id)
        except UnknownSchemaId:
            with self._lock:
                if len(self._unknown) > 10_000:
                    self._unknown.clear()
                self._unknown[schema_id] = time.monotonic() + self.negative_ttl
            raise
        return self._cache.put(schema_id, parsed)

    def _request(self, schema_id: int) -> tuple[int, bytes]:
        req = urllib.request.Request(
            f"{self.url}/schemas/ids/{int(schema_id)}", headers=self._headers, method="GET"
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return int(resp.status), resp.read()
        except urllib.error.HTTPError as exc:
            try:
                body = exc.read()
            except (OSError, HTTPException):
                body = b""
            return int(exc.code), body
        except (urllib.error.URLError, OSError, HTTPException, ValueError) as exc:
            # URLError covers refused connections and DNS; OSError covers timeouts and resets
            raise _Transient(f"{type(exc).__name__}: {exc}") from None

    def _fetch(self, schema_id: int) -> dict[str, Any]:
        delay = self.backoff_initial
        attempts = 0
        not_found = 0
        while True:
            attempts += 1
            try:
                status, body = self._request(schema_id)
            except _Transient as exc:
                problem = str(exc)
            else:
                if status == 200:
                    return self._parse_response(schema_id, body)
                if status == 404 and _is_not_found(body):
                    not_found += 1
                    if not_found >= self.not_found_attempts:
                        raise UnknownSchemaId(schema_id, "registry answered 404 (40403)")
                    self._sleep(self.not_found_delay * 2 ** (not_found - 1))
                    attempts -= 1  # 404 retries have their own budget
                    continue
                if status in (401, 403):
                    raise RegistryUnavailable(
                        f"schema registry {self.url} refused access (HTTP {status})"
                    )
                problem = f"HTTP {status}: {body[:200]!r}"
            if attempts >= self.max_attempts:
                raise RegistryUnavailable(
                    f"schema registry {self.url} unavailable for id {schema_id} after "
                    f"{attempts} attempts: {problem}"
                )
            self._sleep(delay)
            delay = min(delay * 2, self.backoff_max)

    def _parse_response(self, schema_id: int, body: bytes) -> dict[str, Any]:
        try:
            doc = json.loads(body)
        except ValueError:
            raise RegistryUnavailable(
                f"schema registry {self.url} answered id {schema_id} with non-JSON content"
            ) from None
        if not isinstance(doc, dict) or not isinstance(doc.get("schema"), str):
            raise InvalidSchema(schema_id, "response has no 'schema' string")
        st = doc.get("schemaType")
        if st not in (None, "AVRO"):
            raise InvalidSchema(schema_id, f"schemaType {st} is not Avro")
        return parse_writer_schema(schema_id, doc["schema"], text=True)


def _is_not_found(body: bytes) -> bool:
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    if not isinstance(doc, dict):
        return False
    code = doc.get("error_code")
    # 40403 = schema not found; 40401/40402 (subject/version) do not apply to ids but are
    # equally definitive registry answers
    return code in (40403, 40401, 40402, 404)
