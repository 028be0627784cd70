"""Batch -> pyarrow.RecordBatch, wrapping kfast's buffers without copying.

Fixed-width, string/binary, list and map columns share kfast's memory (the
Arrow arrays hold buffer exports, so the batch cannot be recycled while they
are alive). Booleans (kfast stores a byte per value, Arrow a bit), decimals
and object columns are converted.
"""

from __future__ import annotations

from typing import Any

from kfast._layout import ListNode, MapNode, Node, ObjectNode, RecordNode, ValueNode

_TIME_TYPES = {
    "date": ("date32", None),
    "time-millis": ("time32", "ms"),
    "time-micros": ("time64", "us"),
    "timestamp-millis": ("timestamp", "ms"),
    "timestamp-micros": ("timestamp", "us"),
    "timestamp-nanos": ("timestamp", "ns"),
    "local-timestamp-millis": ("timestamp", "ms"),
    "local-timestamp-micros": ("timestamp", "us"),
    "local-timestamp-nanos": ("timestamp", "ns"),
}


def _pa() -> Any:
    try:
        import pyarrow
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("Batch.to_arrow() needs pyarrow: pip install 'kfast[arrow]'") from exc
    return pyarrow


def batch_to_arrow(batch: Any) -> Any:
    pa = _pa()
    layout: RecordNode = batch.layout
    arrays = [_array(pa, batch, child) for _, child in layout.fields]
    names = [name for name, _ in layout.fields]
    if not arrays:
        return pa.RecordBatch.from_pydict({})
    return pa.RecordBatch.from_arrays(arrays, names=names)


def _buffers(pa: Any, view: Any) -> tuple[Any, Any]:
    validity = view.validity
    return (pa.py_buffer(validity) if validity is not None else None), view.null_count


def _array(pa: Any, batch: Any, node: Node) -> Any:
    if isinstance(node, ValueNode):
        return _value_array(pa, batch, node)
    if isinstance(node, ObjectNode):
        return pa.array(batch.column(batch.names[node.col]).to_pylist())
    if isinstance(node, RecordNode):
        children = [_array(pa, batch, child) for _, child in node.fields]
        fields = [pa.field(name, arr.type) for (name, _), arr in zip(node.fields, children)]
        if node.valid_col < 0:
            return pa.StructArray.from_arrays(children, fields=fields)
        view = batch.column(batch.names[node.valid_col])
        validity, nulls = _buffers(pa, view)
        return pa.Array.from_buffers(
            pa.struct(fields), len(view), [validity], null_count=nulls, children=children
        )
    view = batch.column(batch.names[node.col])
    validity, nulls = _buffers(pa, view)
    offsets = pa.py_buffer(view.offsets)
    if isinstance(node, ListNode):
        item = _array(pa, batch, node.item)
        return pa.Array.from_buffers(
            pa.list_(item.type), len(view), [validity, offsets], null_count=nulls, children=[item]
        )
    if isinstance(node, MapNode):
        keys = _array(pa, batch, node.key)
        values = _array(pa, batch, node.value)
        entries = pa.StructArray.from_arrays(
            [keys, values],
            fields=[pa.field("key", keys.type, nullable=False), pa.field("value", values.type)],
        )
        return pa.Array.from_buffers(
            pa.map_(keys.type, values.type),
            len(view),
            [validity, offsets],
            null_count=nulls,
            children=[entries],
        )
    raise TypeError(f"unknown layout node {node!r}")


def _value_array(pa: Any, batch: Any, node: ValueNode) -> Any:
    if node.col < 0:
        return pa.nulls(batch.num_rows)
    view = batch.column(batch.names[node.col])
    kind = view.kind
    conv = node.conv
    n = len(view)
    validity, nulls = _buffers(pa, view)
    if conv == "decimal":
        precision, scale = node.arg
        dtype = (
            pa.decimal128(precision, scale) if precision <= 38 else pa.decimal256(precision, scale)
        )
        return pa.array(view.to_pylist(), type=dtype)
    if conv == "enum":
        indices = pa.Array.from_buffers(
            pa.int32(), n, [validity, pa.py_buffer(view.values)], null_count=nulls
        )
        if isinstance(node.arg, dict):
            return pa.array(view.to_pylist())
        return pa.DictionaryArray.from_arrays(indices, pa.array(list(node.arg), pa.string()))
    if kind in ("binary", "object"):
        text = conv in ("str", "uuid")
        return pa.Array.from_buffers(
            pa.string() if text else pa.binary(),
            n,
            [validity, pa.py_buffer(view.offsets), pa.py_buffer(view.values)],
            null_count=nulls,
        )
    if kind == "bool":
        raw = pa.Array.from_buffers(
            pa.uint8(), n, [validity, pa.py_buffer(view.values)], null_count=nulls
        )
        return raw.cast(pa.bool_())
    if conv in _TIME_TYPES:
        family, unit = _TIME_TYPES[conv]
        if family == "date32":
            dtype = pa.date32()
        elif family == "time32":
            dtype = pa.time32(unit)
        elif family == "time64":
            dtype = pa.time64(unit)
        else:
            dtype = pa.timestamp(unit, tz="UTC" if not conv.startswith("local") else None)
        return pa.Array.from_buffers(
            dtype, n, [validity, pa.py_buffer(view.values)], null_count=nulls
        )
    dtype = {
        ("int32", "uint32"): pa.uint32(),
        ("int64", "uint64"): pa.uint64(),
    }.get((kind, conv)) or {
        "int32": pa.int32(),
        "int64": pa.int64(),
        "float32": pa.float32(),
        "float64": pa.float64(),
    }[kind]
    return pa.Array.from_buffers(dtype, n, [validity, pa.py_buffer(view.values)], null_count=nulls)
