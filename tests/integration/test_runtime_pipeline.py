"""Runtime against the real broker: no loss, no duplicates, backpressure, shutdown."""

from __future__ import annotations

import collections
import time
from typing import Any

import pytest
from runtime_util import Recorder, Runner, pipeline, produce_ids, wait_until

import kfast
from kfast.runtime.pipeline import SOURCES

pytestmark = pytest.mark.integration

N_REGULAR = 200_000
N_SLOW = 1_000_000


def _no_loss_no_dup(
    kafka_broker, kafka_consumer_config, topic, group, n, partitions=8, source="confluent"
):
    kafka_broker.create_topic(topic, partitions=partitions)
    produce_ids(kafka_broker, topic, 0, n, partitions)
    rec = Recorder()
    pipe = pipeline(kafka_consumer_config(group), topic, rec, memory_limit="128MiB", source=source)
    runner = Runner(pipe)
    wait_until(lambda: rec.count() >= n, 600, f"{n} rows")
    runner.stop()
    ids = rec.ids()
    assert len(ids) == n, f"duplicates: {len(ids) - len(set(ids))}"
    assert set(ids) == set(range(n))
    # every partition delivered in offset order, contiguous from 0
    by_part = collections.defaultdict(list)
    for p, off, _ in rec.rows:
        by_part[p].append(off)
    for p, offs in by_part.items():
        assert offs == list(range(len(offs))), f"partition {p} not contiguous"
    m = pipe.metrics()
    assert m["written"] == n
    assert m["ring"]["gaps"] == 0
    assert m["decode_errors"] == 0
    # everything committed: a new member of the group reads nothing
    committed = {k: v["committed"] for k, v in m["commits"]["partitions"].items()}
    assert sum(committed.values()) == n or not committed  # revoked at close
    return pipe


@pytest.mark.parametrize("source", SOURCES)
def test_no_loss_no_duplicates(
    kafka_broker, kafka_consumer_config, unique_topic, unique_group, source
):
    _no_loss_no_dup(
        kafka_broker,
        kafka_consumer_config,
        unique_topic,
        unique_group,
        N_REGULAR,
        source=source,
    )


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES)
def test_no_loss_no_duplicates_1m(
    kafka_broker, kafka_consumer_config, unique_topic, unique_group, source
):
    _no_loss_no_dup(
        kafka_broker, kafka_consumer_config, unique_topic, unique_group, N_SLOW, source=source
    )


class _HoldFirstWrite(Recorder):
    """Stays inside the first write() until ``release()`` returns True (or 30 s pass)."""

    def __init__(self, release: Any) -> None:
        super().__init__()
        self.release = release
        self.held: bool | None = None

    def write(self, batch: Any) -> None:
        if self.held is None:
            deadline = time.monotonic() + 30
            while not self.release() and time.monotonic() < deadline:
                time.sleep(0.01)
            self.held = bool(self.release())
        super().write(batch)


def test_next_batch_is_decoded_while_the_sink_writes(
    kafka_broker, kafka_consumer_config, unique_topic, unique_group
):
    """Two batches in flight: batch 2 is decoded while write(batch 1) runs, and the
    rows still reach the sink in ring order, each once."""
    n = 4_000
    kafka_broker.create_topic(unique_topic, partitions=1)
    produce_ids(kafka_broker, unique_topic, 0, n, 1)
    holder: list[kfast.Pipeline] = []
    sink = _HoldFirstWrite(lambda: holder[0].metrics()["batches_decoded"] >= 2)
    pipe = pipeline(
        kafka_consumer_config(unique_group),
        unique_topic,
        sink,
        batch=kfast.BatchPolicy(max_rows=1_000, max_wait=0.5),
    )
    assert pipe.memory_plan().batches_in_flight == 2
    holder.append(pipe)
    r = Runner(pipe)
    wait_until(lambda: sink.count() >= n, 60, "all rows")
    r.stop()
    assert sink.held is True, "batch 2 was not decoded while batch 1 was being written"
    assert sink.ids() == list(range(n))


def test_one_batch_in_flight_under_a_small_memory_limit(
    kafka_broker, kafka_consumer_config, unique_topic, unique_group
):
    """When two batches do not fit a third of memory_limit, decoding waits for delivery."""
    n = 4_000
    kafka_broker.create_topic(unique_topic, partitions=1)
    produce_ids(kafka_broker, unique_topic, 0, n, 1)
    holder: list[kfast.Pipeline] = []
    decoded_while_held: list[int] = []

    def release() -> bool:
        decoded_while_held.append(holder[0].metrics()["batches_decoded"])
        return len(decoded_while_held) >= 50  # ~0.5 s inside write(batch 1)

    sink = _HoldFirstWrite(release)
    pipe = pipeline(
        kafka_consumer_config(unique_group),
        unique_topic,
        sink,
        memory_limit="48MiB",
        batch=kfast.BatchPolicy(max_rows=1_000, max_wait=0.5),
    )
    assert pipe.memory_plan().batches_in_flight == 1
    holder.append(pipe)
    r = Runner(pipe)
    wait_until(lambda: sink.count() >= n, 60, "all rows")
    r.stop()
    assert set(decoded_while_held) == {1}
    assert sink.ids() == list(range(n))


def test_restart_resumes_from_commit(
    kafka_broker, kafka_consumer_config, unique_topic, unique_group
):
    kafka_broker.create_topic(unique_topic, partitions=2)
    produce_ids(kafka_broker, unique_topic, 0, 1000, 2)
    rec = Recorder()
    r = Runner(pipeline(kafka_consumer_config(unique_group), unique_topic, rec))
    wait_until(lambda: rec.count() >= 1000, 60, "first 1000")
    r.stop()
    produce_ids(kafka_broker, unique_topic, 1000, 500, 2)
    rec2 = Recorder()
    r2 = Runner(pipeline(kafka_consumer_config(unique_group), unique_topic, rec2))
    wait_until(lambda: rec2.count() >= 500, 60, "next 500")
    r2.stop()
    assert sorted(rec2.ids()) == list(range(1000, 1500))


def test_decode_error_without_dlq_stops_and_does_not_commit(
    kafka_broker, kafka_consumer_config, unique_topic, unique_group
):
    kafka_broker.create_topic(unique_topic, partitions=1)
    from runtime_util import encode

    kafka_broker.produce(unique_topic, [encode(0), encode(1), b"\xff", encode(3)], partition=0)
    rec = Recorder()
    pipe = pipeline(kafka_consumer_config(unique_group), unique_topic, rec)
    # without a DeadLetterPolicy a poison pill stops the pipeline (never dropped)
    with pytest.raises(kfast.KfastError):
        pipe.run()
    assert rec.count() == 0
    assert pipe.metrics()["commits"]["partitions"] == {} or all(
        v["committed"] <= 0 for v in pipe.metrics()["commits"]["partitions"].values()
    )


def test_decode_errors_go_to_the_dlq_with_original_bytes(
    kafka_broker, kafka_consumer_config, unique_topic, unique_group
):
    from confluent_kafka import Consumer
    from runtime_util import encode

    dlq_topic = unique_topic + ".dlq"
    kafka_broker.create_topic(unique_topic, partitions=1)
    kafka_broker.create_topic(dlq_topic, partitions=1)
    values = [encode(0), b"\xff\xff", encode(2), b"", encode(4)]
    kafka_broker.produce(
        unique_topic,
        values,
        keys=[b"k%d" % i for i in range(5)],
        partition=0,
        headers=[[("trace", b"t%d" % i)] for i in range(5)],
    )
    rec = Recorder()
    pipe = pipeline(
        kafka_consumer_config(unique_group),
        unique_topic,
        rec,
        dlq=kfast.DeadLetterPolicy(topic=dlq_topic, max_ratio=1.0),
    )
    runner = Runner(pipe)
    wait_until(lambda: rec.count() >= 3, 60, "good rows")
    wait_until(
        lambda: pipe.metrics().get("delivery", {}).get("dlq_records", 0) >= 2, 60, "dead letters"
    )
    runner.stop()
    assert sorted(rec.ids()) == [0, 2, 4]
    c = Consumer(
        {
            "bootstrap.servers": kafka_broker.bootstrap,
            "group.id": unique_group + "-check",
            "auto.offset.reset": "earliest",
        }
    )
    c.subscribe([dlq_topic])
    dead = []
    for _ in range(100):
        dead += [m for m in c.consume(10, 0.5) if m.error() is None]
        if len(dead) >= 2:
            break
    c.close()
    assert sorted((m.key(), m.value()) for m in dead) == [(b"k1", b"\xff\xff"), (b"k3", b"")]
    h = dict(dead[0].headers())
    assert h["kfast.error.stage"] == b"decode"
    assert h["kfast.original.topic"] == unique_topic.encode()
    assert h["trace"] in (b"t1", b"t3")  # original headers travel with the record


def test_metrics_snapshot_and_prometheus_endpoint(
    kafka_broker, kafka_consumer_config, unique_topic, unique_group
):
    import socket
    import urllib.request

    kafka_broker.create_topic(unique_topic, partitions=2)
    produce_ids(kafka_broker, unique_topic, 0, 5000, 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rec = Recorder()
    conf = kafka_consumer_config(unique_group, **{"statistics.interval.ms": 200})
    pipe = pipeline(conf, unique_topic, rec, metrics_port=port, commit_interval=0.1)
    runner = Runner(pipe)
    # stop waiting at once if run() failed (e.g. the metrics endpoint could not start)
    wait_until(lambda: runner.error is not None or rec.count() >= 5000, 60, "rows")
    if runner.error is not None:
        raise runner.error
    wait_until(lambda: sum(pipe.metrics()["consumer_lag"].values() or [1]) == 0, 30, "lag 0")
    m = pipe.metrics()
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    runner.stop()
    assert m["consumed"] == 5000 and m["written"] == 5000
    assert set(m["consumer_lag"]) == {f"{unique_topic}[0]", f"{unique_topic}[1]"}
    assert m["latency_s"]["decode"]["count"] == m["batches"] > 0
    assert sum(m["batch_size"]["histogram"].values()) == m["batches"]
    assert m["rss_bytes"] > 0 and len(m["gc"]["collections"]) == 3
    # one rebalance assigned both partitions: partitions are counted, not callbacks
    assert m["rebalances"]["assigned"] == 2 and m["rebalances"]["assign_callbacks"] == 1
    hist = m["latency_histograms"]["decode"]
    assert hist["count"] == m["batches"] and hist["buckets"][-1] == (float("inf"), hist["count"])
    assert m["health"]["state"] == "running" and m["health"]["assigned_partitions"] == 2
    # names and labels are kfast.prometheus's (tests/unit/test_prometheus.py)
    assert "kfast_rows_written_total 5000.0" in body
    assert "kfast_consumer_lag" in body
