"""What the pipeline's threads tell each other, one channel per message.

Every queue and event here has exactly one writer and one reader (named in
the comment); ``Failure`` is the only slot several threads write, and it is
set once. Nothing else is shared between the loops except the ring (see
:mod:`kfast.runtime.ring`) and the offset tracker (its own lock).

Threads: the **host** (whoever calls ``start()``/``stop()``), the **poll**
thread (:mod:`kfast.runtime.poll`), the **decoder** thread
(:mod:`kfast.runtime.decode`) and the **worker** thread
(:mod:`kfast.runtime.deliver`).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, NamedTuple

__all__ = ["Channels", "Decoded", "Failure"]


class Decoded(NamedTuple):
    """A decoded batch on its way to the worker: ring slots [first, first + slots)."""

    batch: Any  # kfast.Batch
    view: Any  # kfast.runtime.ring.RingView
    first: int
    slots: int


class Failure:
    """The first error any thread hit; set once, later errors are only logged."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self.where = ""

    def set(self, error: BaseException, where: str) -> bool:
        """Record ``error``; False if an earlier one is already recorded."""
        with self._lock:
            if self.error is not None:
                return False
            self.error = error
            self.where = where
            return True

    def __bool__(self) -> bool:
        return self.error is not None


class Channels:
    def __init__(self) -> None:
        # host -> poll: drain, commit and shut down (stop(), a signal)
        self.stop = threading.Event()
        # poll -> decoder and worker: leave after the current batch (shutdown)
        self.stop_workers = threading.Event()
        # poll -> decoder: the ring holds new messages
        self.new_messages = threading.Event()
        # poll -> decoder: cut the batch now, do not wait for max_wait (revoke, drain)
        self.flush = threading.Event()
        # worker -> poll: ring slots were released (a revoke waits for them)
        self.released = threading.Event()
        # decoder -> worker: decoded batches in ring order; None after the last one
        self.decoded: queue.Queue[Decoded | None] = queue.Queue()
        # worker -> decoder: delivered batches to decode into again
        self.recycled: queue.Queue[Any] = queue.Queue()
        # any thread -> everyone: the first error; the pipeline stops without
        # committing what is not durable
        self.failure = Failure()
