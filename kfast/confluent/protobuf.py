"""Confluent-framed Protobuf: message-index paths, registry schemas, ``ConfluentProtobufDecoder``.

After the magic byte and the 4-byte schema id, a Confluent Protobuf payload carries the path of
its message type inside the registered file: a zigzag varint count, then that many zigzag
varint indexes (index 0 is the first top-level message, the next index a nested message of it).
The common case ``[0]`` is the single byte ``0``.

A registered schema is ``.proto`` text (compiled with grpcio-tools' ``protoc``) or, as
confluent-kafka's Python ``ProtobufSerializer`` registers it and ``?format=serialized`` returns
it, a base64 ``FileDescriptorProto`` (loaded as is). Its references are fetched from the
registry recursively; imports of ``google/protobuf/*.proto`` (the well-known types) come from
the protobuf runtime.
"""

from __future__ import annotations

import base64
import importlib
import importlib.resources
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor

from kfast._batch import Batch
from kfast.confluent.registry import (
    BoundedCache,
    RegisteredSchema,
    SchemaStore,
    UnknownSchemaId,
    frame_schema_id,
    mark_tombstones,
    without_tombstones,
)
from kfast.errors import ConfigError, DecodeError, SchemaRegistryUnavailable
from kfast.protobuf._decoder import FramedProtobufDecoder
from kfast.protobuf.decoder import ProtobufDecoder, descriptor_of

__all__ = [
    "ConfluentProtobufDecoder",
    "file_descriptor_protos",
    "message_at",
    "message_path",
    "parse_message_indexes",
]

MAX_PATH = 128  # more nesting than any real .proto file has
_WELL_KNOWN = (
    "any_pb2",
    "api_pb2",
    "duration_pb2",
    "empty_pb2",
    "field_mask_pb2",
    "source_context_pb2",
    "struct_pb2",
    "timestamp_pb2",
    "type_pb2",
    "wrappers_pb2",
    "descriptor_pb2",
)
_BASE64 = re.compile(rb"^[A-Za-z0-9+/=\s]+$")


def _zigzag_varint(buf: bytes | bytearray | memoryview, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    n = len(buf)
    while True:
        if pos >= n:
            raise DecodeError("truncated message-index varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            break
        shift += 7
        if shift >= 64:
            raise DecodeError("message-index varint longer than 10 bytes")
    return (result >> 1) ^ -(result & 1), pos


def parse_message_indexes(
    buf: bytes | bytearray | memoryview, offset: int = 0
) -> tuple[tuple[int, ...], int]:
    """Parse a Confluent message-index path at ``buf[offset:]``: ``(path, end)``, where
    ``end`` is the offset of the message. ``DecodeError`` for a truncated or negative one."""
    count, pos = _zigzag_varint(buf, offset)
    if count == 0:
        return (0,), pos
    if count < 0 or count > MAX_PATH:
        raise DecodeError(f"invalid message-index count {count}")
    path = []
    for _ in range(count):
        index, pos = _zigzag_varint(buf, pos)
        if index < 0:
            raise DecodeError(f"negative message index {index}")
        path.append(index)
    return tuple(path), pos


def message_path(desc: Descriptor) -> tuple[int, ...]:
    """The Confluent message-index path of ``desc`` inside its .proto file."""
    path: list[int] = []
    d: Any = desc
    while d is not None:
        parent = d.containing_type
        siblings = (
            parent.nested_types
            if parent is not None
            else list(d.file.message_types_by_name.values())
        )
        path.append([s.full_name for s in siblings].index(d.full_name))
        d = parent
    return tuple(reversed(path))


def message_at(file_desc: Any, path: Sequence[int]) -> Descriptor:
    """The message a Confluent message-index path names in ``file_desc``."""
    proto = descriptor_pb2.FileDescriptorProto.FromString(file_desc.serialized_pb)
    msgs: Any = proto.message_type
    name = proto.package
    for depth, index in enumerate(path):
        if index >= len(msgs):
            raise DecodeError(f"message index path {list(path)} does not exist in {file_desc.name}")
        name = f"{name}.{msgs[index].name}" if name else msgs[index].name
        if depth + 1 < len(path):
            msgs = msgs[index].nested_type
    return file_desc.pool.FindMessageTypeByName(name)


# ------------------------------------------------------------------------ registry schemas


def _serialized(schema_str: str) -> descriptor_pb2.FileDescriptorProto | None:
    """The FileDescriptorProto of a base64 serialized schema; None for .proto text."""
    raw = schema_str.encode("ascii", "replace")
    if not _BASE64.match(raw):
        return None
    try:
        return descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(raw, validate=False))
    except Exception:  # binascii.Error, or the protobuf runtime's DecodeError: not serialized
        return None


def _well_known(name: str) -> descriptor_pb2.FileDescriptorProto:
    for module in _WELL_KNOWN:
        importlib.import_module(f"google.protobuf.{module}")
    try:
        fd = descriptor_pool.Default().FindFileByName(name)
    except KeyError:
        raise ConfigError(f"imports {name}, which the protobuf runtime does not provide") from None
    return descriptor_pb2.FileDescriptorProto.FromString(fd.serialized_pb)


def _protoc(files: Mapping[str, str], main: str) -> list[descriptor_pb2.FileDescriptorProto]:
    """Compile .proto texts (``{file name: text}``) with protoc; ``main`` and its imports."""
    try:
        from grpc_tools import protoc  # optional: only .proto text schemas need it
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "resolving .proto text schemas from the registry needs grpcio-tools; install it "
            "or pass protobuf_classes={schema_id: MessageClass}"
        ) from None
    include = str(importlib.resources.files("grpc_tools") / "_proto")
    with tempfile.TemporaryDirectory(prefix="kfast-proto-") as tmp:
        for name, text in files.items():
            path = os.path.join(tmp, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
        out = os.path.join(tmp, "set.pb")
        rc = protoc.main(
            ["protoc", f"-I{tmp}", f"-I{include}", "--include_imports",
             f"--descriptor_set_out={out}", main]
        )  # fmt: skip
        if rc != 0:
            raise ConfigError("protoc could not compile the schema")
        with open(out, "rb") as fh:
            return list(descriptor_pb2.FileDescriptorSet.FromString(fh.read()).file)


def file_descriptor_protos(
    store: SchemaStore, entry: RegisteredSchema, name: str
) -> list[descriptor_pb2.FileDescriptorProto]:
    """``entry`` (file ``name``) and every file it imports, dependencies first.

    Serialized schemas are loaded as they are; .proto text schemas (with their text references)
    are compiled together with protoc; ``google/protobuf/*`` imports come from the runtime.
    """
    out: dict[str, descriptor_pb2.FileDescriptorProto] = {}

    def visit(entry: RegisteredSchema, name: str) -> None:
        if name in out:
            return
        fdp = _serialized(entry.schema_str)
        refs = {r.name: r for r in entry.references}
        if fdp is None:  # .proto text: protoc it with every text file below it
            texts: dict[str, str] = {}
            todo = [(name, entry)]
            while todo:
                n, e = todo.pop()
                if n in texts:
                    continue
                if _serialized(e.schema_str) is not None:
                    raise ConfigError(f"{n}: a serialized schema imported by a .proto text schema")
                texts[n] = e.schema_str
                todo.extend(
                    (r.name, store.version(r.subject, r.version))
                    for r in e.references
                    if not r.name.startswith("google/protobuf/")
                )
            for f in _protoc(texts, name):
                out.setdefault(f.name, f)
            return
        fdp.name = name if not fdp.name else fdp.name
        for dep in fdp.dependency:
            if dep in out:
                continue
            ref = refs.get(dep)
            if ref is not None:
                visit(store.version(ref.subject, ref.version), dep)
            elif dep.startswith("google/protobuf/"):
                out[dep] = _well_known(dep)
            else:
                raise ConfigError(f"{fdp.name} imports {dep}, which is not among its references")
        out[fdp.name] = fdp

    visit(entry, name)
    return list(out.values())


def _file(store: SchemaStore, entry: RegisteredSchema, label: str) -> Any:
    """A ``FileDescriptor`` of a registered PROTOBUF schema, in a private pool."""
    pool = descriptor_pool.DescriptorPool()
    try:
        protos = file_descriptor_protos(store, entry, f"kfast_{label}.proto")
        for fdp in protos:
            pool.Add(fdp)
        main = protos[-1].name
        return pool.FindFileByName(main)
    except (SchemaRegistryUnavailable, UnknownSchemaId, ConfigError):
        raise
    except Exception as exc:  # TypeError/KeyError from a descriptor that does not build
        raise ConfigError(f"the registered schema does not build: {exc}") from None


# ------------------------------------------------------------------------ the decoder


class ConfluentProtobufDecoder(FramedProtobufDecoder):
    """Decode Confluent-framed Protobuf payloads into a ``kfast.Batch`` (docs/protobuf.md).

    ``registry``: a URL, a dict of schema-registry settings, a client with
    ``get_schema(schema_id)``, or a ``SchemaStore`` to share. ``protobuf_classes``:
    ``{schema_id: MessageClass or Descriptor}`` that bypasses the registry for those ids.

    The columns are fixed when the decoder is made, never by arrival order: ``message`` (a
    generated class or Descriptor) if given, else the first of ``protobuf_classes``, else the
    newest version of ``subject`` in the registry, asked at the first decode (its first message,
    or ``message_name``). Payloads that carry that message (any registered version: Protobuf
    evolution is wire-compatible) decode with it; other message types, bad framing and unknown
    ids are RowErrors of their own payloads. A registry that cannot answer raises
    ``kfast.errors.SchemaRegistryUnavailable`` for the batch.
    """

    def __init__(
        self,
        registry: Any = None,
        *,
        protobuf_classes: Mapping[int, Any] | None = None,
        message: Any = None,
        subject: str | None = None,
        message_name: str | None = None,
        max_cached_schemas: int = 1000,
        max_depth: int = 100,
    ) -> None:
        self.protobuf_classes = {
            int(k): descriptor_of(v) for k, v in (protobuf_classes or {}).items()
        }
        if registry is None and not self.protobuf_classes:
            raise ConfigError("ConfluentProtobufDecoder: pass a registry or protobuf_classes")
        self.store: SchemaStore | None = None
        if registry is not None:
            self.store = (
                registry
                if isinstance(registry, SchemaStore)
                else SchemaStore(registry, max_cached_schemas=max_cached_schemas)
            )
        fixed = descriptor_of(message) if message is not None else None
        if fixed is None and self.protobuf_classes:
            fixed = next(iter(self.protobuf_classes.values()))
        if fixed is None and subject is None:
            raise ConfigError(
                "ConfluentProtobufDecoder: the columns need a message type fixed up front: pass "
                "message=MessageClass, protobuf_classes=... or subject='<topic>-value' (its "
                "newest registered version)"
            )
        self.subject = subject
        self.message_name = message_name
        self.max_cached_schemas = max_cached_schemas
        self.max_depth = max_depth
        self._types: BoundedCache[tuple[int, tuple[int, ...]], Descriptor] = BoundedCache(
            max_cached_schemas
        )
        self._files: BoundedCache[int, Any] = BoundedCache(max_cached_schemas)
        self._decoder: ProtobufDecoder | None = (
            ProtobufDecoder(fixed, max_depth=max_depth) if fixed is not None else None
        )

    def __repr__(self) -> str:
        what = self._decoder.descriptor.full_name if self._decoder else f"subject {self.subject}"
        return f"ConfluentProtobufDecoder({what})"

    def schema_id_of(self, value: Any) -> int | None:
        """The schema id a payload is framed with, or None (only the 5-byte header is read)."""
        return frame_schema_id(value)

    def columns(self) -> ProtobufDecoder:
        """The decoder whose columns every batch has (asks the registry once for ``subject``)."""
        if self._decoder is None:
            assert self.store is not None and self.subject is not None
            entry = self.store.latest(self.subject)
            if entry.schema_type != "PROTOBUF":
                raise ConfigError(
                    f"subject {self.subject!r}: its newest schema is {entry.schema_type}, "
                    "not PROTOBUF"
                )
            f = _file(self.store, entry, f"subject_{entry.schema_id}")
            if self.message_name:
                desc = f.pool.FindMessageTypeByName(self.message_name)
            else:
                desc = message_at(f, (0,))
            self._decoder = ProtobufDecoder(desc, max_depth=self.max_depth)
        return self._decoder

    def _file(self, schema_id: int) -> Any:
        f = self._files.get(schema_id)
        if f is None:
            if self.store is None:
                raise UnknownSchemaId(f"unknown schema id {schema_id} (not in protobuf_classes)")
            entry = self.store.get(schema_id)
            if entry.schema_type != "PROTOBUF":
                raise ConfigError(f"schema id {schema_id} is {entry.schema_type}, not PROTOBUF")
            try:
                f = self._files.put(schema_id, _file(self.store, entry, f"schema_{schema_id}"))
            except ConfigError as exc:
                raise ConfigError(f"schema id {schema_id}: {exc}") from None
        return f

    def message_type(self, schema_id: int, path: tuple[int, ...]) -> Descriptor:
        """The message type of payloads framed with ``schema_id`` and ``path``."""
        key = (schema_id, path)
        desc = self._types.get(key)
        if desc is not None:
            return desc
        given = self.protobuf_classes.get(schema_id)
        if given is not None:
            if message_path(given) != path:
                raise DecodeError(
                    f"message index path {list(path)} of schema id {schema_id} is not "
                    f"{given.full_name} (path {list(message_path(given))})"
                )
            desc = given
        else:
            desc = message_at(self._file(schema_id), path)
        return self._types.put(key, desc)

    # -- hooks called by FramedProtobufDecoder.decode_spans ------------------------------------
    def _columns_decoder(self) -> Any:
        return self.columns()

    def _resolve(self, schema_id: int, path_bytes: bytes) -> tuple[Any, str | None]:
        """``(decoder, None)`` for a (schema id, path), else ``(None, reason)``; called once per
        distinct pair in a batch, before any row is decoded. An unavailable registry raises."""
        dec = self.columns()
        try:
            path, _ = parse_message_indexes(path_bytes)
            desc = self.message_type(schema_id, path)
        except SchemaRegistryUnavailable:
            raise  # the whole batch: retried by the Pipeline, never row errors
        except (DecodeError, ConfigError, LookupError) as exc:
            return None, str(exc).strip("'\"")
        if desc.full_name != dec.descriptor.full_name:
            return None, (
                f"schema id {schema_id} carries {desc.full_name}; this decoder decodes "
                f"{dec.descriptor.full_name}"
            )
        return dec, None

    def decode(self, payloads: Sequence[Any], out: Batch | None = None) -> Batch:
        """Decode framed payloads into a Batch (the rows ``decode_spans`` gives a Pipeline).
        A ``None`` payload (a tombstone) is a RowError; a Pipeline skips tombstones."""
        payloads, tombstones = without_tombstones(payloads)
        batch: Batch = super().decode(payloads, out)
        return mark_tombstones(batch, tombstones)
