"""The demo web page (web/, the official PowerSync web SDK) in Debian's headless Chromium.

The whole chain runs as in ``bucketsync demo``: the demo source writes Debezium events to
Kafka, a processor process applies them with the demo's sync rules (sync-rules.demo.yaml:
one bucket per list, for its owner and its members), the gateway serves the streams, and
the demo backend (bucketsync/demo_web.py) serves the built page, mints tokens and turns the
pages' uploads into Debezium events. Two pages as two users, each in its own browser
context (its own IndexedDB database, like another device):

* rows appear in both pages (time to first synced rows is measured and printed);
* u1 shares a list with u2: the list appears in u2's open page; unsharing hides it again;
* todos added in u1's page appear in u2's page within 2 s (write -> other-tab latency,
  measured and printed); u1's own optimistic row never disappears while its write goes
  round through Kafka (the write checkpoint holds it);
* no checksum error in either page (SDK log or console); no page error.

A screenshot of each page and a JSON record of the numbers go to ``test-artifacts/``.
Nothing downloads a browser: Playwright drives the system ``chromium`` (``apt-get install
chromium``). Without it (or without Playwright, or npm to build the page) the test is
skipped loudly, and fails instead when BUCKETSYNC_TEST_REQUIRE_BROWSER=1 (scripts/test).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from bucketsync import demo_web
from tests.gateway_helpers import running_gateway
from tests.processes import start_processor, stop, write_config

if TYPE_CHECKING:
    from playwright.async_api import ConsoleMessage, Error

pytestmark = [pytest.mark.stack, pytest.mark.browser]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
REQUIRE_ENV = "BUCKETSYNC_TEST_REQUIRE_BROWSER"
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser")


def _unavailable(reason: str) -> None:
    msg = f"BROWSER TEST NOT RUN: {reason}"
    if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
        pytest.fail(msg)
    pytest.skip(msg)


def _chromium() -> str:
    explicit = os.environ.get("BUCKETSYNC_TEST_CHROMIUM")
    for name in (explicit,) if explicit else CHROMIUM_CANDIDATES:
        path = shutil.which(name) if name else None
        if path:
            return path
    _unavailable("no system chromium on PATH (apt-get install chromium)")
    raise AssertionError("unreachable")


def _build_page() -> None:
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-web.sh")], capture_output=True, text=True
    )
    if r.returncode != 0 or not demo_web.web_built():
        _unavailable(f"the demo page does not build: {r.stderr.strip()[-2000:]}")


def _console_into(into: list[str]) -> Callable[[ConsoleMessage], None]:
    return lambda m: into.append(f"{m.type}: {m.text}")


def _errors_into(into: list[str], user: str) -> Callable[[Error], None]:
    return lambda e: into.append(f"{user}: {e}")


async def _wait(page: Any, expr: str, arg: Any = None, timeout_s: float = 30.0) -> float:
    """Waits until ``expr`` (a JS function of ``arg``) is truthy in the page; returns seconds."""
    t0 = time.perf_counter()
    await page.wait_for_function(expr, arg=arg, timeout=timeout_s * 1000, polling=10)
    return time.perf_counter() - t0


async def test_two_users_share_a_list_and_see_each_others_todos_live(
    make_settings, create_topic, ns, tmp_path: Path
) -> None:
    chromium = _chromium()
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        _unavailable("playwright (Python) is not installed: pip install -e '.[dev]'")
    _build_page()

    topics = [create_topic(ns.topic(f"app.public.{t}")) for t in demo_web.TABLES]
    s = make_settings(
        kafka={"topics": topics},
        sync_rules=str(ROOT / "sync-rules.demo.yaml"),
        processor={"batch_max_events": 200, "batch_max_wait_ms": 10, "metrics_port": 0},
        compaction={"interval_s": 0},
    )
    source = demo_web.DemoSource(s, users=3, seed=7)
    assert source.sharing
    source.seed(todos_per_user=4)
    stop_activity = threading.Event()
    activity = threading.Thread(target=source.run_activity, args=(stop_activity, 2.0), daemon=True)

    cfg = write_config(tmp_path, s, "bucketsync")
    log = (tmp_path / "processor.log").open("wb")
    proc = start_processor(cfg, "kafka", log)
    console: dict[str, list[str]] = {"u1": [], "u2": []}
    page_errors: list[str] = []
    numbers: dict[str, Any] = {}
    try:
        async with running_gateway(s, with_position=True) as gateway_url:
            server = demo_web.WebServer(
                demo_web.WebDemo(s, source, gateway_url), "127.0.0.1", 0
            ).start()
            activity.start()  # other people editing their own lists meanwhile
            try:
                async with async_playwright() as pw:
                    browser = await pw.chromium.launch(
                        executable_path=chromium,
                        headless=True,
                        args=["--no-sandbox", "--disable-dev-shm-usage"],
                    )
                    pages = {}
                    for user in ("u1", "u2"):
                        ctx = await browser.new_context(viewport={"width": 1280, "height": 760})
                        page = await ctx.new_page()
                        page.on("console", _console_into(console[user]))
                        page.on("pageerror", _errors_into(page_errors, user))
                        await page.goto(f"{server.url}/?user={user}")
                        pages[user] = page
                    a, b = pages["u1"], pages["u2"]

                    # rows appear in both pages
                    first: dict[str, int] = {}
                    db_ready: dict[str, int] = {}
                    for user, page in pages.items():
                        await _wait(
                            page,
                            "() => window.bucketsyncDemo?.firstSyncedRowsMs != null",
                            timeout_s=60,
                        )
                        first[user] = await page.evaluate("window.bucketsyncDemo.firstSyncedRowsMs")
                        db_ready[user] = await page.evaluate(
                            "window.bucketsyncDemo.databaseReadyMs"
                        )
                        own = await page.evaluate(
                            "(u) => window.bucketsyncDemo.rows.todos.filter(t => t.list_id === `l-${u}`).length",
                            user,
                        )
                        assert own >= 1, f"{user}: no todos of its own list"
                    numbers["first_synced_rows_ms"] = first
                    numbers["database_ready_ms"] = db_ready

                    # sharing: the list appears in u2's open page
                    assert not await b.evaluate(
                        "() => window.bucketsyncDemo.rows.lists.some(l => l.id === 'l-u1-2')"
                    )
                    await a.evaluate("window.bucketsyncDemo.share('l-u1-2', 'u2')")
                    numbers["share_to_list_shown_s"] = round(
                        await _wait(
                            b, "() => window.bucketsyncDemo.rows.lists.some(l => l.id === 'l-u1-2')"
                        ),
                        3,
                    )

                    # writes: u1 adds todos to the shared list; u2 sees each one
                    latencies = []
                    for i in range(3):
                        # counts samples where u1's row, once shown, is missing again
                        await a.evaluate(
                            """() => { const d = window.bucketsyncDemo; d.__gone = 0;
                                d.__seen = false; d.__watch = null; clearInterval(d.__iv);
                                d.__iv = setInterval(() => { if (!d.__watch) return;
                                  const here = d.rows.todos.some(t => t.id === d.__watch);
                                  if (here) d.__seen = true; else if (d.__seen) d.__gone++;
                                }, 5); }"""
                        )
                        tid = await a.evaluate(
                            "async (n) => { const d = window.bucketsyncDemo;"
                            " const id = await d.addTodo(`shared todo ${n}`, 'l-u1-2');"
                            " d.__watch = id; return id; }",
                            i,
                        )
                        t0 = time.perf_counter()
                        await b.wait_for_function(
                            "(id) => window.bucketsyncDemo.rows.todos.some(t => t.id === id)",
                            arg=tid,
                            timeout=20_000,
                            polling=10,
                        )
                        latencies.append(time.perf_counter() - t0)
                        # u1's row has come back through CDC: its upload is done and the
                        # write checkpoint passed; the optimistic row was never missing
                        await _wait(
                            a,
                            "() => { const s = window.bucketsyncDemo.db.currentStatus;"
                            " return !s.dataFlowStatus.uploading; }",
                        )
                        await asyncio.sleep(0.3)
                        seen, gone = await a.evaluate(
                            "[window.bucketsyncDemo.__seen, window.bucketsyncDemo.__gone]"
                        )
                        assert seen and gone == 0, (
                            f"u1's own todo {tid} disappeared while its write went round"
                        )
                    numbers["write_to_other_tab_s"] = [round(x, 3) for x in latencies]
                    crud_left = await a.evaluate(
                        "async () => (await window.bucketsyncDemo.db.getAll('SELECT count(*) AS n FROM ps_crud'))[0].n"
                    )
                    assert crud_left == 0

                    await asyncio.sleep(0.5)
                    ARTIFACTS.mkdir(exist_ok=True)
                    shots = {}
                    for user, page in pages.items():
                        shots[user] = ARTIFACTS / f"web-demo-{user}.png"
                        await page.screenshot(path=str(shots[user]))
                    numbers["screenshots"] = [str(p) for p in shots.values()]

                    # unsharing hides the list and its todos again (the bucket goes)
                    await a.evaluate("window.bucketsyncDemo.unshare('l-u1-2', 'u2')")
                    numbers["unshare_to_list_hidden_s"] = round(
                        await _wait(
                            b,
                            "() => { const r = window.bucketsyncDemo.rows;"
                            " return !r.lists.some(l => l.id === 'l-u1-2')"
                            " && !r.todos.some(t => t.list_id === 'l-u1-2'); }",
                        ),
                        3,
                    )

                    for user, page in pages.items():
                        assert await page.evaluate("window.bucketsyncDemo.checksumErrors") == []
                        status = await page.evaluate("window.bucketsyncDemo.status")
                        assert status["connected"] and status["error"] is None, (user, status)
                    await browser.close()
            finally:
                stop_activity.set()
                activity.join(10)
                server.stop()
    finally:
        stop(proc)
        log.close()

    numbers["write_to_other_tab_median_s"] = round(statistics.median(latencies), 3)
    (ARTIFACTS / "web-demo.json").write_text(json.dumps(numbers, indent=2))
    print(
        "\nweb demo (headless chromium, official PowerSync web SDK): "
        f"first synced rows {first['u1']} ms (u1) / {first['u2']} ms (u2) after page start "
        f"(SDK database ready at {db_ready['u1']} / {db_ready['u2']} ms); "
        f"share -> list shown {numbers['share_to_list_shown_s']} s; "
        f"write -> other tab {', '.join(f'{x:.3f}' for x in latencies)} s "
        f"(median {numbers['write_to_other_tab_median_s']} s); "
        f"unshare -> hidden {numbers['unshare_to_list_hidden_s']} s; "
        f"screenshots {', '.join(numbers['screenshots'])}"
    )
    checksum_lines = [m for msgs in console.values() for m in msgs if "checksum" in m.lower()]
    assert checksum_lines == [], checksum_lines
    assert page_errors == [], page_errors
    assert statistics.median(latencies) < 2.0, latencies
    assert max(latencies) < 4.0, latencies
