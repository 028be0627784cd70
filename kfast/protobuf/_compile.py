"""Descriptor -> decode plan: the flat tables ``_decoder.pyx`` walks.

Run once per ``ProtobufDecoder``. Decisions (see docs/protobuf.md):

* singular scalar -> one column (nullable when the field has explicit presence);
* repeated scalar -> LIST column + ``name.item`` child;
* map<scalar, scalar> -> LIST column + ``name.key`` / ``name.value`` children;
* singular message -> STRUCT presence column ``name`` + dotted children
  (``name.field``), decoded into the enclosing frame's slots so repeated
  occurrences merge;
* repeated message -> LIST column + ``name.item`` STRUCT column + dotted
  element columns ``name.item.field``;
* OBJECT column (raw bytes, converted by google's runtime) for recursive
  messages, maps with message values, message oneof members whose subtree has
  repeated/map/object fields, and anything past ``max_columns``.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from kfast._layout import ListNode, MapNode, ObjectNode, RecordNode, ValueNode
from kfast.protobuf._convert import field_converter

FD = FieldDescriptor

# kfast._columns ColKind
COL_BOOL, COL_INT32, COL_INT64, COL_FLOAT32, COL_FLOAT64 = 1, 2, 3, 4, 5
COL_BINARY, COL_LIST, COL_OBJECT, COL_STRUCT = 6, 7, 8, 9

# _decoder.pxd FieldMode / CloseOp
M_SCALAR, M_REP_SCALAR, M_INLINE, M_LIST_MSG, M_MAP, M_OBJECT = 1, 2, 3, 4, 5, 6
OP_SCALAR, OP_STRUCT, OP_LIST, OP_MAP, OP_OBJECT = 1, 2, 3, 4, 5

# struct sizes in int32 words (every member is 32 bits)
PFIELD_WORDS, PMSG_WORDS, POP_WORDS, VTYPE_WORDS, VFIELD_WORDS = 15, 8, 8, 2, 6

KIND: dict[int, tuple[int, str]] = {
    FD.TYPE_DOUBLE: (COL_FLOAT64, "float"),
    FD.TYPE_FLOAT: (COL_FLOAT32, "float"),
    FD.TYPE_INT64: (COL_INT64, "int"),
    FD.TYPE_UINT64: (COL_INT64, "uint64"),
    FD.TYPE_INT32: (COL_INT32, "int"),
    FD.TYPE_FIXED64: (COL_INT64, "uint64"),
    FD.TYPE_FIXED32: (COL_INT32, "uint32"),
    FD.TYPE_BOOL: (COL_BOOL, "bool"),
    FD.TYPE_STRING: (COL_BINARY, "str"),
    FD.TYPE_BYTES: (COL_BINARY, "bytes"),
    FD.TYPE_UINT32: (COL_INT32, "uint32"),
    FD.TYPE_ENUM: (COL_INT32, "enum"),
    FD.TYPE_SFIXED32: (COL_INT32, "int"),
    FD.TYPE_SFIXED64: (COL_INT64, "int"),
    FD.TYPE_SINT32: (COL_INT32, "int"),
    FD.TYPE_SINT64: (COL_INT64, "int"),
}

# Well-known types stored as one column (see docs/protobuf.md): the message is
# decoded into hidden columns as usual, then ``_decoder`` derives the visible
# column from them (D_* codes, mirrored in _decoder.pyx).
D_TIMESTAMP, D_DURATION, D_WRAPPER = 1, 2, 3
WKT_DERIVED: dict[str, int] = {
    "google.protobuf.Timestamp": D_TIMESTAMP,
    "google.protobuf.Duration": D_DURATION,
    **{
        f"google.protobuf.{w}Value": D_WRAPPER
        for w in (
            "Double",
            "Float",
            "Int64",
            "UInt64",
            "Int32",
            "UInt32",
            "Bool",
            "String",
            "Bytes",
        )
    },
}
# JSON-shaped well-known types: an OBJECT column of their JSON value.
WKT_JSON = frozenset(
    {"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"}
)

WIRE: dict[int, int] = {t: 0 for t in KIND}
WIRE.update(
    {
        FD.TYPE_DOUBLE: 1,
        FD.TYPE_FIXED64: 1,
        FD.TYPE_SFIXED64: 1,
        FD.TYPE_FLOAT: 5,
        FD.TYPE_FIXED32: 5,
        FD.TYPE_SFIXED32: 5,
        FD.TYPE_STRING: 2,
        FD.TYPE_BYTES: 2,
        FD.TYPE_MESSAGE: 2,
        FD.TYPE_GROUP: 3,
    }
)
_MESSAGE_TYPES = (FD.TYPE_MESSAGE, FD.TYPE_GROUP)
_LEN_TYPES = (FD.TYPE_STRING, FD.TYPE_BYTES, FD.TYPE_MESSAGE, FD.TYPE_GROUP)
DENSE_LOOKUP_LIMIT = 1024


def is_map(fd: Any) -> bool:
    return (
        fd.type == FD.TYPE_MESSAGE
        and fd.message_type is not None
        and fd.message_type.GetOptions().map_entry
    )


@dataclass
class Plan:
    """Everything ``ProtobufDecoderBase._load`` installs."""

    fields: bytes
    msgs: bytes
    lookup: bytes
    ops: bytes
    enum_off: bytes
    enum_len: bytes
    enum_vals: bytes
    vtypes: bytes
    vfields: bytes
    stack_need: int
    max_depth: int
    spec: tuple[tuple[str, int, bool], ...]
    layout: RecordNode
    converters: tuple[Any, ...]
    # (D_* code, presence column, source column, second source or -1, derived column)
    derived: tuple[tuple[int, int, int, int, int], ...] = ()
    field_size: int = PFIELD_WORDS * 4
    msg_size: int = PMSG_WORDS * 4


class _Frame:
    """Slots and close ops of one frame (a payload or one repeated-message element)."""

    def __init__(self) -> None:
        self.nslots = 0
        self.ops: list[list[int]] = []
        self.children: list[int] = []

    def alloc(self) -> int:
        self.nslots += 1
        return self.nslots - 1


class _Compiler:
    def __init__(self, max_columns: int) -> None:
        self.max_columns = max_columns
        self.spec: list[tuple[str, int, bool]] = []
        self.converters: list[Any] = []
        self.fields: list[list[int]] = []
        self.msgs: list[list[int]] = []
        self.lookup: list[int] = []
        self.ops: list[list[int]] = []
        self.enum_index: dict[str, int] = {}
        self.enum_off: list[int] = []
        self.enum_len: list[int] = []
        self.enum_vals: list[int] = []
        self.vtype_index: dict[str, int] = {}
        self.vtypes: list[list[int]] = []
        self.vfields: list[list[int]] = []
        self.in_oneof_member = 0
        self.derived: list[tuple[int, int, int, int, int]] = []

    # ------------------------------------------------------------ helpers

    def col(self, name: str, kind: int, nullable: bool, converter: Any = None) -> int:
        self.spec.append((name, kind, bool(nullable)))
        self.converters.append(converter)
        return len(self.spec) - 1

    def enum_set(self, fd: Any) -> int:
        if fd.type != FD.TYPE_ENUM or not fd.enum_type.is_closed:
            return -1
        key = fd.enum_type.full_name
        if key not in self.enum_index:
            values = sorted({v.number for v in fd.enum_type.values})
            self.enum_index[key] = len(self.enum_off)
            self.enum_off.append(len(self.enum_vals))
            self.enum_len.append(len(values))
            self.enum_vals.extend(values)
        return self.enum_index[key]

    @staticmethod
    def enum_arg(fd: Any) -> dict[int, str] | None:
        if fd.type != FD.TYPE_ENUM:
            return None
        return {n: v.name for n, v in fd.enum_type.values_by_number.items()}

    def value_node(self, col: int, fd: Any) -> ValueNode:
        return ValueNode(col, KIND[fd.type][1], self.enum_arg(fd))

    def vtype(self, desc: Descriptor) -> int:
        """Validation type for bytes kept raw (OBJECT fields)."""
        idx = self.vtype_index.get(desc.full_name)
        if idx is not None:
            return idx
        idx = len(self.vtypes)
        self.vtype_index[desc.full_name] = idx
        self.vtypes.append([0, 0])
        rows = []
        fd: Any
        for fd in sorted(desc.fields, key=lambda f: f.number):
            t = fd.type
            packed = -1
            if fd.is_repeated and t not in _LEN_TYPES:
                packed = {0: 0, 1: 8, 5: 4}[WIRE[t]]
            sub = self.vtype(fd.message_type) if t in _MESSAGE_TYPES else -1
            rows.append(
                [fd.number, WIRE[t], packed, int(t == FD.TYPE_STRING), sub, int(t == FD.TYPE_GROUP)]
            )
        self.vtypes[idx] = [len(self.vfields), len(rows)]
        self.vfields.extend(rows)
        return idx

    def appends(self, desc: Descriptor, ancestors: frozenset[str]) -> bool:
        """Would a flattened ``desc`` append to columns while decoding (lists, maps,
        raw bytes)? Such a message cannot be an inline oneof member, because
        switching members must be able to forget it."""
        fd: Any
        for fd in desc.fields:
            if fd.is_repeated:
                return True
            if fd.type in _MESSAGE_TYPES:
                sub = fd.message_type
                if sub.full_name in ancestors or self.appends(sub, ancestors | {sub.full_name}):
                    return True
        return False

    # ------------------------------------------------------------ messages

    def frame(self, desc: Descriptor, prefix: str, ancestors: frozenset[str]) -> tuple[int, Any]:
        fr = _Frame()
        mi, fields = self.message(desc, prefix, ancestors, fr)
        first_op = len(self.ops)
        for op in fr.ops:
            if op[0] == OP_STRUCT:
                op[6] += first_op
            self.ops.append(op)
        need = fr.nslots + max((self.msgs[ch][7] for ch in fr.children), default=0)
        self.msgs[mi][4:8] = [fr.nslots, first_op, len(fr.ops), need]
        return mi, fields

    def message(
        self, desc: Descriptor, prefix: str, ancestors: frozenset[str], fr: _Frame
    ) -> tuple[int, tuple[tuple[str, Any], ...]]:
        mi = len(self.msgs)
        self.msgs.append([0] * PMSG_WORDS)
        rows = []
        nodes = []
        oneof_slots: dict[str, int] = {}
        for fd in desc.fields:
            oneof = -1
            # a one-member oneof (proto3 ``optional``) never clears anything
            if fd.containing_oneof is not None and len(fd.containing_oneof.fields) > 1:
                key = fd.containing_oneof.full_name
                if key not in oneof_slots:
                    oneof_slots[key] = fr.alloc()
                oneof = oneof_slots[key]
            row, node = self.field(fd, prefix + fd.name, ancestors, fr, oneof)
            rows.append(row)
            nodes.append((fd.name, node))
        rows.sort(key=lambda r: r[0])
        first = len(self.fields)
        self.fields.extend(rows)
        max_num = rows[-1][0] if rows else 0
        lookup_len = min(max_num + 1, DENSE_LOOKUP_LIMIT) if rows else 0
        table = [-1] * lookup_len
        for k, row in enumerate(rows):
            if row[0] < lookup_len:
                table[row[0]] = first + k
        self.msgs[mi][0:4] = [first, len(rows), len(self.lookup), lookup_len]
        self.lookup.extend(table)
        return mi, tuple(nodes)

    def field(
        self, fd: Any, name: str, ancestors: frozenset[str], fr: _Frame, oneof: int
    ) -> tuple[list[int], Any]:
        t = fd.type
        # number mode ptype kptype wire packable slot slot_end col col2 col3 sub oneof enum group
        row = [fd.number, 0, t, 0, WIRE.get(t, 2), 0, -1, -1, -1, -1, -1, -1, oneof, -1, 0]
        node: Any
        if is_map(fd):
            kfd = fd.message_type.fields_by_number[1]
            vfd = fd.message_type.fields_by_number[2]
            if vfd.type in _MESSAGE_TYPES:
                return self.object_field(fd, name, row, fr, repeated=True)
            lc = self.col(name, COL_LIST, False)
            kc = self.col(name + ".key", KIND[kfd.type][0], False)
            vc = self.col(name + ".value", KIND[vfd.type][0], False)
            row[1], row[2], row[3], row[4] = M_MAP, vfd.type, kfd.type, 2
            row[8], row[9], row[10], row[13] = lc, kc, vc, self.enum_set(vfd)
            fr.ops.append([OP_MAP, kfd.type, -1, lc, kc, vc, 0, 0])
            node = MapNode(lc, self.value_node(kc, kfd), self.value_node(vc, vfd))
            return row, node
        if t in _MESSAGE_TYPES:
            sub = fd.message_type
            if sub.full_name in WKT_JSON:
                return self.object_field(fd, name, row, fr, repeated=fd.is_repeated)
            recursive = sub.full_name in ancestors
            over = self.in_oneof_member == 0 and len(self.spec) >= self.max_columns
            inner = ancestors | {sub.full_name}
            row[14] = int(t == FD.TYPE_GROUP)
            if fd.is_repeated:
                if recursive or over:
                    return self.object_field(fd, name, row, fr, repeated=True)
                lc = self.col(name, COL_LIST, False)
                ec = self.col(name + ".item", COL_STRUCT, False)
                smi, fields = self.frame(sub, name + ".item.", inner)
                fr.children.append(smi)
                row[1], row[8], row[9], row[11] = M_LIST_MSG, lc, ec, smi
                fr.ops.append([OP_LIST, 0, -1, lc, ec, -1, 0, 0])
                return row, ListNode(lc, self.derive(sub, RecordNode(fields, valid_col=ec)))
            if recursive or over or (oneof >= 0 and self.appends(sub, inner)):
                return self.object_field(fd, name, row, fr, repeated=False)
            sc = self.col(name, COL_STRUCT, True)
            slot = fr.alloc()
            op = [OP_STRUCT, 0, slot, sc, -1, -1, 0, 0]
            fr.ops.append(op)
            self.in_oneof_member += oneof >= 0
            smi, fields = self.message(sub, name + ".", inner, fr)
            self.in_oneof_member -= oneof >= 0
            op[6] = len(fr.ops)
            row[1], row[6], row[7], row[8], row[11] = M_INLINE, slot, fr.nslots, sc, smi
            return row, self.derive(sub, RecordNode(fields, valid_col=sc))
        kind = KIND[t][0]
        row[13] = self.enum_set(fd)
        if fd.is_repeated:
            lc = self.col(name, COL_LIST, False)
            cc = self.col(name + ".item", kind, False)
            row[1], row[5], row[8], row[9] = M_REP_SCALAR, int(t not in _LEN_TYPES), lc, cc
            fr.ops.append([OP_LIST, t, -1, lc, cc, -1, 0, 0])
            return row, ListNode(lc, self.value_node(cc, fd))
        c = self.col(name, kind, fd.has_presence)
        slot = fr.alloc()
        row[1], row[6], row[8] = M_SCALAR, slot, c
        fr.ops.append([OP_SCALAR, t, slot, c, -1, -1, 0, 0])
        return row, self.value_node(c, fd)

    def derive(self, sub: Descriptor, node: RecordNode) -> Any:
        """A Timestamp, Duration or wrapper message becomes one nullable column
        named like the message's presence column, which is renamed (hidden:
        no layout node reads it or its children)."""
        code = WKT_DERIVED.get(sub.full_name)
        if code is None:
            return node
        sc = node.valid_col
        name, _, _ = self.spec[sc]
        self.spec[sc] = (name + ".present", COL_STRUCT, self.spec[sc][2])
        cols: dict[str, Any] = dict(node.fields)
        if code == D_WRAPPER:
            inner = cols["value"]
            dc = self.col(name, self.spec[inner.col][1], True)
            self.derived.append((code, sc, inner.col, -1, dc))
            return ValueNode(dc, inner.conv, inner.arg)
        dc = self.col(name, COL_INT64, True)
        self.derived.append((code, sc, cols["seconds"].col, cols["nanos"].col, dc))
        return ValueNode(dc, "timestamp-micros" if code == D_TIMESTAMP else "duration-micros")

    def object_field(
        self, fd: Any, name: str, row: list[int], fr: _Frame, repeated: bool
    ) -> tuple[list[int], Any]:
        parent = message_factory.GetMessageClass(fd.containing_type)
        oc = self.col(name, COL_OBJECT, True, field_converter(parent, fd))
        row[1], row[8], row[11] = M_OBJECT, oc, self.vtype(fd.message_type)
        fr.ops.append([OP_OBJECT, 0, -1, oc, -1, -1, 0, int(repeated)])
        return row, ObjectNode(oc)


def _ints(rows: list[list[int]] | list[int], words: int = 1) -> bytes:
    flat: list[int] = []
    for r in rows:
        if isinstance(r, list):
            assert len(r) == words, (r, words)
            flat.extend(r)
        else:
            flat.append(r)
    # field numbers (first PField word) fit int32 (< 2**29)
    return array("i", flat).tobytes()


def compile_plan(desc: Descriptor, *, max_depth: int = 100, max_columns: int = 4096) -> Plan:
    comp = _Compiler(max_columns)
    root, fields = comp.frame(desc, "", frozenset({desc.full_name}))
    assert root == 0
    return Plan(
        fields=_ints(comp.fields, PFIELD_WORDS),
        msgs=_ints(comp.msgs, PMSG_WORDS),
        lookup=_ints(comp.lookup),
        ops=_ints(comp.ops, POP_WORDS),
        enum_off=_ints(comp.enum_off),
        enum_len=_ints(comp.enum_len),
        enum_vals=_ints(comp.enum_vals),
        vtypes=_ints(comp.vtypes, VTYPE_WORDS),
        vfields=_ints(comp.vfields, VFIELD_WORDS),
        stack_need=comp.msgs[0][7],
        max_depth=max_depth,
        spec=tuple(comp.spec),
        layout=RecordNode(fields),
        converters=tuple(comp.converters),
        derived=tuple(comp.derived),
    )
