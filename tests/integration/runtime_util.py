"""Helpers shared by the runtime integration tests (not a test module)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import kfast
from kfast.sinks import CallableSink

SCHEMA = {
    "type": "record",
    "name": "Event",
    "fields": [{"name": "id", "type": "long"}, {"name": "name", "type": "string"}],
}


def _zigzag(n: int) -> bytes:
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def encode(i: int, pad: int = 0) -> bytes:
    """Avro binary of {"id": i, "name": f"m{i}" + "x" * pad} (matches SCHEMA)."""
    name = f"m{i}".encode() + b"x" * pad
    return _zigzag(i) + _zigzag(len(name)) + name


def produce_ids(broker: Any, topic: str, start: int, n: int, partitions: int, pad: int = 0) -> None:
    """Produce ids [start, start+n) round-robin over ``partitions`` (id % partitions)."""
    for p in range(partitions):
        ids = range(start + ((p - start) % partitions), start + n, partitions)
        broker.produce(topic, [encode(i, pad) for i in ids], partition=p)


def count_lines(path: str) -> int:
    """Complete lines written so far (cheap: no parsing)."""
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def read_lines(path: str) -> list[tuple[int, int, int]]:
    """The (partition, offset, id) lines runtime_child.py's sink wrote."""
    try:
        with open(path) as f:
            data = f.read()
    except FileNotFoundError:
        return []
    out = []
    for line in data.splitlines():
        parts = line.split()
        if len(parts) == 3:  # a torn last line after kill -9 is not a record
            out.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return out


class Recorder:
    """A sink that records (partition, offset, id) for every row it writes."""

    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None) -> None:
        self.lock = threading.Lock()
        self.rows: list[tuple[int, int, int]] = []
        self.batches = 0
        self.delay = delay
        self.gate = gate
        self.writing = threading.Event()

    def write(self, batch: Any) -> None:
        self.writing.set()
        if self.gate is not None:
            self.gate.wait()
        if self.delay:
            time.sleep(self.delay)
        recs = batch.context.records
        ids = memoryview(batch.column("id")).tolist()
        src = memoryview(batch.source_indices).tolist()
        out = [(recs.partition(j), recs.offset(j), ids[r]) for r, j in enumerate(src)]
        with self.lock:
            self.rows.extend(out)
            self.batches += 1

    def close(self) -> None:
        pass

    def ids(self) -> list[int]:
        with self.lock:
            return [r[2] for r in self.rows]

    def count(self) -> int:
        with self.lock:
            return len(self.rows)


def pipeline(conf: dict[str, Any], topic: str, sink: Any, **kwargs: Any) -> kfast.Pipeline:
    kwargs.setdefault("install_signal_handlers", False)
    kwargs.setdefault("drain_timeout", 20.0)
    if callable(sink) and not hasattr(sink, "write"):
        sink = CallableSink(sink)
    return kfast.Pipeline(conf, [topic], kfast.AvroDecoder(SCHEMA), sink, **kwargs)


class Runner:
    """Run a pipeline in a thread; ``stop()`` joins it and re-raises its error."""

    def __init__(self, pipe: kfast.Pipeline) -> None:
        self.pipe = pipe
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.pipe.run()
        except BaseException as e:
            self.error = e

    def stop(self, timeout: float = 60.0) -> None:
        self.pipe.stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "pipeline did not stop"
        if self.error is not None:
            raise self.error


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``pred`` until true; fail after ``timeout`` s (a hang guard, not a timing assert)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
