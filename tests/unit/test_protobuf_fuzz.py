"""Mutation fuzzing: corrupted payloads never crash kfast and never decode to
something google rejects (run the same under AddressSanitizer: docs/protobuf.md)."""

from __future__ import annotations

import os
import random

import pytest
from _protobuf_support import EXAMPLES, check_decoded, compiled, payloads, varint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.trace.v1 import trace_pb2

from kfast.protobuf import ProtobufDecoder

pb3 = compiled("kfpb3")
pb2 = compiled("kfpb2")
pbed = compiled("kfpbed")
TYPES = [pb3.Everything, pb3.Maps, pb3.Repeateds, pb2.P2, pbed.Ed, trace_pb2.TracesData]
ROUNDS = int(os.environ.get("KFAST_PB_FUZZ_ROUNDS", "300"))


def mutate(rng: random.Random, blob: bytes) -> bytes:
    b = bytearray(blob)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(pos, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        elif op == 2:
            del b[pos : pos + rng.randint(1, 8)]
        elif op == 3:
            del b[pos:]
        elif op == 4 and b:
            b[min(pos, len(b) - 1)] = rng.choice([0x00, 0x7F, 0x80, 0xFF, 0x0C, 0x0B, 0x0E])
        elif op == 5:
            # a length prefix / tag with an interesting varint
            b[pos:pos] = varint(rng.choice([0, 1, 2**31 - 1, 2**31, 2**32, 2**63, 2**64 - 1]))
        else:
            chunk = b[pos : pos + rng.randint(1, 16)]
            b[pos:pos] = chunk
    return bytes(b)


@pytest.mark.parametrize("max_columns", [4096, 3], ids=["columns", "objects"])
@pytest.mark.parametrize("cls", TYPES, ids=lambda c: c.DESCRIPTOR.full_name)
def test_mutation_fuzz(cls, max_columns: int) -> None:
    # max_columns=3 turns every message field into an OBJECT column (raw-bytes path)
    dec = ProtobufDecoder(cls, max_columns=max_columns)

    @settings(
        max_examples=max(10, EXAMPLES // 2),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(payloads(cls.DESCRIPTOR, max_depth=4), st.integers(0, 2**32))
    def run(blob: bytes, seed: int) -> None:
        rng = random.Random(seed)
        check_decoded(cls, dec, [blob] + [mutate(rng, blob) for _ in range(ROUNDS // 10)])

    run()


def test_random_bytes_never_crash() -> None:
    rng = random.Random(1234)
    for cls in TYPES:
        dec = ProtobufDecoder(cls)
        blobs = [
            bytes(rng.randrange(256) for _ in range(rng.randint(0, 40))) for _ in range(ROUNDS)
        ]
        check_decoded(cls, dec, blobs)


def test_depth_bombs() -> None:
    # deeply nested unknown groups and length-delimited messages: no stack blow-up
    dec = ProtobufDecoder(pb3.Tree)
    groups = b"\xfb\x07" * 5000 + b"\xfc\x07" * 5000
    nested = b""
    for _ in range(3000):
        nested = b"\x12" + varint(len(nested)) + nested  # Tree.children
    batch = dec.decode([groups, nested, b"\x08\x01"])
    assert [e.index for e in batch.errors] == [0, 1] and batch.num_rows == 1
