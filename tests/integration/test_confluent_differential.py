"""kfast's rows equal confluent-kafka's deserializers', against a real registry (Apicurio).

Payloads are written by confluent-kafka's own ``AvroSerializer`` / ``ProtobufSerializer``
through its ``SchemaRegistryClient``, so the registry holds exactly what those clients register
(Avro with references; Protobuf as base64 serialized descriptors with their imports, or .proto
text registered by hand). kfast's decoder gets only the registry's URL.
"""

from __future__ import annotations

import datetime as dt
import decimal
import importlib
import json
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any

import pytest
from test_pipeline_confluent import _check_pipeline_matches_decode

from kfast.confluent import ConfluentDecoder, ConfluentProtobufDecoder
from kfast.protobuf import message_to_dict
from kfast.testing.registry import SchemaRegistry

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # authlib's httpx deprecation notice on import
    from confluent_kafka.schema_registry import Schema, SchemaReference
    from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
    from confluent_kafka.schema_registry.protobuf import ProtobufDeserializer, ProtobufSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

pytestmark = pytest.mark.integration


def _ctx(topic: str) -> SerializationContext:
    return SerializationContext(topic, MessageField.VALUE)


# ------------------------------------------------------------------------------------ Avro

COUNTRY = {"type": "record", "name": "Country", "namespace": "geo",
           "fields": [{"name": "code", "type": "string"}]}  # fmt: skip
ADDRESS = {
    "type": "record",
    "name": "Address",
    "namespace": "shop",
    "fields": [{"name": "city", "type": "string"}, {"name": "country", "type": "geo.Country"}],
}


def _order(version: int) -> dict[str, Any]:
    fields: list[dict[str, Any]] = [
        {"name": "id", "type": "long"},
        {"name": "ship_to", "type": "shop.Address"},
        {"name": "bill_to", "type": ["null", "shop.Address"], "default": None},
        {"name": "amount", "type": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}},
        {"name": "day", "type": {"type": "int", "logicalType": "date"}},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "ref", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "tag", "type": ["null", "string", "long"], "default": None},
    ]  # fmt: skip
    if version == 2:
        fields.append({"name": "note", "type": ["null", "string"], "default": None})
    return {"type": "record", "name": "Order", "namespace": "shop", "fields": fields}


def test_avro_evolution_logical_types_unions_and_nested_references(
    schema_registry: SchemaRegistry, kafka_broker: Any, unique_topic: str, unique_group: str
) -> None:
    client = schema_registry.client()
    country_subject, address_subject = f"{unique_topic}-country", f"{unique_topic}-address"
    client.register_schema(country_subject, Schema(json.dumps(COUNTRY), "AVRO"))
    country_v = client.get_latest_version(country_subject).version
    address = Schema(
        json.dumps(ADDRESS), "AVRO", [SchemaReference("geo.Country", country_subject, country_v)]
    )
    client.register_schema(address_subject, address)
    address_v = client.get_latest_version(address_subject).version
    refs = [SchemaReference("shop.Address", address_subject, address_v)]
    schemas = {v: Schema(json.dumps(_order(v)), "AVRO", refs) for v in (1, 2)}
    for v in (1, 2):  # v2 is the newest version: the columns of kfast's subject= rule
        client.register_schema(f"{unique_topic}-value", schemas[v])
    conf = {"auto.register.schemas": False, "use.latest.version": False}
    serializers = {v: AvroSerializer(client, schemas[v], conf=conf) for v in (1, 2)}
    ctx = _ctx(unique_topic)
    payloads = []
    for i in range(40):  # v1 and v2 interleaved
        v = 1 + (i % 3 == 0)
        rec: dict[str, Any] = {
            "id": i,
            "ship_to": {"city": f"c{i}", "country": {"code": "FR"}},
            "bill_to": None if i % 2 else {"city": "b", "country": {"code": "DE"}},
            "amount": decimal.Decimal(f"{i}.{i % 100:02d}"),
            "day": dt.date(2024, 1, 1) + dt.timedelta(days=i),
            "at": dt.datetime(2024, 5, 1, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=i),
            "ref": str(uuid.UUID(int=i)),
            "tag": [None, "s", i][i % 3],
        }
        if v == 2:
            rec["note"] = None if i % 4 else f"n{i}"
        payloads.append(serializers[v](rec, ctx))
    ids = {int.from_bytes(p[1:5], "big") for p in payloads}
    assert len(ids) == 2
    # their reader: the newest version with its references written out (what kfast's subject=
    # rule picks); confluent-kafka resolves each writer schema to it with fastavro
    reader = json.dumps(_expanded(COUNTRY, ADDRESS, _order(2)))
    theirs = AvroDeserializer(client, reader)
    want = [theirs(p, ctx) for p in payloads]
    assert all("note" in row for row in want)
    dec = ConfluentDecoder(schema_registry.url, subject=f"{unique_topic}-value")
    batch = dec.decode(payloads)
    assert batch.errors == []
    assert batch.to_pylist() == want
    # a reader schema given as JSON with the references written out gives the same rows
    assert ConfluentDecoder(schema_registry.url, reader).decode(payloads).to_pylist() == want
    # and a Pipeline over a real broker gives those rows (it decodes the ring's spans)
    rows, dead = _check_pipeline_matches_decode(
        kafka_broker,
        unique_topic,
        unique_group,
        lambda: ConfluentDecoder(schema_registry.url, subject=f"{unique_topic}-value"),
        payloads,
    )
    assert [rows[str(i).encode()] for i in range(len(payloads))] == want and dead == {}


def _expanded(country: Any, address: Any, order: dict[str, Any]) -> dict[str, Any]:
    addr = dict(address, fields=[address["fields"][0], dict(address["fields"][1], type=country)])
    fields = [dict(order["fields"][0]), dict(order["fields"][1], type=addr), *order["fields"][2:]]
    return dict(order, fields=fields)


# ------------------------------------------------------------------------------------ Protobuf

COMMON = """syntax = "proto3";
package shopc;
message Money { int64 units = 1; string currency = 2; }
enum Channel { WEB = 0; STORE = 1; }
"""
ORDERS = """syntax = "proto3";
package shop;
import "shopc/common.proto";
import "google/protobuf/timestamp.proto";
message Envelope {
  message Order {
    int64 id = 1;
    shopc.Money total = 2;
    oneof pay { string card = 3; string iban = 4; }
    map<string, int32> qty = 5;
    google.protobuf.Timestamp at = 6;
    shopc.Channel channel = 7;
    repeated string tags = 8;
  }
  string source = 1;
}
message Other { bool x = 1; }
"""


@pytest.fixture(scope="module")
def shop_pb2(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from grpc_tools import protoc

    root = tmp_path_factory.mktemp("kfast-proto-diff")
    (root / "shopc").mkdir()
    (root / "shopc" / "common.proto").write_text(COMMON)
    (root / "shop_orders.proto").write_text(ORDERS)
    include = str(Path(protoc.__file__).parent / "_proto")
    rc = protoc.main(["protoc", f"-I{root}", f"-I{include}", f"--python_out={root}",
                      "shopc/common.proto", "shop_orders.proto"])  # fmt: skip
    assert rc == 0
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module("shop_orders_pb2")
    finally:
        sys.path.remove(str(root))


def _orders(pb: Any, n: int) -> list[Any]:
    out = []
    for i in range(n):
        o = pb.Envelope.Order(id=i, tags=[f"t{k}" for k in range(i % 3)])
        o.total.units, o.total.currency = i * 100, "EUR"
        if i % 3 == 0:
            o.card = f"card{i}"
        elif i % 3 == 1:
            o.iban = f"FR{i}"
        o.qty["a"] = i
        if i % 2:
            o.qty["b"] = -i
        o.at.seconds, o.at.nanos = 1_700_000_000 + i, i * 1000
        o.channel = i % 2
        out.append(o)
    return out


def test_protobuf_serialized_schemas_with_imports_nested_paths_oneof_maps(
    schema_registry: SchemaRegistry,
    kafka_broker: Any,
    unique_topic: str,
    unique_group: str,
    shop_pb2: Any,
) -> None:
    client = schema_registry.client()
    ctx = _ctx(unique_topic)
    ser = ProtobufSerializer(shop_pb2.Envelope.Order, client, {"use.deprecated.format": False})
    msgs = _orders(shop_pb2, 30)
    payloads = [ser(m, ctx) for m in msgs]
    sid = int.from_bytes(payloads[0][1:5], "big")
    entry = client.get_schema(sid)
    assert entry.schema_type == "PROTOBUF" and "syntax" not in entry.schema_str  # base64
    assert [r.name for r in entry.references] == ["shopc/common.proto"]
    theirs = ProtobufDeserializer(shop_pb2.Envelope.Order, {"use.deprecated.format": False})
    want = [message_to_dict(theirs(p, ctx)) for p in payloads]
    for dec in (
        ConfluentDecoder(
            schema_registry.url, subject=f"{unique_topic}-value", message_name="shop.Envelope.Order"
        ),  # fmt: skip
        ConfluentProtobufDecoder(schema_registry.url, message=shop_pb2.Envelope.Order),
    ):
        batch = dec.decode(payloads)
        assert batch.errors == []
        assert batch.to_pylist() == want
    rows, dead = _check_pipeline_matches_decode(
        kafka_broker,
        unique_topic,
        unique_group,
        lambda: ConfluentProtobufDecoder(schema_registry.url, message=shop_pb2.Envelope.Order),
        payloads,
    )
    assert [rows[str(i).encode()] for i in range(len(payloads))] == want and dead == {}


def test_protobuf_text_schemas_with_text_references(
    schema_registry: SchemaRegistry, unique_topic: str, shop_pb2: Any
) -> None:
    client = schema_registry.client()
    common_subject = f"{unique_topic}-common"
    client.register_schema(common_subject, Schema(COMMON, "PROTOBUF"))
    common_v = client.get_latest_version(common_subject).version
    subject = f"{unique_topic}-value"
    sid = client.register_schema(
        subject,
        Schema(
            ORDERS, "PROTOBUF", [SchemaReference("shopc/common.proto", common_subject, common_v)]
        ),
    )
    assert "syntax" in client.get_schema(sid).schema_str  # stored as text
    ctx = _ctx(unique_topic)
    msgs = _orders(shop_pb2, 12)
    path = b"\x04\x00\x00"  # [0, 0]: Envelope.Order
    payloads = [b"\x00" + sid.to_bytes(4, "big") + path + m.SerializeToString() for m in msgs]
    theirs = ProtobufDeserializer(shop_pb2.Envelope.Order, {"use.deprecated.format": False})
    want = [message_to_dict(theirs(p, ctx)) for p in payloads]
    other = (
        b"\x00" + sid.to_bytes(4, "big") + b"\x02\x02" + shop_pb2.Other(x=True).SerializeToString()
    )
    dec = ConfluentDecoder(schema_registry.url, subject=subject, message_name="shop.Envelope.Order")
    batch = dec.decode([*payloads, other])
    assert batch.to_pylist() == want
    assert [e.index for e in batch.errors] == [len(payloads)]
    assert "shop.Other" in batch.errors[0].reason
