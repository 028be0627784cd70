# cython: language_level=3
"""Columnar Protobuf decoding with the GIL released.

One payload is one *frame*: its singular fields (and those of its flattened
singular sub-messages) are decoded into frame slots first ("last value wins",
sub-message occurrences merge because they write to the same slots), then
appended to the columns in column order when the payload ends. Repeated
fields append to their child columns as they arrive; each element of a
repeated message is a frame of its own. Fields the plan keeps as raw bytes
(recursive messages, maps with message values, ...) are validated here and
converted by google's runtime in ``Batch.finish``.

Error codes are negative ints; ``decode_spans`` turns them into RowErrors.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy, memmove, memset

from kfast._batch cimport Batch, BaseDecoder
from kfast._columns cimport (
    COL_BINARY,
    COL_OBJECT,
    COL_STRUCT,
    Column,
    buf_append,
    buf_reserve,
    col_append_bool,
    col_append_bytes,
    col_append_f32,
    col_append_f64,
    col_append_fixed,
    col_append_i32,
    col_append_i64,
    col_append_list_end,
    col_append_null,
    col_append_struct,
    col_end_offset,
    col_is_valid,
    col_mark,
)

import sys

from kfast.row_error import RowError

# google.protobuf.FieldDescriptor.TYPE_*
cdef enum PType:
    T_DOUBLE = 1
    T_FLOAT = 2
    T_INT64 = 3
    T_UINT64 = 4
    T_INT32 = 5
    T_FIXED64 = 6
    T_FIXED32 = 7
    T_BOOL = 8
    T_STRING = 9
    T_GROUP = 10
    T_MESSAGE = 11
    T_BYTES = 12
    T_UINT32 = 13
    T_ENUM = 14
    T_SFIXED32 = 15
    T_SFIXED64 = 16
    T_SINT32 = 17
    T_SINT64 = 18

cdef enum PbError:
    E_TRUNCATED = -1
    E_VARINT = -2
    E_TAG = -3
    E_FIELD_ZERO = -4
    E_WIRE_TYPE = -5
    E_WRONG_WIRE = -6
    E_LENGTH = -7
    E_UTF8 = -8
    E_DEPTH = -9
    E_GROUP = -10
    E_PACKED = -11
    E_NOMEM = -12
    E_LEN_VARINT = -13

_REASONS = {
    E_TRUNCATED: "truncated payload",
    E_VARINT: "varint longer than 10 bytes",
    E_TAG: "invalid tag",
    E_FIELD_ZERO: "field number 0",
    E_WIRE_TYPE: "invalid wire type",
    E_WRONG_WIRE: "wrong wire type",
    E_LENGTH: "length runs past the end of the message",
    E_UTF8: "invalid UTF-8 in string field",
    E_DEPTH: "message nesting deeper than max_depth",
    E_GROUP: "unmatched end-group tag",
    E_PACKED: "packed field length is not a multiple of the element size",
    E_LEN_VARINT: "length prefix longer than 5 bytes",
}


cdef inline int fail(Ctx* c, int code, const unsigned char* at, uint32_t field) noexcept nogil:
    c.err_code = code
    c.err_pos = at - c.base
    c.err_field = field
    return code


# ---------------------------------------------------------------- wire readers

cdef inline int rd_varint(const unsigned char** pp, const unsigned char* end,
                          uint64_t* out) noexcept nogil:
    """Up to 10 bytes, bits past 64 dropped (upb accepts any 10th byte < 0x80)."""
    cdef const unsigned char* p = pp[0]
    cdef uint64_t r = 0
    cdef int shift = 0
    cdef unsigned char b
    if p < end and p[0] < 0x80:
        out[0] = p[0]
        pp[0] = p + 1
        return 0
    while shift < 70:
        if p >= end:
            return E_TRUNCATED
        b = p[0]
        p += 1
        r |= (<uint64_t>(b & 0x7F)) << shift if shift < 64 else 0
        if b < 0x80:
            out[0] = r
            pp[0] = p
            return 0
        shift += 7
    return E_VARINT


cdef inline int rd_tag(const unsigned char** pp, const unsigned char* end,
                       uint32_t* out) noexcept nogil:
    """A tag: a varint of at most 5 bytes that fits 32 bits."""
    cdef const unsigned char* p = pp[0]
    cdef uint64_t r = 0
    cdef int i
    cdef unsigned char b
    if p < end and p[0] < 0x80:
        out[0] = p[0]
        pp[0] = p + 1
        return 0
    for i in range(5):
        if p >= end:
            return E_TRUNCATED
        b = p[0]
        p += 1
        r |= (<uint64_t>(b & 0x7F)) << (7 * i)
        if b < 0x80:
            if r > 0xFFFFFFFFULL:
                return E_TAG
            out[0] = <uint32_t>r
            pp[0] = p
            return 0
    return E_TAG


cdef inline int rd_len(const unsigned char** pp, const unsigned char* end,
                       Py_ssize_t* out) noexcept nogil:
    """A length prefix: like upb, a varint of at most 5 bytes whose value is
    below 2**31 - 1 and fits in what is left."""
    cdef const unsigned char* p = pp[0]
    cdef uint64_t v = 0
    cdef int i
    cdef unsigned char b
    if p < end and p[0] < 0x80:
        # one-byte length: the common case
        if p[0] > end - p - 1:
            return E_LENGTH
        out[0] = p[0]
        pp[0] = p + 1
        return 0
    for i in range(5):
        if p >= end:
            return E_TRUNCATED
        b = p[0]
        p += 1
        v |= (<uint64_t>(b & 0x7F)) << (7 * i)
        if b < 0x80:
            if v >= 0x7FFFFFFFULL or <Py_ssize_t>v > end - p:
                return E_LENGTH
            out[0] = <Py_ssize_t>v
            pp[0] = p
            return 0
    return E_LEN_VARINT


cdef inline uint64_t le32(const unsigned char* p) noexcept nogil:
    return (<uint64_t>p[0]) | (<uint64_t>p[1] << 8) | (<uint64_t>p[2] << 16) | (<uint64_t>p[3] << 24)


cdef inline uint64_t le64(const unsigned char* p) noexcept nogil:
    return le32(p) | (le32(p + 4) << 32)


cdef inline int rd_wire_value(int wt, const unsigned char** pp, const unsigned char* end,
                              uint64_t* out) noexcept nogil:
    """Raw value of a varint (0), fixed64 (1) or fixed32 (5) field."""
    cdef const unsigned char* p = pp[0]
    if wt == 0:
        return rd_varint(pp, end, out)
    if wt == 1:
        if end - p < 8:
            return E_TRUNCATED
        out[0] = le64(p)
        pp[0] = p + 8
        return 0
    if end - p < 4:
        return E_TRUNCATED
    out[0] = le32(p)
    pp[0] = p + 4
    return 0


cdef inline int64_t from_raw(int ptype, uint64_t v) noexcept nogil:
    """Canonical int64 image of a raw wire value (floats keep their bits)."""
    cdef uint32_t u
    if ptype == T_INT32 or ptype == T_ENUM or ptype == T_SFIXED32:
        return <int64_t>(<int32_t>(<uint32_t>v))
    if ptype == T_UINT32 or ptype == T_FIXED32:
        return <int64_t>(<int32_t>(<uint32_t>v))   # stored as int32 bits (conv "uint32")
    if ptype == T_SINT32:
        u = <uint32_t>v
        return <int64_t>(<int32_t>((u >> 1) ^ (0 - (u & 1))))
    if ptype == T_SINT64:
        return <int64_t>((v >> 1) ^ (0 - (v & 1)))
    if ptype == T_BOOL:
        return 1 if v != 0 else 0
    return <int64_t>v


cdef inline int append_num(Column* col, int ptype, int64_t v) noexcept nogil:
    cdef float f
    cdef double d
    cdef uint32_t bits32
    cdef uint64_t bits64
    if (ptype == T_INT32 or ptype == T_ENUM or ptype == T_SFIXED32 or ptype == T_SINT32
            or ptype == T_UINT32 or ptype == T_FIXED32):
        return col_append_i32(col, <int32_t>v)
    if ptype == T_FLOAT:
        bits32 = <uint32_t>v
        memcpy(&f, &bits32, 4)
        return col_append_f32(col, f)
    if ptype == T_DOUBLE:
        bits64 = <uint64_t>v
        memcpy(&d, &bits64, 8)
        return col_append_f64(col, d)
    if ptype == T_BOOL:
        return col_append_bool(col, v != 0)
    return col_append_i64(col, v)


cdef inline int wire_of(int ptype) noexcept nogil:
    if ptype == T_DOUBLE or ptype == T_FIXED64 or ptype == T_SFIXED64:
        return 1
    if ptype == T_FLOAT or ptype == T_FIXED32 or ptype == T_SFIXED32:
        return 5
    if ptype == T_STRING or ptype == T_BYTES or ptype == T_MESSAGE:
        return 2
    if ptype == T_GROUP:
        return 3
    return 0


@cython.boundscheck(False)
@cython.wraparound(False)
cdef bint utf8_valid(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    """Strict UTF-8 (what Python's ``bytes.decode('utf-8')`` accepts)."""
    cdef Py_ssize_t i = 0
    cdef unsigned char b, b1
    cdef uint64_t w
    while i < n:
        if i + 8 <= n:
            memcpy(&w, s + i, 8)
            if (w & 0x8080808080808080ULL) == 0:
                i += 8
                continue
        b = s[i]
        if b < 0x80:
            i += 1
        elif b < 0xC2:
            return False
        elif b < 0xE0:
            if i + 1 >= n or (s[i + 1] & 0xC0) != 0x80:
                return False
            i += 2
        elif b < 0xF0:
            if i + 2 >= n or (s[i + 1] & 0xC0) != 0x80 or (s[i + 2] & 0xC0) != 0x80:
                return False
            b1 = s[i + 1]
            if b == 0xE0 and b1 < 0xA0:
                return False          # overlong
            if b == 0xED and b1 >= 0xA0:
                return False          # surrogates
            i += 3
        elif b < 0xF5:
            if (i + 3 >= n or (s[i + 1] & 0xC0) != 0x80 or (s[i + 2] & 0xC0) != 0x80
                    or (s[i + 3] & 0xC0) != 0x80):
                return False
            b1 = s[i + 1]
            if b == 0xF0 and b1 < 0x90:
                return False          # overlong
            if b == 0xF4 and b1 >= 0x90:
                return False          # > U+10FFFF
            i += 4
        else:
            return False
    return True


cdef inline bint enum_known(const Ctx* c, int32_t set_idx, int32_t v) noexcept nogil:
    cdef const int32_t* vals = c.enum_vals + c.enum_off[set_idx]
    cdef Py_ssize_t lo = 0, hi = c.enum_len[set_idx], mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if vals[mid] < v:
            lo = mid + 1
        elif vals[mid] > v:
            hi = mid
        else:
            return True
    return False


# ---------------------------------------------------------------- fast appenders
# Same effect on a Column as the _columns.pxd appenders (Arrow layout, same
# invariants), specialised for the hot close loop: fewer branches, constant-size
# copies. Return 0, or -1 when memory (or the int32 offset range) runs out.

# ``validate``'s group number when the bytes are not a group (group numbers,
# even 0 inside an unknown group, are below 2**29).
cdef uint32_t NO_GROUP = 0xFFFFFFFF

cdef bint LITTLE_ENDIAN = sys.byteorder == "little"


cdef inline int pb_mark(Column* c, bint valid) noexcept nogil:
    cdef Py_ssize_t i = c.length
    if (i & 7) == 0:
        if c.validity.len >= c.validity.cap and buf_reserve(&c.validity, 1) < 0:
            return -1
        c.validity.data[c.validity.len] = 0
        c.validity.len += 1
    if valid:
        c.validity.data[i >> 3] |= <uint8_t>(1 << (i & 7))
    else:
        c.null_count += 1
    return 0


cdef inline int pb_struct(Column* c, bint present) noexcept nogil:
    if c.nullable and pb_mark(c, present) < 0:
        return -1
    c.length += 1
    return 0


cdef inline int pb_offset(Column* c, Py_ssize_t end) noexcept nogil:
    cdef int32_t v
    if end > 0x7FFFFFFF:
        return -1
    if c.offsets.len + 4 > c.offsets.cap and buf_reserve(&c.offsets, 4) < 0:
        return -1
    v = <int32_t>end
    memcpy(c.offsets.data + c.offsets.len, &v, 4)
    c.offsets.len += 4
    return 0


cdef inline int pb_fixed(Column* c, const void* v) noexcept nogil:
    """Append one fixed-width value (``v`` points at ``c.width`` bytes)."""
    cdef int w = c.width
    cdef unsigned char* dst
    if c.nullable and pb_mark(c, True) < 0:
        return -1
    if c.values.len + w > c.values.cap and buf_reserve(&c.values, w) < 0:
        return -1
    dst = c.values.data + c.values.len
    if w == 8:
        memcpy(dst, v, 8)
    elif w == 4:
        memcpy(dst, v, 4)
    else:
        dst[0] = (<const unsigned char*>v)[0]
    c.values.len += w
    c.length += 1
    return 0


cdef inline void copy_small(unsigned char* dst, const unsigned char* src,
                            Py_ssize_t n) noexcept nogil:
    """memcpy without a libc call for the short strings ids and names are:
    two overlapping fixed-size copies cover exactly ``[0, n)``."""
    if n >= 8 and n <= 16:
        memcpy(dst, src, 8)
        memcpy(dst + n - 8, src + n - 8, 8)
    elif n >= 4 and n < 8:
        memcpy(dst, src, 4)
        memcpy(dst + n - 4, src + n - 4, 4)
    elif n < 4:
        while n > 0:
            n -= 1
            dst[n] = src[n]
    else:
        memcpy(dst, src, n)


cdef inline int pb_bytes(Column* c, const unsigned char* p, Py_ssize_t n) noexcept nogil:
    if c.nullable and pb_mark(c, True) < 0:
        return -1
    if n:
        if c.values.len + n > c.values.cap and buf_reserve(&c.values, n) < 0:
            return -1
        copy_small(c.values.data + c.values.len, p, n)
        c.values.len += n
    if pb_offset(c, c.values.len) < 0:
        return -1
    c.length += 1
    return 0


cdef inline int pb_null(Column* c) noexcept nogil:
    """A null slot (default value / empty list on non-nullable columns)."""
    cdef int w = c.width
    cdef unsigned char* dst
    if c.nullable and pb_mark(c, False) < 0:
        return -1
    if w:
        if c.values.len + w > c.values.cap and buf_reserve(&c.values, w) < 0:
            return -1
        dst = c.values.data + c.values.len
        if w == 8:
            memset(dst, 0, 8)
        elif w == 4:
            memset(dst, 0, 4)
        else:
            dst[0] = 0
        c.values.len += w
    elif c.kind != COL_STRUCT:
        if pb_offset(c, (<int32_t*>c.offsets.data)[c.length]) < 0:
            return -1
    c.length += 1
    return 0


cdef inline int pb_append_num(Column* col, int ptype, int64_t v) noexcept nogil:
    if LITTLE_ENDIAN and ptype != T_BOOL:
        # the slot image holds the value's bits in its low bytes
        return pb_fixed(col, &v)
    return append_num(col, ptype, v)


# ---------------------------------------------------------------- validation / skipping

cdef int skip_field(Ctx* c, int wt, uint32_t num, const unsigned char** pp,
                    const unsigned char* end, int depth) noexcept nogil:
    """Skip the value of a field this plan does not decode (tag already read)."""
    cdef uint64_t v
    cdef Py_ssize_t n
    cdef int rc
    cdef const unsigned char* start = pp[0]
    if wt == 0 or wt == 1 or wt == 5:
        rc = rd_wire_value(wt, pp, end, &v)
    elif wt == 2:
        rc = rd_len(pp, end, &n)
        if rc == 0:
            pp[0] += n
    else:   # 3: a group, parsed to find its end
        return validate(c, -1, pp[0], end, depth + 1, num, pp)
    if rc:
        return fail(c, rc, start, num)
    return 0


cdef int find_vfield(const Ctx* c, int32_t vt, uint32_t num) noexcept nogil:
    cdef const VType* t = &c.vtypes[vt]
    cdef const VField* fs = c.vfields + t.first_field
    cdef Py_ssize_t lo = 0, hi = t.nfields, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if fs[mid].number < num:
            lo = mid + 1
        elif fs[mid].number > num:
            hi = mid
        else:
            return t.first_field + <int>mid
    return -1


cdef int validate(Ctx* c, int32_t vt, const unsigned char* p, const unsigned char* end,
                  int depth, uint32_t gnum, const unsigned char** outp) noexcept nogil:
    """Check that ``[p, end)`` is a message of validation type ``vt`` (-1: unknown
    group contents) that google's parser accepts and kfast's strict rules allow."""
    cdef const unsigned char* tag_at
    cdef const unsigned char* q
    cdef const unsigned char* qend
    cdef uint32_t tag, num
    cdef int wt, rc, fi
    cdef Py_ssize_t n
    cdef uint64_t v
    cdef const VField* f
    if depth > c.max_depth:
        return fail(c, E_DEPTH, p, 0)
    while p < end:
        tag_at = p
        rc = rd_tag(&p, end, &tag)
        if rc:
            return fail(c, rc, tag_at, 0)
        num = tag >> 3
        wt = tag & 7
        if num == 0 and vt >= 0:
            # (upb skips unknown groups without checking field numbers)
            return fail(c, E_FIELD_ZERO, tag_at, 0)
        if wt == 4:
            if gnum != NO_GROUP and num == gnum:
                outp[0] = p
                return 0
            return fail(c, E_GROUP, tag_at, num)
        if wt > 5:
            return fail(c, E_WIRE_TYPE, tag_at, num)
        fi = find_vfield(c, vt, num) if vt >= 0 else -1
        if fi < 0:
            rc = skip_field(c, wt, num, &p, end, depth)
            if rc:
                return rc
            continue
        f = &c.vfields[fi]
        if wt != f.wire:
            if not (wt == 2 and f.packed_width >= 0):
                return fail(c, E_WRONG_WIRE, tag_at, num)
            # packed repeated scalar
            rc = rd_len(&p, end, &n)
            if rc:
                return fail(c, rc, tag_at, num)
            q = p
            p += n
            if f.packed_width:
                if n % f.packed_width:
                    return fail(c, E_PACKED, tag_at, num)
            else:
                while q < p:
                    rc = rd_varint(&q, p, &v)
                    if rc:
                        return fail(c, rc, q, num)
            continue
        if wt == 2:
            rc = rd_len(&p, end, &n)
            if rc:
                return fail(c, rc, tag_at, num)
            q = p
            p += n
            if f.utf8 and not utf8_valid(q, n):
                return fail(c, E_UTF8, q, num)
            if f.sub >= 0:
                rc = validate(c, f.sub, q, p, depth + 1, NO_GROUP, &qend)
                if rc:
                    return rc
        elif wt == 3:
            rc = validate(c, f.sub, p, end, depth + 1, num, &p)
            if rc:
                return rc
        else:
            rc = rd_wire_value(wt, &p, end, &v)
            if rc:
                return fail(c, rc, tag_at, num)
    if gnum != NO_GROUP:
        return fail(c, E_TRUNCATED, p, gnum)
    outp[0] = p
    return 0


# ---------------------------------------------------------------- decoding

cdef inline int lookup_field(const Ctx* c, const PMsg* m, uint32_t num) noexcept nogil:
    cdef Py_ssize_t lo, hi, mid
    cdef const PField* fs
    if num < <uint32_t>m.lookup_len:
        return c.lookup[m.lookup_off + num]
    fs = c.fields + m.first_field
    lo = 0
    hi = m.nfields
    while lo < hi:
        mid = (lo + hi) >> 1
        if fs[mid].number < num:
            lo = mid + 1
        elif fs[mid].number > num:
            hi = mid
        else:
            return m.first_field + <int>mid
    return -1


cdef void clear_member(Ctx* c, Slot* fr, int32_t fi) noexcept nogil:
    """Forget a oneof member that another member replaced."""
    cdef const PField* f = &c.fields[fi]
    cdef Column* col
    cdef int32_t s
    if f.mode == M_SCALAR:
        fr[f.slot].set = 0
    elif f.mode == M_INLINE:
        for s in range(f.slot, f.slot_end):
            fr[s].set = 0
    elif f.mode == M_OBJECT:
        col = &c.cols[f.col]
        col.values.len = (<int32_t*>col.offsets.data)[col.length]


cdef inline void oneof_switch(Ctx* c, Slot* fr, const PField* f, int32_t fi) noexcept nogil:
    cdef int64_t cur = fr[f.oneof].set
    if cur != fi + 1:
        if cur:
            clear_member(c, fr, <int32_t>(cur - 1))
        fr[f.oneof].set = fi + 1


cdef int decode_map_entry(Ctx* c, const PField* f, const unsigned char* p,
                          const unsigned char* end, int depth) noexcept nogil:
    cdef const unsigned char* tag_at
    cdef uint32_t tag, num
    cdef int wt, rc, pt
    cdef uint64_t v
    cdef Py_ssize_t n
    cdef int64_t kv = 0, vv = 0
    cdef const unsigned char* kp = NULL
    cdef const unsigned char* vp = NULL
    cdef Py_ssize_t kn = 0, vn = 0
    cdef bint unknown = False
    if depth > c.max_depth:
        return fail(c, E_DEPTH, p, f.number)
    while p < end:
        tag_at = p
        rc = rd_tag(&p, end, &tag)
        if rc:
            return fail(c, rc, tag_at, 0)
        num = tag >> 3
        wt = tag & 7
        if num == 0:
            return fail(c, E_FIELD_ZERO, tag_at, 0)
        if wt == 4:
            return fail(c, E_GROUP, tag_at, num)
        if wt > 5:
            return fail(c, E_WIRE_TYPE, tag_at, num)
        if num == 1 or num == 2:
            pt = f.kptype if num == 1 else f.ptype
            if wt != wire_of(pt):
                return fail(c, E_WRONG_WIRE, tag_at, num)
            if wt == 2:
                rc = rd_len(&p, end, &n)
                if rc:
                    return fail(c, rc, tag_at, num)
                if pt == T_STRING and not utf8_valid(p, n):
                    return fail(c, E_UTF8, p, num)
                if num == 1:
                    kp = p
                    kn = n
                else:
                    vp = p
                    vn = n
                p += n
            else:
                rc = rd_wire_value(wt, &p, end, &v)
                if rc:
                    return fail(c, rc, tag_at, num)
                if num == 1:
                    kv = from_raw(pt, v)
                else:
                    vv = from_raw(pt, v)
        else:
            rc = skip_field(c, wt, num, &p, end, depth)
            if rc:
                return rc
            unknown = True
    if unknown or (f.enum_set >= 0 and not enum_known(c, f.enum_set, <int32_t>vv)):
        # upb keeps an entry with unknown fields (or an unknown closed-enum
        # value) in the parent's unknown fields: it is not in the map
        return 0
    if f.kptype == T_STRING:
        rc = col_append_bytes(&c.cols[f.col2], kp, kn)
    else:
        rc = append_num(&c.cols[f.col2], f.kptype, kv)
    if rc == 0:
        if f.ptype == T_STRING or f.ptype == T_BYTES:
            rc = col_append_bytes(&c.cols[f.col3], vp, vn)
        else:
            rc = append_num(&c.cols[f.col3], f.ptype, vv)
    if rc:
        return fail(c, E_NOMEM, p, f.number)
    return 0


cdef int decode_msg(Ctx* c, int32_t mi, const unsigned char* p, const unsigned char* end,
                    Slot* fr, int depth, uint32_t gnum, const unsigned char** outp) noexcept nogil:
    cdef const PMsg* m = &c.msgs[mi]
    cdef const PMsg* sm
    cdef const PField* f
    cdef const unsigned char* tag_at
    cdef const unsigned char* q
    cdef const unsigned char* qend
    cdef uint32_t tag, num
    cdef int wt, rc, fi
    cdef uint64_t v
    cdef int64_t x
    cdef Py_ssize_t n
    cdef Slot* efr
    cdef Column* col
    if depth > c.max_depth:
        return fail(c, E_DEPTH, p, gnum)
    while p < end:
        tag_at = p
        if p[0] < 0x80:
            tag = p[0]
            p += 1
        else:
            rc = rd_tag(&p, end, &tag)
            if rc:
                return fail(c, rc, tag_at, 0)
        num = tag >> 3
        wt = tag & 7
        if num == 0:
            return fail(c, E_FIELD_ZERO, tag_at, 0)
        if wt == 4:
            if gnum != 0 and num == gnum:
                outp[0] = p
                return 0
            return fail(c, E_GROUP, tag_at, num)
        if wt > 5:
            return fail(c, E_WIRE_TYPE, tag_at, num)
        fi = lookup_field(c, m, num)
        if fi < 0:
            rc = skip_field(c, wt, num, &p, end, depth)
            if rc:
                return rc
            continue
        f = &c.fields[fi]

        if f.mode == M_SCALAR:
            if wt != f.wire:
                return fail(c, E_WRONG_WIRE, tag_at, num)
            if wt == 2:
                rc = rd_len(&p, end, &n)
                if rc:
                    return fail(c, rc, tag_at, num)
                if f.ptype == T_STRING and not utf8_valid(p, n):
                    return fail(c, E_UTF8, p, num)
                if f.oneof >= 0:
                    oneof_switch(c, fr, f, fi)
                fr[f.slot].p = p
                fr[f.slot].n = n
                fr[f.slot].set = 1
                p += n
            else:
                rc = rd_wire_value(wt, &p, end, &v)
                if rc:
                    return fail(c, rc, tag_at, num)
                x = from_raw(f.ptype, v)
                if f.enum_set >= 0 and not enum_known(c, f.enum_set, <int32_t>x):
                    continue     # closed enum: an unknown number leaves the field as it was
                if f.oneof >= 0:
                    oneof_switch(c, fr, f, fi)
                fr[f.slot].i = x
                fr[f.slot].set = 1

        elif f.mode == M_REP_SCALAR:
            col = &c.cols[f.col2]
            if wt == f.wire:
                if wt == 2:
                    rc = rd_len(&p, end, &n)
                    if rc:
                        return fail(c, rc, tag_at, num)
                    if f.ptype == T_STRING and not utf8_valid(p, n):
                        return fail(c, E_UTF8, p, num)
                    if col_append_bytes(col, p, n):
                        return fail(c, E_NOMEM, p, num)
                    p += n
                else:
                    rc = rd_wire_value(wt, &p, end, &v)
                    if rc:
                        return fail(c, rc, tag_at, num)
                    x = from_raw(f.ptype, v)
                    if f.enum_set < 0 or enum_known(c, f.enum_set, <int32_t>x):
                        if pb_append_num(col, f.ptype, x):
                            return fail(c, E_NOMEM, p, num)
            elif wt == 2 and f.packable:
                rc = rd_len(&p, end, &n)
                if rc:
                    return fail(c, rc, tag_at, num)
                q = p
                p += n
                if f.wire != 0 and n % (8 if f.wire == 1 else 4):
                    return fail(c, E_PACKED, tag_at, num)
                while q < p:
                    rc = rd_wire_value(f.wire, &q, p, &v)
                    if rc:
                        return fail(c, rc, q, num)
                    x = from_raw(f.ptype, v)
                    if f.enum_set < 0 or enum_known(c, f.enum_set, <int32_t>x):
                        if pb_append_num(col, f.ptype, x):
                            return fail(c, E_NOMEM, q, num)
            else:
                return fail(c, E_WRONG_WIRE, tag_at, num)

        elif f.mode == M_INLINE:
            if wt != f.wire:
                return fail(c, E_WRONG_WIRE, tag_at, num)
            if f.oneof >= 0:
                oneof_switch(c, fr, f, fi)
            fr[f.slot].set = 1
            if wt == 3:
                rc = decode_msg(c, f.sub, p, end, fr, depth + 1, num, &p)
            else:
                rc = rd_len(&p, end, &n)
                if rc:
                    return fail(c, rc, tag_at, num)
                q = p
                p += n
                rc = decode_msg(c, f.sub, q, p, fr, depth + 1, 0, &qend)
            if rc:
                return rc

        elif f.mode == M_LIST_MSG:
            if wt != f.wire:
                return fail(c, E_WRONG_WIRE, tag_at, num)
            sm = &c.msgs[f.sub]
            efr = c.stack + c.top
            c.top += sm.frame_size
            memset(efr, 0, sm.frame_size * sizeof(Slot))
            if wt == 3:
                rc = decode_msg(c, f.sub, p, end, efr, depth + 1, num, &p)
            else:
                rc = rd_len(&p, end, &n)
                if rc:
                    return fail(c, rc, tag_at, num)
                q = p
                p += n
                rc = decode_msg(c, f.sub, q, p, efr, depth + 1, 0, &qend)
            if rc:
                return rc
            rc = close_frame(c, f.sub, efr)
            if rc:
                return fail(c, rc, p, num)
            if pb_struct(&c.cols[f.col2], True):
                return fail(c, E_NOMEM, p, num)
            c.top -= sm.frame_size

        elif f.mode == M_MAP:
            if wt != 2:
                return fail(c, E_WRONG_WIRE, tag_at, num)
            rc = rd_len(&p, end, &n)
            if rc:
                return fail(c, rc, tag_at, num)
            q = p
            p += n
            rc = decode_map_entry(c, f, q, p, depth + 1)
            if rc:
                return rc

        else:   # M_OBJECT: validate, keep the field's bytes (tag included)
            if wt != f.wire:
                return fail(c, E_WRONG_WIRE, tag_at, num)
            if wt == 3:
                rc = validate(c, f.sub, p, end, depth + 1, num, &p)
            else:
                rc = rd_len(&p, end, &n)
                if rc:
                    return fail(c, rc, tag_at, num)
                q = p
                p += n
                rc = validate(c, f.sub, q, p, depth + 1, NO_GROUP, &qend)
            if rc:
                return rc
            if f.oneof >= 0:
                oneof_switch(c, fr, f, fi)
            if buf_append(&c.cols[f.col].values, tag_at, p - tag_at):
                return fail(c, E_NOMEM, p, num)
    if gnum != 0:
        return fail(c, E_TRUNCATED, p, gnum)
    outp[0] = p
    return 0


# ---------------------------------------------------------------- closing a frame

cdef inline uint64_t hash_bytes(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    cdef uint64_t h = 1469598103934665603ULL
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ p[i]) * 1099511628211ULL
    return h


cdef inline void key_span(const Column* k, Py_ssize_t i, const unsigned char** p,
                          Py_ssize_t* n) noexcept nogil:
    cdef const int32_t* offs
    if k.width:
        p[0] = k.values.data + i * k.width
        n[0] = k.width
    else:
        offs = <const int32_t*>k.offsets.data
        p[0] = k.values.data + offs[i]
        n[0] = offs[i + 1] - offs[i]


cdef void compact(Column* col, Py_ssize_t s, Py_ssize_t e, const uint8_t* keep) noexcept nogil:
    """Drop the slots of ``[s, e)`` whose ``keep`` flag is 0 (non-nullable, no children)."""
    cdef Py_ssize_t i, dst = s, w = col.width
    cdef int32_t* offs
    cdef int32_t prev_end, b, wpos
    if w:
        for i in range(s, e):
            if keep[i - s]:
                if dst != i:
                    memmove(col.values.data + dst * w, col.values.data + i * w, w)
                dst += 1
        col.values.len = dst * w
    else:
        offs = <int32_t*>col.offsets.data
        wpos = offs[s]
        prev_end = offs[s]
        for i in range(s, e):
            b = offs[i + 1]
            if keep[i - s]:
                if wpos != prev_end:
                    memmove(col.values.data + wpos, col.values.data + prev_end, b - prev_end)
                wpos += b - prev_end
                offs[dst + 1] = wpos
                dst += 1
            prev_end = b
        col.values.len = wpos
        col.offsets.len = (dst + 1) * 4
    col.length = dst


cdef int dedupe_map(Ctx* c, Column* kcol, Column* vcol, Py_ssize_t s, Py_ssize_t e) noexcept nogil:
    """Keep only the last entry of each key among map entries ``[s, e)``."""
    cdef Py_ssize_t n = e - s, cap = 16, i, j, h, kn, jn
    cdef const unsigned char* kp
    cdef const unsigned char* jp
    cdef bint dup = False
    cdef int32_t* t
    cdef uint8_t* kk
    while cap < 2 * n:
        cap <<= 1
    if cap > c.hcap:
        t = <int32_t*>realloc(c.htab, cap * sizeof(int32_t))
        if t == NULL:
            return E_NOMEM
        c.htab = t
        c.hcap = cap
    if n > c.kcap:
        kk = <uint8_t*>realloc(c.keep, n)
        if kk == NULL:
            return E_NOMEM
        c.keep = kk
        c.kcap = n
    for i in range(cap):
        c.htab[i] = -1
    i = e - 1
    while i >= s:
        key_span(kcol, i, &kp, &kn)
        h = <Py_ssize_t>(hash_bytes(kp, kn) & <uint64_t>(cap - 1))
        c.keep[i - s] = 1
        while c.htab[h] >= 0:
            j = c.htab[h]
            key_span(kcol, j, &jp, &jn)
            if jn == kn and memcmp(jp, kp, kn) == 0:
                c.keep[i - s] = 0
                dup = True
                break
            h = (h + 1) & (cap - 1)
        if c.keep[i - s]:
            c.htab[h] = <int32_t>i
        i -= 1
    if dup:
        compact(kcol, s, e, c.keep)
        compact(vcol, s, e, c.keep)
    return 0


cdef int close_frame(Ctx* c, int32_t mi, Slot* fr) noexcept nogil:
    """Append one slot per column of the frame's message (column order)."""
    cdef const PMsg* m = &c.msgs[mi]
    cdef Py_ssize_t i = m.first_op, stop = m.first_op + m.nops, j, s, e
    cdef const POp* op
    cdef const Slot* sl
    cdef Column* col
    cdef int rc
    while i < stop:
        op = &c.ops[i]
        col = &c.cols[op.col]
        if op.op == OP_SCALAR:
            sl = &fr[op.slot]
            if not sl.set:
                rc = pb_null(col)
            elif op.ptype == T_STRING or op.ptype == T_BYTES:
                rc = pb_bytes(col, sl.p, sl.n)
            else:
                rc = pb_append_num(col, op.ptype, sl.i)
        elif op.op == OP_STRUCT:
            if fr[op.slot].set:
                rc = pb_struct(col, True)
            else:
                # absent sub-message: every column below it gets a null slot
                rc = pb_struct(col, False)
                j = i + 1
                while rc == 0 and j < op.skip:
                    rc = null_slot(c, &c.ops[j])
                    j += 1
                if rc:
                    return E_NOMEM
                i = op.skip
                continue
        elif op.op == OP_LIST:
            rc = pb_offset(col, c.cols[op.col2].length)
            col.length += 1
        elif op.op == OP_MAP:
            s = (<int32_t*>col.offsets.data)[col.length]
            e = c.cols[op.col2].length
            if e - s > 1:
                rc = dedupe_map(c, &c.cols[op.col2], &c.cols[op.col3], s, e)
                if rc:
                    return rc
            rc = col_append_list_end(col, c.cols[op.col2].length)
        else:   # OP_OBJECT
            if col.values.len > (<int32_t*>col.offsets.data)[col.length] or op.repeated:
                rc = col_mark(col, True)
                if rc == 0:
                    rc = col_end_offset(col, col.values.len)
                if rc == 0:
                    col.length += 1
            else:
                rc = col_append_null(col)
        if rc:
            return E_NOMEM
        i += 1
    return 0


cdef inline int null_slot(Ctx* c, const POp* op) noexcept nogil:
    cdef Column* col = &c.cols[op.col]
    if op.op == OP_LIST or op.op == OP_MAP:
        return col_append_list_end(col, c.cols[op.col2].length)
    return pb_null(col)


cdef void row_start_lengths(Column* cols, const int32_t* par, Py_ssize_t ncols,
                            Py_ssize_t num_rows, Py_ssize_t* saved) noexcept nogil:
    """The checkpoint ``Batch.begin_row_checkpoint`` would have taken before the
    failed row, rebuilt from the structure instead of saved for every row: a
    column outside any list holds one slot per good row; a list child starts
    where its LIST column's offsets say the previous rows ended (parents come
    before their children in the spec)."""
    cdef Py_ssize_t k
    for k in range(ncols):
        if par[k] < 0:
            saved[k] = num_rows
        else:
            saved[k] = (<int32_t*>cols[par[k]].offsets.data)[saved[par[k]]]
    saved[ncols] = num_rows


cdef void drop_open_objects(Column* cols, Py_ssize_t ncols) noexcept nogil:
    """Forget raw bytes appended to OBJECT slots that were never closed (the
    row failed before its frame closed; ``col_truncate`` leaves them alone)."""
    cdef Py_ssize_t k
    for k in range(ncols):
        if cols[k].kind == COL_OBJECT:
            cols[k].values.len = (<int32_t*>cols[k].offsets.data)[cols[k].length]


# ---------------------------------------------------------------- the decoder type

cdef void* _copy_table(object data, Py_ssize_t itemsize) except? NULL:
    """malloc a copy of a bytes-like table (at least 1 byte)."""
    cdef const unsigned char[:] view = memoryview(data).cast("B")
    cdef Py_ssize_t n = view.shape[0]
    cdef void* out = malloc(n if n else 1)
    if out == NULL:
        raise MemoryError()
    if n:
        memcpy(out, &view[0], n)
    return out


# Well-known types (_compile.WKT_DERIVED): one column derived from the
# message's hidden columns once every payload is decoded.
cdef enum:
    D_TIMESTAMP = 1
    D_DURATION = 2
    D_WRAPPER = 3


cdef int _derive(Batch out, int code, Py_ssize_t pc, Py_ssize_t a, Py_ssize_t b,
                 Py_ssize_t d) noexcept nogil:
    cdef Column* present = &out.cols[pc]
    cdef Column* src = &out.cols[a]
    cdef Column* dst = &out.cols[d]
    cdef Py_ssize_t i, n = present.length
    cdef int64_t secs, v
    cdef int32_t nanos, lo, hi
    for i in range(n):
        if not col_is_valid(present, i) or not col_is_valid(src, i):
            if col_append_null(dst) < 0:
                return -1
            continue
        if code == D_WRAPPER:
            if src.kind == COL_BINARY:
                lo = (<int32_t*>src.offsets.data)[i]
                hi = (<int32_t*>src.offsets.data)[i + 1]
                if col_append_bytes(dst, src.values.data + lo, hi - lo) < 0:
                    return -1
            elif col_append_fixed(dst, src.values.data + i * src.width) < 0:
                return -1
            continue
        secs = (<int64_t*>src.values.data)[i]
        nanos = (<int32_t*>out.cols[b].values.data)[i]
        # microseconds; nanos rounded toward zero, as ToDatetime()/ToTimedelta() do
        v = secs * 1000000 + (nanos // 1000 if nanos >= 0 else -((-nanos) // 1000))
        if col_append_i64(dst, v) < 0:
            return -1
    return 0


cdef class ProtobufDecoderBase(BaseDecoder):
    """The compiled half of ``kfast.ProtobufDecoder`` (tables + nogil loop)."""

    def __dealloc__(self):
        free(self.fields)
        free(self.msgs)
        free(self.lookup)
        free(self.ops)
        free(self.enum_off)
        free(self.enum_len)
        free(self.enum_vals)
        free(self.vtypes)
        free(self.vfields)

    def _load(self, plan):
        """Install a plan built by ``kfast.protobuf._compile`` (called once)."""
        if sizeof(PField) != plan.field_size or sizeof(PMsg) != plan.msg_size:
            raise RuntimeError("kfast.protobuf plan layout does not match the compiled module")
        self.fields = <PField*>_copy_table(plan.fields, sizeof(PField))
        self.msgs = <PMsg*>_copy_table(plan.msgs, sizeof(PMsg))
        self.lookup = <int32_t*>_copy_table(plan.lookup, 4)
        self.ops = <POp*>_copy_table(plan.ops, sizeof(POp))
        self.enum_off = <int32_t*>_copy_table(plan.enum_off, 4)
        self.enum_len = <int32_t*>_copy_table(plan.enum_len, 4)
        self.enum_vals = <int32_t*>_copy_table(plan.enum_vals, 4)
        self.vtypes = <VType*>_copy_table(plan.vtypes, sizeof(VType))
        self.vfields = <VField*>_copy_table(plan.vfields, sizeof(VField))
        self.stack_need = plan.stack_need
        self.max_depth_ = plan.max_depth
        self.spec = plan.spec
        self.layout_ = plan.layout
        self.converters = plan.converters
        self.derived = tuple(plan.derived)

    @staticmethod
    def _struct_sizes():
        return {
            "PField": sizeof(PField), "PMsg": sizeof(PMsg), "POp": sizeof(POp),
            "VType": sizeof(VType), "VField": sizeof(VField),
        }

    cdef int decode_spans(self, const unsigned char** ptrs, const Py_ssize_t* lens,
                          Py_ssize_t n, Batch out) except -1:
        cdef Ctx c
        cdef Py_ssize_t i, nerr = 0, root_size
        cdef Py_ssize_t* saved = NULL
        cdef int32_t* par = NULL
        cdef Py_ssize_t* err_idx = NULL
        cdef Py_ssize_t* err_pos = NULL
        cdef int* err_code = NULL
        cdef uint32_t* err_field = NULL
        cdef int rc
        cdef bint nomem = False
        cdef const unsigned char* endp
        if self.msgs == NULL:
            raise RuntimeError("ProtobufDecoder was not initialised")
        out.setup(self.spec, self.layout_, self.converters)
        memset(&c, 0, sizeof(Ctx))
        c.cols = out.cols
        c.fields = self.fields
        c.msgs = self.msgs
        c.lookup = self.lookup
        c.ops = self.ops
        c.enum_off = self.enum_off
        c.enum_len = self.enum_len
        c.enum_vals = self.enum_vals
        c.vtypes = self.vtypes
        c.vfields = self.vfields
        c.max_depth = self.max_depth_
        root_size = self.msgs[0].frame_size
        try:
            saved = <Py_ssize_t*>malloc((out.ncols + 1) * sizeof(Py_ssize_t))
            par = <int32_t*>malloc((out.ncols + 1) * sizeof(int32_t))
            if par == NULL:
                raise MemoryError()
            parents = out.parents
            if len(parents) != out.ncols:
                raise RuntimeError("Batch.parents does not match the column spec")
            for i in range(out.ncols):
                par[i] = parents[i]
            c.stack = <Slot*>malloc((self.stack_need + 1) * sizeof(Slot))
            err_idx = <Py_ssize_t*>malloc((n + 1) * sizeof(Py_ssize_t))
            err_pos = <Py_ssize_t*>malloc((n + 1) * sizeof(Py_ssize_t))
            err_code = <int*>malloc((n + 1) * sizeof(int))
            err_field = <uint32_t*>malloc((n + 1) * sizeof(uint32_t))
            if (saved == NULL or c.stack == NULL or err_idx == NULL or err_pos == NULL
                    or err_code == NULL or err_field == NULL):
                raise MemoryError()
            with nogil:
                for i in range(n):
                    c.base = ptrs[i]
                    c.top = root_size
                    memset(c.stack, 0, root_size * sizeof(Slot))
                    rc = decode_msg(&c, 0, ptrs[i], ptrs[i] + lens[i], c.stack, 0, 0, &endp)
                    if rc == 0:
                        rc = close_frame(&c, 0, c.stack)
                        if rc:
                            c.err_code = rc
                    if rc == 0:
                        if col_append_i32(&out.source_index, <int32_t>i):
                            rc = E_NOMEM
                            c.err_code = rc
                        else:
                            out.num_rows += 1
                    if rc:
                        row_start_lengths(c.cols, par, out.ncols, out.num_rows, saved)
                        out.rollback(saved)
                        drop_open_objects(c.cols, out.ncols)
                        if c.err_code == E_NOMEM:
                            nomem = True
                            break
                        err_idx[nerr] = i
                        err_code[nerr] = c.err_code
                        err_pos[nerr] = c.err_pos
                        err_field[nerr] = c.err_field
                        nerr += 1
            if nomem:
                raise MemoryError("out of memory while decoding Protobuf payloads")
            errors = out.errors
            for i in range(nerr):
                reason = _REASONS.get(err_code[i], "invalid payload")
                if err_field[i]:
                    reason = f"{reason} (field {err_field[i]})"
                errors.append(RowError(err_idx[i], f"{reason} at byte {err_pos[i]}"))
            for d in self.derived:
                if _derive(out, d[0], d[1], d[2], d[3], d[4]) < 0:
                    raise MemoryError("out of memory while decoding Protobuf payloads")
            out.finish()
        finally:
            free(saved)
            free(par)
            free(c.stack)
            free(c.htab)
            free(c.keep)
            free(err_idx)
            free(err_pos)
            free(err_code)
            free(err_field)
        return 0


# ---------------------------------------------------------------- Confluent framing

cdef inline int scan_frame(const unsigned char* p, Py_ssize_t n, uint32_t* schema_id,
                           Py_ssize_t* path_end) noexcept nogil:
    """Magic byte 0, big-endian schema id, message-index path (zigzag varints:
    count, then indexes; a single 0 means [0]). Returns 0 and where the path
    ends (= where the message starts), or -1 for bad framing."""
    cdef const unsigned char* q
    cdef const unsigned char* end = p + n
    cdef uint64_t v
    cdef int64_t count, k
    if n < 6 or p[0] != 0:
        return -1
    schema_id[0] = ((<uint32_t>p[1]) << 24) | ((<uint32_t>p[2]) << 16) | ((<uint32_t>p[3]) << 8) | p[4]
    q = p + 5
    if rd_varint(&q, end, &v):
        return -1
    count = <int64_t>((v >> 1) ^ (0 - (v & 1)))
    if count < 0 or count > 128:
        return -1
    for k in range(count):
        if rd_varint(&q, end, &v):
            return -1
        if v & 1:   # negative index
            return -1
    path_end[0] = q - p
    return 0


_BAD_FRAME = ("not Confluent Protobuf framing (magic byte 0, 4-byte schema id, "
              "message indexes)")
# What a payload the framing rejects is handed to the message decoder as: one
# byte that is always an error there (tag of field number 0); its RowError's
# reason is then replaced with the framing's or the resolver's.
_BAD_SPAN = b"\x00"


@cython.final
cdef class _Framing:
    """One batch of ``FramedProtobufDecoder``: the message span of each payload
    and the resolution of each (schema id, path) key, asked once per batch."""
    cdef FramedProtobufDecoder owner
    cdef const unsigned char** mptrs
    cdef Py_ssize_t* mlens
    cdef const unsigned char* bad
    cdef const unsigned char* last_path   # the last key (it points into a payload)
    cdef Py_ssize_t last_len
    cdef uint32_t last_sid
    cdef bint have_last
    cdef object last_reason               # None: the last key resolved
    cdef ProtobufDecoderBase dec          # the one message decoder of the batch
    cdef dict resolved                    # (schema id, path bytes) -> (decoder, reason)
    cdef dict failed                      # payload index -> RowError reason

    def __dealloc__(self):
        free(self.mptrs)
        free(self.mlens)

    cdef int start(self, FramedProtobufDecoder owner, Py_ssize_t n) except -1:
        self.owner = owner
        self.mptrs = <const unsigned char**>malloc((n if n else 1) * sizeof(void*))
        self.mlens = <Py_ssize_t*>malloc((n if n else 1) * sizeof(Py_ssize_t))
        if self.mptrs == NULL or self.mlens == NULL:
            raise MemoryError()
        self.bad = <const unsigned char*>PyBytes_AS_STRING(_BAD_SPAN)
        self.last_len = -1
        self.resolved = {}
        self.failed = {}
        return 0

    cdef inline int step(self, Py_ssize_t i, const unsigned char* p, Py_ssize_t n) except -1:
        """Frame payload ``i``; a run of equal keys costs a compare, no Python object."""
        cdef uint32_t sid = 0
        cdef Py_ssize_t path_end = 0
        if scan_frame(p, n, &sid, &path_end) < 0:
            self.failed[i] = _BAD_FRAME
            self.mptrs[i] = self.bad
            self.mlens[i] = 1
            return 0
        if not (self.have_last and sid == self.last_sid and path_end - 5 == self.last_len
                and memcmp(p + 5, self.last_path, self.last_len) == 0):
            self.new_key(sid, p, path_end)
        if self.last_reason is None:
            self.mptrs[i] = p + path_end
            self.mlens[i] = n - path_end
        else:
            self.failed[i] = self.last_reason
            self.mptrs[i] = self.bad
            self.mlens[i] = 1
        return 0

    cdef int new_key(self, uint32_t sid, const unsigned char* p, Py_ssize_t path_end) except -1:
        key = (sid, PyBytes_FromStringAndSize(<const char*>p + 5, path_end - 5))
        answer = self.resolved.get(key)
        if answer is None:
            got, reason = self.owner._resolve(*key)
            if got is not None:
                if not isinstance(got, ProtobufDecoderBase):
                    raise TypeError(f"_resolve() returned {type(got).__name__}, "
                                    "not a ProtobufDecoder")
                if self.dec is None:
                    self.dec = got
                elif got is not self.dec:
                    raise RuntimeError("_resolve() returned two decoders for one batch")
                reason = None
            elif reason is None:
                raise TypeError("_resolve() returned neither a decoder nor a reason")
            answer = (got, reason)
            self.resolved[key] = answer
        self.last_reason = answer[1]
        self.last_sid = sid
        self.last_path = p + 5
        self.last_len = path_end - 5
        self.have_last = True
        return 0

    cdef int finish(self, Py_ssize_t n, Batch out) except -1:
        """Decode the message spans (GIL released) and give the payloads that
        failed framing or resolution their own reasons."""
        cdef Py_ssize_t k
        cdef ProtobufDecoderBase dec = self.dec
        if dec is None:
            got = self.owner._columns_decoder()
            if not isinstance(got, ProtobufDecoderBase):
                raise TypeError(f"_columns_decoder() returned {type(got).__name__}, "
                                "not a ProtobufDecoder")
            dec = got
        dec.decode_spans(self.mptrs, self.mlens, n, out)
        if self.failed:  # the stand-in span's error gets the real reason
            errors = out.errors
            for k in range(len(errors)):
                e = errors[k]
                reason = self.failed.get(e.index)
                if reason is not None:
                    errors[k] = RowError(e.index, reason)
        return 0


cdef class FramedProtobufDecoder(BaseDecoder):
    """Protobuf behind the Confluent wire format: magic byte 0, a 4-byte
    big-endian schema id, the message-index path, then the message.

    Subclasses (``kfast.protobuf.ConfluentProtobufDecoder``) provide two hooks,
    both called with the GIL held:

    * ``_resolve(schema_id, path_bytes)`` returns ``(decoder, None)`` or
      ``(None, reason)``; ``decoder`` is a ``ProtobufDecoderBase``, the same
      object for every (id, path) of one batch (one column layout per batch).
      It is called once per distinct (schema id, path) per batch;
    * ``_columns_decoder()`` returns the ``ProtobufDecoderBase`` whose columns a
      batch gets when none of its payloads resolved.

    ``decode_spans`` reads the ring's spans in place (no copy): the framing is
    parsed in C, then the message decoder (GIL released) gets each good
    payload's message bytes. Bad framing, unknown ids, unreachable registries
    and other resolution failures are RowErrors of their payloads.
    """

    def _resolve(self, schema_id, path_bytes):
        raise NotImplementedError

    def _columns_decoder(self):
        raise NotImplementedError

    cdef int decode_spans(self, const unsigned char** ptrs, const Py_ssize_t* lens,
                          Py_ssize_t n, Batch out) except -1:
        cdef Py_ssize_t i
        cdef _Framing st = _Framing.__new__(_Framing)
        st.start(self, n)
        for i in range(n):
            st.step(i, ptrs[i], lens[i])
        st.finish(n, out)
        return 0

    def decode(self, payloads, Batch out=None):
        """Decode a sequence of framed payloads into a Batch: the rows of
        ``decode_spans`` (what a Pipeline's ring calls), with each payload's
        header read as its buffer is taken (one pass over the payloads)."""
        cdef Py_ssize_t n = len(payloads)
        cdef Py_ssize_t i, nviews = 0
        cdef Py_buffer* views = NULL
        cdef _Framing st = _Framing.__new__(_Framing)
        if out is None:
            out = Batch.__new__(Batch)
        if not isinstance(payloads, (list, tuple)):
            payloads = list(payloads)
        st.start(self, n)
        views = <Py_buffer*>malloc((n if n else 1) * sizeof(Py_buffer))
        try:
            if views == NULL:
                raise MemoryError()
            for i in range(n):
                p = payloads[i]
                if PyBytes_Check(p):
                    st.step(i, <const unsigned char*>PyBytes_AS_STRING(p), PyBytes_GET_SIZE(p))
                    continue
                if p is None:
                    raise TypeError(f"payload {i} is None (a tombstone has no value to decode)")
                PyObject_GetBuffer(p, &views[nviews], PyBUF_SIMPLE)
                nviews += 1
                st.step(i, <const unsigned char*>views[nviews - 1].buf, views[nviews - 1].len)
            st.finish(n, out)
        finally:
            for i in range(nviews):
                PyBuffer_Release(&views[i])
            free(views)
        return out
