"""Pipeline lifecycle against a real broker: start/stop/join/close, with, async, failed starts."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import threading

import pytest
from runtime_util import SCHEMA, Recorder, pipeline, produce_ids, wait_until

import kfast
from kfast.errors import ConfigError, DecodeError, KfastError, TransientSinkError

pytestmark = pytest.mark.integration


PIPELINE_THREADS = (
    "kfast-poll",
    "kfast-decoder",
    "kfast-worker",
    "kfast-sink-loop",
    "kfast-metrics",
)


def _kfast_threads() -> list[str]:
    """Threads a pipeline starts (kfast.testing's own service threads are not counted)."""
    return [t.name for t in threading.enumerate() if t.name.startswith(PIPELINE_THREADS)]


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_start_stop_join_close(kafka_broker, kafka_consumer_config, unique_topic, unique_group):
    kafka_broker.create_topic(unique_topic, partitions=2)
    produce_ids(kafka_broker, unique_topic, 0, 2000, 2)
    rec = Recorder()
    pipe = pipeline(kafka_consumer_config(unique_group), unique_topic, rec, commit_interval=0.1)
    assert pipe.health().state == "starting" and not pipe.running
    pipe.start()  # returns at once; the poll loop runs on a kfast thread
    assert pipe.running
    assert {"kfast-poll", "kfast-decoder", "kfast-worker"} <= set(_kfast_threads())
    wait_until(lambda: rec.count() >= 2000, 60, "rows")
    wait_until(lambda: pipe.health().last_commit_at is not None, 30, "a commit")
    pipe.stop()
    pipe.join(timeout=60)
    assert not pipe.running and pipe.health().state == "stopped"
    pipe.close()
    pipe.close()  # idempotent
    assert _kfast_threads() == []
    with pytest.raises(KfastError):
        pipe.start()
    assert sorted(rec.ids()) == list(range(2000))


def test_with_block_and_join_reraises(
    kafka_broker, kafka_consumer_config, unique_topic, unique_group
):
    kafka_broker.create_topic(unique_topic, partitions=1)
    kafka_broker.produce(unique_topic, [b"\xff\xff\xff"], partition=0)  # not Avro: a decode error
    rec = Recorder()
    with pytest.raises(DecodeError):
        with pipeline(kafka_consumer_config(unique_group), unique_topic, rec) as pipe:
            pipe.join(timeout=60)
    assert pipe.health().state == "failed" and pipe.health().last_error
    assert not pipe.health().live
    assert _kfast_threads() == []


def test_failed_start_releases_the_consumer_and_the_port(
    kafka_broker, kafka_consumer_config, unique_topic, unique_group
):
    kafka_broker.create_topic(unique_topic, partitions=1)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    before = _fds()
    try:
        for _ in range(3):
            pipe = pipeline(
                kafka_consumer_config(unique_group), unique_topic, Recorder(), metrics_port=port
            )
            with pytest.raises(ConfigError, match="metrics_port"):
                pipe.start()
            assert pipe.health().state == "failed"
            assert _kfast_threads() == []
    finally:
        busy.close()
    # the consumer built before the port failed was closed: no fd left behind
    assert _fds() <= before + 2


def test_sink_open_is_retried_at_start(
    kafka_broker, kafka_consumer_config, unique_topic, unique_group
):
    kafka_broker.create_topic(unique_topic, partitions=1)
    produce_ids(kafka_broker, unique_topic, 0, 100, 1)

    class LateSink(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.attempts = 0
            self.up = threading.Event()

        def open(self, info):  # type: ignore[no-untyped-def]
            self.attempts += 1
            if not self.up.is_set():
                raise TransientSinkError("connection refused")

    sink = LateSink()
    retry = kfast.RetryPolicy(
        max_attempts=1000, initial_backoff=0.05, max_backoff=0.1, deadline=120
    )
    pipe = pipeline(kafka_consumer_config(unique_group), unique_topic, sink, retry=retry)
    pipe.start()
    try:
        wait_until(lambda: sink.attempts >= 3, 30, "open retried")
        h = pipe.health()
        assert h.state == "starting" and "sink open" in h.reason and not h.ready
        sink.up.set()
        wait_until(lambda: sink.count() == 100, 60, "rows after the sink came up")
        wait_until(lambda: pipe.health().ready, 30, "ready")
    finally:
        pipe.close()
    pipe.join()


def test_run_installs_and_restores_signal_handlers(
    kafka_broker, kafka_consumer_config, unique_topic, unique_group
):
    kafka_broker.create_topic(unique_topic, partitions=1)
    produce_ids(kafka_broker, unique_topic, 0, 500, 1)
    rec = Recorder()
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    pipe = kfast.Pipeline(
        kafka_consumer_config(unique_group), [unique_topic], kfast.AvroDecoder(SCHEMA), rec
    )
    seen: list[object] = []

    def interrupt() -> None:
        wait_until(lambda: rec.count() >= 500, 60, "rows")
        seen.append(signal.getsignal(signal.SIGINT))
        os.kill(os.getpid(), signal.SIGINT)  # drains instead of KeyboardInterrupt

    t = threading.Thread(target=interrupt)
    t.start()
    pipe.run()  # the main thread: handlers installed
    t.join()
    assert seen and seen[0] not in before
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before

    # a failed run restores them too
    class NoDatabase(Recorder):
        def open(self, info):  # type: ignore[no-untyped-def]
            raise ConfigError("database does not exist")

    bad = kfast.Pipeline(
        kafka_consumer_config(unique_group), [unique_topic], kfast.AvroDecoder(SCHEMA), NoDatabase()
    )
    with pytest.raises(ConfigError, match="database"):
        bad.run()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert _kfast_threads() == []


def test_run_async_does_not_block_the_loop_and_cancellation_drains(
    kafka_broker, kafka_consumer_config, unique_topic, unique_group
):
    from confluent_kafka import Consumer, TopicPartition

    kafka_broker.create_topic(unique_topic, partitions=2)
    produce_ids(kafka_broker, unique_topic, 0, 3000, 2)
    rows: list[int] = []

    class AsyncSink:
        async def write(self, batch):  # type: ignore[no-untyped-def]
            await asyncio.sleep(0.001)  # runs on the host's loop
            rows.extend(memoryview(batch.column("id")).tolist())

    async def main() -> int:
        pipe = pipeline(
            kafka_consumer_config(unique_group), unique_topic, AsyncSink(), commit_interval=0.1
        )
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        tick = asyncio.create_task(ticker())
        task = asyncio.create_task(pipe.run_async())
        while len(rows) < 3000:
            await asyncio.sleep(0.05)
        assert ticks > 10  # the loop kept running while the pipeline worked
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        tick.cancel()
        assert pipe.health().state == "stopped"
        return ticks

    asyncio.run(main())
    assert sorted(rows) == list(range(3000))
    assert _kfast_threads() == []
    probe = Consumer({"bootstrap.servers": kafka_broker.bootstrap, "group.id": unique_group})
    try:
        tps = probe.committed([TopicPartition(unique_topic, p) for p in range(2)], timeout=10)
    finally:
        probe.close()
    assert sum(tp.offset for tp in tps) == 3000  # drained and committed before the re-raise


def test_async_with(kafka_broker, kafka_consumer_config, unique_topic, unique_group):
    kafka_broker.create_topic(unique_topic, partitions=1)
    produce_ids(kafka_broker, unique_topic, 0, 200, 1)
    rec = Recorder()

    async def main() -> None:
        async with pipeline(kafka_consumer_config(unique_group), unique_topic, rec) as pipe:
            while rec.count() < 200:
                await asyncio.sleep(0.05)
            assert pipe.health().ready
        assert pipe.health().state == "stopped"

    asyncio.run(main())
    assert sorted(rec.ids()) == list(range(200))
    assert _kfast_threads() == []


def test_fifty_pipelines_leak_nothing(
    kafka_broker, kafka_consumer_config, unique_topic, unique_group
):
    """Start and stop 50 pipelines in one process, with the metrics server, signal handlers
    and a dead-letter producer (made at start): threads (Python and librdkafka's), file
    descriptors, the port and RSS come back."""
    from kfast.runtime.pipeline import _rss_bytes

    kafka_broker.create_topic(unique_topic, partitions=1)
    kafka_broker.create_topic(unique_topic + "-dlq", partitions=1)
    produce_ids(kafka_broker, unique_topic, 0, 50, 1)
    port = _free_port()
    handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))

    def one(i: int) -> None:
        rec = Recorder()
        pipe = kfast.Pipeline(
            kafka_consumer_config(f"{unique_group}-{i}"),
            [unique_topic],
            kfast.AvroDecoder(SCHEMA),
            rec,
            metrics_port=port,  # the same port every time: freed at once on exit
            dlq=kfast.DeadLetterPolicy(topic=unique_topic + "-dlq"),
            memory_limit="48MiB",
            install_signal_handlers=True,
        )
        # every tenth consumes the topic, the others stop as soon as they have subscribed
        target = 50 if i % 10 == 0 else 0
        stopper = threading.Thread(
            target=lambda: (
                wait_until(
                    lambda: rec.count() >= target and pipe.health().state != "starting", 60, "run"
                ),
                pipe.stop(),
            )
        )
        stopper.start()
        pipe.run()  # main thread: signal handlers installed and restored
        stopper.join()

    for i in range(5):  # warm-up: imports, librdkafka's one-time allocations
        one(i)
    gc.collect()
    threads, fds, rss = threading.active_count(), _fds(), _rss_bytes()
    native = len(os.listdir("/proc/self/task"))
    for i in range(5, 50):
        one(i)
    gc.collect()
    assert threading.active_count() == threads, [t.name for t in threading.enumerate()]
    assert len(os.listdir("/proc/self/task")) == native
    assert _fds() <= fds + 2
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    grown = (_rss_bytes() - rss) / 2**20
    print(f"50 pipelines: RSS grew {grown:.1f} MiB after warm-up")
    assert grown < 8
    with socket.socket() as s:  # free right after the last run()
        s.bind(("127.0.0.1", port))
