"""Confluent Protobuf framing: message-index paths and decoders per (schema id, path).

After the magic byte and the 4-byte schema id, a Confluent Protobuf payload
carries the path of the message type inside the registered ``.proto`` file:
a zigzag varint count followed by that many zigzag varint indexes (index 0 is
the first top-level message, the next index a nested message of it, ...).
The common case ``[0]`` is written as the single byte ``0``.

``ConfluentProtobufDecoder`` is what ``kfast.ConfluentDecoder`` hands a
batch to when the registry says ``PROTOBUF``. The message type of each
(schema id, path) comes from ``classes={schema_id: MessageClass}`` when given,
else from the registry's schema text compiled with grpcio-tools' ``protoc``
(references are fetched from the registry too). The first message type seen
becomes the decoder's type (one column layout per decoder, like the Avro
reader schema); payloads of other schema ids decode with it when they carry
the same message (Protobuf evolution is wire-compatible), and are RowErrors
when they carry another message type.
"""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor

from kfast.errors import ConfigError, DecodeError
from kfast.protobuf._decoder import FramedProtobufDecoder

MAX_PATH = 128  # more nesting than any real .proto file has


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
    """Parse a Confluent message-index path at ``buf[offset:]``.

    Returns ``(path, end)`` where ``end`` is the offset of the Protobuf
    message itself. A single ``0`` byte means ``(0,)``. Raises
    ``kfast.DecodeError`` for a truncated or negative count/index.
    """
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


# ---------------------------------------------------------------- message types


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


def _protoc_file(registry: Any, schema: Any, schema_id: int) -> Any:
    """Compile a registered .proto (and its references) into a private pool."""
    try:
        from grpc_tools import protoc
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConfigError(
            f"schema id {schema_id}: resolving PROTOBUF schemas from the registry needs "
            "grpcio-tools; install it or pass protobuf_classes={schema_id: MessageClass}"
        ) from None
    import importlib.resources

    include = str(importlib.resources.files("grpc_tools") / "_proto")
    with tempfile.TemporaryDirectory(prefix="kfast-proto-") as tmp:
        main = f"kfast_schema_{schema_id}.proto"
        todo = [(main, schema)]
        seen = set()
        while todo:
            name, sch = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            path = os.path.join(tmp, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(sch.schema_str)
            for ref in getattr(sch, "references", None) or []:
                if ref.name.startswith("google/protobuf/"):
                    continue
                todo.append((ref.name, registry.get_version(ref.subject, ref.version).schema))
        out = os.path.join(tmp, "set.pb")
        rc = protoc.main(
            [
                "protoc",
                f"-I{tmp}",
                f"-I{include}",
                "--include_imports",
                f"--descriptor_set_out={out}",
                main,
            ]
        )
        if rc != 0:
            raise ConfigError(f"schema id {schema_id}: protoc could not compile the schema")
        with open(out, "rb") as fh:
            fds = descriptor_pb2.FileDescriptorSet.FromString(fh.read())
    pool = descriptor_pool.DescriptorPool()
    for fdp in fds.file:
        pool.Add(fdp)
    return pool.FindFileByName(main)


class ConfluentProtobufDecoder(FramedProtobufDecoder):
    """Decode Confluent-framed Protobuf payloads into a ``kfast.Batch``.

    ``registry``: an object with ``get_schema(schema_id)`` (confluent-kafka's
    ``SchemaRegistryClient`` or a mock); ``classes``: optional
    ``{schema_id: MessageClass or Descriptor}`` that bypasses the registry.
    Framing errors, unknown ids and mismatched message types are RowErrors.

    A compiled decoder (``decode_spans`` reads the spans in place), so it is a
    ``kfast.Pipeline`` decoder on its own and ``kfast.ConfluentDecoder`` hands
    it Protobuf batches without copying them.
    """

    def __init__(
        self,
        registry: Any = None,
        *,
        classes: Mapping[int, Any] | None = None,
        max_cached_schemas: int = 1000,
        max_depth: int = 100,
    ) -> None:
        from kfast.protobuf import _descriptor_of

        self.registry = registry
        self.classes = {int(k): _descriptor_of(v) for k, v in (classes or {}).items()}
        if registry is None and not self.classes:
            raise ConfigError("ConfluentProtobufDecoder: pass a registry or classes")
        self.max_cached_schemas = max_cached_schemas
        self.max_depth = max_depth
        self._types: OrderedDict[tuple[int, tuple[int, ...]], Descriptor] = OrderedDict()
        self._files: OrderedDict[int, Any] = OrderedDict()
        self._decoder: Any = None
        self._empty: Any = None

    def schema_id_of(self, value: Any) -> int | None:
        """The schema id a payload is framed with, or None when it is not framed
        (see ``kfast.confluent.frame_schema_id``; the message-index path is not read)."""
        from kfast.confluent import frame_schema_id

        return frame_schema_id(value)

    def _file(self, schema_id: int) -> Any:
        f = self._files.get(schema_id)
        if f is None:
            from kfast.confluent import _classify

            try:
                schema = self.registry.get_schema(schema_id)
                if schema is None:
                    raise LookupError("not found")
            except Exception as exc:  # the same reasons as ConfluentDecoder's Avro rows
                raise LookupError(_classify(schema_id, exc)) from exc
            kind = str(getattr(schema, "schema_type", "") or "").upper()
            if kind != "PROTOBUF":
                raise ConfigError(f"schema id {schema_id} is {kind or 'AVRO'}, not PROTOBUF")
            f = _protoc_file(self.registry, schema, schema_id)
            self._files[schema_id] = f
            while len(self._files) > self.max_cached_schemas:
                self._files.popitem(last=False)
        return f

    def message_type(self, schema_id: int, path: tuple[int, ...]) -> Descriptor:
        """The message type of payloads framed with ``schema_id`` and ``path``."""
        key = (schema_id, path)
        desc = self._types.get(key)
        if desc is not None:
            return desc
        given = self.classes.get(schema_id)
        if given is not None:
            if message_path(given) != path:
                raise DecodeError(
                    f"message index path {list(path)} of schema id {schema_id} is not "
                    f"{given.full_name} (path {list(message_path(given))})"
                )
            desc = given
        elif self.registry is None:
            raise LookupError(f"unknown schema id {schema_id} (not in protobuf_classes)")
        else:
            desc = message_at(self._file(schema_id), path)
        self._types[key] = desc
        while len(self._types) > self.max_cached_schemas:
            self._types.popitem(last=False)
        return desc

    # -- hooks called by FramedProtobufDecoder.decode_spans ------------------
    def _columns_decoder(self) -> Any:
        """The columns of a batch none of whose payloads resolved: the
        decoder's message type once known, else an empty message."""
        if self._decoder is not None:
            return self._decoder
        if self._empty is None:
            from google.protobuf import empty_pb2

            from kfast.protobuf import ProtobufDecoder

            self._empty = ProtobufDecoder(empty_pb2.Empty)
        return self._empty

    def _resolve(self, schema_id: int, path_bytes: bytes) -> tuple[Any, str | None]:
        """``(ProtobufDecoder, None)`` for a (schema id, path), else ``(None, reason)``;
        called once per distinct pair in a batch."""
        from kfast.protobuf import ProtobufDecoder

        try:
            path, _ = parse_message_indexes(path_bytes)
            desc = self.message_type(schema_id, path)
            if self._decoder is None:
                self._decoder = ProtobufDecoder(desc, max_depth=self.max_depth)
            elif desc.full_name != self._decoder.descriptor.full_name:
                raise DecodeError(
                    f"schema id {schema_id} carries {desc.full_name}, this decoder "
                    f"decodes {self._decoder.descriptor.full_name}"
                )
        except Exception as exc:  # every framing/registry failure is that row's error
            return None, _reason(exc)
        return self._decoder, None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, (DecodeError, ConfigError, LookupError)):
        return str(exc).strip("'\"")
    return f"{type(exc).__name__}: {exc}"
