"""The compiled Confluent Protobuf path (``FramedProtobufDecoder.decode_spans``).

``ConfluentProtobufDecoder`` reads the ring's spans in place, so the rows and
RowErrors of ``decode(payloads)``, of ``Ring.decode`` and of
``ConfluentDecoder``'s hand-over must all equal a reference built from the
plain ``ProtobufDecoder`` (the message bytes) and the resolver's reasons (the
framing). Random messages and their mutations come from the fuzz helpers.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from _protobuf_support import EXAMPLES, compiled, expected, normalize, payloads
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.trace.v1 import trace_pb2
from test_protobuf_fuzz import mutate

import kfast
from kfast._batch import BaseDecoder
from kfast.confluent import ConfluentProtobufDecoder, message_path
from kfast.confluent.registry import SchemaStore
from kfast.protobuf import ProtobufDecoder
from kfast.protobuf._decoder import FramedProtobufDecoder
from kfast.runtime.ring import Ring

pb3 = compiled("kfpb3")
pb2 = compiled("kfpb2")
TYPES = [pb3.Everything, pb3.Maps, pb2.P2, trace_pb2.TracesData]
BAD_FRAME = "not Confluent Protobuf framing (magic byte 0, 4-byte schema id, message indexes)"


def encoded_path(path: tuple[int, ...]) -> bytes:
    if path == (0,):
        return b"\x00"
    return bytes([len(path) * 2, *(i * 2 for i in path)])


def frame(schema_id: int, path: bytes, body: bytes) -> bytes:
    return b"\x00" + schema_id.to_bytes(4, "big") + path + body


def ring_decode(decoder: Any, values: list[bytes]) -> kfast.Batch:
    from confluent_kafka import Message

    ring = Ring(len(values) + 1, 1 << 22)
    ring.assign("t", 0)
    ring.push(
        [
            Message(topic="t", partition=0, offset=i, key=None, value=v, timestamp=(1, 0))
            for i, v in enumerate(values)
        ]
    )
    out = kfast.Batch()
    ring.decode(decoder, 0, len(values), out)
    return out


def reference(
    cls: Any, values: list[bytes], heads: list[tuple[str, int]], resolver: Any
) -> dict[str, Any]:
    """What every path must give: the plain decoder's rows and reasons for
    good frames, the resolver's reason (its Python hook, asked here) for the rest."""
    plain = ProtobufDecoder(cls)
    rows: dict[int, Any] = {}
    errors: dict[int, str] = {}
    good = [i for i, (kind, _) in enumerate(heads) if kind == "good"]
    bodies = [values[i][heads[i][1] :] for i in good]
    batch = plain.decode(bodies)
    for j, row in zip(batch.source_indices, batch.to_pylist()):
        rows[good[j]] = row
    for e in batch.errors:
        errors[good[e.index]] = e.reason
    for i, (kind, path_end) in enumerate(heads):
        if kind == "bad_frame":
            errors[i] = BAD_FRAME
        elif kind == "unresolved":
            v = values[i]
            got, reason = resolver._resolve(int.from_bytes(v[1:5], "big"), v[5:path_end])
            assert got is None and reason
            errors[i] = reason
    order = sorted(rows)
    return {
        "source": order,
        "rows": normalize([rows[i] for i in order]),
        "errors": sorted(errors.items()),
    }


def result(batch: kfast.Batch) -> dict[str, Any]:
    return {
        "source": list(batch.source_indices),
        "rows": normalize(batch.to_pylist()),
        "errors": [(e.index, e.reason) for e in batch.errors],
    }


@pytest.mark.parametrize("cls", TYPES, ids=lambda c: c.DESCRIPTOR.full_name)
def test_every_path_equals_the_plain_decoder(cls: Any) -> None:
    path = encoded_path(message_path(cls.DESCRIPTOR))
    other_path = encoded_path((9, 1))  # not in the file

    @settings(
        max_examples=max(10, EXAMPLES // 3),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(payloads(cls.DESCRIPTOR, max_depth=3), st.integers(0, 2**32))
    def run(blob: bytes, seed: int) -> None:
        rng = random.Random(seed)
        values: list[bytes] = []
        heads: list[tuple[str, int]] = []
        for k in range(40):
            body = blob if k % 3 == 0 else mutate(rng, blob)
            choice = rng.randrange(10)
            if choice == 0:
                v = frame(9, path, body)  # unknown id
                heads.append(("unresolved", 5 + len(path)))
            elif choice == 1:
                v = frame(7, other_path, body)
                heads.append(("unresolved", 5 + len(other_path)))
            elif choice == 2:
                v = bytes([rng.choice([1, 0x7F])]) + frame(7, path, body)[1:]
                heads.append(("bad_frame", 0))
            elif choice == 3:
                v = frame(7, path, body)[: rng.randrange(6)]  # cut inside the header
                heads.append(("bad_frame", 0))
            elif choice == 4:
                v = frame(8, b"\x03", body)  # negative index count
                heads.append(("bad_frame", 0))
            else:
                v = frame(rng.choice([7, 8]), path, body)  # two ids, one message type
                heads.append(("good", 5 + len(path)))
            values.append(v)

        def make() -> ConfluentProtobufDecoder:
            return ConfluentProtobufDecoder(protobuf_classes={7: cls, 8: cls})

        def confluent() -> kfast.ConfluentDecoder:
            # unknown ids are confirmed without the production pause between asks
            store = SchemaStore(_NoRegistry(), not_found_wait=0.0)
            return kfast.ConfluentDecoder(store, protobuf_classes={7: cls, 8: cls})

        want = reference(cls, values, heads, make())
        assert result(make().decode(values)) == want
        assert result(ring_decode(make(), values)) == want
        # ConfluentDecoder hands the batch over when the first 5-byte header's id
        # is PROTOBUF (7 or 8 here; 9 makes it an Avro batch)
        first = next((v for v in values if len(v) >= 5 and v[0] == 0), None)
        if first is not None and int.from_bytes(first[1:5], "big") in (7, 8):
            want = reference(cls, values, heads, confluent()._protobuf_decoder())
            assert result(confluent().decode(values)) == want
            assert result(ring_decode(confluent(), values)) == want

    run()


class _NoRegistry:
    def get_schema(self, schema_id: int) -> Any:
        raise LookupError(f"registry asked for {schema_id}")


def test_is_a_compiled_decoder() -> None:
    dec = ConfluentProtobufDecoder(protobuf_classes={7: pb3.Tree})
    assert isinstance(dec, BaseDecoder) and isinstance(dec, FramedProtobufDecoder)
    # so ConfluentDecoder's ring hand-over gives it the spans (no bytes copies)
    handed = kfast.ConfluentDecoder(_NoRegistry(), protobuf_classes={7: pb3.Tree})
    assert isinstance(handed._protobuf_decoder(), FramedProtobufDecoder)
    t = pb3.Tree(value=4).SerializeToString()
    path = encoded_path(message_path(pb3.Tree.DESCRIPTOR))
    assert ring_decode(dec, [frame(7, path, t)]).to_pylist() == [expected(pb3.Tree(value=4))]


def test_resolve_is_asked_once_per_key_and_batch() -> None:
    calls: list[tuple[int, bytes]] = []

    class Counting(ConfluentProtobufDecoder):
        def _resolve(self, schema_id: int, path_bytes: bytes) -> tuple[Any, str | None]:
            calls.append((schema_id, path_bytes))
            return super()._resolve(schema_id, path_bytes)

    dec = Counting(protobuf_classes={1: pb3.Tree, 2: pb3.Tree})
    path = encoded_path(message_path(pb3.Tree.DESCRIPTOR))
    t = pb3.Tree(value=1).SerializeToString()
    values = [frame(1 + k % 2, path, t) for k in range(50)]  # 1, 2, 1, 2, ...
    values += [frame(1, b"\x02\x00", t), frame(3, path, t), frame(1, b"\x02\x00", t)]
    batch = dec.decode(values)
    assert batch.num_rows == 50 and [e.index for e in batch.errors] == [50, 51, 52]
    assert batch.errors[0].reason == batch.errors[2].reason
    assert calls == [(1, path), (2, path), (1, b"\x02\x00"), (3, path)]
    dec.decode(values)  # asked again in the next batch (the registry may have changed)
    assert len(calls) == 8


def test_all_bad_batch_keeps_the_decoders_columns() -> None:
    dec = ConfluentProtobufDecoder(protobuf_classes={7: pb3.Inner})
    first = dec.decode([b"\x01\x02"])  # the columns are the given class's from the start
    good = dec.decode([frame(7, b"\x00", pb3.Inner(a=1).SerializeToString())])
    assert first.column_names == good.column_names != []
    bad = dec.decode([b"\x01\x02", frame(9, b"\x00", b"")])
    assert bad.num_rows == 0 and len(bad.errors) == 2
    assert bad.column_names == good.column_names  # one column layout per decoder
    assert [e.reason for e in bad.errors] == [
        BAD_FRAME,
        "unknown schema id 9 (not in protobuf_classes)",
    ]


def test_hooks_contract() -> None:
    one, two = ProtobufDecoder(pb3.Inner), ProtobufDecoder(pb3.Inner)

    class Bad(FramedProtobufDecoder):
        def __init__(self, answer: Any) -> None:
            self.answer = answer

        def _resolve(self, schema_id: int, path_bytes: bytes) -> Any:
            return self.answer(schema_id)

        def _columns_decoder(self) -> Any:
            return one

    values = [frame(1, b"\x00", b""), frame(2, b"\x00", b"")]
    with pytest.raises(RuntimeError, match="two decoders"):
        Bad(lambda sid: (one if sid == 1 else two, None)).decode(values)
    with pytest.raises(TypeError, match="not a ProtobufDecoder"):
        Bad(lambda sid: ("nope", None)).decode(values)
    with pytest.raises(TypeError, match="neither"):
        Bad(lambda sid: (None, None)).decode(values)
    batch = Bad(lambda sid: (None, f"no {sid}")).decode(values + [b""])
    assert [(e.index, e.reason) for e in batch.errors] == [(0, "no 1"), (1, "no 2"), (2, BAD_FRAME)]
    with pytest.raises(NotImplementedError):
        FramedProtobufDecoder().decode(values)
