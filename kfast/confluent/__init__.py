"""Confluent Schema Registry support: framing, registry client, Avro and Protobuf decoders.

``registry`` (bottom): the wire header, ``RegistryClient``, ``SchemaStore`` (one cache, one
failure vocabulary); ``protobuf`` and ``avro`` above it. See docs/avro.md and docs/protobuf.md.
"""

from __future__ import annotations

from kfast.confluent.avro import ConfluentDecoder, resolve_references
from kfast.confluent.protobuf import (
    ConfluentProtobufDecoder,
    message_path,
    parse_message_indexes,
)
from kfast.confluent.registry import (
    RegisteredSchema,
    RegistryClient,
    SchemaStore,
    UnknownSchemaId,
    frame_schema_id,
)

__all__ = [
    "ConfluentDecoder",
    "ConfluentProtobufDecoder",
    "RegisteredSchema",
    "RegistryClient",
    "SchemaStore",
    "UnknownSchemaId",
    "frame_schema_id",
    "message_path",
    "parse_message_indexes",
    "resolve_references",
]
