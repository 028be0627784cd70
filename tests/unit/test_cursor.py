"""The shared bounds-checked cursor (kfast/_cursor.pxd), through kfast._selftest."""

from __future__ import annotations

import struct

import pytest
from _wire import uvarint
from hypothesis import given
from hypothesis import strategies as st

from kfast import _selftest as cur


def zigzag64(value: int) -> int:
    return ((value << 1) ^ (value >> 63)) & 0xFFFFFFFFFFFFFFFF


@given(st.integers(0, 2**64 - 1), st.binary(max_size=4))
def test_uvarint64_roundtrip_and_consumes_exactly(value: int, tail: bytes) -> None:
    data = uvarint(value) + tail
    assert cur.read_uvarint64(data) == (value, len(uvarint(value)))


@given(st.integers(-(2**63), 2**63 - 1))
def test_zigzag64_matches_reference(value: int) -> None:
    assert cur.read_zigzag64(uvarint(zigzag64(value)))[0] == value


@given(st.integers(-(2**31), 2**31 - 1))
def test_zigzag32_matches_reference(value: int) -> None:
    encoded = uvarint(((value << 1) ^ (value >> 31)) & 0xFFFFFFFF)
    assert cur.read_zigzag32(encoded) == (value, len(encoded))


@given(st.integers(0, 2**64 - 1))
def test_every_strict_prefix_of_a_varint_is_truncated(value: int) -> None:
    data = uvarint(value)
    for cut in range(len(data)):
        with pytest.raises(ValueError, match="truncated"):
            cur.read_uvarint64(data[:cut])


def test_overlong_varints_are_rejected() -> None:
    # 11 bytes, and a 10th byte carrying more than the top bit
    with pytest.raises(ValueError, match="too long"):
        cur.read_uvarint64(b"\xff" * 10 + b"\x01")
    with pytest.raises(ValueError, match="too long"):
        cur.read_uvarint64(b"\xff" * 9 + b"\x02")
    # 32-bit varints: at most 5 bytes, 5th byte at most 4 bits
    with pytest.raises(ValueError, match="too long"):
        cur.read_uvarint32(b"\xff\xff\xff\xff\x10")
    assert cur.read_uvarint32(b"\xff\xff\xff\xff\x0f") == (2**32 - 1, 5)


@given(st.binary(min_size=0, max_size=12))
def test_fixed_width_reads_check_length(data: bytes) -> None:
    for reader, width, fmt in (
        (cur.read_le32, 4, "<I"),
        (cur.read_le64, 8, "<Q"),
        (cur.read_be32, 4, ">I"),
    ):
        if len(data) < width:
            with pytest.raises(ValueError, match="truncated"):
                reader(data)
        else:
            assert reader(data) == (struct.unpack(fmt, data[:width])[0], width)


@given(st.floats(allow_nan=False, width=32), st.floats(allow_nan=False))
def test_floats_little_endian(f32: float, f64: float) -> None:
    assert cur.read_f32(struct.pack("<f", f32))[0] == f32
    assert cur.read_f64(struct.pack("<d", f64))[0] == f64


@given(st.binary(max_size=8), st.integers(-3, 12))
def test_take_never_reads_past_the_end(data: bytes, n: int) -> None:
    if 0 <= n <= len(data):
        assert cur.take(data, n) == data[:n]
    else:
        with pytest.raises(ValueError):
            cur.take(data, n)
