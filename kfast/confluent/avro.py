"""Confluent-framed Avro (and Protobuf by schema id): ``ConfluentDecoder``.

Each payload is ``0x00``, a 4-byte big-endian schema id, then the schemaless record. Writer
schemas come from the registry through ``kfast.confluent.registry.SchemaStore`` (one lookup per
id, references resolved recursively) and are compiled once per id.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from kfast._batch import Batch
from kfast.avro import FramedAvroDecoder, Program
from kfast.avro import schema as _schema
from kfast.confluent.protobuf import ConfluentProtobufDecoder
from kfast.confluent.registry import (
    BoundedCache,
    RegisteredSchema,
    SchemaStore,
    UnknownSchemaId,
    first_schema_id,
    frame_schema_id,
    mark_tombstones,
    without_tombstones,
)
from kfast.errors import ConfigError, SchemaRegistryUnavailable

__all__ = ["ConfluentDecoder", "resolve_references"]

_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
_KINDS = ("AVRO", "PROTOBUF")
_NO_FIELDS = {"type": "record", "name": "kfast_no_fields", "fields": []}


# ------------------------------------------------------------------------ references


def resolve_references(store: SchemaStore, entry: RegisteredSchema) -> Any:
    """The schema of ``entry`` as one self-contained JSON document.

    Each named type the schema takes from its references (another subject's schema at a given
    version, which may have references of its own) is written out in full where Avro's parsing
    order first meets its name, and by name after that, which is what a self-contained schema
    with the same types looks like.
    """
    doc = json.loads(entry.schema_str)
    if not entry.references:
        return doc
    available: dict[str, Any] = {}

    def collect(e: RegisteredSchema, seen: frozenset[tuple[str, int]]) -> None:
        for ref in e.references:
            key = (ref.subject, ref.version)
            if key in seen:
                raise ConfigError(f"schema references form a cycle at {ref.subject} v{ref.version}")
            sub = store.version(ref.subject, ref.version)
            collect(sub, seen | {key})
            sub_doc = json.loads(sub.schema_str)
            for named in sub_doc if isinstance(sub_doc, list) else [sub_doc]:
                if isinstance(named, dict) and named.get("type") in (
                    "record",
                    "error",
                    "enum",
                    "fixed",
                ):
                    full = _fullname(named["name"], named.get("namespace"), "")
                    available.setdefault(full, _absolute(named, full))
            available.setdefault(ref.name, sub_doc)

    collect(entry, frozenset())
    defined: set[str] = set()

    def walk(s: Any, ns: str) -> Any:
        if isinstance(s, str):
            if s in _PRIMITIVES:
                return s
            full = s if "." in s else (f"{ns}.{s}" if ns else s)
            for cand in (full, s):
                if cand in defined:
                    return s
                if cand in available:
                    return walk(available[cand], ns)
            return s
        if isinstance(s, list):
            return [walk(b, ns) for b in s]
        if not isinstance(s, dict):
            return s
        t = s.get("type")
        if t in ("record", "error", "enum", "fixed"):
            full = _fullname(s["name"], s.get("namespace"), ns)
            defined.add(full)
            inner_ns = full.rsplit(".", 1)[0] if "." in full else ""
            if t in ("record", "error"):
                s = dict(s)
                s["fields"] = [dict(f, type=walk(f["type"], inner_ns)) for f in s["fields"]]
            return s
        if t == "array":
            return dict(s, items=walk(s["items"], ns))
        if t == "map":
            return dict(s, values=walk(s["values"], ns))
        if isinstance(t, (str, list, dict)) and t not in _PRIMITIVES:
            return dict(s, type=walk(t, ns))
        return s

    return walk(doc, "")


def _fullname(name: str, namespace: str | None, parent_ns: str) -> str:
    if "." in name:
        return name
    ns = parent_ns if namespace is None else namespace
    return f"{ns}.{name}" if ns else name


def _absolute(named: dict[str, Any], full: str) -> dict[str, Any]:
    """A named type that keeps its own namespace wherever it is written out."""
    out = dict(named)
    out["name"] = full
    out.pop("namespace", None)
    if "." not in full:
        out["namespace"] = ""  # the null namespace, not the enclosing one
    return out


# ------------------------------------------------------------------------ the decoder


class ConfluentDecoder(FramedAvroDecoder):
    """Decode Confluent-framed payloads into a Batch (see docs/avro.md, "Schema registry").

    ``registry``: a URL, a list of URLs, a dict of confluent-kafka ``SchemaRegistryClient``
    settings, a client with ``get_schema(schema_id)`` (confluent-kafka's own included) or a
    ``kfast.confluent.SchemaStore``.

    The columns are fixed up front, never by which schema id arrives first: ``reader_schema``
    (every writer schema is resolved to it), else the newest version of ``subject`` in the
    registry, asked at the first decode. The batch kind is ``kind`` (``"AVRO"`` or
    ``"PROTOBUF"``), else ``"AVRO"`` with a ``reader_schema``, ``"PROTOBUF"`` with only
    ``protobuf_classes``, else the type of ``subject``'s newest schema. Protobuf batches go to a
    ``ConfluentProtobufDecoder`` sharing this decoder's registry cache.

    Bad framing, ids of the other kind, ids the registry does not have and writer schemas that
    do not resolve are RowErrors of their own payloads; a registry that cannot answer raises
    ``kfast.errors.SchemaRegistryUnavailable`` for the whole batch before any row is decoded.
    """

    def __init__(
        self,
        registry: Any,
        reader_schema: Any = None,
        max_cached_schemas: int = 1000,
        protobuf_classes: dict[int, Any] | None = None,
        *,
        subject: str | None = None,
        kind: str | None = None,
        message_name: str | None = None,
    ) -> None:
        self.store = (
            registry
            if isinstance(registry, SchemaStore)
            else SchemaStore(registry, max_cached_schemas=max_cached_schemas)
        )
        self.registry = self.store.client
        self.max_cached_schemas = max_cached_schemas
        self.protobuf_classes = dict(protobuf_classes or {})
        self.subject = subject
        self.message_name = message_name
        if kind is not None:
            kind = str(kind).upper()
            if kind not in _KINDS:
                raise ConfigError(f"kind: 'AVRO' or 'PROTOBUF', got {kind!r}")
        elif reader_schema is not None:
            kind = "AVRO"
        elif self.protobuf_classes:
            kind = "PROTOBUF"
        if subject is None and ((kind == "AVRO" and reader_schema is None) or (kind is None)):
            raise ConfigError(
                "ConfluentDecoder: the columns must not depend on which schema id arrives "
                "first: pass reader_schema=... (Avro), subject='<topic>-value' (its newest "
                "registered version, asked once) or protobuf_classes=..."
            )
        self._kind = kind
        self._reader: _schema.Schema | None = None
        self._columns: Program | None = None
        if reader_schema is not None:
            self._set_reader(_schema.parse(reader_schema))
        self._programs: BoundedCache[int, Program] = BoundedCache(max_cached_schemas)
        self._protobuf: ConfluentProtobufDecoder | None = None
        self._no_columns: Program | None = None

    def schema_id_of(self, value: Any) -> int | None:
        """The schema id a payload is framed with, or None when it is not framed (only the
        5-byte header is read: the runtime gives dead letters a ``kfast.schema.id`` header)."""
        return frame_schema_id(value)

    def _set_reader(self, reader: _schema.Schema) -> None:
        self._reader = reader
        self._columns = Program(_schema.compile_schema(reader, None, False))

    def kind(self) -> str:
        """``"AVRO"`` or ``"PROTOBUF"``: how every batch is decoded (may ask for ``subject``)."""
        if self._kind is None:
            entry = self._newest()
            if entry.schema_type not in _KINDS:
                raise ConfigError(
                    f"subject {self.subject!r}: {entry.schema_type} schemas are not decoded"
                )
            self._kind = entry.schema_type
        return self._kind

    def _newest(self) -> RegisteredSchema:
        """The newest version of ``subject``, asked once (the store keeps it)."""
        assert self.subject is not None
        return self.store.latest(self.subject)

    def _writer(self, entry: RegisteredSchema) -> _schema.Schema:
        return _schema.parse(resolve_references(self.store, entry))

    # -- hooks called by FramedAvroDecoder.decode_spans ----------------------------------------
    def _batch_decoder(self, first_schema_id: int) -> Any:
        """None (decode here as Avro) or the Protobuf decoder, by the configured kind: no id of
        the batch decides it, so one foreign payload costs only its own row."""
        if self.kind() == "PROTOBUF":
            return self._protobuf_decoder()
        return None

    def _columns_program(self, first_schema_id: int | None) -> Program:
        if self._columns is None and self.kind() == "PROTOBUF":
            # only when no payload of the batch is framed (any framed one hands the batch to
            # the Protobuf decoder): every row is an error, there are no Avro columns to give
            if self._no_columns is None:
                self._no_columns = Program(_schema.compile_schema(_schema.parse(_NO_FIELDS)))
            return self._no_columns
        if self._columns is None:
            entry = self._newest()
            if entry.schema_type != "AVRO":
                raise ConfigError(f"subject {self.subject!r}: newest schema is {entry.schema_type}")
            self._set_reader(self._writer(entry))
        assert self._columns is not None
        return self._columns

    def _program_for(self, schema_id: int) -> Program:
        prog = self._programs.get(schema_id)
        if prog is not None:
            return prog
        if schema_id in self.protobuf_classes:
            raise ConfigError(f"schema id {schema_id} is PROTOBUF; this decoder decodes AVRO")
        entry = self.store.get(schema_id)
        if entry.schema_type != "AVRO":
            raise ConfigError(
                f"schema id {schema_id} is {entry.schema_type}; this decoder decodes AVRO"
            )
        self._columns_program(None)
        assert self._reader is not None
        try:
            writer = self._writer(entry)
        except (ValueError, KeyError, TypeError) as exc:  # ConfigError included
            raise ConfigError(f"schema id {schema_id}: {exc}") from None
        try:
            prog = Program(_schema.compile_schema(self._reader, writer, False))
        except ConfigError as exc:
            raise ConfigError(
                f"schema id {schema_id}: cannot be resolved to the reader schema: {exc}"
            ) from None
        return self._programs.put(schema_id, prog)

    def _failure_reason(self, schema_id: int, exc: BaseException) -> str:
        if isinstance(exc, SchemaRegistryUnavailable):  # never a row error (see decode_spans)
            raise exc
        if isinstance(exc, (UnknownSchemaId, ConfigError)):
            return str(exc)
        return f"schema id {schema_id}: {type(exc).__name__}: {exc}"

    def _protobuf_decoder(self) -> ConfluentProtobufDecoder:
        if self._protobuf is None:
            self._protobuf = ConfluentProtobufDecoder(
                self.store,
                protobuf_classes=self.protobuf_classes,
                subject=self.subject if not self.protobuf_classes else None,
                message_name=self.message_name,
                max_cached_schemas=self.max_cached_schemas,
            )
        return self._protobuf

    def decode(self, payloads: Sequence[Any], out: Batch | None = None) -> Batch:
        """Decode framed payloads into a Batch: the rows ``decode_spans`` gives a Pipeline.

        A Protobuf batch is handed the caller's payload objects directly (no copy). A ``None``
        payload (a tombstone) is a RowError; a Pipeline skips tombstones.
        """
        payloads, tombstones = without_tombstones(payloads)
        if first_schema_id(payloads) is not None and self.kind() == "PROTOBUF":
            batch: Batch = self._protobuf_decoder().decode(payloads, out)
        else:
            batch = super().decode(payloads, out)
        return mark_tombstones(batch, tombstones)
