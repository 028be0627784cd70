# cython: language_level=3
"""C-level column storage shared by decoders, the Batch and the sinks.

Layout follows Apache Arrow so that ``Batch.to_arrow()`` can wrap buffers
without copying:

* fixed-width kinds: ``values`` holds ``length * width`` bytes;
* BINARY (strings, bytes, fixed, decimal bytes) and OBJECT: ``offsets`` holds
  ``length + 1`` int32 entries into ``values``;
* LIST: ``offsets`` holds ``length + 1`` int32 entries into the child column
  (element ``i`` spans child slots ``offsets[i]:offsets[i+1]``);
* STRUCT: no values, only validity (presence of a nullable nested record);
* ``validity`` is an LSB-first bitmap, allocated only for nullable columns.

Every mutator is ``noexcept nogil`` and returns 0, or -1 when memory or the
int32 offset range is exhausted; callers turn -1 into MemoryError once they
hold the GIL again. ``col_truncate`` rolls a column back to an earlier
length, which is how a decoder drops the partial row of a bad payload.
"""
from libc.stdint cimport int32_t, int64_t, uint8_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy, memset


cdef enum ColKind:
    COL_BOOL = 1      # uint8 0/1
    COL_INT32 = 2
    COL_INT64 = 3
    COL_FLOAT32 = 4
    COL_FLOAT64 = 5
    COL_BINARY = 6    # int32 offsets + bytes
    COL_LIST = 7      # int32 offsets into child column
    COL_OBJECT = 8    # raw byte spans, converted to Python objects after decoding
    COL_STRUCT = 9    # validity only


cdef struct GrowBuf:
    unsigned char* data
    Py_ssize_t len
    Py_ssize_t cap


cdef struct Column:
    int kind
    int width            # bytes per value for fixed-width kinds, 0 otherwise
    bint nullable
    Py_ssize_t length    # number of slots
    Py_ssize_t null_count
    GrowBuf values
    GrowBuf offsets
    GrowBuf validity


cdef inline int buf_reserve(GrowBuf* b, Py_ssize_t extra) noexcept nogil:
    cdef Py_ssize_t need = b.len + extra
    cdef Py_ssize_t cap
    cdef unsigned char* p
    if need <= b.cap:
        return 0
    cap = b.cap * 2 if b.cap else 64
    while cap < need:
        cap *= 2
    p = <unsigned char*>realloc(b.data, cap)
    if p == NULL:
        return -1
    b.data = p
    b.cap = cap
    return 0


cdef inline int buf_append(GrowBuf* b, const void* src, Py_ssize_t n) noexcept nogil:
    if b.len + n > b.cap and buf_reserve(b, n) < 0:
        return -1
    if n:
        memcpy(b.data + b.len, src, n)
    b.len += n
    return 0


cdef inline void buf_free(GrowBuf* b) noexcept nogil:
    free(b.data)
    b.data = NULL
    b.len = 0
    b.cap = 0


cdef inline int kind_width(int kind) noexcept nogil:
    if kind == COL_BOOL:
        return 1
    if kind == COL_INT32 or kind == COL_FLOAT32:
        return 4
    if kind == COL_INT64 or kind == COL_FLOAT64:
        return 8
    return 0


cdef inline bint kind_has_offsets(int kind) noexcept nogil:
    return kind == COL_BINARY or kind == COL_LIST or kind == COL_OBJECT


cdef inline int col_init(Column* c, int kind, bint nullable) noexcept nogil:
    memset(c, 0, sizeof(Column))
    c.kind = kind
    c.width = kind_width(kind)
    c.nullable = nullable
    if kind_has_offsets(kind):
        return buf_append(&c.offsets, b"\0\0\0\0", 4)
    return 0


cdef inline void col_free(Column* c) noexcept nogil:
    buf_free(&c.values)
    buf_free(&c.offsets)
    buf_free(&c.validity)
    c.length = 0


cdef inline void col_truncate(Column* c, Py_ssize_t length) noexcept nogil:
    """Roll back to ``length`` slots (``length`` <= current length)."""
    cdef Py_ssize_t i, nbytes
    cdef uint8_t* bits
    if length >= c.length:
        return
    if c.nullable:
        bits = c.validity.data
        for i in range(length, c.length):
            if not (bits[i >> 3] & (1 << (i & 7))):
                c.null_count -= 1
        nbytes = (length + 7) >> 3
        if length & 7:
            bits[nbytes - 1] &= <uint8_t>((1 << (length & 7)) - 1)
        c.validity.len = nbytes
    if kind_has_offsets(c.kind):
        c.offsets.len = (length + 1) * 4
        if c.kind != COL_LIST:
            c.values.len = (<int32_t*>c.offsets.data)[length]
    elif c.width:
        c.values.len = length * c.width
    c.length = length


cdef inline void col_reset(Column* c) noexcept nogil:
    """Empty the column but keep its capacity (buffer recycling)."""
    c.length = 0
    c.null_count = 0
    c.values.len = 0
    c.validity.len = 0
    if kind_has_offsets(c.kind):
        c.offsets.len = 4   # offsets[0] == 0 stays


cdef inline int col_mark(Column* c, bint valid) noexcept nogil:
    """Record validity for the slot being appended (nullable columns only)."""
    cdef Py_ssize_t i = c.length
    if not c.nullable:
        return 0
    if (i & 7) == 0:
        if buf_append(&c.validity, b"\0", 1) < 0:
            return -1
    if valid:
        c.validity.data[i >> 3] |= <uint8_t>(1 << (i & 7))
    else:
        c.null_count += 1
    return 0


cdef inline int col_end_offset(Column* c, Py_ssize_t end) noexcept nogil:
    cdef int32_t v
    if end > 0x7FFFFFFF:
        return -1
    v = <int32_t>end
    return buf_append(&c.offsets, &v, 4)


cdef inline int col_append_fixed(Column* c, const void* value) noexcept nogil:
    if col_mark(c, True) < 0 or buf_append(&c.values, value, c.width) < 0:
        return -1
    c.length += 1
    return 0


cdef inline int col_append_bool(Column* c, bint v) noexcept nogil:
    cdef uint8_t b = 1 if v else 0
    return col_append_fixed(c, &b)


cdef inline int col_append_i32(Column* c, int32_t v) noexcept nogil:
    return col_append_fixed(c, &v)


cdef inline int col_append_i64(Column* c, int64_t v) noexcept nogil:
    return col_append_fixed(c, &v)


cdef inline int col_append_f32(Column* c, float v) noexcept nogil:
    return col_append_fixed(c, &v)


cdef inline int col_append_f64(Column* c, double v) noexcept nogil:
    return col_append_fixed(c, &v)


cdef inline int col_append_bytes(Column* c, const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """Append one BINARY/OBJECT slot holding ``n`` bytes."""
    if col_mark(c, True) < 0 or buf_append(&c.values, p, n) < 0:
        return -1
    if col_end_offset(c, c.values.len) < 0:
        return -1
    c.length += 1
    return 0


cdef inline int col_append_list_end(Column* c, Py_ssize_t child_length) noexcept nogil:
    """Close one LIST slot whose elements end at ``child_length`` in the child."""
    if col_mark(c, True) < 0 or col_end_offset(c, child_length) < 0:
        return -1
    c.length += 1
    return 0


cdef inline int col_append_struct(Column* c, bint present) noexcept nogil:
    if col_mark(c, present) < 0:
        return -1
    c.length += 1
    return 0


cdef inline int col_append_null(Column* c) noexcept nogil:
    """A null slot: zero value, repeated offset, cleared validity bit."""
    cdef int32_t last
    if col_mark(c, False) < 0:
        return -1
    if kind_has_offsets(c.kind):
        last = (<int32_t*>c.offsets.data)[c.length]
        if buf_append(&c.offsets, &last, 4) < 0:
            return -1
    elif c.width:
        if buf_reserve(&c.values, c.width) < 0:
            return -1
        memset(c.values.data + c.values.len, 0, c.width)
        c.values.len += c.width
    c.length += 1
    return 0


cdef inline int32_t col_offset(const Column* c, Py_ssize_t i) noexcept nogil:
    return (<const int32_t*>c.offsets.data)[i]


cdef inline bint col_is_valid(const Column* c, Py_ssize_t i) noexcept nogil:
    if not c.nullable:
        return True
    return (c.validity.data[i >> 3] >> (i & 7)) & 1
