"""Protobuf decoding: kfast (columnar and to_pylist) vs google's upb runtime.

A realistic OTLP ``Span`` (16-byte trace id, 8-byte span and parent ids,
name, kind, start/end timestamps, 4 attributes of mixed value types, status),
100k payloads, all peers measured in one run:

* ``upb_parse_read``: ``Span.FromString`` + reading every field of the message
  (attributes, their ``AnyValue`` oneof, status) into locals - the cheapest
  way google's runtime gives a consumer every value;
* ``upb_message_to_dict``: ``FromString`` + ``json_format.MessageToDict``;
* ``kfast_columnar``: ``ProtobufDecoder.decode`` into a recycled Batch (every
  value in typed columns, ready for a sink);
* ``kfast_confluent_framed``: the same spans behind Confluent framing;
* ``kfast_to_pylist``: the same plus ``Batch.to_pylist()``.

    PYTHONPATH=. .venv/bin/python -m pytest benchmarks/bench_protobuf.py --benchmark-only -s
    PYTHONPATH=. .venv/bin/python benchmarks/bench_protobuf.py      # same, prints a JSON report

Each test stores messages/s in ``extra_info``; ``test_zz_ratios`` prints
kfast's ratio to every peer, from the median rounds and from the fastest
rounds, and the headline ratio from ``test_interleaved_ratio``: kfast columnar
and upb parse+read run back to back five times, the median of the five
per-pair ratios (robust to load that changes during the run on a shared
machine).
"""

from __future__ import annotations

import json
import platform
import random
import statistics
import sys
import time
from typing import Any

import google.protobuf
import pytest
from google.protobuf import json_format
from google.protobuf.internal import api_implementation
from opentelemetry.proto.trace.v1 import trace_pb2

from kfast.protobuf import ProtobufDecoder

N = 100_000
RESULTS: dict[str, float] = {}  # name -> messages/s (median round)
BEST: dict[str, float] = {}  # name -> messages/s (fastest round: least disturbed by other load)


def make_payloads(n: int = N, seed: int = 11) -> list[bytes]:
    rnd = random.Random(seed)
    out = []
    routes = ["/orders", "/orders/{id}", "/checkout", "/health", "/users/{id}/cart"]
    for i in range(n):
        start = 1_700_000_000_000_000_000 + i * 1_000_003
        span = trace_pb2.Span(
            trace_id=rnd.randbytes(16),
            span_id=rnd.randbytes(8),
            parent_span_id=rnd.randbytes(8) if rnd.random() < 0.8 else b"",
            name=f"HTTP GET {rnd.choice(routes)}",
            kind=rnd.choice([trace_pb2.Span.SPAN_KIND_SERVER, trace_pb2.Span.SPAN_KIND_CLIENT]),
            start_time_unix_nano=start,
            end_time_unix_nano=start + rnd.randrange(50_000, 900_000_000),
        )
        a = span.attributes.add(key="http.method")
        a.value.string_value = "GET"
        a = span.attributes.add(key="http.status_code")
        a.value.int_value = rnd.choice([200, 200, 200, 404, 500])
        a = span.attributes.add(key="net.peer.name")
        a.value.string_value = f"svc-{rnd.randrange(40)}.internal"
        a = span.attributes.add(key="retry")
        a.value.bool_value = rnd.random() < 0.1
        if rnd.random() < 0.1:
            span.status.code = trace_pb2.Status.STATUS_CODE_ERROR
            span.status.message = "upstream timeout"
        else:
            span.status.code = trace_pb2.Status.STATUS_CODE_OK
        out.append(span.SerializeToString())
    return out


@pytest.fixture(scope="module")
def payloads() -> list[bytes]:
    return make_payloads()


def _record(benchmark: Any, name: str) -> None:
    median = benchmark.stats.stats.median
    RESULTS[name] = N / median
    BEST[name] = N / benchmark.stats.stats.min
    benchmark.extra_info["messages_per_s"] = round(N / median)
    benchmark.extra_info["messages_per_s_best"] = round(BEST[name])
    benchmark.extra_info["payloads"] = N


def test_kfast_columnar(benchmark: Any, payloads: list[bytes]) -> None:
    dec = ProtobufDecoder(trace_pb2.Span)
    batch = dec.decode(payloads)  # warm: buffers sized, then recycled
    result = benchmark.pedantic(
        dec.decode, args=(payloads,), kwargs={"out": batch}, rounds=7, iterations=1
    )
    assert result.num_rows == N and not result.errors
    _record(benchmark, "kfast_columnar")


def test_kfast_confluent_framed(benchmark: Any, payloads: list[bytes]) -> None:
    """The same spans behind Confluent framing (magic byte, schema id, path)."""
    from kfast.confluent import ConfluentProtobufDecoder, message_path

    path = message_path(trace_pb2.Span.DESCRIPTOR)
    head = b"\x00" + (42).to_bytes(4, "big") + bytes([len(path) * 2, *(i * 2 for i in path)])
    framed = [head + p for p in payloads]
    dec = ConfluentProtobufDecoder(protobuf_classes={42: trace_pb2.Span})
    batch = dec.decode(framed)
    result = benchmark.pedantic(dec.decode, args=(framed,), kwargs={"out": batch}, rounds=5)
    assert result.num_rows == N and not result.errors
    _record(benchmark, "kfast_confluent_framed")


def test_kfast_to_pylist(benchmark: Any, payloads: list[bytes]) -> None:
    dec = ProtobufDecoder(trace_pb2.Span)
    batch = dec.decode(payloads)

    def run() -> list[dict[str, Any]]:
        return dec.decode(payloads, out=batch).to_pylist()

    rows = benchmark.pedantic(run, rounds=3, iterations=1)
    assert len(rows) == N
    _record(benchmark, "kfast_to_pylist")


def _read_any(v: Any) -> Any:
    which = v.WhichOneof("value")
    return getattr(v, which) if which else None


def upb_parse_read(payloads: list[bytes]) -> int:
    """google's runtime: parse each span and read every field into locals."""
    parse = trace_pb2.Span.FromString
    n = 0
    for p in payloads:
        s = parse(p)
        _ = (s.trace_id, s.span_id, s.parent_span_id, s.trace_state, s.flags, s.name, s.kind)
        _ = (s.start_time_unix_nano, s.end_time_unix_nano, s.dropped_attributes_count)
        for a in s.attributes:
            _ = (a.key, _read_any(a.value))
        for e in s.events:
            _ = (e.time_unix_nano, e.name, len(e.attributes))
        for link in s.links:
            _ = (link.trace_id, link.span_id)
        _ = (s.dropped_events_count, s.dropped_links_count)
        st = s.status
        _ = (st.code, st.message)
        n += 1
    return n


def test_upb_parse_read(benchmark: Any, payloads: list[bytes]) -> None:
    assert benchmark.pedantic(upb_parse_read, args=(payloads,), rounds=3, iterations=1) == N
    _record(benchmark, "upb_parse_read")


def test_upb_message_to_dict(benchmark: Any, payloads: list[bytes]) -> None:
    parse = trace_pb2.Span.FromString
    to_dict = json_format.MessageToDict

    def run() -> list[Any]:
        return [to_dict(parse(p)) for p in payloads]

    rows = benchmark.pedantic(run, rounds=2, iterations=1)
    assert len(rows) == N
    _record(benchmark, "upb_message_to_dict")


INTERLEAVED: list[float] = []  # kfast columnar / upb parse+read, per back-to-back pair


def test_interleaved_ratio(benchmark: Any, payloads: list[bytes]) -> None:
    """kfast and upb measured back to back, 5 times: the ratio of each pair is
    immune to load that changes between the tests above (shared machine)."""
    dec = ProtobufDecoder(trace_pb2.Span)
    batch = dec.decode(payloads)

    def pairs() -> None:
        for _ in range(5):
            t0 = time.perf_counter()
            dec.decode(payloads, out=batch)
            t1 = time.perf_counter()
            upb_parse_read(payloads)
            t2 = time.perf_counter()
            INTERLEAVED.append((t2 - t1) / (t1 - t0))

    benchmark.pedantic(pairs, rounds=1, iterations=1)
    benchmark.extra_info["ratios"] = [round(r, 1) for r in INTERLEAVED]


def report() -> dict[str, Any]:
    out: dict[str, Any] = {
        "payloads": N,
        "message": "opentelemetry.proto.trace.v1.Span",
        "payload_bytes_avg": None,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "processor": platform.processor() or platform.platform(),
        "protobuf": f"{google.protobuf.__version__} ({api_implementation.Type()})",
        "messages_per_s": {k: round(v) for k, v in RESULTS.items()},
        "messages_per_s_best_round": {k: round(v) for k, v in BEST.items()},
    }
    if INTERLEAVED:
        out["ratio_vs_upb_parse_read_interleaved"] = {
            "median": round(statistics.median(INTERLEAVED), 1),
            "min": round(min(INTERLEAVED), 1),
            "max": round(max(INTERLEAVED), 1),
        }
    for peer in ("upb_parse_read", "upb_message_to_dict"):
        for label, table in (("median", RESULTS), ("best_round", BEST)):
            if table.get(peer):
                out[f"ratio_vs_{peer}_{label}"] = {
                    k: round(v / table[peer], 1) for k, v in table.items() if k.startswith("kfast")
                }
    return out


def test_zz_ratios(benchmark: Any, payloads: list[bytes]) -> None:
    """Runs last: prints kfast's ratios to the peers measured above."""
    rep = report()
    rep["payload_bytes_avg"] = round(sum(map(len, payloads)) / len(payloads), 1)
    benchmark.extra_info.update(rep)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print("\n" + json.dumps(rep, indent=2))


if __name__ == "__main__":
    raise SystemExit(
        pytest.main([__file__, "--benchmark-only", "-s", "-q", "-p", "no:cacheprovider"])
    )
