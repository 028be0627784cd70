"""The encoding plan: how one batch layout maps onto the table's columns.

Pure: reads the batch layout and the introspected columns, runs no SQL. Every mismatch is a
``ConfigError`` naming the column, raised before any row is sent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kfast._layout import ListNode, MapNode, RecordNode, ValueNode
from kfast.errors import ConfigError
from kfast.sinks._pgcopy import KIND_NAMES, column_kinds
from kfast.sinks.postgres.catalog import TableColumn
from kfast.sinks.postgres.types import (
    JSON_SCALAR_OPS,
    allowed_types,
    scalar_op,
    sql_type_name,
)

if TYPE_CHECKING:  # pragma: no cover
    from kfast._batch import Batch

__all__ = ["Plan", "Source", "build_plan", "table_definition"]


@dataclass
class Source:
    """One output value of the batch layout (a leaf after flattening)."""

    path: tuple[str, ...]
    node: Any
    valid: tuple[int, ...]

    @property
    def dotted(self) -> str:
        return ".".join(self.path)


@dataclass
class Plan:
    """How one batch layout maps onto the table."""

    entries: list[dict[str, Any]]
    columns: list[str]  # target column names, COPY order
    sources: list[Source]
    pre: list[tuple[int, Any, bool]] = field(default_factory=list)  # (slot, source, jsonb?)


def _kind(node: ValueNode, kinds: Sequence[int]) -> str:
    return KIND_NAMES.get(kinds[node.col], "?")


def _scale(node: ValueNode) -> int:
    """Decimal scale from a ValueNode's arg: ``scale`` or ``(precision, scale)``."""
    if node.conv != "decimal":
        return 0
    arg = node.arg
    if isinstance(arg, (tuple, list)):
        return int(arg[-1] or 0)
    return int(arg or 0)


def _describe(src: Source, kinds: Sequence[int]) -> str:
    node = src.node
    if isinstance(node, ValueNode):
        extra = f"(scale={_scale(node)})" if node.conv == "decimal" else ""
        return f"{node.conv}{extra} [{_kind(node, kinds)}]"
    if isinstance(node, ListNode):
        return "array"
    if isinstance(node, MapNode):
        return "map"
    if isinstance(node, RecordNode):
        return "record"
    return "object"


def _flatten(
    node: RecordNode,
    columns: Mapping[str, str | None],
    prefix: tuple[str, ...] = (),
    valid: tuple[int, ...] = (),
) -> list[Source]:
    out: list[Source] = []
    for name, child in node.fields:
        path = (*prefix, name)
        if isinstance(child, RecordNode) and ".".join(path) not in columns:
            v = valid + ((child.valid_col,) if child.valid_col >= 0 else ())
            out.extend(_flatten(child, columns, path, v))
        elif isinstance(child, ValueNode) and child.col < 0:
            continue  # Avro "null" type: nothing stored
        else:
            out.append(Source(path, child, valid))
    return out


def _target(src: Source, columns: Mapping[str, str | None]) -> str | None:
    dotted = src.dotted
    if dotted in columns:
        return columns[dotted]
    return "_".join(src.path)


def _is_record_path(layout: RecordNode, path: str) -> bool:
    node: Any = layout
    for part in path.split("."):
        if not isinstance(node, RecordNode):
            return False
        node = dict(node.fields).get(part)
        if node is None:
            return False
    return isinstance(node, RecordNode)


def _sources(batch: Batch, columns: Mapping[str, str | None]) -> list[Source]:
    layout = batch.layout
    if not isinstance(layout, RecordNode):
        raise ConfigError(f"PostgresSink needs record rows, got layout {type(layout).__name__}")
    sources = _flatten(layout, columns)
    known = {s.dotted for s in sources}
    for path in columns:
        prefix_ok = any(k == path or k.startswith(path + ".") for k in known)
        if not prefix_ok and not _is_record_path(layout, path):
            raise ConfigError(
                f"PostgresSink.columns names batch field {path!r}, which the batch does not have "
                f"(fields: {', '.join(sorted(known))})"
            )
    return sources


def table_definition(batch: Batch, columns: Mapping[str, str | None]) -> list[tuple[str, str]]:
    """``(column, SQL type)`` of a table made for this batch's layout (``create_table``)."""
    kinds = column_kinds(batch)
    out = []
    for src in _sources(batch, columns):
        target = _target(src, columns)
        if target is not None:
            out.append((target, _default_type(src, kinds)))
    return out


def _default_type(src: Source, kinds: Sequence[int]) -> str:
    node = src.node
    if isinstance(node, ValueNode):
        allowed = list(allowed_types(node.conv, _kind(node, kinds)))
        if not allowed:
            raise ConfigError(
                f"create_table: batch field {src.dotted!r} ({_describe(src, kinds)}) has no "
                "PostgreSQL mapping"
            )
        return sql_type_name(allowed[0])
    if isinstance(node, ListNode) and isinstance(node.item, ValueNode) and node.item.col >= 0:
        allowed = list(allowed_types(node.item.conv, _kind(node.item, kinds)))
        if allowed:
            return sql_type_name(allowed[0]) + "[]"
    return "jsonb"


def build_plan(
    batch: Batch,
    table: str,
    table_cols: Mapping[str, TableColumn],
    columns: Mapping[str, str | None],
    key: Sequence[str],
) -> Plan:
    """The plan writing ``batch``'s layout into ``table`` (its introspected ``table_cols``)."""
    kinds = column_kinds(batch)
    sources = _sources(batch, columns)
    entries: list[dict[str, Any]] = []
    names: list[str] = []
    used: list[Source] = []
    pre: list[tuple[int, Any, bool]] = []
    for src in sources:
        target = _target(src, columns)
        if target is None:
            continue
        tc = table_cols.get(target)
        if tc is None:
            raise ConfigError(
                f"batch field {src.dotted!r} ({_describe(src, kinds)}) has no column {target!r} "
                f"in table {table}; add the column, or map/skip it with "
                f"columns={{{src.dotted!r}: ...}}"
            )
        if target in names:
            raise ConfigError(f"two batch fields map to column {target!r} of table {table}")
        entry = _entry(src, tc, kinds, table)
        if entry["op"] == "pre":
            entry["slot"] = len(pre)
            pre.append((len(pre), src, tc.typname == "jsonb"))
        entries.append(entry)
        names.append(target)
        used.append(src)
    missing = [
        c.name
        for c in table_cols.values()
        if c.name not in names and c.not_null and not c.has_default
    ]
    if missing:
        raise ConfigError(
            f"table {table} column {missing[0]!r} is NOT NULL without a default and no batch "
            "field maps to it (map one with columns={...})"
        )
    for k in key:
        if k not in names:
            raise ConfigError(f"PostgresSink.key column {k!r} is not written by the batch")
    return Plan(entries, names, used, pre)


def _fast_map(node: MapNode, kinds: Sequence[int]) -> bool:
    k, v = node.key, node.value
    return (
        isinstance(k, ValueNode)
        and k.col >= 0
        and k.conv == "str"
        and isinstance(v, ValueNode)
        and v.col >= 0
        and scalar_op(v.conv, _kind(v, kinds)) in JSON_SCALAR_OPS
    )


def _entry(src: Source, tc: TableColumn, kinds: Sequence[int], table: str) -> dict[str, Any]:
    node = src.node
    valid = list(src.valid)

    def mismatch(expected: Sequence[str]) -> ConfigError:
        exp = ", ".join(sql_type_name(t) for t in expected) or "a supported type"
        return ConfigError(
            f"column {tc.name!r} of table {table} has type {tc.display}, but batch field "
            f"{src.dotted!r} is {_describe(src, kinds)}; expected {exp}"
        )

    if tc.typname in ("jsonb", "json") and not (isinstance(node, ValueNode) and node.conv == "str"):
        if isinstance(node, MapNode) and tc.typname == "jsonb" and _fast_map(node, kinds):
            mkey, mval = node.key, node.value
            assert isinstance(mkey, ValueNode) and isinstance(mval, ValueNode)
            return {
                "op": "map_jsonb",
                "col": node.col,
                "child": mkey.col,
                "child2": mval.col,
                "elem_op": scalar_op(mval.conv, _kind(mval, kinds)),
                "symbols": mval.arg if mval.conv == "enum" else None,
                "valid": valid,
            }
        if isinstance(node, ValueNode):
            raise mismatch(list(allowed_types(node.conv, _kind(node, kinds))))
        return {"op": "pre", "valid": valid}
    if isinstance(node, ValueNode):
        allowed = allowed_types(node.conv, _kind(node, kinds))
        if node.conv == "str" and tc.typname == "jsonb":
            return {"op": "jsonb_str", "col": node.col, "valid": valid}
        op = allowed.get(tc.typname)
        if op is None:
            raise mismatch(list(allowed))
        return {
            "op": op,
            "col": node.col,
            "scale": _scale(node),
            "symbols": node.arg if node.conv == "enum" else None,
            "valid": valid,
        }
    if isinstance(node, ListNode) and isinstance(node.item, ValueNode) and node.item.col >= 0:
        item = node.item
        allowed = allowed_types(item.conv, _kind(item, kinds))
        if tc.elem_typname is None or tc.elem_typname not in allowed:
            raise mismatch(["_" + t for t in allowed] + ["jsonb"])
        return {
            "op": "array",
            "col": node.col,
            "child": item.col,
            "elem_op": allowed[tc.elem_typname],
            "elem_oid": tc.elem_oid,
            "scale": _scale(item),
            "symbols": item.arg if item.conv == "enum" else None,
            "valid": valid,
        }
    raise mismatch(["jsonb"])
