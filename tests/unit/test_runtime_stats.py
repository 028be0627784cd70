"""kfast.runtime.stats: bounded samples plus cumulative Prometheus-style histograms."""

from __future__ import annotations

import math

from kfast.runtime.stats import LATENCY_BOUNDS, SAMPLES, DeliverStats, Latency, PollStats


def test_latency_histogram_is_cumulative_with_fixed_bounds():
    lat = Latency()
    for s in (0.00005, 0.001, 0.001, 0.02, 7.0, 1000.0):
        lat.add(s)
    h = lat.histogram()
    buckets = dict(h["buckets"])
    assert [le for le, _ in h["buckets"]] == [*LATENCY_BOUNDS, math.inf]
    assert buckets[0.0001] == 1
    assert buckets[0.001] == 3  # le is inclusive
    assert buckets[0.025] == 4
    assert buckets[10.0] == 5
    assert buckets[60.0] == 5 and buckets[math.inf] == 6 == h["count"]
    assert abs(h["sum"] - 1007.02205) < 1e-9
    counts = [n for _, n in h["buckets"]]
    assert counts == sorted(counts)


def test_samples_are_bounded_but_the_histogram_counts_everything():
    lat = Latency()
    for _ in range(SAMPLES * 3):
        lat.add(0.001)
    assert lat.percentiles()["count"] == SAMPLES
    assert lat.histogram()["count"] == SAMPLES * 3


def test_deliver_stats_batch_histogram_and_written():
    st = DeliverStats()
    st.record(messages=1, rows=1, errors=0, written=1, seconds=0.01, ts_ms=-1)
    st.record(messages=500, rows=490, errors=10, written=480, seconds=0.02, ts_ms=-1)
    snap = st.snapshot()
    assert snap["batch_size"]["histogram"]["<=1"] == 1
    assert snap["batch_size"]["histogram"]["<=1000"] == 1
    assert snap["decoded"] == 491 and snap["decode_errors"] == 10 and snap["written"] == 481
    assert snap["histograms"]["end_to_end"]["count"] == 0  # no timestamps


def test_poll_stats_count_partitions_and_callbacks():
    st = PollStats()
    st.assign_callbacks += 1
    st.assigned += 8
    snap = st.snapshot()
    assert snap["rebalances"]["assigned"] == 8 and snap["rebalances"]["assign_callbacks"] == 1
