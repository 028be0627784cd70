# cython: language_level=3
"""The ring: a preallocated arena between the Kafka consumer and the decoder.

Capacity is fixed at construction, in messages (slots) and in bytes (arena);
nothing here grows with the backlog.

* ``push(messages)`` (poll thread) copies each message's key, value and,
  when ``keep_headers`` is set, its headers into the arena once; the caller
  drops the ``confluent_kafka.Message`` objects right after (a held message
  pins librdkafka's fetch buffer).
* ``decode(decoder, start, count, batch)`` (decoder thread) hands the decoder
  pointers straight into the arena through ``BaseDecoder.decode_spans``; the
  decoder releases the GIL while it parses, so polling continues meanwhile.
* ``release(upto)`` (worker thread) frees slots in FIFO order once their batch
  is durable.

The three threads call in with the GIL held; only ``decode_spans`` runs
without it and it reads only slots that ``release`` has not freed, while
``push`` writes only free space. That is the whole synchronisation.

Per partition the ring keeps the next offset it expects. A message below it
is a refetched duplicate and is dropped; a message that does not fit puts the
partition in *rewind* state: it and every later message of that partition
are dropped until the pipeline has sought the consumer back to the first
missing offset (``rewinds()`` / ``seek_done()``). Together with pausing, this
is how librdkafka's discard-and-refetch on pause loses and doubles nothing.

Oversized messages: a message whose key + value (+ headers) exceed the arena
is never copied and never makes the arena grow. The ring keeps a reference to
its bytes in a single overflow slot; only one oversized message may be
outstanding, so the extra memory is bounded by librdkafka's own limit on a
message (``fetch.max.bytes`` / ``receive.message.max.bytes``). It is decoded
like any other message; until it is released, further oversized messages
wait (their partition rewinds).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.bytes cimport PyBytes_Check
from cpython.object cimport PyObject
from libc.stdint cimport int32_t, int64_t, uint32_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy

from kfast._batch cimport Batch, BaseDecoder
from kfast._columns cimport (
    Column,
    col_append_bytes,
    col_append_i32,
    col_append_i64,
    col_append_list_end,
    col_append_null,
)

from kfast._layout import ListNode, RecordNode, ValueNode

cdef enum:
    F_TOMBSTONE = 1     # value is None
    F_KEY = 2           # key present (klen may be 0)
    F_HEADERS = 4       # headers serialised after the value
    F_OVERSIZED = 8     # payload held in the overflow slot, not the arena

cdef enum:
    SCHEMA_HEADER = 5   # bytes of a value handed to Ring.schema_id_of (Confluent: magic + id)

cdef enum:
    R_NONE = 0
    R_NEED_SEEK = 1     # drop every message of the partition until sought back

cdef struct Slot:
    int64_t offset
    int64_t timestamp
    Py_ssize_t aoff      # where the record starts in the arena
    Py_ssize_t alen      # key + value + headers bytes in the arena
    Py_ssize_t vlen
    int32_t klen
    int32_t hlen
    int32_t part         # index into the partition table
    int32_t gen          # the partition's assignment generation at push time
    int32_t flags

SLOT_SIZE = sizeof(Slot)


# ----------------------------------------------------------------------------
# Fast field access to confluent_kafka.Message.
#
# Calling seven accessor methods per message costs ~0.2 us, a third of what a
# bare consume() loop spends per message. Message is a C struct whose layout
# is not public, so the ring *measures* it once: it builds probe messages with
# distinctive field values and finds where each value sits inside the object
# (reading only within ``__basicsize__``). Every push then checks its first
# message field by field against the accessor methods; any mismatch (a
# different confluent-kafka build) turns the fast path off for good and the
# ring uses the methods. Reading a struct field of a live object is memory
# safe; a wrong offset could only produce a mismatch, which the check catches.
# ----------------------------------------------------------------------------
cdef object _MSG_TYPE = None
cdef Py_ssize_t _OFF_TOPIC = -1, _OFF_VALUE = -1, _OFF_KEY = -1, _OFF_ERROR = -1
cdef Py_ssize_t _OFF_PART = -1, _OFF_OFFSET = -1, _OFF_TS = -1, _OFF_TSTYPE = -1
cdef bint _calibrated = False


cdef inline PyObject* _field_ptr(object msg, Py_ssize_t off) noexcept:
    return (<PyObject**>((<char*><PyObject*>msg) + off))[0]


cdef inline int32_t _field_i32(object msg, Py_ssize_t off) noexcept:
    return (<int32_t*>((<char*><PyObject*>msg) + off))[0]


cdef inline int64_t _field_i64(object msg, Py_ssize_t off) noexcept:
    return (<int64_t*>((<char*><PyObject*>msg) + off))[0]


cdef void _calibrate():
    global _MSG_TYPE, _OFF_TOPIC, _OFF_VALUE, _OFF_KEY, _OFF_ERROR
    global _OFF_PART, _OFF_OFFSET, _OFF_TS, _OFF_TSTYPE, _calibrated
    _calibrated = True
    import os
    if os.environ.get("KFAST_RING_ACCESSORS") == "1":
        return      # operator opt-out: always use the Message accessor methods
    try:
        from confluent_kafka import KafkaError, Message
    except ImportError:
        return
    topic = "kfast-probe-topic"
    key = b"kfast-probe-key"
    value = b"kfast-probe-value"
    err = KafkaError(1)
    m = Message(topic=topic, partition=0x1234567, offset=0x123456789AB, key=key,
                value=value, timestamp=(1, 0x0BADF00D1234))
    e = Message(topic=topic, partition=0, offset=0, value=value, error=err)
    n = type(m).__basicsize__
    if m.topic() is not topic or m.key() is not key or m.value() is not value:
        return
    found = {}
    cdef Py_ssize_t off
    for off in range(sizeof(PyObject), n - 7, 8):
        if _field_ptr(m, off) == <PyObject*>topic:
            found.setdefault("topic", off)
        elif _field_ptr(m, off) == <PyObject*>value:
            found.setdefault("value", off)
        elif _field_ptr(m, off) == <PyObject*>key:
            found.setdefault("key", off)
        elif _field_i64(m, off) == 0x123456789AB:
            found.setdefault("offset", off)
        elif _field_i64(m, off) == 0x0BADF00D1234:
            found.setdefault("ts", off)
        if _field_ptr(e, off) == <PyObject*>err:
            found.setdefault("error", off)
    for off in range(sizeof(PyObject), n - 3, 4):
        if _field_i32(m, off) == 0x1234567:
            found.setdefault("part", off)
    if len(found) != 7:
        return
    tstype_off = found["ts"] + 8
    if tstype_off + 4 > n or _field_i32(m, tstype_off) != 1:
        return
    _OFF_TOPIC = found["topic"]
    _OFF_VALUE = found["value"]
    _OFF_KEY = found["key"]
    _OFF_ERROR = found["error"]
    _OFF_PART = found["part"]
    _OFF_OFFSET = found["offset"]
    _OFF_TS = found["ts"]
    _OFF_TSTYPE = tstype_off
    _MSG_TYPE = Message


cdef inline object _opt(PyObject* p):
    if p == NULL:
        return None
    return <object>p


cdef bint _fast_matches(object msg) except -1:
    """Does the measured layout agree with the accessor methods for ``msg``?"""
    if _field_ptr(msg, _OFF_ERROR) != NULL and _opt(_field_ptr(msg, _OFF_ERROR)) is not None:
        return True      # error messages take the method path anyway
    ts = msg.timestamp()
    tst = _field_i32(msg, _OFF_TSTYPE)
    return (
        _opt(_field_ptr(msg, _OFF_TOPIC)) == msg.topic()
        and _field_i32(msg, _OFF_PART) == msg.partition()
        and _field_i64(msg, _OFF_OFFSET) == msg.offset()
        and _opt(_field_ptr(msg, _OFF_KEY)) is msg.key()
        and _opt(_field_ptr(msg, _OFF_VALUE)) is msg.value()
        and tst == ts[0]
        and (tst == 0 or _field_i64(msg, _OFF_TS) == ts[1])
    )


def fast_path_available():
    """True when push() reads confluent_kafka.Message fields directly."""
    if not _calibrated:
        _calibrate()
    return _MSG_TYPE is not None


cdef class Ring:
    cdef Slot* slots
    cdef unsigned char* arena
    cdef readonly Py_ssize_t capacity_messages
    cdef readonly Py_ssize_t capacity_bytes
    cdef readonly bint keep_headers
    cdef readonly int64_t head       # next sequence number to write
    cdef readonly int64_t tail       # oldest live sequence number
    cdef Py_ssize_t wpos, rpos       # arena write position, start of the oldest record
    cdef readonly Py_ssize_t payload_bytes   # live key+value+header bytes
    cdef dict overflow               # seq -> (key, value, headers) of the oversized message
    # partition table (grows with distinct partitions seen, never with messages)
    cdef Py_ssize_t nparts, cap_parts
    cdef int64_t* expected
    cdef int64_t* rewind_at
    cdef int32_t* rstate
    cdef int32_t* gen
    cdef int32_t* assigned
    cdef int64_t* next_off           # decode's scratch: next offset per partition, -1 unseen
    cdef list topics
    cdef list partitions
    cdef dict index
    # reusable pointer arrays for decode (grown to the largest batch once)
    cdef const unsigned char** ptrs
    cdef Py_ssize_t* lens
    cdef Py_ssize_t cap_ptrs
    # counters
    cdef readonly int64_t pushed
    cdef readonly int64_t dropped_duplicate
    cdef readonly int64_t dropped_rewind
    cdef readonly int64_t dropped_unassigned
    cdef readonly int64_t rewinds_started
    cdef readonly int64_t oversized
    cdef readonly int64_t gaps
    cdef readonly int64_t tombstones
    cdef readonly int64_t abandoned
    cdef public list errors          # KafkaError objects seen by push (not EOF)
    cdef object _schema_id_of        # value header -> schema id or None (RingView.schema_id)

    def __cinit__(self, Py_ssize_t max_messages, Py_ssize_t max_bytes, bint keep_headers=False):
        if max_messages < 1:
            raise ValueError(f"max_messages must be >= 1, got {max_messages}")
        if max_bytes < 1 or max_bytes > 0x7FFFFFFF:
            raise ValueError(f"max_bytes must be in [1, 2147483647], got {max_bytes}")
        self.slots = <Slot*>calloc(max_messages, sizeof(Slot))
        self.arena = <unsigned char*>malloc(max_bytes)
        if self.slots == NULL or self.arena == NULL:
            raise MemoryError(f"cannot allocate a ring of {max_messages} slots / {max_bytes} bytes")
        self.capacity_messages = max_messages
        self.capacity_bytes = max_bytes
        self.keep_headers = keep_headers
        self.overflow = {}
        self.topics = []
        self.partitions = []
        self.index = {}
        self.errors = []

    def __dealloc__(self):
        free(self.slots)
        free(self.arena)
        free(self.expected)
        free(self.rewind_at)
        free(self.rstate)
        free(self.gen)
        free(self.assigned)
        free(self.next_off)
        free(self.ptrs)
        free(self.lens)

    # ------------------------------------------------------------------ state
    @property
    def schema_id_of(self):
        """``schema_id_of(header) -> int | None`` or None (the default).

        Set by the pipeline from its decoder (``ConfluentDecoder.schema_id_of``);
        ``RingView.schema_id`` calls it with the first 5 bytes of a message's
        value (fewer when the value is shorter), read straight from the arena,
        so a dead letter can carry ``kfast.schema.id`` without the ring copying
        the whole value or knowing the framing.
        """
        return self._schema_id_of

    @schema_id_of.setter
    def schema_id_of(self, fn):
        if fn is not None and not callable(fn):
            raise TypeError(f"schema_id_of must be a callable or None, got {type(fn).__name__}")
        self._schema_id_of = fn

    @property
    def used_messages(self):
        return self.head - self.tail

    @property
    def used_bytes(self):
        """Arena bytes unavailable for new records (live records + wrap gap)."""
        if self.head == self.tail:
            return 0
        if self.wpos >= self.rpos:
            return self.wpos - self.rpos
        return self.capacity_bytes - self.rpos + self.wpos

    def fill(self):
        """Fill fraction: the larger of messages and bytes."""
        return max((self.head - self.tail) / self.capacity_messages,
                   self.used_bytes / self.capacity_bytes)

    # -------------------------------------------------------- partition table
    cdef int _grow_parts(self) except -1:
        cdef Py_ssize_t cap = self.cap_parts * 2 if self.cap_parts else 16
        cdef void* p
        p = realloc(self.expected, cap * sizeof(int64_t))
        if p == NULL:
            raise MemoryError()
        self.expected = <int64_t*>p
        p = realloc(self.rewind_at, cap * sizeof(int64_t))
        if p == NULL:
            raise MemoryError()
        self.rewind_at = <int64_t*>p
        p = realloc(self.rstate, cap * sizeof(int32_t))
        if p == NULL:
            raise MemoryError()
        self.rstate = <int32_t*>p
        p = realloc(self.gen, cap * sizeof(int32_t))
        if p == NULL:
            raise MemoryError()
        self.gen = <int32_t*>p
        p = realloc(self.assigned, cap * sizeof(int32_t))
        if p == NULL:
            raise MemoryError()
        self.assigned = <int32_t*>p
        p = realloc(self.next_off, cap * sizeof(int64_t))
        if p == NULL:
            raise MemoryError()
        self.next_off = <int64_t*>p
        self.cap_parts = cap
        return 0

    cpdef int partition_index(self, str topic, int partition) except -1:
        """Index of (topic, partition) in the table, adding it if new."""
        key = (topic, partition)
        idx = self.index.get(key)
        if idx is not None:
            return idx
        if self.nparts == self.cap_parts:
            self._grow_parts()
        i = self.nparts
        self.expected[i] = -1
        self.rewind_at[i] = -1
        self.rstate[i] = R_NONE
        self.gen[i] = 0
        self.assigned[i] = 0
        self.topics.append(topic)
        self.partitions.append(partition)
        self.index[key] = i
        self.nparts += 1
        return i

    def assign(self, str topic, int partition):
        """Start accepting messages of a newly assigned partition (new generation)."""
        cdef int i = self.partition_index(topic, partition)
        self.gen[i] += 1
        self.assigned[i] = 1
        self.expected[i] = -1
        self.rewind_at[i] = -1
        self.rstate[i] = R_NONE
        return i

    def revoke(self, str topic, int partition):
        """Stop accepting a partition; its slots still in the ring are abandoned
        (skipped by decode, never acknowledged)."""
        key = (topic, partition)
        idx = self.index.get(key)
        if idx is None:
            return -1
        cdef int i = idx
        self.gen[i] += 1
        self.assigned[i] = 0
        self.expected[i] = -1
        self.rewind_at[i] = -1
        self.rstate[i] = R_NONE
        return i

    def generation(self, int i):
        return self.gen[i]

    def topic_partition(self, int i):
        return self.topics[i], self.partitions[i]

    def expected_offset(self, str topic, int partition):
        """Next offset the ring will accept for the partition (-1: any)."""
        idx = self.index.get((topic, partition))
        if idx is None:
            return -1
        return self.expected[<int>idx]

    def rewinds(self):
        """[(topic, partition, offset)] partitions that must be sought back to ``offset``."""
        cdef Py_ssize_t i
        out = []
        for i in range(self.nparts):
            if self.rstate[i] == R_NEED_SEEK:
                out.append((self.topics[i], self.partitions[i], self.rewind_at[i]))
        return out

    def seek_done(self, str topic, int partition):
        """The consumer was sought back to the rewind offset: accept messages again."""
        idx = self.index.get((topic, partition))
        if idx is None:
            return
        cdef int i = idx
        if self.rstate[i] == R_NEED_SEEK:
            self.rstate[i] = R_NONE
            self.expected[i] = self.rewind_at[i]
            self.rewind_at[i] = -1

    # ------------------------------------------------------------------ arena
    cdef Py_ssize_t _alloc(self, Py_ssize_t n) noexcept:
        """Arena offset for ``n`` contiguous bytes, or -1 when they do not fit now."""
        cdef Py_ssize_t cap = self.capacity_bytes
        if self.head == self.tail:
            self.wpos = 0
            self.rpos = 0
            return 0 if n <= cap else -1
        if self.wpos >= self.rpos:
            if n <= cap - self.wpos:
                return self.wpos
            if n < self.rpos:
                return 0          # wrap: [wpos, cap) stays unused until the reader passes it
            return -1
        if n < self.rpos - self.wpos:
            return self.wpos
        return -1

    cdef inline void _start_rewind(self, int p, int64_t offset) noexcept:
        self.rstate[p] = R_NEED_SEEK
        self.rewind_at[p] = offset
        self.rewinds_started += 1

    cdef inline void _store_slot(self, int p, int64_t off, int64_t timestamp, Py_ssize_t aoff,
                                 Py_ssize_t need, Py_ssize_t klen, Py_ssize_t vlen,
                                 Py_ssize_t hlen, int32_t flags) noexcept:
        # the head slot of a message whose bytes are already in the arena at aoff
        cdef Slot* s = &self.slots[self.head % self.capacity_messages]
        s.offset = off
        s.timestamp = timestamp
        s.aoff = aoff
        s.alen = need
        s.vlen = vlen
        s.klen = <int32_t>klen
        s.hlen = <int32_t>hlen
        s.part = p
        s.gen = self.gen[p]
        s.flags = flags
        if self.head == self.tail:
            self.rpos = aoff
        self.wpos = aoff + need
        self.head += 1
        self.payload_bytes += need
        self.expected[p] = off + 1

    def push(self, list messages):
        """Copy messages into the ring; return how many were stored.

        Messages are ``confluent_kafka.Message`` objects (or objects with the
        same methods). Error messages are appended to ``errors`` (partition
        EOF is ignored). Messages that do not fit start a rewind of their
        partition (see the module docstring); the caller must pause and seek.
        """
        cdef Py_ssize_t n = len(messages)
        cdef Py_ssize_t stored = 0, i
        cdef int p = -1, last_part = -1, part
        cdef int64_t off, timestamp
        cdef Py_ssize_t klen, vlen, hlen, need, aoff
        cdef int32_t flags
        cdef object last_topic = None
        cdef bint fast, mfast, same
        cdef PyObject* ep
        global _MSG_TYPE
        if n == 0:
            return 0
        tp = type(messages[0])
        if not _calibrated:
            _calibrate()
        fast = _MSG_TYPE is not None and tp is _MSG_TYPE
        if fast and not _fast_matches(messages[0]):
            _MSG_TYPE = None     # this build's layout differs: methods from now on
            fast = False
        m_error = tp.error
        m_topic = tp.topic
        m_partition = tp.partition
        m_offset = tp.offset
        m_key = tp.key
        m_value = tp.value
        m_timestamp = tp.timestamp
        m_headers = tp.headers
        for i in range(n):
            msg = messages[i]
            same = type(msg) is tp
            mfast = fast and same
            if mfast:
                ep = _field_ptr(msg, _OFF_ERROR)
                if ep != NULL and <object>ep is not None:
                    err = <object>ep
                    if err.code() != -191:    # KafkaError._PARTITION_EOF
                        self.errors.append(err)
                    continue
                topic = _opt(_field_ptr(msg, _OFF_TOPIC))
                part = _field_i32(msg, _OFF_PART)
            else:
                err = (m_error(msg) if same else msg.error())
                if err is not None:
                    if err.code() != -191:    # KafkaError._PARTITION_EOF
                        self.errors.append(err)
                    continue
                topic = (m_topic(msg) if same else msg.topic())
                part = (m_partition(msg) if same else msg.partition())
            if part != last_part or topic != last_topic:
                idx = self.index.get((topic, part))
                if idx is None:
                    self.dropped_unassigned += 1
                    continue
                p = idx
                last_part = part
                last_topic = topic
            if not self.assigned[p]:
                self.dropped_unassigned += 1
                continue
            if self.rstate[p] == R_NEED_SEEK:
                self.dropped_rewind += 1
                continue
            if mfast:
                off = _field_i64(msg, _OFF_OFFSET)
            else:
                off = (m_offset(msg) if same else msg.offset())
            if self.expected[p] >= 0:
                if off < self.expected[p]:
                    self.dropped_duplicate += 1
                    continue
                if off > self.expected[p]:
                    self.gaps += 1      # compaction / transaction markers, or a refetch hole
            if self.head - self.tail >= self.capacity_messages:
                self._start_rewind(p, off)
                self.dropped_rewind += 1
                continue
            if mfast:
                key = _opt(_field_ptr(msg, _OFF_KEY))
                value = _opt(_field_ptr(msg, _OFF_VALUE))
            else:
                key = (m_key(msg) if same else msg.key())
                value = (m_value(msg) if same else msg.value())
            flags = 0
            klen = 0
            vlen = 0
            hlen = 0
            hbytes = None
            if key is not None:
                flags |= F_KEY
                klen = PyBytes_GET_SIZE(key) if PyBytes_Check(key) else len(key)
            if value is None:
                flags |= F_TOMBSTONE
            else:
                vlen = PyBytes_GET_SIZE(value) if PyBytes_Check(value) else len(value)
            if self.keep_headers:
                headers = (m_headers(msg) if same else msg.headers())
                if headers:
                    hbytes = _encode_headers(headers)
                    hlen = PyBytes_GET_SIZE(hbytes)
                    flags |= F_HEADERS
            need = klen + vlen + hlen
            if need > self.capacity_bytes:
                if self.overflow:
                    self._start_rewind(p, off)
                    self.dropped_rewind += 1
                    continue
                flags |= F_OVERSIZED
                self.overflow[self.head] = (
                    None if key is None else bytes(key),
                    None if value is None else bytes(value),
                    hbytes,
                )
                aoff = self.wpos if self.head != self.tail else 0
                need = 0
                self.oversized += 1
            else:
                aoff = self._alloc(need)
                if aoff < 0:
                    self._start_rewind(p, off)
                    self.dropped_rewind += 1
                    continue
                if klen:
                    _copy_into(self.arena + aoff, key, klen)
                if vlen:
                    _copy_into(self.arena + aoff + klen, value, vlen)
                if hlen:
                    memcpy(self.arena + aoff + klen + vlen, PyBytes_AS_STRING(hbytes), hlen)
            if mfast:
                timestamp = (_field_i64(msg, _OFF_TS) if _field_i32(msg, _OFF_TSTYPE) != 0
                             else -1)
            else:
                ts = (m_timestamp(msg) if same else msg.timestamp())
                timestamp = ts[1] if ts[0] != 0 else -1
            self._store_slot(p, off, timestamp, aoff, need, klen, vlen, hlen, flags)
            stored += 1
        self.pushed += stored
        return stored

    # ---------------------------------------------------------------- reading
    def span(self, int64_t start, Py_ssize_t max_rows, Py_ssize_t max_bytes):
        """How many slots from ``start`` form the next batch: at most ``max_rows``
        and (beyond the first) ``max_bytes`` of payload. Returns (count, bytes)."""
        cdef int64_t s = start
        cdef Py_ssize_t total = 0, count = 0, b
        cdef Slot* sl
        if start < self.tail:
            raise ValueError(f"slot {start} was already released (tail {self.tail})")
        while s < self.head and count < max_rows:
            sl = &self.slots[s % self.capacity_messages]
            b = sl.vlen
            if count and total + b > max_bytes:
                break
            total += b
            count += 1
            s += 1
        return count, total

    def decode(self, BaseDecoder decoder, int64_t start, Py_ssize_t count, Batch out,
               tuple metadata=None):
        """Decode slots [start, start + count) into ``out``; return a RingView.

        Slots of partitions revoked since they were pushed are skipped, and so
        are tombstones (no value to decode; they still count as processed).
        The view maps each input index of ``out`` back to its message and
        carries the progress (next offset per partition) the batch makes.
        ``metadata`` (``kfast._layout.metadata_plan``) adds Kafka coordinate
        columns to ``out``, filled here for every good row.
        """
        cdef int64_t s
        cdef Py_ssize_t k = 0, i
        cdef Slot* sl
        cdef RingView view
        cdef void* p
        cdef object data
        if start < self.tail or start + count > self.head or count < 0:
            raise ValueError(f"slots [{start}, {start + count}) are outside the ring "
                             f"[{self.tail}, {self.head})")
        if count > self.cap_ptrs:
            p = realloc(self.ptrs, count * sizeof(void*))
            if p == NULL:
                raise MemoryError()
            self.ptrs = <const unsigned char**>p
            p = realloc(self.lens, count * sizeof(Py_ssize_t))
            if p == NULL:
                raise MemoryError()
            self.lens = <Py_ssize_t*>p
            self.cap_ptrs = count
        view = RingView.__new__(RingView)
        view.ring = self
        view.seqs = <int64_t*>malloc((count if count else 1) * sizeof(int64_t))
        if view.seqs == NULL:
            raise MemoryError()
        for i in range(self.nparts):
            self.next_off[i] = -1
        for s in range(start, start + count):
            sl = &self.slots[s % self.capacity_messages]
            if sl.gen != self.gen[sl.part]:
                self.abandoned += 1
                continue
            self.next_off[sl.part] = sl.offset + 1
            if sl.flags & F_TOMBSTONE:
                self.tombstones += 1
                continue
            if sl.flags & F_OVERSIZED:
                data = self.overflow[s][1]
                self.ptrs[k] = <const unsigned char*>PyBytes_AS_STRING(data)
            else:
                self.ptrs[k] = self.arena + sl.aoff + sl.klen
            self.lens[k] = sl.vlen
            view.seqs[k] = s
            k += 1
        view.n = k
        view.progress = {i: (self.gen[i], self.next_off[i])
                         for i in range(self.nparts) if self.next_off[i] >= 0}
        decoder.decode_spans(self.ptrs, self.lens, k, out)
        if metadata:
            _fill_metadata(self, view, out, metadata)
        return view

    def release(self, int64_t upto):
        """Free every slot before ``upto`` (FIFO)."""
        cdef Slot* sl
        if upto > self.head:
            raise ValueError(f"cannot release up to {upto}: head is {self.head}")
        while self.tail < upto:
            sl = &self.slots[self.tail % self.capacity_messages]
            if sl.flags & F_OVERSIZED:
                self.overflow.pop(self.tail, None)
            self.payload_bytes -= sl.alen
            self.tail += 1
        if self.tail == self.head:
            self.wpos = 0
            self.rpos = 0
        else:
            self.rpos = self.slots[self.tail % self.capacity_messages].aoff

    def stats(self):
        return {
            "capacity_messages": self.capacity_messages,
            "capacity_bytes": self.capacity_bytes,
            "used_messages": self.head - self.tail,
            "used_bytes": self.used_bytes,
            "payload_bytes": self.payload_bytes,
            "pushed": self.pushed,
            "dropped_duplicate": self.dropped_duplicate,
            "dropped_rewind": self.dropped_rewind,
            "dropped_unassigned": self.dropped_unassigned,
            "rewinds": self.rewinds_started,
            "oversized": self.oversized,
            "gaps": self.gaps,
            "tombstones": self.tombstones,
            "abandoned": self.abandoned,
        }

    # slot accessors used by RingView (slow path)
    cdef Slot* _slot(self, int64_t seq) except NULL:
        if seq < self.tail or seq >= self.head:
            raise IndexError(f"message {seq} is no longer in the ring")
        return &self.slots[seq % self.capacity_messages]


# ----------------------------------------------------------------------------
# C push path (declared in _ring.pxd): kfast.runtime.kafka copies librdkafka's
# messages in without building a Python object per message. Same rules as
# Ring.push, message by message.
# ----------------------------------------------------------------------------
cdef int ring_lookup(object ring, str topic, int partition) except -2:
    idx = (<Ring>ring).index.get((topic, partition))
    return -1 if idx is None else <int>idx


cdef int ring_store(object ring, int p, int64_t off, int64_t timestamp,
                    const unsigned char* key, Py_ssize_t klen,
                    const unsigned char* value, Py_ssize_t vlen,
                    const unsigned char* headers, Py_ssize_t hlen) except -1:
    cdef Ring r = <Ring>ring
    cdef Py_ssize_t need, aoff
    cdef int32_t flags = 0
    if p < 0 or not r.assigned[p]:
        r.dropped_unassigned += 1
        return 0
    if r.rstate[p] == R_NEED_SEEK:
        r.dropped_rewind += 1
        return 0
    if r.expected[p] >= 0:
        if off < r.expected[p]:
            r.dropped_duplicate += 1
            return 0
        if off > r.expected[p]:
            r.gaps += 1
    if r.head - r.tail >= r.capacity_messages:
        r._start_rewind(p, off)
        r.dropped_rewind += 1
        return 0
    if key != NULL:
        flags |= F_KEY
    else:
        klen = 0
    if value == NULL:
        flags |= F_TOMBSTONE
        vlen = 0
    if not r.keep_headers or headers == NULL:
        hlen = 0
    if hlen:
        flags |= F_HEADERS
    need = klen + vlen + hlen
    if need > r.capacity_bytes:
        if r.overflow:
            r._start_rewind(p, off)
            r.dropped_rewind += 1
            return 0
        flags |= F_OVERSIZED
        r.overflow[r.head] = (
            None if key == NULL else PyBytes_FromStringAndSize(<const char*>key, klen),
            None if value == NULL else PyBytes_FromStringAndSize(<const char*>value, vlen),
            PyBytes_FromStringAndSize(<const char*>headers, hlen) if hlen else None,
        )
        aoff = r.wpos if r.head != r.tail else 0
        need = 0
        r.oversized += 1
    else:
        aoff = r._alloc(need)
        if aoff < 0:
            r._start_rewind(p, off)
            r.dropped_rewind += 1
            return 0
        if klen:
            memcpy(r.arena + aoff, key, klen)
        if vlen:
            memcpy(r.arena + aoff + klen, value, vlen)
        if hlen:
            memcpy(r.arena + aoff + klen + vlen, headers, hlen)
    r._store_slot(p, off, timestamp, aoff, need, klen, vlen, hlen, flags)
    r.pushed += 1
    return 1


cdef inline void _copy_into(unsigned char* dst, object src, Py_ssize_t n) except *:
    cdef const unsigned char[::1] mv
    if PyBytes_Check(src):
        memcpy(dst, PyBytes_AS_STRING(src), n)
    else:
        mv = memoryview(src).cast("B")
        memcpy(dst, &mv[0], n)


cdef bytes _encode_headers(object headers):
    """[(str, bytes | None)] -> u32 klen, key, i32 vlen (-1 = None), value, ..."""
    parts = []
    for k, v in headers:
        kb = k.encode("utf-8") if isinstance(k, str) else bytes(k)
        parts.append(len(kb).to_bytes(4, "little"))
        parts.append(kb)
        if v is None:
            parts.append((-1).to_bytes(4, "little", signed=True))
        else:
            vb = bytes(v)
            parts.append(len(vb).to_bytes(4, "little", signed=True))
            parts.append(vb)
    return b"".join(parts)


cdef list _decode_headers(const unsigned char* p, Py_ssize_t n):
    cdef Py_ssize_t pos = 0
    cdef uint32_t kl
    cdef int32_t vl
    out = []
    while pos + 4 <= n:
        memcpy(&kl, p + pos, 4)
        pos += 4
        k = PyBytes_FromStringAndSize(<const char*>p + pos, kl).decode("utf-8", "replace")
        pos += kl
        memcpy(&vl, p + pos, 4)
        pos += 4
        if vl < 0:
            out.append((k, None))
        else:
            out.append((k, PyBytes_FromStringAndSize(<const char*>p + pos, vl)))
            pos += vl
    return out


cdef class RingView:
    """``kfast.sinks.RecordSource`` over the ring: input index -> original message.

    Valid until the batch's slots are released (the end of its delivery);
    values are copied out only when asked for.
    """
    cdef Ring ring
    cdef int64_t* seqs
    cdef readonly Py_ssize_t n
    cdef readonly dict progress      # partition index -> (generation, next offset)

    def __dealloc__(self):
        free(self.seqs)

    def __len__(self):
        return self.n

    cdef Slot* _get(self, Py_ssize_t i) except NULL:
        if i < 0 or i >= self.n:
            raise IndexError(f"input index {i} out of range [0, {self.n})")
        return self.ring._slot(self.seqs[i])

    def seq(self, Py_ssize_t i):
        self._get(i)
        return self.seqs[i]

    def topic(self, Py_ssize_t i):
        return self.ring.topics[self._get(i).part]

    def partition(self, Py_ssize_t i):
        return self.ring.partitions[self._get(i).part]

    def offset(self, Py_ssize_t i):
        return self._get(i).offset

    def timestamp(self, Py_ssize_t i):
        return self._get(i).timestamp

    def key(self, Py_ssize_t i):
        cdef Slot* s = self._get(i)
        if not (s.flags & F_KEY):
            return None
        if s.flags & F_OVERSIZED:
            return self.ring.overflow[self.seqs[i]][0]
        return PyBytes_FromStringAndSize(<const char*>self.ring.arena + s.aoff, s.klen)

    def value(self, Py_ssize_t i):
        cdef Slot* s = self._get(i)
        if s.flags & F_TOMBSTONE:
            return None
        if s.flags & F_OVERSIZED:
            return self.ring.overflow[self.seqs[i]][1]
        return PyBytes_FromStringAndSize(<const char*>self.ring.arena + s.aoff + s.klen, s.vlen)

    def schema_id(self, Py_ssize_t i):
        """Schema id of message ``i``: ``ring.schema_id_of`` applied to the
        value's first 5 bytes; None without that hook and for a tombstone."""
        cdef Slot* s = self._get(i)
        cdef Py_ssize_t n = min(s.vlen, <Py_ssize_t>SCHEMA_HEADER)
        fn = self.ring._schema_id_of
        if fn is None or s.flags & F_TOMBSTONE:
            return None
        if s.flags & F_OVERSIZED:
            header = self.ring.overflow[self.seqs[i]][1][:n]
        else:
            header = PyBytes_FromStringAndSize(<const char*>self.ring.arena + s.aoff + s.klen, n)
        return fn(header)

    def headers(self, Py_ssize_t i):
        cdef Slot* s = self._get(i)
        cdef bytes hb
        if not (s.flags & F_HEADERS):
            return None
        if s.flags & F_OVERSIZED:
            hb = self.ring.overflow[self.seqs[i]][2]
            return _decode_headers(<const unsigned char*>PyBytes_AS_STRING(hb),
                                   PyBytes_GET_SIZE(hb))
        return _decode_headers(self.ring.arena + s.aoff + s.klen + s.vlen, s.hlen)

    def next_offsets(self):
        """{(topic, partition): last offset + 1} for the partitions this batch covers."""
        return {(self.ring.topics[i], self.ring.partitions[i]): nxt
                for i, (g, nxt) in self.progress.items()}


# Kafka coordinate columns (kfast._layout.METADATA_FIELDS): kind, nullable, conv.
_META_FIELDS = ("topic", "partition", "offset", "timestamp", "key", "headers")
_META_COLUMNS = (
    (6, False, "str"),                  # topic: COL_BINARY
    (2, False, "int"),                  # partition: COL_INT32
    (3, False, "int"),                  # offset: COL_INT64
    (3, True, "timestamp-millis"),      # timestamp, null when the message has none
    (6, True, "bytes"),                 # key, null for a null key
)


cdef int _append_headers(Column* lst, Column* keys, Column* vals, const unsigned char* p,
                         Py_ssize_t n) noexcept nogil:
    """One LIST slot of (key, value) entries from the ring's header encoding
    (u32 key length, key, i32 value length or -1, value)."""
    cdef Py_ssize_t pos = 0
    cdef uint32_t kl
    cdef int32_t vl
    while pos + 4 <= n:
        memcpy(&kl, p + pos, 4)
        pos += 4
        if col_append_bytes(keys, p + pos, kl) < 0:
            return -1
        pos += kl
        memcpy(&vl, p + pos, 4)
        pos += 4
        if vl < 0:
            if col_append_null(vals) < 0:
                return -1
        else:
            if col_append_bytes(vals, p + pos, vl) < 0:
                return -1
            pos += vl
    return col_append_list_end(lst, keys.length)


cdef int _fill_metadata(Ring ring, RingView view, Batch out, tuple metadata) except -1:
    """Append the coordinate columns of every good row of ``out`` (from its slot)."""
    cdef Py_ssize_t base, r, j, col, nrows = out.num_rows, nparts = len(ring.partitions)
    cdef const int32_t* src = <const int32_t*>out.source_index.values.data
    cdef Slot* sl
    cdef Column* c
    cdef int64_t seq
    cdef int rc, code
    cdef bytes t
    cdef list topics
    cdef int32_t* parts
    codes = [_META_FIELDS.index(what) for what, _ in metadata]
    if 5 in codes and not ring.keep_headers:
        raise ValueError("metadata: headers need a ring that keeps them (keep_headers=True)")
    spec = []
    fields = []
    firsts = []
    for j in range(len(metadata)):
        name = metadata[j][1]
        col = out.ncols + len(spec)
        firsts.append(len(spec))
        if codes[j] == 5:   # LIST of (key str, value bytes or null)
            spec += [(name, 7, False), (name + ".item.key", 6, False),
                     (name + ".item.value", 6, True)]
            fields.append((name, ListNode(col, RecordNode(
                (("key", ValueNode(col + 1, "str")), ("value", ValueNode(col + 2, "bytes")))))))
            continue
        kind, nullable, conv = _META_COLUMNS[codes[j]]
        spec.append((name, kind, nullable))
        fields.append((name, ValueNode(col, conv)))
    parts = <int32_t*>malloc((nparts or 1) * sizeof(int32_t))
    if parts == NULL:
        raise MemoryError()
    try:
        for r in range(nparts):
            parts[r] = ring.partitions[r]
        topics = [tp.encode() for tp in ring.topics]
        base = out.extend_columns(tuple(spec), tuple(fields))
        for j in range(len(metadata)):
            c = &out.cols[base + firsts[j]]
            code = codes[j]
            for r in range(nrows):
                seq = view.seqs[src[r]]
                sl = &ring.slots[seq % ring.capacity_messages]
                if code == 0:
                    t = topics[sl.part]
                    rc = col_append_bytes(c, <const unsigned char*>PyBytes_AS_STRING(t),
                                          PyBytes_GET_SIZE(t))
                elif code == 1:
                    rc = col_append_i32(c, parts[sl.part])
                elif code == 2:
                    rc = col_append_i64(c, sl.offset)
                elif code == 3:
                    rc = col_append_i64(c, sl.timestamp) if sl.timestamp >= 0 else col_append_null(c)
                elif code == 5:
                    if not (sl.flags & F_HEADERS):
                        rc = col_append_list_end(c, c[1].length)
                    elif sl.flags & F_OVERSIZED:
                        t = ring.overflow[seq][2]
                        rc = _append_headers(c, c + 1, c + 2,
                                             <const unsigned char*>PyBytes_AS_STRING(t),
                                             PyBytes_GET_SIZE(t))
                    else:
                        rc = _append_headers(c, c + 1, c + 2,
                                             ring.arena + sl.aoff + sl.klen + sl.vlen, sl.hlen)
                elif not (sl.flags & F_KEY):
                    rc = col_append_null(c)
                elif sl.flags & F_OVERSIZED:
                    t = ring.overflow[seq][0]
                    rc = col_append_bytes(c, <const unsigned char*>PyBytes_AS_STRING(t),
                                          PyBytes_GET_SIZE(t))
                else:
                    rc = col_append_bytes(c, ring.arena + sl.aoff, sl.klen)
                if rc < 0:
                    raise MemoryError()
    finally:
        free(parts)
    return 0
