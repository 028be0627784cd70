"""pyarrow helpers of the Arrow export (the export itself is ``kfast._arrow_c``).

``batch_to_arrow`` is ``pyarrow.record_batch(batch)`` over the C data
interface. ``object_array`` converts an OBJECT column (values that have no
columnar layout in kfast: Avro unions of several types, recursive records,
arrays or maps of records; Protobuf recursive messages, maps with message
values) into a pyarrow array, typed from the Avro schema when there is one:

* a union ``["null", T]`` is a nullable ``T``;
* a union of several types is a dense union with one child per branch (a
  ``null`` branch becomes a child of Arrow's null type); a value goes to the
  first branch it fits, the rule fastavro's writer follows;
* enums are ``dictionary<int32, string>``, fixed is ``binary``,
  maps are ``map<string, T>``;
* a recursive record has no finite Arrow type: the column is its JSON text.

Protobuf OBJECT columns are typed from the field's descriptor (messages are
structs, maps ``map<K, V>``, enums dictionaries; a recursive message is JSON
text). An enum number outside the symbols becomes the dictionary entry of its
decimal text.
"""

from __future__ import annotations

import datetime as _dt
import decimal as _decimal
import json
import uuid as _uuid
from typing import Any


def _pa() -> Any:
    try:
        import pyarrow
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("Batch.to_arrow() needs pyarrow: pip install 'kfast[arrow]'") from exc
    return pyarrow


def batch_to_arrow(batch: Any) -> Any:
    """A ``pyarrow.RecordBatch`` sharing the batch's buffers (C data interface)."""
    return _pa().record_batch(batch)


# ---------------------------------------------------------------- OBJECT columns


class _Recursive(Exception):
    """The schema refers to itself: no finite Arrow type."""


def object_array(values: list[Any], converter: Any) -> Any:
    """A pyarrow array of an OBJECT column's Python values."""
    pa = _pa()
    schemas = getattr(converter, "schemas", None)
    if schemas is not None:
        writer, reader = schemas
        schema = reader if reader is not None else writer
        try:
            arrow_type(pa, schema, ())
        except _Recursive:
            return _json_array(pa, values)
        return _build(pa, schema, values)
    field = getattr(converter, "field", None)
    if field is not None:
        try:
            dtype = protobuf_type(pa, field, ())
        except _Recursive:
            return _json_array(pa, values)
        return _typed_array(pa, [_pb_prepare(v, field) for v in values], dtype)
    return _json_array(pa, values)


_PB_WRAPPERS = {
    f"google.protobuf.{w}Value": w
    for w in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
}
_PB_JSON = frozenset(
    {"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"}
)
_PB_TIME = frozenset({"google.protobuf.Timestamp", "google.protobuf.Duration"})


def _pb_prepare(v: Any, fd: Any) -> Any:
    """A Protobuf field's value with its Struct/Value/ListValue parts as JSON text."""
    msg = fd.message_type
    if v is None or msg is None:
        return v
    if msg.GetOptions().map_entry:
        vfd = msg.fields_by_number[2]
        return {k: _pb_message(x, vfd) for k, x in v.items()}
    if fd.is_repeated:
        return [_pb_message(x, fd) for x in v]
    return _pb_message(v, fd)


def _pb_message(v: Any, fd: Any) -> Any:
    msg = fd.message_type
    if v is None or msg is None:
        return v
    if msg.full_name in _PB_JSON:
        return _json_text(v)
    if msg.full_name in _PB_WRAPPERS or msg.full_name in _PB_TIME:
        return v
    return {f.name: _pb_prepare(v.get(f.name), f) for f in msg.fields}


def _plain(pa: Any, t: Any) -> Any:
    """``t`` with dictionaries as plain strings (pyarrow builds invalid
    dictionary children under null structs from Python values; a cast after
    building is correct)."""
    if pa.types.is_dictionary(t):
        return pa.string()
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(_plain(pa, f.type)) for f in t])
    if pa.types.is_map(t):
        return pa.map_(t.key_type, _plain(pa, t.item_type))
    if pa.types.is_list(t):
        return pa.list_(t.value_field.with_type(_plain(pa, t.value_type)))
    return t


def _typed_array(pa: Any, values: list[Any], dtype: Any) -> Any:
    plain = _plain(pa, dtype)
    arr = pa.array([_fix(v, plain) for v in values], type=plain)
    return arr if plain == dtype else arr.cast(dtype)


def _fix(v: Any, t: Any) -> Any:
    """Python values pyarrow cannot take for ``t`` as they are: enum numbers
    outside the symbols (dictionary text) and uuid.UUID (string)."""
    import pyarrow as pa

    if v is None:
        return None
    if pa.types.is_string(t):
        return v if isinstance(v, str) else str(v)
    if pa.types.is_struct(t):
        return {f.name: _fix(v.get(f.name), f.type) for f in t}
    if pa.types.is_map(t):
        return [(k, _fix(x, t.item_type)) for k, x in v.items()]
    if pa.types.is_list(t):
        return [_fix(x, t.value_type) for x in v]
    return v


def protobuf_type(pa: Any, fd: Any, stack: tuple[str, ...]) -> Any:
    """The Arrow type of a Protobuf field as ``to_pylist`` shapes it (raises _Recursive)."""
    msg = fd.message_type
    if msg is not None and msg.GetOptions().map_entry:
        key, value = msg.fields_by_number[1], msg.fields_by_number[2]
        return pa.map_(_pb_scalar(pa, key, stack), _pb_scalar(pa, value, stack))
    elem = _pb_scalar(pa, fd, stack)
    return pa.list_(elem) if fd.is_repeated else elem


def _pb_scalar(pa: Any, fd: Any, stack: tuple[str, ...]) -> Any:
    from google.protobuf.descriptor import FieldDescriptor as FD

    t = fd.type
    if t in (FD.TYPE_MESSAGE, FD.TYPE_GROUP):
        name = fd.message_type.full_name
        if name == "google.protobuf.Timestamp":
            return pa.timestamp("us", tz="UTC")
        if name == "google.protobuf.Duration":
            return pa.duration("us")
        if name in _PB_JSON:
            return pa.string()
        if name in _PB_WRAPPERS:
            return _pb_scalar(pa, fd.message_type.fields_by_number[1], stack)
        if name in stack:
            raise _Recursive()
        inner = (*stack, name)
        return pa.struct(
            [pa.field(f.name, protobuf_type(pa, f, inner)) for f in fd.message_type.fields]
        )
    if t == FD.TYPE_ENUM:
        return pa.dictionary(pa.int32(), pa.string())
    return {
        FD.TYPE_DOUBLE: pa.float64(),
        FD.TYPE_FLOAT: pa.float32(),
        FD.TYPE_INT64: pa.int64(),
        FD.TYPE_SINT64: pa.int64(),
        FD.TYPE_SFIXED64: pa.int64(),
        FD.TYPE_UINT64: pa.uint64(),
        FD.TYPE_FIXED64: pa.uint64(),
        FD.TYPE_INT32: pa.int32(),
        FD.TYPE_SINT32: pa.int32(),
        FD.TYPE_SFIXED32: pa.int32(),
        FD.TYPE_UINT32: pa.uint32(),
        FD.TYPE_FIXED32: pa.uint32(),
        FD.TYPE_BOOL: pa.bool_(),
        FD.TYPE_STRING: pa.string(),
        FD.TYPE_BYTES: pa.binary(),
    }[t]


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return str(value)


def _json_text(v: Any) -> str:
    return json.dumps(v, default=_json_default)


def _json_array(pa: Any, values: list[Any]) -> Any:
    return pa.array([None if v is None else _json_text(v) for v in values], type=pa.string())


_TIME_LOGICAL = {
    ("int", "date"): "date32",
    ("int", "time-millis"): "time32ms",
    ("long", "time-micros"): "time64us",
    ("long", "timestamp-millis"): "tsms",
    ("long", "timestamp-micros"): "tsus",
    ("long", "local-timestamp-millis"): "ltsms",
    ("long", "local-timestamp-micros"): "ltsus",
}


def _branches(schema: Any) -> tuple[list[Any], bool]:
    """Non-null branches of a union and whether null is one of them."""
    non_null = [b for b in schema.branches if b.type != "null"]
    return non_null, len(non_null) != len(schema.branches)


def arrow_type(pa: Any, s: Any, stack: tuple[int, ...]) -> Any:
    """The Arrow type of a kfast.avro.schema.Schema node (raises _Recursive)."""
    t = s.type
    logical = _TIME_LOGICAL.get((t, s.logical))
    if logical is not None:
        return {
            "date32": pa.date32(),
            "time32ms": pa.time32("ms"),
            "time64us": pa.time64("us"),
            "tsms": pa.timestamp("ms", tz="UTC"),
            "tsus": pa.timestamp("us", tz="UTC"),
            "ltsms": pa.timestamp("ms"),
            "ltsus": pa.timestamp("us"),
        }[logical]
    if s.logical == "decimal" and t in ("bytes", "fixed"):
        precision = int(s.props["precision"])
        scale = int(s.props.get("scale", 0))
        return (
            pa.decimal128(precision, scale) if precision <= 38 else pa.decimal256(precision, scale)
        )
    simple = {
        "null": pa.null(),
        "boolean": pa.bool_(),
        "int": pa.int32(),
        "long": pa.int64(),
        "float": pa.float32(),
        "double": pa.float64(),
        "bytes": pa.binary(),
        "string": pa.string(),
    }
    if t in simple:
        return simple[t]
    if t == "fixed":
        return pa.binary()  # as fixed columns export (docs/batch.md)
    if t == "enum":
        return pa.dictionary(pa.int32(), pa.string())
    if id(s) in stack:
        raise _Recursive()
    inner = (*stack, id(s))
    if t in ("record", "error"):
        return pa.struct([pa.field(f.name, arrow_type(pa, f.type, inner)) for f in s.fields])
    if t == "array":
        return pa.list_(arrow_type(pa, s.items, inner))
    if t == "map":
        return pa.map_(pa.string(), arrow_type(pa, s.items, inner))
    if t == "union":
        non_null, _ = _branches(s)
        if len(non_null) == 1:
            return arrow_type(pa, non_null[0], inner)
        return pa.dense_union(
            [pa.field(_branch_name(b), arrow_type(pa, b, inner)) for b in s.branches]
        )
    raise TypeError(f"no Arrow type for Avro type {t!r}")


def _branch_name(s: Any) -> str:
    return s.short_name if s.type in ("record", "error", "enum", "fixed") else s.type


def _has_union(s: Any, seen: set[int] | None = None) -> bool:
    seen = set() if seen is None else seen
    if id(s) in seen:
        return False
    seen.add(id(s))
    if s.type == "union":
        return len(_branches(s)[0]) > 1 or any(_has_union(b, seen) for b in s.branches)
    if s.type in ("record", "error"):
        return any(_has_union(f.type, seen) for f in s.fields)
    if s.type in ("array", "map"):
        return _has_union(s.items, seen)
    return False


def _build(pa: Any, s: Any, values: list[Any]) -> Any:
    """pyarrow builds what it can; unions (which it cannot build from Python
    values) are assembled from their branches' arrays."""
    if not _has_union(s):
        return _typed_array(pa, values, arrow_type(pa, s, ()))
    t = s.type
    mask = pa.array([v is None for v in values], type=pa.bool_())
    if t == "union":
        non_null, _ = _branches(s)
        if len(non_null) == 1:
            return _build(pa, non_null[0], values)
        return _union(pa, s, values)
    if t in ("record", "error"):
        children = [
            _build(pa, f.type, [None if v is None else v.get(f.name) for v in values])
            for f in s.fields
        ]
        return pa.StructArray.from_arrays(
            children, fields=[pa.field(f.name, c.type) for f, c in zip(s.fields, children)],
            mask=mask,
        )  # fmt: skip
    offsets = [0]
    flat: list[Any] = []
    for v in values:
        if v is not None:
            flat.extend(v.values() if t == "map" else v)
        offsets.append(len(flat))
    items = _build(pa, s.items, flat)
    offs = pa.array(offsets, type=pa.int32())
    if t == "array":
        return pa.ListArray.from_arrays(offs, items, mask=mask)
    keys = pa.array([k for v in values if v is not None for k in v], type=pa.string())
    return pa.MapArray.from_arrays(offs, keys, items, mask=mask)


def _union(pa: Any, s: Any, values: list[Any]) -> Any:
    branches = s.branches
    groups: list[list[Any]] = [[] for _ in branches]
    types: list[int] = []
    offsets: list[int] = []
    for v in values:
        code = next((i for i, b in enumerate(branches) if _fits(b, v)), -1)
        if v is None and code < 0:
            code = 0  # under a null parent: a null in the first branch
        if code < 0:
            raise TypeError(f"value {v!r} fits no branch of the union")
        types.append(code)
        offsets.append(len(groups[code]))
        groups[code].append(v)
    children = [_build(pa, b, g) for b, g in zip(branches, groups)]
    return pa.UnionArray.from_dense(
        pa.array(types, type=pa.int8()),
        pa.array(offsets, type=pa.int32()),
        children,
        [_branch_name(b) for b in branches],
    )


def _fits(s: Any, v: Any) -> bool:
    """Whether Python value ``v`` (as fastavro returns it) belongs to branch ``s``."""
    t = s.type
    if t == "null":
        return v is None
    if v is None:
        return False
    if s.logical == "decimal":
        return isinstance(v, _decimal.Decimal)
    if s.logical == "uuid":
        return isinstance(v, (_uuid.UUID, str))
    logical = _TIME_LOGICAL.get((t, s.logical))
    if logical is not None:
        if logical == "date32":
            return isinstance(v, _dt.date) and not isinstance(v, _dt.datetime)
        if logical.startswith("time"):
            return isinstance(v, _dt.time)
        return isinstance(v, _dt.datetime)
    if t == "boolean":
        return isinstance(v, bool)
    if t == "int":
        return isinstance(v, int) and not isinstance(v, bool) and -(2**31) <= v < 2**31
    if t == "long":
        return isinstance(v, int) and not isinstance(v, bool)
    if t in ("float", "double"):
        return isinstance(v, float)
    if t == "string":
        return isinstance(v, str)
    if t == "bytes":
        return isinstance(v, bytes)
    if t == "fixed":
        return isinstance(v, bytes) and len(v) == s.size
    if t == "enum":
        return isinstance(v, str) and v in s.symbols
    if t in ("record", "error"):
        return isinstance(v, dict) and set(v) == {f.name for f in s.fields}
    if t == "array":
        return isinstance(v, list)
    if t == "map":
        return isinstance(v, dict)
    if t == "union":
        return any(_fits(b, v) for b in s.branches)
    return False
