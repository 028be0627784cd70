"""Confluent Schema Registry framing: ``ConfluentDecoder(registry, reader_schema=None)``.

Each payload is ``0x00`` (magic byte), a 4-byte big-endian schema id, then
the schemaless Avro record. The writer schema of each id is fetched once
from the registry (confluent-kafka's ``SchemaRegistryClient`` or any object
with ``get_schema(schema_id)`` returning something with ``.schema_str`` and
``.schema_type``) and compiled once; compiled decoders are kept in a bounded
LRU cache.

Columns: with ``reader_schema`` every writer schema is resolved to it (Avro
schema resolution), so every batch has the reader's columns. Without one,
the writer schema of the first id the decoder sees becomes the reader
schema for the life of the decoder, and later ids are resolved against it.
Because one batch may mix writer schemas, logical-type conversions in
``to_pylist()`` follow the reader schema here (``AvroDecoder`` follows the
writer, like fastavro).

Bad framing, unknown ids, an unreachable registry and unresolvable writer
schemas are reported per payload as ``RowError`` s; they never raise.

Protobuf: a batch whose first framed payload's id is ``"PROTOBUF"`` in the
registry (or in ``protobuf_classes``) is handed to ``kfast.protobuf`` (see
:meth:`ConfluentDecoder._batch_decoder`). Every such decision is made in
``decode_spans`` hooks, so a ``kfast.Pipeline`` (whose ring calls
``decode_spans`` on its arena) and ``decode(payloads)`` give the same rows.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from kfast._batch import Batch
from kfast.avro import FramedAvroDecoder, Program
from kfast.avro import schema as _schema
from kfast.errors import ConfigError

_EMPTY_RECORD = {"type": "record", "name": "kfast_empty", "fields": []}


class UnknownSchemaId(LookupError):
    """The registry does not know a schema id."""


class RegistryUnreachable(ConnectionError):
    """The registry could not be reached."""


def _classify(schema_id: int, exc: BaseException) -> str:
    status = getattr(exc, "http_status_code", None)
    message = getattr(exc, "error_message", None) or str(exc) or type(exc).__name__
    if isinstance(exc, UnknownSchemaId) or status == 404 or isinstance(exc, KeyError):
        return f"unknown schema id {schema_id} (registry: {message})"
    if isinstance(exc, (ConnectionError, OSError, TimeoutError)) or _is_transport_error(exc):
        return f"schema registry unreachable for schema id {schema_id}: {message}"
    if isinstance(exc, ConfigError):
        return f"schema id {schema_id}: {message}"
    if status is not None:
        return f"schema registry error {status} for schema id {schema_id}: {message}"
    return f"schema id {schema_id}: {type(exc).__name__}: {message}"


def _is_transport_error(exc: BaseException) -> bool:
    try:
        import httpx
    except ImportError:  # pragma: no cover - httpx ships with confluent-kafka's registry client
        return False
    return isinstance(exc, httpx.TransportError)


class ConfluentDecoder(FramedAvroDecoder):
    """Decode Confluent-framed Avro payloads into a Batch (see module doc)."""

    def __init__(
        self,
        registry: Any,
        reader_schema: Any = None,
        max_cached_schemas: int = 1000,
        protobuf_classes: dict[int, Any] | None = None,
    ) -> None:
        if not hasattr(registry, "get_schema"):
            raise ConfigError("registry: expected an object with get_schema(schema_id)")
        if not isinstance(max_cached_schemas, int) or max_cached_schemas < 1:
            raise ConfigError(
                f"max_cached_schemas: must be an int >= 1, got {max_cached_schemas!r}"
            )
        self.registry = registry
        self.max_cached_schemas = max_cached_schemas
        self._reader: _schema.Schema | None = None
        self._columns: Program | None = None
        if reader_schema is not None:
            self._reader = _schema.parse(reader_schema)
            self._columns = Program(_schema.compile_schema(self._reader, None, False))
        self._programs: OrderedDict[int, Program] = OrderedDict()
        self._registered: OrderedDict[int, Any] = OrderedDict()
        self._empty = Program(_schema.compile_schema(_schema.parse(_EMPTY_RECORD)))
        self._protobuf: Any = None
        # {schema_id: generated Protobuf class or Descriptor}: these ids are
        # PROTOBUF without asking the registry (see docs/protobuf.md)
        self.protobuf_classes = dict(protobuf_classes or {})

    def schema_id_of(self, value: Any) -> int | None:
        """The schema id a payload is framed with, or None when it is not framed.

        Reads only the 5-byte header; the runtime uses it to give dead letters
        a ``kfast.schema.id`` header (plain decoders have no such method).
        """
        return frame_schema_id(value)

    # -- registry -----------------------------------------------------------
    def _fetch(self, schema_id: int) -> Any:
        """The registry's entry for an id (kept in a bounded LRU: one lookup per id)."""
        registered = self._registered.get(schema_id)
        if registered is not None:
            self._registered.move_to_end(schema_id)
            return registered
        try:
            registered = self.registry.get_schema(schema_id)
            if registered is None:
                raise UnknownSchemaId("not found")
        except Exception as exc:
            raise RuntimeError(_classify(schema_id, exc)) from exc
        self._registered[schema_id] = registered
        while len(self._registered) > self.max_cached_schemas:
            self._registered.popitem(last=False)
        return registered

    def _schema_type(self, schema_id: int) -> str:
        return str(getattr(self._fetch(schema_id), "schema_type", None) or "AVRO").upper()

    # -- hooks called by FramedAvroDecoder.decode_spans ----------------------
    def _columns_program(self, first_schema_id: int | None) -> Program:
        if self._columns is not None:
            return self._columns
        if first_schema_id is None:
            return self._empty
        try:
            self._program_for(first_schema_id)
        except Exception:
            return self._empty  # that id's rows fail with the registry's reason
        assert self._columns is not None
        return self._columns

    def _program_for(self, schema_id: int) -> Program:
        prog = self._programs.get(schema_id)
        if prog is not None:
            self._programs.move_to_end(schema_id)
            return prog
        if schema_id in self.protobuf_classes:  # PROTOBUF without asking the registry
            raise ConfigError("is a PROTOBUF schema; this batch is decoded as Avro")
        registered = self._fetch(schema_id)
        kind = self._schema_type(schema_id)
        if kind != "AVRO":
            raise ConfigError(f"is a {kind} schema; this batch is decoded as Avro")
        writer = _schema.parse(registered.schema_str)
        if self._reader is None:
            self._reader = writer
            self._columns = Program(_schema.compile_schema(writer, None, False))
        try:
            prog = Program(_schema.compile_schema(self._reader, writer, False))
        except ConfigError as exc:
            raise ConfigError(f"cannot be resolved to the reader schema: {exc}") from None
        self._programs[schema_id] = prog
        while len(self._programs) > self.max_cached_schemas:
            self._programs.popitem(last=False)
        return prog

    def _failure_reason(self, schema_id: int, exc: BaseException) -> str:
        if isinstance(exc, RuntimeError) and exc.__cause__ is not None:
            return str(exc)  # already classified by _fetch
        return _classify(schema_id, exc)

    # -- Protobuf dispatch ---------------------------------------------------
    def _batch_decoder(self, first_schema_id: int) -> Any:
        """Dispatch point, called by ``decode_spans`` (so by ``decode`` and by
        the Pipeline's ring alike) with the schema id of the batch's first
        framed payload: its schema type decides the decoder. ``"AVRO"`` (or
        none) decodes here (returns None); ``"PROTOBUF"`` hands the whole batch
        to ``kfast.protobuf.ConfluentProtobufDecoder`` (imported lazily,
        constructed once with the same registry), a compiled decoder that reads
        the same spans, so neither path copies a payload. A registry failure raises:
        that id's payloads become RowErrors and the batch is decoded as Avro.
        """
        if first_schema_id in self.protobuf_classes:
            return self._protobuf_decoder()
        if self._schema_type(first_schema_id) == "PROTOBUF":
            return self._protobuf_decoder()
        return None

    def decode(self, payloads: Sequence[Any], out: Batch | None = None) -> Batch:
        """Decode a sequence of framed payloads into a Batch.

        The rows are those of ``decode_spans`` (what a Pipeline's ring calls):
        the batch's first framed payload decides through ``_batch_decoder``.
        This override only spares a Protobuf batch a pass: it hands the
        caller's payload objects to ``ConfluentProtobufDecoder.decode``, which
        frames each payload as it takes its buffer.
        """
        if not isinstance(payloads, (list, tuple)):
            payloads = list(payloads)
        first = _first_schema_id(payloads)
        if first is not None:
            try:
                other = self._batch_decoder(first)
            except Exception:
                other = None  # decode_spans asks again and reports that id's rows
            if other is not None:
                result: Batch = other.decode(payloads, out)
                return result
        return super().decode(payloads, out)

    def _protobuf_decoder(self) -> Any:
        if self._protobuf is None:
            module = importlib.import_module("kfast.protobuf")
            factory = getattr(module, "ConfluentProtobufDecoder", None)
            if factory is None:
                raise ConfigError(
                    "schema registry holds a PROTOBUF schema but kfast.protobuf has no "
                    "ConfluentProtobufDecoder"
                )
            self._protobuf = factory(
                self.registry,
                classes=self.protobuf_classes,
                max_cached_schemas=self.max_cached_schemas,
            )
        return self._protobuf


def frame_schema_id(value: Any) -> int | None:
    """Schema id of a Confluent-framed payload (magic byte 0, 4-byte big-endian
    id); None when ``value`` is shorter than 5 bytes or has another first byte."""
    head = bytes(memoryview(value)[:5])
    if len(head) == 5 and head[0] == 0:
        return int.from_bytes(head[1:5], "big")
    return None


def _first_schema_id(payloads: Sequence[Any]) -> int | None:
    for p in payloads:
        if p is None:
            continue
        schema_id = frame_schema_id(p)
        if schema_id is not None:
            return schema_id
    return None
