# cython: language_level=3
"""A librdkafka consumer driven from Cython: messages go from librdkafka's
fetch buffers straight into the ring's arena, no Python object per message.

Linking: kfast never links against librdkafka. ``load()`` finds the copy that
confluent-kafka already loaded (its wheel ships one in
``confluent_kafka.libs``; one librdkafka per process) - or the file the user
names in ``KFAST_LIBRDKAFKA`` - opens it with ``dlopen`` and looks up the
functions of ``_rdkafka.pxd`` with ``dlsym``.

Threads: every method is called from one thread (the pipeline's poll thread).
``consume_into`` releases the GIL while librdkafka waits for messages;
librdkafka serves rebalances, commit results, statistics, errors and log
lines from that same call, and their callbacks take the GIL to call the
owner (``kfast.runtime.kafka.source.CompiledSource``).
"""

from libc.stdint cimport int32_t, int64_t, uint32_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, strlen

from kfast.runtime.kafka._rdkafka cimport *
from kfast.runtime.ring._ring cimport ring_lookup, ring_store

cdef extern from *:
    """
    #ifdef _WIN32
    /* Not supported on Windows (the confluent source is used there). */
    #define KFAST_HAVE_DLOPEN 0
    static void* kfast_dlopen(const char* path, int noload) { return NULL; }
    static void* kfast_dlsym(void* h, const char* name) { return NULL; }
    static const char* kfast_dlerror(void) { return "not supported on Windows"; }
    #else
    #include <dlfcn.h>
    #define KFAST_HAVE_DLOPEN 1
    static void* kfast_dlopen(const char* path, int noload) {
        /* RTLD_NOLOAD: only a library already in the process (confluent-kafka's) */
        return dlopen(path, noload ? (RTLD_NOW | RTLD_NOLOAD) : (RTLD_NOW | RTLD_LOCAL));
    }
    static void* kfast_dlsym(void* h, const char* name) { return dlsym(h, name); }
    static const char* kfast_dlerror(void) {
        const char* e = dlerror();
        return e ? e : "unknown error";
    }
    #endif
    """
    int KFAST_HAVE_DLOPEN
    void* kfast_dlopen(const char* path, int noload) nogil
    void* kfast_dlsym(void* h, const char* name) nogil
    const char* kfast_dlerror() nogil

cdef RdKafkaAPI api
cdef bint _loaded = False
cdef object _path = None

# (field of RdKafkaAPI, librdkafka symbol), in struct order
_SYMBOLS = (
    "version", "version_str", "err2str", "err2name", "conf_new", "conf_destroy",
    "conf_set", "conf_set_opaque", "conf_set_rebalance_cb", "conf_set_offset_commit_cb",
    "conf_set_error_cb", "conf_set_stats_cb", "conf_set_log_cb", "new", "destroy",
    "opaque", "poll_set_consumer", "queue_get_consumer", "queue_get_main",
    "queue_destroy", "set_log_queue", "consume_batch_queue", "message_destroy",
    "topic_name", "message_timestamp", "message_headers", "header_get_all", "subscribe",
    "consumer_close", "assign", "incremental_assign", "incremental_unassign",
    "rebalance_protocol", "assignment", "assignment_lost", "pause_partitions",
    "resume_partitions", "seek_partitions", "commit", "topic_partition_list_new",
    "topic_partition_list_add", "topic_partition_list_destroy", "error_code",
    "error_string", "error_destroy", "fatal_error", "committed", "query_watermark_offsets",
    "destroy_flags", "commit_queue", "unsubscribe",
)

# The oldest librdkafka with every function above (seek_partitions: 1.6.0,
# KIP-848 consumer protocol GA: 2.4.0 is needed only when it is configured).
MIN_VERSION = 0x010600ff


def _find_loaded():
    """Path of the librdkafka confluent-kafka loaded into this process, or None."""
    import glob
    import os

    import confluent_kafka.cimpl  # loads librdkafka
    # the wheel's own copy sits next to the package (auditwheel / delocate)
    base = os.path.dirname(os.path.dirname(confluent_kafka.cimpl.__file__))
    bundled = []
    for pattern in ("confluent_kafka.libs/librdkafka*", "confluent_kafka/.dylibs/librdkafka*"):
        bundled += sorted(glob.glob(os.path.join(base, pattern)))
    mapped = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rstrip("\n").split(None, 5)[-1]
                name = path.rsplit("/", 1)[-1]
                if name.startswith("librdkafka") and ".so" in name and path not in mapped:
                    mapped.append(path)
    except OSError:
        pass   # no /proc (macOS)
    # prefer the bundled copy if it is the one in the process; a librdkafka
    # some other module loaded is not necessarily confluent-kafka's
    for path in mapped:
        if any(os.path.realpath(path) == os.path.realpath(b) for b in bundled):
            return path
    if mapped:
        return mapped[0]   # confluent-kafka built against a system librdkafka
    return bundled[0] if bundled else None


def load(path=None):
    """Load librdkafka's functions; return the library's path. Idempotent.

    ``path``: a librdkafka shared library to use instead of confluent-kafka's
    (default: ``KFAST_LIBRDKAFKA`` from the environment, else the loaded one).
    Raises ImportError when no usable librdkafka is found.
    """
    global _loaded, _path
    import os
    if not KFAST_HAVE_DLOPEN:
        raise ImportError("kfast's compiled consumer is not supported on this platform")
    if _loaded:
        if path is not None and path != _path:
            raise ImportError(f"librdkafka is already loaded from {_path}; cannot switch to {path}")
        return _path
    if path is None:
        path = os.environ.get("KFAST_LIBRDKAFKA") or _find_loaded()
    if path is None:
        raise ImportError("no librdkafka found (confluent-kafka loaded none; "
                          "set KFAST_LIBRDKAFKA to a librdkafka shared library)")
    bpath = os.fsencode(path)
    cdef void* h = kfast_dlopen(bpath, 1)
    if h == NULL:
        h = kfast_dlopen(bpath, 0)
    if h == NULL:
        raise ImportError(f"cannot dlopen {path}: {_s(kfast_dlerror())}")
    cdef void** slots = <void**>&api
    cdef void* f
    for i, name in enumerate(_SYMBOLS):
        f = kfast_dlsym(h, ("rd_kafka_" + name).encode())
        if f == NULL:
            raise ImportError(f"{path} has no rd_kafka_{name} (librdkafka too old?)")
        slots[i] = f
    if api.version() < MIN_VERSION:
        raise ImportError(f"{path} is librdkafka {api.version_str().decode()}; "
                          "kfast's compiled consumer needs >= 1.6")
    _loaded = True
    _path = path
    return path


def version():
    """(version string, version int) of the loaded librdkafka."""
    load()
    return api.version_str().decode(), api.version()


cdef inline str _s(const char* p):
    return None if p == NULL else p.decode("utf-8", "replace")


cdef str _err_str(rd_kafka_resp_err_t err):
    return _s(api.err2str(err))


cdef object _error_message(rd_kafka_error_t* e):
    """(code, text) of an rd_kafka_error_t, which is destroyed."""
    code = api.error_code(e)
    text = _s(api.error_string(e))
    api.error_destroy(e)
    return code, text


cdef list _tuples(const rd_kafka_topic_partition_list_t* parts):
    """[(topic, partition, offset, error code)]"""
    cdef int i
    out = []
    if parts == NULL:
        return out
    for i in range(parts.cnt):
        out.append((_s(parts.elems[i].topic), parts.elems[i].partition,
                    parts.elems[i].offset, parts.elems[i].err))
    return out


cdef rd_kafka_topic_partition_list_t* _c_list(list items) except NULL:
    """[(topic, partition[, offset])] -> a new list (destroy it)."""
    cdef rd_kafka_topic_partition_list_t* out = api.topic_partition_list_new(
        len(items) if items else 1)
    cdef rd_kafka_topic_partition_t* tp
    if out == NULL:
        raise MemoryError()
    for item in items:
        tp = api.topic_partition_list_add(out, (<str>item[0]).encode("utf-8"), <int32_t>item[1])
        if len(item) > 2:
            tp.offset = <int64_t>item[2]
    return out


cdef _kafka_exception(int code, str reason, bint fatal=False):
    from confluent_kafka import KafkaError, KafkaException
    return KafkaException(KafkaError(code, reason, fatal=fatal))


# ------------------------------------------------------------------ callbacks
# librdkafka calls these from consume_into / close on the poll thread (never
# from its own threads: log.queue is on, everything else is served by the
# consumer queue). Each takes the GIL; an exception is kept and raised by the
# call that served the callback, as confluent-kafka does.

cdef inline Consumer _owner(const rd_kafka_t* rk):
    return <Consumer>api.opaque(rk)


cdef void _rebalance_cb(rd_kafka_t* rk, rd_kafka_resp_err_t err,
                        rd_kafka_topic_partition_list_t* parts, void* opaque) noexcept with gil:
    (<Consumer>opaque)._rebalance(err, parts)


cdef void _commit_cb(rd_kafka_t* rk, rd_kafka_resp_err_t err,
                     rd_kafka_topic_partition_list_t* parts, void* opaque) noexcept with gil:
    c = <Consumer>opaque
    try:
        c.owner._on_commit_result(err, _err_str(err) if err else None, _tuples(parts))
    except BaseException as e:
        c._keep(e)


cdef void _error_cb(rd_kafka_t* rk, int err, const char* reason, void* opaque) noexcept with gil:
    cdef char buf[512]
    cdef bint fatal = False
    c = <Consumer>opaque
    text = _s(reason)
    if err == ERR__FATAL:
        fatal = True
        buf[0] = 0
        err = api.fatal_error(rk, buf, sizeof(buf))
        text = _s(buf)
    try:
        c.owner._on_error_event(err, text, fatal)
    except BaseException as e:
        c._keep(e)


cdef int _stats_cb(rd_kafka_t* rk, char* json, size_t n, void* opaque) noexcept with gil:
    c = <Consumer>opaque
    try:
        c.owner._on_stats(json[:n].decode("utf-8", "replace"))
    except BaseException as e:
        c._keep(e)
    return 0   # librdkafka frees the JSON


cdef void _log_cb(const rd_kafka_t* rk, int level, const char* fac,
                  const char* buf) noexcept with gil:
    try:
        c = _owner(rk)
        c.owner._on_log(level, _s(fac), _s(buf))
    except BaseException:
        pass   # a log line must never break consuming


cdef struct SyncCommit:
    rd_kafka_resp_err_t err
    rd_kafka_resp_err_t part_err
    int part_index


cdef void _sync_commit_cb(rd_kafka_t* rk, rd_kafka_resp_err_t err,
                          rd_kafka_topic_partition_list_t* parts, void* opaque) noexcept nogil:
    """The result of one synchronous commit (served inside commit_queue, no GIL)."""
    cdef SyncCommit* res = <SyncCommit*>opaque
    cdef int i
    res.err = err
    if parts != NULL:
        for i in range(parts.cnt):
            if parts.elems[i].err:
                res.part_err = parts.elems[i].err
                res.part_index = i
                break


cdef class Consumer:
    """One librdkafka consumer handle (see the module docstring)."""
    cdef rd_kafka_t* rk
    cdef rd_kafka_queue_t* queue
    cdef rd_kafka_message_t** msgs
    cdef Py_ssize_t cap_msgs
    cdef unsigned char* hbuf          # scratch for one message's encoded headers
    cdef Py_ssize_t cap_hbuf
    cdef readonly object owner
    cdef object _pending              # exception raised inside a callback
    cdef readonly bint closed
    cdef readonly str protocol        # "COOPERATIVE", "EAGER" or "NONE" (not in a group yet)
    cdef readonly unsigned long rebalances   # rebalance callbacks served
    cdef readonly bint leaving        # close() is leaving the group (before consumer_close)
    cdef readonly bint left           # close() left the group: nothing was assigned any more

    def __cinit__(self, dict conf, object owner):
        cdef char errstr[512]
        cdef rd_kafka_conf_t* c
        load()
        self.owner = owner
        c = api.conf_new()
        if c == NULL:
            raise MemoryError()
        for k, v in conf.items():
            if isinstance(v, bool):
                v = "true" if v else "false"
            errstr[0] = 0
            if api.conf_set(c, str(k).encode(), str(v).encode(), errstr, sizeof(errstr)) \
                    != RD_KAFKA_CONF_OK:
                api.conf_destroy(c)
                raise ValueError(_s(errstr))
        errstr[0] = 0
        # log lines go to the main queue (forwarded to the consumer queue below)
        # and reach _log_cb on the poll thread, never stderr
        api.conf_set(c, b"log.queue", b"true", errstr, sizeof(errstr))
        api.conf_set_opaque(c, <void*>self)
        api.conf_set_rebalance_cb(c, _rebalance_cb)
        api.conf_set_offset_commit_cb(c, _commit_cb)
        api.conf_set_error_cb(c, _error_cb)
        api.conf_set_stats_cb(c, _stats_cb)
        api.conf_set_log_cb(c, _log_cb)
        self.rk = api.new(RD_KAFKA_CONSUMER, c, errstr, sizeof(errstr))
        if self.rk == NULL:
            api.conf_destroy(c)     # rd_kafka_new takes ownership only on success
            raise ValueError(_s(errstr))
        api.set_log_queue(self.rk, NULL)
        api.poll_set_consumer(self.rk)
        self.queue = api.queue_get_consumer(self.rk)
        self.protocol = "NONE"

    def __dealloc__(self):
        # close() is the orderly path; this only frees what is left, without
        # leaving the group (that would run callbacks on a half-freed object)
        if self.queue != NULL:
            api.queue_destroy(self.queue)
        if self.rk != NULL:
            with nogil:
                api.destroy_flags(self.rk, RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE)
        free(self.msgs)
        free(self.hbuf)

    cdef void _keep(self, BaseException e):
        if self._pending is None:
            self._pending = e

    cdef int _raise_pending(self) except -1:
        if self._pending is not None:
            e, self._pending = self._pending, None
            raise e
        return 0

    cdef int _check(self) except -1:
        if self.rk == NULL:
            raise RuntimeError("the consumer is closed")
        return 0

    # --------------------------------------------------------------- rebalance
    cdef void _rebalance(self, rd_kafka_resp_err_t err,
                         rd_kafka_topic_partition_list_t* parts) noexcept:
        """Tell the owner, then (un)assign - also when the owner raised."""
        cdef int i
        cdef bint cooperative
        self.rebalances += 1
        proto = _s(api.rebalance_protocol(self.rk))
        if proto in (None, "NONE") and err != ERR__ASSIGN_PARTITIONS:
            # a member leaving the group may no longer report the protocol: a
            # revoke undoes the last assignment, under that assignment's protocol
            proto = self.protocol
        self.protocol = proto or "NONE"
        cooperative = proto == "COOPERATIVE"
        items = _tuples(parts)
        try:
            if err == ERR__ASSIGN_PARTITIONS:
                offsets = self.owner._on_rebalance("assign", items)
                if offsets:
                    for i in range(parts.cnt):
                        start = offsets.get((_s(parts.elems[i].topic), parts.elems[i].partition))
                        if start is not None:
                            parts.elems[i].offset = start
            elif err == ERR__REVOKE_PARTITIONS:
                lost = api.assignment_lost(self.rk)
                self.owner._on_rebalance("lost" if lost else "revoke", items)
            else:
                self.owner._on_rebalance_error(err, _err_str(err))
        except BaseException as e:
            self._keep(e)
        try:
            self._apply(err, parts, cooperative)
        except BaseException as e:
            self._keep(e)

    cdef int _apply(self, rd_kafka_resp_err_t err, rd_kafka_topic_partition_list_t* parts,
                    bint cooperative) except -1:
        cdef rd_kafka_error_t* e = NULL
        cdef rd_kafka_resp_err_t r = 0
        cdef rd_kafka_t* rk = self.rk
        # these wait for librdkafka's main thread: without the GIL, so that a
        # slow (or lost) reply stalls this consumer only, not every Python thread
        with nogil:
            if err == ERR__ASSIGN_PARTITIONS:
                if cooperative:
                    e = api.incremental_assign(rk, parts)
                else:
                    r = api.assign(rk, parts)
            elif err == ERR__REVOKE_PARTITIONS and cooperative:
                e = api.incremental_unassign(rk, parts)
            else:
                r = api.assign(rk, NULL)
        if e != NULL:
            code, text = _error_message(e)
            raise _kafka_exception(code, text)
        if r:
            raise _kafka_exception(r, _err_str(r))
        return 0

    cdef int _leave(self, double timeout) except -1:
        """Unsubscribe and serve rebalances until nothing is assigned (see close)."""
        from time import monotonic
        cdef rd_kafka_resp_err_t r
        cdef Py_ssize_t got
        cdef unsigned long seen
        with nogil:
            r = api.unsubscribe(self.rk)
        if r:
            return 0   # consumer_close leaves the group itself
        deadline = monotonic() + timeout
        while True:
            seen = self.rebalances
            got = self._fetch(100, 0.1)
            self._destroy_msgs(0, got)   # not stored, not committed: read again by the next owner
            if self.rebalances == seen and self._assigned() <= 0:
                self.left = True
                return 0
            if monotonic() >= deadline:
                return 0

    cdef int _assigned(self) noexcept:
        """How many partitions are assigned (-1 if librdkafka cannot tell)."""
        cdef rd_kafka_topic_partition_list_t* lst = NULL
        cdef rd_kafka_resp_err_t r
        cdef int n
        with nogil:
            r = api.assignment(self.rk, &lst)
        if r or lst == NULL:
            return -1
        n = lst.cnt
        api.topic_partition_list_destroy(lst)
        return n

    # ----------------------------------------------------------------- consume
    def subscribe(self, list topics):
        self._check()
        cdef rd_kafka_topic_partition_list_t* lst = _c_list([(t, -1) for t in topics])
        cdef rd_kafka_resp_err_t r = api.subscribe(self.rk, lst)
        api.topic_partition_list_destroy(lst)
        if r:
            raise _kafka_exception(r, _err_str(r))

    cdef Py_ssize_t _fetch(self, Py_ssize_t n, double timeout) except -1:
        cdef Py_ssize_t got
        cdef void* p
        cdef int ms = <int>(timeout * 1000) if timeout >= 0 else -1
        self._check()
        if n < 1:
            n = 1
        if n > self.cap_msgs:
            p = realloc(self.msgs, n * sizeof(rd_kafka_message_t*))
            if p == NULL:
                raise MemoryError()
            self.msgs = <rd_kafka_message_t**>p
            self.cap_msgs = n
        with nogil:
            got = api.consume_batch_queue(self.queue, ms, self.msgs, n)
        if got < 0:
            got = 0
        return got

    cdef void _destroy_msgs(self, Py_ssize_t start, Py_ssize_t got) noexcept nogil:
        cdef Py_ssize_t i
        for i in range(start, got):
            api.message_destroy(self.msgs[i])

    def consume_into(self, object ring, Py_ssize_t max_messages, double timeout):
        """Wait up to ``timeout`` s for up to ``max_messages`` messages and store
        them in ``ring`` (``kfast.runtime.ring.Ring``); return how many were stored.

        Error messages are appended to ``ring.errors`` as ``KafkaError`` (partition
        EOF is ignored), exactly as ``Ring.push`` does."""
        cdef Py_ssize_t got = self._fetch(max_messages, timeout)
        cdef Py_ssize_t i = 0
        cdef Py_ssize_t stored = 0
        cdef rd_kafka_message_t* m
        cdef rd_kafka_topic_t* last_rkt = NULL
        cdef int32_t last_part = -1
        cdef int p = -1
        cdef int tstype
        cdef int64_t ts
        cdef bint headers = ring.keep_headers
        cdef Py_ssize_t hlen
        try:
            for i in range(got):
                m = self.msgs[i]
                if m.err:
                    if m.err != ERR__PARTITION_EOF:
                        ring.errors.append(self._message_error(m))
                    continue
                if m.rkt != last_rkt or m.partition != last_part:
                    p = ring_lookup(ring, _s(api.topic_name(m.rkt)), m.partition)
                    last_rkt = m.rkt
                    last_part = m.partition
                ts = api.message_timestamp(m, &tstype)
                if tstype == RD_KAFKA_TIMESTAMP_NOT_AVAILABLE:
                    ts = -1
                hlen = self._encode_headers(m) if headers else 0
                stored += ring_store(ring, p, m.offset, ts,
                                     <const unsigned char*>m.key, m.key_len,
                                     <const unsigned char*>m.payload, m.len,
                                     self.hbuf, hlen)
        finally:
            self._destroy_msgs(0, got)
        # after the messages are stored: a failing callback loses nothing
        self._raise_pending()
        return stored

    def consume_discard(self, Py_ssize_t max_messages, double timeout):
        """Serve the consumer (group, callbacks) for up to ``timeout`` s; messages
        are dropped. Returns how many were dropped."""
        cdef Py_ssize_t got = self._fetch(max_messages, timeout)
        self._destroy_msgs(0, got)
        self._raise_pending()
        return got

    cdef object _message_error(self, rd_kafka_message_t* m):
        from confluent_kafka import KafkaError
        text = None
        if m.payload != NULL:
            text = (<const char*>m.payload)[:m.len].decode("utf-8", "replace")
        return KafkaError(m.err, text or _err_str(m.err))

    cdef Py_ssize_t _encode_headers(self, rd_kafka_message_t* m) except -1:
        """Encode the headers into hbuf in the ring's format; return the length."""
        cdef rd_kafka_headers_t* hdrs = NULL
        cdef const char* name
        cdef const void* val
        cdef size_t vsize, idx = 0
        cdef Py_ssize_t pos = 0, kl, need
        cdef uint32_t k32
        cdef int32_t v32
        cdef void* p
        if api.message_headers(m, &hdrs) != ERR_NO_ERROR or hdrs == NULL:
            return 0
        while api.header_get_all(hdrs, idx, &name, &val, &vsize) == ERR_NO_ERROR:
            idx += 1
            kl = strlen(name)
            need = pos + 8 + kl + (<Py_ssize_t>vsize if val != NULL else 0)
            if need > self.cap_hbuf:
                p = realloc(self.hbuf, need * 2)
                if p == NULL:
                    raise MemoryError()
                self.hbuf = <unsigned char*>p
                self.cap_hbuf = need * 2
            k32 = <uint32_t>kl
            memcpy(self.hbuf + pos, &k32, 4)
            memcpy(self.hbuf + pos + 4, name, kl)
            pos += 4 + kl
            if val == NULL:
                v32 = -1
                memcpy(self.hbuf + pos, &v32, 4)
                pos += 4
            else:
                v32 = <int32_t>vsize
                memcpy(self.hbuf + pos, &v32, 4)
                if vsize:
                    memcpy(self.hbuf + pos + 4, val, vsize)
                pos += 4 + <Py_ssize_t>vsize
        return pos

    # --------------------------------------------------------------- partitions
    def assignment(self):
        """[(topic, partition)] currently assigned."""
        cdef rd_kafka_topic_partition_list_t* lst = NULL
        self._check()
        cdef rd_kafka_resp_err_t r = api.assignment(self.rk, &lst)
        if r:
            raise _kafka_exception(r, _err_str(r))
        out = [(t, p) for t, p, _o, _e in _tuples(lst)]
        api.topic_partition_list_destroy(lst)
        return out

    def assignment_lost(self):
        self._check()
        return bool(api.assignment_lost(self.rk))

    def rebalance_protocol(self):
        self._check()
        return _s(api.rebalance_protocol(self.rk))

    def pause(self, list partitions):
        self._pause_resume(partitions, True)

    def resume(self, list partitions):
        self._pause_resume(partitions, False)

    cdef _pause_resume(self, list partitions, bint pause):
        self._check()
        cdef rd_kafka_topic_partition_list_t* lst = _c_list(partitions)
        cdef rd_kafka_resp_err_t r
        if pause:
            r = api.pause_partitions(self.rk, lst)
        else:
            r = api.resume_partitions(self.rk, lst)
        api.topic_partition_list_destroy(lst)
        if r:
            raise _kafka_exception(r, _err_str(r))

    def seek(self, str topic, int partition, int64_t offset):
        """Fetch ``topic[partition]`` from ``offset`` on; an unassigned
        partition raises KafkaException."""
        self._check()
        cdef rd_kafka_topic_partition_list_t* lst = _c_list([(topic, partition, offset)])
        cdef rd_kafka_error_t* e
        cdef rd_kafka_resp_err_t r
        # blocking (as confluent-kafka's seek): once it returns, no message
        # fetched before the seek can be consumed any more
        with nogil:
            e = api.seek_partitions(self.rk, lst, -1)
        r = lst.elems[0].err
        api.topic_partition_list_destroy(lst)
        if e != NULL:
            code, text = _error_message(e)
            raise _kafka_exception(code, text)
        if r:
            raise _kafka_exception(r, _err_str(r))

    def commit(self, list offsets, bint asynchronous):
        """Commit [(topic, partition, next offset)]. Asynchronous: the result
        arrives in ``owner._on_commit_result`` from a later consume call.
        Synchronous: waits (GIL released) with a callback of its own - so, as
        with confluent-kafka, ``_on_commit_result`` does not see it - and raises
        KafkaException on failure."""
        self._check()
        cdef rd_kafka_topic_partition_list_t* lst = _c_list(offsets)
        cdef rd_kafka_resp_err_t r
        cdef SyncCommit res
        res.err = 0
        res.part_err = 0
        res.part_index = -1
        if asynchronous:
            r = api.commit(self.rk, lst, 1)
        else:
            with nogil:
                # no queue: librdkafka waits for the result and serves _sync_commit_cb here
                r = api.commit_queue(self.rk, lst, NULL, _sync_commit_cb, &res)
            if not r:
                r = res.err
        if not r and res.part_err:
            item = offsets[res.part_index] if 0 <= res.part_index < len(offsets) else ("?", -1)
            api.topic_partition_list_destroy(lst)
            raise _kafka_exception(res.part_err, f"{item[0]}[{item[1]}]: {_err_str(res.part_err)}")
        api.topic_partition_list_destroy(lst)
        if r:
            raise _kafka_exception(r, _err_str(r))

    def committed(self, list partitions, double timeout):
        """[(topic, partition, committed offset or -1001)] from the group coordinator."""
        self._check()
        cdef rd_kafka_topic_partition_list_t* lst = _c_list(partitions)
        cdef rd_kafka_resp_err_t r
        cdef int ms = <int>(timeout * 1000)
        with nogil:
            r = api.committed(self.rk, lst, ms)
        out = [(t, p, o) for t, p, o, _e in _tuples(lst)]
        api.topic_partition_list_destroy(lst)
        if r:
            raise _kafka_exception(r, _err_str(r))
        return out

    def watermarks(self, str topic, int32_t partition, double timeout):
        """(low, high) offsets of a partition, asked from its leader."""
        self._check()
        cdef int64_t low = -1, high = -1
        cdef int ms = <int>(timeout * 1000)
        cdef rd_kafka_resp_err_t r
        b = topic.encode("utf-8")
        cdef const char* t = b
        with nogil:
            r = api.query_watermark_offsets(self.rk, t, partition, &low, &high, ms)
        if r:
            raise _kafka_exception(r, _err_str(r))
        return low, high

    def close(self, double leave_timeout=10.0):
        """Leave the group (revoke callbacks run here) and free the handle;
        librdkafka's threads are joined. Idempotent.

        The group is left before ``rd_kafka_consumer_close``: unsubscribe, then
        serve the queue as ``consume_discard`` does (the revoke callback runs
        as in any rebalance) until nothing is assigned, for at most
        ``leave_timeout`` s. ``rd_kafka_consumer_close`` then has nothing to
        revoke, so no rebalance callback runs inside it: librdkafka can lose
        the reply to an assign() issued from a rebalance callback during
        consumer_close, and that call then never returns (librdkafka issue
        #4884; #4041 for rebalance_protocol())."""
        cdef rd_kafka_t* rk = self.rk
        if rk == NULL:
            return
        self.closed = True
        self.leaving = True
        try:
            self._leave(leave_timeout)
        finally:
            self.leaving = False
            with nogil:
                api.consumer_close(rk)
        api.queue_destroy(self.queue)
        self.queue = NULL
        with nogil:
            api.destroy(rk)
        self.rk = NULL
        self.owner = None   # no callback can come any more: break the owner <-> consumer cycle
        self._raise_pending()
