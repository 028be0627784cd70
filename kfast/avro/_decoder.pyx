# cython: language_level=3
"""The nogil Avro interpreter.

``kfast.avro.schema`` compiles reader/writer schemas into a flat array of
``Op`` structs; :func:`_run` walks it for one payload, reading through the
bounds-checked cursor (``kfast._cursor``) and appending to the batch's
columns (``kfast._columns``). A whole batch runs with the GIL released; each
bad payload is rolled back and reported after the loop as a RowError.

Ops (fields ``a``..``d`` by kind):

=========  =====================================================================
RECORD     a = offset of the kid op list in ``ints``, b = count; col = STRUCT col
INT/LONG/  tgt = column kind the value is stored as (promotions)
FLOAT/...
BYTES      b = 1 to validate UTF-8 (strings)
FIXED      a = size
ENUM       a = offset of the writer->reader index table, b = writer symbol count
ARRAY      a = item op, c = column counting the items (LIST end offsets)
MAP        a = value op, c = key column
UNION      a = offset of the branch table (op, BRANCH_NULL, BRANCH_UNRESOLVED),
           b = branch count, c/d = offset/count of the columns a null fills
OBJECT     a = op that validates and skips the value; the raw span is stored
DEFAULT    a/b = offset/length of the default's encoding in ``blob``, c = op
NULLFILL   c/d = columns to fill with null
=========  =====================================================================
"""

cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport INT64_MIN, int32_t, int64_t, uint8_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy

from kfast._batch cimport Batch, BaseDecoder
from kfast._columns cimport (
    COL_BINARY,
    COL_BOOL,
    COL_FLOAT32,
    COL_FLOAT64,
    COL_INT32,
    COL_INT64,
    COL_LIST,
    COL_OBJECT,
    COL_STRUCT,
    Column,
    buf_append,
    buf_reserve,
    col_append_bool,
    col_append_bytes,
    col_append_f32,
    col_append_f64,
    col_append_i32,
    col_append_i64,
    col_append_list_end,
    col_append_null,
    col_append_struct,
    col_end_offset,
    col_mark,
    kind_has_offsets,
)
from kfast._cursor cimport (
    CUR_BAD_LENGTH,
    CUR_OK,
    CUR_TRUNCATED,
    CUR_VARINT_TOO_LONG,
    Cursor,
    cur_init,
    cur_read_f32,
    cur_read_f64,
    cur_read_u8,
    cur_read_zigzag32,
    cur_read_zigzag64,
    cur_take,
)

from kfast._layout import ListNode, MapNode, ObjectNode, RecordNode, ValueNode
from kfast.avro import schema as _schema
from kfast.errors import ConfigError
from kfast.row_error import RowError


cdef enum OpKind:
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

cdef enum:
    BRANCH_NULL = -1
    BRANCH_UNRESOLVED = -2
    MAX_DEPTH = 512
    MAX_ZERO_SIZE_ITEMS = 1 << 24   # items per payload whose encoding may be empty

# Decode status codes (0 = ok); the cursor's codes are -1..-3.
cdef enum:
    E_UNION_INDEX = -10
    E_ENUM_INDEX = -11
    E_UTF8 = -12
    E_TRAILING = -13
    E_ENUM_UNRESOLVED = -14
    E_UNION_UNRESOLVED = -15
    E_BOOL = -16
    E_DEPTH = -17
    E_NOMEM = -18
    E_COUNT = -19
    E_HEADER = -20      # Confluent framing: payload shorter than 5 bytes
    E_MAGIC = -21       # Confluent framing: first byte is not 0
    E_SCHEMA = -22      # Confluent framing: no decoder for this schema id


def _check_constants():
    for name in ("K_NULL", "K_BOOL", "K_INT", "K_LONG", "K_FLOAT", "K_DOUBLE", "K_BYTES",
                 "K_FIXED", "K_ENUM", "K_RECORD", "K_ARRAY", "K_MAP", "K_UNION", "K_OBJECT",
                 "K_DEFAULT", "K_NULLFILL"):
        assert getattr(_schema, name) == globals()["_" + name], name
    kinds = {"COL_BOOL": COL_BOOL, "COL_INT32": COL_INT32, "COL_INT64": COL_INT64,
             "COL_FLOAT32": COL_FLOAT32, "COL_FLOAT64": COL_FLOAT64, "COL_BINARY": COL_BINARY,
             "COL_LIST": COL_LIST, "COL_OBJECT": COL_OBJECT, "COL_STRUCT": COL_STRUCT}
    for name, value in kinds.items():
        assert getattr(_schema, name) == value, name
    assert _schema.BRANCH_NULL == BRANCH_NULL and _schema.BRANCH_UNRESOLVED == BRANCH_UNRESOLVED


_K_NULL = K_NULL
_K_BOOL = K_BOOL
_K_INT = K_INT
_K_LONG = K_LONG
_K_FLOAT = K_FLOAT
_K_DOUBLE = K_DOUBLE
_K_BYTES = K_BYTES
_K_FIXED = K_FIXED
_K_ENUM = K_ENUM
_K_RECORD = K_RECORD
_K_ARRAY = K_ARRAY
_K_MAP = K_MAP
_K_UNION = K_UNION
_K_OBJECT = K_OBJECT
_K_DEFAULT = K_DEFAULT
_K_NULLFILL = K_NULLFILL
_check_constants()


cdef struct Op:
    int32_t kind
    int32_t col
    int32_t tgt
    int32_t a
    int32_t b
    int32_t c
    int32_t d
    int32_t name
    int32_t minsize


cdef struct Ctx:
    const Op* ops
    const int32_t* ints
    const unsigned char* blob
    Column* cols
    int32_t obj_tag      # >= 0: prefix OBJECT spans with this int32 (Confluent program slot)
    int64_t zero_items   # budget of items whose encoding may be empty, per payload
    # where the last failure happened
    int32_t err_op
    int64_t err_val
    Py_ssize_t err_need
    const unsigned char* err_at


cdef struct ErrRec:
    Py_ssize_t index
    int code
    int32_t op
    int64_t val
    Py_ssize_t need
    Py_ssize_t pos
    int32_t prog     # program slot (Confluent), -1 otherwise


# ---------------------------------------------------------------- UTF-8

@cython.boundscheck(False)
@cython.wraparound(False)
cdef bint utf8_valid(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    """Strict UTF-8 (no overlongs, surrogates or code points past U+10FFFF),
    what Python's ``bytes.decode('utf-8')`` accepts."""
    cdef Py_ssize_t i = 0
    cdef uint64_t w
    cdef unsigned char b, b1
    while i < n:
        while i + 8 <= n:
            memcpy(&w, s + i, 8)
            if w & 0x8080808080808080ULL:
                break
            i += 8
        if i >= n:
            break
        b = s[i]
        if b < 0x80:
            i += 1
            continue
        if b < 0xC2:
            return False
        if b < 0xE0:
            if i + 1 >= n or (s[i + 1] & 0xC0) != 0x80:
                return False
            i += 2
            continue
        if b < 0xF0:
            if i + 2 >= n:
                return False
            b1 = s[i + 1]
            if (b1 & 0xC0) != 0x80 or (s[i + 2] & 0xC0) != 0x80:
                return False
            if b == 0xE0 and b1 < 0xA0:
                return False
            if b == 0xED and b1 >= 0xA0:
                return False
            i += 3
            continue
        if b < 0xF5:
            if i + 3 >= n:
                return False
            b1 = s[i + 1]
            if (b1 & 0xC0) != 0x80 or (s[i + 2] & 0xC0) != 0x80 or (s[i + 3] & 0xC0) != 0x80:
                return False
            if b == 0xF0 and b1 < 0x90:
                return False
            if b == 0xF4 and b1 >= 0x90:
                return False
            i += 4
            continue
        return False
    return True


# ---------------------------------------------------------------- interpreter

cdef inline int _fail(Ctx* x, int code, int32_t oi, const unsigned char* at, int64_t val,
                      Py_ssize_t need) noexcept nogil:
    x.err_op = oi
    x.err_val = val
    x.err_need = need
    x.err_at = at
    return code


cdef inline int _store_int(Column* col, int tgt, int64_t v) noexcept nogil:
    if tgt == COL_INT32:
        return col_append_i32(col, <int32_t>v)
    if tgt == COL_INT64:
        return col_append_i64(col, v)
    if tgt == COL_FLOAT32:
        return col_append_f32(col, <float>v)
    return col_append_f64(col, <double>v)


cdef int _read_items(Ctx* x, int32_t oi, const Op* op, Cursor* c, int depth) noexcept nogil:
    """Arrays and maps: blocks of items until a zero count."""
    cdef int64_t count, size, j
    cdef int rc
    cdef const unsigned char* at
    cdef const unsigned char* p
    cdef Py_ssize_t minsize = x.ops[op.a].minsize
    cdef bint is_map = op.kind == K_MAP
    cdef Column* keys = NULL
    cdef int64_t klen
    if is_map:
        minsize += 1
        if op.col >= 0:
            keys = &x.cols[op.c]
    while True:
        at = c.buf
        rc = _zz64(c, &count)
        if rc != CUR_OK:
            return _fail(x, rc, oi, at, 0, 0)
        if count == 0:
            break
        if count < 0:
            if count == INT64_MIN:
                return _fail(x, E_COUNT, oi, at, count, 0)
            count = -count
            rc = cur_read_zigzag64(c, &size)
            if rc != CUR_OK:
                return _fail(x, rc, oi, c.buf, 0, 0)
            if size < 0:
                return _fail(x, CUR_BAD_LENGTH, oi, at, size, 0)
        if minsize > 0:
            if count > c.left // minsize:
                # the items cannot fit in what is left: a truncated payload
                return _fail(x, CUR_TRUNCATED, oi, c.buf, count,
                             count * minsize if count < (<int64_t>1 << 40) else (<int64_t>1 << 62))
        else:
            # items that may take no bytes (e.g. array<null>): a per-payload budget
            # bounds the work a tiny payload can cause
            if count > x.zero_items:
                return _fail(x, E_COUNT, oi, at, count, 0)
            x.zero_items -= count
        for j in range(count):
            if is_map:
                at = c.buf
                rc = _zz64(c, &klen)
                if rc != CUR_OK:
                    return _fail(x, rc, oi, at, 0, 0)
                if klen < 0:
                    return _fail(x, CUR_BAD_LENGTH, oi, at, klen, 0)
                p = cur_take(c, klen)
                if p == NULL:
                    return _fail(x, CUR_TRUNCATED, oi, c.buf, 0, klen)
                if not utf8_valid(p, klen):
                    return _fail(x, E_UTF8, oi, p, 0, 0)
                if keys != NULL and col_append_bytes(keys, p, klen) < 0:
                    return E_NOMEM
            rc = _run_leaf(x, op.a, c)
            if rc == 1:
                rc = _run(x, op.a, c, depth + 1)
            if rc < 0:
                return rc
    if op.col >= 0:
        if col_append_list_end(&x.cols[op.col], x.cols[op.c].length) < 0:
            return E_NOMEM
    return 0


# One-byte varints (small ints, enum indexes, short lengths, union branches)
# are the common case: decode them inline, else use the cursor's reader.
cdef inline int _zz64(Cursor* c, int64_t* out) noexcept nogil:
    cdef uint8_t b
    if c.left > 0:
        b = c.buf[0]
        if b < 0x80:
            out[0] = <int64_t>(b >> 1) ^ -<int64_t>(b & 1)
            c.buf += 1
            c.left -= 1
            return CUR_OK
    return cur_read_zigzag64(c, out)


cdef inline int _zz32(Cursor* c, int32_t* out) noexcept nogil:
    cdef uint8_t b
    if c.left > 0:
        b = c.buf[0]
        if b < 0x80:
            out[0] = <int32_t>(b >> 1) ^ -<int32_t>(b & 1)
            c.buf += 1
            c.left -= 1
            return CUR_OK
    return cur_read_zigzag32(c, out)


# Typed appenders: the same effect as _columns' col_append_* (which they
# fall back to for nullable columns), with a constant-width store the C
# compiler inlines instead of a memcpy of a run-time width.
cdef inline int _put_i64(Column* col, int64_t v) noexcept nogil:
    if col.nullable:
        return col_append_i64(col, v)
    if col.values.len + 8 > col.values.cap and buf_reserve(&col.values, 8) < 0:
        return -1
    memcpy(col.values.data + col.values.len, &v, 8)
    col.values.len += 8
    col.length += 1
    return 0


cdef inline int _put_i32(Column* col, int32_t v) noexcept nogil:
    if col.nullable:
        return col_append_i32(col, v)
    if col.values.len + 4 > col.values.cap and buf_reserve(&col.values, 4) < 0:
        return -1
    memcpy(col.values.data + col.values.len, &v, 4)
    col.values.len += 4
    col.length += 1
    return 0


cdef inline int _put_f64(Column* col, double v) noexcept nogil:
    if col.nullable:
        return col_append_f64(col, v)
    if col.values.len + 8 > col.values.cap and buf_reserve(&col.values, 8) < 0:
        return -1
    memcpy(col.values.data + col.values.len, &v, 8)
    col.values.len += 8
    col.length += 1
    return 0


cdef inline int _put_bool(Column* col, uint8_t v) noexcept nogil:
    if col.nullable:
        return col_append_bool(col, v)
    if col.values.len + 1 > col.values.cap and buf_reserve(&col.values, 1) < 0:
        return -1
    col.values.data[col.values.len] = v
    col.values.len += 1
    col.length += 1
    return 0


cdef inline int _put_bytes(Column* col, const unsigned char* p, Py_ssize_t n) noexcept nogil:
    cdef int32_t end
    if col.nullable:
        return col_append_bytes(col, p, n)
    if col.values.len + n > col.values.cap and buf_reserve(&col.values, n) < 0:
        return -1
    if col.values.len + n > 0x7FFFFFFF:
        return -1
    if col.offsets.len + 4 > col.offsets.cap and buf_reserve(&col.offsets, 4) < 0:
        return -1
    memcpy(col.values.data + col.values.len, p, n)
    col.values.len += n
    end = <int32_t>col.values.len
    memcpy(col.offsets.data + col.offsets.len, &end, 4)
    col.offsets.len += 4
    col.length += 1
    return 0


cdef int _append_tagged(Column* col, int32_t tag, const unsigned char* p,
                        Py_ssize_t n) noexcept nogil:
    """One OBJECT slot holding a 4-byte tag then the value's bytes."""
    if col_mark(col, True) < 0 or buf_append(&col.values, &tag, 4) < 0:
        return -1
    if buf_append(&col.values, p, n) < 0 or col_end_offset(col, col.values.len) < 0:
        return -1
    col.length += 1
    return 0


@cython.boundscheck(False)
@cython.wraparound(False)
cdef inline int _run_leaf(Ctx* x, int32_t oi, Cursor* c) noexcept nogil:
    """Fast path for the common scalar fields of a record (inlined in the
    record loop); returns 1 when the op is not one of them."""
    cdef const Op* op = &x.ops[oi]
    cdef Column* col
    cdef int rc
    cdef int64_t i64
    cdef int32_t i32
    cdef uint8_t u8
    cdef double f64
    cdef const unsigned char* at = c.buf
    cdef const unsigned char* p
    if op.col < 0:
        return 1
    col = &x.cols[op.col]
    if op.kind == K_LONG and op.tgt == COL_INT64:
        rc = _zz64(c, &i64)
        if rc != CUR_OK:
            return _fail(x, rc, oi, at, 0, 0)
        return E_NOMEM if _put_i64(col, i64) < 0 else 0
    if op.kind == K_BYTES:
        rc = _zz64(c, &i64)
        if rc != CUR_OK:
            return _fail(x, rc, oi, at, 0, 0)
        if i64 < 0:
            return _fail(x, CUR_BAD_LENGTH, oi, at, i64, 0)
        p = cur_take(c, i64)
        if p == NULL:
            return _fail(x, CUR_TRUNCATED, oi, c.buf, 0, i64)
        if op.b and not utf8_valid(p, i64):
            return _fail(x, E_UTF8, oi, p, 0, 0)
        return E_NOMEM if _put_bytes(col, p, i64) < 0 else 0
    if op.kind == K_DOUBLE:
        rc = cur_read_f64(c, &f64)
        if rc != CUR_OK:
            return _fail(x, rc, oi, at, 0, 8)
        return E_NOMEM if _put_f64(col, f64) < 0 else 0
    if op.kind == K_INT and op.tgt == COL_INT32:
        rc = _zz32(c, &i32)
        if rc != CUR_OK:
            return _fail(x, rc, oi, at, 0, 0)
        return E_NOMEM if _put_i32(col, i32) < 0 else 0
    if op.kind == K_BOOL:
        rc = cur_read_u8(c, &u8)
        if rc != CUR_OK:
            return _fail(x, rc, oi, at, 0, 1)
        if u8 > 1:
            return _fail(x, E_BOOL, oi, at, u8, 0)
        return E_NOMEM if _put_bool(col, u8) < 0 else 0
    if op.kind == K_ENUM:
        rc = _zz32(c, &i32)
        if rc != CUR_OK:
            return _fail(x, rc, oi, at, 0, 0)
        if i32 < 0 or i32 >= op.b:
            return _fail(x, E_ENUM_INDEX, oi, at, i32, 0)
        if x.ints[op.a + i32] < 0:
            return _fail(x, E_ENUM_UNRESOLVED, oi, at, i32, 0)
        return E_NOMEM if _put_i32(col, x.ints[op.a + i32]) < 0 else 0
    return 1


@cython.boundscheck(False)
@cython.wraparound(False)
cdef int _run(Ctx* x, int32_t oi, Cursor* c, int depth) noexcept nogil:
    """Read one value described by op ``oi``; 0 or a negative status."""
    cdef const Op* op = &x.ops[oi]
    cdef Column* col = &x.cols[op.col] if op.col >= 0 else NULL
    cdef int kind = op.kind
    cdef int rc
    cdef int32_t i32, k
    cdef int64_t i64
    cdef float f32
    cdef double f64
    cdef uint8_t u8
    cdef const unsigned char* at = c.buf
    cdef const unsigned char* p
    cdef const int32_t* kids
    cdef Cursor dc

    if kind == K_LONG:
        rc = _zz64(c, &i64)
        if rc != CUR_OK:
            return _fail(x, rc, oi, at, 0, 0)
        if col != NULL and _store_int(col, op.tgt, i64) < 0:
            return E_NOMEM
        return 0
    if kind == K_INT:
        rc = _zz32(c, &i32)
        if rc != CUR_OK:
            return _fail(x, rc, oi, at, 0, 0)
        if col != NULL and _store_int(col, op.tgt, i32) < 0:
            return E_NOMEM
        return 0
    if kind == K_BYTES:
        rc = _zz64(c, &i64)
        if rc != CUR_OK:
            return _fail(x, rc, oi, at, 0, 0)
        if i64 < 0:
            return _fail(x, CUR_BAD_LENGTH, oi, at, i64, 0)
        p = cur_take(c, i64)
        if p == NULL:
            return _fail(x, CUR_TRUNCATED, oi, c.buf, 0, i64)
        if op.b and not utf8_valid(p, i64):
            return _fail(x, E_UTF8, oi, p, 0, 0)
        if col != NULL and col_append_bytes(col, p, i64) < 0:
            return E_NOMEM
        return 0
    if kind == K_DOUBLE:
        rc = cur_read_f64(c, &f64)
        if rc != CUR_OK:
            return _fail(x, rc, oi, at, 0, 8)
        if col != NULL and col_append_f64(col, f64) < 0:
            return E_NOMEM
        return 0
    if kind == K_RECORD:
        if depth > MAX_DEPTH:
            return _fail(x, E_DEPTH, oi, at, 0, 0)
        if col != NULL and col_append_struct(col, True) < 0:
            return E_NOMEM
        kids = x.ints + op.a
        for k in range(op.b):
            rc = _run_leaf(x, kids[k], c)
            if rc == 1:
                rc = _run(x, kids[k], c, depth + 1)
            if rc < 0:
                return rc
        return 0
    if kind == K_UNION:
        if depth > MAX_DEPTH:
            return _fail(x, E_DEPTH, oi, at, 0, 0)
        rc = _zz64(c, &i64)
        if rc != CUR_OK:
            return _fail(x, rc, oi, at, 0, 0)
        if i64 < 0 or i64 >= op.b:
            return _fail(x, E_UNION_INDEX, oi, at, i64, 0)
        k = x.ints[op.a + i64]
        if k >= 0:
            rc = _run_leaf(x, k, c)
            if rc == 1:
                rc = _run(x, k, c, depth + 1)
            return rc
        if k == BRANCH_NULL:
            kids = x.ints + op.c
            for k in range(op.d):
                if col_append_null(&x.cols[kids[k]]) < 0:
                    return E_NOMEM
            return 0
        return _fail(x, E_UNION_UNRESOLVED, oi, at, i64, 0)
    if kind == K_BOOL:
        rc = cur_read_u8(c, &u8)
        if rc != CUR_OK:
            return _fail(x, rc, oi, at, 0, 1)
        if u8 > 1:
            return _fail(x, E_BOOL, oi, at, u8, 0)
        if col != NULL and col_append_bool(col, u8) < 0:
            return E_NOMEM
        return 0
    if kind == K_FLOAT:
        rc = cur_read_f32(c, &f32)
        if rc != CUR_OK:
            return _fail(x, rc, oi, at, 0, 4)
        if col != NULL:
            if op.tgt == COL_FLOAT32:
                rc = col_append_f32(col, f32)
            else:
                rc = col_append_f64(col, <double>f32)
            if rc < 0:
                return E_NOMEM
        return 0
    if kind == K_ENUM:
        rc = _zz32(c, &i32)
        if rc != CUR_OK:
            return _fail(x, rc, oi, at, 0, 0)
        if i32 < 0 or i32 >= op.b:
            return _fail(x, E_ENUM_INDEX, oi, at, i32, 0)
        k = x.ints[op.a + i32]
        if k < 0:
            return _fail(x, E_ENUM_UNRESOLVED, oi, at, i32, 0)
        if col != NULL and col_append_i32(col, k) < 0:
            return E_NOMEM
        return 0
    if kind == K_FIXED:
        p = cur_take(c, op.a)
        if p == NULL:
            return _fail(x, CUR_TRUNCATED, oi, at, 0, op.a)
        if col != NULL and col_append_bytes(col, p, op.a) < 0:
            return E_NOMEM
        return 0
    if kind == K_ARRAY or kind == K_MAP:
        if depth > MAX_DEPTH:
            return _fail(x, E_DEPTH, oi, at, 0, 0)
        return _read_items(x, oi, op, c, depth)
    if kind == K_OBJECT:
        rc = _run(x, op.a, c, depth + 1)
        if rc < 0:
            return rc
        if col != NULL:
            if x.obj_tag >= 0:
                rc = _append_tagged(col, x.obj_tag, at, c.buf - at)
            else:
                rc = col_append_bytes(col, at, c.buf - at)
            if rc < 0:
                return E_NOMEM
        return 0
    if kind == K_DEFAULT:
        cur_init(&dc, x.blob + op.a, op.b)
        return _run(x, op.c, &dc, depth + 1)
    if kind == K_NULLFILL:
        kids = x.ints + op.c
        for k in range(op.d):
            if col_append_null(&x.cols[kids[k]]) < 0:
                return E_NOMEM
        return 0
    # K_NULL
    return 0


cdef inline int _decode_one(Ctx* x, int32_t root, const unsigned char* buf,
                            Py_ssize_t n) noexcept nogil:
    cdef Cursor c
    cdef int rc
    cur_init(&c, buf, n)
    x.zero_items = MAX_ZERO_SIZE_ITEMS
    rc = _run(x, root, &c, 0)
    if rc < 0:
        return rc
    if c.left:
        return _fail(x, E_TRAILING, root, c.buf, c.left, 0)
    return 0


# ---------------------------------------------------------------- Program

cdef class Program:
    """A compiled schema (C copy of ``kfast.avro.schema.Program``)."""
    cdef Op* ops
    cdef Py_ssize_t nops
    cdef int32_t* ints
    cdef unsigned char* blob
    cdef int32_t root
    cdef readonly tuple spec
    cdef readonly object layout
    cdef readonly tuple converters
    cdef readonly list names
    cdef readonly object source        # the schema.Program
    cdef Py_ssize_t* reserve_cols      # fixed-width top-level columns (one slot per row)
    cdef Py_ssize_t nreserve

    def __cinit__(self):
        self.ops = NULL
        self.ints = NULL
        self.blob = NULL
        self.reserve_cols = NULL

    def __dealloc__(self):
        free(self.ops)
        free(self.ints)
        free(self.blob)
        free(self.reserve_cols)

    def __init__(self, prog):
        cdef Py_ssize_t i
        self.source = prog
        self.nops = len(prog.ops)
        self.ops = <Op*>malloc(max(self.nops, 1) * sizeof(Op))
        self.ints = <int32_t*>malloc(max(len(prog.ints), 1) * sizeof(int32_t))
        self.blob = <unsigned char*>malloc(max(len(prog.blob), 1))
        if self.ops == NULL or self.ints == NULL or self.blob == NULL:
            raise MemoryError()
        for i, o in enumerate(prog.ops):
            self.ops[i].kind, self.ops[i].col, self.ops[i].tgt, self.ops[i].a, self.ops[i].b, \
                self.ops[i].c, self.ops[i].d, self.ops[i].name, self.ops[i].minsize = o
        for i, v in enumerate(prog.ints):
            self.ints[i] = v
        if prog.blob:
            memcpy(self.blob, <const unsigned char*>prog.blob, len(prog.blob))
        self.root = prog.root
        self.spec = prog.spec
        self.layout = prog.layout
        self.converters = prog.converters
        self.names = prog.names
        # Columns with exactly one slot per row: reserve them up front (values of
        # fixed-width columns, offsets of binary/list ones, validity bitmaps).
        top = _top_fixed_columns(prog.layout, prog.spec)
        self.nreserve = len(top)
        self.reserve_cols = <Py_ssize_t*>malloc(max(self.nreserve, 1) * sizeof(Py_ssize_t))
        if self.reserve_cols == NULL:
            raise MemoryError()
        for i, k in enumerate(top):
            self.reserve_cols[i] = k

    def reason(self, int code, int32_t oi, int64_t val, Py_ssize_t need, Py_ssize_t pos):
        """The RowError reason for a failure status."""
        name = self.names[self.ops[oi].name] if 0 <= oi < self.nops else ""
        where = f" in field {name!r}" if name else ""
        if code == CUR_TRUNCATED:
            if need > 0:
                return f"truncated payload: needed {need} bytes at byte {pos}{where}"
            return f"truncated payload: varint runs past the end at byte {pos}{where}"
        if code == CUR_VARINT_TOO_LONG:
            return f"overlong varint at byte {pos}{where}"
        if code == CUR_BAD_LENGTH:
            return f"negative length {val} at byte {pos}{where}"
        if code == E_UNION_INDEX:
            return f"union branch {val} out of range for field {name!r} at byte {pos}"
        if code == E_UNION_UNRESOLVED:
            return (f"union branch {val} of field {name!r} at byte {pos} matches no type of "
                    "the reader schema")
        if code == E_ENUM_INDEX:
            return f"enum index {val} out of range for field {name!r} at byte {pos}"
        if code == E_ENUM_UNRESOLVED:
            return (f"enum index {val} of field {name!r} at byte {pos}: the symbol is not in "
                    "the reader schema, which has no default")
        if code == E_UTF8:
            return f"invalid UTF-8 in field {name!r} at byte {pos}"
        if code == E_TRAILING:
            return f"{val} trailing bytes after record"
        if code == E_BOOL:
            return f"invalid boolean byte {val} at byte {pos}{where}"
        if code == E_DEPTH:
            return f"values nested deeper than {MAX_DEPTH} levels at byte {pos}{where}"
        if code == E_COUNT:
            return (f"array/map block count {val} at byte {pos}{where} exceeds what the "
                    "payload can hold")
        return f"decode error {code} at byte {pos}{where}"


def _top_fixed_columns(layout, spec):
    out = []

    def walk(node):
        if isinstance(node, (ValueNode, ListNode, MapNode, ObjectNode)) and node.col >= 0:
            out.append(node.col)
        elif isinstance(node, RecordNode):
            if node.valid_col >= 0:
                out.append(node.valid_col)
            for _, child in node.fields:
                walk(child)

    walk(layout)
    return out


cdef int _reserve(Batch out, Program prog, Py_ssize_t n) except -1:
    cdef Py_ssize_t i
    cdef Column* c
    for i in range(prog.nreserve):
        c = &out.cols[prog.reserve_cols[i]]
        if c.width and buf_reserve(&c.values, n * c.width) < 0:
            raise MemoryError()
        if kind_has_offsets(c.kind) and buf_reserve(&c.offsets, n * 4) < 0:
            raise MemoryError()
        if c.nullable and buf_reserve(&c.validity, (n + 7) >> 3) < 0:
            raise MemoryError()
    if buf_reserve(&out.source_index.values, n * 4) < 0:
        raise MemoryError()
    return 0


cdef class _ErrBuf:
    """Per-call scratch: failed rows and the row checkpoint (per call, not per
    decoder, so one decoder can be used from several threads at once)."""
    cdef ErrRec* recs
    cdef Py_ssize_t n
    cdef Py_ssize_t cap
    cdef Py_ssize_t* saved

    def __cinit__(self):
        self.recs = NULL
        self.n = 0
        self.cap = 0
        self.saved = NULL

    def __dealloc__(self):
        free(self.recs)
        free(self.saved)

    cdef int alloc_saved(self, Py_ssize_t n) except -1:
        self.saved = <Py_ssize_t*>malloc(max(n, 1) * sizeof(Py_ssize_t))
        if self.saved == NULL:
            raise MemoryError()
        return 0

    cdef int push(self, Py_ssize_t index, int code, Ctx* x, const unsigned char* start,
                  int32_t prog) noexcept nogil:
        cdef ErrRec* r
        cdef Py_ssize_t cap
        if self.n == self.cap:
            cap = self.cap * 2 if self.cap else 16
            r = <ErrRec*>realloc(self.recs, cap * sizeof(ErrRec))
            if r == NULL:
                return -1
            self.recs = r
            self.cap = cap
        r = &self.recs[self.n]
        r.index = index
        r.code = code
        r.op = x.err_op
        r.val = x.err_val
        r.need = x.err_need
        r.pos = x.err_at - start if x.err_at != NULL else 0
        r.prog = prog
        self.n += 1
        return 0


# ---------------------------------------------------------------- decoders

cdef class AvroDecoder(BaseDecoder):
    """Decode schemaless Avro payloads (one record per payload) into a Batch.

    ``AvroDecoder(schema, writer_schema=None)``: ``schema`` is the reader
    schema (dict, JSON string or path to an .avsc file); with
    ``writer_schema`` the payloads are read as the writer wrote them and
    resolved to the reader schema per the Avro specification.
    """
    cdef readonly Program program
    cdef readonly object schema
    cdef readonly object writer_schema

    def __init__(self, schema, writer_schema=None):
        reader = _schema.parse(schema)
        writer = _schema.parse(writer_schema) if writer_schema is not None else None
        self.schema = reader
        self.writer_schema = writer
        self.program = Program(_schema.compile_schema(reader, writer))

    @property
    def column_names(self):
        """Names of every column the decoder produces (dotted paths)."""
        return [s[0] for s in self.program.spec]

    cdef int decode_spans(self, const unsigned char** ptrs, const Py_ssize_t* lens,
                          Py_ssize_t n, Batch out) except -1:
        cdef Program prog = self.program
        cdef Ctx x
        cdef Py_ssize_t i
        cdef int rc
        cdef bint nomem = False
        cdef _ErrBuf errs = _ErrBuf()
        out.setup(prog.spec, prog.layout, prog.converters)
        errs.alloc_saved(out.ncols + 1)
        _reserve(out, prog, n)
        x.ops = prog.ops
        x.ints = prog.ints
        x.blob = prog.blob
        x.cols = out.cols
        x.err_at = NULL
        x.obj_tag = -1
        with nogil:
            for i in range(n):
                out.begin_row_checkpoint(errs.saved)
                x.err_at = NULL
                rc = _decode_one(&x, prog.root, ptrs[i], lens[i])
                if rc == 0:
                    if col_append_i32(&out.source_index, <int32_t>i) < 0:
                        rc = E_NOMEM
                    else:
                        out.num_rows += 1
                        continue
                out.rollback(errs.saved)
                if rc == E_NOMEM or errs.push(i, rc, &x, ptrs[i], -1) < 0:
                    nomem = True
                    break
        if nomem:
            raise MemoryError("out of memory while decoding Avro payloads")
        for i in range(errs.n):
            r = &errs.recs[i]
            out.errors.append(RowError(r.index, prog.reason(r.code, r.op, r.val, r.need, r.pos)))
        out.finish()
        return 0


cdef struct ProgRef:
    const Op* ops
    const int32_t* ints
    const unsigned char* blob
    int32_t root


cdef class FramedAvroDecoder(BaseDecoder):
    """Avro behind the Confluent wire format: magic byte 0, a 4-byte big-endian
    schema id, then the schemaless record.

    Subclasses provide ``_program_for(schema_id)`` returning a Program whose
    column spec equals ``_columns_program()``'s, or raising; ``_failure_reason
    (schema_id, exc)`` then gives every payload of that id a RowError with its
    reason, or re-raises to fail the whole batch before any row is decoded
    (``ConfluentDecoder`` does that for ``SchemaRegistryUnavailable``: an
    outage is retried, never dead-lettered).

    Every decision lives in ``decode_spans`` and these hooks: the ring calls
    ``decode_spans`` directly, so a Pipeline and ``decode(payloads)`` give
    the same rows. An override of ``decode`` may only be a shortcut to those
    rows (``ConfluentDecoder``'s spares a Protobuf batch a pass).
    """
    def _program_for(self, schema_id):
        raise NotImplementedError

    def _columns_program(self, first_schema_id):
        raise NotImplementedError

    def _batch_decoder(self, first_schema_id):
        """Who decodes a batch, asked once per batch with the schema id of its
        first framed payload: None (the default) decodes it here as Avro; an
        other decoder gets the whole batch instead (``ConfluentDecoder``: a
        Protobuf id). Raising makes that id's payloads RowErrors
        (``_failure_reason``) and the batch is decoded here.

        A BaseDecoder is handed the spans (``decode_spans``: no copy); any
        other object must have ``decode(payloads, out)``, decode into ``out``
        and return it, and receives each payload copied once as ``bytes``.
        """
        return None

    cdef int decode_spans(self, const unsigned char** ptrs, const Py_ssize_t* lens,
                          Py_ssize_t n, Batch out) except -1:
        cdef Py_ssize_t i
        cdef int64_t* ids = NULL
        cdef int32_t* slot = NULL
        cdef ProgRef* refs = NULL
        cdef const unsigned char* p
        cdef int64_t last = -1
        cdef int32_t last_slot = -1
        cdef Py_ssize_t nprogs
        cdef Program prog, cols_prog
        cdef Ctx x
        cdef int rc
        cdef bint nomem = False
        cdef _ErrBuf errs = _ErrBuf()
        cdef ErrRec* r
        # 1. the first framed payload's id decides who decodes the batch (asked
        # before anything is allocated: a batch handed over costs one header read)
        first_failure = None
        for i in range(n):
            p = ptrs[i]
            if lens[i] < 5 or p[0] != 0:
                continue
            sid = (<int64_t>p[1] << 24) | (<int64_t>p[2] << 16) | (<int64_t>p[3] << 8) | p[4]
            try:
                other = self._batch_decoder(sid)
            except Exception as exc:
                first_failure = (sid, self._failure_reason(sid, exc))
                break
            if other is not None:
                _hand_over(other, ptrs, lens, n, out)
                return 0
            break
        ids = <int64_t*>malloc(max(n, 1) * sizeof(int64_t))
        slot = <int32_t*>malloc(max(n, 1) * sizeof(int32_t))
        if ids == NULL or slot == NULL:
            free(ids)
            free(slot)
            raise MemoryError()
        try:
            # 2. framing: schema id per payload (-1 short, -2 wrong magic)
            for i in range(n):
                if lens[i] < 5:
                    ids[i] = -1
                    continue
                p = ptrs[i]
                if p[0] != 0:
                    ids[i] = -2
                    continue
                ids[i] = (<int64_t>p[1] << 24) | (<int64_t>p[2] << 16) | (<int64_t>p[3] << 8) | p[4]
            programs = []
            failures = []      # per slot: reason string or None
            slot_ids = []
            slot_of = {}
            first_ok = None
            if first_failure is not None:  # that id's payloads fail with the registry's reason
                sid, reason = first_failure
                slot_of[sid] = 0
                slot_ids.append(sid)
                programs.append(None)
                failures.append(reason)
            # 3. one program per distinct id (Python, once per id and batch)
            for i in range(n):
                if ids[i] < 0:
                    slot[i] = -1
                    continue
                if ids[i] == last:
                    slot[i] = last_slot
                    continue
                sid = ids[i]
                s = slot_of.get(sid)
                if s is None:
                    s = len(programs)
                    slot_of[sid] = s
                    slot_ids.append(sid)
                    try:
                        programs.append(self._program_for(sid))
                        failures.append(None)
                        if first_ok is None:
                            first_ok = sid
                    except Exception as exc:
                        programs.append(None)
                        failures.append(self._failure_reason(sid, exc))
                slot[i] = s
                last = ids[i]
                last_slot = s
            # the columns: the reader schema (or the first id that compiled)
            cols_prog = self._columns_program(first_ok)
            for s in range(len(programs)):
                if programs[s] is not None and (<Program>programs[s]).spec != cols_prog.spec:
                    programs[s] = None
                    failures[s] = (f"schema id {slot_ids[s]}: its columns differ from the "
                                   "decoder's reader schema")
            nprogs = len(programs)
            refs = <ProgRef*>malloc(max(nprogs, 1) * sizeof(ProgRef))
            if refs == NULL:
                raise MemoryError()
            for i in range(nprogs):
                if programs[i] is None:
                    refs[i].ops = NULL
                    continue
                prog = programs[i]
                refs[i].ops = prog.ops
                refs[i].ints = prog.ints
                refs[i].blob = prog.blob
                refs[i].root = prog.root
            # 4. decode with the GIL released; OBJECT spans carry their program
            # slot so each is converted with its own writer schema
            converters = tuple(
                _TaggedConverter(programs, k) if conv is not None else None
                for k, conv in enumerate(cols_prog.converters)
            )
            out.setup(cols_prog.spec, cols_prog.layout, converters)
            x.obj_tag = 0
            errs.alloc_saved(out.ncols + 1)
            _reserve(out, cols_prog, n)
            x.cols = out.cols
            with nogil:
                for i in range(n):
                    out.begin_row_checkpoint(errs.saved)
                    x.err_at = NULL
                    x.err_op = -1
                    x.err_val = ids[i]
                    if slot[i] < 0:
                        rc = E_HEADER if ids[i] == -1 else E_MAGIC
                        x.err_val = lens[i] if ids[i] == -1 else (ptrs[i][0] if lens[i] else 0)
                    elif refs[slot[i]].ops == NULL:
                        rc = E_SCHEMA
                    else:
                        x.obj_tag = slot[i]
                        x.ops = refs[slot[i]].ops
                        x.ints = refs[slot[i]].ints
                        x.blob = refs[slot[i]].blob
                        rc = _decode_one(&x, refs[slot[i]].root, ptrs[i] + 5, lens[i] - 5)
                        if rc == 0:
                            if col_append_i32(&out.source_index, <int32_t>i) < 0:
                                rc = E_NOMEM
                            else:
                                out.num_rows += 1
                                continue
                    out.rollback(errs.saved)
                    if rc == E_NOMEM or errs.push(i, rc, &x, ptrs[i] + 5, slot[i]) < 0:
                        nomem = True
                        break
            if nomem:
                raise MemoryError("out of memory while decoding Avro payloads")
            for i in range(errs.n):
                r = &errs.recs[i]
                if r.code == E_HEADER:
                    reason = (f"payload of {r.val} bytes is too short for the Confluent header "
                              "(magic byte + 4-byte schema id)")
                elif r.code == E_MAGIC:
                    reason = f"wrong magic byte 0x{r.val:02x} (expected 0x00 for Confluent framing)"
                elif r.code == E_SCHEMA:
                    reason = failures[r.prog]
                else:
                    prog = programs[r.prog]
                    reason = (f"schema id {ids[r.index]}: "
                              + prog.reason(r.code, r.op, r.val, r.need, r.pos + 5))
                out.errors.append(RowError(r.index, reason))
            out.finish()
        finally:
            free(ids)
            free(slot)
            free(refs)
        return 0

    def _failure_reason(self, schema_id, exc):
        return f"schema id {schema_id}: {exc}"


cdef int _hand_over(object decoder, const unsigned char** ptrs, const Py_ssize_t* lens,
                    Py_ssize_t n, Batch out) except -1:
    """Let ``decoder`` decode the whole batch into ``out``.

    A compiled decoder (BaseDecoder) reads the spans themselves, like the
    ring's own call: no copy. Any other object gets ``decode(payloads, out)``
    with each span copied once into a ``bytes`` (never a view: a payload kept
    past the call must not read the ring's arena after it is recycled)."""
    cdef Py_ssize_t i
    cdef list payloads
    if isinstance(decoder, BaseDecoder):
        (<BaseDecoder>decoder).decode_spans(ptrs, lens, n, out)
        return 0
    payloads = [None] * n
    for i in range(n):
        payloads[i] = PyBytes_FromStringAndSize(<const char*>ptrs[i], lens[i])
    result = decoder.decode(payloads, out)
    if result is not out:
        raise TypeError(f"{type(decoder).__name__}.decode(payloads, out) must decode into "
                        f"out and return it, got {type(result).__name__}")
    return 0


class _TaggedConverter:
    """OBJECT converter of a Confluent batch: the first 4 bytes of each span
    name the program (writer schema) that produced it."""

    __slots__ = ("programs", "col")

    def __init__(self, programs, col):
        self.programs = programs
        self.col = col

    def __call__(self, raw):
        slot = int.from_bytes(raw[:4], "little")
        return self.programs[slot].converters[self.col](raw[4:])
