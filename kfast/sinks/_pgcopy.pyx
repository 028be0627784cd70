# cython: language_level=3
"""PostgreSQL binary COPY encoder working straight from a Batch's columns.

The stream format (``COPY ... FROM STDIN (FORMAT BINARY)``) is documented in
PostgreSQL's "COPY" reference, section "Binary Format": an 11-byte signature,
an int32 flags field, an int32 header-extension length, then per tuple an
int16 field count followed by, per field, an int32 byte length (-1 = NULL)
and the value in the type's binary *send* format (network byte order).

The per-type send formats used here come from the server sources
(``int4send``, ``int8send``, ``float4send``, ``float8send``, ``boolsend``,
``textsend``, ``bytearecv``, ``numeric_send``, ``uuid_send``, ``date_send``,
``time_send``, ``timestamp_send``, ``array_send``, ``jsonb_send``).

The encoder is compiled once per (batch layout, table) pair from a *plan*
(one entry per output column, built in :mod:`kfast.sinks.postgres`) and then
encodes row ranges with the GIL released into a reusable growable buffer.
No Python object is created per row or per value, except for columns whose
plan is ``pre`` (maps with nested values and OBJECT columns): their JSON is
produced with the GIL held before the loop (the documented slow path).
"""
cimport cython
from cpython.buffer cimport PyBUF_WRITABLE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.math cimport isfinite
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdio cimport snprintf
from libc.stdlib cimport calloc, free, malloc, strtod
from libc.string cimport memcpy, memset

from kfast.errors import EncodeError  # a KfastError; re-exported here

from kfast._batch cimport Batch
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
    GrowBuf,
    buf_free,
    buf_reserve,
    col_is_valid,
    col_offset,
)

# Operations: how one value is encoded (the PG type and the column kind it reads).
cdef enum Op:
    OP_BOOL = 1          # BOOL -> bool
    OP_INT4 = 2          # INT32 -> int4
    OP_INT8_I32 = 3      # INT32 -> int8
    OP_INT8 = 4          # INT64 -> int8
    OP_FLOAT4 = 5        # FLOAT32 -> float4
    OP_FLOAT8_F32 = 6    # FLOAT32 -> float8
    OP_FLOAT8 = 7        # FLOAT64 -> float8
    OP_BYTES = 8         # BINARY -> text/varchar/bytea (bytes as they are)
    OP_ENUM = 9          # INT32 symbol index -> text
    OP_NUMERIC = 10      # BINARY two's complement unscaled -> numeric
    OP_UUID = 11         # BINARY (36-char text or 16 raw bytes) -> uuid
    OP_DATE = 12         # INT32 days since 1970 -> date
    OP_TIME_MS = 13      # INT32 ms -> time
    OP_TIME_US = 14      # INT64 us -> time
    OP_TS_MS = 15        # INT64 ms since 1970 -> timestamp[tz]
    OP_TS_US = 16        # INT64 us since 1970 -> timestamp[tz]
    OP_TS_NS = 17        # INT64 ns since 1970 -> timestamp[tz] (floor to us)
    OP_ARRAY = 18        # LIST of a scalar op -> PG array
    OP_MAP_JSONB = 19    # LIST of (str key, scalar value) entries -> jsonb
    OP_PRE = 20          # pre-encoded bytes supplied by Python (jsonb slow path)
    OP_ROWNUM = 21       # int8 row number (upsert staging: last row wins)
    OP_JSONB_STR = 22    # BINARY holding JSON text -> jsonb
    OP_U32_INT8 = 23     # INT32 holding a uint32 -> int8
    OP_U64_INT8 = 24     # INT64 holding a uint64 -> int8 (values > 2^63-1 are an error)
    OP_U64_NUMERIC = 25  # INT64 holding a uint64 -> numeric
    OP_INTERVAL_US = 26  # INT64 us (a duration) -> interval

OPS = {
    "bool": OP_BOOL, "int4": OP_INT4, "int8_i32": OP_INT8_I32, "int8": OP_INT8,
    "float4": OP_FLOAT4, "float8_f32": OP_FLOAT8_F32, "float8": OP_FLOAT8,
    "bytes": OP_BYTES, "enum": OP_ENUM, "numeric": OP_NUMERIC, "uuid": OP_UUID,
    "date": OP_DATE, "time_ms": OP_TIME_MS, "time_us": OP_TIME_US,
    "ts_ms": OP_TS_MS, "ts_us": OP_TS_US, "ts_ns": OP_TS_NS,
    "array": OP_ARRAY, "map_jsonb": OP_MAP_JSONB, "pre": OP_PRE, "rownum": OP_ROWNUM,
    "jsonb_str": OP_JSONB_STR, "u32_int8": OP_U32_INT8, "u64_int8": OP_U64_INT8,
    "u64_numeric": OP_U64_NUMERIC, "interval_us": OP_INTERVAL_US,
}

# Column kind each scalar op reads (0: not a scalar op).
cdef int _op_kind(int op) noexcept nogil:
    if op == OP_BOOL:
        return COL_BOOL
    if op == OP_INT4 or op == OP_INT8_I32 or op == OP_ENUM or op == OP_DATE or op == OP_TIME_MS \
            or op == OP_U32_INT8:
        return COL_INT32
    if op == OP_INT8 or op == OP_TIME_US or op == OP_TS_MS or op == OP_TS_US or op == OP_TS_NS \
            or op == OP_U64_INT8 or op == OP_U64_NUMERIC or op == OP_INTERVAL_US:
        return COL_INT64
    if op == OP_FLOAT4 or op == OP_FLOAT8_F32:
        return COL_FLOAT32
    if op == OP_FLOAT8:
        return COL_FLOAT64
    if op == OP_BYTES or op == OP_NUMERIC or op == OP_UUID or op == OP_JSONB_STR:
        return COL_BINARY
    if op == OP_ARRAY or op == OP_MAP_JSONB:
        return COL_LIST
    return 0

# Status codes of the nogil encoder.
cdef enum Status:
    ST_OK = 0
    ST_NOMEM = -1
    ST_BAD_DECIMAL = -2
    ST_BAD_UUID = -3
    ST_BAD_ENUM = -4
    ST_BAD_SHAPE = -5
    ST_OUT_OF_RANGE = -6

cdef int MAX_VALID = 8

cdef int64_t PG_EPOCH_US = 946684800000000   # 2000-01-01 - 1970-01-01 in us
cdef int32_t PG_EPOCH_DAYS = 10957
cdef const char* SIGNATURE = b"PGCOPY\n\xff\r\n\0"


cdef struct FieldPlan:
    int op
    int col             # value column (LIST column for arrays and maps)
    int child           # array: element column; map: key column
    int child2          # map: value column
    int elem_op         # array element op / map value op
    uint32_t elem_oid   # array element type OID
    int scale           # decimal scale (scalar or element)
    int nvalid          # STRUCT columns that must all be valid for a non-NULL value
    int valid[8]
    int pre_slot        # OP_PRE: which pre-encoded slot
    # enum symbols (scalar, array element or map value)
    int nsym
    int sym_base        # enum number of sym_ptr[0] (protobuf enums may be negative)
    const char** sym_ptr  # NULL entry: a number without a symbol (written as its digits)
    int32_t* sym_len


cdef struct PreSlot:
    const char** ptr
    Py_ssize_t* len
    Py_ssize_t cap


# ------------------------------------------------------------ buffer writers

cdef inline int _reserve(GrowBuf* o, Py_ssize_t n) noexcept nogil:
    if o.len + n > o.cap:
        return buf_reserve(o, n)
    return 0


cdef inline void _w16(unsigned char* p, uint16_t v) noexcept nogil:
    p[0] = <unsigned char>(v >> 8)
    p[1] = <unsigned char>v


cdef inline void _w32(unsigned char* p, uint32_t v) noexcept nogil:
    p[0] = <unsigned char>(v >> 24)
    p[1] = <unsigned char>(v >> 16)
    p[2] = <unsigned char>(v >> 8)
    p[3] = <unsigned char>v


cdef inline void _w64(unsigned char* p, uint64_t v) noexcept nogil:
    _w32(p, <uint32_t>(v >> 32))
    _w32(p + 4, <uint32_t>v)


cdef inline int _put_raw(GrowBuf* o, const void* src, Py_ssize_t n) noexcept nogil:
    if _reserve(o, n) < 0:
        return ST_NOMEM
    if n:
        memcpy(o.data + o.len, src, n)
    o.len += n
    return ST_OK


cdef inline int _put_i32(GrowBuf* o, int32_t v) noexcept nogil:
    if _reserve(o, 4) < 0:
        return ST_NOMEM
    _w32(o.data + o.len, <uint32_t>v)
    o.len += 4
    return ST_OK


cdef inline int _put_len_u64(GrowBuf* o, int32_t n, uint64_t v) noexcept nogil:
    """length prefix + big-endian value of ``n`` (4 or 8) bytes."""
    if _reserve(o, 4 + n) < 0:
        return ST_NOMEM
    _w32(o.data + o.len, <uint32_t>n)
    if n == 8:
        _w64(o.data + o.len + 4, v)
    elif n == 4:
        _w32(o.data + o.len + 4, <uint32_t>v)
    else:
        o.data[o.len + 4] = <unsigned char>v
    o.len += 4 + n
    return ST_OK


cdef inline int64_t _floordiv(int64_t a, int64_t b) noexcept nogil:
    cdef int64_t q = a // b
    if (a % b != 0) and ((a < 0) != (b < 0)):
        q -= 1
    return q


# ------------------------------------------------------------ numeric

cdef int _put_numeric(GrowBuf* o, const unsigned char* p, Py_ssize_t n, int scale) noexcept nogil:
    """PG numeric_send from a big-endian two's-complement unscaled integer.

    numeric binary: int16 ndigits, int16 weight, uint16 sign, int16 dscale,
    then ndigits int16 base-10000 digits, most significant first; the value
    is sum(digit[i] * 10000^(weight - i)).
    """
    cdef unsigned char mag[64]
    cdef uint32_t limbs[48]      # base 10000, least significant first
    cdef Py_ssize_t i, j, nl = 0, lo
    cdef bint neg
    cdef uint32_t carry, v, mult
    cdef int pad, fracg, ndigits, weight
    cdef unsigned char* w
    if n > 64 or scale < 0 or scale > 0x3FFF:
        return ST_BAD_DECIMAL
    neg = n > 0 and (p[0] & 0x80) != 0
    for i in range(n):
        mag[i] = (~p[i] & 0xFF) if neg else p[i]
    if neg:   # two's complement magnitude: invert (above) and add one
        i = n - 1
        while i >= 0:
            mag[i] = <unsigned char>(mag[i] + 1)
            if mag[i] != 0:
                break
            i -= 1
    for i in range(n):
        carry = mag[i]
        for j in range(nl):
            v = limbs[j] * 256 + carry
            limbs[j] = v % 10000
            carry = v // 10000
        while carry:
            limbs[nl] = carry % 10000
            carry //= 10000
            nl += 1
    # Align the decimal point on a base-10000 digit boundary.
    pad = (4 - scale % 4) % 4
    mult = 1
    for i in range(pad):
        mult *= 10
    if mult != 1:
        carry = 0
        for j in range(nl):
            v = limbs[j] * mult + carry
            limbs[j] = v % 10000
            carry = v // 10000
        while carry:
            limbs[nl] = carry % 10000
            carry //= 10000
            nl += 1
    fracg = (scale + pad) // 4
    while nl > 0 and limbs[nl - 1] == 0:
        nl -= 1
    if _reserve(o, 4 + 8 + 2 * nl) < 0:
        return ST_NOMEM
    w = o.data + o.len
    if nl == 0:
        _w32(w, 8)
        _w16(w + 4, 0)
        _w16(w + 6, 0)
        _w16(w + 8, 0)
        _w16(w + 10, <uint16_t>scale)
        o.len += 12
        return ST_OK
    lo = 0
    while limbs[lo] == 0:
        lo += 1
    ndigits = <int>(nl - lo)
    weight = <int>(nl - 1) - fracg
    _w32(w, <uint32_t>(8 + 2 * ndigits))
    _w16(w + 4, <uint16_t>ndigits)
    _w16(w + 6, <uint16_t><int16_t>weight)
    _w16(w + 8, 0x4000 if neg else 0)
    _w16(w + 10, <uint16_t>scale)
    w += 12
    j = nl - 1
    while j >= lo:
        _w16(w, <uint16_t>limbs[j])
        w += 2
        j -= 1
    o.len += 12 + 2 * ndigits
    return ST_OK


cdef int _put_numeric_u64(GrowBuf* o, uint64_t v) noexcept nogil:
    cdef uint16_t digits[5]
    cdef int n = 0, k
    cdef unsigned char* w
    while v:
        digits[n] = <uint16_t>(v % 10000)
        v //= 10000
        n += 1
    k = 0
    while k < n and digits[k] == 0:   # trailing (least significant) zero groups
        k += 1
    if _reserve(o, 12 + 2 * (n - k)) < 0:
        return ST_NOMEM
    w = o.data + o.len
    _w32(w, <uint32_t>(8 + 2 * (n - k)))
    _w16(w + 4, <uint16_t>(n - k))
    _w16(w + 6, <uint16_t>(n - 1 if n else 0))
    _w16(w + 8, 0)
    _w16(w + 10, 0)
    w += 12
    while n > k:
        n -= 1
        _w16(w, digits[n])
        w += 2
    o.len = w - o.data
    return ST_OK


cdef inline const char* _enum_symbol(FieldPlan* f, int32_t number, int32_t* length) noexcept nogil:
    """The symbol of an enum number, or NULL when it has none (open protobuf enums)."""
    cdef int64_t k = <int64_t>number - f.sym_base
    if k < 0 or k >= f.nsym or f.sym_ptr[k] == NULL:
        return NULL
    length[0] = f.sym_len[k]
    return f.sym_ptr[k]


# ------------------------------------------------------------ uuid

cdef inline int _hexval(unsigned char ch) noexcept nogil:
    if ch >= c'0' and ch <= c'9':
        return ch - c'0'
    if ch >= c'a' and ch <= c'f':
        return ch - c'a' + 10
    if ch >= c'A' and ch <= c'F':
        return ch - c'A' + 10
    return -1


cdef int _put_uuid(GrowBuf* o, const unsigned char* p, Py_ssize_t n) noexcept nogil:
    cdef unsigned char raw[16]
    cdef Py_ssize_t i, k = 0
    cdef int hi, lo
    if n == 16:
        memcpy(raw, p, 16)
    elif n == 36 or n == 32:
        i = 0
        while i < n:
            if n == 36 and (i == 8 or i == 13 or i == 18 or i == 23):
                if p[i] != c'-':
                    return ST_BAD_UUID
                i += 1
                continue
            if i + 1 >= n or k >= 16:
                return ST_BAD_UUID
            hi = _hexval(p[i])
            lo = _hexval(p[i + 1])
            if hi < 0 or lo < 0:
                return ST_BAD_UUID
            raw[k] = <unsigned char>((hi << 4) | lo)
            k += 1
            i += 2
        if k != 16:
            return ST_BAD_UUID
    else:
        return ST_BAD_UUID
    if _reserve(o, 20) < 0:
        return ST_NOMEM
    _w32(o.data + o.len, 16)
    memcpy(o.data + o.len + 4, raw, 16)
    o.len += 20
    return ST_OK


# ------------------------------------------------------------ JSON (maps)

cdef int _json_str(GrowBuf* o, const unsigned char* p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef unsigned char ch
    cdef const char* hexd = b"0123456789abcdef"
    if _reserve(o, n + 2) < 0:
        return ST_NOMEM
    o.data[o.len] = c'"'
    o.len += 1
    for i in range(n):
        ch = p[i]
        if ch == c'"' or ch == c'\\':
            if _reserve(o, 2) < 0:
                return ST_NOMEM
            o.data[o.len] = c'\\'
            o.data[o.len + 1] = ch
            o.len += 2
        elif ch < 0x20:
            if _reserve(o, 6) < 0:
                return ST_NOMEM
            memcpy(o.data + o.len, b"\\u00", 4)
            o.data[o.len + 4] = hexd[ch >> 4]
            o.data[o.len + 5] = hexd[ch & 15]
            o.len += 6
        else:
            if _reserve(o, 1) < 0:
                return ST_NOMEM
            o.data[o.len] = ch
            o.len += 1
    if _reserve(o, 1) < 0:
        return ST_NOMEM
    o.data[o.len] = c'"'
    o.len += 1
    return ST_OK


cdef int _json_double(GrowBuf* o, double v, bint single) noexcept nogil:
    """Shortest decimal text that reads back to the same float (like repr)."""
    cdef char tmp[40]
    cdef int prec, k
    if not isfinite(v):
        return _put_raw(o, b"null", 4)
    k = 0
    for prec in range(6 if single else 15, 10 if single else 18):
        k = snprintf(tmp, 40, "%.*g", prec, v)
        if single:
            if <float>strtod(tmp, NULL) == <float>v:
                break
        elif strtod(tmp, NULL) == v:
            break
    return _put_raw(o, tmp, k)


cdef int _json_scalar(GrowBuf* o, FieldPlan* f, int op, Column* c, Py_ssize_t i) noexcept nogil:
    cdef char tmp[32]
    cdef int k
    cdef const char* sym
    cdef int32_t slen = 0
    cdef int32_t* offs
    cdef int32_t idx
    if not col_is_valid(c, i):
        return _put_raw(o, b"null", 4)
    if op == OP_BOOL:
        if (<uint8_t*>c.values.data)[i]:
            return _put_raw(o, b"true", 4)
        return _put_raw(o, b"false", 5)
    if op == OP_INT4 or op == OP_INT8_I32:
        k = snprintf(tmp, 32, "%d", (<int32_t*>c.values.data)[i])
        return _put_raw(o, tmp, k)
    if op == OP_INT8:
        k = snprintf(tmp, 32, "%lld", <long long>(<int64_t*>c.values.data)[i])
        return _put_raw(o, tmp, k)
    if op == OP_FLOAT4 or op == OP_FLOAT8_F32:
        return _json_double(o, (<float*>c.values.data)[i], True)
    if op == OP_FLOAT8:
        return _json_double(o, (<double*>c.values.data)[i], False)
    if op == OP_BYTES:
        offs = <int32_t*>c.offsets.data
        return _json_str(o, c.values.data + offs[i], offs[i + 1] - offs[i])
    if op == OP_ENUM:
        idx = (<int32_t*>c.values.data)[i]
        sym = _enum_symbol(f, idx, &slen)
        if sym == NULL:   # no symbol: the number, as to_pylist gives it
            k = snprintf(tmp, 32, "%d", idx)
            return _put_raw(o, tmp, k)
        return _json_str(o, <const unsigned char*>sym, slen)
    if op == OP_U32_INT8:
        k = snprintf(tmp, 32, "%u", <uint32_t>(<int32_t*>c.values.data)[i])
        return _put_raw(o, tmp, k)
    if op == OP_U64_INT8 or op == OP_U64_NUMERIC:
        k = snprintf(tmp, 32, "%llu", <unsigned long long>(<uint64_t*>c.values.data)[i])
        return _put_raw(o, tmp, k)
    return ST_BAD_SHAPE


# ------------------------------------------------------------ scalars

cdef int _put_scalar(GrowBuf* o, FieldPlan* f, int op, Column* c, Py_ssize_t i) noexcept nogil:
    """One value with its int32 length prefix (NULL: length -1)."""
    cdef int32_t* offs
    cdef int32_t a, b, idx
    cdef int64_t v
    cdef float f4
    cdef double f8
    cdef uint32_t u32
    cdef uint64_t u64
    cdef const char* sym
    cdef int32_t slen = 0
    cdef char tmp[16]
    if not col_is_valid(c, i):
        return _put_i32(o, -1)
    if op == OP_INT4:
        return _put_len_u64(o, 4, <uint32_t>(<int32_t*>c.values.data)[i])
    if op == OP_INT8:
        return _put_len_u64(o, 8, <uint64_t>(<int64_t*>c.values.data)[i])
    if op == OP_FLOAT8:
        f8 = (<double*>c.values.data)[i]
        memcpy(&u64, &f8, 8)
        return _put_len_u64(o, 8, u64)
    if op == OP_BYTES or op == OP_JSONB_STR:
        offs = <int32_t*>c.offsets.data
        a = offs[i]
        b = offs[i + 1]
        if _reserve(o, 5 + (b - a)) < 0:
            return ST_NOMEM
        if op == OP_JSONB_STR:
            _w32(o.data + o.len, <uint32_t>(b - a + 1))
            o.data[o.len + 4] = 1
            o.len += 5
        else:
            _w32(o.data + o.len, <uint32_t>(b - a))
            o.len += 4
        memcpy(o.data + o.len, c.values.data + a, b - a)
        o.len += b - a
        return ST_OK
    if op == OP_BOOL:
        return _put_len_u64(o, 1, 1 if (<uint8_t*>c.values.data)[i] else 0)
    if op == OP_INT8_I32:
        return _put_len_u64(o, 8, <uint64_t><int64_t>(<int32_t*>c.values.data)[i])
    if op == OP_FLOAT4:
        f4 = (<float*>c.values.data)[i]
        memcpy(&u32, &f4, 4)
        return _put_len_u64(o, 4, u32)
    if op == OP_FLOAT8_F32:
        f8 = (<float*>c.values.data)[i]
        memcpy(&u64, &f8, 8)
        return _put_len_u64(o, 8, u64)
    if op == OP_ENUM:
        idx = (<int32_t*>c.values.data)[i]
        sym = _enum_symbol(f, idx, &slen)
        if sym == NULL:   # no symbol: its number as text
            slen = snprintf(tmp, 32, "%d", idx)
            sym = tmp
        if _put_i32(o, slen) < 0:
            return ST_NOMEM
        return _put_raw(o, sym, slen)
    if op == OP_U32_INT8:
        return _put_len_u64(o, 8, <uint64_t>(<uint32_t>(<int32_t*>c.values.data)[i]))
    if op == OP_U64_INT8:
        u64 = (<uint64_t*>c.values.data)[i]
        if u64 > <uint64_t>0x7FFFFFFFFFFFFFFF:
            return ST_OUT_OF_RANGE
        return _put_len_u64(o, 8, u64)
    if op == OP_U64_NUMERIC:
        return _put_numeric_u64(o, (<uint64_t*>c.values.data)[i])
    if op == OP_NUMERIC:
        offs = <int32_t*>c.offsets.data
        return _put_numeric(o, c.values.data + offs[i], offs[i + 1] - offs[i], f.scale)
    if op == OP_UUID:
        offs = <int32_t*>c.offsets.data
        return _put_uuid(o, c.values.data + offs[i], offs[i + 1] - offs[i])
    if op == OP_DATE:
        return _put_len_u64(o, 4, <uint32_t>((<int32_t*>c.values.data)[i] - PG_EPOCH_DAYS))
    if op == OP_TIME_MS:
        return _put_len_u64(o, 8, <uint64_t>(<int64_t>(<int32_t*>c.values.data)[i] * 1000))
    if op == OP_TIME_US:
        return _put_len_u64(o, 8, <uint64_t>(<int64_t*>c.values.data)[i])
    if op == OP_TS_MS:
        v = (<int64_t*>c.values.data)[i] * 1000 - PG_EPOCH_US
        return _put_len_u64(o, 8, <uint64_t>v)
    if op == OP_TS_US:
        v = (<int64_t*>c.values.data)[i] - PG_EPOCH_US
        return _put_len_u64(o, 8, <uint64_t>v)
    if op == OP_TS_NS:
        v = _floordiv((<int64_t*>c.values.data)[i], 1000) - PG_EPOCH_US
        return _put_len_u64(o, 8, <uint64_t>v)
    if op == OP_INTERVAL_US:
        # interval_send: int64 microseconds, int32 days, int32 months (all in the first)
        if _reserve(o, 20) < 0:
            return ST_NOMEM
        _w32(o.data + o.len, 16)
        _w64(o.data + o.len + 4, <uint64_t>(<int64_t*>c.values.data)[i])
        _w32(o.data + o.len + 12, 0)
        _w32(o.data + o.len + 16, 0)
        o.len += 20
        return ST_OK
    return ST_BAD_SHAPE


cdef int _put_array(GrowBuf* o, FieldPlan* f, Column* lst, Column* child, Py_ssize_t i) noexcept nogil:
    """array_send: int32 ndim, int32 has-nulls flag, uint32 element OID, per
    dimension int32 size and int32 lower bound (1), then the elements each
    with their int32 length (-1 = NULL). An empty array has ndim 0."""
    cdef int32_t a = col_offset(lst, i)
    cdef int32_t b = col_offset(lst, i + 1)
    cdef Py_ssize_t start = o.len, j
    cdef bint has_null = False
    cdef int rc
    if b > child.length or a > b:
        return ST_BAD_SHAPE
    if _reserve(o, 24) < 0:
        return ST_NOMEM
    o.len += 4   # length, patched below
    if b == a:
        _w32(o.data + o.len, 0)
        _w32(o.data + o.len + 4, 0)
        _w32(o.data + o.len + 8, f.elem_oid)
        o.len += 12
    else:
        for j in range(a, b):
            if not col_is_valid(child, j):
                has_null = True
                break
        _w32(o.data + o.len, 1)
        _w32(o.data + o.len + 4, 1 if has_null else 0)
        _w32(o.data + o.len + 8, f.elem_oid)
        _w32(o.data + o.len + 12, <uint32_t>(b - a))
        _w32(o.data + o.len + 16, 1)
        o.len += 20
        for j in range(a, b):
            rc = _put_scalar(o, f, f.elem_op, child, j)
            if rc != ST_OK:
                return rc
    _w32(o.data + start, <uint32_t>(o.len - start - 4))
    return ST_OK


cdef int _put_map(GrowBuf* o, FieldPlan* f, Column* lst, Column* keys, Column* vals, Py_ssize_t i) noexcept nogil:
    """jsonb_send: version byte 1 followed by the JSON text."""
    cdef int32_t a = col_offset(lst, i)
    cdef int32_t b = col_offset(lst, i + 1)
    cdef Py_ssize_t start = o.len, j
    cdef int32_t* koffs = <int32_t*>keys.offsets.data
    cdef int rc
    if b > keys.length or b > vals.length or a > b:
        return ST_BAD_SHAPE
    if _reserve(o, 6) < 0:
        return ST_NOMEM
    o.len += 4
    o.data[o.len] = 1
    o.data[o.len + 1] = c'{'
    o.len += 2
    for j in range(a, b):
        if j > a:
            if _put_raw(o, b",", 1) < 0:
                return ST_NOMEM
        rc = _json_str(o, keys.values.data + koffs[j], koffs[j + 1] - koffs[j])
        if rc != ST_OK:
            return rc
        if _put_raw(o, b":", 1) < 0:
            return ST_NOMEM
        rc = _json_scalar(o, f, f.elem_op, vals, j)
        if rc != ST_OK:
            return rc
    if _put_raw(o, b"}", 1) < 0:
        return ST_NOMEM
    _w32(o.data + start, <uint32_t>(o.len - start - 4))
    return ST_OK


# ------------------------------------------------------------ encoder

cdef class CopyEncoder:
    """Encodes rows of Batches with one fixed layout into binary COPY data.

    ``plan`` is a sequence of dicts, one per output column, in COPY column
    order (see :func:`kfast.sinks.postgres.plan.build_plan`). The encoder owns a
    growable output buffer; ``encode`` appends to it and the caller hands the
    bytes to psycopg (``memoryview(encoder)``) then calls ``clear()``.
    """
    cdef FieldPlan* fields
    cdef int nfields
    cdef GrowBuf out
    cdef PreSlot* pre
    cdef int npre
    cdef list _keep          # keeps symbol bytes alive
    cdef list _pre_values    # per slot: the list of bytes|None currently bound
    cdef Py_ssize_t _pre_base
    cdef Py_ssize_t exports
    cdef readonly int max_col

    def __cinit__(self):
        self.fields = NULL
        self.pre = NULL
        self.out.data = NULL
        self.out.len = 0
        self.out.cap = 0

    def __init__(self, plan):
        cdef int k, v
        cdef FieldPlan* f
        plan = list(plan)
        self.nfields = len(plan)
        if self.nfields > 1600:
            raise ValueError("PostgreSQL tables have at most 1600 columns")
        self.fields = <FieldPlan*>calloc(max(self.nfields, 1), sizeof(FieldPlan))
        if self.fields == NULL:
            raise MemoryError()
        self._keep = []
        self.npre = 0
        self.max_col = -1
        for k, entry in enumerate(plan):
            f = &self.fields[k]
            f.op = OPS[entry["op"]]
            f.col = entry.get("col", -1)
            f.child = entry.get("child", -1)
            f.child2 = entry.get("child2", -1)
            f.elem_op = OPS[entry["elem_op"]] if entry.get("elem_op") else 0
            f.elem_oid = entry.get("elem_oid", 0)
            f.scale = entry.get("scale", 0) or 0
            valid = list(entry.get("valid", ()))
            if len(valid) > MAX_VALID:
                raise ValueError(f"records nested more than {MAX_VALID} levels deep are not supported")
            f.nvalid = len(valid)
            for v in range(f.nvalid):
                f.valid[v] = valid[v]
                self.max_col = max(self.max_col, valid[v])
            self.max_col = max(self.max_col, f.col, f.child, f.child2)
            f.pre_slot = -1
            if f.op == OP_PRE:
                f.pre_slot = self.npre
                self.npre += 1
            symbols = entry.get("symbols")
            if symbols:
                # A sequence (Avro: index -> symbol) or a dict (protobuf: number -> name).
                table = dict(symbols) if isinstance(symbols, dict) else dict(enumerate(symbols))
                base = min(0, min(table))
                size = max(table) - base + 1
                if size > 65536:
                    raise ValueError(f"enum numbers span {size} values (at most 65536 supported)")
                syms = [None] * size
                for number, name in table.items():
                    syms[number - base] = name.encode() if isinstance(name, str) else bytes(name)
                self._keep.append(syms)
                f.nsym = size
                f.sym_base = base
                f.sym_ptr = <const char**>calloc(size, sizeof(char*))
                f.sym_len = <int32_t*>calloc(size, sizeof(int32_t))
                if f.sym_ptr == NULL or f.sym_len == NULL:
                    raise MemoryError()
                for v in range(size):
                    if syms[v] is not None:
                        f.sym_ptr[v] = PyBytes_AS_STRING(syms[v])
                        f.sym_len[v] = <int32_t>PyBytes_GET_SIZE(syms[v])
        self.pre = <PreSlot*>calloc(max(self.npre, 1), sizeof(PreSlot))
        if self.pre == NULL:
            raise MemoryError()
        self._pre_values = [None] * self.npre
        self._pre_base = 0
        self.exports = 0

    def __dealloc__(self):
        cdef int k
        if self.fields != NULL:
            for k in range(self.nfields):
                free(self.fields[k].sym_ptr)
                free(self.fields[k].sym_len)
            free(self.fields)
        if self.pre != NULL:
            for k in range(self.npre):
                free(self.pre[k].ptr)
                free(self.pre[k].len)
            free(self.pre)
        buf_free(&self.out)

    @property
    def num_pre_slots(self):
        return self.npre

    def __len__(self):
        return self.out.len

    def __getbuffer__(self, Py_buffer* view, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("CopyEncoder buffers are read-only")
        view.buf = <void*>self.out.data
        view.len = self.out.len
        view.readonly = 1
        view.itemsize = 1
        view.format = NULL
        view.ndim = 1
        view.shape = NULL
        view.strides = NULL
        view.suboffsets = NULL
        view.internal = NULL
        view.obj = self
        self.exports += 1

    def __releasebuffer__(self, Py_buffer* view):
        self.exports -= 1

    def clear(self):
        """Forget the encoded bytes (keeps the capacity)."""
        if self.exports:
            raise BufferError("release the memoryview of the encoder before clearing it")
        self.out.len = 0

    def header(self):
        """Append the COPY signature, flags and header-extension length."""
        self._check_writable()
        if _put_raw(&self.out, SIGNATURE, 11) < 0 or _put_i32(&self.out, 0) < 0 \
                or _put_i32(&self.out, 0) < 0:
            raise MemoryError()

    def trailer(self):
        """Append the file trailer (int16 -1)."""
        self._check_writable()
        if _put_raw(&self.out, b"\xff\xff", 2) < 0:
            raise MemoryError()

    cdef _check_writable(self):
        if self.exports:
            raise BufferError("release the memoryview of the encoder before encoding more")

    def bind_pre(self, int slot, list values, Py_ssize_t base):
        """Bind pre-encoded values (``bytes`` or ``None``) of a ``pre`` column
        for rows ``[base, base + len(values))``."""
        cdef PreSlot* s
        cdef Py_ssize_t n = len(values), i
        if slot < 0 or slot >= self.npre:
            raise IndexError(f"no pre-encoded slot {slot}")
        s = &self.pre[slot]
        if n > s.cap:
            free(s.ptr)
            free(s.len)
            s.ptr = <const char**>malloc(max(n, 1) * sizeof(char*))
            s.len = <Py_ssize_t*>malloc(max(n, 1) * sizeof(Py_ssize_t))
            s.cap = n
            if s.ptr == NULL or s.len == NULL:
                s.cap = 0
                raise MemoryError()
        for i in range(n):
            v = values[i]
            if v is None:
                s.ptr[i] = NULL
                s.len[i] = -1
            else:
                if not isinstance(v, bytes):
                    raise TypeError("pre-encoded values must be bytes or None")
                s.ptr[i] = PyBytes_AS_STRING(v)
                s.len[i] = PyBytes_GET_SIZE(v)
        self._pre_values[slot] = values
        self._pre_base = base

    cdef int _check_batch(self, Batch b, Py_ssize_t start, Py_ssize_t stop) except -1:
        cdef int k, kind, v
        cdef FieldPlan* f
        if start < 0 or stop > b.num_rows or start > stop:
            raise IndexError(f"rows [{start}, {stop}) out of range for {b.num_rows} rows")
        if self.max_col >= b.ncols:
            raise ValueError("the batch has fewer columns than the plan expects (layout changed)")
        for k in range(self.nfields):
            f = &self.fields[k]
            if f.op == OP_ROWNUM:
                continue
            for v in range(f.nvalid):
                if b.cols[f.valid[v]].kind != COL_STRUCT or b.cols[f.valid[v]].length < stop:
                    raise ValueError("record validity column does not match the plan")
            if f.op == OP_PRE:
                if self._pre_values[f.pre_slot] is None or self._pre_base > start \
                        or self._pre_base + len(self._pre_values[f.pre_slot]) < stop:
                    raise ValueError(f"pre-encoded values for slot {f.pre_slot} do not cover the rows")
                continue
            kind = _op_kind(f.op)
            if b.cols[f.col].kind != kind or b.cols[f.col].length < stop:
                raise ValueError(f"column {b.names[f.col]!r} does not match the plan")
            if f.op == OP_ARRAY:
                if b.cols[f.child].kind != _op_kind(f.elem_op):
                    raise ValueError(f"column {b.names[f.child]!r} does not match the plan")
            elif f.op == OP_MAP_JSONB:
                if b.cols[f.child].kind != COL_BINARY or b.cols[f.child2].kind != _op_kind(f.elem_op):
                    raise ValueError(f"column {b.names[f.child2]!r} does not match the plan")
        return 0

    def encode(self, Batch batch, Py_ssize_t start, Py_ssize_t stop, Py_ssize_t limit=1 << 20):
        """Append tuples for rows ``[start, stop)`` until the buffer holds at
        least ``limit`` bytes; return the row after the last one encoded."""
        cdef Py_ssize_t row = start, err_row = -1
        cdef int rc = ST_OK, k = 0, v
        cdef FieldPlan* f
        cdef Column* cols = batch.cols
        cdef GrowBuf* o = &self.out
        cdef PreSlot* s
        cdef Py_ssize_t pi
        cdef bint present
        self._check_writable()
        self._check_batch(batch, start, stop)
        with nogil:
            while row < stop:
                if _reserve(o, 2) < 0:
                    rc = ST_NOMEM
                    break
                _w16(o.data + o.len, <uint16_t>self.nfields)
                o.len += 2
                for k in range(self.nfields):
                    f = &self.fields[k]
                    present = True
                    for v in range(f.nvalid):
                        if not col_is_valid(&cols[f.valid[v]], row):
                            present = False
                            break
                    if not present:
                        rc = _put_i32(o, -1)
                    elif f.op == OP_ARRAY:
                        if col_is_valid(&cols[f.col], row):
                            rc = _put_array(o, f, &cols[f.col], &cols[f.child], row)
                        else:
                            rc = _put_i32(o, -1)
                    elif f.op == OP_MAP_JSONB:
                        if col_is_valid(&cols[f.col], row):
                            rc = _put_map(o, f, &cols[f.col], &cols[f.child], &cols[f.child2], row)
                        else:
                            rc = _put_i32(o, -1)
                    elif f.op == OP_PRE:
                        s = &self.pre[f.pre_slot]
                        pi = row - self._pre_base
                        if s.ptr[pi] == NULL:
                            rc = _put_i32(o, -1)
                        else:
                            rc = _put_i32(o, <int32_t>s.len[pi])
                            if rc == ST_OK:
                                rc = _put_raw(o, s.ptr[pi], s.len[pi])
                    elif f.op == OP_ROWNUM:
                        rc = _put_len_u64(o, 8, <uint64_t>row)
                    else:
                        rc = _put_scalar(o, f, f.op, &cols[f.col], row)
                    if rc != ST_OK:
                        break
                if rc != ST_OK:
                    err_row = row
                    break
                row += 1
                if o.len >= limit:
                    break
        if rc == ST_OK:
            return row
        if rc == ST_NOMEM:
            raise MemoryError()
        reason = {
            ST_BAD_DECIMAL: "decimal too large for the encoder (over 64 bytes) or bad scale",
            ST_BAD_UUID: "not a UUID (36-char text or 16 bytes)",
            ST_BAD_ENUM: "enum symbol index out of range",
            ST_OUT_OF_RANGE: "uint64 value above 2^63-1 does not fit bigint (use a numeric column)",
            ST_BAD_SHAPE: "malformed list/map offsets",
        }.get(rc, f"status {rc}")
        raise EncodeError(err_row, k, reason)


def pre_values(Batch batch, object node, Py_ssize_t start, Py_ssize_t stop):
    """Python values of one layout node for rows ``[start, stop)`` (slow path)."""
    return batch._node_values(node, start, stop)


def column_kinds(Batch batch):
    """Storage kind (``kfast._columns.ColKind`` value) of every column."""
    cdef Py_ssize_t k
    return [batch.cols[k].kind for k in range(batch.ncols)]


KIND_NAMES = {
    COL_BOOL: "BOOL", COL_INT32: "INT32", COL_INT64: "INT64", COL_FLOAT32: "FLOAT32",
    COL_FLOAT64: "FLOAT64", COL_BINARY: "BINARY", COL_LIST: "LIST", COL_OBJECT: "OBJECT",
    COL_STRUCT: "STRUCT",
}
