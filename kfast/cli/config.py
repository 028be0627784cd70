"""``kfast run`` configuration: a TOML file -> :class:`kfast.Pipeline`.

``pipeline.toml`` holds the same fields as :class:`kfast.Pipeline`::

    topics = ["orders"]
    memory_limit = "256MiB"
    drain_timeout = 30          # optional; also revoke_timeout, commit_interval,
                                # poll_batch, poll_timeout, partitions, metrics_port,
                                # startup_timeout, source ("confluent" | "compiled"),
                                # metadata (["topic", "partition", "offset", ...] or
                                # {offset = "column_name", ...}: Kafka coordinate columns)

    [kafka]                     # librdkafka settings, passed through
    "bootstrap.servers" = "127.0.0.1:9092"
    "group.id" = "orders-to-pg"

    [decoder]
    type = "avro"               # avro | protobuf | confluent
    schema = "orders.avsc"      # avro: path (relative to this file), JSON string or table
    # writer_schema = "orders-v1.avsc"
    # protobuf: message = "package.module:MessageClass"
    # confluent: registry_url = "http://registry:8081", reader_schema = "orders.avsc" or
    #            subject = "orders-value"; [decoder.registry] "basic.auth.user.info" = "u:p",
    #            timeout = 5 (confluent-kafka SchemaRegistryClient settings)

    [sink]
    type = "postgres"           # postgres | null | callable
    dsn = "postgresql://..."    # postgres: the keyword arguments of PostgresSink
    table = "orders"
    mode = "copy"
    # callable: function = "package.module:function"

    [batch]                     # BatchPolicy
    [buffer]                    # BufferPolicy
    [retry]                     # RetryPolicy
    [dlq]                       # DeadLetterPolicy (topic = "orders.dlq", ...)

A file that cannot be used fails before anything connects, with a message
naming the field (``pipeline.toml: [batch].max_rows: ...``).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

from kfast.avro import AvroDecoder
from kfast.dlq import DeadLetterPolicy
from kfast.errors import ConfigError
from kfast.retry import RetryPolicy
from kfast.runtime.pipeline import Pipeline
from kfast.runtime.policies import BatchPolicy, BufferPolicy
from kfast.sinks import CallableSink, NullSink
from kfast.sinks.postgres import PostgresSink

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10: the tomli backport has the same API
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

__all__ = ["build_pipeline", "load_pipeline"]

_PIPELINE_KEYS = {
    "topics",
    "memory_limit",
    "drain_timeout",
    "revoke_timeout",
    "commit_interval",
    "poll_batch",
    "poll_timeout",
    "partitions",
    "metrics_port",
    "startup_timeout",
    "source",
    "metadata",
}
_SECTIONS = {"kafka", "decoder", "sink", "batch", "buffer", "retry", "dlq"}


def _import_object(spec: str, field: str) -> Any:
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ConfigError(f"{field}: expected 'package.module:name', got {spec!r}")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"{field}: cannot import {module!r}: {e}") from None
    for part in name.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{field}: {module!r} has no attribute {name!r}") from None
    return obj


def _table(doc: dict[str, Any], name: str, required: bool = False) -> dict[str, Any] | None:
    value = doc.get(name)
    if value is None:
        if required:
            raise ConfigError(f"[{name}]: required section is missing")
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}]: expected a table, got {type(value).__name__}")
    return dict(value)


def _construct(cls: Any, kwargs: dict[str, Any], section: str) -> Any:
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"[{section}]: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"[{section}]: {e}") from None


def _schema_value(value: Any, base: Path, field: str) -> Any:
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(("{", "[", '"')):
            try:
                return json.loads(text)
            except ValueError as e:
                raise ConfigError(f"{field}: invalid JSON schema: {e}") from None
        path = (base / value).resolve()
        if not path.is_file():
            raise ConfigError(f"{field}: schema file {str(path)!r} does not exist")
        return str(path)
    raise ConfigError(
        f"{field}: expected a path, a JSON string or a table, got {type(value).__name__}"
    )


def _decoder(spec: dict[str, Any], base: Path) -> Any:
    spec = dict(spec)
    kind = spec.pop("type", "avro")
    if kind == "avro":
        if "schema" not in spec:
            raise ConfigError("[decoder].schema: required for type = 'avro'")
        schema = _schema_value(spec.pop("schema"), base, "[decoder].schema")
        if "writer_schema" in spec:
            spec["writer_schema"] = _schema_value(
                spec["writer_schema"], base, "[decoder].writer_schema"
            )
        return _construct(AvroDecoder, {"schema": schema, **spec}, "decoder")
    if kind == "protobuf":
        # protobuf and confluent need the optional protobuf package: imported only when used
        from kfast.protobuf import ProtobufDecoder

        if "message" not in spec:
            raise ConfigError("[decoder].message: required for type = 'protobuf'")
        message = _import_object(str(spec.pop("message")), "[decoder].message")
        return _construct(ProtobufDecoder, {"message": message, **spec}, "decoder")
    if kind == "confluent":
        from kfast.confluent import ConfluentDecoder, RegistryClient

        # [decoder.registry]: confluent-kafka SchemaRegistryClient's settings ("url",
        # "basic.auth.user.info", "bearer.auth.token", "ssl.ca.location", "timeout", ...);
        # registry_url is a shorthand for its "url"
        registry = spec.pop("registry", {})
        if not isinstance(registry, dict):
            raise ConfigError("[decoder].registry: expected a table of schema registry settings")
        registry = dict(registry)
        url = spec.pop("registry_url", None)
        if url is not None:
            if "url" in registry:
                raise ConfigError("[decoder]: registry_url and registry.url are the same setting")
            registry["url"] = url
        if not registry.get("url"):
            raise ConfigError("[decoder].registry_url: required for type = 'confluent'")
        try:
            registry = RegistryClient(registry)
        except ConfigError as exc:
            raise ConfigError(f"[decoder].registry: {exc}") from None
        if "reader_schema" in spec:
            spec["reader_schema"] = _schema_value(
                spec["reader_schema"], base, "[decoder].reader_schema"
            )
        return _construct(ConfluentDecoder, {"registry": registry, **spec}, "decoder")
    raise ConfigError(
        f"[decoder].type: unknown decoder {kind!r} (expected 'avro', 'protobuf' or 'confluent')"
    )


def _sink(spec: dict[str, Any]) -> Any:
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind == "null":
        if spec:
            raise ConfigError(f"[sink]: unexpected fields for type = 'null': {sorted(spec)}")
        return NullSink()
    if kind == "postgres":
        return _construct(PostgresSink, spec, "sink")
    if kind == "callable":
        if "function" not in spec:
            raise ConfigError("[sink].function: required for type = 'callable'")
        fn = _import_object(str(spec.pop("function")), "[sink].function")
        if not callable(fn):
            raise ConfigError("[sink].function: is not callable")
        if spec:
            raise ConfigError(f"[sink]: unexpected fields for type = 'callable': {sorted(spec)}")
        return CallableSink(fn)
    raise ConfigError(
        f"[sink].type: unknown sink {kind!r} (expected 'postgres', 'null' or 'callable')"
    )


def build_pipeline(doc: dict[str, Any], base: Path) -> Any:
    """A :class:`kfast.Pipeline` from a parsed TOML document (``base``: its directory)."""
    unknown = sorted(k for k in doc if k not in _PIPELINE_KEYS | _SECTIONS)
    if unknown:
        raise ConfigError(
            f"{unknown[0]}: unknown field (expected one of {sorted(_PIPELINE_KEYS | _SECTIONS)})"
        )
    kafka = _table(doc, "kafka", required=True)
    if "topics" not in doc:
        raise ConfigError("topics: required (a list of topic names)")
    kwargs: dict[str, Any] = {k: doc[k] for k in _PIPELINE_KEYS if k in doc}
    topics = kwargs.pop("topics")
    decoder = _decoder(_table(doc, "decoder", required=True) or {}, base)
    sink = _sink(_table(doc, "sink", required=True) or {})
    batch = _table(doc, "batch")
    if batch is not None:
        kwargs["batch"] = _construct(BatchPolicy, batch, "batch")
    buffer = _table(doc, "buffer")
    if buffer is not None:
        kwargs["buffer"] = _construct(BufferPolicy, buffer, "buffer")
    retry = _table(doc, "retry")
    if retry is not None:
        kwargs["retry"] = _construct(RetryPolicy, retry, "retry")
    dlq = _table(doc, "dlq")
    if dlq is not None:
        kwargs["dlq"] = _construct(DeadLetterPolicy, dlq, "dlq")
    return Pipeline(kafka or {}, topics, decoder, sink, **kwargs)


def load_pipeline(path: str | Path) -> Any:
    """Parse ``path`` and build the pipeline; ConfigError messages start with the file name."""
    p = Path(path)
    if tomllib is None:  # pragma: no cover
        raise ConfigError(f"{p}: reading TOML on Python 3.10 needs 'pip install tomli'")
    try:
        with open(p, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
    try:
        return build_pipeline(doc, p.parent)
    except ConfigError as e:
        raise ConfigError(f"{p.name}: {e}") from None
