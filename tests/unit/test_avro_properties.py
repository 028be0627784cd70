"""Property tests: kfast against fastavro on random schemas, data and bytes.

Example counts stay small by default so the suite is fast. For a long fuzz
run set ``KFAST_FUZZ=1`` (hypothesis profile ``kfast-fuzz``: 20x examples),
e.g. ``KFAST_FUZZ=1 pytest tests/unit/test_avro_properties.py`` (docs/avro.md).
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
import os
import uuid
from decimal import Decimal
from typing import Any

import fastavro
from avro_helpers import encode, reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kfast.avro import AvroDecoder

FUZZ = os.environ.get("KFAST_FUZZ") == "1"
SCALE = 20 if FUZZ else 1
COMMON = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}

UTC = dt.timezone.utc
_names = itertools.count()


def _name(prefix: str) -> str:
    return f"{prefix}{next(_names)}"


# ---------------------------------------------------------------- schemas

SCALARS = ["boolean", "int", "long", "float", "double", "bytes", "string"]
LOGICAL = [
    {"type": "int", "logicalType": "date"},
    {"type": "int", "logicalType": "time-millis"},
    {"type": "long", "logicalType": "time-micros"},
    {"type": "long", "logicalType": "timestamp-millis"},
    {"type": "long", "logicalType": "timestamp-micros"},
    {"type": "long", "logicalType": "timestamp-nanos"},
    {"type": "long", "logicalType": "local-timestamp-millis"},
    {"type": "long", "logicalType": "local-timestamp-micros"},
    {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 3},
    {"type": "string", "logicalType": "uuid"},
]


@st.composite
def leaf(draw: Any, logical: bool = True) -> Any:
    choice = draw(st.integers(0, 9 if logical else 7))
    if choice <= 4:
        return draw(st.sampled_from(SCALARS))
    if choice == 5:
        n = draw(st.integers(1, 4))
        return {"type": "enum", "name": _name("E"), "symbols": [f"S{i}" for i in range(n)]}
    if choice == 6:
        return {"type": "fixed", "name": _name("F"), "size": draw(st.integers(0, 6))}
    if choice == 7:
        return "null"
    if choice == 8:
        return {"type": "fixed", "name": _name("D"), "size": 8, "logicalType": "decimal",
                "precision": 18, "scale": draw(st.integers(0, 5))}  # fmt: skip
    return dict(draw(st.sampled_from(LOGICAL)))


def _extend(children: Any) -> Any:
    record = st.lists(children, min_size=0, max_size=4).map(
        lambda types: {
            "type": "record",
            "name": _name("R"),
            "fields": [{"name": f"f{i}", "type": t} for i, t in enumerate(types)],
        }
    )
    return st.one_of(
        record,
        children.map(lambda t: {"type": "array", "items": t}),
        children.map(lambda t: {"type": "map", "values": t}),
        children.filter(lambda t: not isinstance(t, list) and t != "null").flatmap(
            lambda t: st.sampled_from([["null", t], [t, "null"]])
        ),
        st.lists(
            st.sampled_from(["null", "int", "string", "boolean", "double"]),
            min_size=2,
            max_size=4,
            unique=True,
        ),  # fmt: skip
    )


def _named_types(schema: Any, out: dict[str, Any]) -> dict[str, Any]:
    """Named types defined in a schema, by name (definition order)."""
    if isinstance(schema, list):
        for b in schema:
            _named_types(b, out)
    elif isinstance(schema, dict):
        if schema["type"] in ("record", "enum", "fixed"):
            out[schema["name"]] = schema
        for f in schema.get("fields", ()):
            _named_types(f["type"], out)
        for key in ("items", "values"):
            if key in schema:
                _named_types(schema[key], out)
    return out


@st.composite
def schemas(draw: Any, logical: bool = True, refs: bool = True) -> Any:
    inner = st.recursive(leaf(logical), _extend, max_leaves=8)
    types = draw(st.lists(inner, min_size=1, max_size=6))
    top: dict[str, Any] = {
        "type": "record",
        "name": _name("Top"),
        "fields": [{"name": f"c{i}", "type": t} for i, t in enumerate(types)],
    }
    if draw(st.booleans()):
        top["namespace"] = draw(st.sampled_from(["ns", "com.example.v1"]))
    # references to named types defined in earlier fields
    named = [n for n in _named_types(top, {}) if n != top["name"]]
    for j in range(draw(st.integers(0, 2)) if named and refs else 0):
        ref = draw(st.sampled_from(named))
        ref_type: Any = ref if draw(st.booleans()) else ["null", ref]
        top["fields"].append({"name": f"ref{j}", "type": ref_type})
    return top


# ---------------------------------------------------------------- values

_TIME_MILLIS = st.times().map(lambda t: t.replace(microsecond=t.microsecond // 1000 * 1000))
_DT = st.datetimes(min_value=dt.datetime(1900, 1, 1), max_value=dt.datetime(2200, 1, 1))


def values(schema: Any, named: dict[str, Any] | None = None) -> Any:
    if named is None:
        named = _named_types(schema, {})
    if isinstance(schema, list):
        return st.one_of([values(b, named) for b in schema])
    if isinstance(schema, str):
        schema = named.get(schema, {"type": schema})
    t = schema["type"]
    lt = schema.get("logicalType")
    if lt == "date":
        return st.dates()
    if lt == "time-millis":
        return _TIME_MILLIS
    if lt == "time-micros":
        return st.times()
    if lt == "timestamp-millis":
        return _DT.map(lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000, tzinfo=UTC))
    if lt == "timestamp-micros":
        return _DT.map(lambda d: d.replace(tzinfo=UTC))
    if lt == "local-timestamp-millis":
        return _DT.map(lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000))
    if lt == "local-timestamp-micros":
        return _DT
    if lt == "decimal":
        p, s = schema["precision"], schema.get("scale", 0)
        return st.integers(-(10**p) + 1, 10**p - 1).map(lambda u: Decimal(u).scaleb(-s))
    if lt == "uuid":
        return st.uuids().map(str) if t == "string" else st.uuids().map(lambda u: u.bytes)
    if t == "null":
        return st.none()
    if t == "boolean":
        return st.booleans()
    if t == "int":
        return st.integers(-(2**31), 2**31 - 1)
    if t == "long":
        return st.integers(-(2**63), 2**63 - 1)
    if t == "float":
        return st.floats(width=32, allow_nan=False)
    if t == "double":
        return st.floats(allow_nan=False)
    if t == "bytes":
        return st.binary(max_size=12)
    if t == "string":
        return st.text(max_size=8)
    if t == "enum":
        return st.sampled_from(schema["symbols"])
    if t == "fixed":
        return st.binary(min_size=schema["size"], max_size=schema["size"])
    if t == "array":
        return st.lists(values(schema["items"], named), max_size=4)
    if t == "map":
        return st.dictionaries(st.text(max_size=4), values(schema["values"], named), max_size=3)
    if t == "record":
        return st.fixed_dictionaries(
            {f["name"]: values(f["type"], named) for f in schema["fields"]}
        )
    raise AssertionError(schema)


def _check(schema: Any, payloads: list[bytes], reader: Any = None) -> None:
    dec = AvroDecoder(reader or schema, writer_schema=schema if reader else None)
    batch = dec.decode(payloads)
    assert batch.errors == []
    expected = [reference(p, schema, reader) for p in payloads]
    assert batch.to_pylist() == expected


@settings(max_examples=60 * SCALE, **COMMON)
@given(st.data())
def test_random_schemas_match_fastavro(data: Any) -> None:
    schema = data.draw(schemas())
    records = data.draw(st.lists(values(schema), min_size=1, max_size=5))
    payloads = [encode(schema, r) for r in records]
    _check(schema, payloads)
    # every strict prefix of every payload is an error row, never a crash
    prefixes = [p[:k] for p in payloads for k in range(len(p))]
    batch = AvroDecoder(schema).decode(prefixes)
    assert batch.num_rows == 0 and len(batch.errors) == len(prefixes)


# ---------------------------------------------------------------- resolution

_PROMOTE = {"int": ["long", "double"], "long": ["double"], "float": ["double"],
            "string": ["bytes"], "bytes": ["string"]}  # fmt: skip
_DEFAULTS = [("int", 7), ("long", -3), ("string", "dflt"), ("double", 1.5), ("boolean", True),
             (["null", "string"], None)]  # fmt: skip


@st.composite
def reader_for(draw: Any, writer: Any) -> Any:
    """A reader schema the writer resolves to (spec rules, fastavro's semantics)."""

    def derive(w: Any, top: bool) -> Any:
        if isinstance(w, str):
            if w in _PROMOTE and draw(st.booleans()):
                return draw(st.sampled_from(_PROMOTE[w]))
            if w != "null" and draw(st.integers(0, 4)) == 0:
                return ["null", w]
            return w
        if isinstance(w, list):
            return w
        t = w["type"]
        if "logicalType" in w:
            return w
        if t == "enum":
            symbols = list(w["symbols"])
            extra = draw(st.integers(0, 2))
            symbols += [f"X{i}" for i in range(extra)]
            symbols = draw(st.permutations(symbols))
            out = {**w, "symbols": list(symbols)}
            if draw(st.booleans()) and len(symbols) > 1:
                out["symbols"] = list(symbols[1:])
                out["default"] = symbols[1]
            return out
        if t == "array":
            return {"type": "array", "items": derive(w["items"], False)}
        if t == "map":
            return {"type": "map", "values": derive(w["values"], False)}
        if t == "record":
            fields = []
            for f in w["fields"]:
                if not top and draw(st.integers(0, 5)) == 0:
                    continue  # writer-only field: skipped
                nf = {"name": f["name"], "type": derive(f["type"], False)}
                if draw(st.integers(0, 5)) == 0:
                    nf = {
                        "name": f"renamed_{f['name']}",
                        "aliases": [f["name"]],
                        "type": nf["type"],
                    }
                fields.append(nf)
            for i in range(draw(st.integers(0, 2))):
                t2, d = draw(st.sampled_from(_DEFAULTS))
                fields.append({"name": f"added{i}", "type": t2, "default": d})
            fields = list(draw(st.permutations(fields)))
            return {**w, "fields": fields}
        return w

    return derive(writer, True)


@settings(max_examples=40 * SCALE, **COMMON)
@given(st.data())
def test_random_resolution_matches_fastavro(data: Any) -> None:
    # no named references: the reader permutes fields, which could put a
    # reference before its definition
    writer = data.draw(schemas(logical=False, refs=False))
    reader = data.draw(reader_for(writer))
    records = data.draw(st.lists(values(writer), min_size=1, max_size=4))
    payloads = [encode(writer, r) for r in records]
    expected: dict[int, Any] = {}
    for i, p in enumerate(payloads):
        try:
            expected[i] = reference(p, writer, reader)
        except (fastavro.read.SchemaResolutionError, UnicodeDecodeError):
            pass  # e.g. bytes -> string promotion of non-UTF-8 bytes: kfast must error too
    dec = AvroDecoder(reader, writer_schema=writer)
    batch = dec.decode(payloads)
    assert sorted(e.index for e in batch.errors) == sorted(
        set(range(len(payloads))) - set(expected)
    )
    assert list(batch.source_indices) == sorted(expected)
    assert batch.to_pylist() == [expected[i] for i in sorted(expected)]


# ---------------------------------------------------------------- mutation fuzz


@st.composite
def mutated(draw: Any, payload: bytes) -> bytes:
    b = bytearray(payload)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 3))
        pos = draw(st.integers(0, len(b)))
        if op == 0 and b and pos < len(b):
            b[pos] = draw(st.integers(0, 255))
        elif op == 1:
            b[pos:pos] = draw(st.binary(min_size=1, max_size=10))
        elif op == 2:
            del b[pos : pos + draw(st.integers(1, 4))]
        else:
            b[pos:pos] = draw(
                st.sampled_from([b"\xff" * 10 + b"\x01", b"\x01", b"\x7f", b"\x80\x80"])
            )
    return bytes(b)


@settings(max_examples=60 * SCALE, **COMMON)
@given(st.data())
def test_mutated_payloads_decode_or_error(data: Any) -> None:
    schema = data.draw(schemas(logical=False))
    records = data.draw(st.lists(values(schema), min_size=1, max_size=3))
    payloads = [data.draw(mutated(encode(schema, r))) for r in records]
    batch = AvroDecoder(schema).decode(payloads)
    assert batch.num_rows + len(batch.errors) == len(payloads)
    rows = batch.to_pylist()
    good = list(batch.source_indices)
    for row, index in zip(rows, good, strict=True):
        # whatever kfast accepts, fastavro reads the same way (a mutated float may be NaN)
        assert _nan_safe(row) == _nan_safe(reference(payloads[index], schema))


def _nan_safe(v: Any) -> Any:
    """``v`` with every float NaN replaced by a marker, so that NaN compares equal to NaN."""
    if isinstance(v, float) and math.isnan(v):
        return "<NaN>"
    if isinstance(v, dict):
        return {k: _nan_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_nan_safe(x) for x in v]
    return v


def test_uuid_fixed_and_nan_do_not_break_comparison() -> None:
    # sanity for the generators above: NaN is excluded because NaN != NaN
    schema = {"type": "record", "name": "U", "fields": [{"name": "u", "type": "string"}]}
    payload = encode(schema, {"u": str(uuid.UUID(int=1))})
    _check(schema, [payload])


TREE = {
    "type": "record",
    "name": "Tree",
    "fields": [
        {"name": "label", "type": "string"},
        {"name": "children", "type": {"type": "array", "items": "Tree"}},
        {"name": "next", "type": ["null", "Tree"], "default": None},
        {"name": "weight", "type": ["null", "double"]},
    ],
}


def trees(depth: int = 3) -> Any:
    leaf_tree = st.fixed_dictionaries(
        {
            "label": st.text(max_size=3),
            "children": st.just([]),
            "next": st.none(),
            "weight": st.none() | st.floats(allow_nan=False),
        }
    )
    return st.recursive(
        leaf_tree,
        lambda sub: st.fixed_dictionaries(
            {
                "label": st.text(max_size=3),
                "children": st.lists(sub, max_size=3),
                "next": st.none() | sub,
                "weight": st.none() | st.floats(allow_nan=False),
            }
        ),
        max_leaves=10,
    )


@settings(max_examples=30 * SCALE, **COMMON)
@given(st.lists(trees(), min_size=1, max_size=4))
def test_recursive_schemas_match_fastavro(records: list[Any]) -> None:
    _check(TREE, [encode(TREE, r) for r in records])
