# cython: language_level=3
"""The columnar Batch every decoder fills and every sink reads.

Storage is a C array of ``Column`` structs (see ``_columns.pxd``) owned by
the batch. Decoders append to it with the GIL released; Python sees it
through zero-copy buffer exports (``Batch.column(name)``), ``to_pylist()``
(values rebuilt column by column, not per field through Python dispatch) and
``to_arrow()``.
"""

cimport cython
from cpython.buffer cimport PyBUF_FORMAT, PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.datetime cimport date_new, datetime_new, import_datetime, time_new
from cpython.dict cimport PyDict_SetItem
from cpython.list cimport PyList_GET_ITEM
from cpython.ref cimport PyObject
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy, memset

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
    col_append_fixed,
    col_append_null,
    col_end_offset,
    col_free,
    col_init,
    col_is_valid,
    col_mark,
    col_offset,
    col_reset,
    col_truncate,
    kind_has_offsets,
)

import datetime as _dt
import decimal as _decimal
import gc as _gc
import uuid as _uuid

from kfast._arrow import batch_to_arrow
from kfast._layout import ListNode, MapNode, ObjectNode, RecordNode, ValueNode
from kfast.errors import ConfigError

import_datetime()

_KIND_NAMES = {
    COL_BOOL: "bool",
    COL_INT32: "int32",
    COL_INT64: "int64",
    COL_FLOAT32: "float32",
    COL_FLOAT64: "float64",
    COL_BINARY: "binary",
    COL_LIST: "list",
    COL_OBJECT: "object",
    COL_STRUCT: "struct",
}
_KIND_FORMATS = {
    COL_BOOL: b"?",
    COL_INT32: b"i",
    COL_INT64: b"q",
    COL_FLOAT32: b"f",
    COL_FLOAT64: b"d",
}

_UTC = _dt.timezone.utc
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_UTC)
_EPOCH_NAIVE = _dt.datetime(1970, 1, 1)
_DAYS_SHIFT = _dt.date(1970, 1, 1).toordinal()
# Days from 1970-01-01 to 0001-01-01 and to 9999-12-31 (datetime's range).
cdef int64_t _MIN_DAYS = -719162
cdef int64_t _MAX_DAYS = 2932896
cdef int64_t _US_PER_DAY = 86400000000


# ---------------------------------------------------------------- helpers

cdef inline void _civil_from_days(int64_t z, int* year, int* month, int* day) noexcept nogil:
    # Howard Hinnant's days_from_civil inverse, proleptic Gregorian.
    cdef int64_t era, doe, yoe, y, doy, mp, d, m
    z += 719468
    era = (z if z >= 0 else z - 146096) // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    if m <= 2:
        y += 1
    year[0] = <int>y
    month[0] = <int>m
    day[0] = <int>d


cdef object _datetime_from_micros(int64_t us, object tz):
    cdef int64_t days = us // _US_PER_DAY   # floor division (Python semantics)
    cdef int64_t rem
    cdef int y, mo, d
    if days < _MIN_DAYS or days > _MAX_DAYS:
        # Out of datetime's range: let Python raise exactly what fastavro raises.
        base = _EPOCH if tz is not None else _EPOCH_NAIVE
        return base + _dt.timedelta(microseconds=us)
    rem = us - days * _US_PER_DAY
    _civil_from_days(days, &y, &mo, &d)
    return datetime_new(y, mo, d, <int>(rem // 3600000000), <int>((rem // 60000000) % 60),
                        <int>((rem // 1000000) % 60), <int>(rem % 1000000), tz)


cdef object _date_from_days(int64_t days):
    cdef int y, mo, d
    if days < _MIN_DAYS or days > _MAX_DAYS:
        return _dt.date.fromordinal(days + _DAYS_SHIFT)
    _civil_from_days(days, &y, &mo, &d)
    return date_new(y, mo, d)


cdef object _time_from_micros(int64_t us):
    if us < 0 or us >= _US_PER_DAY:
        # fastavro's arithmetic, which raises ValueError for these.
        return _dt.time(int(us / 3600000000), int(us / 60000000) % 60, int(us / 1000000) % 60,
                        us % 1000000)
    return time_new(<int>(us // 3600000000), <int>((us // 60000000) % 60),
                    <int>((us // 1000000) % 60), <int>(us % 1000000), None)


cdef object _decimal_from_bytes(bytes raw, object arg):
    precision, scale = arg
    unscaled = int.from_bytes(raw, "big", signed=True)
    ctx = _decimal.Context(prec=precision)
    return ctx.create_decimal(unscaled).scaleb(-scale, ctx)


cdef void _fill_view(Py_buffer* view, object owner, char* ptr, Py_ssize_t nbytes,
                     Py_ssize_t itemsize, bytes fmt, int flags,
                     Py_ssize_t* shape, Py_ssize_t* strides) noexcept:
    """A read-only one-dimensional export; ``shape``/``strides`` live in ``owner``."""
    shape[0] = nbytes // itemsize
    strides[0] = itemsize
    view.buf = ptr
    view.obj = owner
    view.len = nbytes
    view.readonly = 1
    view.itemsize = itemsize
    view.format = PyBytes_AS_STRING(fmt) if (flags & PyBUF_FORMAT) else NULL
    view.ndim = 1
    view.shape = shape
    view.strides = strides
    view.suboffsets = NULL
    view.internal = NULL


# no_gc_clear: the garbage collector may clear an exporter before the
# memoryview that releases it; a cleared ``batch`` (None) would then be
# written through in __releasebuffer__.
@cython.no_gc_clear
cdef class _Exporter:
    """A raw memory region of a batch exported through the buffer protocol.

    Holds a reference to its batch and counts as an export, so the batch
    refuses to recycle (and cannot be freed) while a view is alive.
    """
    cdef Batch batch
    cdef char* ptr
    cdef Py_ssize_t nbytes
    cdef Py_ssize_t itemsize
    cdef bytes fmt
    cdef Py_ssize_t shape[1]
    cdef Py_ssize_t strides[1]

    def __getbuffer__(self, Py_buffer* view, int flags):
        _fill_view(view, self, self.ptr, self.nbytes, self.itemsize, self.fmt, flags,
                   self.shape, self.strides)
        self.batch.exports += 1

    def __releasebuffer__(self, Py_buffer* view):
        if self.batch is not None:
            self.batch.exports -= 1


cdef object _export(Batch batch, const void* ptr, Py_ssize_t nbytes, Py_ssize_t itemsize, bytes fmt):
    cdef _Exporter e = _Exporter.__new__(_Exporter)
    e.batch = batch
    # An empty buffer still needs a valid pointer for some consumers.
    e.ptr = <char*>ptr if ptr != NULL else <char*>b""
    e.nbytes = nbytes
    e.itemsize = itemsize
    e.fmt = fmt
    return memoryview(e)


# ---------------------------------------------------------------- Batch

cdef class Batch:
    """Rows decoded from a sequence of payloads, stored column by column.

    ``num_rows`` good rows, in input order; ``errors`` lists the payloads
    that could not be decoded. A batch can be passed back to a decoder
    (``decoder.decode(payloads, out=batch)``) to reuse its buffers.
    """

    def __cinit__(self):
        self.cols = NULL
        self.ncols = 0
        self.num_rows = 0
        self.errors = []
        self.context = None
        self.names = ()
        self.layout = RecordNode(())
        self.objects = []
        self.object_converters = None
        self.exports = 0
        self.spec = None
        self.col_nodes = {}
        self.parents = ()
        self.top_names = ()
        if col_init(&self.source_index, COL_INT32, False) < 0:
            raise MemoryError()

    def __dealloc__(self):
        self._free_columns()
        col_free(&self.source_index)

    cdef void _free_columns(self) noexcept:
        cdef Py_ssize_t k
        if self.cols != NULL:
            for k in range(self.ncols):
                col_free(&self.cols[k])
            free(self.cols)
        self.cols = NULL
        self.ncols = 0

    cdef int setup(self, tuple spec, object layout, object object_converters) except -1:
        cdef Py_ssize_t k, n
        if self.exports:
            raise BufferError(
                "cannot reuse this batch: views of its buffers are still alive "
                "(release the memoryviews, numpy and Arrow arrays over it, "
                "or decode into a new batch)")
        n = len(spec)
        if (self.spec is not None and len(self.spec) > n and self.spec[:n] == spec
                and self.ncols == len(self.spec)):
            # last time extended with Kafka coordinate columns (extend_columns):
            # drop those, keep the decoder's columns and their capacity
            for k in range(n, self.ncols):
                col_free(&self.cols[k])
            self.ncols = n
            self.spec = spec
            self.names = self.names[:n]
        if spec == self.spec:
            for k in range(n):
                col_reset(&self.cols[k])
        else:
            self._free_columns()
            self.cols = <Column*>calloc(n if n else 1, sizeof(Column))
            if self.cols == NULL:
                raise MemoryError()
            self.ncols = n
            for k in range(n):
                name, kind, nullable = spec[k]
                if col_init(&self.cols[k], kind, nullable) < 0:
                    raise MemoryError()
            self.spec = spec
            self.names = tuple(s[0] for s in spec)
        if layout is not self.layout:
            self.layout = layout
            self._index_layout()
        self.object_converters = object_converters
        self.objects = [None] * n
        col_reset(&self.source_index)
        self.num_rows = 0
        self.errors = []
        self.context = None
        return 0

    def extend_columns(self, tuple extra_spec, tuple extra_fields):
        """Append empty columns ``extra_spec`` ((name, kind, nullable), ...) and
        top-level layout fields ``extra_fields`` ((name, node), ...) reading them,
        after decoding (the Kafka coordinate columns). The next ``setup`` by the
        same decoder drops them again and recycles the rest."""
        cdef Py_ssize_t k, m = len(extra_spec), n = self.ncols
        cdef Column* p
        if self.exports:
            raise BufferError("cannot extend a batch with live buffer exports")
        if not isinstance(self.layout, RecordNode):
            raise TypeError("only a batch of records can take extra columns")
        for extra in extra_spec:
            if extra[0] in self.names:
                raise ValueError(f"column {extra[0]!r} already exists in the batch")
        p = <Column*>realloc(self.cols, (n + m if n + m else 1) * sizeof(Column))
        if p == NULL:
            raise MemoryError()
        self.cols = p
        for k in range(m):
            name, kind, nullable = extra_spec[k]
            if col_init(&self.cols[n + k], kind, nullable) < 0:
                raise MemoryError()
            self.ncols = n + k + 1
        self.spec = (self.spec or ()) + extra_spec
        self.names = self.names + tuple(s[0] for s in extra_spec)
        self.objects = list(self.objects) + [None] * m
        if self.object_converters is not None:
            self.object_converters = tuple(self.object_converters) + (None,) * m
        self.layout = RecordNode(self.layout.fields + extra_fields, self.layout.valid_col)
        self._index_layout()
        return n

    cdef _index_layout(self):
        nodes = {}
        parents = [-1] * self.ncols
        top = []

        def visit(node, parent, path_is_top):
            if isinstance(node, ValueNode):
                if node.col >= 0:
                    nodes[node.col] = node
                    parents[node.col] = parent
                    if path_is_top:
                        top.append(self.names[node.col])
            elif isinstance(node, ObjectNode):
                nodes[node.col] = node
                parents[node.col] = parent
                if path_is_top:
                    top.append(self.names[node.col])
            elif isinstance(node, ListNode):
                nodes[node.col] = node
                parents[node.col] = parent
                if path_is_top:
                    top.append(self.names[node.col])
                visit(node.item, node.col, False)
            elif isinstance(node, MapNode):
                nodes[node.col] = node
                parents[node.col] = parent
                if path_is_top:
                    top.append(self.names[node.col])
                visit(node.key, node.col, False)
                visit(node.value, node.col, False)
            elif isinstance(node, RecordNode):
                if node.valid_col >= 0:
                    nodes[node.valid_col] = node
                    parents[node.valid_col] = parent
                for _, child in node.fields:
                    visit(child, parent, path_is_top)
            else:
                raise TypeError(f"unknown layout node {node!r}")

        visit(self.layout, -1, True)
        self.col_nodes = nodes
        self.parents = tuple(parents)
        self.top_names = tuple(top)

    cdef void begin_row_checkpoint(self, Py_ssize_t* saved) noexcept nogil:
        cdef Py_ssize_t k
        for k in range(self.ncols):
            saved[k] = self.cols[k].length
        saved[self.ncols] = self.source_index.length

    cdef void rollback(self, const Py_ssize_t* saved) noexcept nogil:
        cdef Py_ssize_t k
        for k in range(self.ncols):
            col_truncate(&self.cols[k], saved[k])
        col_truncate(&self.source_index, saved[self.ncols])

    cdef int finish(self) except -1:
        cdef Py_ssize_t k, i
        cdef Column* c
        cdef int32_t* offs
        for k in range(self.ncols):
            c = &self.cols[k]
            if c.kind != COL_OBJECT:
                continue
            if c.null_count == c.length:
                self.objects[k] = [None] * c.length
                continue
            convert = self.object_converters[k] if self.object_converters is not None else None
            offs = <int32_t*>c.offsets.data
            values = []
            for i in range(c.length):
                if not col_is_valid(c, i):
                    values.append(None)
                    continue
                raw = PyBytes_FromStringAndSize(<char*>c.values.data + offs[i], offs[i + 1] - offs[i])
                values.append(convert(raw) if convert is not None else raw)
            self.objects[k] = values
        return 0

    # ------------------------------------------------------------ Python API

    def __len__(self):
        return self.num_rows

    def __repr__(self):
        return (f"<kfast.Batch rows={self.num_rows} errors={len(self.errors)} "
                f"columns={list(self.top_names)}>")

    @property
    def column_names(self):
        """Names of the row's columns: dotted for nested records; list and map
        columns by their own name (their children are ``name.item``,
        ``name.key``, ``name.value``)."""
        return list(self.top_names)

    @property
    def source_indices(self):
        """For each good row, the position of its payload in the input (int32)."""
        return _export(self, self.source_index.values.data, self.source_index.values.len, 4, b"i")

    def column(self, name):
        """A zero-copy view of one column (see ``ColumnView``)."""
        try:
            k = self.names.index(name)
        except ValueError:
            raise KeyError(f"no column {name!r}; columns: {list(self.names)}") from None
        cdef ColumnView view = ColumnView.__new__(ColumnView)
        view.batch = self
        view.index = k
        return view

    def to_pylist(self):
        """One ``dict`` per good row, with Python values (see ``_layout``)."""
        # The containers built here cannot form reference cycles, but building
        # hundreds of thousands of them triggers full collections that walk
        # everything just built (a third of the time without this).
        was_enabled = _gc.isenabled()
        _gc.disable()
        try:
            return self._node_values(self.layout, 0, self.num_rows)
        finally:
            if was_enabled:
                _gc.enable()

    def slice(self, Py_ssize_t start, Py_ssize_t stop):
        """A new batch holding a copy of rows ``[start, stop)`` (same context)."""
        cdef Batch out = Batch.__new__(Batch)
        cdef Py_ssize_t k, p, base
        if start < 0 or stop > self.num_rows or start > stop:
            raise IndexError(f"slice [{start}, {stop}) out of range for {self.num_rows} rows")
        out.setup(self.spec if self.spec is not None else (), self.layout, self.object_converters)
        # Slot range of every column; parents precede their children in the spec.
        lo = [start] * self.ncols
        hi = [stop] * self.ncols
        for k in range(self.ncols):
            if k not in self.col_nodes:
                continue  # hidden source of a derived column (Protobuf well-known types)
            p = self.parents[k]
            if p >= 0:
                lo[k] = col_offset(&self.cols[p], lo[p])
                hi[k] = col_offset(&self.cols[p], hi[p])
            base = col_offset(&self.cols[k], lo[k]) if self.cols[k].kind == COL_LIST else 0
            if _copy_slots(&self.cols[k], &out.cols[k], lo[k], hi[k], base) < 0:
                raise MemoryError()
            if self.objects[k] is not None:
                out.objects[k] = self.objects[k][lo[k]:hi[k]]
        if _copy_slots(&self.source_index, &out.source_index, start, stop, 0) < 0:
            raise MemoryError()
        out.num_rows = stop - start
        out.errors = []
        out.context = self.context
        return out

    def to_arrow(self):
        """A ``pyarrow.RecordBatch`` over the batch's buffers (``pyarrow.record_batch(batch)``)."""
        return batch_to_arrow(self)

    # Arrow PyCapsule interface (kfast._arrow_c): the batch is a struct array
    # of its top-level columns; its buffers are shared, not copied, and the
    # batch refuses recycling until every exported array is released.
    # kfast._arrow_c is imported on use: it cimports Batch, so it imports this module.

    def __arrow_c_schema__(self):
        from kfast._arrow_c import export_schema
        return export_schema(self)

    def __arrow_c_array__(self, requested_schema=None):
        from kfast._arrow_c import export_array
        return export_array(self)

    def __arrow_c_stream__(self, requested_schema=None):
        from kfast._arrow_c import export_stream
        return export_stream(self)

    # ------------------------------------------------------------ to_pylist

    cdef list _node_values(self, node, Py_ssize_t start, Py_ssize_t stop):
        cdef Py_ssize_t i, n = stop - start
        cdef Column* c
        cdef int32_t* offs
        cdef Py_ssize_t base
        if isinstance(node, ValueNode):
            if node.col < 0:
                return [None] * n
            return _column_values(&self.cols[node.col], node.conv, node.arg, start, stop)
        if isinstance(node, RecordNode):
            return self._record_values(node, start, stop)
        if isinstance(node, ObjectNode):
            return list(self.objects[node.col][start:stop])
        if isinstance(node, ListNode) or isinstance(node, MapNode):
            c = &self.cols[node.col]
            offs = <int32_t*>c.offsets.data
            base = offs[start]
            if isinstance(node, ListNode):
                items = self._node_values(node.item, base, offs[stop])
            else:
                keys = self._node_values(node.key, base, offs[stop])
                vals = self._node_values(node.value, base, offs[stop])
            out = []
            for i in range(start, stop):
                if not col_is_valid(c, i):
                    out.append(None)
                elif isinstance(node, ListNode):
                    out.append(items[offs[i] - base:offs[i + 1] - base])
                else:
                    out.append(dict(zip(keys[offs[i] - base:offs[i + 1] - base],
                                        vals[offs[i] - base:offs[i + 1] - base])))
            return out
        raise TypeError(f"unknown layout node {node!r}")

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef list _record_values(self, node, Py_ssize_t start, Py_ssize_t stop):
        cdef Py_ssize_t i, f, nfields
        cdef Py_ssize_t n = stop - start
        cdef Column* valid = NULL
        cdef dict row
        cdef list names = [name for name, _ in node.fields]
        cdef list columns = [self._node_values(child, start, stop) for _, child in node.fields]
        cdef list out = [None] * n
        cdef PyObject** cols
        nfields = len(names)
        if node.valid_col >= 0:
            valid = &self.cols[node.valid_col]
        cols = <PyObject**>malloc((nfields or 1) * sizeof(PyObject*))
        if cols == NULL:
            raise MemoryError()
        try:
            for f in range(nfields):
                cols[f] = <PyObject*>columns[f]
            for i in range(n):
                if valid != NULL and not col_is_valid(valid, start + i):
                    continue
                row = {}
                for f in range(nfields):
                    # Each field list has exactly n items (built above).
                    PyDict_SetItem(row, <object>PyList_GET_ITEM(names, f),
                                   <object>PyList_GET_ITEM(<object>cols[f], i))
                out[i] = row
        finally:
            free(cols)
        return out


cdef int _copy_slots(Column* src, Column* dst, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t child_base) noexcept nogil:
    """Append slots ``[lo, hi)`` of ``src`` to ``dst`` (same kind)."""
    cdef Py_ssize_t i, a, b
    cdef int32_t* offs
    cdef int32_t end
    if src.nullable:
        for i in range(lo, hi):
            if col_mark(dst, col_is_valid(src, i)) < 0:
                return -1
            # col_mark does not advance length; do it per slot below.
            if src.kind == COL_STRUCT:
                dst.length += 1
            elif kind_has_offsets(src.kind):
                offs = <int32_t*>src.offsets.data
                if src.kind == COL_LIST:
                    end = offs[i + 1] - <int32_t>child_base
                    if col_end_offset(dst, end) < 0:
                        return -1
                else:
                    if buf_append(&dst.values, src.values.data + offs[i], offs[i + 1] - offs[i]) < 0:
                        return -1
                    if col_end_offset(dst, dst.values.len) < 0:
                        return -1
                dst.length += 1
            else:
                if buf_append(&dst.values, src.values.data + i * src.width, src.width) < 0:
                    return -1
                dst.length += 1
        return 0
    if src.kind == COL_STRUCT:
        dst.length += hi - lo
        return 0
    if kind_has_offsets(src.kind):
        offs = <int32_t*>src.offsets.data
        if src.kind != COL_LIST:
            a = offs[lo]
            b = offs[hi]
            if buf_append(&dst.values, src.values.data + a, b - a) < 0:
                return -1
            child_base = a
        for i in range(lo, hi):
            if col_end_offset(dst, offs[i + 1] - child_base) < 0:
                return -1
        dst.length += hi - lo
        return 0
    if buf_append(&dst.values, src.values.data + lo * src.width, (hi - lo) * src.width) < 0:
        return -1
    dst.length += hi - lo
    return 0


cdef enum IntConv:
    _IC_INT, _IC_UINT32, _IC_UINT64, _IC_TS_MILLIS, _IC_TS_MICROS, _IC_DATE, _IC_TIME_MILLIS, _IC_TIME_MICROS
    _IC_DURATION_MICROS

_INT_CONVS = {
    "int": _IC_INT,
    "uint32": _IC_UINT32,
    "uint64": _IC_UINT64,
    "timestamp-millis": _IC_TS_MILLIS,
    "local-timestamp-millis": _IC_TS_MILLIS,
    "timestamp-micros": _IC_TS_MICROS,
    "local-timestamp-micros": _IC_TS_MICROS,
    "date": _IC_DATE,
    "time-millis": _IC_TIME_MILLIS,
    "time-micros": _IC_TIME_MICROS,
    "duration-micros": _IC_DURATION_MICROS,
}


@cython.boundscheck(False)
@cython.wraparound(False)
cdef list _column_values(Column* c, str conv, object arg, Py_ssize_t start, Py_ssize_t stop):
    """Python values of slots ``[start, stop)`` converted as ``conv`` says."""
    cdef Py_ssize_t i, n = stop - start
    cdef list out = [None] * n
    cdef bint nullable = c.nullable
    cdef const uint8_t* u8 = <const uint8_t*>c.values.data
    cdef const int32_t* i32 = <const int32_t*>c.values.data
    cdef const int64_t* i64 = <const int64_t*>c.values.data
    cdef const float* f32 = <const float*>c.values.data
    cdef const double* f64 = <const double*>c.values.data
    cdef const int32_t* offs = <const int32_t*>c.offsets.data
    cdef const char* data = <const char*>c.values.data
    cdef int64_t v
    cdef int kind = c.kind
    cdef object tz = None
    cdef Py_ssize_t nsym = 0
    cdef bint is_text = conv == "str" or conv == "uuid"

    if conv == "enum":
        if isinstance(arg, dict):
            for i in range(n):
                if nullable and not col_is_valid(c, start + i):
                    continue
                v = i32[start + i]
                out[i] = arg.get(v, v)
            return out
        nsym = len(arg)
        for i in range(n):
            if nullable and not col_is_valid(c, start + i):
                continue
            v = i32[start + i]
            out[i] = arg[v] if 0 <= v < nsym else v
        return out

    if kind == COL_BINARY or kind == COL_OBJECT:
        for i in range(n):
            if nullable and not col_is_valid(c, start + i):
                continue
            if is_text:
                out[i] = PyUnicode_DecodeUTF8(data + offs[start + i],
                                              offs[start + i + 1] - offs[start + i], "strict")
            else:
                out[i] = PyBytes_FromStringAndSize(data + offs[start + i],
                                                   offs[start + i + 1] - offs[start + i])
        if conv == "uuid":
            for i in range(n):
                if out[i] is not None:
                    out[i] = _uuid.UUID(out[i])
        elif conv == "uuid-bytes":
            for i in range(n):
                if out[i] is not None:
                    out[i] = _uuid.UUID(bytes=out[i])
        elif conv == "decimal":
            for i in range(n):
                if out[i] is not None:
                    out[i] = _decimal_from_bytes(out[i], arg)
        return out

    if kind == COL_BOOL:
        for i in range(n):
            if nullable and not col_is_valid(c, start + i):
                continue
            out[i] = u8[start + i] != 0
        return out
    if kind == COL_FLOAT32:
        for i in range(n):
            if nullable and not col_is_valid(c, start + i):
                continue
            out[i] = <double>f32[start + i]
        return out
    if kind == COL_FLOAT64:
        for i in range(n):
            if nullable and not col_is_valid(c, start + i):
                continue
            out[i] = f64[start + i]
        return out

    if kind != COL_INT32 and kind != COL_INT64:
        raise TypeError(f"conversion {conv!r} does not apply to a {_KIND_NAMES.get(kind)} column")

    if conv == "timestamp-millis" or conv == "timestamp-micros":
        tz = _UTC
    # Resolve the conversion once, not per value.
    cdef int code = _INT_CONVS.get(conv, _IC_INT)
    for i in range(n):
        if nullable and not col_is_valid(c, start + i):
            continue
        v = i32[start + i] if kind == COL_INT32 else i64[start + i]
        if code == _IC_INT:
            # also the logical types the reference returns as plain integers
            # (timestamp-nanos, local-timestamp-nanos with fastavro 1.x)
            out[i] = v
        elif code == _IC_UINT32:
            out[i] = <uint32_t>v
        elif code == _IC_UINT64:
            out[i] = <uint64_t>v
        elif code == _IC_TS_MILLIS:
            out[i] = _datetime_from_micros(v * 1000, tz)
        elif code == _IC_TS_MICROS:
            out[i] = _datetime_from_micros(v, tz)
        elif code == _IC_DATE:
            out[i] = _date_from_days(v)
        elif code == _IC_TIME_MILLIS:
            out[i] = _time_from_micros(v * 1000)
        elif code == _IC_DURATION_MICROS:
            out[i] = _dt.timedelta(microseconds=v)
        else:
            out[i] = _time_from_micros(v)
    return out


# ---------------------------------------------------------------- ColumnView

@cython.no_gc_clear  # released by memoryviews, like _Exporter
cdef class ColumnView:
    """Zero-copy view of one column of a Batch.

    Fixed-width columns support the buffer protocol directly
    (``memoryview(batch.column("price"))``, ``numpy.asarray(...)``). Binary
    and list columns expose ``offsets`` (int32, length + 1) and ``values``
    (bytes, or the child column for lists); nullable columns expose
    ``validity``, an Arrow-style LSB-first bitmap (1 = present).
    """
    cdef Batch batch
    cdef Py_ssize_t index
    cdef bytes fmt
    cdef Py_ssize_t shape[1]
    cdef Py_ssize_t strides[1]

    @property
    def name(self):
        return self.batch.names[self.index]

    @property
    def kind(self):
        return _KIND_NAMES[self.batch.cols[self.index].kind]

    @property
    def nullable(self):
        return bool(self.batch.cols[self.index].nullable)

    @property
    def null_count(self):
        return self.batch.cols[self.index].null_count

    def __len__(self):
        return self.batch.cols[self.index].length

    @property
    def values(self):
        cdef Column* c = &self.batch.cols[self.index]
        if c.kind in _KIND_FORMATS:
            return _export(self.batch, c.values.data, c.length * c.width, c.width, _KIND_FORMATS[c.kind])
        if c.kind == COL_BINARY or c.kind == COL_OBJECT:
            return _export(self.batch, c.values.data, c.values.len, 1, b"B")
        return None

    @property
    def offsets(self):
        cdef Column* c = &self.batch.cols[self.index]
        if not kind_has_offsets(c.kind):
            return None
        return _export(self.batch, c.offsets.data, (c.length + 1) * 4, 4, b"i")

    @property
    def validity(self):
        cdef Column* c = &self.batch.cols[self.index]
        if not c.nullable:
            return None
        return _export(self.batch, c.validity.data, (c.length + 7) // 8, 1, b"B")

    def is_valid(self, Py_ssize_t i):
        cdef Column* c = &self.batch.cols[self.index]
        if i < 0 or i >= c.length:
            raise IndexError(i)
        return bool(col_is_valid(c, i))

    def to_pylist(self):
        """Python values of this column's slots, converted like ``Batch.to_pylist``."""
        node = self.batch.col_nodes.get(self.index)
        n = self.batch.cols[self.index].length
        if node is None:
            return _column_values(&self.batch.cols[self.index], "int" if self.kind.startswith("int") else
                                  ("str" if self.kind == "binary" else self.kind), None, 0, n)
        if isinstance(node, RecordNode):
            return [bool(col_is_valid(&self.batch.cols[self.index], i)) for i in range(n)]
        return self.batch._node_values(node, 0, n)

    def __getbuffer__(self, Py_buffer* view, int flags):
        cdef Column* c = &self.batch.cols[self.index]
        if c.kind not in _KIND_FORMATS:
            raise BufferError(self._no_buffer())
        self.fmt = _KIND_FORMATS[c.kind]
        _fill_view(view, self, <char*>c.values.data if c.values.data != NULL else <char*>b"",
                   c.length * c.width, c.width, self.fmt, flags, self.shape, self.strides)
        self.batch.exports += 1

    def __releasebuffer__(self, Py_buffer* view):
        if self.batch is not None:
            self.batch.exports -= 1

    def _no_buffer(self):
        return (f"column {self.name!r} is {self.kind}: it has no single values buffer; "
                f"use .offsets (int32, n + 1) and .values, or pyarrow.table(batch)")

    def __array__(self, dtype=None, copy=None):
        # numpy falls back to __array__ when the buffer protocol refuses and
        # would otherwise wrap the view in a 0-d object array.
        if self.batch.cols[self.index].kind not in _KIND_FORMATS:
            raise TypeError(self._no_buffer())
        import numpy
        arr = numpy.asarray(memoryview(self))
        if dtype is not None:
            arr = arr.astype(dtype, copy=False)
        return arr.copy() if copy else arr

    def __repr__(self):
        return f"<kfast.ColumnView {self.name!r} {self.kind} len={len(self)}>"


# ---------------------------------------------------------------- decoders

cdef class BaseDecoder:
    """Base of the compiled decoders: ``decode(payloads)`` -> ``Batch``."""

    cdef int decode_spans(self, const unsigned char** ptrs, const Py_ssize_t* lens,
                          Py_ssize_t n, Batch out) except -1:
        raise NotImplementedError

    def decode(self, payloads, Batch out=None):
        """Decode a sequence of bytes-like payloads into a Batch.

        Pass a previous batch as ``out`` to reuse its buffers (the batch is
        emptied first; views of its old buffers must have been released).
        """
        cdef Py_ssize_t n = len(payloads)
        cdef Py_ssize_t i, nviews = 0
        cdef const unsigned char** ptrs = NULL
        cdef Py_ssize_t* lens = NULL
        cdef Py_buffer* views = NULL
        if out is None:
            out = Batch.__new__(Batch)
        if not isinstance(payloads, (list, tuple)):
            payloads = list(payloads)
        ptrs = <const unsigned char**>malloc((n if n else 1) * sizeof(void*))
        lens = <Py_ssize_t*>malloc((n if n else 1) * sizeof(Py_ssize_t))
        views = <Py_buffer*>malloc((n if n else 1) * sizeof(Py_buffer))
        try:
            if ptrs == NULL or lens == NULL or views == NULL:
                raise MemoryError()
            for i in range(n):
                p = payloads[i]
                if PyBytes_Check(p):
                    ptrs[i] = <const unsigned char*>PyBytes_AS_STRING(p)
                    lens[i] = PyBytes_GET_SIZE(p)
                    continue
                if p is None:
                    raise TypeError(f"payload {i} is None (a tombstone has no value to decode)")
                PyObject_GetBuffer(p, &views[nviews], PyBUF_SIMPLE)
                ptrs[i] = <const unsigned char*>views[nviews].buf
                lens[i] = views[nviews].len
                nviews += 1
            self.decode_spans(ptrs, lens, n, out)
        finally:
            for i in range(nviews):
                PyBuffer_Release(&views[i])
            free(ptrs)
            free(lens)
            free(views)
        return out
