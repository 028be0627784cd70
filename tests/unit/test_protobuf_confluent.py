"""Confluent Protobuf framing: message-index paths and ConfluentProtobufDecoder."""

from __future__ import annotations

from typing import Any

import pytest
from _protobuf_support import compiled, expected
from opentelemetry.proto.trace.v1 import trace_pb2

import kfast
from kfast.confluent import (
    ConfluentProtobufDecoder,
    message_path,
    parse_message_indexes,
)
from kfast.errors import SchemaRegistryUnavailable

pb3 = compiled("kfpb3")


def frame(schema_id: int, path: bytes, body: bytes) -> bytes:
    return b"\x00" + schema_id.to_bytes(4, "big") + path + body


def test_parse_message_indexes() -> None:
    assert parse_message_indexes(b"\x00") == ((0,), 1)
    assert parse_message_indexes(b"\x02\x00") == ((0,), 2)  # explicit [0]
    assert parse_message_indexes(b"\x04\x02\x04rest") == ((1, 2), 3)
    assert parse_message_indexes(b"xx\x02\x06", 2) == ((3,), 4)
    for bad in (b"", b"\x04\x02", b"\x01", b"\x02\x01", b"\x80"):
        with pytest.raises(kfast.DecodeError):
            parse_message_indexes(bad)


def test_message_path() -> None:
    assert message_path(pb3.Inner.DESCRIPTOR) == (0,)
    assert message_path(pb3.Tree.DESCRIPTOR) == (3,)
    assert message_path(trace_pb2.Span.Event.DESCRIPTOR) == (
        message_path(trace_pb2.Span.DESCRIPTOR)[0],
        0,
    )


def test_classes_and_framing_errors() -> None:
    dec = ConfluentProtobufDecoder(protobuf_classes={7: pb3.Tree, 8: pb3.Inner})
    t = pb3.Tree(value=5, children=[pb3.Tree(value=6)])
    payloads = [
        frame(7, b"\x02\x06", t.SerializeToString()),
        b"\x01\x00\x00\x00\x07\x00",  # wrong magic byte
        frame(9, b"\x00", b""),  # unknown id
        frame(7, b"\x00", b""),  # path [0] is not Tree
        frame(8, b"\x00", pb3.Inner(a=1).SerializeToString()),  # another message type
        frame(7, b"\x02\x06", b"\x08"),  # truncated body
        frame(7, b"\x02\x06", b""),
    ]
    batch = dec.decode(payloads)
    assert list(batch.source_indices) == [0, 6]
    assert batch.to_pylist() == [expected(t), expected(pb3.Tree())]
    reasons = {e.index: e.reason for e in batch.errors}
    assert set(reasons) == {1, 2, 3, 4, 5}
    assert "Confluent Protobuf framing" in reasons[1]
    assert "unknown schema id 9" in reasons[2]
    assert "kfpb3.Tree" in reasons[3]
    assert "carries kfpb3.Inner" in reasons[4]
    assert "truncated" in reasons[5]


def test_registry_schema_text_compiled_with_protoc() -> None:
    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

    client = SchemaRegistryClient.new_client({"url": "mock://kfast-protobuf"})
    text = """
        syntax = "proto3";
        package shop;
        import "google/protobuf/timestamp.proto";
        message Envelope { message Order { int64 id = 1; string sku = 2;
                                           google.protobuf.Timestamp at = 3; } }
        message Other { bool x = 1; }
    """
    sid = client.register_schema("orders-value", Schema(text, "PROTOBUF"))
    # the writer side: any class with the same wire format, here built by hand
    body = b"\x08\x2a\x12\x03abc\x1a\x02\x08\x05"
    dec = kfast.ConfluentDecoder(client, subject="orders-value", message_name="shop.Envelope.Order")
    batch = dec.decode([frame(sid, b"\x04\x00\x00", body), frame(sid, b"\x02\x02", b"")])
    order = dec._protobuf_decoder().columns().descriptor
    assert order.full_name == "shop.Envelope.Order"
    # the same rows as the plain decoder of the compiled type (whatever form a Timestamp takes)
    assert batch.to_pylist() == kfast.ProtobufDecoder(order).decode([body]).to_pylist()
    assert batch.to_pylist()[0]["id"] == 42 and batch.to_pylist()[0]["sku"] == "abc"
    assert batch.errors[0].index == 1 and "shop.Other" in batch.errors[0].reason


def test_confluent_decoder_with_protobuf_classes() -> None:
    class NoRegistry:
        def get_schema(self, schema_id: int):  # never asked for ids in protobuf_classes
            raise AssertionError(f"registry asked for {schema_id}")

    dec = kfast.ConfluentDecoder(NoRegistry(), protobuf_classes={3: trace_pb2.Span})
    path = message_path(trace_pb2.Span.DESCRIPTOR)
    encoded = bytes([len(path) * 2]) + bytes(i * 2 for i in path)
    span = trace_pb2.Span(name="x", kind=trace_pb2.Span.SPAN_KIND_CLIENT)
    batch = dec.decode([frame(3, encoded, span.SerializeToString())] * 3)
    assert batch.num_rows == 3 and batch.to_pylist()[0] == expected(span)


def test_mixed_ids_buffers_and_bad_paths() -> None:
    dec = ConfluentProtobufDecoder(protobuf_classes={1: pb3.Tree, 2: pb3.Tree})
    t = pb3.Tree(value=9).SerializeToString()
    payloads = [
        frame(1, b"\x02\x06", t),
        memoryview(frame(2, b"\x02\x06", t)),
        bytearray(frame(1, b"\x02\x06", t)),
        frame(2, b"\x02\x06", t),
        frame(1, b"\x03\x06", t),  # negative count
        frame(1, b"\x02\x07", t),  # negative index
        frame(1, b"\x04\x06", t),  # truncated path
        b"\x00\x00\x00\x00",  # too short
    ]
    batch = dec.decode(payloads)
    assert list(batch.source_indices) == [0, 1, 2, 3]
    assert batch.to_pylist() == [expected(pb3.Tree(value=9))] * 4
    assert [e.index for e in batch.errors] == [4, 5, 6, 7]
    assert all("framing" in e.reason or "index" in e.reason for e in batch.errors)
    again = dec.decode(payloads[:2], out=batch)
    assert again is batch and batch.num_rows == 2 and not batch.errors


def test_random_framing_never_crashes() -> None:
    import random

    rng = random.Random(5)
    dec = ConfluentProtobufDecoder(protobuf_classes={0: pb3.Tree, 1: pb3.Tree})
    blobs = [
        b"\x00" + bytes(rng.randrange(4) if k < 4 else rng.randrange(256) for k in range(n))
        for n in (rng.randrange(0, 16) for _ in range(3000))
    ]
    batch = dec.decode(blobs)
    assert batch.num_rows + len(batch.errors) == len(blobs)


def test_schema_id_of_reads_the_frame_header() -> None:
    dec = ConfluentProtobufDecoder(protobuf_classes={7: pb3.Tree})
    assert dec.schema_id_of(frame(7, b"\x00", b"\x08\x01")) == 7
    assert dec.schema_id_of(frame(0x01020304, b"", b"")) == 0x01020304  # header only
    for bad in (b"", b"\x00\x00\x00\x07", b"\x01\x00\x00\x00\x07\x00"):
        assert dec.schema_id_of(bad) is None
    assert not hasattr(kfast.ProtobufDecoder(pb3.Tree), "schema_id_of")


def test_pipeline_ring_path_matches_decode() -> None:
    """The ring calls ``decode_spans``; a Protobuf batch must not be read as Avro there."""
    from confluent_kafka import Message
    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

    from kfast.runtime.ring import Ring

    client = SchemaRegistryClient.new_client({"url": "mock://kfast-protobuf-ring"})
    text = 'syntax = "proto3"; package ring; message Order { int64 id = 1; string sku = 2; }'
    sid = client.register_schema("ring-value", Schema(text, "PROTOBUF"))
    values = [frame(sid, b"\x00", b"\x08\x2a\x12\x03abc"), frame(sid, b"\x00", b"\x12\x05ab"),
              b"\x01" + frame(sid, b"\x00", b"")[1:], frame(123456, b"\x00", b""),
              frame(sid, b"\x02\x00", b"\x08\x07")]  # fmt: skip
    t = pb3.Tree(value=3).SerializeToString()
    by_classes = [frame(7, b"\x02\x06", t)] * 3 + [frame(7, b"\x00", t)]
    cases = [
        (lambda: kfast.ConfluentDecoder(client, subject="ring-value"), values),
        (lambda: kfast.ConfluentDecoder(client, protobuf_classes={7: pb3.Tree}), by_classes),
    ]
    for make, vals in cases:
        ring = Ring(len(vals) + 1, 1 << 20)
        ring.assign("t", 0)
        ring.push([Message(topic="t", partition=0, offset=i, key=None, value=v, timestamp=(1, 0))
                   for i, v in enumerate(vals)])  # fmt: skip
        got = kfast.Batch()
        ring.decode(make(), 0, len(vals), got)
        want = make().decode(vals)
        assert got.num_rows == want.num_rows == len(vals) - len(want.errors) >= 2
        assert list(got.source_indices) == list(want.source_indices)
        assert got.to_pylist() == want.to_pylist()
        assert got.errors == want.errors
        assert not any("Avro" in e.reason for e in got.errors)


def test_registry_outage_fails_the_batch_unknown_ids_are_rows() -> None:
    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

    client = SchemaRegistryClient.new_client({"url": "mock://kfast-protobuf-reasons"})
    sid = client.register_schema("r-value", Schema('syntax = "proto3"; message R { int64 a = 1; }',
                                                   "PROTOBUF"))  # fmt: skip

    class Down:
        def get_schema(self, schema_id: int):
            if schema_id == 9:
                raise ConnectionError("connection refused")
            return client.get_schema(schema_id)

        def get_latest_version(self, subject: str) -> Any:
            return client.get_latest_version(subject)

    dec = kfast.ConfluentDecoder(Down(), subject="r-value")
    with pytest.raises(SchemaRegistryUnavailable, match="schema id 9"):
        dec.decode([frame(sid, b"\x00", b"\x08\x01"), frame(9, b"\x00", b"")])
    batch = dec.decode([frame(sid, b"\x00", b"\x08\x01"), frame(77777, b"\x00", b""), None])
    assert batch.to_pylist() == [{"a": 1}]
    reasons = [e.reason for e in batch.errors]
    assert reasons[0].startswith("unknown schema id 77777 (registry: ")
    assert reasons[1].startswith("tombstone")


def test_a_protobuf_subject_batch_with_no_framed_payload_is_row_errors() -> None:
    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

    client = SchemaRegistryClient.new_client({"url": "mock://kfast-protobuf-unframed"})
    client.register_schema("u-value", Schema('syntax = "proto3"; message U { int64 a = 1; }',
                                             "PROTOBUF"))  # fmt: skip
    dec = kfast.ConfluentDecoder(client, subject="u-value")
    for values in ([b"\x01\x02", b""], [None]):
        batch = dec.decode(values)
        assert batch.num_rows == 0 and [e.index for e in batch.errors] == list(range(len(values)))
