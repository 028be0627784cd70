"""Reference encodings of the primitives kfast's wire decoders share (test oracle)."""

from __future__ import annotations


def uvarint(value: int) -> bytes:
    """Unsigned base-128 little-endian varint (Avro, Protobuf)."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def zigzag(value: int) -> bytes:
    """Zigzag-encoded 64-bit varint (Avro long/int, Protobuf sint64)."""
    return uvarint(((value << 1) ^ (value >> 63)) & 0xFFFFFFFFFFFFFFFF)
