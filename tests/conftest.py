"""Shared pytest fixtures for every test module. Keep these names stable.

- ``stack`` (session): the local Kafka + Redis stack, started if needed
  (``bucketsync.stack.ensure_up`` with the repo's config, so ``.stack/`` under the repo
  and any ``BUCKETSYNC_*`` overrides apply). Has ``bootstrap_servers``, ``redis_url``
  and ``settings``. ``BUCKETSYNC_TEST_NO_STACK=1`` skips every test that needs it.
- ``ns``: a unique namespace per test: ``prefix`` (Redis key prefix ``t-<hex8>``),
  ``topic(name)`` (``t-<hex8>.<name>``), ``group_id``. Teardown deletes Redis keys
  under the prefix and the test's topics (best effort).
- ``redis_client``: ``redis.Redis`` on the stack (bytes in, bytes out).
- ``make_settings(**sections)``: a validated ``Settings`` pointing at the stack, with
  ``redis.prefix``, ``kafka.group_id`` and ``kafka.dead_letter_topic`` from ``ns``;
  keyword arguments override per section, e.g.
  ``make_settings(kafka={"topics": [t]}, sync_rules=str(path))``.
- ``create_topic(name, partitions=1, config=None)``: creates a topic (the name is used
  as given; pass ``ns.topic(...)``), waits until every partition has a leader, returns
  the name; the topic is deleted at teardown.

Tests that use ``stack``, ``redis_client``, ``make_settings`` or ``create_topic`` are
marked ``stack`` automatically (``-m "not stack"`` deselects them).
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import redis

    from bucketsync.config import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
NO_STACK_ENV = "BUCKETSYNC_TEST_NO_STACK"
STACK_FIXTURES = frozenset({"stack", "redis_client", "make_settings", "create_topic"})


def _no_stack() -> bool:
    return os.environ.get(NO_STACK_ENV, "").strip() not in ("", "0")


@contextlib.contextmanager
def hidden_test_env() -> Iterator[None]:
    """Hide ``BUCKETSYNC_TEST_*`` (they steer the tests; the config would refuse them)."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("BUCKETSYNC_TEST_")}
    try:
        yield
    finally:
        os.environ.update(saved)


@pytest.hookimpl(tryfirst=True)  # before -m selection sees the markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason=f"{NO_STACK_ENV}=1: tests that need the local stack are skipped")
    for item in items:
        if STACK_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.stack)
        if _no_stack() and item.get_closest_marker("stack") is not None:
            item.add_marker(skip)


# --------------------------------------------------------------------------- stack


@dataclass(frozen=True)
class StackInfo:
    bootstrap_servers: str
    redis_url: str
    #: The stack's settings (the repo's bucketsync.yaml + env overrides).
    settings: Settings

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


_stack_info: StackInfo | None = None


@pytest.fixture(scope="session")
def stack() -> StackInfo:
    global _stack_info
    if _no_stack():
        pytest.skip(f"{NO_STACK_ENV}=1: tests that need the local stack are skipped")
    if _stack_info is None:
        from bucketsync.config import ConfigError, load_settings
        from bucketsync.errors import UserError
        from bucketsync.stack import ensure_up

        old_cwd = Path.cwd()
        os.chdir(REPO_ROOT)
        try:
            with hidden_test_env():
                settings = load_settings(None)
                addrs = ensure_up(settings)
        except (UserError, ConfigError) as exc:
            pytest.fail(
                f"could not start the local stack: {exc}\n"
                f"(fix it, or set {NO_STACK_ENV}=1 to skip the tests that need it)",
                pytrace=False,
            )
        finally:
            os.chdir(old_cwd)
        _stack_info = StackInfo(addrs["kafka"], addrs["redis"], settings)
    return _stack_info


# --------------------------------------------------------------------------- namespace


@dataclass
class Namespace:
    hex: str
    topics: list[str] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return f"t-{self.hex}"

    @property
    def group_id(self) -> str:
        return f"{self.prefix}-group"

    def topic(self, name: str) -> str:
        topic = f"{self.prefix}.{name}"
        self.track(topic)
        return topic

    def track(self, topic: str) -> None:
        if topic not in self.topics:
            self.topics.append(topic)


def _admin(bootstrap: str) -> Any:
    import logging

    from confluent_kafka.admin import AdminClient

    quiet = logging.getLogger("tests.librdkafka")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    conf: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": quiet}
    return AdminClient(conf)


def _cleanup(info: StackInfo, ns: Namespace) -> None:
    import redis as redis_lib

    with contextlib.suppress(Exception):
        client = redis_lib.Redis.from_url(info.redis_url)
        try:
            batch: list[bytes] = []
            for key in client.scan_iter(match=f"{ns.prefix}*", count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    client.unlink(*batch)
                    batch.clear()
            if batch:
                client.unlink(*batch)
        finally:
            client.close()
    with contextlib.suppress(Exception):
        admin = _admin(info.bootstrap_servers)
        existing = set(admin.list_topics(timeout=5).topics)
        doomed = [t for t in existing if t in ns.topics or t.startswith(f"{ns.prefix}.")]
        if doomed:
            for fut in admin.delete_topics(doomed, operation_timeout=10).values():
                with contextlib.suppress(Exception):
                    fut.result(timeout=15)
        for fut in admin.delete_consumer_groups([ns.group_id], request_timeout=5).values():
            with contextlib.suppress(Exception):
                fut.result(timeout=10)


@pytest.fixture
def ns() -> Iterator[Namespace]:
    namespace = Namespace(uuid.uuid4().hex[:8])
    yield namespace
    if _stack_info is not None:  # nothing to clean if the stack was never touched
        _cleanup(_stack_info, namespace)


# --------------------------------------------------------------------------- clients and settings


@pytest.fixture
def redis_client(stack: StackInfo) -> Iterator[redis.Redis]:
    import redis as redis_lib

    client = redis_lib.Redis.from_url(stack.redis_url)
    yield client
    client.close()


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture
def make_settings(stack: StackInfo, ns: Namespace) -> Callable[..., Settings]:
    from bucketsync.config import Settings

    def factory(**sections: Any) -> Settings:
        stack_section = stack.settings.stack.model_dump()
        stack_section["state_dir"] = str(stack.settings.state_dir.resolve())
        base: dict[str, Any] = {
            "kafka": {
                "bootstrap_servers": stack.bootstrap_servers,
                "group_id": ns.group_id,
                "dead_letter_topic": ns.topic("dead-letter"),
            },
            "redis": {"url": stack.redis_url, "prefix": ns.prefix},
            "stack": stack_section,
        }
        merged = _deep_merge(base, sections)
        with hidden_test_env():
            # relative paths (e.g. sync_rules) resolve against the repo root
            return Settings(config_dir=REPO_ROOT, **merged)

    return factory


@pytest.fixture
def gw_settings(make_settings: Callable[..., Settings], tmp_path: Path) -> Callable[..., Settings]:
    """Settings for an in-process gateway on the protocol tests' rules (``make(**gateway)``:
    gateway keys over a 20 s keepalive)."""
    from tests.test_gateway_protocol import RULES

    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)

    def make(**gateway: Any) -> Settings:
        return make_settings(sync_rules=str(rules), gateway={"keepalive_s": 20, **gateway})

    return make


@pytest.fixture
def create_topic(stack: StackInfo, ns: Namespace) -> Callable[..., str]:
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import NewTopic

    admin = _admin(stack.bootstrap_servers)

    def create(name: str, partitions: int = 1, config: dict[str, str] | None = None) -> str:
        ns.track(name)
        new = NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})
        try:
            admin.create_topics([new], operation_timeout=15)[name].result(timeout=30)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
        deadline = time.monotonic() + 30
        while True:
            md = admin.list_topics(topic=name, timeout=5).topics.get(name)
            if (
                md is not None
                and md.error is None
                and len(md.partitions) >= partitions
                and all(p.leader >= 0 for p in md.partitions.values())
            ):
                return name
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {name} has no leader for every partition after 30 s")
            time.sleep(0.1)

    return create
