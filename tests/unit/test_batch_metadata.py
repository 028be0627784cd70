"""Kafka coordinates as ordinary batch columns, filled from the ring (opt-in)."""

from __future__ import annotations

import datetime as dt
import gc
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from confluent_kafka import Message
from test_runtime_ring import DEC, enc
from test_runtime_ring import SCHEMA as DEC_SCHEMA

from kfast._batch import Batch
from kfast._layout import metadata_plan
from kfast.runtime.ring import Ring

ALL = ["topic", "partition", "offset", "timestamp", "key", "headers"]


def _msg(topic: str, part: int, off: int, key: bytes | None, value: bytes, ts: int) -> Message:
    headers = [("h", b"%d" % off), ("h", None), ("\u00e9", b"")] if off % 2 else None
    return Message(topic=topic, partition=part, offset=off, key=key, value=value,
                   timestamp=(1, ts), headers=headers)  # fmt: skip


def _ring() -> tuple[Ring, list[Message]]:
    ring = Ring(100, 4096, keep_headers=True)
    ring.assign("orders", 0)
    ring.assign("orders", 3)
    ring.assign("refunds", 1)
    msgs = []
    for i in range(12):
        topic, part = [("orders", 0), ("orders", 3), ("refunds", 1)][i % 3]
        value = enc(i) if i != 7 else b"\xff"  # 7: not Avro -> a row error
        key = None if i % 4 == 0 else b"key-%d" % i
        if i == 5:
            key = b"K" * 3000  # with the value, too big for the arena: the overflow slot
        msgs.append(_msg(topic, part, 100 + i, key, value, 1_700_000_000_000 + i))
    assert ring.push(msgs) == 12
    return ring, msgs


def test_coordinates_are_columns_of_every_good_row() -> None:
    ring, msgs = _ring()
    batch = Batch()
    view = ring.decode(DEC, 0, 12, batch, metadata_plan(ALL))
    assert [e.index for e in batch.errors] == [7]
    assert batch.column_names == ["id", "s", "kafka_topic", "kafka_partition", "kafka_offset",
                                  "kafka_timestamp", "kafka_key", "kafka_headers"]  # fmt: skip
    rows = batch.to_pylist()
    good = [m for i, m in enumerate(msgs) if i != 7]
    assert [r["id"] for r in rows] == [i for i in range(12) if i != 7]
    assert [r["kafka_topic"] for r in rows] == [m.topic() for m in good]
    assert [r["kafka_partition"] for r in rows] == [m.partition() for m in good]
    assert [r["kafka_offset"] for r in rows] == [m.offset() for m in good]
    assert [r["kafka_key"] for r in rows] == [m.key() for m in good]
    assert [r["kafka_headers"] for r in rows] == [
        [{"key": k, "value": v} for k, v in m.headers() or []] for m in good]  # fmt: skip
    assert rows[1]["kafka_timestamp"] == dt.datetime.fromtimestamp(
        1_700_000_000.001, dt.timezone.utc
    )
    for r, i in zip(rows, batch.source_indices):
        assert (r["kafka_topic"], r["kafka_partition"], r["kafka_offset"]) == (
            view.topic(i), view.partition(i), view.offset(i))  # fmt: skip
    table = pa.table(batch)
    table.validate(full=True)
    assert table.column("kafka_headers").to_pylist() == [r["kafka_headers"] for r in rows]
    assert table.schema.field("kafka_offset").type == pa.int64()
    assert table.schema.field("kafka_timestamp").type == pa.timestamp("ms", tz="UTC")
    assert table.column("kafka_key").to_pylist() == [m.key() for m in good]
    del table
    # slices carry the columns; the batch recycles with and without them
    assert batch.slice(2, 5).to_pylist() == rows[2:5]
    ring.decode(DEC, 0, 12, batch, metadata_plan({"offset": "off", "partition": "p"}))
    assert [r["off"] for r in batch.to_pylist()] == [m.offset() for m in good]
    assert batch.column_names == ["id", "s", "off", "p"]
    ring.decode(DEC, 0, 12, batch)
    assert batch.column_names == ["id", "s"]
    assert batch.to_pylist() == [{"id": r["id"], "s": r["s"]} for r in rows]


def test_headers_need_a_ring_that_keeps_them() -> None:
    ring = Ring(10, 4096)
    ring.assign("t", 0)
    ring.push([_msg("t", 0, 1, None, enc(1), 5)])
    with pytest.raises(ValueError, match="keep_headers"):
        ring.decode(DEC, 0, 1, Batch(), metadata_plan(["headers"]))
    batch = Batch()
    ring.decode(DEC, 0, 1, batch, metadata_plan(["offset"]))
    assert batch.to_pylist() == [{"id": 1, "s": "", "kafka_offset": 1}]


def test_metadata_plan_rejects_unknown_fields_and_clashes() -> None:
    assert metadata_plan(None) == ()
    assert metadata_plan(["offset"]) == (("offset", "kafka_offset"),)
    with pytest.raises(ValueError, match="unknown field"):
        metadata_plan(["offsets"])
    with pytest.raises(ValueError, match="duplicate"):
        metadata_plan({"offset": "x", "partition": "x"})
    ring, _ = _ring()
    with pytest.raises(ValueError, match="already exists"):
        ring.decode(DEC, 0, 12, Batch(), metadata_plan({"offset": "id"}))


def _blocks_for_decode(rows: int) -> int:
    ring = Ring(rows + 10, 1 << 22, keep_headers=True)
    ring.assign("orders", 0)
    ring.push([_msg("orders", 0, i, b"k", enc(i), 7) for i in range(rows)])
    batch = Batch()
    plan = metadata_plan(ALL)
    ring.decode(DEC, 0, rows, batch, plan)  # sizes the buffers
    gc.collect()
    before = sys.getallocatedblocks()
    view = ring.decode(DEC, 0, rows, batch, plan)
    after = sys.getallocatedblocks()
    assert batch.num_rows == rows and len(view) == rows
    return after - before


def test_filling_allocates_no_python_object_per_row() -> None:
    _blocks_for_decode(10)
    small = _blocks_for_decode(10)
    large = _blocks_for_decode(5000)
    assert abs(large - small) <= 5, (small, large)


def test_pipeline_and_config_file_take_metadata(tmp_path: Path) -> None:
    import json

    import kfast
    from kfast.cli import load_pipeline
    from kfast.errors import ConfigError

    (tmp_path / "r.avsc").write_text(json.dumps(DEC_SCHEMA))
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text(
        'topics = ["t"]\nmetadata = ["topic", "offset"]\n'
        '[kafka]\n"bootstrap.servers" = "127.0.0.1:1"\n"group.id" = "g"\n'
        '[decoder]\ntype = "avro"\nschema = "r.avsc"\n[sink]\ntype = "null"\n'
    )
    pipe = load_pipeline(cfg)
    assert pipe.metadata == (("topic", "kafka_topic"), ("offset", "kafka_offset"))
    with pytest.raises(ConfigError, match="unknown field 'part'"):
        kfast.Pipeline(
            kafka={"bootstrap.servers": "127.0.0.1:1", "group.id": "g"},
            topics=["t"],
            decoder=DEC,
            sink=kfast.NullSink(),
            metadata=["part"],
        )
