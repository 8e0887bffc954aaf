"""The aiohttp application: routes, auth, probes, metrics, workers, graceful shutdown."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing
import os
import re
import signal
import socket
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from confluent_kafka import Consumer, TopicPartition
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest

from bucketsync.config import Settings
from gateway import protocol
from gateway.auth import TokenVerifier
from gateway.buckets import BucketResolver
from gateway.errors import CODE_INTERNAL, ServiceError
from gateway.hub import CheckpointHub
from gateway.stream import SlowClient, StreamLimits, SyncStream
from pipeline.rules import SyncRules
from pipeline.store import Store

log = logging.getLogger("bucketsync.gateway")

AUTH_FAILURES = Counter("bucketsync_gateway_auth_failures_total", "Rejected tokens", ["code"])

CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Headers": "Content-Type, Authorization, User-Agent, X-User-Agent",
    "Access-Control-Expose-Headers": "Content-Type",
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Max-Age": "3600",
}


class PipelinePosition:
    """End offsets of the CDC topics: what a write checkpoint is bound to."""

    def __init__(self, settings: Settings):
        k = settings.kafka
        self.topics = list(k.topics)
        self.pattern = re.compile(k.topic_pattern) if k.topic_pattern else None
        self._consumer = Consumer(
            {
                "bootstrap.servers": k.bootstrap_servers,
                "group.id": f"{k.group_id}.gateway-position",
                "enable.auto.commit": False,
            }
        )

    def read(self, timeout: float = 5.0) -> dict[str, int]:
        md = self._consumer.list_topics(timeout=timeout)
        names = [
            t for t in md.topics if (t in self.topics) or (self.pattern and self.pattern.search(t))
        ]
        pos: dict[str, int] = {}
        for name in names:
            for p in md.topics[name].partitions:
                _low, high = self._consumer.get_watermark_offsets(
                    TopicPartition(name, p), timeout=timeout, cached=False
                )
                if high > 0:
                    pos[f"{name}/{p}"] = high - 1
        return pos

    def close(self) -> None:
        self._consumer.close()


@dataclass
class Gateway:
    settings: Settings
    rules: SyncRules
    store: Store
    hub: CheckpointHub
    verifier: TokenVerifier
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    position: PipelinePosition | None = None
    streams: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def limits(self) -> StreamLimits:
        g = self.settings.gateway
        return StreamLimits(
            g.keepalive_s,
            g.max_ops_per_line,
            g.max_line_bytes,
            g.slow_client_timeout_s,
            g.max_buffered_bytes,
        )


GATEWAY_KEY = web.AppKey("gateway", Gateway)


def _gw(request: web.Request) -> Gateway:
    return request.app[GATEWAY_KEY]


async def _json_body(request: web.Request) -> Any:
    raw = await request.read()
    if not raw:
        return {}
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ServiceError(400, "PSYNC_S2001", f"request body is not valid JSON: {exc}") from None


async def _authenticate(gw: Gateway, request: web.Request) -> Any:
    try:
        return await gw.verifier.verify_header(request.headers.get("Authorization"))
    except ServiceError as exc:
        AUTH_FAILURES.labels(exc.code).inc()
        log.info("auth failed: %s %s from %s", exc.code, exc.description, request.remote)
        raise


def _wcp_key(sub: Any, client_id: str | None) -> str:
    return f"{sub}/{client_id}" if client_id else str(sub)


async def sync_stream(request: web.Request) -> web.StreamResponse:
    gw = _gw(request)
    if gw.closing.is_set():
        raise ServiceError(503, "PSYNC_S2003", "server is shutting down")
    body = await _json_body(request)
    try:
        req = protocol.parse_stream_request(body)
    except protocol.BadRequest as exc:
        raise ServiceError(400, "PSYNC_S2001", str(exc)) from None
    token = await _authenticate(gw, request)
    g = gw.settings.gateway
    resolver = BucketResolver(
        gw.rules,
        token.payload,
        req.parameters,
        include_defaults=req.include_defaults,
        max_buckets=g.max_buckets_per_connection,
        max_parameter_results=g.max_parameter_query_results,
    )
    wcp_key = _wcp_key(token.sub, req.client_id)
    # subscribe before the first read, so no change after it goes unseen; resolve before
    # the 200, so a bucket limit is answered as a PSYNC_S2305 error response
    sub = gw.hub.subscribe((), wcp_key, resolver.lookup_keys)
    try:
        first = await resolver.resolve(gw.store, lambda names: gw.hub.set_buckets(sub, names))
    except BaseException:
        gw.hub.unsubscribe(sub)
        raise
    resp = web.StreamResponse(
        status=200,
        headers={
            "Content-Type": "application/x-ndjson",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            **CORS_HEADERS,
        },
    )
    resp.enable_chunked_encoding()
    try:
        await resp.prepare(request)
    except BaseException:
        gw.hub.unsubscribe(sub)
        raise
    if request.transport is not None:
        # bound what a connection may have queued: past it writes wait for the client,
        # and a client that stays behind for slow_client_timeout_s is dropped
        limit = gw.settings.gateway.max_buffered_bytes
        request.transport.set_write_buffer_limits(high=limit, low=limit // 4)
    describe = f"stream sub={token.sub!r} client={req.client_id} remote={request.remote}"
    log.info(
        "stream opened: sub=%s client=%s buckets=%d after=%s",
        token.sub,
        req.client_id,
        len(first.grants),
        orjson.dumps(req.after).decode(),
    )
    stream = SyncStream(
        store=gw.store,
        hub=gw.hub,
        resolver=resolver,
        after=req.after,
        wcp_key=wcp_key,
        exp=int(token.exp),
        limits=gw.limits,
        write=resp.write,
        buffered=lambda: request.transport.get_write_buffer_size() if request.transport else 0,
        closing=gw.closing,
        describe=describe,
        sub=sub,
        resolution=first,
    )
    task = asyncio.current_task()
    if task is not None:
        gw.streams.add(task)
    try:
        await stream.run()
    except SlowClient as exc:
        log.warning("%s", exc)
        if request.transport is not None:
            request.transport.abort()
        return resp
    except ConnectionResetError:
        log.info("%s: client went away", describe)
        return resp
    except ServiceError as exc:
        # after the 200 the status cannot change: end the stream, the client reconnects
        # and gets the error response then (sync-protocol.md §2.1)
        log.warning("%s: stream aborted: [%s] %s", describe, exc.code, exc.description)
        if request.transport is not None:
            request.transport.abort()
        return resp
    except Exception as exc:
        log.error(
            "%s: stream aborted: [%s] internal error: %s: %s",
            describe,
            CODE_INTERNAL,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )
        if request.transport is not None:
            request.transport.abort()
        return resp
    finally:
        if task is not None:
            gw.streams.discard(task)
    with contextlib.suppress(ConnectionResetError):
        await resp.write_eof()
    return resp


async def write_checkpoint(request: web.Request) -> web.Response:
    gw = _gw(request)
    token = await _authenticate(gw, request)
    client_id = request.query.get("client_id")
    position: dict[str, int] = {}
    if gw.position is not None:
        try:
            position = await asyncio.get_running_loop().run_in_executor(None, gw.position.read)
        except Exception as exc:
            raise ServiceError(
                503, "PSYNC_S2003", f"could not read CDC topic offsets: {exc}"
            ) from None
    wid = await gw.store.issue_write_checkpoint(_wcp_key(token.sub, client_id), position)
    return web.json_response({"data": {"write_checkpoint": str(wid)}}, headers=CORS_HEADERS)


async def liveness(request: web.Request) -> web.Response:
    return web.json_response({"alive": True})


async def readiness(request: web.Request) -> web.Response:
    gw = _gw(request)
    try:
        ok = await asyncio.wait_for(gw.store.ping(), 2.0)
    except Exception as exc:
        return web.json_response({"ready": False, "redis": str(exc)}, status=400)
    if gw.closing.is_set():
        return web.json_response({"ready": False, "reason": "shutting down"}, status=400)
    return web.json_response({"ready": bool(ok), "rules": True, "streams": gw.hub.connections})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def options(request: web.Request) -> web.Response:
    return web.Response(status=204, headers=CORS_HEADERS)


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """The one error boundary at the HTTP edge: whatever goes wrong inside a request is
    answered as the protocol's JSON error (``{"error": {name, code, status, ...}}``) with a
    PSYNC code, and logged once; never aiohttp's plain-text 500."""
    try:
        return await handler(request)
    except ServiceError as exc:
        if exc.status >= 500:
            log.warning("%s %s: [%s] %s", request.method, request.path, exc.code, exc.description)
        return exc.http_response(headers=CORS_HEADERS)
    except web.HTTPNotFound:
        return ServiceError(
            404, "PSYNC_S2002", f"route not found: {request.method} {request.path}"
        ).http_response(headers=CORS_HEADERS)
    except web.HTTPMethodNotAllowed:
        return ServiceError(
            405, "PSYNC_S2002", f"method not allowed: {request.method} {request.path}"
        ).http_response(headers=CORS_HEADERS)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects and the like are answers, not errors
        code = CODE_INTERNAL if exc.status >= 500 else "PSYNC_S2001"
        return ServiceError(exc.status, code, exc.reason or exc.text or "").http_response(
            headers=CORS_HEADERS
        )
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.error(
            "%s %s: [%s] internal error: %s: %s",
            request.method,
            request.path,
            CODE_INTERNAL,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )
        return ServiceError(
            500,
            CODE_INTERNAL,
            f"internal error: {type(exc).__name__}: {exc}",
        ).http_response(headers=CORS_HEADERS)


async def build_app(settings: Settings, *, with_position: bool = True) -> web.Application:
    from pipeline.processor import load_sync_rules

    rules = load_sync_rules(settings)
    store = Store.from_url(
        settings.redis.url, settings.redis.prefix, changes_maxlen=settings.redis.changes_maxlen
    )
    hub = CheckpointHub(store)
    verifier = TokenVerifier(settings.auth, base_dir=settings.config_dir)
    gw = Gateway(settings, rules, store, hub, verifier)
    if with_position:
        gw.position = PipelinePosition(settings)
    app = web.Application(middlewares=[error_middleware], client_max_size=1_048_576)
    app[GATEWAY_KEY] = gw
    app.router.add_post("/sync/stream", sync_stream)
    app.router.add_get("/write-checkpoint2.json", write_checkpoint)
    app.router.add_get("/probes/liveness", liveness)
    app.router.add_get("/probes/readiness", readiness)
    app.router.add_get("/probes/startup", readiness)
    app.router.add_get("/metrics", metrics)
    for path in ("/sync/stream", "/write-checkpoint2.json"):
        app.router.add_route("OPTIONS", path, options)  # CORS preflight for browser SDKs

    async def on_startup(app: web.Application) -> None:
        await hub.start()

    async def on_shutdown(app: web.Application) -> None:
        # end every stream cleanly; clients reconnect after their retry delay
        gw.closing.set()
        hub.wake_all()
        if gw.streams:
            await asyncio.wait(list(gw.streams), timeout=5)

    async def on_cleanup(app: web.Application) -> None:
        await hub.stop()
        await verifier.aclose()
        await store.close()
        if gw.position is not None:
            gw.position.close()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app


def _serve_worker(settings: Settings, host: str, port: int, reuse_port: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    async def go() -> None:
        app = await build_app(settings)
        # cancel a stream's handler when its client goes away, so idle streams never linger
        runner = web.AppRunner(
            app, shutdown_timeout=5.0, handle_signals=False, handler_cancellation=True
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port, backlog=4096)
        await site.start()
        log.info("gateway listening on http://%s:%s (pid %s)", host, port, os.getpid())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("gateway shutting down: ending streams")
        await runner.cleanup()

    asyncio.run(go())


def _check_port_free(host: str, port: int) -> None:
    from bucketsync.errors import UserError

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UserError(
                f"gateway port {host}:{port} is not available ({exc.strerror}); "
                "set gateway.port or pass --port"
            ) from None


def main(settings: Settings, args: argparse.Namespace) -> int:
    from pipeline.processor import load_sync_rules

    g = settings.gateway
    host = getattr(args, "host", None) or g.host
    port = getattr(args, "port", None) or g.port
    workers = getattr(args, "workers", None) or g.workers
    load_sync_rules(settings)  # refuse bad rules before binding anything
    _check_port_free(host, port)
    if workers <= 1:
        _serve_worker(settings, host, port, reuse_port=False)
        return 0
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_serve_worker, args=(settings, host, port, True)) for _ in range(workers)
    ]
    for p in procs:
        p.start()

    def forward(signum: int, _frame: Any) -> None:
        for p in procs:
            if p.pid:
                os.kill(p.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for p in procs:
        p.join()
    return 0
