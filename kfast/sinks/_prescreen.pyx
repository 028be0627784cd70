# cython: language_level=3
"""The client-side check of a batch's rows against the rules of a table (see
:mod:`kfast.sinks.postgres.prescreen`, which compiles the rules into this form).

A program is a list of tests applied to every row in order; the first failing test names
the rule the row breaks. The tests read the Batch's columns directly (no Python object per
row) with the GIL released:

* ``("len", slot, n, rule)``: a BINARY value holding UTF-8 text longer than ``n``
  characters once trailing spaces are ignored (varchar(n)/char(n) input);
* ``("notnull", slot, rule)``: a NULL value;
* ``("check", instrs, rule)``: a boolean expression in three-valued logic over the row, in
  postfix form, that fails when it evaluates to FALSE (never when NULL).

Slots describe where a value is read: ``{"col": int, "kind": str, "valid": [int]}``; the
value is NULL when the column's validity bit or one of the ``valid`` record columns is
clear. Kinds: ``i32``, ``u32``, ``i64``, ``bool`` (integers), ``f32``, ``f64`` (floats),
``bytes`` (BINARY), ``any`` (nullness only).

Instructions: ``("cmpi", slot, op, k)`` compares an integer slot with the int64 ``k``;
``("cmpf", slot, op, d)`` compares a float slot with the double ``d`` the way PostgreSQL
compares floats (NaN equals NaN and is above every other value); ``("isnull", slot)``,
``("isnotnull", slot)``, ``("bool", slot)``, ``("const", 0|1|2)`` (FALSE, TRUE, NULL),
``("and",)``, ``("or",)``, ``("not",)``. Comparison ops: 0 ``<``, 1 ``<=``, 2 ``>``,
3 ``>=``, 4 ``=``, 5 ``<>``, 6 TRUE and 7 FALSE (for any non-NULL value).
"""
from libc.math cimport isnan
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t
from libc.stdlib cimport calloc, free, realloc, strtod, strtof

from kfast._batch cimport Batch
from kfast._columns cimport (
    COL_BINARY,
    COL_BOOL,
    COL_FLOAT32,
    COL_FLOAT64,
    COL_INT32,
    COL_INT64,
    COL_STRUCT,
    Column,
    col_is_valid,
)

cdef enum:
    K_I32 = 1
    K_U32 = 2
    K_I64 = 3
    K_BOOL = 4
    K_F32 = 5
    K_F64 = 6
    K_BYTES = 7
    K_ANY = 8

cdef enum:
    T_LEN = 1
    T_NOTNULL = 2
    T_CHECK = 3

cdef enum:
    I_CMPI = 1
    I_CMPF = 2
    I_ISNULL = 3
    I_ISNOTNULL = 4
    I_BOOL = 5
    I_CONST = 6
    I_AND = 7
    I_OR = 8
    I_NOT = 9

# three-valued results
cdef enum:
    V_FALSE = 0
    V_TRUE = 1
    V_NULL = 2

cdef int MAX_VALID = 8
cdef int MAX_STACK = 64

_KINDS = {"i32": K_I32, "u32": K_U32, "i64": K_I64, "bool": K_BOOL, "f32": K_F32,
          "f64": K_F64, "bytes": K_BYTES, "any": K_ANY}
_INSTRS = {"cmpi": I_CMPI, "cmpf": I_CMPF, "isnull": I_ISNULL, "isnotnull": I_ISNOTNULL,
           "bool": I_BOOL, "const": I_CONST, "and": I_AND, "or": I_OR, "not": I_NOT}


cdef struct Slot:
    int col
    int kind
    int nvalid
    int valid[8]


cdef struct Instr:
    int code
    int slot
    int op
    int64_t k
    double d


cdef struct Test:
    int kind
    int slot
    int64_t n
    int rule
    int start   # check: first instruction
    int stop


cdef inline bint _null(const Column* cols, const Slot* s, Py_ssize_t i) noexcept nogil:
    cdef int v
    for v in range(s.nvalid):
        if not col_is_valid(&cols[s.valid[v]], i):
            return True
    return not col_is_valid(&cols[s.col], i)


cdef inline int64_t _int(const Column* c, int kind, Py_ssize_t i) noexcept nogil:
    if kind == K_I64:
        return (<const int64_t*>c.values.data)[i]
    if kind == K_U32:
        return <int64_t>(<const uint32_t*>c.values.data)[i]
    if kind == K_BOOL:
        return 1 if (<const uint8_t*>c.values.data)[i] else 0
    return <int64_t>(<const int32_t*>c.values.data)[i]


cdef inline int _cmp_result(int op, int c) noexcept nogil:
    """The comparison ``op`` given ``c`` = sign(value - constant)."""
    if op == 0:
        return V_TRUE if c < 0 else V_FALSE
    if op == 1:
        return V_TRUE if c <= 0 else V_FALSE
    if op == 2:
        return V_TRUE if c > 0 else V_FALSE
    if op == 3:
        return V_TRUE if c >= 0 else V_FALSE
    if op == 4:
        return V_TRUE if c == 0 else V_FALSE
    if op == 5:
        return V_TRUE if c != 0 else V_FALSE
    if op == 6:
        return V_TRUE
    return V_FALSE


cdef inline int _float_cmp(double a, double b) noexcept nogil:
    """PostgreSQL's float8_cmp_internal: NaN equals NaN and sorts above everything."""
    if isnan(a):
        return 0 if isnan(b) else 1
    if isnan(b):
        return -1
    if a > b:
        return 1
    if a < b:
        return -1
    return 0


cdef inline int _and(int a, int b) noexcept nogil:
    if a == V_FALSE or b == V_FALSE:
        return V_FALSE
    if a == V_NULL or b == V_NULL:
        return V_NULL
    return V_TRUE


cdef inline int _or(int a, int b) noexcept nogil:
    if a == V_TRUE or b == V_TRUE:
        return V_TRUE
    if a == V_NULL or b == V_NULL:
        return V_NULL
    return V_FALSE


cdef inline bint _too_long(const Column* c, Py_ssize_t i, int64_t n) noexcept nogil:
    """More than ``n`` UTF-8 characters up to the last non-space one."""
    cdef int32_t a = (<const int32_t*>c.offsets.data)[i]
    cdef int32_t b = (<const int32_t*>c.offsets.data)[i + 1]
    cdef const unsigned char* p = c.values.data
    cdef int64_t chars = 0, upto = 0
    cdef int32_t j
    if b - a <= n:
        return False  # at most one character per byte
    for j in range(a, b):
        if (p[j] & 0xC0) != 0x80:
            chars += 1
        if p[j] != 32:
            upto = chars
    return upto > n


cdef class Program:
    """The compiled tests (see the module doc)."""
    cdef Slot* slots
    cdef int nslots
    cdef Instr* instrs
    cdef int ninstrs
    cdef Test* tests
    cdef int ntests

    def __cinit__(self):
        self.slots = NULL
        self.instrs = NULL
        self.tests = NULL

    def __init__(self, slots, tests):
        cdef int k, v
        cdef Slot* s
        cdef Test* t
        cdef Instr* ins
        slots = list(slots)
        tests = list(tests)
        self.nslots = len(slots)
        self.slots = <Slot*>calloc(max(self.nslots, 1), sizeof(Slot))
        self.ntests = len(tests)
        self.tests = <Test*>calloc(max(self.ntests, 1), sizeof(Test))
        self.ninstrs = sum(len(t[1]) for t in tests if t[0] == "check")
        self.instrs = <Instr*>calloc(max(self.ninstrs, 1), sizeof(Instr))
        if self.slots == NULL or self.tests == NULL or self.instrs == NULL:
            raise MemoryError()
        for k, spec in enumerate(slots):
            s = &self.slots[k]
            s.col = spec["col"]
            s.kind = _KINDS[spec["kind"]]
            valid = list(spec.get("valid", ()))
            if len(valid) > MAX_VALID or s.col < 0:
                raise ValueError("slot not supported")
            s.nvalid = len(valid)
            for v in range(s.nvalid):
                s.valid[v] = valid[v]
        pos = 0
        for k, spec in enumerate(tests):
            t = &self.tests[k]
            what = spec[0]
            if what == "len":
                t.kind = T_LEN
                t.slot = self._slot(spec[1], K_BYTES)
                t.n = spec[2]
                t.rule = spec[3]
            elif what == "notnull":
                t.kind = T_NOTNULL
                t.slot = self._slot(spec[1], 0)
                t.rule = spec[2]
            elif what == "check":
                t.kind = T_CHECK
                t.rule = spec[2]
                t.start = pos
                depth = 0
                for instr in spec[1]:
                    ins = &self.instrs[pos]
                    ins.code = _INSTRS[instr[0]]
                    if ins.code == I_CMPI or ins.code == I_CMPF:
                        ins.slot = self._slot(instr[1], -1 if ins.code == I_CMPI else -2)
                        ins.op = instr[2]
                        if not 0 <= ins.op <= 7:
                            raise ValueError(f"bad comparison op {ins.op}")
                        if ins.code == I_CMPI:
                            ins.k = instr[3]
                        else:
                            ins.d = instr[3]
                        depth += 1
                    elif ins.code == I_ISNULL or ins.code == I_ISNOTNULL:
                        ins.slot = self._slot(instr[1], 0)
                        depth += 1
                    elif ins.code == I_BOOL:
                        ins.slot = self._slot(instr[1], K_BOOL)
                        depth += 1
                    elif ins.code == I_CONST:
                        ins.op = instr[1]
                        if not 0 <= ins.op <= 2:
                            raise ValueError("bad constant")
                        depth += 1
                    elif ins.code == I_AND or ins.code == I_OR:
                        depth -= 1
                        if depth < 1:
                            raise ValueError("stack underflow")
                    elif depth < 1:
                        raise ValueError("stack underflow")
                    if depth > MAX_STACK:
                        raise ValueError("expression too deep")
                    pos += 1
                if depth != 1:
                    raise ValueError("the expression does not leave one value")
                t.stop = pos
            else:
                raise ValueError(f"unknown test {what!r}")

    cdef int _slot(self, int k, int kind) except -1:
        """Check slot ``k`` exists and reads ``kind`` (-1: an integer kind, -2: a float)."""
        if not 0 <= k < self.nslots:
            raise ValueError(f"no slot {k}")
        cdef int have = self.slots[k].kind
        if kind == -1 and have not in (K_I32, K_U32, K_I64, K_BOOL):
            raise ValueError(f"slot {k} is not an integer")
        if kind == -2 and have not in (K_F32, K_F64):
            raise ValueError(f"slot {k} is not a float")
        if kind > 0 and have != kind:
            raise ValueError(f"slot {k} has the wrong kind")
        return k

    def __dealloc__(self):
        free(self.slots)
        free(self.instrs)
        free(self.tests)

    cdef int _check_batch(self, Batch b, Py_ssize_t stop) except -1:
        cdef int k, v, want
        cdef Slot* s
        for k in range(self.nslots):
            s = &self.slots[k]
            for v in range(s.nvalid):
                if s.valid[v] >= b.ncols or b.cols[s.valid[v]].kind != COL_STRUCT \
                        or b.cols[s.valid[v]].length < stop:
                    raise ValueError("record validity column does not match the program")
            if s.col >= b.ncols or b.cols[s.col].length < stop:
                raise ValueError("column does not match the program (layout changed)")
            want = {K_I32: COL_INT32, K_U32: COL_INT32, K_I64: COL_INT64, K_BOOL: COL_BOOL,
                    K_F32: COL_FLOAT32, K_F64: COL_FLOAT64, K_BYTES: COL_BINARY}.get(s.kind, 0)
            if want and b.cols[s.col].kind != want:
                raise ValueError(f"column {b.names[s.col]!r} does not match the program")
        return 0

    def run(self, Batch batch, Py_ssize_t start, Py_ssize_t stop):
        """``[(row, rule), ...]``: the rows of ``[start, stop)`` that fail a test, each with
        the rule of its first failing test, in row order."""
        cdef Py_ssize_t i, nbad = 0, cap = 0
        cdef int64_t* bad = NULL
        cdef int64_t* grown
        cdef int k, j, top, r, a, b, fail
        cdef int stack[64]
        cdef Test* t
        cdef Instr* ins
        cdef Slot* s
        cdef Column* cols = batch.cols
        cdef const Column* c
        cdef bint oom = False
        if start < 0 or stop > batch.num_rows or start > stop:
            raise IndexError(f"rows [{start}, {stop}) out of range for {batch.num_rows} rows")
        self._check_batch(batch, stop)
        with nogil:
            for i in range(start, stop):
                fail = -1
                for k in range(self.ntests):
                    t = &self.tests[k]
                    if t.kind == T_LEN:
                        s = &self.slots[t.slot]
                        if not _null(cols, s, i) and _too_long(&cols[s.col], i, t.n):
                            fail = t.rule
                    elif t.kind == T_NOTNULL:
                        if _null(cols, &self.slots[t.slot], i):
                            fail = t.rule
                    else:
                        top = 0
                        for j in range(t.start, t.stop):
                            ins = &self.instrs[j]
                            if ins.code == I_CMPI or ins.code == I_CMPF:
                                s = &self.slots[ins.slot]
                                c = &cols[s.col]
                                if _null(cols, s, i):
                                    r = V_NULL
                                elif ins.code == I_CMPI:
                                    a = 0
                                    if ins.op < 6:
                                        a = _int(c, s.kind, i) > ins.k
                                        a = a - (_int(c, s.kind, i) < ins.k)
                                    r = _cmp_result(ins.op, a)
                                elif s.kind == K_F32:
                                    r = _cmp_result(ins.op, _float_cmp(
                                        <double>(<const float*>c.values.data)[i], ins.d))
                                else:
                                    r = _cmp_result(ins.op, _float_cmp(
                                        (<const double*>c.values.data)[i], ins.d))
                                stack[top] = r
                                top += 1
                            elif ins.code == I_ISNULL:
                                stack[top] = V_TRUE if _null(cols, &self.slots[ins.slot], i) else V_FALSE
                                top += 1
                            elif ins.code == I_ISNOTNULL:
                                stack[top] = V_FALSE if _null(cols, &self.slots[ins.slot], i) else V_TRUE
                                top += 1
                            elif ins.code == I_BOOL:
                                s = &self.slots[ins.slot]
                                if _null(cols, s, i):
                                    stack[top] = V_NULL
                                elif (<const uint8_t*>cols[s.col].values.data)[i]:
                                    stack[top] = V_TRUE
                                else:
                                    stack[top] = V_FALSE
                                top += 1
                            elif ins.code == I_CONST:
                                stack[top] = ins.op
                                top += 1
                            elif ins.code == I_AND:
                                top -= 1
                                stack[top - 1] = _and(stack[top - 1], stack[top])
                            elif ins.code == I_OR:
                                top -= 1
                                stack[top - 1] = _or(stack[top - 1], stack[top])
                            else:  # NOT: NULL stays NULL
                                if stack[top - 1] != V_NULL:
                                    stack[top - 1] = V_TRUE - stack[top - 1]
                        if stack[0] == V_FALSE:
                            fail = t.rule
                    if fail >= 0:
                        break
                if fail >= 0:
                    if nbad + 2 > cap:
                        cap = cap * 2 if cap else 64
                        grown = <int64_t*>realloc(bad, cap * sizeof(int64_t))
                        if grown == NULL:
                            oom = True
                            break
                        bad = grown
                    bad[nbad] = i
                    bad[nbad + 1] = fail
                    nbad += 2
        try:
            if oom:
                raise MemoryError()
            return [(bad[k], bad[k + 1]) for k in range(0, nbad, 2)]
        finally:
            free(bad)


def parse_double(bytes text):
    """``text`` as PostgreSQL's float8 input reads it (strtod), or None when it is not one
    whole number."""
    cdef char* end
    cdef const char* p = text
    cdef double v
    if not text:
        return None
    v = strtod(p, &end)
    if end != p + len(text):
        return None
    return v


def parse_float(bytes text):
    """``text`` as PostgreSQL's float4 input reads it (strtof, rounded once), or None."""
    cdef char* end
    cdef const char* p = text
    cdef float v
    if not text:
        return None
    v = strtof(p, &end)
    if end != p + len(text):
        return None
    return <double>v
