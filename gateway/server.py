"""The aiohttp application: routes, auth, probes, metrics, workers, graceful shutdown."""

from __future__ import annotations

import array
import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
from aiohttp import web
from aiohttp.web_log import AccessLogger
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from confluent_kafka import Consumer, TopicPartition
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest

from bucketsync.config import Settings
from gateway import protocol
from gateway.auth import TokenVerifier, refuse_unusable_auth
from gateway.buckets import BucketResolver
from gateway.errors import CODE_INTERNAL, CODE_TOO_MANY_CONNECTIONS, CODE_VALIDATION, ServiceError
from gateway.hub import CheckpointHub
from gateway.logutil import LogBudget, RateLimitedLog, clip
from gateway.openapi import openapi_document
from gateway.source_position import SourcePosition
from gateway.starts import StartReads
from gateway.store_health import LayoutCheck, ReplicaFailover, refuse_other_layout
from gateway.stream import SlowClient, StreamLimits, SyncStream
from pipeline.rules import SyncRules, load_sync_rules
from pipeline.store import Store, write_checkpoint_key

try:  # the socket send queue (TIOCOUTQ) is read on Linux / BSD only
    import fcntl
    import termios
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]
    termios = None  # type: ignore[assignment]

log = logging.getLogger("bucketsync.gateway")

REPLICA_BEHIND = Counter(
    "bucketsync_gateway_replica_behind_total",
    "Streams started while the replica was still behind the client's position",
)
AUTH_FAILURES = Counter("bucketsync_gateway_auth_failures_total", "Rejected tokens", ["code"])
_REFUSED_LOG = RateLimitedLog(log, interval_s=10.0)
TOO_MANY = Counter(
    "bucketsync_gateway_streams_refused_total",
    "Streams refused for gateway.max_connections_per_user",
)

CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Headers": "Content-Type, Authorization, User-Agent, X-User-Agent",
    "Access-Control-Expose-Headers": "Content-Type",
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Max-Age": "3600",
}


class KafkaUnavailable(Exception):
    """Kafka could not be asked for the CDC topics' end offsets (now, or recently)."""


_KAFKA_LOG = logging.getLogger("bucketsync.gateway.kafka")


class PipelinePosition:
    """End offsets of the CDC topics: what a write checkpoint is bound to.

    The Kafka consumer is made on first use, not at startup, and closed after any failure
    (so librdkafka does not keep reconnecting in the background); after a failure Kafka is
    not asked again for a backoff that doubles per failure up to ``kafka_backoff_max_s``,
    and failures are logged at most once per backoff window.
    """

    def __init__(self, settings: Settings):
        k = settings.kafka
        g = settings.gateway
        self.topics = list(k.topics)
        self.pattern = re.compile(k.topic_pattern) if k.topic_pattern else None
        self._conf = {
            "bootstrap.servers": k.bootstrap_servers,
            "group.id": f"{k.group_id}.gateway-position",
            "enable.auto.commit": False,
            "reconnect.backoff.ms": int(g.kafka_backoff_initial_s * 1000),
            "reconnect.backoff.max.ms": int(g.kafka_backoff_max_s * 1000),
        }
        self.backoff_initial_s = g.kafka_backoff_initial_s
        self.backoff_max_s = g.kafka_backoff_max_s
        self._backoff_s = 0.0
        self._retry_at = 0.0
        self._consumer: Consumer | None = None
        self._lock = threading.Lock()
        self._log = RateLimitedLog(_KAFKA_LOG, interval_s=max(1.0, g.kafka_backoff_initial_s))
        #: librdkafka's own log lines, forwarded (rate-limited) instead of printed to stderr
        # (a private logger, not in the logging tree: one forward handler per reader)
        self._rdkafka_log = logging.Logger("bucketsync.gateway.kafka.rdkafka", logging.INFO)
        self._rdkafka_log.addHandler(_RateLimitedForward(self._log))
        self.failures = 0

    def read(self, timeout: float = 5.0) -> dict[str, int]:
        with self._lock:
            now = time.monotonic()
            if now < self._retry_at:
                raise KafkaUnavailable(
                    f"Kafka unreachable; next attempt in {self._retry_at - now:.1f}s "
                    "(gateway.kafka_backoff_initial_s / kafka_backoff_max_s)"
                )
            try:
                if self._consumer is None:
                    self._consumer = Consumer(self._conf, logger=self._rdkafka_log)
                pos = self._read(self._consumer, timeout)
            except Exception as exc:
                self.failures += 1
                self._close_consumer()
                self._backoff_s = min(
                    self.backoff_max_s, max(self.backoff_initial_s, self._backoff_s * 2)
                )
                self._retry_at = time.monotonic() + self._backoff_s
                self._log.log(
                    "read",
                    logging.WARNING,
                    "could not read the CDC topics' end offsets from Kafka (%s); "
                    "write checkpoints answer 503 for the next %.1fs",
                    clip(str(exc), 300),
                    self._backoff_s,
                )
                raise KafkaUnavailable(str(exc)) from None
            self._backoff_s = 0.0
            return pos

    def _read(self, consumer: Consumer, timeout: float) -> dict[str, int]:
        md = consumer.list_topics(timeout=timeout)
        names = [
            t for t in md.topics if (t in self.topics) or (self.pattern and self.pattern.search(t))
        ]
        pos: dict[str, int] = {}
        for name in names:
            for p in md.topics[name].partitions:
                _low, high = consumer.get_watermark_offsets(
                    TopicPartition(name, p), timeout=timeout, cached=False
                )
                if high > 0:
                    pos[f"{name}/{p}"] = high - 1
        consumer.poll(0)  # serve queued librdkafka log lines
        return pos

    def _close_consumer(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(Exception):
                consumer.poll(0)
            with contextlib.suppress(Exception):
                consumer.close()

    def close(self) -> None:
        with self._lock:
            self._close_consumer()


class _RateLimitedForward(logging.Handler):
    """Hands librdkafka's log records to a rate-limited logger (one key per facility)."""

    def __init__(self, target: RateLimitedLog):
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:
            return
        facility = msg.split(" ", 1)[0]
        self.target.log(f"rdkafka:{facility}", record.levelno, "librdkafka: %s", clip(msg, 300))


@dataclass
class Gateway:
    settings: Settings
    rules: SyncRules
    store: Store
    hub: CheckpointHub
    verifier: TokenVerifier
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    position: PipelinePosition | None = None
    #: gateway.write_checkpoint_mode=source: the source database's WAL position
    source: SourcePosition | None = None
    #: tasks serving streams (request handlers, and detached streams' tasks while they run)
    streams: set[asyncio.Task[Any]] = field(default_factory=set)
    #: open sync streams per user (``str(sub)``), for gateway.max_connections_per_user
    user_streams: dict[str, int] = field(default_factory=dict)
    #: the shared first read of streams starting together (None: each reads alone)
    starts: StartReads | None = None
    #: the store's key layout, checked by the readiness probe until it carries the marker
    layout: LayoutCheck | None = None
    #: reads on the primary while the replica is down (``redis.replica_check_s``)
    failover: ReplicaFailover | None = None
    #: the "stream opened" lines' budget (gateway.stream_log_per_s)
    open_log: LogBudget | None = None

    @property
    def limits(self) -> StreamLimits:
        g = self.settings.gateway
        return StreamLimits(
            g.keepalive_s,
            g.max_ops_per_line,
            g.max_line_bytes,
            g.slow_client_timeout_s,
            g.max_buffered_bytes,
            g.stall_timeout_s,
        )

    def clip(self, value: Any) -> str:
        return clip(value, self.settings.gateway.log_field_max_chars)

    def take_stream_slot(self, sub: Any) -> str:
        """Count a new stream of ``sub``; 429 PSYNC_S2304 past the per-user cap."""
        user = str(sub)
        cap = self.settings.gateway.max_connections_per_user
        n = self.user_streams.get(user, 0)
        if cap is not None and n >= cap:
            TOO_MANY.inc()
            _REFUSED_LOG.log(
                "cap",
                logging.WARNING,
                "stream refused: sub=%s already has %d open streams "
                "(gateway.max_connections_per_user=%d)",
                self.clip(user),
                n,
                cap,
            )
            raise ServiceError(
                429,
                CODE_TOO_MANY_CONNECTIONS,
                f"Maximum active concurrent connections limit has been reached ({cap} per user)",
            )
        self.user_streams[user] = n + 1
        return user

    def release_stream_slot(self, user: str) -> None:
        n = self.user_streams.get(user, 0) - 1
        if n > 0:
            self.user_streams[user] = n
        else:
            self.user_streams.pop(user, None)


GATEWAY_KEY = web.AppKey("gateway", Gateway)


def _gw(request: web.Request) -> Gateway:
    return request.app[GATEWAY_KEY]


class _CloseAfter(ServiceError):
    """A ServiceError after which the connection is closed (the request was not read whole)."""


async def _json_body(request: web.Request) -> Any:
    timeout = _gw(request).settings.gateway.body_timeout_s
    try:
        raw = await asyncio.wait_for(request.read(), timeout)
    except TimeoutError:
        log.info(
            "request body not complete within %gs from %s; closing the connection",
            timeout,
            request.remote,
        )
        # a half-sent body leaves the connection unusable: answer, then close it
        raise _CloseAfter(
            408,
            CODE_VALIDATION,
            f"request body not received within {timeout:g}s (gateway.body_timeout_s)",
        ) from None
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
        log.info(
            "auth failed: %s %s from %s",
            exc.code,
            gw.clip(exc.description),
            gw.clip(request.remote),
        )
        raise


def _unsent_bytes(transport: asyncio.BaseTransport | None) -> Callable[[], int]:
    """Bytes written to a connection that its client has not taken yet: the transport's
    buffer plus, on Linux, the socket's send queue (TIOCOUTQ)."""
    if not isinstance(transport, asyncio.WriteTransport):
        return lambda: 0
    sock = transport.get_extra_info("socket")
    return _Unsent(transport, sock.fileno() if sock is not None else -1)


_TIOCOUTQ = getattr(termios, "TIOCOUTQ", None) if termios is not None else None


class _Unsent:
    """``_unsent_bytes``'s callable (a slotted object: smaller than a closure, and kept
    for every open stream)."""

    __slots__ = ("fd", "transport")

    def __init__(self, transport: asyncio.WriteTransport, fd: int):
        self.transport = transport
        self.fd = fd

    def __call__(self) -> int:
        transport = self.transport
        n = transport.get_write_buffer_size()
        if _TIOCOUTQ is not None and self.fd >= 0 and not transport.is_closing():
            # into one shared buffer (no bytes object and unpack per look: the hub's
            # delivery round looks once per written stream)
            try:
                fcntl.ioctl(self.fd, _TIOCOUTQ, _OUTQ, True)
            except OSError:
                return n
            n += _OUTQ[0]
        return n


#: how long a new stream waits for the hub's start (its first read of the change stream)
#: before the gateway answers 503 (the client retries)
HUB_START_WAIT_S = 5.0

#: the TIOCOUTQ answer of ``_Unsent`` (one process-wide buffer: looks never overlap)
_OUTQ = array.array("i", [0])


async def sync_stream(request: web.Request) -> web.StreamResponse:
    gw = _gw(request)
    if gw.closing.is_set():
        raise ServiceError(503, "PSYNC_S2003", "server is shutting down")
    # the token before the body: an anonymous client gets 401 and its body is never read
    token = await _authenticate(gw, request)
    user = gw.take_stream_slot(token.sub)
    handed_over = False
    try:
        resp, handed_over = await _sync_stream(gw, request, token, user)
        return resp
    finally:
        if not handed_over:
            gw.release_stream_slot(user)


class _StreamEnd:
    """What ends a detached stream (``SyncStream.detach``): the user's stream slot is
    released, the response ended (normal end) or the connection aborted (an error), as the
    request handler does for a stream it still holds. (A slotted object rather than a
    closure: one is kept for every open stream.)"""

    __slots__ = ("describe", "gw", "transport", "user")

    def __init__(self, gw: Gateway, user: str, describe: str, transport: asyncio.Transport):
        self.gw = gw
        self.user = user
        self.describe = describe
        self.transport = transport

    def __call__(self, exc: BaseException | None) -> None:
        gw, describe, transport = self.gw, self.describe, self.transport
        gw.release_stream_slot(self.user)
        if exc is None:
            if not transport.is_closing():
                transport.write(b"0\r\n\r\n")  # the chunked response's end
                transport.close()
            return
        if isinstance(exc, SlowClient):
            log.warning("%s", exc)
        elif isinstance(exc, ConnectionError):
            log.info("%s: client went away", describe)
        elif isinstance(exc, ServiceError):
            log.warning("%s: stream aborted: [%s] %s", describe, exc.code, exc.description)
        elif not isinstance(exc, asyncio.CancelledError):
            log.error(
                "%s: stream aborted: [%s] internal error: %s: %s",
                describe,
                CODE_INTERNAL,
                type(exc).__name__,
                exc,
                exc_info=exc,
            )
        transport.abort()


def _detach(
    gw: Gateway, request: web.Request, stream: SyncStream, user: str, describe: str
) -> bool:
    """Hand the connection of an idle stream from aiohttp to the stream: aiohttp's request,
    handler and tasks are released (about half of an idle stream's memory). aiohttp then
    sees a connection without transport: it neither writes the response's end nor closes."""
    proto = request.protocol
    transport = request.transport
    manager = getattr(proto, "_manager", None)
    if not isinstance(transport, asyncio.Transport) or manager is None:
        return False
    stream.detach(transport, _StreamEnd(gw, user, describe, transport), gw.streams)
    manager.connection_lost(proto, None)  # out of the server's connection table
    proto.transport = None
    # the handler and its parser refer to each other: without this the pair (about 1 KB)
    # waits for a full garbage collection, which the gateway runs rarely (gc.freeze)
    proto._parser = None
    # and no keep-alive wait for a next request on this connection: the handler's task ends
    # with this request, instead of the handler, its task and a timer living on for
    # gateway.idle_timeout_s (after a reconnect storm: one of each per stream)
    proto.keep_alive(False)  # cancels the connection's keep-alive timer
    proto.force_close()
    return True


class _StreamResponse(web.StreamResponse):
    """The sync stream's response: its headers leave with the first checkpoint (one write,
    one syscall per stream instead of two; the stream writes its checkpoint right after
    ``prepare``, before anything reaches the transport directly)."""

    _send_headers_immediately = False

    def headers_out(self) -> None:
        """Hand the headers to the transport now if no body write took them yet (before an
        abort or a detach: the client has its 200 whatever happens next)."""
        send = getattr(getattr(self, "_payload_writer", None), "send_headers", None)
        if send is not None:
            send()


async def _sync_stream(
    gw: Gateway, request: web.Request, token: Any, user: str
) -> tuple[web.StreamResponse, bool]:
    body = await _json_body(request)
    try:
        req = protocol.parse_stream_request(body)
    except protocol.BadRequest as exc:
        raise ServiceError(400, "PSYNC_S2001", str(exc)) from None
    g = gw.settings.gateway
    if not gw.hub.started and not await gw.hub.wait_checkpoint(0, HUB_START_WAIT_S):
        # the hub has not read the change stream's tail yet (Redis, or the replica, not
        # ready when the gateway started): a stream reading its first checkpoint now would
        # miss the changes applied before the hub's first read (nothing hands them to it)
        raise ServiceError(503, "PSYNC_S2003", "the gateway has not reached the store yet")
    resolver = BucketResolver(
        gw.rules,
        token.payload,
        req.parameters,
        include_defaults=req.include_defaults,
        max_buckets=g.max_buckets_per_connection,
        max_parameter_results=g.max_parameter_query_results,
        subscriptions=req.subscriptions,
    )
    wcp_key = write_checkpoint_key(token.sub, req.client_id)
    # subscribe before the first read, so no change after it goes unseen; resolve before
    # the 200, so a bucket limit is answered as a PSYNC_S2305 error response
    sub = gw.hub.subscribe((), wcp_key, resolver.lookup_keys)
    try:
        if gw.store.replica and req.after:
            # a client that synced elsewhere (the primary, a replica further ahead) may be
            # past what this gateway's replica holds: its first checkpoint would then lack
            # ops the client has (a checksum failure and a full download). Wait for it.
            need = max(req.after.values())
            if not await gw.hub.wait_checkpoint(need, gw.settings.redis.replica_wait_s):
                REPLICA_BEHIND.inc()
                log.warning(
                    "replica at checkpoint %d is still behind the client's position %d "
                    "after %.1fs (redis.replica_wait_s); serving it anyway",
                    gw.hub.checkpoint,
                    need,
                    gw.settings.redis.replica_wait_s,
                )
        first = await resolver.resolve(
            gw.store,
            lambda names: gw.hub.set_buckets(sub, names),
            starts=gw.starts,
            wcp_key=wcp_key,
        )
    except BaseException:
        gw.hub.unsubscribe(sub)
        raise
    gz = (
        protocol.GzipBody(g.compression_level)
        if g.compression == "gzip" and protocol.accepts_gzip(request.headers.get("Accept-Encoding"))
        else None
    )
    resp = _StreamResponse(
        status=200,
        headers={
            "Content-Type": "application/x-ndjson",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            **({"Content-Encoding": "gzip", "Vary": "Accept-Encoding"} if gz else {}),
            **CORS_HEADERS,
        },
    )
    resp.enable_chunked_encoding()
    try:
        await resp.prepare(request)
    except BaseException:
        gw.hub.unsubscribe(sub)
        raise
    resp.headers.clear()  # serialized by prepare(); not kept for the stream's lifetime
    if request.transport is not None:
        # bound what a connection may have queued: past it writes wait for the client,
        # and a client that stays behind for slow_client_timeout_s is dropped
        limit = gw.settings.gateway.max_buffered_bytes
        request.transport.set_write_buffer_limits(high=limit, low=limit // 4)
    describe = (
        f"stream sub={gw.clip(str(token.sub))} client={gw.clip(req.client_id)} "
        f"remote={gw.clip(request.remote)}"
    )
    if gw.open_log is None or gw.open_log.allow():
        log.info(
            "stream opened: sub=%s client=%s buckets=%d after=%s agent=%s",
            gw.clip(str(token.sub)),
            gw.clip(req.client_id),
            len(first.grants),
            gw.clip(orjson.dumps(req.after).decode()),
            gw.clip(request.headers.get("x-user-agent") or request.headers.get("User-Agent")),
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
        unsent=_unsent_bytes(request.transport),
        closing=gw.closing,
        describe=describe,
        sub=sub,
        resolution=first,
        transport=request.transport,
        detachable=isinstance(request.transport, asyncio.Transport)
        and isinstance(getattr(request.protocol, "_manager", None), web.Server),
        gzip=gz,
    )
    task = asyncio.current_task()
    if task is not None:
        gw.streams.add(task)
    try:
        if await stream.run():
            resp.headers_out()
            if _detach(gw, request, stream, user, describe):
                return resp, True
            stream.abandon()  # pragma: no cover (detachable says it can be detached)
            raise RuntimeError("an idle stream could not be detached")  # pragma: no cover
    except SlowClient as exc:
        log.warning("%s", exc)
        resp.headers_out()
        if request.transport is not None:
            request.transport.abort()
        return resp, False
    except ConnectionResetError:
        log.info("%s: client went away", describe)
        return resp, False
    except ServiceError as exc:
        # after the 200 the status cannot change: end the stream, the client reconnects
        # and gets the error response then (sync-protocol.md §2.1)
        log.warning("%s: stream aborted: [%s] %s", describe, exc.code, exc.description)
        resp.headers_out()
        if request.transport is not None:
            request.transport.abort()
        return resp, False
    except Exception as exc:
        log.error(
            "%s: stream aborted: [%s] internal error: %s: %s",
            describe,
            CODE_INTERNAL,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )
        resp.headers_out()
        if request.transport is not None:
            request.transport.abort()
        return resp, False
    finally:
        if task is not None:
            gw.streams.discard(task)
    with contextlib.suppress(ConnectionResetError):
        await resp.write_eof()
    return resp, False


async def write_checkpoint(request: web.Request) -> web.Response:
    gw = _gw(request)
    token = await _authenticate(gw, request)
    client_id = request.query.get("client_id")
    position: dict[str, int] = {}
    if gw.source is not None:
        try:
            # applied LSNs reach the hub with the change entries (and with its start-up
            # read of the tail, checkpoint and LSNs in one step), never from the store
            # directly: the stored LSN can be ahead of the entries the hub has read, and an
            # acknowledgement at the older checkpoint would make the client drop its own row
            # until the server's copy arrives
            position = await gw.source.read()
        except Exception as exc:
            raise ServiceError(
                503,
                "PSYNC_S2003",
                f"could not read the source database's WAL position: {clip(str(exc), 300)}",
            ) from None
    elif gw.position is not None:
        try:
            position = await asyncio.get_running_loop().run_in_executor(None, gw.position.read)
        except Exception as exc:
            raise ServiceError(
                503, "PSYNC_S2003", f"could not read CDC topic offsets: {clip(str(exc), 300)}"
            ) from None
    wid = await gw.store.issue_write_checkpoint(
        write_checkpoint_key(token.sub, client_id), position
    )
    return web.json_response({"data": {"write_checkpoint": str(wid)}}, headers=CORS_HEADERS)


async def liveness(request: web.Request) -> web.Response:
    return web.json_response({"alive": True})


async def readiness(request: web.Request) -> web.Response:
    gw = _gw(request)
    try:
        ok = await asyncio.wait_for(gw.store.ping(), 2.0)
        layout = await asyncio.wait_for(gw.layout.problem(), 2.0) if gw.layout else None
    except Exception as exc:
        return web.json_response({"ready": False, "redis": str(exc)}, status=400)
    if layout is not None:
        return web.json_response({"ready": False, "reason": layout}, status=400)
    if gw.closing.is_set():
        return web.json_response({"ready": False, "reason": "shutting down"}, status=400)
    body = {"ready": bool(ok), "rules": True, "streams": gw.hub.connections}
    return web.json_response(body, status=200 if ok else 400)  # probes read the status only


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def options(request: web.Request) -> web.Response:
    return web.Response(status=204, headers=CORS_HEADERS)


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(), headers=CORS_HEADERS)


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """The one error boundary at the HTTP edge: whatever goes wrong inside a request is
    answered as the protocol's JSON error (``{"error": {name, code, status, ...}}``) with a
    PSYNC code, and logged once; never aiohttp's plain-text 500."""
    try:
        return await handler(request)
    except _CloseAfter as exc:
        resp = exc.http_response(headers=CORS_HEADERS)
        resp.force_close()
        await resp.prepare(request)
        await resp.write_eof()
        request.protocol.force_close()  # no lingering read of a body that is not coming
        return resp
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

    rules = load_sync_rules(settings)
    replicas = settings.redis.replica_urls
    # one replica per process, and every read of the process from it (Store docstring)
    replica = replicas[os.getpid() % len(replicas)] if replicas else None
    store = Store.from_settings(settings, reader_url=replica)
    hub = CheckpointHub(store, page_cache_bytes=settings.gateway.page_cache_max_bytes)
    verifier = TokenVerifier(settings.auth, base_dir=settings.config_dir)
    g = settings.gateway
    starts = (
        StartReads(store, window_s=g.start_read_window_ms / 1000, max_batch=g.start_read_max_batch)
        if g.start_read_max_batch > 1
        else None
    )
    gw = Gateway(
        settings,
        rules,
        store,
        hub,
        verifier,
        starts=starts,
        layout=LayoutCheck(store),
        open_log=LogBudget(log, g.stream_log_per_s, "streams opened", "gateway.stream_log_per_s"),
    )
    if replica is not None and settings.redis.replica_check_s > 0:
        gw.failover = ReplicaFailover(
            store, settings.redis.url, replica, settings.redis.replica_check_s
        )
    if with_position:
        if settings.gateway.write_checkpoint_mode == "source":
            gw.source = SourcePosition(settings)
        else:
            gw.position = PipelinePosition(settings)
    app = web.Application(middlewares=[error_middleware], client_max_size=1_048_576)
    app[GATEWAY_KEY] = gw
    app.router.add_post("/sync/stream", sync_stream)
    app.router.add_get("/write-checkpoint2.json", write_checkpoint)
    app.router.add_get("/probes/liveness", liveness)
    app.router.add_get("/probes/readiness", readiness)
    app.router.add_get("/probes/startup", readiness)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi_json)
    for path in ("/sync/stream", "/write-checkpoint2.json"):
        app.router.add_route("OPTIONS", path, options)  # CORS preflight for browser SDKs

    async def on_startup(app: web.Application) -> None:
        await hub.start()
        if gw.failover is not None:
            gw.failover.start()

    async def on_shutdown(app: web.Application) -> None:
        # end every stream cleanly; clients reconnect after their retry delay
        gw.closing.set()
        hub.wake_all()
        if gw.streams:
            await asyncio.wait(list(gw.streams), timeout=5)

    async def on_cleanup(app: web.Application) -> None:
        await hub.stop()
        if gw.failover is not None:
            await gw.failover.stop()
        if starts is not None:
            await starts.aclose()
        await verifier.aclose()
        await store.close()
        if gw.position is not None:
            gw.position.close()
        if gw.source is not None:
            await gw.source.close()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app


class _AccessLog(AccessLogger):
    """aiohttp's access log without the sync streams that started (200 on /sync/stream):
    their "stream opened" line says more (sub, client, buckets, positions, agent) and is
    budgeted (``gateway.stream_log_per_s``); a line each cost a reconnect storm ~6% of the
    gateway's CPU. Refused streams and every other request are logged as before."""

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        if isinstance(response, _StreamResponse) and response.status == 200:
            return
        super().log(request, response, time)


class _GuardedRequestHandler(RequestHandler):
    """aiohttp's connection handler plus a header timeout: once the first byte of a request
    arrives, its headers must be complete within ``header_timeout_s`` or the connection is
    closed. (Idle connections, fresh or between requests, are aiohttp's keepalive_timeout.)"""

    __slots__ = ("_bs_header_timeout_s", "_bs_header_timer")  # no __dict__ per connection

    def __init__(self, *args: Any, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._bs_header_timeout_s = header_timeout_s
        self._bs_header_timer: asyncio.TimerHandle | None = None

    def _bs_awaiting_headers(self) -> bool:
        # no complete request queued and none being handled: bytes so far are a partial head
        return (
            self.transport is not None
            and not getattr(self, "_messages", True)
            and not getattr(self, "_request_in_progress", True)
        )

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        awaiting = self._bs_awaiting_headers()
        if self._bs_header_timer is None:
            if data and awaiting:
                loop = asyncio.get_running_loop()
                self._bs_header_timer = loop.call_later(
                    self._bs_header_timeout_s, self._bs_header_timeout
                )
        elif not awaiting:
            self._bs_header_timer.cancel()
            self._bs_header_timer = None

    def _bs_header_timeout(self) -> None:
        self._bs_header_timer = None
        if self._bs_awaiting_headers():
            peer = self.transport.get_extra_info("peername") if self.transport else None
            log.info(
                "request headers not complete within %gs from %s; closing the connection "
                "(gateway.header_timeout_s)",
                self._bs_header_timeout_s,
                clip(peer, 80),
            )
            self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._bs_header_timer is not None:
            self._bs_header_timer.cancel()
            self._bs_header_timer = None
        super().connection_lost(exc)


class _GuardedServer(web.Server):
    header_timeout_s: float = 10.0

    def __call__(self) -> RequestHandler:
        return _GuardedRequestHandler(
            self, loop=self._loop, header_timeout_s=self.header_timeout_s, **self._kwargs
        )


class GatewayRunner(web.AppRunner):
    """The app runner with the gateway's connection limits (header/idle timeouts)."""

    def __init__(self, app: web.Application, settings: Settings, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout_s = settings.gateway.header_timeout_s

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _GuardedServer  # same state; only the handler class differs
        cast(_GuardedServer, server).header_timeout_s = self._header_timeout_s
        return server


def make_runner(app: web.Application, settings: Settings, **kwargs: Any) -> GatewayRunner:
    """The runner every gateway uses: idle connections close after gateway.idle_timeout_s,
    partial request heads after gateway.header_timeout_s; a stream's handler is cancelled
    when its client goes away, so idle streams never linger."""
    kwargs.setdefault("handle_signals", False)
    kwargs.setdefault("access_log_class", _AccessLog)
    return GatewayRunner(
        app,
        settings,
        handler_cancellation=True,
        keepalive_timeout=settings.gateway.idle_timeout_s,
        **kwargs,
    )


GC_SECONDS = Counter(
    "bucketsync_gateway_gc_seconds",
    "CPU seconds spent in the garbage collector, by generation collected",
    ["generation"],
)


def _time_gc() -> None:
    """Count the collector's CPU time in ``bucketsync_gateway_gc_seconds`` (per generation)."""
    counters = [GC_SECONDS.labels(str(g)) for g in range(3)]
    started = [0.0]
    clock = time.thread_time

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = clock()
        else:
            counters[info["generation"]].inc(clock() - started[0])

    gc.callbacks.append(callback)


def _serve_worker(settings: Settings, host: str, port: int, reuse_port: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    async def go() -> None:
        app = await build_app(settings)
        runner = make_runner(app, settings, shutdown_timeout=5.0)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port, backlog=4096)
        await site.start()
        # the collector scans every tracked object on a full pass (~0.5 s at 10k streams):
        # startup objects leave its scans, and passes come at 20k allocations, not 700
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 50, 50)
        _time_gc()
        bound = port or next((a[1] for a in runner.addresses if isinstance(a, tuple)), port)
        log.info("gateway listening on http://%s:%s (pid %s)", host, bound, os.getpid())
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
        # as the server's own bind does (asyncio sets it): connections of a gateway that
        # just died linger in TIME_WAIT and must not keep its successor from starting
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UserError(
                f"gateway address {host}:{port} is not available ({exc.strerror}); "
                "set gateway.host / gateway.port or pass --host / --port"
            ) from None


def main(
    settings: Settings,
    *,
    host: str | None = None,
    port: int | None = None,
    workers: int | None = None,
) -> int:
    """``bucketsync gateway [--host H] [--port P] [--workers N]`` (defaults: ``gateway.*``)."""
    g = settings.gateway
    host = host or g.host
    port = g.port if port is None else port
    workers = g.workers if workers is None else workers
    if port == 0 and workers > 1:
        from bucketsync.errors import UserError

        raise UserError("gateway port 0 (any free port) needs one worker; set gateway.port")
    load_sync_rules(settings)  # refuse bad rules before binding anything
    refuse_unusable_auth(settings.auth)  # and settings that accept no token
    refuse_other_layout(settings)  # and a store this version cannot serve
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
