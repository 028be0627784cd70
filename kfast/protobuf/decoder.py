"""``ProtobufDecoder``: serialized Protobuf messages of one type into a columnar ``kfast.Batch``."""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor

from kfast.errors import ConfigError
from kfast.protobuf._compile import compile_plan
from kfast.protobuf._decoder import ProtobufDecoderBase

__all__ = ["MAX_DEPTH_LIMIT", "ProtobufDecoder", "descriptor_of"]

MAX_DEPTH_LIMIT = 100  # google's own parser refuses deeper messages


def descriptor_of(message: Any) -> Descriptor:
    if isinstance(message, Descriptor):
        return message
    desc = getattr(message, "DESCRIPTOR", None)
    if isinstance(desc, Descriptor):
        return desc
    raise ConfigError(
        f"ProtobufDecoder(message): expected a generated message class or a Descriptor, "
        f"got {message!r}"
    )


class ProtobufDecoder(ProtobufDecoderBase):
    """Decode serialized Protobuf messages of one type into a columnar ``kfast.Batch``.

    ``message`` is a generated message class (or instance) or its
    ``google.protobuf.descriptor.Descriptor``. The decode plan is compiled once;
    ``decode(payloads)`` then runs without the GIL except for fields kept as
    raw bytes (recursive messages, maps with message values), which google's
    runtime converts after the pass.

    ``max_depth`` bounds message nesting (1..100; 100 is google's own limit):
    deeper payloads become RowErrors. ``max_columns`` bounds how many columns
    nested messages flatten into; message fields past it are kept as objects.
    """

    descriptor: Descriptor
    max_depth: int

    def __init__(self, message: Any, *, max_depth: int = 100, max_columns: int = 4096) -> None:
        desc = descriptor_of(message)
        if (
            isinstance(max_depth, bool)
            or not isinstance(max_depth, int)
            or not 1 <= max_depth <= MAX_DEPTH_LIMIT
        ):
            raise ConfigError(
                f"ProtobufDecoder max_depth must be an int in [1, {MAX_DEPTH_LIMIT}], "
                f"got {max_depth!r}"
            )
        if isinstance(max_columns, bool) or not isinstance(max_columns, int) or max_columns < 1:
            raise ConfigError(
                f"ProtobufDecoder max_columns must be an int >= 1, got {max_columns!r}"
            )
        self.descriptor = desc
        self.max_depth = max_depth
        self._load(compile_plan(desc, max_depth=max_depth, max_columns=max_columns))

    def __repr__(self) -> str:
        return f"ProtobufDecoder({self.descriptor.full_name})"
