"""Commit only what is durable.

The worker delivers batches in ring order, and the ring holds each
partition's messages in offset order, so when a batch is durable every
message of its partitions before its last offset is durable too: the
*durable watermark* of a partition is simply the last offset of its latest
delivered batch, and the offset to commit is watermark + 1 (Kafka's
convention: the next offset to read).

Partitions are identified by the ring's partition index plus an assignment
*generation*: after a revoke (or a lost assignment) the generation changes,
so a batch of the old generation that finishes late can neither move the
watermark nor be committed for a partition the member no longer owns.

The tracker itself never talks to Kafka; the poll thread asks it what to
commit (``pending()``), commits asynchronously in steady state and
synchronously on revoke and shutdown, and reports failures back
(``commit_failed``), which makes the next tick retry.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

__all__ = ["OffsetTracker", "PartitionState"]


@dataclass
class PartitionState:
    topic: str
    partition: int
    generation: int
    durable_next: int = -1  # watermark + 1; -1 until the first batch is durable
    committed: int = -1  # last offset handed to commit()


class OffsetTracker:
    """Per-partition durable watermark and commit bookkeeping (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parts: dict[int, PartitionState] = {}
        self.commits = 0
        self.commit_errors = 0
        self.stale_acks = 0

    def assign(self, index: int, topic: str, partition: int, generation: int) -> None:
        with self._lock:
            self._parts[index] = PartitionState(topic, partition, generation)

    def remove(self, index: int) -> PartitionState | None:
        with self._lock:
            return self._parts.pop(index, None)

    def mark(self, progress: dict[int, tuple[int, int]]) -> None:
        """A batch is durable: ``progress`` maps partition index -> (generation, next offset)."""
        with self._lock:
            for index, (generation, nxt) in progress.items():
                st = self._parts.get(index)
                if st is None or st.generation != generation:
                    self.stale_acks += 1
                    continue
                if nxt > st.durable_next:
                    st.durable_next = nxt

    def pending(
        self, indexes: list[int] | None = None, *, force: bool = False
    ) -> list[tuple[str, int, int]]:
        """[(topic, partition, offset)] whose durable offset was not committed yet.

        ``force`` returns every durable offset, also those already handed to an
        asynchronous commit whose outcome is not known yet (a revoke must not
        rely on an async commit that may still fail with ILLEGAL_GENERATION).
        """
        with self._lock:
            items = (
                self._parts.items()
                if indexes is None
                else [(i, self._parts[i]) for i in indexes if i in self._parts]
            )
            return [
                (st.topic, st.partition, st.durable_next)
                for _, st in items
                if st.durable_next > st.committed or (force and st.durable_next >= 0)
            ]

    def committed(self, offsets: list[tuple[str, int, int]]) -> None:
        """``offsets`` were handed to ``commit()`` (optimistic; see ``commit_failed``)."""
        with self._lock:
            self.commits += 1
            by_tp = {(st.topic, st.partition): st for st in self._parts.values()}
            for topic, partition, off in offsets:
                st = by_tp.get((topic, partition))
                if st is not None and off > st.committed:
                    st.committed = off

    def commit_failed(self, offsets: list[tuple[str, int, int]]) -> None:
        """A commit did not succeed: commit these partitions again on the next tick."""
        with self._lock:
            self.commit_errors += 1
            by_tp = {(st.topic, st.partition): st for st in self._parts.values()}
            for topic, partition, off in offsets:
                st = by_tp.get((topic, partition))
                if st is not None and st.committed <= off:
                    st.committed = -1

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {
                f"{st.topic}[{st.partition}]": {
                    "durable_next": st.durable_next,
                    "committed": st.committed,
                }
                for st in self._parts.values()
            }
