"""Avro schema parsing, resolution and compilation to a flat program.

Pure Python, run once per decoder. The output (:class:`Program`) is a list of
small integer tuples ("ops") that ``kfast.avro._decoder`` copies into a C
array and interprets with the GIL released.

Column layout (see docs/avro.md):

* record fields become columns named by their dotted path (``address.city``);
* a nullable union ``["null", T]`` puts a validity bitmap on T's column(s); a
  nullable record gets a STRUCT presence column named after the field and
  nullable children;
* ``array<T>`` / ``map<T>`` of scalar (or nullable scalar) items become a LIST
  column plus a child column ``tags.item`` (arrays) or two child columns
  ``attrs.key`` / ``attrs.value`` (maps);
* everything else (unions of several non-null types, recursive records,
  arrays or maps of records or of other complex items) becomes an OBJECT
  column: the decoder validates and skips the value with the GIL released
  and keeps its raw bytes; ``Batch.finish()`` turns them into Python objects
  with ``fastavro.schemaless_reader`` on the sub-schema.

Logical-type conversions follow the writer schema, as fastavro does.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fastavro
from fastavro import schemaless_reader, schemaless_writer

from kfast._layout import ListNode, MapNode, Node, ObjectNode, RecordNode, ValueNode
from kfast.errors import ConfigError

# Column kinds: values of kfast._columns.ColKind (checked by _decoder at import).
COL_BOOL = 1
COL_INT32 = 2
COL_INT64 = 3
COL_FLOAT32 = 4
COL_FLOAT64 = 5
COL_BINARY = 6
COL_LIST = 7
COL_OBJECT = 8
COL_STRUCT = 9

# Op kinds: mirrored by the cdef enum in _decoder.pyx.
K_NULL = 0
K_BOOL = 1
K_INT = 2
K_LONG = 3
K_FLOAT = 4
K_DOUBLE = 5
K_BYTES = 6
K_FIXED = 7
K_ENUM = 8
K_RECORD = 9
K_ARRAY = 10
K_MAP = 11
K_UNION = 12
K_OBJECT = 13
K_DEFAULT = 14
K_NULLFILL = 15

# Union table entries besides an op index.
BRANCH_NULL = -1
BRANCH_UNRESOLVED = -2

PRIMITIVES = ("null", "boolean", "int", "long", "float", "double", "bytes", "string")
NAMED = ("record", "error", "enum", "fixed")

_SCALAR_KIND = {
    "boolean": COL_BOOL,
    "int": COL_INT32,
    "long": COL_INT64,
    "float": COL_FLOAT32,
    "double": COL_FLOAT64,
    "bytes": COL_BINARY,
    "string": COL_BINARY,
    "fixed": COL_BINARY,
    "enum": COL_INT32,
}

# fastavro's logical readers, keyed "physical-logicalType" -> conv name.
_LOGICAL_CONV = {
    "int-date": "date",
    "int-time-millis": "time-millis",
    "long-time-micros": "time-micros",
    "long-timestamp-millis": "timestamp-millis",
    "long-timestamp-micros": "timestamp-micros",
    "long-local-timestamp-millis": "local-timestamp-millis",
    "long-local-timestamp-micros": "local-timestamp-micros",
    "bytes-decimal": "decimal",
    "fixed-decimal": "decimal",
    "string-uuid": "uuid",
}

_PROMOTIONS = {
    ("int", "long"),
    ("int", "float"),
    ("int", "double"),
    ("long", "float"),
    ("long", "double"),
    ("float", "double"),
    ("string", "bytes"),
    ("bytes", "string"),
}


# ----------------------------------------------------------------------------
# Schema IR
# ----------------------------------------------------------------------------


@dataclass(eq=False)
class Field:
    name: str
    type: Schema
    has_default: bool
    default: Any
    aliases: tuple[str, ...]
    raw: dict[str, Any]


@dataclass(eq=False)
class Schema:
    """One node of a parsed schema. Named references point at the same object,
    so a recursive schema is a cyclic graph."""

    type: str  # primitive name, record, enum, fixed, array, map, union
    logical: str | None = None
    fullname: str = ""
    aliases: tuple[str, ...] = ()
    fields: list[Field] = field(default_factory=list)
    symbols: tuple[str, ...] = ()
    enum_default: str | None = None
    size: int = 0
    items: Schema | None = None  # array items / map values
    branches: list[Schema] = field(default_factory=list)
    props: dict[str, Any] = field(default_factory=dict)  # the rest of the JSON object

    @property
    def short_name(self) -> str:
        return self.fullname.rsplit(".", 1)[-1]


def load_schema(schema: Any) -> Any:
    """Accept a dict/list, a JSON string or a path to an .avsc file."""
    if isinstance(schema, os.PathLike):
        schema = os.fspath(schema)
    if isinstance(schema, str):
        text = schema.strip()
        if text[:1] in ("{", "[", '"'):
            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"schema: invalid JSON: {exc}") from None
        if text in PRIMITIVES:
            return text
        if os.path.exists(schema):
            with open(schema, encoding="utf-8") as fh:
                try:
                    return json.load(fh)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"schema: invalid JSON in {schema}: {exc}") from None
        raise ConfigError(f"schema: {schema!r} is neither JSON, a primitive type nor a file")
    if isinstance(schema, (dict, list)):
        return schema
    raise ConfigError(
        f"schema: expected dict, JSON string or .avsc path, got {type(schema).__name__}"
    )


def parse(schema: Any) -> Schema:
    """Parse and validate a schema into the IR (ConfigError on a bad schema)."""
    raw = load_schema(schema)
    try:
        fastavro.parse_schema(raw, _write_hint=False)
    except Exception as exc:  # fastavro raises several exception types
        raise ConfigError(f"schema: {exc}") from None
    try:
        return _Parser().parse(raw, "")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        missing = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ConfigError(f"schema: invalid schema ({missing})") from None


class _Parser:
    def __init__(self) -> None:
        self.named: dict[str, Schema] = {}

    def _fullname(self, name: str, namespace: str | None, parent_ns: str) -> tuple[str, str]:
        if "." in name:
            return name, name.rsplit(".", 1)[0]
        ns = parent_ns if namespace is None else namespace
        return (f"{ns}.{name}" if ns else name), ns

    def parse(self, s: Any, ns: str) -> Schema:
        if isinstance(s, str):
            if s in PRIMITIVES:
                return Schema(s)
            for cand in ((f"{ns}.{s}" if ns and "." not in s else s), s):
                if cand in self.named:
                    return self.named[cand]
            raise ConfigError(f"schema: unknown type {s!r}")
        if isinstance(s, list):
            return Schema("union", branches=[self.parse(b, ns) for b in s])
        if not isinstance(s, dict):
            raise ConfigError(f"schema: unexpected {s!r}")
        t = s["type"]
        if isinstance(t, (dict, list)):
            return self.parse(t, ns)
        logical = s.get("logicalType")
        props = {k: v for k, v in s.items() if k not in ("type", "fields", "items", "values")}
        if t in PRIMITIVES:
            return Schema(t, logical=logical, props=props)
        if t == "array":
            return Schema("array", logical=logical, items=self.parse(s["items"], ns), props=props)
        if t == "map":
            return Schema("map", logical=logical, items=self.parse(s["values"], ns), props=props)
        if t in NAMED:
            fullname, new_ns = self._fullname(s["name"], s.get("namespace"), ns)
            node = Schema(
                "record" if t == "error" else t,
                logical=logical,
                fullname=fullname,
                aliases=tuple(s.get("aliases", ())),
                props=props,
            )
            self.named[fullname] = node
            if t == "enum":
                node.symbols = tuple(s["symbols"])
                node.enum_default = s.get("default")
            elif t == "fixed":
                node.size = int(s["size"])
            else:
                for f in s["fields"]:
                    node.fields.append(
                        Field(
                            f["name"],
                            self.parse(f["type"], new_ns),
                            "default" in f,
                            f.get("default"),
                            tuple(f.get("aliases", ())),
                            {k: v for k, v in f.items() if k != "type"},
                        )
                    )
            return node
        # a named reference spelled as {"type": "Name"}
        return self.parse(t, ns)


def to_json(s: Schema, strip_logical: bool = False) -> Any:
    """Self-contained JSON for a sub-schema: each named type is defined at its
    first occurrence (full names, explicit namespaces), referenced after."""
    defined: set[str] = set()

    def emit(n: Schema) -> Any:
        if n.type == "union":
            return [emit(b) for b in n.branches]
        props = dict(n.props)
        if strip_logical:
            props.pop("logicalType", None)
        if n.type in ("record", "enum", "fixed"):
            if n.fullname in defined:
                return n.fullname
            defined.add(n.fullname)
            ns, _, short = n.fullname.rpartition(".")
            props["name"] = short
            props["namespace"] = ns
            out: dict[str, Any] = {"type": n.type, **props}
            if n.type == "record":
                out["fields"] = [{**f.raw, "type": emit(f.type)} for f in n.fields]
            return out
        if n.type == "array":
            return {"type": "array", **props, "items": emit(n.items)}  # type: ignore[arg-type]
        if n.type == "map":
            return {"type": "map", **props, "values": emit(n.items)}  # type: ignore[arg-type]
        return {"type": n.type, **props} if props else n.type

    return emit(s)


# ----------------------------------------------------------------------------
# Matching (the Avro spec, as fastavro implements it)
# ----------------------------------------------------------------------------


def _names_match(w: Schema, r: Schema) -> bool:
    return w.short_name == r.short_name or w.fullname in r.aliases or w.short_name in r.aliases


def matches(w: Schema, r: Schema) -> bool:
    if w.type == "union" or r.type == "union":
        return True
    if w.type in ("record", "enum", "fixed") or r.type in ("record", "enum", "fixed"):
        if w.type != r.type:
            return False
        if w.type == "fixed" and w.size != r.size:
            return False
        return _names_match(w, r)
    if w.type == r.type:
        if w.type == "array" or w.type == "map":
            return matches(w.items, r.items)  # type: ignore[arg-type]
        return True
    return (w.type, r.type) in _PROMOTIONS


# ----------------------------------------------------------------------------
# Reader shapes: how the reader schema maps onto columns
# ----------------------------------------------------------------------------


@dataclass(eq=False)
class Shape:
    kind: str  # value, null, record, list, map, union, object
    schema: Schema
    col: int = -1  # value / list / map / object column, or STRUCT column of a record
    fields: list[tuple[Field, Shape]] = field(default_factory=list)
    item: Shape | None = None  # list item / map value / union's non-null branch
    key_col: int = -1
    null_fill: tuple[int, ...] = ()  # columns that get a null when this value is null
    discard: bool = False  # validate and skip only (no columns, no layout)


def _is_scalar(s: Schema) -> bool:
    return s.type in _SCALAR_KIND


def _is_columnar_item(s: Schema) -> bool:
    if _is_scalar(s):
        return True
    if s.type == "union":
        non_null = [b for b in s.branches if b.type != "null"]
        return len(non_null) == 1 and len(s.branches) <= 2 and _is_scalar(non_null[0])
    return False


def _single_branch(s: Schema) -> Schema | None:
    """The non-null branch of a union with at most one non-null branch."""
    non_null = [b for b in s.branches if b.type != "null"]
    if len(non_null) == 1 and len(s.branches) - len(non_null) <= 1:
        return non_null[0]
    return None


class _ShapeBuilder:
    def __init__(self) -> None:
        self.spec: list[tuple[str, int, bool]] = []
        self.object_schemas: dict[int, Schema] = {}

    def add(self, name: str, kind: int, nullable: bool) -> int:
        self.spec.append((name, kind, nullable))
        return len(self.spec) - 1

    def build(self, s: Schema, name: str, nullable: bool, stack: tuple[int, ...]) -> Shape:
        t = s.type
        if t == "null":
            return Shape("null", s)
        if _is_scalar(s):
            col = self.add(name, _SCALAR_KIND[t], nullable)
            return Shape("value", s, col=col, null_fill=(col,))
        if t == "record" and id(s) not in stack:
            st = self.add(name, COL_STRUCT, True) if nullable else -1
            shape = Shape("record", s, col=st)
            fill: list[int] = [st] if st >= 0 else []
            for f in s.fields:
                sub = self.build(
                    f.type, f"{name}.{f.name}" if name else f.name, nullable, (*stack, id(s))
                )
                shape.fields.append((f, sub))
                fill.extend(sub.null_fill)
            shape.null_fill = tuple(fill)
            return shape
        if t == "array" and _is_columnar_item(s.items):  # type: ignore[arg-type]
            col = self.add(name, COL_LIST, nullable)
            item = self.build(s.items, f"{name}.item", False, stack)  # type: ignore[arg-type]
            return Shape("list", s, col=col, item=item, null_fill=(col,))
        if t == "map" and _is_columnar_item(s.items):  # type: ignore[arg-type]
            col = self.add(name, COL_LIST, nullable)
            key = self.add(f"{name}.key", COL_BINARY, False)
            value = self.build(s.items, f"{name}.value", False, stack)  # type: ignore[arg-type]
            return Shape("map", s, col=col, item=value, key_col=key, null_fill=(col,))
        if t == "union":
            inner = _single_branch(s)
            if inner is not None:
                has_null = len(s.branches) == 2
                shape_inner = self.build(inner, name, nullable or has_null, stack)
                if shape_inner.kind != "object":
                    return Shape("union", s, item=shape_inner, null_fill=shape_inner.null_fill)
                # the branch needed an OBJECT column: let it hold the whole union
                self.spec.pop()
            elif all(b.type == "null" for b in s.branches):
                return Shape("union", s, item=None)
        col = self.add(name, COL_OBJECT, nullable)
        self.object_schemas[col] = s
        return Shape("object", s, col=col, null_fill=(col,))


def _discard_shape(s: Schema, memo: dict[int, Shape]) -> Shape:
    """A shape with no columns: validate and skip a value read as ``s``."""
    if id(s) in memo:
        return memo[id(s)]
    t = s.type
    if t == "null":
        return Shape("null", s, discard=True)
    if _is_scalar(s):
        return Shape("value", s, discard=True)
    if t == "record":
        shape = Shape("record", s, discard=True)
        memo[id(s)] = shape
        shape.fields = [(f, _discard_shape(f.type, memo)) for f in s.fields]
        return shape
    if t == "array":
        return Shape("list", s, item=_discard_shape(s.items, memo), discard=True)  # type: ignore[arg-type]
    if t == "map":
        return Shape("map", s, item=_discard_shape(s.items, memo), discard=True)  # type: ignore[arg-type]
    # union: every branch kept apart (general resolution)
    shape = Shape("union", s, discard=True)
    shape.fields = [
        (Field("", b, False, None, (), {}), _discard_shape(b, memo)) for b in s.branches
    ]
    return shape


# ----------------------------------------------------------------------------
# Compiler
# ----------------------------------------------------------------------------


@dataclass
class Program:
    ops: list[tuple[int, ...]]  # (kind, col, tgt, a, b, c, d, name, minsize)
    ints: list[int]
    blob: bytes
    root: int
    names: list[str]  # field paths for error messages, indexed by op[7]
    spec: tuple[tuple[str, int, bool], ...]
    layout: Node
    converters: tuple[Callable[[bytes], Any] | None, ...]


def _zigzag(n: int) -> bytes:
    u = (n << 1) ^ (n >> 63)
    out = bytearray()
    while True:
        b = u & 0x7F
        u >>= 7
        if u:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _default_value(s: Schema, v: Any) -> Any:
    """A JSON default as a value fastavro can write (per the spec's encoding)."""
    t = s.type
    if t in ("bytes", "fixed"):
        return v.encode("latin-1") if isinstance(v, str) else v
    if t in ("float", "double"):
        return float(v)
    if t == "array":
        return [_default_value(s.items, x) for x in v]  # type: ignore[arg-type]
    if t == "map":
        return {k: _default_value(s.items, x) for k, x in v.items()}  # type: ignore[arg-type]
    if t == "record":
        out = {}
        for f in s.fields:
            if f.name in v:
                out[f.name] = _default_value(f.type, v[f.name])
            elif f.has_default:
                out[f.name] = _default_value(f.type, f.default)
            else:
                raise ValueError(f"default for record {s.fullname} lacks field {f.name!r}")
        return out
    if t == "union":
        return _default_value(s.branches[0], v)
    return v


def encode_default(s: Schema, v: Any) -> bytes:
    buf = io.BytesIO()
    if s.type == "union":
        buf.write(_zigzag(0))
        s = s.branches[0]
    parsed = fastavro.parse_schema(to_json(s, strip_logical=True), _write_hint=False)
    schemaless_writer(buf, parsed, _default_value(s, v))
    return buf.getvalue()


class _ObjectConverter:
    """Turns the raw bytes of one OBJECT slot into the Python value.

    The bytes were validated by the nogil skipper, so fastavro can only fail
    on a logical conversion (an invalid uuid string, a date out of range...).
    Such a value comes back as its physical value (fastavro on the schema
    without logical types) rather than failing the whole batch.
    """

    __slots__ = ("_plain", "reader", "schemas", "writer")

    def __init__(self, writer: Schema, reader: Schema | None) -> None:
        self.writer = fastavro.parse_schema(to_json(writer), _write_hint=False)
        self.reader = None
        if reader is not None and reader is not writer:
            self.reader = fastavro.parse_schema(to_json(reader), _write_hint=False)
        self.schemas = (writer, reader if reader is not writer else None)
        self._plain: tuple[Any, Any] | None = None

    def __call__(self, raw: bytes) -> Any:
        try:
            return schemaless_reader(io.BytesIO(raw), self.writer, self.reader)
        except (ValueError, ArithmeticError, TypeError):
            if self._plain is None:
                w, r = self.schemas
                self._plain = (
                    fastavro.parse_schema(to_json(w, strip_logical=True), _write_hint=False),
                    None
                    if r is None
                    else fastavro.parse_schema(to_json(r, strip_logical=True), _write_hint=False),
                )
            return schemaless_reader(io.BytesIO(raw), *self._plain)


class Compiler:
    def __init__(self, conv_from_writer: bool = True) -> None:
        self.ops: list[list[int]] = []
        self.ints: list[int] = []
        self.blob = bytearray()
        self.names: list[str] = []
        self._name_ids: dict[str, int] = {}
        self.converters: dict[int, Callable[[bytes], Any]] = {}
        self._memo: dict[tuple[int, int], tuple[int, Node | None]] = {}
        self.conv_from_writer = conv_from_writer
        self._keep: list[Any] = []

    # -- helpers ----------------------------------------------------------
    def _name(self, path: str) -> int:
        if path not in self._name_ids:
            self._name_ids[path] = len(self.names)
            self.names.append(path)
        return self._name_ids[path]

    def _op(self, kind: int, path: str, col: int = -1, tgt: int = 0, a: int = 0, b: int = 0,
            c: int = 0, d: int = 0) -> int:  # fmt: skip
        self.ops.append([kind, col, tgt, a, b, c, d, self._name(path), 0])
        return len(self.ops) - 1

    def _table(self, values: list[int] | tuple[int, ...]) -> int:
        off = len(self.ints)
        self.ints.extend(values)
        return off

    def _conv(self, w: Schema, r: Schema) -> tuple[str, Any]:
        src = w if self.conv_from_writer else r
        if src.logical and w.type == r.type:
            key = f"{src.type}-{src.logical}"
            conv = _LOGICAL_CONV.get(key)
            if conv == "decimal":
                return "decimal", (int(src.props["precision"]), int(src.props.get("scale", 0)))
            if conv is not None:
                return conv, None
        t = r.type
        if t == "boolean":
            return "bool", None
        if t in ("int", "long"):
            return "int", None
        if t in ("float", "double"):
            return "float", None
        if t == "string":
            return "str", None
        if t == "enum":
            return "enum", r.symbols
        return "bytes", None

    def _fail(self, path: str, w: Schema, r: Schema, why: str = "") -> ConfigError:
        wn = w.fullname or w.type
        rn = r.fullname or r.type
        where = f"field {path!r}" if path else "the top-level schema"
        return ConfigError(f"cannot resolve {where}: writer type {wn} vs reader type {rn}{why}")

    # -- the compiler -----------------------------------------------------
    def compile(self, w: Schema, r: Shape, path: str) -> tuple[int, Node | None]:
        """Op reading writer ``w`` into reader shape ``r``, plus its layout node."""
        key = (id(w), id(r))
        if key in self._memo:
            return self._memo[key]
        self._keep.append((w, r))  # ids in memo keys stay valid
        if r.kind == "object":
            return self._object(w, r, path)
        if w.type == "union" and r.kind != "union":
            return self._writer_union(w, r, path)
        if r.kind == "union":
            return self._reader_union(w, r, path)
        if r.kind == "null":
            if w.type != "null":
                raise self._fail(path, w, r.schema)
            return self._op(K_NULL, path), ValueNode(-1, "null")
        if r.kind == "value":
            return self._scalar(w, r, path)
        if r.kind == "record":
            return self._record(w, r, path)
        if r.kind == "list":
            if w.type != "array":
                raise self._fail(path, w, r.schema)
            op = self._op(K_ARRAY, path, col=r.col)
            self._memo[key] = (op, None)
            assert r.item is not None
            item, item_node = self.compile(w.items, r.item, f"{path}[]")  # type: ignore[arg-type]
            self.ops[op][3] = item
            self.ops[op][5] = _leaf_col(r.item)
            lnode: Node | None = None if r.discard else ListNode(r.col, item_node)  # type: ignore[arg-type]
            self._memo[key] = (op, lnode)
            return op, lnode
        if r.kind == "map":
            if w.type != "map":
                raise self._fail(path, w, r.schema)
            op = self._op(K_MAP, path, col=r.col, c=r.key_col)
            self._memo[key] = (op, None)
            assert r.item is not None
            value, value_node = self.compile(w.items, r.item, f"{path}{{}}")  # type: ignore[arg-type]
            self.ops[op][3] = value
            mnode: Node | None = None
            if not r.discard:
                mnode = MapNode(r.col, ValueNode(r.key_col, "str"), value_node)  # type: ignore[arg-type]
            self._memo[key] = (op, mnode)
            return op, mnode
        raise AssertionError(r.kind)

    def _scalar(self, w: Schema, r: Shape, path: str) -> tuple[int, Node | None]:
        rs = r.schema
        if not matches(w, rs) or w.type == "union":
            raise self._fail(path, w, rs)
        col = r.col
        tgt = _SCALAR_KIND[rs.type]
        node: Node | None = None
        if not r.discard:
            conv, arg = self._conv(w, rs)
            node = ValueNode(col, conv, arg)
        t = w.type
        if t == "boolean":
            op = self._op(K_BOOL, path, col=col)
        elif t == "int":
            op = self._op(K_INT, path, col=col, tgt=tgt)
        elif t == "long":
            op = self._op(K_LONG, path, col=col, tgt=tgt)
        elif t == "float":
            op = self._op(K_FLOAT, path, col=col, tgt=tgt)
        elif t == "double":
            op = self._op(K_DOUBLE, path, col=col, tgt=tgt)
        elif t in ("bytes", "string"):
            utf8 = rs.type == "string" or t == "string"
            op = self._op(K_BYTES, path, col=col, b=1 if utf8 else 0)
        elif t == "fixed":
            op = self._op(K_FIXED, path, col=col, a=w.size)
        elif t == "enum":
            table = []
            for sym in w.symbols:
                if sym in rs.symbols:
                    table.append(rs.symbols.index(sym))
                elif rs.enum_default is not None:
                    table.append(rs.symbols.index(rs.enum_default))
                else:
                    table.append(-1)
            op = self._op(K_ENUM, path, col=col, a=self._table(table), b=len(w.symbols))
        else:
            raise self._fail(path, w, rs)
        return op, node

    def _record(self, w: Schema, r: Shape, path: str) -> tuple[int, Node | None]:
        rs = r.schema
        if w.type != "record" or not _names_match(w, rs):
            raise self._fail(path, w, rs)
        op = self._op(K_RECORD, path, col=r.col)
        self._memo[(id(w), id(r))] = (op, None)
        by_name: dict[str, tuple[Field, Shape]] = {}
        by_alias: dict[str, tuple[Field, Shape]] = {}
        for f, sub in r.fields:
            by_name[f.name] = (f, sub)
            for a in f.aliases:
                by_alias[a] = (f, sub)
        kids: list[int] = []
        nodes: dict[str, Node | None] = {}
        seen: set[str] = set()
        for wf in w.fields:
            match = by_name.get(wf.name) or by_alias.get(wf.name)
            sub_path = f"{path}.{wf.name}" if path else wf.name
            if match is not None and match[0].name not in seen:
                rf, sub = match
                seen.add(rf.name)
                kid, node = self.compile(wf.type, sub, sub_path)
                nodes[rf.name] = node
            else:
                kid, _ = self.compile(wf.type, _discard_shape(wf.type, {}), sub_path)
            kids.append(kid)
        for rf, sub in r.fields:
            if rf.name in seen:
                continue
            sub_path = f"{path}.{rf.name}" if path else rf.name
            if not rf.has_default:
                raise ConfigError(
                    f"cannot resolve field {sub_path!r}: the writer schema lacks it and the "
                    "reader schema gives no default"
                )
            try:
                data = encode_default(rf.type, rf.default)
            except Exception as exc:
                raise ConfigError(f"invalid default for field {sub_path!r}: {exc}") from None
            saved = self.conv_from_writer
            self.conv_from_writer = True  # fastavro returns defaults raw
            try:
                inner, node = self.compile(_strip_logical(rf.type), sub, sub_path)
            finally:
                self.conv_from_writer = saved
            off = len(self.blob)
            self.blob += data
            kids.append(self._op(K_DEFAULT, sub_path, a=off, b=len(data), c=inner))
            nodes[rf.name] = node
        self.ops[op][3] = self._table(kids)
        self.ops[op][4] = len(kids)
        layout = None
        if not r.discard:
            layout = RecordNode(tuple((f.name, nodes[f.name]) for f, _ in r.fields), r.col)  # type: ignore[misc]
        self._memo[(id(w), id(r))] = (op, layout)
        return op, layout

    def _writer_union(self, w: Schema, r: Shape, path: str) -> tuple[int, Node | None]:
        table = []
        node: Node | None = None
        for b in w.branches:
            if matches(b, r.schema) and (b.type != "null" or r.kind == "null"):
                try:
                    kid, n = self.compile(b, r, path)
                except ConfigError:
                    kid, n = BRANCH_UNRESOLVED, None
                if node is None:
                    node = n
            else:
                kid = BRANCH_UNRESOLVED
            table.append(kid)
        if all(k == BRANCH_UNRESOLVED for k in table):
            raise self._fail(path, w, r.schema, ": no writer branch matches")
        if node is None and r.kind == "null":
            node = ValueNode(-1, "null")
        op = self._op(K_UNION, path, a=self._table(table), b=len(table))
        return op, node

    def _reader_union(self, w: Schema, r: Shape, path: str) -> tuple[int, Node | None]:
        rs = r.schema
        fill_off = self._table(r.null_fill)
        branches = w.branches if w.type == "union" else [w]
        table = []
        node: Node | None = None
        for b in branches:
            kid = BRANCH_UNRESOLVED
            for i, rb in enumerate(rs.branches):
                if not matches(b, rb):
                    continue
                if rb.type == "null":
                    kid = BRANCH_NULL if b.type == "null" else BRANCH_UNRESOLVED
                else:
                    sub = r.fields[i][1] if r.discard else r.item
                    assert sub is not None
                    try:
                        kid, n = self.compile(b, sub, path)
                        node = node or n
                    except ConfigError:
                        kid = BRANCH_UNRESOLVED
                break
            table.append(kid)
        if all(k == BRANCH_UNRESOLVED for k in table):
            raise self._fail(path, w, rs, ": no branch matches")
        if node is None and not r.discard:
            # the writer only ever writes null: still describe the columns
            node = _null_layout(r, self)
        if w.type == "union":
            op = self._op(K_UNION, path, a=self._table(table), b=len(table), c=fill_off,
                          d=len(r.null_fill))  # fmt: skip
        elif table[0] == BRANCH_NULL:
            op = self._op(K_NULLFILL, path, c=fill_off, d=len(r.null_fill))
        else:
            op = table[0]
        return op, node

    def _object(self, w: Schema, r: Shape, path: str) -> tuple[int, Node | None]:
        inner, _ = self.compile(w, _discard_shape(r.schema, {}), path)
        op = self._op(K_OBJECT, path, col=r.col, a=inner)
        if r.col >= 0:
            self.converters[r.col] = _ObjectConverter(w, r.schema)
            return op, ObjectNode(r.col)
        return op, None

    def finish(self, root: int, layout: Node, spec: list[tuple[str, int, bool]]) -> Program:
        _compute_minsize(self.ops, self.ints)
        convs = tuple(self.converters.get(i) for i in range(len(spec)))
        return Program(
            ops=[tuple(o) for o in self.ops],
            ints=list(self.ints),
            blob=bytes(self.blob),
            root=root,
            names=list(self.names),
            spec=tuple(spec),
            layout=layout,
            converters=convs,
        )


def _strip_logical(s: Schema) -> Schema:
    if s.logical is None:
        return s
    props = dict(s.props)
    props.pop("logicalType", None)
    clone = Schema(**{**s.__dict__, "logical": None, "props": props})
    return clone


def _leaf_col(s: Shape) -> int:
    """The column whose length counts a list's items."""
    if s.kind == "union":
        return _leaf_col(s.item) if s.item is not None else -1
    return s.col


def _null_layout(r: Shape, comp: Compiler) -> Node:
    """Layout for a shape no writer branch fills (only nulls arrive)."""
    if r.kind == "union":
        return _null_layout(r.item, comp) if r.item is not None else ValueNode(-1, "null")
    if r.kind == "value":
        conv, arg = comp._conv(r.schema, r.schema)
        return ValueNode(r.col, conv, arg)
    if r.kind == "record":
        return RecordNode(tuple((f.name, _null_layout(s, comp)) for f, s in r.fields), r.col)
    if r.kind == "list":
        return ListNode(r.col, _null_layout(r.item, comp))  # type: ignore[arg-type]
    if r.kind == "map":
        return MapNode(r.col, ValueNode(r.key_col, "str"), _null_layout(r.item, comp))  # type: ignore[arg-type]
    if r.kind == "object":
        return ObjectNode(r.col)
    return ValueNode(-1, "null")


_FIXED_MIN = {K_NULL: 0, K_BOOL: 1, K_INT: 1, K_LONG: 1, K_FLOAT: 4, K_DOUBLE: 8, K_BYTES: 1,
              K_ENUM: 1, K_ARRAY: 1, K_MAP: 1, K_UNION: 1, K_DEFAULT: 0, K_NULLFILL: 0}  # fmt: skip


def _compute_minsize(ops: list[list[int]], ints: list[int]) -> None:
    """Smallest encoding of each op (bounds block counts of arrays and maps)."""
    done: dict[int, int] = {}

    def size(i: int, active: set[int]) -> int:
        if i in done:
            return done[i]
        if i in active:
            return 0
        o = ops[i]
        k = o[0]
        if k == K_FIXED:
            v = o[3]
        elif k == K_RECORD:
            active.add(i)
            v = sum(size(ints[o[3] + j], active) for j in range(o[4]))
            active.discard(i)
        elif k == K_OBJECT:
            active.add(i)
            v = size(o[3], active)
            active.discard(i)
        else:
            v = _FIXED_MIN[k]
        done[i] = v
        return v

    for i in range(len(ops)):
        ops[i][8] = size(i, set())


# ----------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------


def compile_schema(
    reader: Schema, writer: Schema | None = None, conv_from_writer: bool = True
) -> Program:
    """Compile reader (and optional writer) schemas to a Program."""
    builder = _ShapeBuilder()
    shape = builder.build(reader, "" if reader.type == "record" else "value", False, ())
    comp = Compiler(conv_from_writer)
    root, layout = comp.compile(writer if writer is not None else reader, shape, "")
    if layout is None:
        layout = _null_layout(shape, comp)
    return comp.finish(root, layout, builder.spec)
