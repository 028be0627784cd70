"""Real-world schemas: OpenTelemetry OTLP messages and descriptor.proto itself."""

from __future__ import annotations

import pytest
from _protobuf_support import EXAMPLES, compiled, expected, normalize, payloads
from google.protobuf import descriptor_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from kfast.protobuf import ProtobufDecoder

OTLP = [
    trace_pb2.TracesData,
    trace_pb2.Span,
    metrics_pb2.MetricsData,
    logs_pb2.LogsData,
    trace_service_pb2.ExportTraceServiceRequest,
]


def _check(cls, dec, blobs):
    batch = dec.decode(blobs)
    assert not batch.errors, batch.errors[:3]
    rows = batch.to_pylist()
    for blob, row in zip(blobs, rows):
        assert normalize(row) == normalize(expected(cls.FromString(blob)))


@pytest.mark.parametrize("cls", OTLP, ids=lambda c: c.DESCRIPTOR.full_name)
def test_otlp_differential(cls) -> None:
    dec = ProtobufDecoder(cls)

    @settings(
        max_examples=max(10, EXAMPLES // 2),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(payloads(cls.DESCRIPTOR, max_depth=5), min_size=1, max_size=4))
    def run(blobs):
        _check(cls, dec, blobs)

    run()


def test_otlp_span_columns() -> None:
    span = trace_pb2.Span(
        trace_id=bytes(range(16)),
        span_id=bytes(range(8)),
        name="GET /orders",
        kind=trace_pb2.Span.SPAN_KIND_SERVER,
        start_time_unix_nano=1_700_000_000_000_000_000,
        end_time_unix_nano=1_700_000_000_250_000_000,
        status=trace_pb2.Status(code=trace_pb2.Status.STATUS_CODE_ERROR, message="boom"),
    )
    kv = span.attributes.add(key="http.status_code")
    kv.value.int_value = 500
    kv = span.attributes.add(key="tags")
    kv.value.array_value.values.add(string_value="a")
    batch = ProtobufDecoder(trace_pb2.Span).decode([span.SerializeToString()])
    row = batch.to_pylist()[0]
    assert row == expected(span)
    assert row["kind"] == "SPAN_KIND_SERVER" and row["status"]["code"] == "STATUS_CODE_ERROR"
    assert row["attributes"][1]["value"]["array_value"]["values"][0]["string_value"] == "a"
    assert row["attributes"][0]["value"]["int_value"] == 500
    names = batch.names
    assert "attributes.item.key" in names and "status.code" in names
    assert list(memoryview(batch.column("end_time_unix_nano"))) == [span.end_time_unix_nano]


def _file_descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    fds = descriptor_pb2.FileDescriptorSet()
    seen = set()
    mods = [descriptor_pb2, trace_pb2, metrics_pb2, logs_pb2, trace_service_pb2]
    mods += [compiled(n) for n in ("kfpb2", "kfpb3", "kfpbed")]
    for mod in mods:
        stack = [mod.DESCRIPTOR]
        while stack:
            f = stack.pop()
            if f.name in seen:
                continue
            seen.add(f.name)
            f.CopyToProto(fds.file.add())
            stack.extend(f.dependencies)
    return fds


def test_file_descriptor_set() -> None:
    fds = _file_descriptor_set()
    dec = ProtobufDecoder(descriptor_pb2.FileDescriptorSet)
    blobs = [fds.SerializeToString()] + [
        descriptor_pb2.FileDescriptorSet(file=[f]).SerializeToString() for f in fds.file
    ]
    _check(descriptor_pb2.FileDescriptorSet, dec, blobs)
    fdp = ProtobufDecoder(descriptor_pb2.FileDescriptorProto)
    _check(descriptor_pb2.FileDescriptorProto, fdp, [f.SerializeToString() for f in fds.file])


@settings(
    max_examples=max(10, EXAMPLES // 2),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(payloads(descriptor_pb2.FileDescriptorProto.DESCRIPTOR, max_depth=4), max_size=3))
def test_file_descriptor_proto_random(blobs) -> None:
    _check(
        descriptor_pb2.FileDescriptorProto,
        ProtobufDecoder(descriptor_pb2.FileDescriptorProto),
        blobs,
    )
