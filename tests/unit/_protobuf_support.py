"""Shared helpers for tests/unit/test_protobuf_*.py.

The test .proto files in ``protobuf_protos/`` are compiled once per session
with grpcio-tools' protoc into a temporary directory that is put on sys.path.
``expected(msg)`` is the documented ``to_pylist`` form written independently
of kfast's own converter; ``messages(desc)`` is a hypothesis strategy that
builds random google messages of any descriptor.

Example counts: ``KFAST_PB_EXAMPLES`` (default 60 per property) - set it to
e.g. 5000 for a long run (docs/protobuf.md).
"""

from __future__ import annotations

import atexit
import importlib
import math
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

from google.protobuf.descriptor import FieldDescriptor as FD
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("KFAST_PB_EXAMPLES", "60"))
PROTO_DIR = Path(__file__).parent / "protobuf_protos"
_COMPILED: dict[str, Any] = {}


def compiled(name: str) -> Any:
    """Import the ``<name>_pb2`` module of ``protobuf_protos/<name>.proto``."""
    if not _COMPILED:
        from grpc_tools import protoc

        out = tempfile.mkdtemp(prefix="kfast-pb-")
        atexit.register(shutil.rmtree, out, True)
        protos = sorted(str(p.name) for p in PROTO_DIR.glob("*.proto"))
        include = str(Path(protoc.__file__).parent / "_proto")
        rc = protoc.main(
            ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out}", *protos]
        )
        assert rc == 0, f"protoc failed ({rc})"
        sys.path.insert(0, out)
        for p in protos:
            mod = p[: -len(".proto")]
            _COMPILED[mod] = importlib.import_module(f"{mod}_pb2")
    return _COMPILED[name]


# ------------------------------------------------------------ expected form


def _is_map(fd: Any) -> bool:
    return fd.type == FD.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry


def _scalar(fd: Any, v: Any) -> Any:
    if fd.type in (FD.TYPE_MESSAGE, FD.TYPE_GROUP):
        return expected(v)
    if fd.type == FD.TYPE_ENUM:
        ev = fd.enum_type.values_by_number.get(v)
        return ev.name if ev is not None else v
    return v


def expected(msg: Any) -> dict[str, Any]:
    """The documented ``to_pylist`` form of a google message."""
    out: dict[str, Any] = {}
    for fd in msg.DESCRIPTOR.fields:
        v = getattr(msg, fd.name)
        if _is_map(fd):
            vfd = fd.message_type.fields_by_number[2]
            out[fd.name] = {k: _scalar(vfd, x) for k, x in v.items()}
        elif fd.is_repeated:
            out[fd.name] = [_scalar(fd, x) for x in v]
        elif fd.has_presence and not msg.HasField(fd.name):
            out[fd.name] = None
        else:
            out[fd.name] = _scalar(fd, v)
    return out


def normalize(v: Any) -> Any:
    """Make NaN comparable (NaN != NaN) and keep -0.0 distinct from 0.0."""
    if isinstance(v, float):
        return ("float", struct.pack("<d", v)) if not math.isnan(v) else ("nan",)
    if isinstance(v, dict):
        return {k: normalize(x) for k, x in v.items()}
    if isinstance(v, list):
        return [normalize(x) for x in v]
    return v


# ------------------------------------------------------------ random messages

_INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}
_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)


def _int_strategy(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = [lo, hi, 0, -1, 1, 127, 128, 2**31 - 1, -(2**31), 2**32 - 1, 2**63 - 1]
    return st.one_of(st.integers(lo, hi), st.sampled_from([e for e in edges if lo <= e <= hi]))


def scalar_strategy(fd: Any) -> st.SearchStrategy[Any]:
    t = fd.type
    if t in _INT_RANGES:
        return _int_strategy(*_INT_RANGES[t])
    if t == FD.TYPE_DOUBLE:
        return st.floats()
    if t == FD.TYPE_FLOAT:
        return st.floats(width=32)
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t == FD.TYPE_STRING:
        return _TEXT
    if t == FD.TYPE_BYTES:
        return st.binary(max_size=12)
    if t == FD.TYPE_ENUM:
        known = st.sampled_from([v.number for v in fd.enum_type.values])
        if fd.enum_type.is_closed:
            return known
        return st.one_of(known, st.integers(-(2**31), 2**31 - 1))
    raise AssertionError(t)


@st.composite
def messages(draw: Any, desc: Any, depth: int = 0, max_depth: int = 3) -> Any:
    from google.protobuf import message_factory

    msg = message_factory.GetMessageClass(desc)()
    for fd in desc.fields:
        if not draw(st.booleans()):
            continue
        name = fd.name
        is_msg = fd.type in (FD.TYPE_MESSAGE, FD.TYPE_GROUP)
        if _is_map(fd):
            kfd, vfd = fd.message_type.fields_by_number[1], fd.message_type.fields_by_number[2]
            keys = draw(st.lists(scalar_strategy(kfd), max_size=3))
            target = getattr(msg, name)
            for k in keys:
                if vfd.type == FD.TYPE_MESSAGE:
                    if depth < max_depth:
                        target[k].CopyFrom(draw(messages(vfd.message_type, depth + 1, max_depth)))
                else:
                    target[k] = draw(scalar_strategy(vfd))
        elif fd.is_repeated:
            if is_msg:
                if depth < max_depth:
                    for sub in draw(
                        st.lists(messages(fd.message_type, depth + 1, max_depth), max_size=2)
                    ):
                        getattr(msg, name).add().CopyFrom(sub)
            else:
                getattr(msg, name).extend(draw(st.lists(scalar_strategy(fd), max_size=4)))
        elif is_msg:
            if depth < max_depth:
                getattr(msg, name).CopyFrom(draw(messages(fd.message_type, depth + 1, max_depth)))
        else:
            setattr(msg, name, draw(scalar_strategy(fd)))
    return msg


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


@st.composite
def unknown_fields(draw: Any, used: set[int]) -> bytes:
    """A few fields with numbers the message does not declare (every wire type)."""
    out = b""
    for _ in range(draw(st.integers(0, 3))):
        num = draw(st.integers(1, 2000).filter(lambda n: n not in used and not 19000 <= n <= 19999))
        wt = draw(st.sampled_from([0, 1, 2, 3, 5]))
        tag = varint(num << 3 | wt)
        if wt == 0:
            out += tag + varint(draw(st.integers(0, 2**64 - 1)))
        elif wt == 1:
            out += tag + draw(st.binary(min_size=8, max_size=8))
        elif wt == 5:
            out += tag + draw(st.binary(min_size=4, max_size=4))
        elif wt == 2:
            data = draw(st.binary(max_size=8))
            out += tag + varint(len(data)) + data
        else:
            inner = varint(1 << 3) + varint(draw(st.integers(0, 1000)))
            out += tag + inner + varint(num << 3 | 4)
    return out


@st.composite
def payloads(draw: Any, desc: Any, max_depth: int = 3) -> bytes:
    """Serialized messages, sometimes several concatenated (merge / last wins),
    sometimes with unknown fields mixed in."""
    used = {fd.number for fd in desc.fields}
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        parts.append(draw(messages(desc, 0, max_depth)).SerializePartialToString())
        if draw(st.booleans()):
            parts.append(draw(unknown_fields(used)))
    return b"".join(parts)


def parse_google(cls: Any, payload: bytes) -> Any | None:
    try:
        return cls.FromString(payload)
    except Exception:
        return None


_LENIENT: dict[str, bool] = {}


def lenient_utf8(desc: Any) -> bool:
    """Does some string field reachable from ``desc`` skip google's UTF-8 check
    (proto2, or editions with ``utf8_validation = NONE``)?"""
    from google.protobuf import descriptor_pb2

    if desc.full_name in _LENIENT:
        return _LENIENT[desc.full_name]
    _LENIENT[desc.full_name] = False
    result = False
    for fd in desc.fields:
        if fd.type == FD.TYPE_STRING:
            if fd._GetFeatures().utf8_validation == descriptor_pb2.FeatureSet.NONE:
                result = True
        elif fd.type in (FD.TYPE_MESSAGE, FD.TYPE_GROUP) and lenient_utf8(fd.message_type):
            result = True
    _LENIENT[desc.full_name] = result
    return result


def check_decoded(cls: Any, dec: Any, blobs: list[bytes]) -> None:
    """Decode ``blobs`` in one batch and compare each payload with google:
    google rejects -> RowError; google accepts -> the same value, or a RowError
    for one of the documented stricter rules (docs/protobuf.md)."""
    batch = dec.decode(blobs)
    rows = batch.to_pylist()
    errors = {e.index: e.reason for e in batch.errors}
    good = list(batch.source_indices)
    assert len(good) == len(rows) == batch.num_rows
    assert sorted(good + list(errors)) == list(range(len(blobs)))
    by_index = dict(zip(good, rows))
    allowed: tuple[str, ...] = ("wrong wire type",)
    if lenient_utf8(cls.DESCRIPTOR):
        allowed += ("invalid UTF-8",)
    for i, blob in enumerate(blobs):
        ref = parse_google(cls, blob)
        if ref is None:
            assert i in errors, f"google rejects payload {i} ({blob.hex()}) but kfast decoded it"
            continue
        if i in errors:
            assert errors[i].startswith(allowed), (errors[i], blob.hex())
            continue
        assert normalize(by_index[i]) == normalize(expected(ref)), blob.hex()
