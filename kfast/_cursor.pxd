# cython: language_level=3
"""Bounds-checked read cursor shared by every wire-format decoder.

A cursor is a pointer plus the number of bytes left. Each reader checks the
remaining length once, then reads; on failure it returns a negative status
and leaves the cursor unchanged, so a decoder can never read outside the
payload whatever the input. Everything here is ``noexcept nogil`` because the
decoders run with the GIL released and report errors as status codes.
"""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy

# Status codes returned by readers and decoders (0 = ok).
cdef enum CursorStatus:
    CUR_OK = 0
    CUR_TRUNCATED = -1        # fewer bytes left than the value needs
    CUR_VARINT_TOO_LONG = -2  # varint longer than its type allows
    CUR_BAD_LENGTH = -3       # negative length prefix


cdef struct Cursor:
    const unsigned char* buf
    Py_ssize_t left


cdef inline void cur_init(Cursor* c, const unsigned char* buf, Py_ssize_t n) noexcept nogil:
    c.buf = buf
    c.left = n


cdef inline const unsigned char* cur_take(Cursor* c, Py_ssize_t n) noexcept nogil:
    """Consume ``n`` bytes and return a pointer to them, or NULL if ``n`` is
    negative or runs past the end."""
    cdef const unsigned char* p
    if n < 0 or n > c.left:
        return NULL
    p = c.buf
    c.buf += n
    c.left -= n
    return p


cdef inline int cur_read_u8(Cursor* c, uint8_t* out) noexcept nogil:
    if c.left < 1:
        return CUR_TRUNCATED
    out[0] = c.buf[0]
    c.buf += 1
    c.left -= 1
    return CUR_OK


cdef inline int cur_read_uvarint64(Cursor* c, uint64_t* out) noexcept nogil:
    """Base-128 little-endian varint, at most 10 bytes (Protobuf and Avro)."""
    cdef uint64_t result = 0
    cdef int shift = 0
    cdef Py_ssize_t i = 0
    cdef uint8_t b
    while True:
        if i >= c.left:
            return CUR_TRUNCATED
        b = c.buf[i]
        if i == 9 and b > 1:
            # the 10th byte may only carry the top bit of a 64-bit value
            return CUR_VARINT_TOO_LONG
        result |= (<uint64_t>(b & 0x7F)) << shift
        i += 1
        if not (b & 0x80):
            break
        shift += 7
    c.buf += i
    c.left -= i
    out[0] = result
    return CUR_OK


cdef inline int cur_read_uvarint32(Cursor* c, uint32_t* out) noexcept nogil:
    """Varint that must fit 32 bits (at most 5 bytes)."""
    cdef uint32_t result = 0
    cdef int shift = 0
    cdef Py_ssize_t i = 0
    cdef uint8_t b
    while True:
        if i >= c.left:
            return CUR_TRUNCATED
        b = c.buf[i]
        if i == 4 and b > 0x0F:
            return CUR_VARINT_TOO_LONG
        result |= (<uint32_t>(b & 0x7F)) << shift
        i += 1
        if not (b & 0x80):
            break
        shift += 7
    c.buf += i
    c.left -= i
    out[0] = result
    return CUR_OK


cdef inline int cur_read_zigzag64(Cursor* c, int64_t* out) noexcept nogil:
    """Avro ``long`` / Protobuf ``sint64``."""
    cdef uint64_t u
    cdef int rc = cur_read_uvarint64(c, &u)
    if rc != CUR_OK:
        return rc
    out[0] = <int64_t>((u >> 1) ^ (0 - (u & 1)))
    return CUR_OK


cdef inline int cur_read_zigzag32(Cursor* c, int32_t* out) noexcept nogil:
    """Avro ``int`` / Protobuf ``sint32``."""
    cdef uint32_t u
    cdef int rc = cur_read_uvarint32(c, &u)
    if rc != CUR_OK:
        return rc
    out[0] = <int32_t>((u >> 1) ^ (0 - (u & 1)))
    return CUR_OK


cdef inline int cur_read_le32(Cursor* c, uint32_t* out) noexcept nogil:
    cdef const unsigned char* p = cur_take(c, 4)
    if p == NULL:
        return CUR_TRUNCATED
    out[0] = (<uint32_t>p[0]) | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)
    return CUR_OK


cdef inline int cur_read_le64(Cursor* c, uint64_t* out) noexcept nogil:
    cdef const unsigned char* p = cur_take(c, 8)
    cdef uint64_t v = 0
    cdef int k
    if p == NULL:
        return CUR_TRUNCATED
    for k in range(7, -1, -1):
        v = (v << 8) | p[k]
    out[0] = v
    return CUR_OK


cdef inline int cur_read_f32(Cursor* c, float* out) noexcept nogil:
    cdef uint32_t bits
    cdef int rc = cur_read_le32(c, &bits)
    if rc == CUR_OK:
        memcpy(out, &bits, 4)
    return rc


cdef inline int cur_read_f64(Cursor* c, double* out) noexcept nogil:
    cdef uint64_t bits
    cdef int rc = cur_read_le64(c, &bits)
    if rc == CUR_OK:
        memcpy(out, &bits, 8)
    return rc


cdef inline int cur_read_be32(Cursor* c, uint32_t* out) noexcept nogil:
    """Big-endian u32 (Confluent schema id)."""
    cdef const unsigned char* p = cur_take(c, 4)
    if p == NULL:
        return CUR_TRUNCATED
    out[0] = (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | (<uint32_t>p[3])
    return CUR_OK
