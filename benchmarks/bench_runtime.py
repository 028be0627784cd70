"""Runtime benchmark: kfast.Pipeline (both Kafka sources) vs raw confluent_kafka consume() loops,
and RSS vs backlog.

Throughput (same topic, same broker, one run, peers alternate per round):

* ``raw``: ``Consumer.consume(1000, 0.1)`` in a loop, counting messages
  (librdkafka's default prefetch, no decoding, no commits);
* ``raw_tuned``: ``consume(10000, 0.1)`` with the librdkafka prefetch settings
  kfast's memory plan chooses at 256MiB - the fastest raw loop, the reference;
* ``kfast_confluent`` / ``kfast_compiled``: ``kfast.Pipeline`` with
  ``AvroDecoder`` into ``NullSink`` (copy into the ring, decode every message
  into columns, commit offsets), ``memory_limit=256MiB``, with
  ``source="confluent"`` (confluent-kafka's consume()) and
  ``source="compiled"`` (kfast's librdkafka consumer, no Python object per
  message);
* ``librdkafka_floor``: kfast's compiled consumer with the same settings, consuming and freeing
  every message in C (no copy, no decode, no commit): librdkafka's own cost, the rate and CPU per
  message no librdkafka-based consumer beats on this machine.

Each peer runs in a fresh process with a fresh consumer group; the rate is
messages / (time of the last message - time of the first), so group join is
not counted for either. CPU is measured over the same window: the consuming
thread's (``/proc/self/task/<tid>/stat``: the raw loop's main thread, the
pipeline's poll thread) and the whole process's (``getrusage``: every thread,
librdkafka's included), both as microseconds per message.

Memory: for each backlog size, a fresh process runs the pipeline
(``memory_limit=128MiB``) over a topic holding that backlog and reports its
peak RSS (``ru_maxrss``) and its RSS before ``run()``; the goal is a flat
line: peak RSS does not depend on the backlog.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_runtime.py \
        --messages 2000000 --backlogs 1000000,5000000,10000000
    PYTHONPATH=. .venv/bin/python -m pytest benchmarks/bench_runtime.py --benchmark-only -s

The module run writes benchmarks/results/runtime.json and docs/img/runtime_bench.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = {
    "type": "record",
    "name": "Order",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "customer", "type": "int"},
        {"name": "price", "type": "double"},
        {"name": "sku", "type": "string"},
    ],
}
PARTITIONS = 8


# ---------------------------------------------------------------------- data
def _varint(z: int) -> bytes:
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def payload(i: int) -> bytes:
    """Avro binary of one Order (~25 bytes)."""
    import struct

    sku = b"SKU-%05d" % (i % 50_000)
    return (
        _varint(i << 1)
        + _varint((i % 10_000) << 1)
        + struct.pack("<d", (i % 1000) * 0.25)
        + _varint(len(sku) << 1)
        + sku
    )


def fill_topic(bootstrap: str, topic: str, n: int) -> float:
    """Create ``topic`` and produce ``n`` messages round-robin; returns seconds."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result(30)
    time.sleep(1.0)
    p = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 20,
            "batch.size": 1 << 20,
            "queue.buffering.max.messages": 1_000_000,
            "compression.type": "none",
        }
    )
    t0 = time.monotonic()
    produce = p.produce
    for i in range(n):
        while True:
            try:
                produce(topic, payload(i), partition=i % PARTITIONS)
                break
            except BufferError:
                p.poll(0.01)
        if i & 0xFFFF == 0:
            p.poll(0)
    p.flush(120)
    return time.monotonic() - t0


# ------------------------------------------------------------ child processes
def _thread_cpu(tid: int) -> float:
    """CPU seconds (user + system) of one thread of this process."""
    with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _process_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cpu_fields(n: int, secs: float, thread: float, process: float) -> dict[str, Any]:
    return {
        "messages": n,
        "seconds": secs,
        "rate": n / secs,
        "thread_cpu_s": thread,
        "process_cpu_s": process,
        "thread_us_per_msg": thread / n * 1e6,
        "process_us_per_msg": process / n * 1e6,
    }


def _child_raw(bootstrap: str, topic: str, n: int, tuned: bool) -> dict[str, Any]:
    from confluent_kafka import Consumer

    conf = {
        "bootstrap.servers": bootstrap,
        "group.id": "raw-" + uuid.uuid4().hex,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    }
    batch = 1000
    if tuned:  # the librdkafka settings kfast runs with at memory_limit=256MiB
        conf.update(_kfast_kafka_settings())
        batch = 10_000
    c = Consumer(conf)
    c.subscribe([topic])
    tid = threading.get_native_id()
    got = 0
    t_first = 0.0
    cpu0 = (0.0, 0.0)
    while got < n:
        msgs = c.consume(batch, 0.1)
        if msgs:
            if not t_first:
                t_first = time.perf_counter()
                cpu0 = (_thread_cpu(tid), _process_cpu())
            got += len(msgs)
    t_end = time.perf_counter()
    cpu1 = (_thread_cpu(tid), _process_cpu())
    c.close()
    return _cpu_fields(got, t_end - t_first, cpu1[0] - cpu0[0], cpu1[1] - cpu0[1])


def _child_floor(bootstrap: str, topic: str, n: int) -> dict[str, Any]:
    """librdkafka's own cost: kfast's compiled consumer with the memory plan's settings,
    consuming and freeing every message (no copy, no Python object per message)."""
    from kfast.runtime.kafka.source import CompiledSource

    src = CompiledSource(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "floor-" + uuid.uuid4().hex,
            "auto.offset.reset": "earliest",
        },
        [topic],
        plan_settings=_kfast_kafka_settings(),
        on_assign=lambda parts: None,
        on_revoke=lambda parts: None,
        on_lost=lambda parts: None,
        on_error=lambda err: None,
    )
    src.subscribe()
    tid = threading.get_native_id()
    got = 0
    t_first = 0.0
    cpu0 = (0.0, 0.0)
    while got < n:
        k = src.consumer.consume_discard(10_000, 0.1)
        if k and not t_first:
            t_first = time.perf_counter()
            cpu0 = (_thread_cpu(tid), _process_cpu())
        got += k
    t_end = time.perf_counter()
    cpu1 = (_thread_cpu(tid), _process_cpu())
    src.close()
    return _cpu_fields(got, t_end - t_first, cpu1[0] - cpu0[0], cpu1[1] - cpu0[1])


def _kfast_kafka_settings() -> dict[str, str]:
    import kfast
    from kfast.runtime.memory import plan_memory

    return plan_memory("256MiB", {}, kfast.BatchPolicy(), kfast.BufferPolicy()).kafka_settings()


def _child_kfast(
    bootstrap: str, topic: str, n: int, memory_limit: str, source: str = "compiled"
) -> dict[str, Any]:
    import kfast

    sink = kfast.NullSink()
    pipe = kfast.Pipeline(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "kfast-" + uuid.uuid4().hex,
            "auto.offset.reset": "earliest",
        },
        [topic],
        kfast.AvroDecoder(SCHEMA),
        sink,
        memory_limit=memory_limit,
        install_signal_handlers=False,
        source=source,
    )
    baseline = _rss_bytes()
    box: dict[str, Any] = {}
    peak_rss = [0]

    def poll_tid() -> int:
        for th in threading.enumerate():
            if th.name == "kfast-poll" and th.native_id is not None:
                return th.native_id
        return 0

    def watch() -> None:
        tid = 0
        while True:
            ring = pipe._ring
            if not tid:
                tid = poll_tid()
            if tid and ring is not None and ring.pushed and "first" not in box:
                box["first"] = time.perf_counter()
                box["cpu0"] = (_thread_cpu(tid), _process_cpu())
            if sink.rows >= n:
                box["end"] = time.perf_counter()
                box["cpu1"] = (_thread_cpu(tid), _process_cpu())
                pipe.stop()
                return
            peak_rss[0] = max(peak_rss[0], _rss_bytes())
            time.sleep(0.002)

    t = threading.Thread(target=watch, name="bench-watch", daemon=True)
    t.start()
    pipe.run()
    t.join()
    m = pipe.metrics()
    out = _cpu_fields(
        sink.rows,
        box["end"] - box["first"],
        box["cpu1"][0] - box["cpu0"][0],
        box["cpu1"][1] - box["cpu0"][1],
    )
    out.update(
        {
            "source": source,
            "baseline_rss": baseline,
            "peak_rss_sampled": peak_rss[0],
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "pauses": m["pauses"],
            "batches": m["batches"],
            "batch_rows_p50": m["batch_size"]["p50"],
            "consume_calls": pipe._poll_stats.consume_calls,
            "latency_s": m["latency_s"],
            "memory_limit": pipe.memory_plan().limit,
        }
    )
    return out


def _spawn(kind: str, bootstrap: str, topic: str, n: int, memory_limit: str = "256MiB") -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, bootstrap, topic, str(n), memory_limit],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=3600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ the runs
KINDS = ("raw", "raw_tuned", "kfast_confluent", "kfast_compiled", "librdkafka_floor")


def throughput(bootstrap: str, n: int, rounds: int, kinds: tuple[str, ...] = KINDS) -> dict:
    topic = "bench-rt-" + uuid.uuid4().hex[:8]
    produce_s = fill_topic(bootstrap, topic, n)
    # Untimed passes over the topic: the broker's JIT compiles its fetch path (its compiler
    # threads otherwise take CPU from whichever peer runs first) and the log is in page cache.
    for _ in range(2):
        _spawn("librdkafka_floor", bootstrap, topic, n)
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for r in range(rounds):
        order = list(kinds)
        order = order[r % len(order) :] + order[: r % len(order)]  # no peer always runs first
        for kind in order:
            runs[kind].append(_spawn(kind, bootstrap, topic, n))
            print(f"  round {r}: {kind:16s} {_row(runs[kind][-1])}", flush=True)

    def median(kind: str, key: str) -> float:
        xs = sorted(x[key] for x in runs[kind])
        return xs[len(xs) // 2]

    keys = ("rate", "thread_us_per_msg", "process_us_per_msg")
    med = {k: {key: median(k, key) for key in keys} for k in kinds}
    ref = med["raw_tuned"]["rate"] if "raw_tuned" in med else 0.0
    return {
        "messages": n,
        "partitions": PARTITIONS,
        "payload_bytes": len(payload(n // 2)),
        "produce_s": produce_s,
        "rounds": runs,
        "median": med,
        "median_rate": {k: v["rate"] for k, v in med.items()},
        # against the tuned raw loop (the faster one)
        "ratio": {k: v["rate"] / ref for k, v in med.items()} if ref else {},
    }


def _row(res: dict[str, Any]) -> str:
    return (
        f"{res['rate']:>12,.0f} msg/s  consuming thread {res['thread_us_per_msg']:.3f} us/msg  "
        f"process {res['process_us_per_msg']:.3f} us/msg"
    )


def memory(bootstrap: str, backlogs: list[int], memory_limit: str) -> list[dict[str, Any]]:
    out = []
    for n in backlogs:
        topic = "bench-mem-" + uuid.uuid4().hex[:8]
        fill_topic(bootstrap, topic, n)
        res = _spawn("kfast_compiled", bootstrap, topic, n, memory_limit)
        res["backlog"] = n
        out.append(res)
        print(
            f"backlog {n:>10,}: peak RSS {res['ru_maxrss'] / 2**20:7.1f} MiB "
            f"(baseline {res['baseline_rss'] / 2**20:.1f} MiB, limit {memory_limit}), "
            f"{res['rate']:,.0f} msg/s",
            flush=True,
        )
    return out


def environment() -> dict[str, Any]:
    import confluent_kafka

    from kfast.testing.kafka import KAFKA_VERSION

    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "cpu": _cpu_model(),
        "confluent_kafka": getattr(confluent_kafka, "__version__", str(confluent_kafka.version())),
        "librdkafka": confluent_kafka.libversion()[0],
        "kafka": KAFKA_VERSION,
    }


def _load() -> str:
    """``uptime``'s load averages: the machine may be shared."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    tp = report["throughput"]
    kinds = [k for k in KINDS if k in tp["median"]]
    labels = {
        "raw": "raw consume()\n(defaults)",
        "raw_tuned": "raw consume()\n(tuned)",
        "kfast_confluent": "kfast Pipeline\nsource=\nconfluent",
        "kfast_compiled": "kfast Pipeline\nsource=\ncompiled",
        "librdkafka_floor": "librdkafka\nalone (consume\n+ free in C)",
    }
    colors = {
        "raw": "#999999",
        "raw_tuned": "#bbbbbb",
        "kfast_confluent": "#9ecae1",
        "kfast_compiled": "#2b7bba",
        "librdkafka_floor": "#555555",
    }
    rates = [tp["median"][k]["rate"] / 1e3 for k in kinds]
    a.bar([labels[k] for k in kinds], rates, color=[colors[k] for k in kinds])
    for i, k in enumerate(kinds):
        m = tp["median"][k]
        a.text(
            i,
            rates[i],
            f"{rates[i]:,.0f}k\n{m['thread_us_per_msg']:.2f} / {m['process_us_per_msg']:.2f} us",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    a.set_ylabel("messages / s (thousands)")
    a.set_ylim(top=max(rates) * 1.25)
    a.tick_params(axis="x", labelsize=8)
    a.set_title(
        f"{tp['messages']:,} msgs, {PARTITIONS} partitions, Avro -> NullSink + commits\n"
        "labels: rate; CPU per message, consuming thread / whole process",
        fontsize=9,
    )
    mem = report["memory"]
    if mem:
        xs = [m["backlog"] / 1e6 for m in mem]
        b.plot(xs, [m["ru_maxrss"] / 2**20 for m in mem], "o-", label="peak RSS")
        b.plot(xs, [m["baseline_rss"] / 2**20 for m in mem], "s--", label="RSS before run()")
        lim = mem[0]["memory_limit"] / 2**20
        b.plot(
            xs,
            [m["baseline_rss"] / 2**20 + lim for m in mem],
            ":",
            color="red",
            label="baseline + memory_limit",
        )
        b.set_xlabel("backlog (million messages)")
        b.set_ylabel("MiB")
        b.set_ylim(bottom=0)
        b.set_title(f"peak RSS vs backlog (memory_limit={lim:.0f} MiB)")
        b.legend()
    env = report["environment"]
    fig.suptitle(
        f"{env['cpu']} ({env['cpus']} CPUs), Python {env['python']}, "
        f"librdkafka {env['librdkafka']}, Kafka {env['kafka']}",
        fontsize=8,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--bootstrap", help="use this broker instead of starting one")
    ap.add_argument("--messages", type=int, default=2_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backlogs", default="1000000,5000000,10000000")
    ap.add_argument("--memory-limit", default="128MiB")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/runtime.json"))
    ap.add_argument("--plot", default=str(ROOT / "docs/img/runtime_bench.png"))
    ap.add_argument("--plot-from", help="only draw --plot from this JSON report")
    a = ap.parse_args(argv)
    if a.plot_from:
        plot(json.loads(Path(a.plot_from).read_text()), Path(a.plot))
        return 0
    if a.child:
        kind, bootstrap, topic, n, limit = a.child
        if kind == "librdkafka_floor":
            res = _child_floor(bootstrap, topic, int(n))
        elif kind in ("raw", "raw_tuned"):
            res = _child_raw(bootstrap, topic, int(n), tuned=kind == "raw_tuned")
        else:
            res = _child_kfast(bootstrap, topic, int(n), limit, kind.removeprefix("kfast_"))
        print(json.dumps(res))
        return 0
    from kfast.testing import KafkaBroker

    broker = KafkaBroker(bootstrap=a.bootstrap, heap="1g")
    with broker:
        report: dict[str, Any] = {"environment": environment(), "load_before": _load()}
        report["throughput"] = throughput(broker.bootstrap, a.messages, a.rounds)
        report["load_after"] = _load()
        tp = report["throughput"]
        for k, med in tp["median"].items():
            print(f"median {k:16s} {_row(med)}  x{tp['ratio'][k]:.2f} raw_tuned", flush=True)
        backlogs = [int(x) for x in a.backlogs.split(",") if x]
        report["memory"] = memory(broker.bootstrap, backlogs, a.memory_limit)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2))
    plot(report, Path(a.plot))
    print(json.dumps({"ratio": report["throughput"]["ratio"], "out": a.out, "plot": a.plot}))
    return 0


# ---------------------------------------------------------- pytest-benchmark
def test_runtime_vs_raw(benchmark: Any, kafka_broker: Any) -> None:
    """Shorter version for the benchmark suite: 1M messages, one round each.

    Much smaller topics measure start-up more than throughput: the whole topic
    fits in librdkafka's prefetch queue before the first message is counted,
    and kfast's fixed ``max_wait`` and thread start weigh on a 0.2 s run.
    """
    n = int(os.environ.get("KFAST_BENCH_RUNTIME_MESSAGES", "1000000"))
    result: dict[str, Any] = {}

    def run() -> None:
        result.update(throughput(kafka_broker.bootstrap, n, 1))

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(
        {f"{k}_rate": v for k, v in result["median_rate"].items()}
        | {f"{k}_ratio": v for k, v in result["ratio"].items()}
    )
    print(f"\nratio to raw_tuned: {result['ratio']} ({result['median_rate']})")


if __name__ == "__main__":
    sys.exit(main())
