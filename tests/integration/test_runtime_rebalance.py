"""Rebalance churn: members join and leave while messages flow; nothing is lost."""

from __future__ import annotations

import os
import random
import threading

import pytest
from runtime_util import Recorder, Runner, pipeline, produce_ids, wait_until

import kfast
from kfast.runtime.pipeline import SOURCES

pytestmark = pytest.mark.integration

CHURN = int(os.environ.get("KFAST_CHURN", "6"))
MESSAGES = int(os.environ.get("KFAST_CHURN_MESSAGES", "60000"))


@pytest.mark.parametrize("strategy", ["cooperative-sticky", "range"])
@pytest.mark.parametrize("source", SOURCES)
def test_rebalance_churn(
    kafka_broker, kafka_consumer_config, unique_topic, unique_group, strategy, source
):
    n = MESSAGES
    parts = 8
    kafka_broker.create_topic(unique_topic, partitions=parts)
    rec = Recorder(delay=0.01)  # a sink that takes 10 ms per batch
    conf = kafka_consumer_config(unique_group, **{"partition.assignment.strategy": strategy})
    rng = random.Random(7)

    def member() -> Runner:
        return Runner(
            pipeline(
                conf,
                unique_topic,
                rec,
                memory_limit="48MiB",
                revoke_timeout=3.0,
                commit_interval=0.2,
                source=source,
            )
        )

    # produce in the background while the group churns
    chunks = 10
    producer_error: list[BaseException] = []

    def produce() -> None:
        try:
            for c in range(chunks):
                produce_ids(kafka_broker, unique_topic, c * (n // chunks), n // chunks, parts)
        except BaseException as e:
            producer_error.append(e)

    prod = threading.Thread(target=produce)
    prod.start()
    members = [member()]
    events = 0
    while events < CHURN:
        wait_until(lambda: rec.count() > 0, 60, "first rows")
        threading.Event().wait(rng.uniform(0.3, 1.0))
        if len(members) < 3 and (len(members) == 1 or rng.random() < 0.5):
            members.append(member())  # join
        else:
            members.pop(rng.randrange(len(members))).stop()  # leave (drain, commit, close)
        events += 1
    prod.join()
    assert not producer_error, producer_error
    wait_until(lambda: len(set(rec.ids())) >= n, 180, "all ids")
    for m in members:
        m.stop()
    ids = rec.ids()
    assert set(ids) == set(range(n)), f"lost {n - len(set(ids))} messages"
    dups = len(ids) - len(set(ids))
    print(f"{strategy} ({source}): {events} join/leave events, {n} messages, {dups} duplicates")


def test_revoke_with_stalled_sink_abandons_and_loses_nothing(
    kafka_broker, kafka_consumer_config, unique_topic, unique_group
):
    """A member whose sink is stuck cannot finish its revoked partitions: after
    revoke_timeout it abandons their rows (not committed), the new owner reads
    them again, and nothing is lost."""
    n = 20_000
    kafka_broker.create_topic(unique_topic, partitions=4)
    produce_ids(kafka_broker, unique_topic, 0, n, 4)
    gate = threading.Event()
    stuck = Recorder(gate=gate)
    free = Recorder()
    conf = kafka_consumer_config(unique_group)
    # batches of 2,000: the stuck batch and the one decoded ahead of it leave
    # 16,000 messages in the ring to abandon
    a = Runner(
        pipeline(
            conf,
            unique_topic,
            stuck,
            revoke_timeout=1.0,
            commit_interval=0.1,
            batch=kfast.BatchPolicy(max_rows=2_000),
        )
    )
    wait_until(stuck.writing.is_set, 60, "first write (stuck)")
    wait_until(lambda: a.pipe.metrics()["ring"]["pushed"] >= n, 60, "ring filled")
    b = Runner(pipeline(conf, unique_topic, free, commit_interval=0.1))
    wait_until(lambda: a.pipe.metrics()["rebalances"]["revoke_timeouts"] >= 1, 60, "revoke timeout")
    wait_until(lambda: free.count() > 0, 60, "new owner delivers")
    gate.set()
    wait_until(lambda: len(set(stuck.ids()) | set(free.ids())) >= n, 60, "all ids")
    m = a.pipe.metrics()
    a.stop()
    b.stop()
    assert set(stuck.ids()) | set(free.ids()) == set(range(n))
    assert m["ring"]["abandoned"] > 0
    assert m["rebalances"]["lost"] == 0
