# cython: language_level=3
"""The part of librdkafka's C API (rdkafka.h) that kfast's consumer uses.

kfast does not link against librdkafka: ``_consumer.pyx`` finds the copy
already loaded by confluent-kafka (or one the user names) at import and looks
these functions up with ``dlsym``. Only the types are declared here; the
layouts of the three public structs below are part of librdkafka's stable ABI.
"""
from libc.stdint cimport int32_t, int64_t

cdef extern from *:
    """
    typedef struct kfast_rd_kafka_s kfast_rd_kafka_t;
    typedef struct kfast_rd_kafka_conf_s kfast_rd_kafka_conf_t;
    typedef struct kfast_rd_kafka_queue_s kfast_rd_kafka_queue_t;
    typedef struct kfast_rd_kafka_topic_s kfast_rd_kafka_topic_t;
    typedef struct kfast_rd_kafka_headers_s kfast_rd_kafka_headers_t;
    typedef struct kfast_rd_kafka_error_s kfast_rd_kafka_error_t;
    """
    ctypedef struct rd_kafka_t "kfast_rd_kafka_t"
    ctypedef struct rd_kafka_conf_t "kfast_rd_kafka_conf_t"
    ctypedef struct rd_kafka_queue_t "kfast_rd_kafka_queue_t"
    ctypedef struct rd_kafka_topic_t "kfast_rd_kafka_topic_t"
    ctypedef struct rd_kafka_headers_t "kfast_rd_kafka_headers_t"
    ctypedef struct rd_kafka_error_t "kfast_rd_kafka_error_t"

ctypedef int rd_kafka_resp_err_t

cdef enum:
    RD_KAFKA_CONSUMER = 1
    RD_KAFKA_CONF_OK = 0
    RD_KAFKA_TIMESTAMP_NOT_AVAILABLE = 0
    ERR_NO_ERROR = 0
    ERR__REVOKE_PARTITIONS = -174
    ERR__ASSIGN_PARTITIONS = -175
    ERR__NO_OFFSET = -168
    ERR__FATAL = -150
    ERR__PARTITION_EOF = -191
    ERR__NOENT = -156
    RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE = 8

ctypedef struct rd_kafka_message_t:
    rd_kafka_resp_err_t err
    rd_kafka_topic_t* rkt
    int32_t partition
    void* payload
    size_t len
    void* key
    size_t key_len
    int64_t offset
    void* _private

ctypedef struct rd_kafka_topic_partition_t:
    char* topic
    int32_t partition
    int64_t offset
    void* metadata
    size_t metadata_size
    void* opaque
    rd_kafka_resp_err_t err
    void* _private

ctypedef struct rd_kafka_topic_partition_list_t:
    int cnt
    int size
    rd_kafka_topic_partition_t* elems

ctypedef void (*rebalance_cb_t)(rd_kafka_t*, rd_kafka_resp_err_t,
                                rd_kafka_topic_partition_list_t*, void*) noexcept
ctypedef void (*commit_cb_t)(rd_kafka_t*, rd_kafka_resp_err_t,
                             rd_kafka_topic_partition_list_t*, void*) noexcept nogil
ctypedef void (*error_cb_t)(rd_kafka_t*, int, const char*, void*) noexcept
ctypedef int (*stats_cb_t)(rd_kafka_t*, char*, size_t, void*) noexcept
ctypedef void (*log_cb_t)(const rd_kafka_t*, int, const char*, const char*) noexcept

# One function pointer per librdkafka function kfast calls, filled by dlsym.
ctypedef struct RdKafkaAPI:
    int (*version)() noexcept nogil
    const char* (*version_str)() noexcept nogil
    const char* (*err2str)(rd_kafka_resp_err_t) noexcept nogil
    const char* (*err2name)(rd_kafka_resp_err_t) noexcept nogil
    rd_kafka_conf_t* (*conf_new)() noexcept nogil
    void (*conf_destroy)(rd_kafka_conf_t*) noexcept nogil
    int (*conf_set)(rd_kafka_conf_t*, const char*, const char*, char*, size_t) noexcept nogil
    void (*conf_set_opaque)(rd_kafka_conf_t*, void*) noexcept nogil
    void (*conf_set_rebalance_cb)(rd_kafka_conf_t*, rebalance_cb_t) noexcept nogil
    void (*conf_set_offset_commit_cb)(rd_kafka_conf_t*, commit_cb_t) noexcept nogil
    void (*conf_set_error_cb)(rd_kafka_conf_t*, error_cb_t) noexcept nogil
    void (*conf_set_stats_cb)(rd_kafka_conf_t*, stats_cb_t) noexcept nogil
    void (*conf_set_log_cb)(rd_kafka_conf_t*, log_cb_t) noexcept nogil
    rd_kafka_t* (*new)(int, rd_kafka_conf_t*, char*, size_t) noexcept nogil
    void (*destroy)(rd_kafka_t*) noexcept nogil
    void* (*opaque)(const rd_kafka_t*) noexcept nogil
    rd_kafka_resp_err_t (*poll_set_consumer)(rd_kafka_t*) noexcept nogil
    rd_kafka_queue_t* (*queue_get_consumer)(rd_kafka_t*) noexcept nogil
    rd_kafka_queue_t* (*queue_get_main)(rd_kafka_t*) noexcept nogil
    void (*queue_destroy)(rd_kafka_queue_t*) noexcept nogil
    rd_kafka_resp_err_t (*set_log_queue)(rd_kafka_t*, rd_kafka_queue_t*) noexcept nogil
    Py_ssize_t (*consume_batch_queue)(rd_kafka_queue_t*, int, rd_kafka_message_t**,
                                   size_t) noexcept nogil
    void (*message_destroy)(rd_kafka_message_t*) noexcept nogil
    const char* (*topic_name)(const rd_kafka_topic_t*) noexcept nogil
    int64_t (*message_timestamp)(const rd_kafka_message_t*, int*) noexcept nogil
    rd_kafka_resp_err_t (*message_headers)(const rd_kafka_message_t*,
                                           rd_kafka_headers_t**) noexcept nogil
    rd_kafka_resp_err_t (*header_get_all)(const rd_kafka_headers_t*, size_t, const char**,
                                          const void**, size_t*) noexcept nogil
    rd_kafka_resp_err_t (*subscribe)(rd_kafka_t*,
                                     const rd_kafka_topic_partition_list_t*) noexcept nogil
    rd_kafka_resp_err_t (*consumer_close)(rd_kafka_t*) noexcept nogil
    rd_kafka_resp_err_t (*assign)(rd_kafka_t*,
                                  const rd_kafka_topic_partition_list_t*) noexcept nogil
    rd_kafka_error_t* (*incremental_assign)(
        rd_kafka_t*, const rd_kafka_topic_partition_list_t*) noexcept nogil
    rd_kafka_error_t* (*incremental_unassign)(
        rd_kafka_t*, const rd_kafka_topic_partition_list_t*) noexcept nogil
    const char* (*rebalance_protocol)(rd_kafka_t*) noexcept nogil
    rd_kafka_resp_err_t (*assignment)(rd_kafka_t*, rd_kafka_topic_partition_list_t**) noexcept nogil
    int (*assignment_lost)(rd_kafka_t*) noexcept nogil
    rd_kafka_resp_err_t (*pause_partitions)(rd_kafka_t*,
                                            rd_kafka_topic_partition_list_t*) noexcept nogil
    rd_kafka_resp_err_t (*resume_partitions)(rd_kafka_t*,
                                             rd_kafka_topic_partition_list_t*) noexcept nogil
    rd_kafka_error_t* (*seek_partitions)(rd_kafka_t*, rd_kafka_topic_partition_list_t*,
                                         int) noexcept nogil
    rd_kafka_resp_err_t (*commit)(rd_kafka_t*, const rd_kafka_topic_partition_list_t*,
                                  int) noexcept nogil
    rd_kafka_topic_partition_list_t* (*topic_partition_list_new)(int) noexcept nogil
    rd_kafka_topic_partition_t* (*topic_partition_list_add)(
        rd_kafka_topic_partition_list_t*, const char*, int32_t) noexcept nogil
    void (*topic_partition_list_destroy)(rd_kafka_topic_partition_list_t*) noexcept nogil
    rd_kafka_resp_err_t (*error_code)(const rd_kafka_error_t*) noexcept nogil
    const char* (*error_string)(const rd_kafka_error_t*) noexcept nogil
    void (*error_destroy)(rd_kafka_error_t*) noexcept nogil
    rd_kafka_resp_err_t (*fatal_error)(rd_kafka_t*, char*, size_t) noexcept nogil
    rd_kafka_resp_err_t (*committed)(rd_kafka_t*, rd_kafka_topic_partition_list_t*,
                                     int) noexcept nogil
    rd_kafka_resp_err_t (*query_watermark_offsets)(rd_kafka_t*, const char*, int32_t,
                                                   int64_t*, int64_t*, int) noexcept nogil
    void (*destroy_flags)(rd_kafka_t*, int) noexcept nogil
    rd_kafka_resp_err_t (*commit_queue)(rd_kafka_t*, const rd_kafka_topic_partition_list_t*,
                                        rd_kafka_queue_t*, commit_cb_t, void*) noexcept nogil
    rd_kafka_resp_err_t (*unsubscribe)(rd_kafka_t*) noexcept nogil
