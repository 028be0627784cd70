"""Async sinks: ``async def write(batch)`` (or an async callable) run on an event loop.

The runtime delivers from its worker thread and expects ``write`` to return only when the rows
are durable. :class:`AsyncSinkAdapter` gives an async sink that shape: its ``write`` submits the
coroutine to an event loop with :func:`asyncio.run_coroutine_threadsafe` and waits for it, so
the worker thread (and through the bounded ring, the consumer) waits for the sink: that wait is
the backpressure. Exceptions come back with their own class, so the sink error contract
(:mod:`kfast.sinks`) classifies them exactly as for a sync sink.

Which loop:

* under ``await pipe.run_async()`` / ``async with pipe`` the runtime calls :meth:`bind_loop`
  with the host's running loop; the sink shares the host's connections and clients;
* otherwise :meth:`AsyncSinkAdapter.open` starts a loop owned by kfast in a thread named
  ``kfast-sink-loop``, and :meth:`AsyncSinkAdapter.close` stops and joins it.

``open`` and ``close`` of the wrapped sink may be plain or ``async def``. ``stores_offsets``,
``stored_offsets`` and ``row_transaction`` are forwarded only when the wrapped sink has them
(``stored_offsets`` may be async; a ``row_transaction`` must be a plain method, since the
delivery layer drives the transaction it returns synchronously).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from kfast.errors import ConfigError, TransientSinkError

if TYPE_CHECKING:  # pragma: no cover
    from kfast._batch import Batch
    from kfast.sinks import PipelineInfo

__all__ = ["AsyncSinkAdapter", "is_async_sink"]

log = logging.getLogger("kfast.sinks.async_sink")

T = TypeVar("T")

# how often a waiting write checks that its loop is still running (a loop stopped by its host
# would otherwise leave the worker thread waiting forever)
_CHECK_S = 0.5


def _is_coroutine_function(fn: Any) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    if inspect.isfunction(fn) or inspect.ismethod(fn) or not callable(fn):
        return False
    # an object whose __call__ is async
    return inspect.iscoroutinefunction(type(fn).__call__)


def is_async_sink(sink: Any) -> bool:
    """True for an object whose ``write`` is a coroutine function, or an async callable."""
    write = getattr(sink, "write", None)
    if write is not None:
        return _is_coroutine_function(write)
    return callable(sink) and _is_coroutine_function(sink)


class AsyncSinkAdapter:
    """A sync sink over an async one (see the module doc)."""

    def __init__(self, sink: Any) -> None:
        if not is_async_sink(sink):
            raise ConfigError(
                f"sink: AsyncSinkAdapter needs an async sink (async def write(batch) or an "
                f"async callable), got {type(sink).__name__}"
            )
        self.sink = sink
        write = getattr(sink, "write", None)
        self._write: Callable[[Any], Awaitable[Any]] = write if write is not None else sink
        self._loop: asyncio.AbstractEventLoop | None = None
        self._owned: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # optional hooks: present on the adapter only when the wrapped sink has them, because
        # the runtime tells a sink's capabilities by their presence
        stored = getattr(sink, "stored_offsets", None)
        if callable(stored):
            self.stored_offsets = self._stored_offsets
        txn = getattr(sink, "row_transaction", None)
        if callable(txn) and not _is_coroutine_function(txn):
            self.row_transaction = txn

    def __repr__(self) -> str:
        return f"AsyncSinkAdapter({self.sink!r})"

    @property
    def stores_offsets(self) -> bool:
        return bool(getattr(self.sink, "stores_offsets", False))

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop the sink runs on (the host's, kfast's own, or None before ``open``)."""
        return self._loop

    # ------------------------------------------------------------------ loop
    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run the sink on ``loop`` (the host's running loop) instead of a loop of its own."""
        with self._lock:
            if self._owned is not None:
                raise ConfigError("async sink: bind_loop() after open() started kfast's own loop")
            self._loop = loop

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    try:
                        loop.run_forever()
                    finally:
                        try:
                            loop.run_until_complete(loop.shutdown_asyncgens())
                        finally:
                            loop.close()

                self._thread = threading.Thread(target=run, name="kfast-sink-loop", daemon=True)
                self._thread.start()
                ready.wait()
                self._owned = self._loop = loop
            return self._loop

    def _run(self, make: Callable[[], Awaitable[T]]) -> T:
        """Run the awaitable ``make()`` returns on the sink's loop; wait for its result."""
        loop = self._ensure_loop()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise ConfigError(
                "async sink: called from its own event loop's thread, where waiting for it "
                "would block the loop (stop the pipeline with stop() and await run_async())"
            )
        if loop.is_closed():
            raise ConfigError("async sink: its event loop is closed")

        async def call() -> tuple[T | None, Exception | None]:
            # the exception travels as a value: run_coroutine_threadsafe would replace a
            # TimeoutError by a new instance without its traceback and cause
            try:
                return await make(), None
            except Exception as e:
                return None, e

        fut = asyncio.run_coroutine_threadsafe(call(), loop)
        # wait() rather than result(timeout): a sink's own TimeoutError is the same class as
        # the wait's timeout and must reach the caller unchanged
        while not concurrent.futures.wait([fut], _CHECK_S).done:
            if not loop.is_running():
                fut.cancel()
                raise ConfigError("async sink: its event loop stopped while a write was waiting")
        try:
            result, error = fut.result()
        except concurrent.futures.CancelledError:
            # cancelled by the host (its loop shutting down): nothing says the rows are bad
            raise TransientSinkError("async sink: the write was cancelled") from None
        if error is not None:
            raise error
        return result  # type: ignore[return-value]

    # ----------------------------------------------------------------- hooks
    def open(self, pipeline_info: PipelineInfo) -> None:
        self._ensure_loop()
        hook = getattr(self.sink, "open", None)
        if callable(hook):
            self._call_hook(hook, pipeline_info)

    def write(self, batch: Batch) -> None:
        self._run(lambda: self._write(batch))

    def close(self) -> None:
        hook = getattr(self.sink, "close", None)
        try:
            if callable(hook):
                self._call_hook(hook)
        finally:
            self._stop_owned_loop()

    def _stored_offsets(self, group_id: str, topics: Sequence[str]) -> dict[tuple[str, int], int]:
        return dict(self._call_hook(self.sink.stored_offsets, group_id, list(topics)))

    def _call_hook(self, hook: Callable[..., Any], *args: Any) -> Any:
        if _is_coroutine_function(hook):
            return self._run(lambda: hook(*args))
        return hook(*args)

    def _stop_owned_loop(self) -> None:
        with self._lock:
            loop, thread = self._owned, self._thread
            self._owned = self._thread = None
            if loop is not None:
                self._loop = None
        if loop is not None and thread is not None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(loop.stop)
            thread.join()
