"""Async sinks in a real Pipeline (real broker): the same rows as a sync sink, on the right loop."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from runtime_util import Recorder, Runner, pipeline, produce_ids, wait_until

pytestmark = pytest.mark.integration

N = 6000
PARTITIONS = 3


class AsyncRecorder:
    """``async def write``: records (partition, offset, id) and the thread it ran on."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, int]] = []
        self.threads: set[str] = set()
        self.opened = self.closed = False

    async def open(self, info: Any) -> None:
        await asyncio.sleep(0)
        self.opened = True

    async def write(self, batch: Any) -> None:
        await asyncio.sleep(0.001)  # really suspends: the batch must stay valid meanwhile
        self.threads.add(threading.current_thread().name)
        recs = batch.context.records
        ids = memoryview(batch.column("id")).tolist()
        src = memoryview(batch.source_indices).tolist()
        self.rows.extend((recs.partition(j), recs.offset(j), ids[r]) for r, j in enumerate(src))

    async def close(self) -> None:
        await asyncio.sleep(0)
        self.closed = True


def test_async_and_sync_sinks_get_the_same_rows(
    kafka_broker, kafka_consumer_config, unique_topic, unique_group
):
    kafka_broker.create_topic(unique_topic, partitions=PARTITIONS)
    produce_ids(kafka_broker, unique_topic, 0, N, PARTITIONS)

    # a sync sink
    sync = Recorder()
    runner = Runner(pipeline(kafka_consumer_config(unique_group + "-sync"), unique_topic, sync))
    # an async sink on a loop kfast owns (start()/stop() from plain threads)
    own = AsyncRecorder()
    own_pipe = pipeline(kafka_consumer_config(unique_group + "-own"), unique_topic, own)
    own_pipe.start()
    # an async sink on the host's loop (run_async)
    host = AsyncRecorder()
    host_pipe = pipeline(kafka_consumer_config(unique_group + "-host"), unique_topic, host)

    async def serve() -> str:
        task = asyncio.create_task(host_pipe.run_async())
        while len(host.rows) < N:
            assert not task.done(), task.exception()
            await asyncio.sleep(0.05)  # the loop stays free: the sink's writes run in it
        host_pipe.stop()
        await asyncio.wait_for(task, 60)
        return threading.current_thread().name

    host_thread = asyncio.run(asyncio.wait_for(serve(), 120))
    wait_until(lambda: sync.count() >= N and len(own.rows) >= N, 60, "rows in every sink")
    runner.stop()
    own_pipe.stop()
    own_pipe.join(60)
    own_pipe.close()

    assert sorted(sync.rows) == sorted(own.rows) == sorted(host.rows)
    assert sorted(r[2] for r in host.rows) == list(range(N))
    assert host.threads == {host_thread}
    assert own.threads == {"kfast-sink-loop"}
    assert host.opened and host.closed and own.opened and own.closed
    assert own_pipe.metrics()["written"] == host_pipe.metrics()["written"] == N
    assert not [t for t in threading.enumerate() if t.name == "kfast-sink-loop"]
