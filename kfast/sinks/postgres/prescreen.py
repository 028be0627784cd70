"""The client-side check of a batch against the table's rules that can be evaluated exactly
on the decoded columns, before any row is sent.

A row it flags is a row PostgreSQL would reject (never a good one):

* NULL in a NOT NULL column (23502);
* a CHECK constraint (23514) whose expression, as the catalog prints it, is a boolean
  combination (AND, OR, NOT, parentheses) of comparisons (``< <= > >= = <>``, BETWEEN,
  IS [NOT] NULL) between one written column of type smallint, integer, bigint, real,
  double precision or boolean, stored as the batch holds it (no conversion), and a numeric
  or boolean constant; the casts the catalog shows are followed only where they are exact
  (integers widened or made numeric, integer or real made double precision). Evaluated in
  SQL's three-valued logic: NULL passes;
* a ``varchar(n)``/``char(n)`` value longer than n characters once trailing spaces are
  ignored (22001), when the client and server encodings are UTF-8.

Errors are reported as PostgreSQL reports them for a row: input errors in column order, then
NOT NULL in column order, then CHECK constraints by name. Anything else (other CHECK forms,
unique and foreign keys, domains, triggers, partitioned tables) is left to the server: the
sink makes no client check at all on a table with user triggers (they may change a row
before its constraints are checked).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from kfast.errors import PermanentSinkError
from kfast.sinks._prescreen import Program, parse_double, parse_float
from kfast.sinks.postgres.catalog import TableColumn
from kfast.sinks.postgres.screen import Rules, row_error

if TYPE_CHECKING:  # pragma: no cover
    from kfast._batch import Batch
    from kfast.sinks.postgres.plan import Plan

__all__ = [
    "ClientCheckError",
    "PreScreen",
    "Unsupported",
    "build",
    "compile_check",
    "parse",
]

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


class ClientCheckError(PermanentSinkError):
    """A row the client-side check found bad (PostgreSQL's SQLSTATE and message)."""

    client_side = True


class Unsupported(ValueError):
    """An expression the client-side check cannot evaluate exactly (left to the server)."""


# ------------------------------------------------------------ parsing

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<qident>"(?:[^"]|"")*")
    | (?P<string>'(?:[^']|'')*')
    | (?P<number>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<ident>[A-Za-z_][A-Za-z0-9_$]*)
    | (?P<op><=|>=|<>|!=|::|[<>=()\-+])
    )""",
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "not", "is", "null", "true", "false", "between", "symmetric"}
_TYPES = {
    "smallint": "int2",
    "int2": "int2",
    "integer": "int4",
    "int": "int4",
    "int4": "int4",
    "bigint": "int8",
    "int8": "int8",
    "numeric": "numeric",
    "decimal": "numeric",
    "real": "float4",
    "float4": "float4",
    "double precision": "float8",
    "float8": "float8",
    "boolean": "bool",
    "bool": "bool",
}
_INTS = ("int2", "int4", "int8")
_FLOATS = ("float4", "float8")
_RANGES = {"int2": 1 << 15, "int4": 1 << 31, "int8": 1 << 63}
_FLIP = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "=": "=", "<>": "<>"}
_OPS = {"<": 0, "<=": 1, ">": 2, ">=": 3, "=": 4, "<>": 5}
_NUMERIC_TEXT = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_FLOAT_WORDS = {
    "nan": "NaN",
    "infinity": "Infinity",
    "+infinity": "Infinity",
    "-infinity": "-Infinity",
}


def _tokens(text: str) -> list[tuple[str, str]]:
    out = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise Unsupported(f"cannot read {text[pos : pos + 20]!r}")
        kind = m.lastgroup
        assert kind is not None
        value = m.group(kind)
        if kind == "ident" and value.lower() in _KEYWORDS:
            kind, value = "kw", value.lower()
        elif kind == "ident":
            value = value.lower()  # unquoted identifiers fold to lower case
        elif kind == "qident":
            kind, value = "ident", value[1:-1].replace('""', '"')
        out.append((kind, value))
        pos = m.end()
    return out


# AST: ("col", name, casts) | ("lit", kind, text, casts) | ("cmp", op, a, b) | ("and", a, b)
# | ("or", a, b) | ("not", a) | ("isnull", operand, negated) | ("bool", operand)
Node = tuple[Any, ...]


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.i = 0

    def peek(self, k: int = 0) -> tuple[str, str] | None:
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else None

    def take(self, kind: str, value: str | None = None) -> bool:
        t = self.peek()
        if t is not None and t[0] == kind and (value is None or t[1] == value):
            self.i += 1
            return True
        return False

    def expect(self, kind: str, value: str | None = None) -> None:
        if not self.take(kind, value):
            raise Unsupported(f"expected {value or kind} at token {self.i}")

    def parse(self) -> Node:
        node = self.or_()
        if self.peek() is not None:
            raise Unsupported(f"unexpected {self.peek()!r}")
        return node

    def or_(self) -> Node:
        node = self.and_()
        while self.take("kw", "or"):
            node = ("or", node, self.and_())
        return node

    def and_(self) -> Node:
        node = self.not_()
        while self.take("kw", "and"):
            node = ("and", node, self.not_())
        return node

    def not_(self) -> Node:
        if self.take("kw", "not"):
            return ("not", self.not_())
        return self.predicate()

    def predicate(self) -> Node:
        left = self.operand()
        t = self.peek()
        if t is not None and t[0] == "op" and t[1] in ("<", "<=", ">", ">=", "=", "<>", "!="):
            self.i += 1
            op = "<>" if t[1] == "!=" else t[1]
            return ("cmp", op, left, self.operand())
        if self.take("kw", "is"):
            negated = self.take("kw", "not")
            self.expect("kw", "null")
            return ("isnull", left, negated)
        negated = False
        if t == ("kw", "not") and self.peek(1) == ("kw", "between"):
            self.i += 1
            negated = True
        if self.take("kw", "between"):
            if self.take("kw", "symmetric"):
                raise Unsupported("BETWEEN SYMMETRIC")
            lo = self.operand()
            self.expect("kw", "and")
            hi = self.operand()
            if negated:
                return ("or", ("cmp", "<", left, lo), ("cmp", ">", left, hi))
            return ("and", ("cmp", ">=", left, lo), ("cmp", "<=", left, hi))
        return ("bool", left)

    def operand(self) -> Node:
        node = self.primary()
        while self.take("op", "::"):
            node = self.cast(node, self.type_name())
        return node

    @staticmethod
    def cast(node: Node, typ: str) -> Node:
        if node[0] == "col":
            return ("col", node[1], (*node[2], typ))
        if node[0] == "lit":
            return ("lit", node[1], node[2], (*node[3], typ))
        raise Unsupported("a cast of an expression")

    def type_name(self) -> str:
        words: list[str] = []
        while True:
            t = self.peek()
            if t is None or t[0] != "ident":
                break
            cand = " ".join([*words, t[1]])
            if not any(k == cand or k.startswith(cand + " ") for k in _TYPES):
                break
            words.append(t[1])
            self.i += 1
        name = " ".join(words)
        if name not in _TYPES:
            raise Unsupported(f"type {name or self.peek()!r}")
        if self.peek() == ("op", "("):
            raise Unsupported("a type modifier")
        return _TYPES[name]

    def primary(self) -> Node:
        t = self.peek()
        if t is None:
            raise Unsupported("unexpected end")
        kind, value = t
        self.i += 1
        if kind == "op" and value == "(":
            inner = self.or_()
            self.expect("op", ")")
            if inner[0] == "bool" and inner[1][0] in ("col", "lit"):
                return inner[1]  # a parenthesized operand, e.g. (quantity)::numeric
            return ("expr", inner)
        if kind == "op" and value in ("-", "+"):
            n = self.peek()
            if n is None or n[0] != "number":
                raise Unsupported("a sign before an expression")
            self.i += 1
            return ("lit", "number", ("-" if value == "-" else "") + n[1], ())
        if kind == "ident":
            if self.peek() == ("op", "("):
                raise Unsupported(f"function {value}()")
            return ("col", value, ())
        if kind == "number":
            return ("lit", "number", value, ())
        if kind == "string":
            return ("lit", "string", value[1:-1].replace("''", "'"), ())
        if kind == "kw" and value in ("true", "false"):
            return ("lit", "bool", value, ())
        raise Unsupported(f"unexpected {value!r}")


def parse(text: str) -> Node:
    """The AST of a CHECK expression; raises :class:`Unsupported` on any other form."""
    return _Parser(text).parse()


# ------------------------------------------------------------ compiling


# A column as the expression sees it: its slot, the type it is compared as, and whether its
# values are integers (exactly) or floats.
@dataclass
class _ColVal:
    slot: int
    typ: str
    ints: bool


# A constant: ("int", Fraction) exact, ("float", float) a float8 value, ("bool", 0|1).
_Const = tuple[str, Any]


def _literal(node: Node) -> tuple[str, _Const]:
    """(SQL type, value) of a constant with its casts applied exactly, or Unsupported."""
    _, kind, text, casts = node
    typ: str
    val: _Const
    if kind == "bool":
        typ, val = "bool", ("bool", 1 if text == "true" else 0)
    elif kind == "number":
        if not _NUMERIC_TEXT.fullmatch(text):
            raise Unsupported(f"constant {text!r}")
        exact = Fraction(Decimal(text))
        if re.fullmatch(r"[+-]?\d+", text):
            v = int(text)
            typ = (
                "int4"
                if -(1 << 31) <= v < 1 << 31
                else "int8"
                if INT64_MIN <= v <= INT64_MAX
                else "numeric"
            )
        else:
            typ = "numeric"
        val = ("int", exact)
    else:  # an untyped string: its first cast reads it
        if not casts:
            raise Unsupported("a string constant")
        typ, rest = casts[0], casts[1:]
        val = _from_text(text, typ)
        return _cast_chain(typ, val, rest)
    return _cast_chain(typ, val, casts)


def _from_text(text: str, typ: str) -> _Const:
    s = text.strip()
    if typ in _INTS:
        if not re.fullmatch(r"[+-]?\d+", s):
            raise Unsupported(f"{typ} constant {text!r}")
        v = int(s)
        if not -_RANGES[typ] <= v < _RANGES[typ]:
            raise Unsupported("constant out of range")
        return ("int", Fraction(v))
    if typ == "numeric":
        if not _NUMERIC_TEXT.fullmatch(s):
            raise Unsupported(f"numeric constant {text!r}")
        return ("int", Fraction(Decimal(s)))
    if typ in _FLOATS:
        word = _FLOAT_WORDS.get(s.lower())
        if word is None and not _NUMERIC_TEXT.fullmatch(s):
            raise Unsupported(f"float constant {text!r}")
        raw = (word or s).encode()
        f = parse_double(raw) if typ == "float8" else parse_float(raw)
        if f is None:
            raise Unsupported(f"float constant {text!r}")
        return ("float", f)
    if typ == "bool":
        low = s.lower()
        if low in ("true", "t"):
            return ("bool", 1)
        if low in ("false", "f"):
            return ("bool", 0)
    raise Unsupported(f"{typ} constant {text!r}")


def _cast_chain(typ: str, val: _Const, casts: Sequence[str]) -> tuple[str, _Const]:
    for to in casts:
        val = _cast_const(typ, val, to)
        typ = to
    return typ, val


def _cast_const(frm: str, val: _Const, to: str) -> _Const:
    if frm == to:
        return val
    kind, v = val
    if to in _INTS:
        if kind != "int" or v.denominator != 1 or not -_RANGES[to] <= v < _RANGES[to]:
            raise Unsupported("a constant cast that rounds or overflows")
        return val
    if to == "numeric":
        if kind != "int":
            raise Unsupported("a float constant cast to numeric")
        return val
    if to in _FLOATS:
        if kind == "float":
            if frm == "float4" and to == "float8":
                return val
            raise Unsupported("a float constant cast to a narrower float")
        if kind != "int":
            raise Unsupported("a boolean constant cast to float")
        # numeric -> float goes through the number's text (numeric_float8, float8in)
        text = _decimal_text(v)
        f = parse_double(text.encode()) if to == "float8" else parse_float(text.encode())
        if f is None:
            raise Unsupported("constant")
        return ("float", f)
    raise Unsupported(f"cast to {to}")


def _decimal_text(v: Fraction) -> str:
    d = Decimal(v.numerator) / Decimal(v.denominator)
    if Fraction(d) != v:
        raise Unsupported("a constant that is not a finite decimal")
    return format(d, "f")


# Casts of a column that keep every value exactly: (from, to).
_EXACT_CASTS = {
    ("int2", "int4"),
    ("int2", "int8"),
    ("int4", "int8"),
    ("int2", "numeric"),
    ("int4", "numeric"),
    ("int8", "numeric"),
    ("int2", "float4"),
    ("int2", "float8"),
    ("int4", "float8"),
    ("float4", "float8"),
}


def _column(node: Node, columns: Mapping[str, tuple[int, str]]) -> _ColVal:
    _, name, casts = node
    if name not in columns:
        raise Unsupported(f"column {name!r} is not one the check can read")
    slot, typ = columns[name]
    if typ not in (*_INTS, *_FLOATS, "bool"):
        raise Unsupported(f"column {name!r} of type {typ}")
    ints = typ not in _FLOATS
    for to in casts:
        if to != typ and (typ, to) not in _EXACT_CASTS:
            raise Unsupported(f"cast of {name!r} from {typ} to {to}")
        typ = to
    return _ColVal(slot, typ, ints)


def _int_test(op: str, c: Fraction) -> tuple[int, int]:
    """(op code, k) testing an int64 value x against the exact constant ``c``."""
    if op == "<":
        k, code = math.ceil(c), 0
    elif op == "<=":
        k, code = math.floor(c), 1
    elif op == ">":
        k, code = math.floor(c), 2
    elif op == ">=":
        k, code = math.ceil(c), 3
    elif op == "=":
        if c.denominator != 1 or not INT64_MIN <= c <= INT64_MAX:
            return 7, 0
        return 4, int(c)
    else:
        if c.denominator != 1 or not INT64_MIN <= c <= INT64_MAX:
            return 6, 0
        return 5, int(c)
    if code in (0, 3):  # x < k / x >= k
        if k > INT64_MAX:
            return (6, 0) if code == 0 else (7, 0)
        if k <= INT64_MIN:
            return (7, 0) if code == 0 else (6, 0)
    else:  # x <= k / x > k
        if k >= INT64_MAX:
            return (6, 0) if code == 1 else (7, 0)
        if k < INT64_MIN:
            return (7, 0) if code == 1 else (6, 0)
    return code, k


def _compare(
    op: str, a: Node, b: Node, columns: Mapping[str, tuple[int, str]]
) -> list[tuple[Any, ...]]:
    if a[0] == "lit" and b[0] == "col":
        a, b, op = b, a, _FLIP[op]
    if a[0] != "col" or b[0] != "lit":
        raise Unsupported("a comparison that is not column versus constant")
    col = _column(a, columns)
    ltyp, (kind, v) = _literal(b)
    if col.typ == "bool" or ltyp == "bool":
        if col.typ != "bool" or ltyp != "bool":
            raise Unsupported("boolean versus non-boolean")
        code, k = _int_test(op, Fraction(v))
        return [("cmpi", col.slot, code, k)]
    if (col.typ in _FLOATS) != (ltyp in _FLOATS):
        raise Unsupported("float versus non-float without a cast")
    if kind == "float":
        if not col.ints:
            return [("cmpf", col.slot, _OPS[op], float(v))]
        # An integer column compared as float8 (converted exactly): a rational comparison;
        # NaN is above every number (PostgreSQL's float order).
        if math.isnan(v):
            return [("cmpi", col.slot, 6 if op in ("<", "<=", "<>") else 7, 0)]
        if math.isinf(v):
            c = Fraction(1 << 70) if v > 0 else Fraction(-(1 << 70))
        else:
            c = Fraction(v)
        code, k = _int_test(op, c)
        return [("cmpi", col.slot, code, k)]
    if not col.ints:
        raise Unsupported("float column versus exact constant")
    code, k = _int_test(op, v)
    return [("cmpi", col.slot, code, k)]


def _compile(
    node: Node, columns: Mapping[str, tuple[int, str]], nullable: Mapping[str, int]
) -> list[tuple[Any, ...]]:
    what = node[0]
    if what == "expr":
        return _compile(node[1], columns, nullable)
    if what in ("and", "or"):
        return [
            *_compile(node[1], columns, nullable),
            *_compile(node[2], columns, nullable),
            (what,),
        ]
    if what == "not":
        return [*_compile(node[1], columns, nullable), ("not",)]
    if what == "cmp":
        return _compare(node[1], node[2], node[3], columns)
    if what == "isnull":
        operand = node[1]
        if operand[0] != "col" or operand[1] not in nullable:
            raise Unsupported("IS NULL of something else than a column")
        _column_casts_ok(operand, columns)
        return [("isnotnull" if node[2] else "isnull", nullable[operand[1]])]
    if what == "bool":
        operand = node[1]
        if operand[0] == "expr":
            return _compile(operand[1], columns, nullable)
        if operand[0] == "lit":
            typ, (kind, v) = _literal(operand)
            if typ != "bool":
                raise Unsupported("a non-boolean constant")
            return [("const", v)]
        if operand[0] != "col":
            raise Unsupported("expression")
        col = _column(operand, columns)
        if col.typ != "bool":
            raise Unsupported("a non-boolean column as a condition")
        return [("bool", col.slot)]
    raise Unsupported(what)


def _column_casts_ok(node: Node, columns: Mapping[str, tuple[int, str]]) -> None:
    # IS NULL of a cast column: the casts must not fail (they are exact or absent).
    if node[2]:
        _column(node, columns)


def compile_check(
    expr: str, columns: Mapping[str, tuple[int, str]], nullable: Mapping[str, int]
) -> list[tuple[Any, ...]]:
    """The postfix program of a CHECK expression (see :mod:`kfast.sinks._prescreen`).

    ``columns``: column name -> (slot, SQL type) of the written columns whose values the
    program can read (integers, floats, booleans); ``nullable``: column name -> slot for
    every written column whose nullness it can read. Raises :class:`Unsupported`."""
    return _compile(parse(expr), columns, nullable)


# ------------------------------------------------------------ the screen of a plan

_KIND_OF_OP = {
    "int4": ("i32", "int4"),
    "int8_i32": ("i32", "int8"),
    "int8": ("i64", "int8"),
    "u32_int8": ("u32", "int8"),
    "bool": ("bool", "bool"),
    "float4": ("f32", "float4"),
    "float8_f32": ("f32", "float8"),
    "float8": ("f64", "float8"),
}
_SQL_TYPE = {
    "smallint": "int2",
    "integer": "int4",
    "bigint": "int8",
    "real": "float4",
    "double precision": "float8",
    "boolean": "bool",
}


@dataclass
class PreScreen:
    """The compiled client-side check of one plan (see the module doc)."""

    program: Program
    rules: list[tuple[str, str]]  # per rule: (SQLSTATE, column or constraint name)
    relname: str
    checks: list[str]  # the CHECK constraints evaluated here, by name
    refused: list[str]  # the CHECK constraints left to the server

    def run(
        self, batch: Batch, ranges: Sequence[tuple[int, int]] | None = None
    ) -> dict[int, PermanentSinkError]:
        """The rows of ``ranges`` (default: all) the table would reject, with their errors."""
        out: dict[int, PermanentSinkError] = {}
        for a, b in ranges if ranges is not None else [(0, batch.num_rows)]:
            for row, rule in self.program.run(batch, a, b):
                state, what = self.rules[rule]
                err = row_error(
                    self.relname, state, what, "kfast's client-side check", ClientCheckError
                )
                err.row = row  # the locator, as a COPY line would give it
                out[row] = err
        return out


def build(
    plan: Plan, rules: Rules, table: Mapping[str, TableColumn], utf8: bool
) -> PreScreen | None:
    """The client-side check of ``plan`` for the table's ``rules``; None when it checks
    nothing."""
    slots: list[dict[str, Any]] = []
    values: dict[str, tuple[int, str]] = {}
    nullable: dict[str, int] = {}
    text: dict[str, int] = {}
    by_name = {c.name: c for c in rules.columns}
    for name, entry in zip(plan.columns, plan.entries):
        op = entry.get("op")
        valid = list(entry.get("valid", ()))
        if op in ("pre", "rownum") or entry.get("col", -1) < 0 or len(valid) > 8:
            continue
        rc = by_name.get(name)
        if rc is None:
            continue
        kind = "any"
        if op in _KIND_OF_OP:
            kind, typ = _KIND_OF_OP[op]
            if _SQL_TYPE.get(rc.loose) == typ:  # the stored value is the batch's
                values[name] = (len(slots), typ)
            else:
                kind = "any"
        elif op == "bytes":
            kind = "bytes"
            text[name] = len(slots)
        nullable[name] = len(slots)
        slots.append({"col": entry["col"], "kind": kind, "valid": valid})
    tests: list[tuple[Any, ...]] = []
    out_rules: list[tuple[str, str]] = []

    def rule(state: str, what: str) -> int:
        out_rules.append((state, what))
        return len(out_rules) - 1

    if utf8:
        for name in plan.columns:  # input errors, in COPY column order
            rc = by_name.get(name)
            tc = table.get(name)
            if (
                rc is not None
                and rc.length is not None
                and name in text
                and tc is not None
                and tc.typname in ("varchar", "bpchar")
            ):
                tests.append(("len", text[name], rc.length, rule("22001", name)))
    for name in table:  # NOT NULL, in the table's column order
        rc = by_name.get(name)
        if rc is not None and rc.not_null and name in nullable:
            tests.append(("notnull", nullable[name], rule("23502", name)))
    checks, refused = [], []
    for chk in sorted(rules.checks, key=lambda c: c.name.encode()):  # by name, as the server
        try:
            instrs = compile_check(chk.expr, values, nullable)
        except (Unsupported, ValueError, ArithmeticError, InvalidOperation):
            refused.append(chk.name)
            continue
        tests.append(("check", instrs, rule("23514", chk.name)))
        checks.append(chk.name)
    if not tests:
        return None
    return PreScreen(Program(slots, tests), out_rules, rules.relname, checks, refused)
