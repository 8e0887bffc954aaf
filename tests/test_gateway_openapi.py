"""schemathesis against the gateway's own OpenAPI document (issue 13, part 3).

A real gateway (on the stack's Redis, in a thread with its own event loop) serves
``GET /openapi.json``; schemathesis generates requests for every operation in it, positive
and negative, once as generated (random or no credentials) and once with a valid token,
and every answer must be below 500 and match the document (status code, content type,
response schema). A sync stream's 200 body never ends on its own, so for those only the
status, the content type and the first protocol line are read before the client hangs up.
Examples are bounded (``MAX_EXAMPLES`` per operation) so the module takes well under 60 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import ignored_auth

from bucketsync.config import Settings
from bucketsync.tokens import make_dev_token
from gateway.openapi import openapi_document
from tests.conftest import REPO_ROOT, hidden_test_env
from tests.gateway_helpers import running_gateway
from tests.test_gateway_protocol import RULES

pytestmark = pytest.mark.stack

MAX_EXAMPLES = 100


def test_document_is_valid_openapi() -> None:
    doc = openapi_document()
    loaded = schemathesis.openapi.from_dict(doc)
    ops = {(op.method.upper(), op.path) for op in (r.ok() for r in loaded.get_all_operations())}
    assert {("POST", "/sync/stream"), ("GET", "/write-checkpoint2.json")} <= ops
    assert ("GET", "/openapi.json") in ops


class _ThreadedGateway:
    """The real gateway on its own event loop in a thread (schemathesis calls are blocking)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = ""
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="gateway", daemon=True)

    def _run(self) -> None:
        async def go() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            async with running_gateway(self.settings) as url:
                self.url = url
                self._ready.set()
                await self._stop.wait()

        try:
            asyncio.run(go())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    def __enter__(self) -> _ThreadedGateway:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None or not self.url:
            raise RuntimeError(f"gateway did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)


@pytest.fixture(scope="module")
def gateway(stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    import redis

    rules = tmp_path_factory.mktemp("openapi") / "rules.yaml"
    rules.write_text(RULES)
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    with hidden_test_env():
        s = Settings(
            config_dir=REPO_ROOT,
            sync_rules=str(rules),
            redis={"url": stack.redis_url, "prefix": prefix},
            kafka={"bootstrap_servers": stack.bootstrap_servers},
            # no per-user cap: streams closed by the client end a moment later
            gateway={"keepalive_s": 20, "max_connections_per_user": None},
        )
    with _ThreadedGateway(s) as gw:
        token = make_dev_token(s, sub="schemathesis-user", ttl_s=600)
        yield {"url": gw.url, "token": token, "settings": s}
    client = redis.Redis.from_url(stack.redis_url)
    with contextlib.suppress(Exception):
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.unlink(*keys)
    client.close()


@pytest.fixture(scope="module")
def api_schema(gateway: dict[str, Any]) -> Any:
    # the document as the gateway serves it, not the Python dict
    # (loaded from the URL, schemathesis leaves the document's own path out)
    served = requests.get(f"{gateway['url']}/openapi.json", timeout=10)
    assert served.status_code == 200
    loaded = schemathesis.openapi.from_dict(served.json())
    ops = (r.ok() for r in loaded.get_all_operations())
    return {(op.method.upper(), op.path): op for op in ops}


#: every operation of the document (schemathesis' own pytest fixture loader does not work
#: with this pytest, so each operation is a test running its hypothesis strategy itself)
OPERATIONS = [
    (method.upper(), path)
    for path, item in openapi_document()["paths"].items()
    for method in item
    if method in ("get", "post", "put", "patch", "delete", "options")
]


#: every answer, by (operation, status): the test's numbers
SEEN: dict[tuple[str, int], int] = {}


def _is_stream(case: Any) -> bool:
    return case.method.upper() == "POST" and case.path == "/sync/stream"


def _call(case: Any, gateway: dict[str, Any], headers: dict[str, str] | None) -> None:
    kwargs = case.as_transport_kwargs(base_url=gateway["url"], headers=headers)
    kwargs.pop("base_url", None)
    label = f"{case.method.upper()} {case.path}"
    with requests.Session() as session:
        resp = session.request(**kwargs, stream=True, timeout=10, allow_redirects=False)
        try:
            SEEN[(label, resp.status_code)] = SEEN.get((label, resp.status_code), 0) + 1
            assert resp.status_code < 500, (
                f"{label} answered {resp.status_code}: {resp.raw.read(2000)!r}\n"
                f"{case.as_curl_command()}"
            )
            if _is_stream(case) and resp.status_code == 200:
                assert resp.headers["Content-Type"].startswith("application/x-ndjson")
                line = resp.raw.readline(1_000_000)
                first = orjson.loads(line)
                assert isinstance(first, dict) and len(first) == 1, line[:200]
                assert next(iter(first)) == "checkpoint", line[:200]
                return
        finally:
            if _is_stream(case) and resp.status_code == 200:
                resp.close()  # hang up: the gateway cancels the stream
    # not a never-ending body: read whole and check against the document
    assert resp.status_code < 500
    # a valid token is meant to be accepted: not "API accepts invalid authentication"
    case.validate_response(resp, excluded_checks=[ignored_auth] if headers else None)


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_no_server_errors(
    method: str, path: str, api_schema: Any, gateway: dict[str, Any], caplog: Any
) -> None:
    op = api_schema[(method, path)]
    auth = {"Authorization": f"Bearer {gateway['token']}"}

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    @given(
        case=op.as_strategy(generation_mode=GenerationMode.POSITIVE)
        | op.as_strategy(generation_mode=GenerationMode.NEGATIVE)
    )
    def run(case: Any) -> None:
        # as generated: missing / random credentials, positive and negative bodies
        _call(case, gateway, None)
        # and with a valid token, so the generated bodies and queries reach the handlers
        if path in ("/sync/stream", "/write-checkpoint2.json"):
            _call(case, gateway, auth)

    with caplog.at_level(logging.INFO, logger="bucketsync.gateway"):
        run()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def test_zz_report(gateway: dict[str, Any]) -> None:
    """Prints what the generated requests were answered with (run with -s to see it)."""
    t0 = time.monotonic()
    for (label, status), n in sorted(SEEN.items()):
        print(f"  {label:38} {status}: {n}")
    assert time.monotonic() - t0 < 5
    if SEEN:  # only when the module ran whole
        assert not [k for k in SEEN if k[1] >= 500]
        assert any(s == 200 for (label, s) in SEEN if label == "POST /sync/stream")
