"""Confluent Protobuf framing: message-index paths and decoders per (schema id, path).

After the magic byte and the 4-byte schema id, a Confluent Protobuf payload
carries the path of the message type inside the registered ``.proto`` file:
a zigzag varint count followed by that many zigzag varint indexes (index 0 is
the first top-level message, the next index a nested message of it, ...).
The common case ``[0]`` is written as the single byte ``0``.
"""

from __future__ import annotations

from kfast.errors import DecodeError

MAX_PATH = 128  # more nesting than any real .proto file has


def _zigzag_varint(buf: bytes | bytearray | memoryview, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    n = len(buf)
    while True:
        if pos >= n:
            raise DecodeError("truncated message-index varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            break
        shift += 7
        if shift >= 64:
            raise DecodeError("message-index varint longer than 10 bytes")
    return (result >> 1) ^ -(result & 1), pos


def parse_message_indexes(
    buf: bytes | bytearray | memoryview, offset: int = 0
) -> tuple[tuple[int, ...], int]:
    """Parse a Confluent message-index path at ``buf[offset:]``.

    Returns ``(path, end)`` where ``end`` is the offset of the Protobuf
    message itself. A single ``0`` byte means ``(0,)``. Raises
    ``kfast.DecodeError`` for a truncated or negative count/index.
    """
    count, pos = _zigzag_varint(buf, offset)
    if count == 0:
        return (0,), pos
    if count < 0 or count > MAX_PATH:
        raise DecodeError(f"invalid message-index count {count}")
    path = []
    for _ in range(count):
        index, pos = _zigzag_varint(buf, pos)
        if index < 0:
            raise DecodeError(f"negative message index {index}")
        path.append(index)
    return tuple(path), pos
