"""The sink side of the pipeline: what a sink must implement and what it receives.

A sink turns a decoded :class:`kfast.Batch` into durable rows somewhere. The
runtime calls it from its single delivery thread, one batch at a time:

* ``open(info)`` (optional) once before the first write;
* ``write(batch)`` returns only when every row of ``batch`` is durable, or
  raises (the error contract, applied by :class:`SinkHooks` to every sink):

  - :class:`kfast.TransientSinkError`, or ``OSError`` (which includes
    ``ConnectionError`` and ``TimeoutError``): retried under the
    ``RetryPolicy``;
  - :class:`kfast.ConfigError` (or any other :class:`kfast.KfastError`):
    the pipeline stops without committing the batch;
  - :class:`kfast.PermanentSinkError` or any other exception: these rows
    cannot be written; the delivery layer isolates the bad rows (bisection)
    and dead-letters them when a DeadLetterPolicy is set, else stops.

  A ``write`` that returns an awaitable (an ``async def`` method where a
  plain one is expected) is a programming error: the coroutine is closed and
  the pipeline stops with a ``ConfigError``, committing nothing;
* ``close()`` once at shutdown.

Optional hooks (declared in :class:`Sink` with their defaults; a sink that
subclasses ``Sink`` inherits them, any other object gets them from
:class:`SinkHooks`): ``open``, ``close``, ``stores_offsets``,
``stored_offsets`` and ``row_transaction``.

Before delivery the runtime sets ``batch.context`` to a :class:`BatchContext`
that maps rows back to the Kafka messages they came from
(``batch.source_indices[row]`` for good rows, ``RowError.index`` for decode
errors) through a :class:`RecordSource`.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from kfast.errors import ConfigError, KfastError, PermanentSinkError, TransientSinkError

if TYPE_CHECKING:  # pragma: no cover
    from kfast._batch import Batch

__all__ = [
    "BatchContext",
    "CallableSink",
    "ListRecordSource",
    "NullSink",
    "PipelineInfo",
    "RecordSource",
    "Sink",
    "SinkHooks",
]


@dataclass(frozen=True)
class PipelineInfo:
    """What a sink may want to know about the pipeline feeding it."""

    group_id: str
    topics: list[str] = field(default_factory=list)


@runtime_checkable
class RecordSource(Protocol):
    """Maps an input index of a batch to the original Kafka message.

    The ring implements it over its arena; values are copied out only when a
    method is called (the slow path: DLQ records, error reports).
    """

    def __len__(self) -> int: ...
    def topic(self, i: int) -> str: ...
    def partition(self, i: int) -> int: ...
    def offset(self, i: int) -> int: ...
    def timestamp(self, i: int) -> int: ...
    def key(self, i: int) -> bytes | None: ...
    def value(self, i: int) -> bytes: ...
    def headers(self, i: int) -> list[tuple[str, bytes]] | None: ...


@dataclass(frozen=True)
class BatchContext:
    """Set by the runtime on ``batch.context`` before the batch is delivered.

    ``next_offsets`` holds, for every partition present in the batch, its last
    offset + 1 (what ``PostgresSink(mode="exactly_once")`` stores in the same
    transaction as the rows).
    """

    records: RecordSource
    next_offsets: dict[tuple[str, int], int]
    group_id: str


@runtime_checkable
class Sink(Protocol):
    """Protocol every sink follows: ``write`` is required, every other hook is optional.

    The bodies below are the defaults: a sink class that subclasses ``Sink`` inherits
    them, and :class:`SinkHooks` supplies the same ones for a sink that does not.
    """

    def write(self, batch: Batch) -> None:
        """Make every row of ``batch`` durable before returning (see the module doc)."""
        raise NotImplementedError

    def open(self, pipeline_info: PipelineInfo) -> None:
        """Called once before the first write (connect, check the target)."""

    def close(self) -> None:
        """Called once at shutdown."""

    @property
    def stores_offsets(self) -> bool:
        """True when ``write`` stores ``batch.context.next_offsets`` with the rows (the
        runtime then seeks to :meth:`stored_offsets` on assignment)."""
        return False

    def stored_offsets(self, group_id: str, topics: Sequence[str]) -> dict[tuple[str, int], int]:
        """``{(topic, partition): next_offset}`` stored by the sink (when ``stores_offsets``)."""
        return {}

    def row_transaction(self, batch: Batch) -> Any:
        """A transaction in which the delivery layer isolates ``batch``'s bad rows (see
        ``kfast.sinks.postgres.RowTransaction``), or None: slice by slice instead."""
        return None


_TRANSIENT = (TransientSinkError, OSError)


class SinkHooks:
    """Any sink object with every optional hook of :class:`Sink` filled in, and the sink
    error contract (see the module doc) applied to ``write``. The runtime and the delivery
    layer call the sink only through it."""

    def __init__(self, sink: Any) -> None:
        write = getattr(sink, "write", None)
        if not callable(write):
            raise ConfigError(
                f"sink {sink!r} has no write(batch) method (see kfast.sinks.Sink, or wrap a "
                "function in kfast.CallableSink)"
            )
        self.sink = sink
        self._write = write
        self._open = getattr(sink, "open", None)
        self._close = getattr(sink, "close", None)
        self._stored = getattr(sink, "stored_offsets", None)
        self._txn = getattr(sink, "row_transaction", None)

    @property
    def stores_offsets(self) -> bool:
        return bool(getattr(self.sink, "stores_offsets", False))

    @property
    def has_open(self) -> bool:
        return callable(self._open)

    @property
    def has_row_transaction(self) -> bool:
        return callable(self._txn)

    def open(self, pipeline_info: PipelineInfo) -> None:
        if callable(self._open):
            self._open(pipeline_info)

    def close(self) -> None:
        if callable(self._close):
            self._close()

    def stored_offsets(self, group_id: str, topics: Sequence[str]) -> dict[tuple[str, int], int]:
        if not callable(self._stored):
            return {}
        return dict(self._stored(group_id, topics))

    def row_transaction(self, batch: Batch) -> Any:
        return self._txn(batch) if callable(self._txn) else None

    def write(self, batch: Batch) -> None:
        """``sink.write(batch)`` under the error contract: transient errors become
        :class:`kfast.TransientSinkError`, other non-kfast ones :class:`kfast.PermanentSinkError`
        (the original is the ``__cause__``), an awaitable result a ``ConfigError``."""
        try:
            result = self._write(batch)
        except KfastError:
            raise
        except _TRANSIENT as exc:
            raise TransientSinkError(f"{type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            raise PermanentSinkError(f"{type(exc).__name__}: {exc}") from exc
        if result is not None and inspect.isawaitable(result):
            close = getattr(result, "close", None)
            if callable(close):
                close()  # never awaited: no "coroutine was never awaited" warning either
            raise ConfigError(
                f"{self.sink!r}.write returned an awaitable ({type(result).__name__}) instead of "
                "writing the rows: a plain write must return only once the rows are durable "
                "(declare the sink's method itself as 'async def write' to have it awaited); "
                "nothing of this batch was committed"
            )


class CallableSink(Sink):
    """Wraps ``fn(batch)``; ``fn`` must return only when the rows are durable."""

    def __init__(
        self,
        fn: Callable[[Batch], Any],
        *,
        on_open: Callable[[PipelineInfo], Any] | None = None,
        on_close: Callable[[], Any] | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"CallableSink needs a callable, got {type(fn).__name__}")
        self._fn = fn
        self._on_open = on_open
        self._on_close = on_close

    def open(self, pipeline_info: PipelineInfo) -> None:
        if self._on_open is not None:
            self._on_open(pipeline_info)

    def write(self, batch: Batch) -> None:
        self._fn(batch)

    def close(self) -> None:
        if self._on_close is not None:
            self._on_close()

    def __repr__(self) -> str:
        return f"CallableSink({self._fn!r})"


class NullSink(Sink):
    """Discards rows and counts them (benchmarks, dry runs)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.rows = 0
        self.batches = 0
        self.errors = 0
        self.opened = False
        self.closed = False

    def open(self, pipeline_info: PipelineInfo) -> None:
        self.opened = True

    def write(self, batch: Batch) -> None:
        with self._lock:
            self.rows += batch.num_rows
            self.batches += 1
            self.errors += len(batch.errors)

    def close(self) -> None:
        self.closed = True

    def __repr__(self) -> str:
        return f"NullSink(rows={self.rows}, batches={self.batches})"


class ListRecordSource:
    """A :class:`RecordSource` over plain Python sequences (tests, replay tools).

    ``records[i]`` is a mapping with keys ``topic``, ``partition``, ``offset``,
    ``timestamp``, ``key``, ``value`` and optionally ``headers``.
    """

    def __init__(self, records: Sequence[Mapping[str, Any]]) -> None:
        self._records = list(records)

    def __len__(self) -> int:
        return len(self._records)

    def topic(self, i: int) -> str:
        return str(self._records[i]["topic"])

    def partition(self, i: int) -> int:
        return int(self._records[i]["partition"])

    def offset(self, i: int) -> int:
        return int(self._records[i]["offset"])

    def timestamp(self, i: int) -> int:
        return int(self._records[i].get("timestamp", 0))

    def key(self, i: int) -> bytes | None:
        k = self._records[i].get("key")
        return None if k is None else bytes(k)

    def value(self, i: int) -> bytes:
        return bytes(self._records[i]["value"])

    def headers(self, i: int) -> list[tuple[str, bytes]] | None:
        h = self._records[i].get("headers")
        return None if h is None else [(str(k), bytes(v)) for k, v in h]
