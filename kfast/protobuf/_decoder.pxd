# cython: language_level=3
"""C structures of a compiled Protobuf decode plan (see ``_compile.py``).

The plan is a set of flat tables built once per message type by the Python
compiler and copied into C arrays by ``ProtobufDecoder``; ``decode_spans``
walks them with the GIL released.
"""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t

from kfast._batch cimport Batch, BaseDecoder
from kfast._columns cimport Column


# How a known field is decoded (PField.mode).
cdef enum FieldMode:
    M_SCALAR = 1       # singular scalar: last value wins, kept in a frame slot
    M_REP_SCALAR = 2   # repeated scalar (packed or not): LIST column + child column
    M_INLINE = 3       # singular message flattened into dotted columns (merge semantics)
    M_LIST_MSG = 4     # repeated message: LIST column of STRUCT elements, each its own frame
    M_MAP = 5          # map<scalar, scalar>: LIST column with key and value children
    M_OBJECT = 6       # raw field bytes kept and converted by google's runtime after decoding

# Close operations, run in column order when a frame (the payload or one
# element of a repeated message) ends.
cdef enum CloseOp:
    OP_SCALAR = 1
    OP_STRUCT = 2
    OP_LIST = 3
    OP_MAP = 4
    OP_OBJECT = 5


cdef struct PField:
    uint32_t number
    int32_t mode
    int32_t ptype       # google FieldDescriptor.TYPE_* of the value (map: of the value)
    int32_t kptype      # map key type
    int32_t wire        # expected wire type (0, 1, 2, 3, 5)
    int32_t packable    # repeated scalar that may also arrive packed (wire type 2)
    int32_t slot        # frame slot: value (scalar) or presence (inline message)
    int32_t slot_end    # inline message: end of its slot range
    int32_t col         # value / LIST / STRUCT / OBJECT column
    int32_t col2        # repeated scalar child / element STRUCT / map key column
    int32_t col3        # map value column
    int32_t sub         # message plan (inline, list) or validation type (object)
    int32_t oneof       # frame slot holding the oneof's current member, or -1
    int32_t enum_set    # closed enum value set, or -1 (open enum / not an enum)
    int32_t group       # 1 when the message is group-encoded (wire types 3/4)


cdef struct PMsg:
    int32_t first_field
    int32_t nfields
    int32_t lookup_off  # dense table number -> field index for numbers < lookup_len
    int32_t lookup_len
    int32_t frame_size  # slots of this message's frame (frame roots only)
    int32_t first_op
    int32_t nops
    int32_t stack_need  # slots for this frame plus the deepest nested element frames


cdef struct POp:
    int32_t op
    int32_t ptype
    int32_t slot
    int32_t col
    int32_t col2
    int32_t col3
    int32_t skip        # OP_STRUCT: index of the first op after its subtree
    int32_t repeated    # OP_OBJECT: repeated/map field (empty list, not null, when absent)


cdef struct VType:
    int32_t first_field
    int32_t nfields


cdef struct VField:
    uint32_t number
    int32_t wire
    int32_t packed_width   # -1 not packable, 0 packed varints, 4 or 8 packed fixed
    int32_t utf8
    int32_t sub            # nested validation type or -1
    int32_t group


cdef struct Slot:
    int64_t i
    const unsigned char* p
    Py_ssize_t n
    int64_t set


cdef struct Ctx:
    Column* cols
    const PField* fields
    const PMsg* msgs
    const int32_t* lookup
    const POp* ops
    const int32_t* enum_off
    const int32_t* enum_len
    const int32_t* enum_vals
    const VType* vtypes
    const VField* vfields
    Slot* stack
    Py_ssize_t top
    int max_depth
    const unsigned char* base
    Py_ssize_t err_pos
    uint32_t err_field
    int err_code
    # map de-duplication scratch
    int32_t* htab
    Py_ssize_t hcap
    uint8_t* keep
    Py_ssize_t kcap


cdef class ProtobufDecoderBase(BaseDecoder):
    cdef PField* fields
    cdef PMsg* msgs
    cdef int32_t* lookup
    cdef POp* ops
    cdef int32_t* enum_off
    cdef int32_t* enum_len
    cdef int32_t* enum_vals
    cdef VType* vtypes
    cdef VField* vfields
    cdef Py_ssize_t stack_need
    cdef int max_depth_
    cdef tuple spec
    cdef object layout_
    cdef object converters
    cdef tuple derived      # well-known types: (code, presence col, src, src2, dst)


cdef class FramedProtobufDecoder(BaseDecoder):
    # Confluent framing in front of a ProtobufDecoderBase chosen per (schema id,
    # message-index path) by the Python-level ``_resolve`` hook
    pass
