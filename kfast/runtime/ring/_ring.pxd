# cython: language_level=3
# The ring's C push path, for a consumer that holds librdkafka's messages
# itself (kfast.runtime.kafka): no Python object per message.
from libc.stdint cimport int64_t

# Index of (topic, partition) in the ring's partition table, -1 when the ring
# has never seen it (the message is then counted as unassigned and dropped).
cdef int ring_lookup(object ring, str topic, int partition) except -2

# Store one message exactly as Ring.push would: duplicates, gaps, rewinds,
# oversized messages and the unassigned check included. ``key`` NULL: no key;
# ``value`` NULL: a tombstone; ``headers``/``hlen``: already in the ring's
# header encoding (hlen 0: none). ``timestamp`` -1: not available.
# Returns 1 when stored, 0 when dropped. The GIL must be held.
cdef int ring_store(object ring, int p, int64_t offset, int64_t timestamp,
                    const unsigned char* key, Py_ssize_t klen,
                    const unsigned char* value, Py_ssize_t vlen,
                    const unsigned char* headers, Py_ssize_t hlen) except -1
