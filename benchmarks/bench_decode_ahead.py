"""Decode-ahead: one vs two batches in flight, into a sink that waits but uses no local CPU.

A sink on another machine (PostgreSQL over the network, an HTTP endpoint) costs the client
wall time, not CPU. With one batch in flight the pipeline decodes batch N+1 only after
``write(batch N)`` returned; with two (``MemoryPlan.batches_in_flight``, the default from
256 MiB up) it decodes it meanwhile, so a batch costs max(decode, write) instead of their sum.

Both variants consume the same topic (order records of ``kfast.testing.orders``) in
alternating rounds, each with a fresh consumer group; the rate is counted from the first
delivered batch to the last, so group join is left out. ``--delay`` is the sink's time per
batch of ``--batch`` rows (default 20 ms per 10,000 rows: a COPY to a server that absorbs
500k rows/s).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_decode_ahead.py --rows 1000000 --rounds 4
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import threading
import time
from typing import Any

import kfast
import kfast.runtime.pipeline as pipeline_module
from kfast.testing.orders import ORDER_SCHEMA, encode_orders


class RemoteLikeSink:
    """Waits ``delay`` seconds per batch without using the CPU."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def write(self, batch: Any) -> None:
        if self.delay > 0:
            time.sleep(self.delay)


def run(bootstrap: str, topic: str, n: int, in_flight: int, delay: float, batch: int) -> float:
    """Rows/s from the first delivered batch to the last, with ``in_flight`` batches."""
    plan_memory = pipeline_module.plan_memory

    def forced(*args: Any, **kwargs: Any) -> Any:
        return dataclasses.replace(plan_memory(*args, **kwargs), batches_in_flight=in_flight)

    pipeline_module.plan_memory = forced  # type: ignore[assignment]
    try:
        pipe = kfast.Pipeline(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"bench-ahead-{time.time_ns()}",
                "auto.offset.reset": "earliest",
            },
            [topic],
            kfast.AvroDecoder(ORDER_SCHEMA),
            RemoteLikeSink(delay),
            batch=kfast.BatchPolicy(max_rows=batch, max_wait=0.05),
            install_signal_handlers=False,
        )
    finally:
        pipeline_module.plan_memory = plan_memory
    assert pipe.memory_plan().batches_in_flight == in_flight
    thread = threading.Thread(target=pipe.run, daemon=True)
    thread.start()
    first: tuple[float, int] | None = None
    while True:
        written = pipe.metrics()["written"]
        if written and first is None:
            first = (time.perf_counter(), written)
        if written >= n:
            break
        time.sleep(0.005)
    end = time.perf_counter()
    pipe.stop()
    thread.join(60)
    assert first is not None
    return (n - first[1]) / (end - first[0])


def bench(
    bootstrap: str, create_topic: Any, produce: Any, n: int, rounds: int, delay: float, batch: int
) -> dict[str, Any]:
    topic = f"bench-ahead-{time.time_ns()}"
    create_topic(topic, partitions=8)
    payloads = encode_orders(n)
    for i in range(0, n, 100_000):
        produce(topic, payloads[i : i + 100_000])
    del payloads
    rates: dict[int, list[float]] = {1: [], 2: []}
    for r in range(rounds):
        for k in (1, 2) if r % 2 == 0 else (2, 1):
            rates[k].append(run(bootstrap, topic, n, k, delay, batch))
        print(
            f"  round {r + 1}: one in flight {rates[1][-1]:,.0f} rows/s, "
            f"two {rates[2][-1]:,.0f} rows/s",
            flush=True,
        )
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "rows": n,
        "batch_rows": batch,
        "sink_delay_s": delay,
        "bound_rows_per_s": batch / delay if delay > 0 else float("inf"),
        "rows_per_s": {"one_in_flight": rates[1], "two_in_flight": rates[2]},
        "median": {"one_in_flight": med[1], "two_in_flight": med[2]},
        "ratio": med[2] / med[1],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--delay", type=float, default=0.02, help="sink seconds per batch")
    ap.add_argument("--batch", type=int, default=10_000, help="rows per batch")
    ns = ap.parse_args(argv)
    from kfast.testing import KafkaBroker

    with KafkaBroker() as kb:
        res = bench(
            kb.bootstrap, kb.create_topic, kb.produce, ns.rows, ns.rounds, ns.delay, ns.batch
        )
    med = res["median"]
    print(
        f"median of {ns.rounds}: one in flight {med['one_in_flight']:,.0f} rows/s, two "
        f"{med['two_in_flight']:,.0f} rows/s ({res['ratio']:.2f}x); the sink alone allows "
        f"{res['bound_rows_per_s']:,.0f} rows/s"
    )
    return 0


def test_bench_decode_ahead(kafka_broker: Any, benchmark: Any) -> None:
    res = benchmark.pedantic(
        bench,
        args=(kafka_broker.bootstrap, kafka_broker.create_topic, kafka_broker.produce),
        kwargs={"n": 200_000, "rounds": 2, "delay": 0.02, "batch": 10_000},
        rounds=1,
        iterations=1,
    )
    benchmark.extra_info.update(res)


if __name__ == "__main__":
    sys.exit(main())
