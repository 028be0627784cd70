"""kfast.ProtobufDecoder against google's protobuf runtime (upb).

Every payload google accepts (and that is not one of the documented stricter
cases) must decode to ``expected(google_message)``; every payload google
rejects must be a RowError.
"""

from __future__ import annotations

import pytest
from _protobuf_support import (
    EXAMPLES,
    check_decoded,
    compiled,
    expected,
    messages,
    normalize,
    parse_google,
    payloads,
    varint,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kfast
from kfast.protobuf import ProtobufDecoder

pb3 = compiled("kfpb3")
pb2 = compiled("kfpb2")
pbed = compiled("kfpbed")

SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_DECODERS: dict[str, ProtobufDecoder] = {}


def decoder(cls) -> ProtobufDecoder:
    name = cls.DESCRIPTOR.full_name
    if name not in _DECODERS:
        _DECODERS[name] = ProtobufDecoder(cls)
    return _DECODERS[name]


def check_batch(cls, blobs: list[bytes]) -> None:
    check_decoded(cls, decoder(cls), blobs)


ALL_TYPES = [
    pb3.Everything,
    pb3.Scalars,
    pb3.Optionals,
    pb3.Repeateds,
    pb3.Maps,
    pb3.Tree,
    pb3.Mid,
    pb2.P2,
    pbed.Ed,
]


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.DESCRIPTOR.full_name)
def test_differential_random_messages(cls) -> None:
    @SETTINGS
    @given(st.lists(payloads(cls.DESCRIPTOR), min_size=1, max_size=8))
    def run(blobs: list[bytes]) -> None:
        check_batch(cls, blobs)

    run()


def test_every_scalar_type_roundtrip() -> None:
    m = pb3.Scalars(
        f_double=-1.5,
        f_float=0.1,
        f_int64=-(2**63),
        f_uint64=2**64 - 1,
        f_int32=-(2**31),
        f_fixed64=2**64 - 1,
        f_fixed32=2**32 - 1,
        f_bool=True,
        f_string="żółw 🐢",
        f_bytes=b"\x00\xff",
        f_uint32=2**32 - 1,
        f_enum=pb3.NEGATIVE,
        f_sfixed32=-5,
        f_sfixed64=-(2**62),
        f_sint32=-(2**31),
        f_sint64=2**63 - 1,
    )
    row = decoder(pb3.Scalars).decode([m.SerializePartialToString()]).to_pylist()[0]
    assert row == expected(m)
    assert row["f_float"] == pytest.approx(0.1, rel=1e-7) and row["f_float"] != 0.1
    assert row["f_enum"] == "NEGATIVE"
    assert row["f_uint64"] == 2**64 - 1


def test_defaults_and_presence() -> None:
    rows = decoder(pb3.Everything).decode([b""]).to_pylist()
    assert rows == [expected(pb3.Everything())]
    assert rows[0]["scalars"] is None and rows[0]["inners"] == [] and rows[0]["last"] == 0
    sc = decoder(pb3.Scalars).decode([b""]).to_pylist()[0]
    assert sc["f_enum"] == "COLOR_UNSPECIFIED" and sc["f_string"] == "" and sc["f_bytes"] == b""
    op = decoder(pb3.Optionals).decode([b""]).to_pylist()[0]
    assert set(op.values()) == {None}
    p2 = decoder(pb2.P2).decode([b"\x08\x01"]).to_pylist()[0]
    # proto2: unset fields with explicit presence are None even with a [default]
    assert p2["name"] is None and p2["level"] is None and p2["id"] == 1


def test_unknown_enum_numbers() -> None:
    # open enum: unknown numbers stay ints
    blob = b"\x70" + varint(12345)  # f_enum = 12345
    assert decoder(pb3.Scalars).decode([blob]).to_pylist()[0]["f_enum"] == 12345
    # closed enum: an unknown number leaves the field unset / drops the element / entry
    lvl = pb2.P2.DESCRIPTOR.fields_by_name
    blob = b"\x08\x01" + b"\x18\x05" + b"\x18\x07"  # level = MID then 7 (unknown)
    blob += (
        b"\x20\x01\x20\x09\x2a\x02\x05\x07"  # levels 1, 9 (dropped), packed_levels 5, 7 (dropped)
    )
    blob += b"\x7a\x04\x08\x01\x10\x02"  # small_map {1: 2(unknown)} -> entry dropped
    assert lvl["level"].enum_type.is_closed
    check_batch(pb2.P2, [blob])
    row = decoder(pb2.P2).decode([blob]).to_pylist()[0]
    assert row["level"] == "MID" and row["levels"] == ["LOW"] and row["packed_levels"] == ["MID"]
    assert row["small_map"] == {}


def test_packed_and_unpacked_both_accepted() -> None:
    packed = b"\x2a\x03\x01\x02\x03"  # r_int32 (5) packed
    unpacked = b"\x28\x01\x28\x02\x28\x03"
    u_packed = b"\xaa\x01\x03\x01\x02\x03"  # u_int32 (21, [packed=false]) sent packed
    rows = (
        decoder(pb3.Repeateds).decode([packed, unpacked, u_packed, packed + unpacked]).to_pylist()
    )
    assert [r["r_int32"] for r in rows] == [[1, 2, 3], [1, 2, 3], [], [1, 2, 3, 1, 2, 3]]
    assert rows[2]["u_int32"] == [1, 2, 3]
    check_batch(pb3.Repeateds, [packed, unpacked, u_packed, packed + unpacked])
    fixed = b"\x3a\x08" + b"\x01\x00\x00\x00\xff\xff\xff\xff" + b"\x3d\x02\x00\x00\x00"
    assert decoder(pb3.Repeateds).decode([fixed]).to_pylist()[0]["r_fixed32"] == [1, 2**32 - 1, 2]


def test_last_value_wins_and_messages_merge() -> None:
    a = pb3.Everything(
        inner=pb3.Inner(a=1, s="x", r=[1]), mid=pb3.Mid(leaf=pb3.Leaf(x=1.0)), last=1
    )
    b = pb3.Everything(inner=pb3.Inner(a=2, r=[2], b=True), mid=pb3.Mid(n=5), last=2)
    blob = a.SerializeToString() + b.SerializeToString()
    row = decoder(pb3.Everything).decode([blob]).to_pylist()[0]
    assert row["inner"] == {"a": 2, "s": "x", "r": [1, 2], "b": True, "c": "COLOR_UNSPECIFIED"}
    assert row["mid"]["leaf"] == {"x": 1.0, "tag": None} and row["mid"]["n"] == 5
    assert row["last"] == 2
    check_batch(pb3.Everything, [blob])


def test_oneof_switching() -> None:
    parts = [
        pb3.Everything(c_leaf=pb3.Leaf(x=1.0, tag="t")),
        pb3.Everything(c_string="s"),
        pb3.Everything(c_leaf=pb3.Leaf(x=2.0)),  # fresh: tag must not come back
        pb3.Everything(c_inner=pb3.Inner(r=[1])),
        pb3.Everything(c_int=7),
        pb3.Everything(c_inner=pb3.Inner(r=[2])),  # fresh: r == [2]
    ]
    blobs = []
    acc = b""
    for p in parts:
        acc += p.SerializeToString()
        blobs.append(acc)
    check_batch(pb3.Everything, blobs)
    rows = decoder(pb3.Everything).decode(blobs).to_pylist()
    assert rows[2]["c_leaf"] == {"x": 2.0, "tag": None} and rows[2]["c_string"] is None
    assert rows[5]["c_inner"]["r"] == [2] and rows[5]["c_int"] is None


def test_map_duplicate_keys_last_wins() -> None:
    e1 = pb3.Maps(m_str_int={"a": 1, "b": 2}, m_int_str={5: "x"})
    e2 = pb3.Maps(m_str_int={"a": 3}, m_int_str={5: "y", 6: "z"})
    blob = e1.SerializeToString() + e2.SerializeToString() + e1.SerializeToString()
    batch = decoder(pb3.Maps).decode([blob])
    row = batch.to_pylist()[0]
    assert row["m_str_int"] == {"a": 1, "b": 2} and row["m_int_str"] == {5: "x", 6: "z"}
    # the columns themselves hold each key once
    assert len(batch.column("m_str_int.key")) == 2
    check_batch(pb3.Maps, [blob])


def test_groups_and_editions_delimited() -> None:
    m = pb2.P2(id=3)
    m.g.gx = 4
    m.g.gs = "gg"
    m.rg.add(rx=-1)
    m.rg.add(rx=2)
    e = pbed.Ed(
        delimited=pbed.Part(n=1, label="d"),
        delimited_list=[pbed.Part(n=2)],
        closed=2,
        part=pbed.Part(n=3),
    )
    rows2 = decoder(pb2.P2).decode([m.SerializePartialToString()]).to_pylist()
    assert rows2[0]["g"] == {"gx": 4, "gs": "gg"} and rows2[0]["rg"] == [{"rx": -1}, {"rx": 2}]
    check_batch(pb2.P2, [m.SerializePartialToString()])
    check_batch(pbed.Ed, [e.SerializeToString()])
    row = decoder(pbed.Ed).decode([e.SerializeToString()]).to_pylist()[0]
    assert row["delimited"] == {"n": 1, "label": "d"} and row["closed"] == "CLOSED_TWO"


def test_recursive_messages_are_objects() -> None:
    t = pb3.Tree(value=1, children=[pb3.Tree(value=2, left=pb3.Tree(value=3))])
    t.left.children.add(value=4)
    dec = decoder(pb3.Tree)
    row = dec.decode([t.SerializeToString()]).to_pylist()[0]
    assert row == expected(t)
    assert row["children"][0]["left"]["value"] == 3


def test_unknown_fields_of_every_wire_type_are_skipped() -> None:
    unknown = (
        b"\xf8\x07\x96\x01"  # 127: varint
        b"\xf9\x07"
        + b"\x00" * 8  # fixed64
        + b"\xfa\x07\x02ab"  # length-delimited
        + b"\xfd\x07\x00\x00\x00\x00"  # fixed32
        + b"\xfb\x07\x08\x01\x0b\x10\x02\x0c\xfc\x07"  # group with a nested group
    )
    blob = b"\x08\x07" + unknown + b"\x08\x05"
    rows = decoder(pb3.Tree).decode([blob]).to_pylist()
    assert rows[0]["value"] == 5
    check_batch(pb3.Tree, [blob])


BAD = {
    "truncated varint": b"\x08\xff",
    "truncated fixed64": b"\x09\x00\x00",
    "length past end": b"\x0a\x05ab",
    "field zero": b"\x00\x01",
    "wire type 6": b"\x0e",
    "wire type 7": b"\x0f",
    "unmatched end group": b"\x0c",
    "unterminated group": b"\xfb\x07\x08\x01",
    "tag too long": b"\x80\x80\x80\x80\x80\x01",
    "varint too long": b"\x08" + b"\xff" * 10 + b"\x01",
    "bad utf8": b"\x4a\x02\xc3\x28",  # f_string (9) of Scalars
    # upb reads length prefixes as varints of at most 5 bytes (even overlong zeros)
    "length prefix 6 bytes": b"\x4a" + b"\x80" * 5 + b"\x00",
    "unknown length prefix 6 bytes": b"\xfa\x07" + b"\x80" * 5 + b"\x00",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_payloads_are_row_errors(name: str) -> None:
    good = pb3.Scalars(f_int32=1).SerializeToString()
    batch = decoder(pb3.Scalars).decode([good, BAD[name], good])
    assert batch.num_rows == 2 and list(batch.source_indices) == [0, 2]
    assert [e.index for e in batch.errors] == [1]
    assert " at byte " in batch.errors[0].reason
    assert parse_google(pb3.Scalars, BAD[name]) is None
    assert batch.to_pylist() == [expected(pb3.Scalars(f_int32=1))] * 2


def test_wrong_wire_type_is_a_row_error() -> None:
    # google keeps a wrongly typed known field as an unknown field; kfast refuses it
    blob = b"\x2d\x01\x00\x00\x00"  # f_int32 (5) as fixed32
    batch = decoder(pb3.Scalars).decode([blob])
    assert batch.errors[0].reason.startswith("wrong wire type")


def _nested(depth: int) -> bytes:
    blob = b"\x08\x01"
    for _ in range(depth):
        blob = b"\x1a" + varint(len(blob)) + blob  # Tree.left
    return blob


def test_nesting_limit() -> None:
    ok, too_deep = _nested(100), _nested(101)
    assert parse_google(pb3.Tree, ok) is not None and parse_google(pb3.Tree, too_deep) is None
    batch = decoder(pb3.Tree).decode([ok, too_deep])
    assert batch.num_rows == 1 and batch.errors[0].index == 1
    assert "deeper than max_depth" in batch.errors[0].reason
    shallow = ProtobufDecoder(pb3.Tree, max_depth=5)
    batch = shallow.decode([_nested(5), _nested(6)])
    assert batch.num_rows == 1 and [e.index for e in batch.errors] == [1]
    with pytest.raises(kfast.ConfigError, match="max_depth"):
        ProtobufDecoder(pb3.Tree, max_depth=0)


def test_descriptor_input_and_batch_reuse() -> None:
    dec = ProtobufDecoder(pb3.Inner.DESCRIPTOR)
    blobs = [pb3.Inner(a=i, s=str(i), r=[i] * i).SerializeToString() for i in range(50)]
    b1 = dec.decode(blobs)
    rows = b1.to_pylist()
    b2 = dec.decode(blobs[::-1], out=b1)
    assert b2 is b1 and b2.to_pylist() == rows[::-1]
    assert kfast.ProtobufDecoder is ProtobufDecoder
    with pytest.raises(kfast.ConfigError):
        ProtobufDecoder(object())


def test_columns_and_buffers() -> None:
    m = pb3.Everything(inner=pb3.Inner(a=5, r=[1, 2]), inners=[pb3.Inner(a=1), pb3.Inner(a=2)])
    batch = decoder(pb3.Everything).decode([m.SerializeToString(), b""])
    names = batch.names
    for col in (
        "inner",
        "inner.a",
        "inner.r",
        "inner.r.item",
        "inners",
        "inners.item",
        "inners.item.a",
    ):
        assert col in names
    assert list(memoryview(batch.column("inner.a"))) == [5, 0]
    assert batch.column("inner").to_pylist() == [True, False]
    assert list(memoryview(batch.column("inners.item.a"))) == [1, 2]


def test_to_arrow_smoke() -> None:
    pa = pytest.importorskip("pyarrow")
    m = pb3.Everything(scalars=pb3.Scalars(f_int32=3, f_string="x"), inners=[pb3.Inner(a=1)])
    rb = decoder(pb3.Everything).decode([m.SerializeToString(), b""]).to_arrow()
    assert isinstance(rb, pa.RecordBatch) and rb.num_rows == 2


def _read_varint(b: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        byte = b[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, i
        shift += 7


def _skip_group(b: bytes, i: int, num: int) -> int:
    """Offset just past the end-group tag of group ``num`` starting at ``i``."""
    while True:
        tag, i = _read_varint(b, i)
        if tag & 7 == 4 and tag >> 3 == num:
            return i
        wt = tag & 7
        if wt == 0:
            _, i = _read_varint(b, i)
        elif wt == 2:
            n, i = _read_varint(b, i)
            i += n
        elif wt == 3:
            i = _skip_group(b, i, tag >> 3)
        else:
            i += 8 if wt == 1 else 4


def _elements(wire: int, data: bytes) -> list[bytes]:
    """Split a packed payload into the raw bytes of its elements."""
    out, i = [], 0
    while i < len(data):
        if wire == 0:
            _, j = _read_varint(data, i)
        else:
            j = i + (8 if wire == 1 else 4)
        out.append(data[i:j])
        i = j
    return out


def reencode(desc, blob: bytes, pack: bool) -> bytes:
    """Rewrite every top-level repeated scalar field packed (or unpacked),
    whatever the schema's own encoding is; other fields are copied."""
    from google.protobuf.descriptor import FieldDescriptor as FD

    _v = varint

    packable = {
        fd.number: {1: 1, 6: 1, 16: 1, 2: 5, 7: 5, 15: 5}.get(fd.type, 0)
        for fd in desc.fields
        if fd.is_repeated
        and fd.type not in (FD.TYPE_STRING, FD.TYPE_BYTES, FD.TYPE_MESSAGE)
        and fd.type != FD.TYPE_GROUP
    }
    out, i = bytearray(), 0
    while i < len(blob):
        tag, j = _read_varint(blob, i)
        num, wt = tag >> 3, tag & 7
        if wt == 3:
            end = _skip_group(blob, j, num)
            value = b""
        elif wt == 2:
            n, k = _read_varint(blob, j)
            value, end = blob[k : k + n], k + n
        elif wt == 0:
            _, end = _read_varint(blob, j)
            value = blob[j:end]
        else:
            end = j + (8 if wt == 1 else 4)
            value = blob[j:end]
        if num in packable:
            ew = packable[num]
            elems = _elements(ew, value) if wt == 2 else [value]
            if pack:
                data = b"".join(elems)
                out += _v(num << 3 | 2) + _v(len(data)) + data
            else:
                for e in elems:
                    out += _v(num << 3 | ew) + e
        else:
            out += blob[i:end]
        i = end
    return bytes(out)


@pytest.mark.parametrize("cls", [pb3.Repeateds, pb2.P2, pbed.Ed], ids=lambda c: c.DESCRIPTOR.name)
def test_both_encodings_of_every_repeated_scalar(cls) -> None:
    msgs = st.lists(messages(cls.DESCRIPTOR, 0, 1), min_size=1, max_size=2)
    blobs = msgs.map(lambda ms: b"".join(m.SerializePartialToString() for m in ms))

    @SETTINGS
    @given(blobs, st.booleans())
    def run(blob: bytes, pack: bool) -> None:
        other = reencode(cls.DESCRIPTOR, blob, pack)
        check_batch(cls, [blob, other])
        a, b = decoder(cls).decode([blob, other]).to_pylist()
        assert normalize(a) == normalize(b)

    run()


@pytest.mark.parametrize("cls", [pb3.Everything, pb2.P2], ids=lambda c: c.DESCRIPTOR.name)
def test_object_fallback_everywhere(cls) -> None:
    """With a tiny column budget every message field is an OBJECT column: the
    raw-bytes path (validation, merging, oneof clearing) must agree too."""
    dec = ProtobufDecoder(cls, max_columns=3)
    kinds = {name: dec.decode([b""]).column(name).kind for name in dec.decode([b""]).names}
    assert "object" in kinds.values()

    @SETTINGS
    @given(st.lists(payloads(cls.DESCRIPTOR), min_size=1, max_size=6))
    def run(blobs: list[bytes]) -> None:
        check_decoded(cls, dec, blobs)

    run()


@pytest.mark.parametrize("cls", [pb3.Everything, pb2.P2], ids=lambda c: c.DESCRIPTOR.name)
def test_slice_of_nested_layouts(cls) -> None:
    """Batch.slice (used by bisection) on list<struct<list>> layouts."""

    @SETTINGS
    @given(st.lists(payloads(cls.DESCRIPTOR), min_size=1, max_size=6), st.data())
    def run(blobs: list[bytes], data) -> None:
        batch = decoder(cls).decode(blobs)
        rows = batch.to_pylist()
        a = data.draw(st.integers(0, batch.num_rows))
        b = data.draw(st.integers(a, batch.num_rows))
        part = batch.slice(a, b)
        assert normalize(part.to_pylist()) == normalize(rows[a:b])
        assert list(part.source_indices) == list(batch.source_indices)[a:b]

    run()
