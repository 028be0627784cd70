"""Runtime proofs that need a separate process: kill -9 and memory under a stalled sink."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from runtime_util import count_lines, produce_ids, read_lines, wait_until

from kfast.runtime.pipeline import SOURCES

pytestmark = pytest.mark.integration

CHILD = str(Path(__file__).with_name("runtime_child.py"))
ROOT = str(Path(__file__).resolve().parents[2])


def _spawn(bootstrap: str, group: str, topic: str, out: str, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen(
        [sys.executable, CHILD, bootstrap, group, topic, out, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _finish(proc: subprocess.Popen[str], timeout: float = 60) -> dict:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{err[-3000:]}"
    for line in out.splitlines():
        if line.startswith("metrics "):
            return json.loads(line[len("metrics ") :])
    raise AssertionError(f"no metrics line in child output:\n{out[-2000:]}\n{err[-2000:]}")


KILLS = int(os.environ.get("KFAST_KILLS", "3"))
KILL_MESSAGES = int(os.environ.get("KFAST_KILL_MESSAGES", "60000"))


@pytest.mark.parametrize("source", SOURCES)
def test_at_least_once_under_kill_9(kafka_broker, unique_topic, unique_group, tmp_path, source):
    """Kill the consumer process at random moments; every message still arrives,
    and a clean final run leaves nothing uncommitted."""
    n = KILL_MESSAGES
    src = f"--source={source}"
    kafka_broker.create_topic(unique_topic, partitions=4)
    produce_ids(kafka_broker, unique_topic, 0, n, 4)
    out = str(tmp_path / "rows.txt")
    rng = random.Random(int(os.environ.get("KFAST_SEED", "5")))
    kills = 0
    while kills < KILLS:
        before = count_lines(out)
        # a slow sink (1000 rows per 50 ms) so that every run is killed mid-stream
        proc = _spawn(
            kafka_broker.bootstrap,
            unique_group,
            unique_topic,
            out,
            "--buffer-messages",
            "5000",
            "--batch-rows",
            "1000",
            "--sink-delay",
            "0.05",
            src,
        )
        wait_until(
            lambda b=before, p=proc: count_lines(out) > b or p.poll() is not None, 60, "progress"
        )
        time.sleep(rng.uniform(0.0, 1.0))
        proc.kill()
        proc.communicate()
        kills += 1
        if len(set(r[2] for r in read_lines(out))) >= n:
            break
    proc = _spawn(kafka_broker.bootstrap, unique_group, unique_topic, out, src)
    wait_until(lambda: len({r[2] for r in read_lines(out)}) >= n, 120, "all ids")
    metrics = _finish(proc)
    rows = read_lines(out)
    ids = [r[2] for r in rows]
    assert set(ids) == set(range(n)), "lost messages"
    dups = len(ids) - len(set(ids))
    print(f"kill -9 x{kills} ({source}): {n} messages, {dups} duplicates (uncommitted tails)")
    # Duplicates come only from uncommitted tails: per partition, a re-read
    # restarts at some earlier offset and then continues contiguously.
    assert metrics["ring"]["gaps"] == 0
    # All committed at the clean exit: a fresh run of the same group gets nothing.
    out2 = str(tmp_path / "after.txt")
    proc = _spawn(kafka_broker.bootstrap, unique_group, unique_topic, out2, src)
    time.sleep(3)
    _finish(proc)
    assert read_lines(out2) == []


STALL_MESSAGES = int(os.environ.get("KFAST_STALL_MESSAGES", "200000"))
STALL_SECONDS = float(os.environ.get("KFAST_STALL_SECONDS", "12"))


@pytest.mark.parametrize("source", SOURCES)
def test_stalled_sink_pauses_stays_in_group_and_bounds_memory(
    kafka_broker, unique_topic, unique_group, tmp_path, source
):
    n = STALL_MESSAGES
    kafka_broker.create_topic(unique_topic, partitions=4)
    t0 = time.monotonic()
    pad = int(os.environ.get("KFAST_STALL_PAD", "200"))
    produce_ids(kafka_broker, unique_topic, 0, n, 4, pad=pad)  # ~210 B each: backlog >> limit
    t_produce = time.monotonic() - t0
    out = str(tmp_path / "rows.txt")
    stall = tmp_path / "stall"
    stall.touch()
    # the issue proof: KFAST_STALL_MESSAGES=2000000 KFAST_STALL_LIMIT_MIB=48 (128, 256)
    limit = int(os.environ.get("KFAST_STALL_LIMIT_MIB", "32")) << 20
    proc = _spawn(
        kafka_broker.bootstrap,
        unique_group,
        unique_topic,
        out,
        "--memory-limit",
        str(limit),
        "--stall-file",
        str(stall),
        "--max-poll-ms",
        "8000",
        f"--source={source}",
    )
    assert proc.stdout is not None
    baseline = int(proc.stdout.readline().split()[1])
    peak = 0
    t_end = time.monotonic() + STALL_SECONDS  # longer than max.poll.interval.ms
    while time.monotonic() < t_end:
        peak = max(peak, _rss(proc.pid))
        time.sleep(0.1)
    stall.unlink()
    t0 = time.monotonic()
    while count_lines(out) < n:
        peak = max(peak, _rss(proc.pid))
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.2)
    t_drain = time.monotonic() - t0
    metrics = _finish(proc)
    ids = [r[2] for r in read_lines(out)]
    assert sorted(ids) == list(range(n))
    print(f"produce {t_produce:.1f} s, drain after stall {t_drain:.1f} s")
    print(
        f"stalled sink {STALL_SECONDS:.0f} s ({source}): backlog {n} x ~{pad + 10} B, memory_limit {limit >> 20} MiB, baseline "
        f"{baseline / 2**20:.1f} MiB, peak RSS {peak / 2**20:.1f} MiB, pauses {metrics['pauses']}"
    )
    assert metrics["pauses"] >= 1 and metrics["resumes"] >= 1
    assert metrics["rebalances"]["revoked"] == 0, "member was evicted during the stall"
    assert metrics["rebalances"]["lost"] == 0
    assert peak <= baseline + limit, f"peak RSS {peak} > baseline {baseline} + limit {limit}"


def test_second_signal_exits_at_once_without_committing(
    kafka_broker, unique_topic, unique_group, tmp_path
):
    kafka_broker.create_topic(unique_topic, partitions=2)
    produce_ids(kafka_broker, unique_topic, 0, 2000, 2)
    out = str(tmp_path / "rows.txt")
    stall = tmp_path / "stall"
    stall.touch()
    proc = _spawn(
        kafka_broker.bootstrap, unique_group, unique_topic, out, "--stall-file", str(stall)
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # baseline: the pipeline is about to run
    time.sleep(4)  # joined the group, the sink is stalled on the first batch
    proc.send_signal(signal.SIGTERM)  # drain: blocked by the stalled sink
    time.sleep(0.5)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)  # second signal: leave at once
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "second signal" in err
    assert count_lines(out) == 0
    # nothing was committed: the next run reads everything
    stall.unlink()
    proc = _spawn(kafka_broker.bootstrap, unique_group, unique_topic, out)
    wait_until(lambda: count_lines(out) >= 2000, 60, "all rows")
    _finish(proc)
    assert sorted(r[2] for r in read_lines(out)) == list(range(2000))


def test_cli_run_drains_and_commits_on_sigterm(kafka_broker, unique_topic, unique_group, tmp_path):
    from confluent_kafka import Consumer, KafkaException, TopicPartition
    from runtime_util import SCHEMA

    kafka_broker.create_topic(unique_topic, partitions=3)
    produce_ids(kafka_broker, unique_topic, 0, 3000, 3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "event.avsc").write_text(json.dumps(SCHEMA))
    (tmp_path / "pipeline.toml").write_text(
        f"""
topics = ["{unique_topic}"]
memory_limit = "64MiB"

[kafka]
"bootstrap.servers" = "{kafka_broker.bootstrap}"
"group.id" = "{unique_group}"
"auto.offset.reset" = "earliest"

[decoder]
type = "avro"
schema = "event.avsc"

[sink]
type = "null"
"""
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, kfast.cli; sys.exit(kfast.cli.main())",
            "run",
            str(tmp_path / "pipeline.toml"),
            "--log-level",
            "WARNING",
            "--health-port",
            str(port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    probe = Consumer({"bootstrap.servers": kafka_broker.bootstrap, "group.id": unique_group})
    tps = [TopicPartition(unique_topic, p) for p in range(3)]

    def committed() -> int:
        try:
            return sum(max(tp.offset, 0) for tp in probe.committed(tps, timeout=5))
        except KafkaException:  # NOT_COORDINATOR while the group's coordinator loads
            return 0

    def probe_http(path: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())
        except OSError:
            return 0, {}

    try:
        wait_until(lambda: committed() >= 3000 or proc.poll() is not None, 90, "commits")
        wait_until(lambda: probe_http("/readyz")[0] == 200, 30, "/readyz 200")
        # the member learns that its commit landed on its next consume() after the broker
        wait_until(lambda: probe_http("/healthz")[1].get("last_commit_at"), 30, "commit seen")
        status, body = probe_http("/healthz")
        assert status == 200 and body["state"] == "running" and body["live"]
        assert body["assigned_partitions"] == 3 and body["broker_reachable"] is True
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        probe.close()
    assert proc.returncode == 0, err[-2000:]
