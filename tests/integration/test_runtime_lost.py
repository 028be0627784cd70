"""Session expiry for real: a member frozen (SIGSTOP) past its session timeout loses its
partitions to another member, then wakes up (SIGCONT).

Member A (a child process, lost_child.py) delivers part of the topic and commits it, then
its sink holds the next batch and the test freezes the process. Member B joins; once A's
session has expired B gets every partition, delivers the rest and commits. A is resumed: the
held batch is written (B delivered it too: duplicates), librdkafka reports the partitions
*lost* (not revoked), A must not commit them, and it rejoins and takes part in a second wave
of messages. The broker's committed offsets are watched all along: they never move backwards
(an accepted stale commit by A would make them), and they end at the log end offsets.

Classic protocol: librdkafka notices the expired session itself as soon as the process runs
again ("Consumer group session timed out ... revoking assignment"); the lost callback follows
within milliseconds, and a commit A sent before it (when there is one) is rejected by the
broker (UNKNOWN_MEMBER_ID). KIP-848 (``group.protocol=consumer``): the session timeout is
the group's (``consumer.session.timeout.ms``, set below); the lost callback came ~10 ms after
SIGCONT was handled, yet A still wrote 6,500-7,000 wave-1 rows after waking up (most of its
ring; classic: 500-1,750).

``KFAST_LOST_MESSAGES`` (default 8000) sets the size of the first wave.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from runtime_util import produce_ids, read_lines, wait_until

pytestmark = pytest.mark.integration

CHILD = str(Path(__file__).with_name("lost_child.py"))
ROOT = str(Path(__file__).resolve().parents[2])

PARTITIONS = 4
WAVE1 = int(os.environ.get("KFAST_LOST_MESSAGES", "8000"))
WAVE2 = WAVE1 // 2
HOLD_AFTER = WAVE1 // 8  # rows A writes before its sink holds a batch
SESSION_MS = 6000

# librdkafka settings per group protocol. Classic: the member's own session timeout.
# KIP-848: the session timeout is the group's (set below with incremental_alter_configs).
GROUP_PROTOCOLS = {
    "classic": {
        "partition.assignment.strategy": "cooperative-sticky",
        "session.timeout.ms": str(SESSION_MS),
        "heartbeat.interval.ms": "500",
    },
    "consumer": {"group.protocol": "consumer"},
}


class Member:
    """One lost_child.py process and the files it writes."""

    def __init__(self, name: str, broker: Any, group: str, topic: str, base: Path, *args: str):
        self.name = name
        self.dir = base / name
        self.dir.mkdir()
        self.args = args
        self.broker = broker
        self.group = group
        self.topic = topic
        self.proc: subprocess.Popen[str] | None = None

    def start(self, kafka: dict[str, str]) -> None:
        extra = [f"--kafka={k}={v}" for k, v in kafka.items()]
        cmd = [sys.executable, CHILD, self.broker.bootstrap, self.group, self.topic]
        cmd += [str(self.dir), *self.args, *extra]
        self.out = open(self.dir / "stdout.txt", "w")  # files, not pipes: never blocks the child
        self.err = open(self.dir / "stderr.txt", "w")
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.out,
            stderr=self.err,
            text=True,
            env=dict(os.environ, PYTHONPATH=ROOT),
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> bool:
        if not self.alive():
            raise AssertionError(f"member {self.name} exited early:\n{self.stderr()[-3000:]}")
        return True

    def stderr(self) -> str:
        return (self.dir / "stderr.txt").read_text()

    def rows(self) -> list[tuple[int, int, int]]:
        return read_lines(str(self.dir / "rows.txt"))

    def commits(self) -> list[dict[str, Any]]:
        try:
            text = (self.dir / "commits.txt").read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.endswith("}")]

    def metrics(self) -> dict[str, Any]:
        try:
            return json.loads((self.dir / "metrics.json").read_text())
        except FileNotFoundError:
            return {}

    def owned(self) -> set[int]:
        """Partitions in the offset tracker (assigned, not revoked or lost)."""
        parts = self.metrics().get("commits", {}).get("partitions", {})
        return {int(k.rsplit("[", 1)[1].rstrip("]")) for k in parts}

    def finish(self, timeout: float = 60.0) -> dict[str, Any]:
        assert self.proc is not None
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # a hung shutdown: every thread's stack (faulthandler in lost_child) into the failure
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(1.0)
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(
                f"member {self.name} did not stop within {timeout} s:\n{self.stderr()[-6000:]}"
            ) from None
        self.out.close()
        self.err.close()
        assert self.proc.returncode == 0, (
            f"member {self.name} failed ({self.proc.returncode}):\n{self.stderr()[-3000:]}"
        )
        for line in (self.dir / "stdout.txt").read_text().splitlines():
            if line.startswith("metrics "):
                return json.loads(line[len("metrics ") :])
        raise AssertionError(f"member {self.name}: no metrics line")

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)


class CommittedOffsets:
    """Reads the group's committed offsets from the broker, and watches them in a thread."""

    def __init__(self, bootstrap: str, group: str, topic: str) -> None:
        from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
        from confluent_kafka.admin import AdminClient

        self.admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})
        self.request = [
            ConsumerGroupTopicPartitions(
                group, [TopicPartition(topic, p) for p in range(PARTITIONS)]
            )
        ]
        self.group = group
        self.history: list[dict[int, int]] = []
        self.regressions: list[tuple[int, int, int]] = []  # (partition, before, after)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def read(self) -> dict[int, int]:
        res = self.admin.list_consumer_group_offsets(self.request, request_timeout=10)
        tps = res[self.group].result(timeout=15).topic_partitions
        return {tp.partition: tp.offset for tp in tps}

    def _watch(self) -> None:
        last: dict[int, int] = {}
        while not self._stop.wait(0.05):
            try:
                now = self.read()
            except Exception:  # a transient admin error: the next read tells
                continue
            for p, off in now.items():
                if off < last.get(p, -1001):
                    self.regressions.append((p, last[p], off))
                last[p] = max(off, last.get(p, off))
            self.history.append(now)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)


def _ends(n: int) -> dict[int, int]:
    """Log end offset per partition after ids [0, n) were produced with produce_ids."""
    return {p: len(range(p, n, PARTITIONS)) for p in range(PARTITIONS)}


def _set_group_session_timeout(broker: Any, group: str) -> None:
    """KIP-848: the session timeout is a group config (``consumer.session.timeout.ms``)."""
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType

    res = ConfigResource(
        ResourceType.GROUP,
        group,
        incremental_configs=[
            ConfigEntry(
                "consumer.session.timeout.ms",
                str(SESSION_MS),
                incremental_operation=AlterConfigOpType.SET,
            )
        ],
    )
    for fut in broker.admin().incremental_alter_configs([res]).values():
        fut.result(timeout=30)


# the compiled source's lost path does not depend on the protocol (librdkafka's
# assignment_lost); its KIP-848 rebalances are proven by test_runtime_source.py and
# test_runtime_exactly_once.py, so this slow proof runs it on the classic protocol only
@pytest.mark.parametrize(
    ("protocol", "source"),
    [("classic", "confluent"), ("consumer", "confluent"), ("classic", "compiled")],
)
def test_session_expiry_loses_partitions_without_committing_them(
    kafka_broker, unique_topic, unique_group, tmp_path, protocol, source
):
    t_start = time.monotonic()
    kafka = GROUP_PROTOCOLS[protocol]
    if protocol == "consumer":
        _set_group_session_timeout(kafka_broker, unique_group)
    kafka_broker.create_topic(unique_topic, partitions=PARTITIONS)
    produce_ids(kafka_broker, unique_topic, 0, WAVE1, PARTITIONS)
    end1 = _ends(WAVE1)
    probe = CommittedOffsets(kafka_broker.bootstrap, unique_group, unique_topic)
    a = Member(
        "a",
        kafka_broker,
        unique_group,
        unique_topic,
        tmp_path,
        f"--hold-after={HOLD_AFTER}",
        f"--source={source}",
    )
    b = Member("b", kafka_broker, unique_group, unique_topic, tmp_path, f"--source={source}")
    (a.dir / "hold").touch()
    try:
        # 1. A alone: it delivers HOLD_AFTER rows or a little more, commits them, then its
        #    sink holds the next batch (the rest of the topic is in its ring).
        a.start(kafka)
        wait_until(lambda: a.check_alive() and (a.dir / "held").exists(), 60, "A to hold")
        a_before = a.rows()
        assert HOLD_AFTER <= len(a_before) < WAVE1
        wait_until(
            lambda: sum(max(0, o) for o in probe.read().values()) == len(a_before),
            30,
            "A's delivered rows to be committed",
        )
        assert a.owned() == set(range(PARTITIONS))
        probe.start()

        # 2. Freeze A; B joins. B gets the partitions only when A's session has expired.
        a.proc.send_signal(signal.SIGSTOP)
        t_stop = time.monotonic()
        b.start(kafka)
        wait_until(
            lambda: b.check_alive() and probe.read() == end1,
            60,
            "B to deliver and commit the rest of wave 1",
        )
        assert b.owned() == set(range(PARTITIONS))
        frozen = time.monotonic() - t_stop
        assert frozen * 1000 > SESSION_MS
        assert len(a.rows()) == len(a_before)  # frozen: nothing written meanwhile
        a_commits_frozen = len(a.commits())

        # 3. Wake A up. The held batch is written at once (B delivered it too); the
        #    partitions are reported lost; A rejoins and the group splits them.
        (a.dir / "hold").unlink()
        a.proc.send_signal(signal.SIGCONT)
        t_cont = time.monotonic()

        wait_until(
            lambda: a.check_alive() and a.metrics().get("rebalances", {}).get("lost", 0) >= 1,
            60,
            "A to report its partitions lost",
        )
        t_lost = time.monotonic() - t_cont

        def settled() -> bool:
            a.check_alive()
            b.check_alive()
            oa, ob = a.owned(), b.owned()
            return bool(oa) and bool(ob) and not oa & ob and oa | ob == set(range(PARTITIONS))

        wait_until(settled, 60, "A to rejoin and get some partitions back")
        t_settled = time.monotonic() - t_cont
        a_owned = a.owned()

        # 4. A second wave: both members deliver and commit it.
        produce_ids(kafka_broker, unique_topic, WAVE1, WAVE2, PARTITIONS)
        end2 = _ends(WAVE1 + WAVE2)
        wait_until(
            lambda: a.check_alive() and b.check_alive() and probe.read() == end2,
            60,
            "wave 2 committed",
        )
        ma = a.finish()
        mb = b.finish()
    finally:
        a.kill()
        b.kill()
        probe.stop()

    final = probe.read()
    rows_a, rows_b = a.rows(), b.rows()
    ids = [r[2] for r in rows_a + rows_b]
    counts = Counter(ids)
    dups = {i: c for i, c in counts.items() if c > 1}
    a_after = rows_a[len(a_before) :]
    a_commits_after = a.commits()[a_commits_frozen:]
    stale = [
        (p, off)
        for c in a_commits_after
        if c["err"] is None
        for p, off, err in c["offsets"]
        if err is None and off < end1[p]
    ]
    failed_after = [c for c in a_commits_after if c["err"] or any(o[2] for o in c["offsets"])]
    summary = (
        f"[{protocol}, {source}] {WAVE1}+{WAVE2} messages, {PARTITIONS} partitions, session "
        f"{SESSION_MS} ms: A delivered {len(a_before)} before the freeze, frozen {frozen:.1f} s; "
        f"B delivered {len(rows_b)}; after SIGCONT A delivered {len(a_after)} "
        f"({sum(1 for r in a_after if r[2] < WAVE1)} of wave 1), lost reported after {t_lost:.1f} s, "
        f"group settled after {t_settled:.1f} s with A "
        f"owning {sorted(a_owned)}; duplicates {sum(c - 1 for c in dups.values())} "
        f"({len(dups)} ids); A rebalances {ma['rebalances']}, B rebalances "
        f"{mb['rebalances']}; A commits after SIGCONT: {len(a_commits_after)} reported, "
        f"{len(failed_after)} failed {[c['err'] or c['offsets'] for c in failed_after][:3]}; "
        f"committed offsets watched {len(probe.history)} times, "
        f"{len(probe.regressions)} regressions; total {time.monotonic() - t_start:.1f} s"
    )
    print(summary)

    # every message delivered at least once
    assert set(ids) == set(range(WAVE1 + WAVE2)), "lost messages"
    # A noticed the loss (librdkafka's lost callback, not a revoke)
    assert ma["rebalances"]["lost"] >= 1
    assert ma["rebalances"]["revoked"] == 0  # a revoke would have committed
    assert "kfast.runtime.poll lost " in a.stderr()
    assert mb["rebalances"]["lost"] == 0
    # A committed nothing for the lost partitions: no successful commit below what B had
    # committed before A woke up, and the committed offsets never went backwards
    assert stale == [], f"A committed lost partitions after SIGCONT: {stale}"
    assert probe.regressions == [], f"committed offsets went backwards: {probe.regressions}"
    assert final == end2
    # duplicates are A's wave-1 rows written after it woke up (the held batch and what
    # was already decoded); wave 2 went through a settled group: no duplicates there
    a_after_ids = Counter(r[2] for r in a_after)
    assert all(i < WAVE1 and a_after_ids[i] >= 1 for i in dups), sorted(dups)[:20]
    # A kept working after it rejoined
    assert any(r[2] >= WAVE1 for r in a_after), "A delivered nothing of wave 2"
    assert {r[0] for r in a_after if r[2] >= WAVE1} <= a_owned
