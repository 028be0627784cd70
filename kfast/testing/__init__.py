"""Real services for tests, benchmarks and demos: Kafka, PostgreSQL and a schema registry.

``KafkaBroker`` runs a single-node KRaft broker from Apache Kafka's jars (fetched once with Maven),
``PostgresServer`` a throwaway cluster made with the machine's PostgreSQL server programs.  Both are
context managers; both use an existing service instead when ``KFAST_TEST_BOOTSTRAP`` /
``KFAST_TEST_PG_DSN`` is set.  The pytest plugin (``kfast.testing.pytest_plugin``) wraps them in
fixtures.  ``SchemaRegistry`` runs Apicurio Registry (Confluent-compatible API; override:
``KFAST_TEST_REGISTRY``).  See docs/testing.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kfast.testing.kafka import KafkaBroker
    from kfast.testing.postgres import PostgresServer
    from kfast.testing.registry import SchemaRegistry

__all__ = ["KafkaBroker", "PostgresServer", "SchemaRegistry"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `python -m kfast.testing.kafka` does not import its own module twice.
    if name == "KafkaBroker":
        from kfast.testing.kafka import KafkaBroker

        return KafkaBroker
    if name == "PostgresServer":
        from kfast.testing.postgres import PostgresServer

        return PostgresServer
    if name == "SchemaRegistry":
        from kfast.testing.registry import SchemaRegistry

        return SchemaRegistry
    raise AttributeError(f"module 'kfast.testing' has no attribute {name!r}")
