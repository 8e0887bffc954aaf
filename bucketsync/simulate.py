"""``bucketsync simulate``: simulated PowerSync clients against running gateways.

The load-test client of the compose topology (``docker compose --profile loadtest up``):
``--clients`` streams spread over ``--users`` users (dev tokens signed with the configured
``auth.hs256_secret``) and over the ``--url`` gateways. Every client is a
:class:`bucketsync.simclient.ClientState`, so checksums are checked at every
``checkpoint_complete`` the way the official client does. A client whose stream ends
reconnects with its ``after`` positions; with ``--reconnect-s`` each stream is also closed
and resumed after that many seconds. Prints a status line every ``--report-s`` and a
summary at the end; exits 1 on any checksum mismatch or protocol error, or when no client
completed a checkpoint (gateway unreachable, every request refused: nothing was verified).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

from bucketsync.config import Settings
from bucketsync.errors import UserError
from bucketsync.simclient import ClientState, stream_once
from bucketsync.tokens import make_dev_token


@dataclass
class _Totals:
    connects: int = 0
    open_streams: int = 0
    errors: int = 0
    non_200: int = 0
    error_kinds: Counter[str] = field(default_factory=Counter)


async def simulate(
    settings: Settings,
    urls: list[str],
    clients: int,
    users: int,
    duration_s: float,
    ramp_per_s: float,
    reconnect_s: float,
    report_s: float,
) -> int:
    tokens = [
        make_dev_token(settings, sub=f"u{u + 1}", ttl_s=86_400) for u in range(min(users, clients))
    ]
    states = [ClientState() for _ in range(clients)]
    totals = _Totals()
    stop = asyncio.Event()
    rng = random.Random(7)

    async def sleep(seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)

    async def client(i: int, session: aiohttp.ClientSession) -> None:
        url = urls[i % len(urls)]
        while not stop.is_set():
            totals.connects += 1
            totals.open_streams += 1
            timeout = reconnect_s * (0.5 + rng.random()) if reconnect_s > 0 else None
            try:
                status = await stream_once(
                    session,
                    url,
                    tokens[i % len(tokens)],
                    states[i],
                    timeout_s=timeout,
                    client_id=f"sim-{i}",
                    on_line=lambda _kind, _state: stop.is_set(),
                )
                if status != 200:
                    totals.non_200 += 1
                    await sleep(1.0 + rng.random())
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                totals.errors += 1
                totals.error_kinds[type(exc).__name__] += 1
                await sleep(1.0 + rng.random())
            finally:
                totals.open_streams -= 1

    def line(t0: float) -> str:
        return (
            f"{time.monotonic() - t0:7.1f}s streams {totals.open_streams:,} "
            f"connects {totals.connects:,} checkpoints "
            f"{sum(s.completed for s in states):,} ops {sum(s.ops for s in states):,} "
            f"mismatches {sum(len(s.mismatches) for s in states)} "
            f"protocol errors {sum(len(s.protocol_errors) for s in states)} "
            f"non-200 {totals.non_200} errors {totals.errors}"
        )

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    t0 = time.monotonic()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = []
        next_report = t0 + report_s
        for i in range(clients):
            tasks.append(asyncio.create_task(client(i, session)))
            if ramp_per_s > 0:
                await asyncio.sleep(1.0 / ramp_per_s)
            if time.monotonic() >= next_report:
                print(line(t0), flush=True)
                next_report += report_s
        end = t0 + duration_s if duration_s > 0 else float("inf")
        while (remaining := end - time.monotonic()) > 0:
            await asyncio.sleep(min(report_s, remaining))
            print(line(t0), flush=True)
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    print("done: " + line(t0), flush=True)
    if totals.error_kinds:
        print("connection errors: " + ", ".join(f"{k} {n}" for k, n in totals.error_kinds.items()))
    bad = sum(len(s.mismatches) + len(s.protocol_errors) for s in states)
    if not any(s.completed for s in states):
        print(f"no client completed a checkpoint from {', '.join(urls)}: nothing was verified")
        return 1
    return 1 if bad else 0


def main(
    settings: Settings,
    *,
    url: list[str] | None = None,
    clients: int = 1000,
    users: int = 100,
    duration: float = 0,
    ramp: float = 200.0,
    reconnect_s: float = 0,
    report_s: float = 10.0,
) -> int:
    """``bucketsync simulate``: ``clients`` protocol clients against the gateway(s)."""
    urls = url or [f"http://127.0.0.1:{settings.gateway.port}"]
    if clients < 1 or users < 1:
        raise UserError("--clients and --users must be at least 1")
    return asyncio.run(
        simulate(
            settings,
            [u.rstrip("/") for u in urls],
            clients=clients,
            users=users,
            duration_s=duration,
            ramp_per_s=ramp,
            reconnect_s=reconnect_s,
            report_s=report_s,
        )
    )
