"""The schema registry of the test bed (Apicurio Registry, Confluent-compatible API) is real."""

from __future__ import annotations

import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryError

from kfast.testing.registry import SchemaRegistry

pytestmark = pytest.mark.integration

RECORD = '{"type": "record", "name": "Tb", "namespace": "kfast.t", "fields": [{"name": "x", "type": "long"}]}'


def test_registry_registers_and_serves_schemas_and_answers_404(
    schema_registry: SchemaRegistry, unique_topic: str
) -> None:
    client = schema_registry.client()
    sid = client.register_schema(f"{unique_topic}-value", Schema(RECORD, "AVRO"))
    assert client.get_schema(sid).schema_str is not None
    with pytest.raises(SchemaRegistryError) as info:
        schema_registry.client().get_schema(sid + 100_000)
    assert info.value.http_status_code == 404
    # kfast's own registration helper reaches the same registry (stop/start keeping the ids is
    # proven by test_confluent_outage, which restarts it)
    assert schema_registry.register(f"{unique_topic}-value", RECORD) == sid
