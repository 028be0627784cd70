"""kfast: a Cython-accelerated Kafka consumer with bounded memory.

Public names are imported lazily so that ``import kfast`` stays cheap and a
user of the decoders never pays for the runtime's imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kfast._version import __version__ as __version__
from kfast.errors import (
    CircuitBreakerOpen,
    ConfigError,
    DeadLetterUnavailable,
    DecodeError,
    EncodeError,
    KfastError,
    PermanentSinkError,
    RetryExhausted,
    SchemaRegistryUnavailable,
    SinkError,
    StartupTimeout,
    Stopped,
    TransientSinkError,
    UnknownSchemaId,
)
from kfast.row_error import RowError

_LAZY = {
    "Batch": "kfast._batch",
    "AvroDecoder": "kfast.avro",
    "ConfluentDecoder": "kfast.confluent",
    "ProtobufDecoder": "kfast.protobuf",
    "Pipeline": "kfast.runtime.pipeline",
    "Health": "kfast.runtime.health",
    "BatchPolicy": "kfast.runtime.policies",
    "BufferPolicy": "kfast.runtime.policies",
    "RetryPolicy": "kfast.retry",
    "DeadLetterPolicy": "kfast.dlq",
    "Sink": "kfast.sinks",
    "CallableSink": "kfast.sinks",
    "NullSink": "kfast.sinks",
    "PostgresSink": "kfast.sinks.postgres",
}

__all__ = [
    "CircuitBreakerOpen",
    "ConfigError",
    "DeadLetterUnavailable",
    "DecodeError",
    "EncodeError",
    "KfastError",
    "PermanentSinkError",
    "RetryExhausted",
    "RowError",
    "SchemaRegistryUnavailable",
    "SinkError",
    "StartupTimeout",
    "Stopped",
    "TransientSinkError",
    "UnknownSchemaId",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kfast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover - names for type checkers
    from kfast._batch import Batch as Batch
    from kfast.avro import AvroDecoder as AvroDecoder
    from kfast.confluent import ConfluentDecoder as ConfluentDecoder
    from kfast.dlq import DeadLetterPolicy as DeadLetterPolicy
    from kfast.protobuf import ProtobufDecoder as ProtobufDecoder
    from kfast.retry import RetryPolicy as RetryPolicy
    from kfast.runtime.health import Health as Health
    from kfast.runtime.pipeline import Pipeline as Pipeline
    from kfast.runtime.policies import BatchPolicy as BatchPolicy
    from kfast.runtime.policies import BufferPolicy as BufferPolicy
    from kfast.sinks import CallableSink as CallableSink
    from kfast.sinks import NullSink as NullSink
    from kfast.sinks import Sink as Sink
    from kfast.sinks.postgres import PostgresSink as PostgresSink
