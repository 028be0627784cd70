"""Policies, memory plan, consumer config and Pipeline construction errors."""

from __future__ import annotations

import pytest

import kfast
from kfast.runtime.memory import MiB, plan_memory
from kfast.runtime.policies import BatchPolicy, BufferPolicy, parse_duration, parse_size
from kfast.runtime.source import consumer_config

SCHEMA = {"type": "record", "name": "R", "fields": [{"name": "id", "type": "long"}]}
KAFKA = {"bootstrap.servers": "127.0.0.1:1", "group.id": "g"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("256MiB", 256 << 20),
        ("1GiB", 1 << 30),
        ("64KiB", 64 << 10),
        ("10MB", 10_000_000),
        ("1.5MiB", 3 << 19),
        (" 512 ", 512),
        (4096, 4096),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text, "f") == expected


@pytest.mark.parametrize("bad", ["12XB", "", "MiB", -1, True, 1.5, None, "1e3"])
def test_parse_size_errors_name_the_field(bad):
    with pytest.raises(kfast.ConfigError, match="my.field"):
        parse_size(bad, "my.field")


def test_parse_duration():
    assert parse_duration("50ms", "f") == pytest.approx(0.05)
    assert parse_duration("2m", "f") == 120
    assert parse_duration(0.5, "f") == 0.5
    with pytest.raises(kfast.ConfigError, match="f:"):
        parse_duration("soon", "f")


def test_batch_policy_normalises_and_validates():
    p = BatchPolicy(max_rows=500, max_bytes="2MiB", max_wait="20ms")
    assert p.max_bytes == 2 << 20 and p.max_wait == pytest.approx(0.02)
    with pytest.raises(kfast.ConfigError, match=r"BatchPolicy.max_rows: 0 is out of range \[1, "):
        BatchPolicy(max_rows=0)
    with pytest.raises(kfast.ConfigError, match="BatchPolicy.max_bytes"):
        BatchPolicy(max_bytes=10)
    with pytest.raises(kfast.ConfigError, match="BatchPolicy.max_wait"):
        BatchPolicy(max_wait=120)
    with pytest.raises(kfast.ConfigError, match="BatchPolicy.max_rows: expected an integer"):
        BatchPolicy(max_rows="many")  # type: ignore[arg-type]


def test_buffer_policy_hysteresis():
    with pytest.raises(kfast.ConfigError, match="resume_at.*below pause_at"):
        BufferPolicy(pause_at=0.5, resume_at=0.6)
    with pytest.raises(kfast.ConfigError, match="BufferPolicy.max_messages"):
        BufferPolicy(max_messages=1)
    assert BufferPolicy(max_bytes="1MiB").max_bytes == 1 << 20


def test_memory_plan_fits_the_limit_and_names_explicit_settings():
    for limit in ("32MiB", "64MiB", "256MiB", "4GiB"):
        plan = plan_memory(limit, {}, BatchPolicy(max_bytes="1MiB"), BufferPolicy(), dlq=True)
        assert plan.total <= plan.limit
        assert plan.ring_bytes > 0 and plan.ring_messages >= 16
        assert plan.fetch_max_bytes >= MiB
    plan = plan_memory("256MiB", {}, BatchPolicy(), BufferPolicy())
    assert plan.kafka_settings()["queued.max.messages.kbytes"] == str(
        plan.queued_max_messages_kbytes
    )
    with pytest.raises(kfast.ConfigError, match=r"kafka\['fetch.max.bytes'\]"):
        plan_memory("64MiB", {"fetch.max.bytes": 60 << 20}, BatchPolicy(), BufferPolicy())
    with pytest.raises(kfast.ConfigError, match="buffer.max_bytes"):
        plan_memory("64MiB", {}, BatchPolicy(), BufferPolicy(max_bytes="100MiB"))
    with pytest.raises(kfast.ConfigError, match="memory_limit"):
        plan_memory("1MiB", {}, BatchPolicy(), BufferPolicy())
    # explicit settings are kept as given
    plan = plan_memory(
        "256MiB", {"queued.max.messages.kbytes": "2048"}, BatchPolicy(), BufferPolicy()
    )
    assert plan.queued_max_messages_kbytes == 2048
    assert "kafka['queued.max.messages.kbytes']" in plan.explicit
    assert "ring" in plan.describe()


def test_consumer_config_forces_manual_offsets_and_passes_through():
    conf = consumer_config(
        {**KAFKA, "group.instance.id": "member-1", "enable.auto.commit": False},
        {"fetch.max.bytes": "1048576"},
    )
    assert conf["enable.auto.commit"] == "false"
    assert conf["enable.auto.offset.store"] == "false"
    assert conf["partition.assignment.strategy"] == "cooperative-sticky"
    assert conf["group.instance.id"] == "member-1"
    assert conf["fetch.max.bytes"] == "1048576"
    conf = consumer_config({**KAFKA, "partition.assignment.strategy": "range"})
    assert conf["partition.assignment.strategy"] == "range"
    with pytest.raises(kfast.ConfigError, match="enable.auto.commit"):
        consumer_config({**KAFKA, "enable.auto.commit": "true"})
    with pytest.raises(kfast.ConfigError, match="group.id"):
        consumer_config({"bootstrap.servers": "x"})


def _pipe(**kw):
    args = {
        "kafka": KAFKA,
        "topics": ["t"],
        "decoder": kfast.AvroDecoder(SCHEMA),
        "sink": kfast.NullSink(),
    }
    args.update(kw)
    return kfast.Pipeline(**args)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"topics": []}, "topics"),
        ({"decoder": object()}, "decoder"),
        ({"sink": 42}, "sink"),
        ({"batch": {"max_rows": 1}}, "batch"),
        ({"memory_limit": "lots"}, "memory_limit"),
        ({"memory_limit": "16MiB"}, "memory_limit"),
        ({"drain_timeout": 0}, "drain_timeout"),
        ({"revoke_timeout": 400}, "revoke_timeout"),
        ({"poll_batch": 0}, "poll_batch"),
        ({"kafka": {"group.id": "g"}}, "bootstrap.servers"),
        ({"kafka": {**KAFKA, "enable.auto.offset.store": "true"}}, "enable.auto.offset.store"),
        ({"metrics_port": -1}, "metrics_port"),
    ],
)
def test_pipeline_config_errors_name_the_field(kwargs, field):
    with pytest.raises(kfast.ConfigError, match=field.replace(".", r"\.")):
        _pipe(**kwargs)


def test_pipeline_memory_plan_and_callable_sink():
    pipe = _pipe(sink=lambda batch: None, memory_limit="64MiB")
    assert isinstance(pipe.sink, kfast.CallableSink)
    plan = pipe.memory_plan()
    assert plan.limit == 64 << 20 and plan.total <= plan.limit
    m = pipe.metrics()
    assert m["consumed"] == 0 and m["memory_plan"]["limit"] == 64 << 20


def test_unknown_librdkafka_setting_fails_before_consuming():
    pipe = _pipe(kafka={**KAFKA, "no.such.setting": "1"}, install_signal_handlers=False)
    with pytest.raises(kfast.ConfigError, match="librdkafka rejected"):
        pipe.run()
