# cython: language_level=3
"""Arrow C Data / C Stream interface export of a Batch.

``export_capsules(batch)`` builds ``ArrowSchema`` / ``ArrowArray`` structs
(https://arrow.apache.org/docs/format/CDataInterface.html) whose buffers
point straight into the batch's columns: validity bitmaps, int32 offsets,
fixed-width values, string bytes. Only three shapes are converted, in C, into
buffers owned by the export: booleans (kfast keeps a byte per value, Arrow a
bit), decimals (big-endian two's complement bytes -> little-endian 128/256-bit
integers) and enums whose numbers are not dense indices (Protobuf). OBJECT
columns hold Python objects and are converted by pyarrow (``kfast._arrow``),
then moved into the tree.

Lifetime: every exported node holds a reference to one ``_Keep`` object,
which holds the batch and counts as one buffer export until the last node is
released, so the batch refuses ``decode(out=batch)`` (``BufferError``) while
any exported array is alive, exactly as it does for memoryviews.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.pycapsule cimport PyCapsule_Destructor, PyCapsule_GetPointer, PyCapsule_New
from cpython.ref cimport Py_DECREF, Py_INCREF, PyObject
from libc.stdint cimport int32_t, int64_t, uint8_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset, strlen

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
    col_is_valid,
)

from kfast._arrow import object_array
from kfast._layout import ListNode, MapNode, ObjectNode, RecordNode, ValueNode


cdef extern from *:
    """
    #ifndef ARROW_C_DATA_INTERFACE
    #define ARROW_C_DATA_INTERFACE
    #define ARROW_FLAG_DICTIONARY_ORDERED 1
    #define ARROW_FLAG_NULLABLE 2
    #define ARROW_FLAG_MAP_KEYS_SORTED 4
    struct ArrowSchema {
      const char* format;
      const char* name;
      const char* metadata;
      int64_t flags;
      int64_t n_children;
      struct ArrowSchema** children;
      struct ArrowSchema* dictionary;
      void (*release)(struct ArrowSchema*);
      void* private_data;
    };
    struct ArrowArray {
      int64_t length;
      int64_t null_count;
      int64_t offset;
      int64_t n_buffers;
      int64_t n_children;
      const void** buffers;
      struct ArrowArray** children;
      struct ArrowArray* dictionary;
      void (*release)(struct ArrowArray*);
      void* private_data;
    };
    #endif
    #ifndef ARROW_C_STREAM_INTERFACE
    #define ARROW_C_STREAM_INTERFACE
    struct ArrowArrayStream {
      int (*get_schema)(struct ArrowArrayStream*, struct ArrowSchema* out);
      int (*get_next)(struct ArrowArrayStream*, struct ArrowArray* out);
      const char* (*get_last_error)(struct ArrowArrayStream*);
      void (*release)(struct ArrowArrayStream*);
      void* private_data;
    };
    #endif
    /* Non-null pointer for empty buffers (some consumers dereference it). */
    static int64_t kfast_arrow_empty[4] = {0, 0, 0, 0};
    """
    int64_t ARROW_FLAG_NULLABLE
    int64_t kfast_arrow_empty[4]

    struct ArrowSchema:
        const char* format
        const char* name
        const char* metadata
        int64_t flags
        int64_t n_children
        ArrowSchema** children
        ArrowSchema* dictionary
        void (*release)(ArrowSchema*) noexcept nogil
        void* private_data

    struct ArrowArray:
        int64_t length
        int64_t null_count
        int64_t offset
        int64_t n_buffers
        int64_t n_children
        const void** buffers
        ArrowArray** children
        ArrowArray* dictionary
        void (*release)(ArrowArray*) noexcept nogil
        void* private_data

    struct ArrowArrayStream:
        int (*get_schema)(ArrowArrayStream*, ArrowSchema*) noexcept nogil
        int (*get_next)(ArrowArrayStream*, ArrowArray*) noexcept nogil
        const char* (*get_last_error)(ArrowArrayStream*) noexcept nogil
        void (*release)(ArrowArrayStream*) noexcept nogil
        void* private_data


# ---------------------------------------------------------------- keeper

@cython.no_gc_clear  # __dealloc__ must still see its batch to release the export
cdef class _Keep:
    """Holds the batch (one export) and the buffers converted for an export."""
    cdef Batch batch
    cdef list owned

    def __dealloc__(self):
        if self.batch is not None:
            self.batch.exports -= 1


# ---------------------------------------------------------------- plan

cdef class _Node:
    """One Arrow array of the export, before it is written into C structs."""
    cdef bytes format
    cdef bytes name
    cdef bytes metadata          # encoded per the C data interface, or None
    cdef int64_t flags
    cdef int64_t length
    cdef int64_t null_count
    cdef list buffers            # addresses (int), 0 = NULL
    cdef list children           # list[_Node]
    cdef _Node dictionary
    cdef object foreign          # a pyarrow Array moved in instead of buffers


cdef inline Py_ssize_t _addr(const void* p):
    return <Py_ssize_t>p


cdef _Node _node(bytes fmt, bytes name, bint nullable, int64_t length, int64_t nulls, list buffers):
    cdef _Node n = _Node.__new__(_Node)
    n.format = fmt
    n.name = name
    n.metadata = None
    n.flags = ARROW_FLAG_NULLABLE if nullable else 0
    n.length = length
    n.null_count = nulls
    n.buffers = buffers
    n.children = []
    n.dictionary = None
    n.foreign = None
    return n


cdef bytes _owned(_Keep keep, Py_ssize_t nbytes):
    """A zeroed buffer the export owns (kept alive by ``keep``)."""
    cdef bytes b = PyBytes_FromStringAndSize(NULL, nbytes)
    memset(PyBytes_AS_STRING(b), 0, nbytes)
    keep.owned.append(b)
    return b


cdef Py_ssize_t _validity(Column* c):
    if not c.nullable or c.null_count == 0:
        return 0
    return _addr(c.validity.data)


cdef Py_ssize_t _data(const void* p):
    return _addr(p) if p != NULL else _addr(kfast_arrow_empty)


_FIXED = {
    (COL_INT32, "int"): b"i",
    (COL_INT32, "uint32"): b"I",
    (COL_INT32, "date"): b"tdD",
    (COL_INT32, "time-millis"): b"ttm",
    (COL_INT64, "int"): b"l",
    (COL_INT64, "uint64"): b"L",
    (COL_INT64, "time-micros"): b"ttu",
    (COL_INT64, "duration-micros"): b"tDu",
    (COL_INT64, "timestamp-millis"): b"tsm:UTC",
    (COL_INT64, "timestamp-micros"): b"tsu:UTC",
    (COL_INT64, "local-timestamp-millis"): b"tsm:",
    (COL_INT64, "local-timestamp-micros"): b"tsu:",
    (COL_FLOAT32, "float"): b"f",
    (COL_FLOAT64, "float"): b"g",
}
_PHYSICAL = {COL_INT32: b"i", COL_INT64: b"l", COL_FLOAT32: b"f", COL_FLOAT64: b"g"}


cdef class _Planner:
    cdef Batch batch
    cdef _Keep keep

    cdef _Node node(self, object layout, bytes name, int64_t length, bint nullable):
        if isinstance(layout, ValueNode):
            return self.value(layout, name, length)
        if isinstance(layout, RecordNode):
            return self.record(layout, name, length)
        if isinstance(layout, ListNode):
            return self.list_(layout, name)
        if isinstance(layout, MapNode):
            return self.map_(layout, name)
        if isinstance(layout, ObjectNode):
            return self.object_(layout, name)
        raise TypeError(f"unknown layout node {layout!r}")

    cdef _Node record(self, object layout, bytes name, int64_t length):
        cdef Column* v = NULL
        cdef _Node out
        if layout.valid_col >= 0:
            v = &self.batch.cols[layout.valid_col]
            length = v.length
            out = _node(b"+s", name, True, length, v.null_count, [_validity(v)])
        else:
            out = _node(b"+s", name, False, length, 0, [0])
        for fname, child in layout.fields:
            out.children.append(self.node(child, fname.encode(), length, True))
        return out

    cdef _Node list_(self, object layout, bytes name):
        cdef Column* c = &self.batch.cols[layout.col]
        cdef int64_t n_items = (<int32_t*>c.offsets.data)[c.length]
        cdef _Node out = _node(b"+l", name, c.nullable, c.length, c.null_count,
                               [_validity(c), _data(c.offsets.data)])
        out.children.append(self.node(layout.item, b"item", n_items, True))
        return out

    cdef _Node map_(self, object layout, bytes name):
        cdef Column* c = &self.batch.cols[layout.col]
        cdef int64_t n_items = (<int32_t*>c.offsets.data)[c.length]
        cdef _Node out = _node(b"+m", name, c.nullable, c.length, c.null_count,
                               [_validity(c), _data(c.offsets.data)])
        cdef _Node entries = _node(b"+s", b"entries", False, n_items, 0, [0])
        key = self.node(layout.key, b"key", n_items, False)
        key.flags = 0   # map keys are never null
        entries.children.append(key)
        entries.children.append(self.node(layout.value, b"value", n_items, True))
        out.children.append(entries)
        return out

    cdef _Node object_(self, object layout, bytes name):
        cdef _Node out = _node(b"", name, True, 0, 0, [])
        convs = self.batch.object_converters
        out.foreign = object_array(self.batch.objects[layout.col],
                                   convs[layout.col] if convs is not None else None)
        out.length = len(out.foreign)
        return out

    cdef _Node value(self, object layout, bytes name, int64_t length):
        cdef Column* c
        cdef str conv = layout.conv
        if layout.col < 0:
            return _node(b"n", name, True, length, length, [])
        c = &self.batch.cols[layout.col]
        length = c.length
        if conv == "enum":
            return self.enum(c, layout.arg, name)
        if conv == "decimal":
            return self.decimal(c, layout.arg, name)
        if c.kind == COL_BINARY or c.kind == COL_OBJECT:
            fmt = b"u" if conv in ("str", "uuid") else b"z"
            return _node(fmt, name, c.nullable, length, c.null_count,
                         [_validity(c), _data(c.offsets.data), _data(c.values.data)])
        if c.kind == COL_BOOL:
            return self.bools(c, name)
        if c.kind == COL_STRUCT:
            raise TypeError(f"column {self.batch.names[layout.col]!r}: a struct column has no values")
        fmt = _FIXED.get((c.kind, conv)) or _PHYSICAL[c.kind]
        return _node(fmt, name, c.nullable, length, c.null_count,
                     [_validity(c), _data(c.values.data)])

    cdef _Node bools(self, Column* c, bytes name):
        cdef Py_ssize_t i, n = c.length
        cdef bytes bits = _owned(self.keep, (n + 7) // 8)
        cdef uint8_t* out = <uint8_t*>PyBytes_AS_STRING(bits)
        cdef const uint8_t* src = <const uint8_t*>c.values.data
        with nogil:
            for i in range(n):
                if src[i]:
                    out[i >> 3] |= <uint8_t>(1 << (i & 7))
        return _node(b"b", name, c.nullable, n, c.null_count, [_validity(c), _addr(out)])

    cdef _Node decimal(self, Column* c, object arg, bytes name):
        precision, scale = arg
        cdef int width = 16 if precision <= 38 else 32
        cdef Py_ssize_t i, j, n = c.length, ln
        cdef bytes out = _owned(self.keep, n * width)
        cdef uint8_t* dst = <uint8_t*>PyBytes_AS_STRING(out)
        cdef const uint8_t* data = <const uint8_t*>c.values.data
        cdef const int32_t* offs = <const int32_t*>c.offsets.data
        cdef const uint8_t* p
        cdef uint8_t fill
        cdef bint overflow = False
        with nogil:
            for i in range(n):
                p = data + offs[i]
                ln = offs[i + 1] - offs[i]
                if ln == 0:
                    continue
                fill = 0xFF if p[0] & 0x80 else 0
                # Leading sign-extension bytes beyond the target width are redundant.
                while ln > width and p[0] == fill:
                    p += 1
                    ln -= 1
                if ln > width:
                    overflow = True
                    break
                # big-endian source -> little-endian, sign-extended
                for j in range(ln):
                    dst[i * width + j] = p[ln - 1 - j]
                for j in range(ln, width):
                    dst[i * width + j] = fill
        if overflow:
            raise ValueError(f"decimal column {name.decode()!r}: a value exceeds {width * 8} bits")
        fmt = f"d:{precision},{scale}{',256' if width == 32 else ''}".encode()
        return _node(fmt, name, c.nullable, n, c.null_count, [_validity(c), _addr(dst)])

    cdef _Node enum(self, Column* c, object arg, bytes name):
        """Dictionary<int32, string>. Avro indices are used in place; Protobuf
        numbers (and any index outside the symbols) are remapped into a copy,
        an unknown number becoming a dictionary entry of its decimal text."""
        cdef Py_ssize_t i, n = c.length, k, lo, hi, mid, nsym
        cdef const int32_t* src = <const int32_t*>c.values.data
        cdef bint dense = not isinstance(arg, dict)
        cdef bint in_range = True
        cdef int32_t v
        cdef int32_t* numbers
        cdef int32_t* dst
        if dense:
            names = [str(s) for s in arg]
            numbers_list = list(range(len(names)))
        else:
            items = sorted(arg.items())
            numbers_list = [num for num, _ in items]
            names = [str(s) for _, s in items]
        nsym = len(names)
        if dense:
            with nogil:
                for i in range(n):
                    if (src[i] < 0 or src[i] >= nsym) and col_is_valid(c, i):
                        in_range = False
                        break
        if dense and in_range:
            out = _node(b"i", name, c.nullable, n, c.null_count, [_validity(c), _data(src)])
            out.dictionary = self.strings(names)
            return out
        nums = _owned(self.keep, (nsym or 1) * 4)
        numbers = <int32_t*>PyBytes_AS_STRING(nums)
        for k in range(nsym):
            numbers[k] = numbers_list[k]
        idx = _owned(self.keep, (n or 1) * 4)
        dst = <int32_t*>PyBytes_AS_STRING(idx)
        extra = {}
        for i in range(n):
            if not col_is_valid(c, i):
                continue
            v = src[i]
            lo = 0
            hi = nsym
            while lo < hi:   # binary search over the sorted numbers
                mid = (lo + hi) >> 1
                if numbers[mid] < v:
                    lo = mid + 1
                else:
                    hi = mid
            if lo < nsym and numbers[lo] == v:
                dst[i] = <int32_t>lo
            else:
                dst[i] = <int32_t>extra.setdefault(v, nsym + len(extra))
        out = _node(b"i", name, c.nullable, n, c.null_count, [_validity(c), _addr(dst)])
        out.dictionary = self.strings(names + [str(x) for x in extra])
        return out

    cdef _Node strings(self, list values):
        """A string array the export owns (enum dictionaries)."""
        cdef Py_ssize_t i, n = len(values), pos = 0
        encoded = [s.encode() for s in values]
        offs = _owned(self.keep, (n + 1) * 4)
        data = _owned(self.keep, sum(len(e) for e in encoded) or 1)
        cdef int32_t* o = <int32_t*>PyBytes_AS_STRING(offs)
        cdef char* d = PyBytes_AS_STRING(data)
        for i in range(n):
            memcpy(d + pos, PyBytes_AS_STRING(encoded[i]), PyBytes_GET_SIZE(encoded[i]))
            pos += PyBytes_GET_SIZE(encoded[i])
            o[i + 1] = <int32_t>pos
        return _node(b"u", b"", False, n, 0, [0, _addr(o), _addr(d)])


cdef _Node _plan(Batch batch, _Keep keep):
    cdef _Planner p = _Planner.__new__(_Planner)
    p.batch = batch
    p.keep = keep
    root = p.record(batch.layout, b"", batch.num_rows)
    root.flags = 0
    return root


cdef _Keep _keep_for(Batch batch):
    cdef _Keep keep = _Keep.__new__(_Keep)
    keep.owned = []
    keep.batch = batch
    batch.exports += 1
    return keep


# ---------------------------------------------------------------- C structs: schema

cdef struct _SchemaPriv:
    char* strings          # format, name and metadata, one allocation
    ArrowSchema* kids      # n_children structs


cdef void _release_schema(ArrowSchema* s) noexcept nogil:
    cdef _SchemaPriv* priv = <_SchemaPriv*>s.private_data
    cdef int64_t i
    if s.release == NULL:
        return
    for i in range(s.n_children):
        if s.children[i].release != NULL:
            s.children[i].release(s.children[i])
    if s.dictionary != NULL:
        if s.dictionary.release != NULL:
            s.dictionary.release(s.dictionary)
        free(s.dictionary)
    if priv != NULL:
        free(priv.strings)
        free(priv.kids)
        free(priv)
    free(s.children)
    s.release = NULL


cdef Py_ssize_t _metadata_len(const char* md) noexcept nogil:
    cdef int32_t n, ln, i
    cdef Py_ssize_t pos = 4
    if md == NULL:
        return 0
    memcpy(&n, md, 4)
    for i in range(2 * n):
        memcpy(&ln, md + pos, 4)
        pos += 4 + ln
    return pos


cdef int _make_schema(ArrowSchema* out, const char* fmt, const char* name, const char* md,
                      int64_t flags, int64_t n_children) noexcept nogil:
    """Fill ``out`` with copies of the strings and room for the children."""
    cdef Py_ssize_t lf = strlen(fmt), ln = strlen(name) if name != NULL else 0
    cdef Py_ssize_t lm = _metadata_len(md)
    cdef int64_t i
    cdef _SchemaPriv* priv = <_SchemaPriv*>calloc(1, sizeof(_SchemaPriv))
    memset(out, 0, sizeof(ArrowSchema))
    if priv == NULL:
        return -1
    priv.strings = <char*>malloc(lf + ln + lm + 2)
    priv.kids = <ArrowSchema*>calloc(n_children or 1, sizeof(ArrowSchema))
    out.children = <ArrowSchema**>calloc(n_children or 1, sizeof(ArrowSchema*))
    out.private_data = priv
    out.release = _release_schema
    if priv.strings == NULL or priv.kids == NULL or out.children == NULL:
        out.n_children = 0
        _release_schema(out)
        return -1
    memcpy(priv.strings, fmt, lf + 1)
    out.format = priv.strings
    if name != NULL:
        memcpy(priv.strings + lf + 1, name, ln + 1)
        out.name = priv.strings + lf + 1
    if md != NULL:
        memcpy(priv.strings + lf + ln + 2, md, lm)
        out.metadata = priv.strings + lf + ln + 2
    out.flags = flags
    out.n_children = n_children
    for i in range(n_children):
        out.children[i] = &priv.kids[i]
    return 0


cdef int _copy_schema(const ArrowSchema* src, ArrowSchema* out) noexcept nogil:
    """Deep copy (the stream hands out a fresh schema on every get_schema)."""
    cdef int64_t i
    if _make_schema(out, src.format, src.name, src.metadata, src.flags, src.n_children) < 0:
        return -1
    for i in range(src.n_children):
        if _copy_schema(src.children[i], out.children[i]) < 0:
            _release_schema(out)
            return -1
    if src.dictionary != NULL:
        out.dictionary = <ArrowSchema*>calloc(1, sizeof(ArrowSchema))
        if out.dictionary == NULL or _copy_schema(src.dictionary, out.dictionary) < 0:
            _release_schema(out)
            return -1
    return 0


cdef _fill_schema(ArrowSchema* out, _Node node):
    cdef int64_t i, n
    cdef ArrowSchema* moved
    if node.foreign is not None:
        import pyarrow as pa
        cap = pa.field(node.name.decode(), node.foreign.type, nullable=True).__arrow_c_schema__()
        moved = <ArrowSchema*>PyCapsule_GetPointer(cap, "arrow_schema")
        memcpy(out, moved, sizeof(ArrowSchema))
        moved.release = NULL
        return
    n = len(node.children)
    md = node.metadata
    if _make_schema(out, node.format, node.name, <const char*>md if md is not None else NULL,
                    node.flags, n) < 0:
        raise MemoryError()
    try:
        for i in range(n):
            _fill_schema(out.children[i], node.children[i])
        if node.dictionary is not None:
            out.dictionary = <ArrowSchema*>calloc(1, sizeof(ArrowSchema))
            if out.dictionary == NULL:
                raise MemoryError()
            _fill_schema(out.dictionary, node.dictionary)
    except BaseException:
        _release_schema(out)
        raise


# ---------------------------------------------------------------- C structs: array

cdef struct _ArrayPriv:
    PyObject* keep
    ArrowArray* kids


cdef void _release_array(ArrowArray* a) noexcept nogil:
    cdef _ArrayPriv* priv = <_ArrayPriv*>a.private_data
    cdef int64_t i
    if a.release == NULL:
        return
    for i in range(a.n_children):
        if a.children[i].release != NULL:
            a.children[i].release(a.children[i])
    if a.dictionary != NULL:
        if a.dictionary.release != NULL:
            a.dictionary.release(a.dictionary)
        free(a.dictionary)
    free(a.children)
    free(<void*>a.buffers)
    if priv != NULL:
        free(priv.kids)
        if priv.keep != NULL:
            # Consumers may release from any thread.
            with gil:
                Py_DECREF(<object>priv.keep)
        free(priv)
    a.release = NULL


cdef _fill_array(ArrowArray* out, _Node node, _Keep keep):
    cdef int64_t i, nb, nc
    cdef ArrowArray* moved
    cdef _ArrayPriv* priv
    memset(out, 0, sizeof(ArrowArray))
    if node.foreign is not None:
        _, cap = node.foreign.__arrow_c_array__()
        moved = <ArrowArray*>PyCapsule_GetPointer(cap, "arrow_array")
        memcpy(out, moved, sizeof(ArrowArray))
        moved.release = NULL
        return
    nb = len(node.buffers)
    nc = len(node.children)
    priv = <_ArrayPriv*>calloc(1, sizeof(_ArrayPriv))
    if priv == NULL:
        raise MemoryError()
    out.private_data = priv
    out.release = _release_array
    out.buffers = <const void**>calloc(nb or 1, sizeof(void*))
    out.children = <ArrowArray**>calloc(nc or 1, sizeof(ArrowArray*))
    priv.kids = <ArrowArray*>calloc(nc or 1, sizeof(ArrowArray))
    Py_INCREF(keep)
    priv.keep = <PyObject*>keep
    if out.buffers == NULL or out.children == NULL or priv.kids == NULL:
        _release_array(out)
        raise MemoryError()
    out.length = node.length
    out.null_count = node.null_count
    out.n_buffers = nb
    for i in range(nb):
        out.buffers[i] = <const void*><Py_ssize_t>node.buffers[i]
    try:
        for i in range(nc):
            out.children[i] = &priv.kids[i]
            out.n_children = i + 1
            _fill_array(out.children[i], node.children[i], keep)
        if node.dictionary is not None:
            out.dictionary = <ArrowArray*>calloc(1, sizeof(ArrowArray))
            if out.dictionary == NULL:
                raise MemoryError()
            _fill_array(out.dictionary, node.dictionary, keep)
    except BaseException:
        _release_array(out)
        raise


# ---------------------------------------------------------------- capsules

cdef void _schema_capsule_free(object cap) noexcept:
    cdef ArrowSchema* s = <ArrowSchema*>PyCapsule_GetPointer(cap, "arrow_schema")
    if s.release != NULL:
        s.release(s)
    free(s)


cdef void _array_capsule_free(object cap) noexcept:
    cdef ArrowArray* a = <ArrowArray*>PyCapsule_GetPointer(cap, "arrow_array")
    if a.release != NULL:
        a.release(a)
    free(a)


cdef void _stream_capsule_free(object cap) noexcept:
    cdef ArrowArrayStream* s = <ArrowArrayStream*>PyCapsule_GetPointer(cap, "arrow_array_stream")
    if s.release != NULL:
        s.release(s)
    free(s)


cdef object _schema_capsule(_Node root):
    cdef ArrowSchema* s = <ArrowSchema*>calloc(1, sizeof(ArrowSchema))
    if s == NULL:
        raise MemoryError()
    try:
        _fill_schema(s, root)
    except BaseException:
        free(s)
        raise
    return PyCapsule_New(s, "arrow_schema", <PyCapsule_Destructor>_schema_capsule_free)


cdef object _array_capsule(_Node root, _Keep keep):
    cdef ArrowArray* a = <ArrowArray*>calloc(1, sizeof(ArrowArray))
    if a == NULL:
        raise MemoryError()
    try:
        _fill_array(a, root, keep)
    except BaseException:
        free(a)
        raise
    return PyCapsule_New(a, "arrow_array", <PyCapsule_Destructor>_array_capsule_free)


def export_schema(Batch batch):
    """``batch.__arrow_c_schema__()``: a PyCapsule named "arrow_schema"."""
    cdef _Keep keep = _keep_for(batch)
    return _schema_capsule(_plan(batch, keep))


def export_array(Batch batch):
    """``batch.__arrow_c_array__()``: ("arrow_schema", "arrow_array") capsules.

    The array is a struct (one child per top-level column), the form Arrow
    consumers read as a record batch.
    """
    cdef _Keep keep = _keep_for(batch)
    cdef _Node root = _plan(batch, keep)
    return _schema_capsule(root), _array_capsule(root, keep)


# ---------------------------------------------------------------- stream

cdef struct _StreamPriv:
    ArrowSchema schema
    ArrowArray array       # handed out by the first get_next, then empty


cdef int _stream_get_schema(ArrowArrayStream* s, ArrowSchema* out) noexcept nogil:
    cdef _StreamPriv* p = <_StreamPriv*>s.private_data
    return 12 if _copy_schema(&p.schema, out) < 0 else 0   # 12 = ENOMEM


cdef int _stream_get_next(ArrowArrayStream* s, ArrowArray* out) noexcept nogil:
    cdef _StreamPriv* p = <_StreamPriv*>s.private_data
    memcpy(out, &p.array, sizeof(ArrowArray))   # a released array marks the end
    p.array.release = NULL
    return 0


cdef const char* _stream_last_error(ArrowArrayStream* s) noexcept nogil:
    return NULL


cdef void _stream_release(ArrowArrayStream* s) noexcept nogil:
    cdef _StreamPriv* p = <_StreamPriv*>s.private_data
    if s.release == NULL:
        return
    if p.schema.release != NULL:
        p.schema.release(&p.schema)
    if p.array.release != NULL:
        p.array.release(&p.array)
    free(p)
    s.release = NULL


def export_stream(Batch batch):
    """``batch.__arrow_c_stream__()``: a stream of one record batch."""
    cdef _Keep keep = _keep_for(batch)
    cdef _Node root = _plan(batch, keep)
    cdef _StreamPriv* p = <_StreamPriv*>calloc(1, sizeof(_StreamPriv))
    cdef ArrowArrayStream* s
    if p == NULL:
        raise MemoryError()
    try:
        _fill_schema(&p.schema, root)
        _fill_array(&p.array, root, keep)
    except BaseException:
        if p.schema.release != NULL:
            p.schema.release(&p.schema)
        free(p)
        raise
    s = <ArrowArrayStream*>calloc(1, sizeof(ArrowArrayStream))
    if s == NULL:
        p.schema.release(&p.schema)
        p.array.release(&p.array)
        free(p)
        raise MemoryError()
    s.get_schema = _stream_get_schema
    s.get_next = _stream_get_next
    s.get_last_error = _stream_last_error
    s.release = _stream_release
    s.private_data = p
    return PyCapsule_New(s, "arrow_array_stream", <PyCapsule_Destructor>_stream_capsule_free)
