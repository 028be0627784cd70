"""The sink error contract (kfast.sinks.SinkHooks) through a real Pipeline and broker.

* ``OSError`` (``ConnectionError``, ``TimeoutError``) from any sink is transient: retried
  under the RetryPolicy, nothing dead-lettered;
* any other exception is permanent for the rows: bisected, the bad ones dead-lettered;
* a sync ``write`` that returns a coroutine stops the pipeline with a ConfigError and
  commits nothing.
"""

from __future__ import annotations

import gc
import warnings
from typing import Any

import pytest
from _sink_helpers import consume_all
from runtime_util import Recorder, Runner, pipeline, produce_ids, wait_until

import kfast
from kfast.dlq import DeadLetterPolicy
from kfast.retry import RetryPolicy

pytestmark = pytest.mark.integration

N = 400
RETRY = RetryPolicy(max_attempts=6, initial_backoff=0.01, max_backoff=0.05, deadline=30)


def _conf(broker: Any, group: str) -> dict[str, Any]:
    return {
        "bootstrap.servers": broker.bootstrap,
        "group.id": group,
        "auto.offset.reset": "earliest",
    }


def _committed(broker: Any, group: str, topic: str, partitions: int) -> list[int]:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group})
    try:
        tps = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
    finally:
        c.close()
    return [tp.offset for tp in tps]


@pytest.mark.parametrize("exc", [ConnectionError, TimeoutError, OSError])
def test_os_errors_from_a_callable_sink_are_retried(
    kafka_broker: Any, unique_topic: str, unique_group: str, exc: type[BaseException]
) -> None:
    kafka_broker.create_topic(unique_topic, partitions=1)
    produce_ids(kafka_broker, unique_topic, 0, N, 1)
    rec = Recorder()
    fails = {"left": 2}

    def write(batch: Any) -> None:
        if fails["left"]:
            fails["left"] -= 1
            raise exc("the database went away")
        rec.write(batch)

    pipe = pipeline(_conf(kafka_broker, unique_group), unique_topic, write, retry=RETRY)
    runner = Runner(pipe)
    wait_until(lambda: rec.count() >= N, 60, "every row written")
    runner.stop()
    assert sorted(rec.ids()) == list(range(N))  # each row once: nothing dead-lettered or lost
    assert pipe.metrics()["delivery"]["retries"] == 2


def test_any_other_exception_is_permanent_for_the_bad_rows(
    kafka_broker: Any, unique_topic: str, unique_group: str
) -> None:
    kafka_broker.create_topic(unique_topic, partitions=1)
    dlq = unique_topic + ".dlq"
    kafka_broker.create_topic(dlq)
    produce_ids(kafka_broker, unique_topic, 0, N, 1)
    bad = {17, 18, 250}
    rec = Recorder()

    def write(batch: Any) -> None:
        ids = memoryview(batch.column("id")).tolist()
        hit = bad.intersection(ids)
        if hit:
            raise ValueError(f"ids {sorted(hit)} are not acceptable")
        rec.write(batch)

    pipe = pipeline(
        _conf(kafka_broker, unique_group),
        unique_topic,
        write,
        retry=RETRY,
        dlq=DeadLetterPolicy(dlq),
    )
    runner = Runner(pipe)
    wait_until(lambda: rec.count() >= N - len(bad), 60, "the good rows written")
    letters = consume_all(kafka_broker.bootstrap, dlq, len(bad))
    runner.stop()
    assert sorted(rec.ids()) == sorted(set(range(N)) - bad)
    offsets = sorted(int(dict(m.headers())["kfast.original.offset"]) for m in letters)
    assert offsets == sorted(bad)  # produce_ids on one partition: offset == id
    for m in letters:
        h = dict(m.headers())
        assert h["kfast.error.stage"] == b"sink"
        assert h["kfast.error.class"] == b"ValueError"
    assert pipe.metrics()["delivery"]["retries"] == 0


class _CoroutineSink:
    """A sink whose write is declared async although the method is called like a plain one
    (wrapped so the runtime cannot see ``async def``)."""

    def __init__(self) -> None:
        self.awaited = 0
        self.calls = 0

    async def _write(self, batch: Any) -> None:
        self.awaited += 1

    def write(self, batch: Any) -> Any:
        self.calls += 1
        return self._write(batch)

    def close(self) -> None:
        pass


def test_a_sync_write_returning_a_coroutine_stops_and_commits_nothing(
    kafka_broker: Any, unique_topic: str, unique_group: str
) -> None:
    kafka_broker.create_topic(unique_topic, partitions=2)
    produce_ids(kafka_broker, unique_topic, 0, N, 2)
    sink = _CoroutineSink()
    pipe = pipeline(_conf(kafka_broker, unique_group), unique_topic, sink, retry=RETRY)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner = Runner(pipe)
        wait_until(lambda: not runner.thread.is_alive(), 60, "the pipeline to stop on its own")
        gc.collect()
    assert isinstance(runner.error, kfast.ConfigError), runner.error
    assert "awaitable" in str(runner.error) and "nothing" in str(runner.error)
    assert sink.calls >= 1 and sink.awaited == 0
    assert not [w for w in caught if "never awaited" in str(w.message)]  # closed, not leaked
    # No offset committed: a restarted pipeline reads the topic from the start.
    assert all(off < 0 for off in _committed(kafka_broker, unique_group, unique_topic, 2))
