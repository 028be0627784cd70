"""pytest fixtures for real Kafka and PostgreSQL (entry point ``kfast`` in group ``pytest11``).

Session-scoped services start lazily, the first time a test asks for them, and stop at the end of
the session (also after Ctrl-C; an ``atexit`` hook and a parent-death signal catch crashes).  When a
service cannot start, every test that needs it ERRORs with the reason: nothing is skipped.

Fixtures:

- ``kafka_broker`` (session): :class:`kfast.testing.KafkaBroker` (``.bootstrap``,
  ``.create_topic``, ``.produce``, ``.restart``, ``.stop``, ``.start``).
- ``kafka_bootstrap`` (session): ``"127.0.0.1:PORT"``.
- ``kafka_consumer_config`` (session): ``kafka_consumer_config(group, **overrides) -> dict``.
- ``pg_server`` (session): :class:`kfast.testing.PostgresServer` (``.dsn``, ``.stop``,
  ``.start``, ``.restart``).  ``pg_dsn`` (session): its DSN.
- ``schema_registry`` (session): :class:`kfast.testing.registry.SchemaRegistry` (Apicurio
  Registry; ``.url`` is its Confluent-compatible API, ``.stop``, ``.start``, ``.restart``).
- ``unique_topic``, ``unique_group`` (function): fresh names per test.

A test that leaves a session service stopped gets it started again after it finishes, so one
failing "broker down" test does not cascade into the rest of the session.
"""

from __future__ import annotations

import re
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from kfast.testing.kafka import KAFKA_VERSION, KafkaBroker
from kfast.testing.postgres import PostgresServer
from kfast.testing.registry import REGISTRY_VERSION, SchemaRegistry

__all__ = [
    "kafka_bootstrap",
    "kafka_broker",
    "kafka_consumer_config",
    "pg_dsn",
    "pg_server",
    "schema_registry",
    "unique_group",
    "unique_name",
    "unique_topic",
]

_BROKER = pytest.StashKey[KafkaBroker]()
_PG = pytest.StashKey[PostgresServer]()
_REGISTRY = pytest.StashKey[SchemaRegistry]()
_REPORT = pytest.StashKey[list[str]]()
_OLD_SIGTERM = pytest.StashKey[Any]()


def _teardown_on_sigterm(config: pytest.Config) -> None:
    """Make SIGTERM behave like Ctrl-C (pytest then tears the services down) while they run.

    Python's default SIGTERM action exits without running ``finally`` blocks or ``atexit``; the
    servers would still die (parent-death signal) but their temp dirs would stay.  Only the
    default handler is replaced, and only from the main thread.
    """
    if _OLD_SIGTERM in config.stash or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum} (SIGTERM)")

    config.stash[_OLD_SIGTERM] = signal.signal(signal.SIGTERM, on_sigterm)


def pytest_unconfigure(config: pytest.Config) -> None:
    old = config.stash.get(_OLD_SIGTERM, None)
    if old is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, old)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "integration: needs the real Kafka broker and/or PostgreSQL started by kfast.testing",
    )
    config.stash[_REPORT] = []


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    lines = config.stash.get(_REPORT, [])
    if lines:
        terminalreporter.write_sep("-", "kfast.testing services")
        for line in lines:
            terminalreporter.write_line(line)


def unique_name(prefix: str, nodename: str, max_len: int = 120) -> str:
    """``<prefix>-<test name slug>-<8 hex>``: legal as a Kafka topic and group id."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", nodename).strip("-._") or "test"
    suffix = uuid.uuid4().hex[:8]
    room = max_len - len(prefix) - len(suffix) - 2
    return f"{prefix}-{slug[:room]}-{suffix}"


_Svc = TypeVar("_Svc", KafkaBroker, PostgresServer, SchemaRegistry)


def _session_service(
    request: pytest.FixtureRequest,
    make: Callable[[], _Svc],
    key: pytest.StashKey[_Svc],
    describe: Callable[[_Svc], str],
) -> Iterator[_Svc]:
    """Start a session-wide service, report where it runs, close it at the end (or on failure)."""
    _teardown_on_sigterm(request.config)
    service = make()
    try:
        service.start()
    except BaseException:
        service.close()
        raise
    request.config.stash[key] = service
    request.config.stash[_REPORT].append(describe(service))
    try:
        yield service
    finally:
        del request.config.stash[key]
        service.close()


def _describe_broker(broker: KafkaBroker) -> str:
    if broker.external:
        return f"external broker {broker.bootstrap} (KFAST_TEST_BOOTSTRAP)"
    t = broker.timings
    return (
        f"Apache Kafka {KAFKA_VERSION} on {broker.bootstrap}: ready in "
        f"{t.get('total_s', 0):.1f} s (jars {t.get('fetch_s', 0):.1f} s, format "
        f"{t.get('format_s', 0):.1f} s, start {t.get('start_s', 0):.1f} s)"
    )


def _describe_pg(server: PostgresServer) -> str:
    if server.external:
        return "external PostgreSQL (KFAST_TEST_PG_DSN)"
    return (
        f"PostgreSQL on 127.0.0.1:{server.port}: ready in "
        f"{server.timings.get('start_s', 0):.1f} s (initdb "
        f"{server.timings.get('initdb_s', 0):.1f} s)"
    )


def _describe_registry(registry: SchemaRegistry) -> str:
    if registry.external:
        return f"external schema registry {registry.url} (KFAST_TEST_REGISTRY)"
    t = registry.timings
    return (
        f"Apicurio Registry {REGISTRY_VERSION} on {registry.url}: ready in "
        f"{t.get('total_s', 0):.1f} s (fetch {t.get('fetch_s', 0):.1f} s, start "
        f"{t.get('start_s', 0):.1f} s)"
    )


@pytest.fixture(scope="session")
def kafka_broker(request: pytest.FixtureRequest) -> Iterator[KafkaBroker]:
    yield from _session_service(request, KafkaBroker, _BROKER, _describe_broker)


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: KafkaBroker) -> str:
    return kafka_broker.bootstrap


@pytest.fixture(scope="session")
def kafka_consumer_config(kafka_broker: KafkaBroker) -> Callable[..., dict[str, Any]]:
    """``kafka_consumer_config(group, **overrides)``: see :func:`kfast.testing.kafka.consumer_config`."""
    return kafka_broker.consumer_config


@pytest.fixture(scope="session")
def pg_server(request: pytest.FixtureRequest) -> Iterator[PostgresServer]:
    yield from _session_service(request, PostgresServer, _PG, _describe_pg)


@pytest.fixture(scope="session")
def pg_dsn(pg_server: PostgresServer) -> str:
    return pg_server.dsn


@pytest.fixture(scope="session")
def schema_registry(request: pytest.FixtureRequest) -> Iterator[SchemaRegistry]:
    yield from _session_service(request, SchemaRegistry, _REGISTRY, _describe_registry)


@pytest.fixture
def unique_topic(request: pytest.FixtureRequest) -> str:
    return unique_name("t", request.node.name)


@pytest.fixture
def unique_group(request: pytest.FixtureRequest) -> str:
    return unique_name("g", request.node.name)


@pytest.fixture(autouse=True)
def _kfast_restore_services(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test, start again a session service that the test left stopped."""
    yield
    broker = request.config.stash.get(_BROKER, None)
    if broker is not None and not broker.running:
        broker.start()
    server = request.config.stash.get(_PG, None)
    if server is not None and not server.running:
        server.start()
    registry = request.config.stash.get(_REGISTRY, None)
    if registry is not None and not registry.running:
        registry.start()
