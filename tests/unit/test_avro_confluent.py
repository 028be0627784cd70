"""ConfluentDecoder: framing, registry lookups, caching and per-row errors."""

from __future__ import annotations

import io
import json
import socket
import threading
import warnings
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import fastavro
import pytest

import kfast
from kfast.confluent import ConfluentDecoder
from kfast.errors import ConfigError, SchemaRegistryUnavailable

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # authlib's httpx deprecation notice on import
    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

V1 = {"type": "record", "name": "User", "fields": [{"name": "id", "type": "int"}]}
V2 = {
    "type": "record",
    "name": "User",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "email", "type": ["null", "string"], "default": None},
    ],
}
OTHER = {"type": "record", "name": "User", "fields": [{"name": "id", "type": "string"}]}


def frame(schema_id: int, schema: Any, record: Any) -> bytes:
    buf = io.BytesIO()
    buf.write(b"\x00" + schema_id.to_bytes(4, "big"))
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), record)
    return buf.getvalue()


@pytest.fixture
def mock_registry() -> tuple[Any, int, int, int]:
    reg = SchemaRegistryClient.new_client({"url": "mock://kfast-tests"})
    id1 = reg.register_schema("users-value", Schema(json.dumps(V1), "AVRO"))
    id2 = reg.register_schema("users-value", Schema(json.dumps(V2), "AVRO"))
    id3 = reg.register_schema("other-value", Schema(json.dumps(OTHER), "AVRO"))
    return reg, id1, id2, id3


def test_public_name() -> None:
    assert kfast.ConfluentDecoder is ConfluentDecoder


def test_reader_schema_resolves_every_writer(mock_registry: Any) -> None:
    reg, id1, id2, id3 = mock_registry
    dec = ConfluentDecoder(reg, reader_schema=V2)
    payloads = [
        frame(id1, V1, {"id": 1}),
        frame(id2, V2, {"id": 2, "email": "a@b"}),
        frame(id3, OTHER, {"id": "x"}),
        frame(id1, V1, {"id": 3}),
    ]
    batch = dec.decode(payloads)
    assert batch.to_pylist() == [
        {"id": 1, "email": None},
        {"id": 2, "email": "a@b"},
        {"id": 3, "email": None},
    ]
    assert [e.index for e in batch.errors] == [2]
    assert f"schema id {id3}" in batch.errors[0].reason
    assert "cannot be resolved" in batch.errors[0].reason


def test_columns_without_reader_come_from_the_subject_not_arrival_order(mock_registry: Any) -> None:
    reg, id1, id2, _ = mock_registry
    with pytest.raises(ConfigError, match="reader_schema"):
        ConfluentDecoder(reg)
    old_first = ConfluentDecoder(reg, subject="users-value").decode([frame(id1, V1, {"id": 6})])
    assert old_first.column_names == ["id", "email"]  # the newest version (V2), not id1's V1
    dec = ConfluentDecoder(reg, subject="users-value")
    batch = dec.decode([frame(id2, V2, {"id": 5, "email": None}), frame(id1, V1, {"id": 6})])
    assert batch.column_names == ["id", "email"]
    assert batch.to_pylist() == [{"id": 5, "email": None}, {"id": 6, "email": None}]
    # later batches keep those columns
    again = dec.decode([frame(id1, V1, {"id": 7})])
    assert again.to_pylist() == [{"id": 7, "email": None}]


def test_framing_errors_are_rows_not_crashes(mock_registry: Any) -> None:
    reg, id1, _, _ = mock_registry
    good = frame(id1, V1, {"id": 1})
    payloads = [good, b"", b"\x00\x00", b"\x05" + good[1:], frame(424242, V1, {"id": 1}),
                good + b"\x00", good[:-1], bytearray(good), memoryview(good)]  # fmt: skip
    batch = ConfluentDecoder(reg, V1).decode(payloads)
    assert list(batch.source_indices) == [0, 7, 8]
    reasons = {e.index: e.reason for e in batch.errors}
    assert "too short" in reasons[1] and "too short" in reasons[2]
    assert reasons[3] == "wrong magic byte 0x05 (expected 0x00 for Confluent framing)"
    assert reasons[4].startswith("unknown schema id 424242")
    assert reasons[5] == f"schema id {id1}: 1 trailing bytes after record"
    assert reasons[6].startswith(f"schema id {id1}: truncated payload")
    assert "at byte 5" in reasons[6]


def test_compiled_decoders_are_cached_in_a_bounded_lru(mock_registry: Any) -> None:
    reg, id1, id2, _ = mock_registry
    calls: list[int] = []

    class Counting:
        def get_schema(self, schema_id: int) -> Any:
            calls.append(schema_id)
            return reg.get_schema(schema_id)

    dec = ConfluentDecoder(Counting(), reader_schema=V2, max_cached_schemas=1)
    p1, p2 = frame(id1, V1, {"id": 1}), frame(id2, V2, {"id": 2, "email": None})
    dec.decode([p1, p1, p1])
    dec.decode([p1])
    assert calls.count(id1) == 1
    dec.decode([p2, p1])
    assert len(dec._programs) == 1
    with pytest.raises(ConfigError):
        ConfluentDecoder(reg, max_cached_schemas=0)
    with pytest.raises(ConfigError):
        ConfluentDecoder(object())


def test_registry_unreachable_raises_for_the_batch_never_row_errors() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    theirs = SchemaRegistryClient({"url": f"http://127.0.0.1:{port}", "max.retries": 0,
                                   "timeout": 2})  # fmt: skip
    for reg in (theirs, f"http://127.0.0.1:{port}"):
        dec = ConfluentDecoder(reg, reader_schema=V1)
        with pytest.raises(SchemaRegistryUnavailable, match="schema id 1|unreachable"):
            dec.decode([frame(1, V1, {"id": 1})])
        with pytest.raises(SchemaRegistryUnavailable):
            via_ring(dec, [frame(1, V1, {"id": 1})])


class _Registry(BaseHTTPRequestHandler):
    schemas: dict[int, dict[str, Any]] = {}
    hits: list[str] = []

    def do_GET(self) -> None:
        self.hits.append(self.path)
        path = self.path.split("?", 1)[0]
        parts = path.strip("/").split("/")
        if len(parts) == 3 and parts[:2] == ["schemas", "ids"] and parts[2].isdigit():
            entry = self.schemas.get(int(parts[2]))
            if entry is not None:
                self._send(200, entry)
                return
            self._send(404, {"error_code": 40403, "message": "Schema not found"})
            return
        self._send(404, {"error_code": 404, "message": "no such endpoint"})

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def http_registry() -> Iterator[str]:
    _Registry.schemas = {
        7: {"schema": json.dumps(V1)},
        8: {"schema": json.dumps(V2), "schemaType": "AVRO"},
        9: {"schema": "syntax = 'proto3';", "schemaType": "PROTOBUF"},
    }
    _Registry.hits = []
    server = HTTPServer(("127.0.0.1", 0), _Registry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_http_registry(http_registry: str) -> None:
    reg = SchemaRegistryClient({"url": http_registry, "max.retries": 0})
    dec = ConfluentDecoder(reg, reader_schema=V2)
    payloads = [frame(7, V1, {"id": 1}), frame(8, V2, {"id": 2, "email": "e"}),
                frame(99, V1, {"id": 3}), frame(9, V1, {"id": 4})]  # fmt: skip
    batch = dec.decode(payloads)
    assert batch.to_pylist() == [{"id": 1, "email": None}, {"id": 2, "email": "e"}]
    reasons = {e.index: e.reason for e in batch.errors}
    assert reasons[2].startswith("unknown schema id 99")
    assert "PROTOBUF" in reasons[3]
    hits = len(_Registry.hits)
    dec.decode(payloads[:2])
    assert len(_Registry.hits) == hits  # ids 7 and 8 are cached


def test_protobuf_dispatch_point(http_registry: str) -> None:
    reg = SchemaRegistryClient({"url": http_registry, "max.retries": 0})
    dec = ConfluentDecoder(reg, kind="PROTOBUF")
    seen: list[Any] = []

    class FakeProtobuf:
        def decode(self, payloads: Any, out: Any = None) -> str:
            seen.append(payloads)
            return "protobuf batch"

    dec._protobuf = FakeProtobuf()
    assert dec.decode([frame(9, V1, {"id": 1})]) == "protobuf batch"
    assert len(seen) == 1


def test_object_columns_use_each_writer_schema(mock_registry: Any) -> None:
    reg = mock_registry[0]
    w1 = {"type": "record", "name": "U", "fields": [{"name": "u", "type": ["int", "string"]}]}
    w2 = {"type": "record", "name": "U", "fields": [{"name": "u", "type": ["string", "long"]}]}
    reader = {
        "type": "record",
        "name": "U",
        "fields": [{"name": "u", "type": ["null", "long", "string"]}],
    }
    i1 = reg.register_schema("u1-value", Schema(json.dumps(w1), "AVRO"))
    i2 = reg.register_schema("u2-value", Schema(json.dumps(w2), "AVRO"))
    payloads = [frame(i1, w1, {"u": 5}), frame(i2, w2, {"u": "s"}), frame(i2, w2, {"u": 7}),
                frame(i1, w1, {"u": "t"})]  # fmt: skip
    batch = ConfluentDecoder(reg, reader_schema=reader).decode(payloads)
    assert batch.errors == []
    assert batch.to_pylist() == [{"u": 5}, {"u": "s"}, {"u": 7}, {"u": "t"}]


def test_an_unknown_first_id_costs_only_its_own_row(mock_registry: Any) -> None:
    reg, id1, _, _ = mock_registry
    dec = ConfluentDecoder(reg, subject="users-value")
    batch = dec.decode([frame(31337, V1, {"id": 1}), frame(id1, V1, {"id": 2})])
    assert batch.to_pylist() == [{"id": 2, "email": None}]
    assert batch.errors[0].index == 0 and "unknown schema id 31337" in batch.errors[0].reason


def test_schema_id_of_reads_the_frame_header(mock_registry: Any) -> None:
    reg, id1, _, _ = mock_registry
    dec = ConfluentDecoder(reg, V1)
    value = frame(id1, V1, {"id": 1})
    assert dec.schema_id_of(value) == id1
    assert dec.schema_id_of(bytearray(value)) == id1
    assert dec.schema_id_of(memoryview(value)) == id1
    assert dec.schema_id_of(b"\x00\x12\x34\x56\x78") == 0x12345678  # header only
    for bad in (b"", b"\x00", b"\x00\x00\x00\x01", b"\x01\x00\x00\x00\x01\x02"):
        assert dec.schema_id_of(bad) is None
    assert not hasattr(kfast.AvroDecoder(V1), "schema_id_of")  # unframed: no schema id


# -- the span-level path: what a Pipeline's ring calls (decode_spans on its arena) --


def via_ring(dec: Any, values: list[bytes], out: Any = None) -> Any:
    from confluent_kafka import Message

    from kfast.runtime.ring import Ring

    ring = Ring(len(values) + 1, 1 << 20)
    ring.assign("t", 0)
    msgs = [Message(topic="t", partition=0, offset=i, key=None, value=v, timestamp=(1, 0))
            for i, v in enumerate(values)]  # fmt: skip
    assert ring.push(msgs) == len(values)
    batch = kfast.Batch() if out is None else out
    ring.decode(dec, 0, len(values), batch)
    return batch


def assert_same_batch(a: Any, b: Any) -> None:
    assert list(a.source_indices) == list(b.source_indices)
    assert a.column_names == b.column_names
    assert a.to_pylist() == b.to_pylist()
    assert a.errors == b.errors


def test_ring_path_matches_decode(mock_registry: Any) -> None:
    reg, id1, id2, id3 = mock_registry
    good = frame(id1, V1, {"id": 1})
    values = [frame(id2, V2, {"id": 2, "email": "e"}), good, b"", b"\x05" + good[1:],
              frame(424242, V1, {"id": 3}), good[:-1], frame(id3, OTHER, {"id": "x"}),
              frame(id1, V1, {"id": 4})]  # fmt: skip
    for reader in (None, V2):
        subject = "users-value" if reader is None else None
        want = ConfluentDecoder(reg, reader, subject=subject).decode(values)
        got = via_ring(ConfluentDecoder(reg, reader, subject=subject), values)
        assert_same_batch(got, want)
        assert got.num_rows == 3 and len(got.errors) == 5


def test_ring_path_hands_protobuf_batches_over(http_registry: str) -> None:
    reg = SchemaRegistryClient({"url": http_registry, "max.retries": 0})
    dec = ConfluentDecoder(reg, kind="PROTOBUF")
    seen: list[Any] = []

    class FakeProtobuf:
        def decode(self, payloads: Any, out: Any = None) -> Any:
            seen.append(payloads)
            return out

    dec._protobuf = FakeProtobuf()
    values = [frame(9, V1, {"id": 1}), b"\x01", frame(7, V1, {"id": 2})]
    out = kfast.Batch()
    assert via_ring(dec, values, out) is out
    assert seen == [values]  # the whole batch, copied out of the ring's arena
    assert all(type(p) is bytes for p in seen[0])

    class Wrong(FakeProtobuf):
        def decode(self, payloads: Any, out: Any = None) -> Any:
            return "not the batch"

    dec._protobuf = Wrong()
    with pytest.raises(TypeError, match="must decode into out"):
        via_ring(dec, values)


def test_batch_decoder_may_be_a_compiled_decoder(mock_registry: Any) -> None:
    """A BaseDecoder returned by ``_batch_decoder`` is handed the spans (no copy)."""
    reg, id1, id2, _ = mock_registry
    inner = ConfluentDecoder(reg, reader_schema=V1)

    class Delegating(ConfluentDecoder):
        def _batch_decoder(self, first_schema_id: int) -> Any:
            return inner if first_schema_id == id1 else None

    values = [frame(id1, V1, {"id": 1}), frame(id2, V2, {"id": 2, "email": None})]
    for batch in (Delegating(reg, V2).decode(values), via_ring(Delegating(reg, V2), values)):
        assert batch.column_names == ["id"]  # inner's reader schema, not V2
        assert [e.index for e in batch.errors] == [1]  # V2's long id does not fit V1's int
    assert via_ring(Delegating(reg, V2), values[::-1]).column_names == ["id", "email"]


def test_an_outage_fails_the_whole_batch_then_the_same_batch_decodes(mock_registry: Any) -> None:
    reg, id1, id2, _ = mock_registry
    calls: list[int] = []
    down = [True]

    class Flaky:
        def get_schema(self, schema_id: int) -> Any:
            calls.append(schema_id)
            if down[0] and schema_id == id2:
                raise ConnectionError("connection refused")
            return reg.get_schema(schema_id)

    dec = ConfluentDecoder(Flaky(), V2)
    values = [frame(id1, V1, {"id": 1}), frame(id2, V2, {"id": 2, "email": None}), b"\x07"]
    for decode in (dec.decode, lambda v: via_ring(dec, v)):
        with pytest.raises(SchemaRegistryUnavailable, match=f"schema id {id2}"):
            decode(values)
    assert calls.count(id2) == 2 and calls.count(id1) == 1  # id1 cached, id2 asked per batch
    down[0] = False
    for batch in (dec.decode(values), via_ring(dec, values)):
        assert batch.to_pylist() == [{"id": 1, "email": None}, {"id": 2, "email": None}]
        assert [e.index for e in batch.errors] == [2]


def test_registry_answers_are_sorted_into_outage_or_not_found() -> None:
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    from kfast.confluent import SchemaStore, UnknownSchemaId

    answers: dict[int, BaseException] = {
        1: SchemaRegistryError(404, 40403, "Schema not found"),
        2: SchemaRegistryError(503, 50301, "unavailable"),
        3: SchemaRegistryError(429, 42901, "slow down"),
        4: SchemaRegistryError(401, 40101, "unauthorized"),
        5: TimeoutError("timed out"),
        6: OSError("connection reset"),
        7: SchemaRegistryError(404, -1, "<html>Not Found</html>"),  # a wrong URL, not "no schema"
    }
    asked: list[int] = []

    class Answers:
        def get_schema(self, schema_id: int) -> Any:
            asked.append(schema_id)
            raise answers[schema_id]

    store = SchemaStore(Answers(), not_found_wait=0.0)
    with pytest.raises(UnknownSchemaId, match="unknown schema id 1"):
        store.get(1)
    assert asked.count(1) == 3  # confirmed by asking twice more
    with pytest.raises(UnknownSchemaId):
        store.get(1)
    assert asked.count(1) == 3  # a confirmed "not found" is remembered
    for sid in (2, 3, 4, 5, 6, 7):
        with pytest.raises(SchemaRegistryUnavailable):
            store.get(sid)
        assert asked.count(sid) == 1


def test_tombstones_and_foreign_payloads_cost_only_their_own_rows(http_registry: str) -> None:
    dec = ConfluentDecoder(http_registry, reader_schema=V2)  # a URL: kfast's own client
    good = frame(7, V1, {"id": 1})
    batch = dec.decode([None, frame(9, V1, {"id": 2}), good, b"\x05" + good[1:], None])
    assert batch.to_pylist() == [{"id": 1, "email": None}]
    assert list(batch.source_indices) == [2]
    reasons = {e.index: e.reason for e in batch.errors}
    assert reasons[0] == reasons[4] and reasons[0].startswith("tombstone (None value)")
    assert reasons[1] == "schema id 9 is PROTOBUF; this decoder decodes AVRO"
    assert reasons[3].startswith("wrong magic byte")


def test_references_are_resolved_recursively_at_their_versions() -> None:
    money_v1 = {"type": "fixed", "name": "Cents", "namespace": "money", "size": 2}
    money_v2 = {"type": "fixed", "name": "Cents", "namespace": "money", "size": 4}
    line = {"type": "record", "name": "Line", "namespace": "x.lines",
            "fields": [{"name": "cents", "type": "money.Cents"}]}  # fmt: skip
    order = {"type": "record", "name": "Order", "namespace": "shop",
             "fields": [{"name": "first", "type": "x.lines.Line"},
                        {"name": "rest", "type": {"type": "array", "items": "x.lines.Line"}},
                        {"name": "cents", "type": "money.Cents"}]}  # fmt: skip
    entries = {
        ("money", 1): {"schema": json.dumps(money_v1)},
        ("money", 2): {"schema": json.dumps(money_v2)},
        ("line", 3): {"schema": json.dumps(line),
                      "references": [{"name": "money.Cents", "subject": "money", "version": 2}]},
    }  # fmt: skip
    asked: list[Any] = []

    class Registry:
        def get_schema(self, schema_id: int) -> Any:
            asked.append(schema_id)
            refs = [{"name": "x.lines.Line", "subject": "line", "version": 3}]
            return {"schema": json.dumps(order), "references": refs}

        def get_version(self, subject: str, version: int) -> Any:
            asked.append((subject, version))
            return entries[(subject, version)]

    rec = {"first": {"cents": b"abcd"}, "rest": [{"cents": b"efgh"}], "cents": b"ijkl"}
    buf = io.BytesIO()
    resolved = {**order, "fields": [
        {"name": "first", "type": {**line, "fields": [{"name": "cents", "type": money_v2}]}},
        *order["fields"][1:],
    ]}  # fmt: skip
    fastavro.schemaless_writer(buf, fastavro.parse_schema(resolved), rec)
    payload = b"\x00\x00\x00\x00\x05" + buf.getvalue()
    dec = ConfluentDecoder(Registry(), reader_schema=resolved)
    batch = dec.decode([payload, payload])
    assert batch.errors == []
    assert batch.to_pylist() == [rec, rec]
    assert asked == [5, ("line", 3), ("money", 2)]  # version 2 of money, each asked once
