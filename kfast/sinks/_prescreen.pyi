"""Type stub for the compiled client-side row check (see kfast.sinks.postgres.prescreen)."""

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kfast._batch import Batch

class Program:
    def __init__(
        self, slots: Iterable[Mapping[str, Any]], tests: Iterable[Sequence[Any]]
    ) -> None: ...
    def run(self, batch: Batch, start: int, stop: int) -> list[tuple[int, int]]: ...

def parse_double(text: bytes) -> float | None: ...
def parse_float(text: bytes) -> float | None: ...
