from collections.abc import Callable
from typing import Any

from kfast._batch import BaseDecoder
from kfast._layout import Node
from kfast.avro.schema import Program as _SchemaProgram
from kfast.avro.schema import Schema

class Program:
    spec: tuple[tuple[str, int, bool], ...]
    layout: Node
    converters: tuple[Callable[[bytes], Any] | None, ...]
    names: list[str]
    source: _SchemaProgram
    def __init__(self, prog: _SchemaProgram) -> None: ...
    def reason(self, code: int, oi: int, val: int, need: int, pos: int) -> str: ...

class AvroDecoder(BaseDecoder):
    program: Program
    schema: Schema
    writer_schema: Schema | None
    def __init__(self, schema: Any, writer_schema: Any = None) -> None: ...
    @property
    def column_names(self) -> list[str]: ...

class FramedAvroDecoder(BaseDecoder):
    def _program_for(self, schema_id: int) -> Program: ...
    def _columns_program(self, first_schema_id: int | None) -> Program: ...
    def _failure_reason(self, schema_id: int, exc: BaseException) -> str: ...
    def _batch_decoder(self, first_schema_id: int) -> Any: ...
