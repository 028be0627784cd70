"""The client-side check's expression parser and its compiled program
(``kfast.sinks.postgres.prescreen``, ``kfast.sinks._prescreen``): which catalog forms are
evaluated, which are left to the server, and SQL's three-valued logic on real columns."""

from __future__ import annotations

import io
import math
import struct
from typing import Any

import fastavro
import pytest

import kfast
from kfast.sinks._prescreen import Program, parse_double, parse_float
from kfast.sinks.postgres.prescreen import Unsupported, compile_check

COLS = {
    "q": (0, "int4"),
    "big": (1, "int8"),
    "p": (2, "float8"),
    "r": (3, "float4"),
    "ok": (4, "bool"),
}
NULLABLE = {"q": 0, "big": 1, "p": 2, "r": 3, "ok": 4, "name": 5}

SCHEMA = {
    "type": "record",
    "name": "R",
    "fields": [
        {"name": "q", "type": ["null", "int"]},
        {"name": "big", "type": ["null", "long"]},
        {"name": "p", "type": ["null", "double"]},
        {"name": "r", "type": ["null", "float"]},
        {"name": "ok", "type": ["null", "boolean"]},
        {"name": "name", "type": ["null", "string"]},
    ],
}
SLOTS = [
    {"col": 0, "kind": "i32"},
    {"col": 1, "kind": "i64"},
    {"col": 2, "kind": "f64"},
    {"col": 3, "kind": "f32"},
    {"col": 4, "kind": "bool"},
    {"col": 5, "kind": "bytes"},
]


def _batch(rows: list[dict[str, Any]]) -> Any:
    parsed = fastavro.parse_schema(SCHEMA)
    payloads = []
    for r in rows:
        bio = io.BytesIO()
        fastavro.schemaless_writer(
            bio, parsed, {f["name"]: r.get(f["name"]) for f in SCHEMA["fields"]}
        )
        payloads.append(bio.getvalue())
    batch = kfast.AvroDecoder(SCHEMA).decode(payloads)
    assert list(batch.column_names)[:6] == ["q", "big", "p", "r", "ok", "name"]
    return batch


def _fails(expr: str, rows: list[dict[str, Any]]) -> list[int]:
    """Rows whose CHECK ``expr`` is FALSE."""
    prog = Program(SLOTS, [("check", compile_check(expr, COLS, NULLABLE), 0)])
    return [row for row, _ in prog.run(_batch(rows), 0, len(rows))]


@pytest.mark.parametrize(
    "expr",
    [
        "(q > 0)",
        "((q)::numeric > 2.5)",
        "((q)::bigint <= '9'::bigint)",
        "(p >= (0)::double precision)",
        "(p > '0.1'::double precision)",
        "(r > '0.1'::real)",
        "((q >= 1) AND (q <= 10))",
        "(q BETWEEN 1 AND 10)",
        "(q NOT BETWEEN 1 AND 10)",
        "(NOT (q = '-5'::integer))",
        "((name IS NOT NULL) OR (q IS NULL))",
        "ok",
        "(NOT ok)",
        "(ok = true)",
        "(1 < q)",
        "((q)::double precision < 'NaN'::double precision)",
        "(big < (9223372036854775808)::numeric)",
        "(p <> 'Infinity'::double precision)",
    ],
)
def test_parsed_forms(expr: str) -> None:
    assert compile_check(expr, COLS, NULLABLE)


@pytest.mark.parametrize(
    "expr",
    [
        "(q > lower(name))",  # a function
        "(q > (p)::integer)",  # column versus column
        "((q % 2) = 0)",  # arithmetic
        "(q = ANY (ARRAY[1, 2]))",
        "((big)::double precision > (0)::double precision)",  # bigint -> float8 rounds
        "((p)::numeric > (0)::numeric)",  # float -> numeric rounds
        "((q)::smallint > 0)",  # narrowing may fail
        "(q > (2.5)::integer)",  # the constant's cast rounds
        "((q)::numeric(4,1) > 2.5)",  # a typmod rounds
        "((q > 0) IS TRUE)",
        "(name > 'a'::text)",  # text comparisons depend on collation
        "(q > 'NaN'::numeric)",
        "(q BETWEEN SYMMETRIC 1 AND 10)",
        "(p > 0)",  # float versus an exact constant without a cast: not a catalog form
        "(nosuch > 0)",
        "(q > 0",
    ],
)
def test_refused_forms(expr: str) -> None:
    with pytest.raises(Unsupported):
        compile_check(expr, COLS, NULLABLE)


def test_three_valued_logic() -> None:
    rows = [
        {"q": 5, "name": "a"},
        {"q": -1, "name": "a"},
        {"q": None, "name": "a"},  # NULL > 0 is NULL: passes
        {"q": -1, "name": None},
        {"q": None, "name": None},
    ]
    assert _fails("(q > 0)", rows) == [1, 3]
    # NULL OR TRUE is TRUE, NULL OR FALSE is NULL (passes), FALSE OR FALSE fails.
    assert _fails("((q > 0) OR (name IS NULL))", rows) == [1]
    # NULL AND FALSE is FALSE.
    assert _fails("((q > 0) AND (name IS NOT NULL))", rows) == [1, 3, 4]
    # NOT NULL is NULL.
    assert _fails("(NOT (q > 0))", rows) == [0]
    assert _fails("(q IS NOT NULL)", rows) == [2, 4]


def test_exact_comparisons() -> None:
    rows = [{"q": v} for v in (2, 3, -3, 2147483647, -2147483648)]
    assert _fails("((q)::numeric > 2.5)", rows) == [0, 2, 4]
    assert _fails("((q)::numeric >= '-2.5'::numeric)", rows) == [2, 4]
    assert _fails("((q)::numeric <> 2.5)", rows) == []
    assert _fails("((q)::numeric = 2.5)", rows) == [0, 1, 2, 3, 4]
    assert _fails("((q)::bigint < (9223372036854775807)::bigint)", rows) == []
    # Float order in PostgreSQL: NaN is above every number.
    assert _fails("((q)::double precision < 'NaN'::double precision)", rows) == []
    assert _fails("((q)::double precision > 'NaN'::double precision)", rows) == [0, 1, 2, 3, 4]


def test_float_semantics() -> None:
    nan = float("nan")
    rows = [{"p": v, "r": v} for v in (0.1, 0.2, nan, -0.0, math.inf)]
    assert _fails("(p > '0.1'::double precision)", rows) == [0, 3]
    # NaN = NaN and NaN > everything, as PostgreSQL's float comparisons.
    assert _fails("(p = 'NaN'::double precision)", rows) == [0, 1, 3, 4]
    assert _fails("(p < 'Infinity'::double precision)", rows) == [2, 4]
    assert _fails("(p >= (0)::double precision)", rows) == []
    # 0.1 as float4 is above 0.1 as float8: real compared with a real constant.
    assert _fails("(r > '0.1'::real)", rows) == [0, 3]
    assert _fails("(r > '0.1'::double precision)", rows) == [3]


def test_literal_rounding_is_the_servers() -> None:
    assert parse_double(b"0.1") == 0.1
    assert parse_float(b"0.1") == struct.unpack("f", struct.pack("f", 0.1))[0]
    assert parse_double(b"1e400") == math.inf
    assert parse_double(b"0.1x") is None


def test_first_failing_test_names_the_rule() -> None:
    rows = [{"q": -1, "name": None}, {"q": 1, "name": "abcdefgh"}, {"q": 1, "name": "ab   "}]
    prog = Program(
        SLOTS,
        [
            ("len", 5, 3, 0),
            ("notnull", 5, 1),
            ("check", compile_check("(q > 0)", COLS, NULLABLE), 2),
        ],
    )
    assert prog.run(_batch(rows), 0, 3) == [(0, 1), (1, 0)]
    assert prog.run(_batch(rows), 1, 2) == [(1, 0)]
    # Characters, not bytes: "ééé" is 3 characters in 6 bytes.
    assert Program(SLOTS, [("len", 5, 3, 0)]).run(
        _batch([{"name": "ééé"}, {"name": "éééé"}]), 0, 2
    ) == [(1, 0)]


def test_program_checks_the_batch_layout() -> None:
    prog = Program([{"col": 0, "kind": "f64"}], [("notnull", 0, 0)])
    with pytest.raises(ValueError):
        prog.run(_batch([{"q": 1}]), 0, 1)
    with pytest.raises(ValueError):
        Program([{"col": 0, "kind": "i32"}], [("check", [("cmpf", 0, 2, 0.0)], 0)])
    with pytest.raises(ValueError):
        Program([{"col": 0, "kind": "i32"}], [("check", [("and",)], 0)])
