# cython: language_level=3
"""Compiled helpers that let the test suite reach C-level building blocks.

* The ``_cursor.pxd`` readers, one Python function each, so every bounds
  check can be fed edge cases directly.
* ``PlainDecoder``: a trivial self-describing wire format decoded through
  the same Batch protocol as the real decoders (checkpoint, append,
  rollback, finish). It exercises Batch features independently of Avro and
  Protobuf. Not a public API.
"""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc

from kfast._batch cimport BaseDecoder, Batch
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
    col_append_bool,
    col_append_bytes,
    col_append_f32,
    col_append_f64,
    col_append_i32,
    col_append_i64,
    col_append_list_end,
    col_append_null,
    col_append_struct,
)
from kfast._cursor cimport (
    CUR_BAD_LENGTH,
    CUR_OK,
    CUR_TRUNCATED,
    CUR_VARINT_TOO_LONG,
    Cursor,
    cur_init,
    cur_read_be32,
    cur_read_f32,
    cur_read_f64,
    cur_read_le32,
    cur_read_le64,
    cur_read_u8,
    cur_read_uvarint32,
    cur_read_uvarint64,
    cur_read_zigzag32,
    cur_read_zigzag64,
    cur_take,
)

from kfast.row_error import RowError

_STATUS = {
    CUR_TRUNCATED: "truncated",
    CUR_VARINT_TOO_LONG: "varint too long",
    CUR_BAD_LENGTH: "bad length",
}


cdef class _View:
    cdef const unsigned char[:] mv

    def __init__(self, data):
        self.mv = memoryview(data).cast("B") if len(data) else memoryview(b"\0")[:0]


cdef inline void _cursor_over(Cursor* c, _View v):
    if v.mv.shape[0]:
        cur_init(c, &v.mv[0], v.mv.shape[0])
    else:
        cur_init(c, <const unsigned char*>b"", 0)


def _check(int rc):
    if rc != CUR_OK:
        raise ValueError(_STATUS.get(rc, rc))


cdef enum Reader:
    R_UVARINT64, R_UVARINT32, R_ZIGZAG64, R_ZIGZAG32, R_LE32, R_LE64, R_BE32, R_F32, R_F64


cdef object _read(Reader which, data):
    """Run one cursor reader over ``data``: (value, bytes consumed), or ValueError."""
    cdef Cursor c
    cdef uint64_t u64
    cdef uint32_t u32
    cdef int64_t i64
    cdef int32_t i32
    cdef float f32
    cdef double f64
    cdef object value   # not inferred: a C double would round 64-bit integers
    cdef _View view = _View(data)
    _cursor_over(&c, view)
    if which == R_UVARINT64:
        _check(cur_read_uvarint64(&c, &u64)); value = u64
    elif which == R_UVARINT32:
        _check(cur_read_uvarint32(&c, &u32)); value = u32
    elif which == R_ZIGZAG64:
        _check(cur_read_zigzag64(&c, &i64)); value = i64
    elif which == R_ZIGZAG32:
        _check(cur_read_zigzag32(&c, &i32)); value = i32
    elif which == R_LE32:
        _check(cur_read_le32(&c, &u32)); value = u32
    elif which == R_LE64:
        _check(cur_read_le64(&c, &u64)); value = u64
    elif which == R_BE32:
        _check(cur_read_be32(&c, &u32)); value = u32
    elif which == R_F32:
        _check(cur_read_f32(&c, &f32)); value = f32
    else:
        _check(cur_read_f64(&c, &f64)); value = f64
    return value, len(data) - c.left


def read_uvarint64(data):
    """(value, bytes consumed)."""
    return _read(R_UVARINT64, data)


def read_uvarint32(data):
    return _read(R_UVARINT32, data)


def read_zigzag64(data):
    return _read(R_ZIGZAG64, data)


def read_zigzag32(data):
    return _read(R_ZIGZAG32, data)


def read_le32(data):
    return _read(R_LE32, data)


def read_le64(data):
    return _read(R_LE64, data)


def read_be32(data):
    return _read(R_BE32, data)


def read_f32(data):
    return _read(R_F32, data)


def read_f64(data):
    return _read(R_F64, data)


def take(data, Py_ssize_t n):
    """Bytes taken, or ValueError when ``n`` is negative or past the end."""
    cdef Cursor c
    cdef const unsigned char* p
    cdef _View view = _View(data)
    _cursor_over(&c, view)
    p = cur_take(&c, n)
    if p == NULL:
        raise ValueError("truncated" if n >= 0 else "bad length")
    return bytes(data[:n])


# ---------------------------------------------------------------- PlainDecoder

cdef struct Op:
    int col
    int nchildren   # LIST columns: element columns that follow (1 list, 2 map)


cdef int _read_value(Cursor* c, Column* col) noexcept nogil:
    """One value of ``col``: zigzag ints, little-endian floats, a bool byte,
    varint-length-prefixed binary; nullable columns carry a leading presence
    byte."""
    cdef uint8_t present = 1
    cdef int32_t i32
    cdef int64_t i64
    cdef float f32
    cdef double f64
    cdef uint64_t n
    cdef const unsigned char* p
    cdef int rc
    if col.nullable:
        rc = cur_read_u8(c, &present)
        if rc != CUR_OK:
            return rc
        if not present:
            return col_append_null(col) * 100
    if col.kind == COL_INT32:
        rc = cur_read_zigzag32(c, &i32)
        return rc if rc != CUR_OK else col_append_i32(col, i32) * 100
    if col.kind == COL_INT64:
        rc = cur_read_zigzag64(c, &i64)
        return rc if rc != CUR_OK else col_append_i64(col, i64) * 100
    if col.kind == COL_FLOAT32:
        rc = cur_read_f32(c, &f32)
        return rc if rc != CUR_OK else col_append_f32(col, f32) * 100
    if col.kind == COL_FLOAT64:
        rc = cur_read_f64(c, &f64)
        return rc if rc != CUR_OK else col_append_f64(col, f64) * 100
    if col.kind == COL_BOOL:
        rc = cur_read_u8(c, &present)
        return rc if rc != CUR_OK else col_append_bool(col, present != 0) * 100
    if col.kind == COL_BINARY or col.kind == COL_OBJECT:
        rc = cur_read_uvarint64(c, &n)
        if rc != CUR_OK:
            return rc
        if n > <uint64_t>c.left:
            return CUR_TRUNCATED
        p = cur_take(c, <Py_ssize_t>n)
        return col_append_bytes(col, p, <Py_ssize_t>n) * 100
    if col.kind == COL_STRUCT:
        return col_append_struct(col, True) * 100
    return CUR_BAD_LENGTH


cdef class PlainDecoder(BaseDecoder):
    """Test-only decoder; see the module docstring.

    ``spec`` and ``layout`` are handed to ``Batch.setup`` unchanged;
    ``program`` lists ``(column, nchildren)`` for each top-level column in
    payload order. A LIST column reads a varint count, then for each element
    one value of each of its ``nchildren`` following columns.
    """
    cdef tuple spec
    cdef object layout
    cdef object converters
    cdef Op* ops
    cdef Py_ssize_t nops

    def __init__(self, spec, layout, program, converters=None):
        self.spec = tuple(tuple(s) for s in spec)
        self.layout = layout
        self.converters = converters
        self.nops = len(program)
        self.ops = <Op*>malloc((self.nops or 1) * sizeof(Op))
        if self.ops == NULL:
            raise MemoryError()
        for i, (col, nchildren) in enumerate(program):
            self.ops[i].col = col
            self.ops[i].nchildren = nchildren

    def __dealloc__(self):
        free(self.ops)

    cdef int decode_spans(self, const unsigned char** ptrs, const Py_ssize_t* lens,
                          Py_ssize_t n, Batch out) except -1:
        cdef Py_ssize_t i, k, e, j
        cdef Cursor c
        cdef int rc
        cdef uint64_t count
        cdef uint8_t present
        cdef Column* col
        cdef Py_ssize_t* saved
        cdef int* status
        out.setup(self.spec, self.layout, self.converters)
        saved = <Py_ssize_t*>malloc((out.ncols + 1) * sizeof(Py_ssize_t))
        status = <int*>malloc((n or 1) * sizeof(int))
        if saved == NULL or status == NULL:
            free(saved)
            free(status)
            raise MemoryError()
        try:
            with nogil:
                for i in range(n):
                    out.begin_row_checkpoint(saved)
                    cur_init(&c, ptrs[i], lens[i])
                    rc = CUR_OK
                    for k in range(self.nops):
                        col = &out.cols[self.ops[k].col]
                        if col.kind != COL_LIST:
                            rc = _read_value(&c, col)
                        else:
                            present = 1
                            if col.nullable:
                                rc = cur_read_u8(&c, &present)
                                if rc == CUR_OK and not present:
                                    rc = col_append_null(col) * 100
                                if rc != CUR_OK or not present:
                                    if rc != CUR_OK:
                                        break
                                    continue
                            rc = cur_read_uvarint64(&c, &count)
                            if rc == CUR_OK and count > <uint64_t>c.left:
                                rc = CUR_TRUNCATED
                            e = 0
                            while rc == CUR_OK and e < <Py_ssize_t>count:
                                for j in range(1, self.ops[k].nchildren + 1):
                                    rc = _read_value(&c, &out.cols[self.ops[k].col + j])
                                    if rc != CUR_OK:
                                        break
                                e += 1
                            if rc == CUR_OK:
                                rc = col_append_list_end(col, out.cols[self.ops[k].col + 1].length) * 100
                        if rc != CUR_OK:
                            break
                    if rc == CUR_OK and c.left:
                        rc = 1   # trailing bytes
                    if rc == CUR_OK:
                        rc = col_append_i32(&out.source_index, <int32_t>i) * 100
                    status[i] = rc
                    if rc == CUR_OK:
                        out.num_rows += 1
                    else:
                        out.rollback(saved)
            for i in range(n):
                if status[i] == -100:
                    raise MemoryError()
                if status[i] != CUR_OK:
                    out.errors.append(RowError(i, "trailing bytes" if status[i] == 1
                                               else _STATUS.get(status[i], str(status[i]))))
            out.finish()
        finally:
            free(saved)
            free(status)
        return 0
