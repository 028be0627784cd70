"""The sink side of the pipeline: what a sink must implement and what it receives.

A sink turns a decoded :class:`kfast.Batch` into durable rows somewhere. The
runtime calls it from its single delivery thread, one batch at a time:

* ``open(info)`` (optional) once before the first write;
* ``write(batch)`` returns only when every row of ``batch`` is durable, or
  raises :class:`kfast.TransientSinkError` (retrying may succeed),
  :class:`kfast.PermanentSinkError` (these rows cannot be written; the
  delivery layer bisects them) or :class:`kfast.ConfigError` (stop);
* ``close()`` once at shutdown.

Before delivery the runtime sets ``batch.context`` to a :class:`BatchContext`
that maps rows back to the Kafka messages they came from
(``batch.source_index[row]`` for good rows, ``RowError.index`` for decode
errors) through a :class:`RecordSource`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

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
    """Protocol every sink follows. ``open(info)`` is optional."""

    def write(self, batch: Batch) -> None: ...
    def close(self) -> None: ...


class CallableSink:
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


class NullSink:
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
