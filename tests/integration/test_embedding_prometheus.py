"""kfast.prometheus on a real Pipeline (real broker): a scrape parsed with prometheus_client."""

from __future__ import annotations

import json
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from runtime_util import Recorder, Runner, encode, pipeline, wait_until

import kfast
from kfast import prometheus as kprom

pytestmark = pytest.mark.integration

N = 3000
BAD = (b"\xff\xff", b"")  # undecodable: dead-lettered at the decode stage


def _families(text: str) -> dict[str, dict[str, list]]:
    """{family: {sample name: [(labels, value)]}} of a text scrape."""
    out: dict[str, dict[str, list]] = {}
    for fam in text_string_to_metric_families(text):
        by = out.setdefault(fam.name, {"type": fam.type, "help": fam.documentation})
        for s in fam.samples:
            by.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_scrape_of_a_running_pipeline(
    kafka_broker, kafka_consumer_config, unique_topic, unique_group
):
    dlq_topic = unique_topic + ".dlq"
    kafka_broker.create_topic(unique_topic, partitions=2)
    kafka_broker.create_topic(dlq_topic, partitions=1)
    for p in range(2):
        values = [encode(i) for i in range(p, N, 2)]
        values[10:10] = list(BAD)
        kafka_broker.produce(unique_topic, values, partition=p)
    rec = Recorder()
    conf = kafka_consumer_config(unique_group, **{"statistics.interval.ms": 200})
    pipe = pipeline(
        conf,
        unique_topic,
        rec,
        commit_interval=0.1,
        dlq=kfast.DeadLetterPolicy(topic=dlq_topic, max_ratio=1.0),
    )
    registry = CollectorRegistry()
    collector = kprom.register(pipe, registry)
    server = kprom.serve(pipe, 0)
    try:
        runner = Runner(pipe)
        wait_until(lambda: runner.error is not None or rec.count() >= N, 60, "rows")
        wait_until(lambda: pipe.metrics().get("delivery", {}).get("dlq_records", 0) >= 4, 60, "dlq")
        wait_until(lambda: sum(pipe.metrics()["consumer_lag"].values() or [1]) == 0, 30, "lag 0")
        with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
            served = r.read().decode()
        with urllib.request.urlopen(server.url + "/healthz", timeout=10) as r:
            health = json.loads(r.read())
        with urllib.request.urlopen(server.url + "/readyz", timeout=10) as r:
            assert r.status == 200
        text = generate_latest(registry).decode()
        runner.stop()
    finally:
        server.close()
        kprom.unregister(collector, registry)

    assert health["live"] is True and health["ready"] is True
    for scrape in (text, served):
        fams = _families(scrape)
        for name, fam in fams.items():
            assert name.startswith("kfast_")
            assert fam["help"] and fam["help"] != name
            if fam["type"] == "counter":
                samples = [k for k in fam if k not in ("type", "help")]
                assert all(k.endswith(("_total", "_created")) for k in samples), name
        assert fams["kfast_rows_written"]["type"] == "counter"
        # rows the sink took, not counting the dead letters
        assert fams["kfast_rows_written"]["kfast_rows_written_total"] == [({}, float(N))]
        assert fams["kfast_messages_consumed"]["kfast_messages_consumed_total"] == [
            ({}, float(N + 2 * len(BAD)))
        ]
        dlq = fams["kfast_dlq_records"]["kfast_dlq_records_total"]
        assert sum(v for _, v in dlq) == 2 * len(BAD)
        assert {lab["stage"] for lab, _ in dlq} == {"decode"}
        assert fams["kfast_ring_fill_ratio"]["type"] == "gauge"
        lag = fams["kfast_consumer_lag_messages"]
        assert lag["type"] == "gauge"
        assert sorted(lab["partition"] for lab, _ in lag["kfast_consumer_lag_messages"]) == [
            "0",
            "1",
        ]
        assert {lab["topic"] for lab, _ in lag["kfast_consumer_lag_messages"]} == {unique_topic}
        committed = fams["kfast_committed_offset"]["kfast_committed_offset"]
        assert sum(v for _, v in committed) == N + 2 * len(BAD)
        rows = fams["kfast_batch_rows"]
        assert rows["type"] == "histogram"
        assert rows["kfast_batch_rows_bucket"][-1][0]["le"] == "+Inf"
        lat = fams["kfast_stage_latency_seconds"]
        assert lat["type"] == "histogram"
        stages = {lab["stage"] for lab, _ in lat["kfast_stage_latency_seconds_count"]}
        assert {"poll", "decode", "deliver", "end_to_end"} <= stages
        for lab, v in lat["kfast_stage_latency_seconds_bucket"]:
            if lab["le"] == "+Inf":
                assert (
                    dict(stage=lab["stage"]),
                    v,
                ) in lat["kfast_stage_latency_seconds_count"]
        rebalance = fams["kfast_rebalance_partitions"]["kfast_rebalance_partitions_total"]
        assert ({"event": "assigned"}, 2.0) in rebalance  # partitions, not callbacks
        state = dict(
            (lab["state"], v) for lab, v in fams["kfast_health_state"]["kfast_health_state"]
        )
        assert state["running"] == 1.0 and sum(state.values()) == 1.0
