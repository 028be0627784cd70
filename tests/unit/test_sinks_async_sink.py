"""kfast.sinks.async_sink: detection, the loop kfast owns, the host's loop, errors, hooks."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from typing import Any

import pytest

from kfast.errors import ConfigError, TransientSinkError
from kfast.sinks import PipelineInfo
from kfast.sinks.async_sink import AsyncSinkAdapter, is_async_sink

INFO = PipelineInfo(group_id="g", topics=["t"])


class AsyncRecorder:
    def __init__(self) -> None:
        self.batches: list[Any] = []
        self.threads: list[str] = []
        self.opened: PipelineInfo | None = None
        self.closed = False
        self.error: BaseException | None = None

    async def open(self, info: PipelineInfo) -> None:
        await asyncio.sleep(0)
        self.opened = info

    async def write(self, batch: Any) -> None:
        await asyncio.sleep(0.001)
        self.threads.append(threading.current_thread().name)
        if self.error is not None:
            raise self.error
        self.batches.append(batch)

    async def close(self) -> None:
        await asyncio.sleep(0)
        self.closed = True


def sink_loop_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "kfast-sink-loop"]


def test_is_async_sink() -> None:
    async def fn(batch: Any) -> None: ...

    def sync_fn(batch: Any) -> None: ...

    class AsyncCall:
        async def __call__(self, batch: Any) -> None: ...

    class SyncWrite:
        def write(self, batch: Any) -> None: ...

    assert is_async_sink(AsyncRecorder())
    assert is_async_sink(fn)
    assert is_async_sink(functools.partial(fn))
    assert is_async_sink(AsyncCall())
    assert not is_async_sink(SyncWrite())
    assert not is_async_sink(sync_fn)
    assert not is_async_sink(object())
    with pytest.raises(ConfigError, match="needs an async sink"):
        AsyncSinkAdapter(SyncWrite())


def test_own_loop_runs_hooks_and_writes_and_is_joined_on_close() -> None:
    assert not sink_loop_threads()
    sink = AsyncRecorder()
    adapter = AsyncSinkAdapter(sink)
    adapter.open(INFO)
    assert sink.opened == INFO  # async open awaited
    assert len(sink_loop_threads()) == 1
    adapter.write("b1")
    adapter.write("b2")
    assert sink.batches == ["b1", "b2"]  # awaited, in order, before write() returned
    assert sink.threads == ["kfast-sink-loop"] * 2
    loop = adapter.loop
    adapter.close()
    assert sink.closed
    assert not sink_loop_threads()
    assert loop is not None and loop.is_closed()


def test_async_callable_and_lazy_loop() -> None:
    got = []

    async def fn(batch: Any) -> None:
        got.append(batch)

    adapter = AsyncSinkAdapter(fn)
    adapter.write(1)  # no open(): the loop starts on first use
    adapter.close()
    assert got == [1]
    assert not sink_loop_threads()


def test_write_waits_for_the_coroutine() -> None:
    """The worker thread is held until the sink's write finishes (the backpressure)."""
    gate = threading.Event()

    class Slow:
        async def write(self, batch: Any) -> None:
            while not gate.is_set():
                await asyncio.sleep(0.005)

    adapter = AsyncSinkAdapter(Slow())
    adapter.open(INFO)
    done = threading.Event()
    t = threading.Thread(target=lambda: (adapter.write("b"), done.set()))
    t.start()
    assert not done.wait(0.3)
    gate.set()
    assert done.wait(10)
    t.join()
    adapter.close()


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionError("refused"),
        TimeoutError("slow"),
        ValueError("bad row"),
        TransientSinkError("x"),
    ],
)
def test_exceptions_keep_their_class(exc: BaseException) -> None:
    sink = AsyncRecorder()
    sink.error = exc
    adapter = AsyncSinkAdapter(sink)
    adapter.open(INFO)
    try:
        with pytest.raises(type(exc)) as info:
            adapter.write("b")
        assert info.value is exc
    finally:
        adapter.close()


def test_host_loop_via_bind_loop() -> None:
    sink = AsyncRecorder()
    adapter = AsyncSinkAdapter(sink)

    async def host() -> str:
        adapter.bind_loop(asyncio.get_running_loop())
        # the runtime calls the hooks from its own threads, never from the loop
        await asyncio.to_thread(adapter.open, INFO)
        await asyncio.to_thread(adapter.write, "b")
        with pytest.raises(ConfigError, match="own event loop's thread"):
            adapter.write("from the loop")
        await asyncio.to_thread(adapter.close)
        return threading.current_thread().name

    host_thread = asyncio.run(host())
    assert sink.batches == ["b"]
    assert sink.threads == [host_thread]
    assert sink.opened == INFO and sink.closed
    assert not sink_loop_threads()


def test_host_loop_stopping_under_a_write_is_not_bad_data() -> None:
    started = threading.Event()

    class Hang:
        async def write(self, batch: Any) -> None:
            started.set()
            await asyncio.sleep(3600)

    loop = asyncio.new_event_loop()
    host = threading.Thread(target=loop.run_forever)
    host.start()
    adapter = AsyncSinkAdapter(Hang())
    adapter.bind_loop(loop)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            adapter.write("b")
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=write)
    t.start()
    assert started.wait(10)
    loop.call_soon_threadsafe(loop.stop)
    t.join(10)
    host.join(10)
    assert not t.is_alive()
    # a ConfigError stops the pipeline without committing (never a dead letter)
    assert len(errors) == 1 and isinstance(errors[0], ConfigError)
    # the host's own cleanup: the write it abandoned is still pending on its loop
    pending = asyncio.all_tasks(loop)
    assert len(pending) == 1
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()


def test_cancelled_write_is_transient() -> None:
    started = threading.Event()
    tasks: list[asyncio.Task[Any]] = []

    class Hang:
        async def write(self, batch: Any) -> None:
            tasks.append(asyncio.current_task())  # type: ignore[arg-type]
            started.set()
            await asyncio.sleep(3600)

    adapter = AsyncSinkAdapter(Hang())
    adapter.open(INFO)
    errors: list[BaseException] = []
    t = threading.Thread(target=lambda: _catch(errors, adapter.write, "b"))
    t.start()
    assert started.wait(10)
    loop = adapter.loop
    assert loop is not None
    loop.call_soon_threadsafe(tasks[0].cancel)
    t.join(10)
    assert len(errors) == 1 and isinstance(errors[0], TransientSinkError)
    adapter.close()


def _catch(errors: list[BaseException], fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except BaseException as e:
        errors.append(e)


def test_optional_hooks_forwarded_only_when_present() -> None:
    plain = AsyncSinkAdapter(AsyncRecorder())
    assert not hasattr(plain, "stored_offsets")
    assert not hasattr(plain, "row_transaction")
    assert plain.stores_offsets is False

    class ExactlyOnce(AsyncRecorder):
        stores_offsets = True

        async def stored_offsets(self, group_id: str, topics: list[str]) -> dict:
            await asyncio.sleep(0)
            return {(topics[0], 0): 42}

        def row_transaction(self, batch: Any) -> str:
            return f"txn({batch})"

    adapter = AsyncSinkAdapter(ExactlyOnce())
    try:
        assert adapter.stores_offsets is True
        assert adapter.stored_offsets("g", ["t"]) == {("t", 0): 42}
        assert adapter.row_transaction("b") == "txn(b)"
    finally:
        adapter.close()
    assert not sink_loop_threads()


def test_sync_open_and_close_hooks_run_in_the_calling_thread() -> None:
    calls: list[tuple[str, str]] = []

    class Mixed:
        def open(self, info: PipelineInfo) -> None:
            calls.append(("open", threading.current_thread().name))

        async def write(self, batch: Any) -> None: ...

        def close(self) -> None:
            calls.append(("close", threading.current_thread().name))

    adapter = AsyncSinkAdapter(Mixed())
    adapter.open(INFO)
    adapter.close()
    me = threading.current_thread().name
    assert calls == [("open", me), ("close", me)]
    time.sleep(0)  # nothing left running
    assert not sink_loop_threads()
