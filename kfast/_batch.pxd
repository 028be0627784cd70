# cython: language_level=3
from kfast._columns cimport Column


cdef class Batch:
    # Column storage, index-aligned with ``names``. Owned by the batch and
    # recycled across decode calls while the column spec stays the same.
    cdef Column* cols
    cdef Py_ssize_t ncols
    cdef readonly Py_ssize_t num_rows
    # For each good row, the index of its payload in the decoded input
    # (INT32 column, never nullable). Sinks and the DLQ map rows back to
    # Kafka offsets through it.
    cdef Column source_index
    cdef public list errors          # list[RowError], ordered by index
    cdef public object context       # set by the runtime: kfast.sinks.BatchContext, else None
    cdef readonly tuple names        # dotted column names
    cdef readonly object layout      # kfast._layout.RecordNode for one row
    cdef list objects                # per column: list of Python objects (COL_OBJECT) or None
    cdef object object_converters    # per column: callable(bytes) -> object, or None
    cdef Py_ssize_t exports          # live buffer exports; recycling refuses while > 0
    cdef tuple spec                  # ((name, kind, nullable), ...) the storage was built for
    # Derived from the layout at setup (not per row):
    cdef dict col_nodes              # column index -> the layout node that reads it
    cdef tuple parents               # per column: index of the LIST column it is a child of, or -1
    cdef tuple top_names             # user-facing column names (what column_names returns)

    cdef int setup(self, tuple spec, object layout, object object_converters) except -1
    cdef void begin_row_checkpoint(self, Py_ssize_t* saved) noexcept nogil
    cdef void rollback(self, const Py_ssize_t* saved) noexcept nogil
    cdef int finish(self) except -1
    cdef void _free_columns(self) noexcept
    cdef _index_layout(self)
    cdef list _node_values(self, node, Py_ssize_t start, Py_ssize_t stop)
    cdef list _record_values(self, node, Py_ssize_t start, Py_ssize_t stop)


cdef class BaseDecoder:
    """Common entry point of every compiled decoder.

    ``decode_spans`` runs with the GIL released where it can: ``ptrs[i]`` and
    ``lens[i]`` describe payload ``i``. Each good payload appends one row to
    ``out`` (and its index to ``out.source_index``); each bad one appends a
    RowError and leaves no trace in the columns.
    """
    cdef int decode_spans(self, const unsigned char** ptrs, const Py_ssize_t* lens,
                          Py_ssize_t n, Batch out) except -1
