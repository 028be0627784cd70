"""kfast.runtime.health: which state health() reports, and live/ready."""

from __future__ import annotations

import dataclasses

import pytest

from kfast.runtime.health import STATES, HealthBoard


def _board(phase: str = "running") -> HealthBoard:
    b = HealthBoard()
    b.phase = phase
    b.broker_reachable = True
    return b


def test_states_by_priority():
    b = _board("starting")
    assert b.snapshot().state == "starting" and not b.snapshot().ready
    b.retrying("sink open", "sink open: TransientSinkError: refused")
    assert b.snapshot().reason == "sink open: TransientSinkError: refused"
    b.recovered("sink open")
    b.phase = "joining"
    assert b.snapshot().state == "joining"
    b.phase = "running"
    assert b.snapshot().state == "running" and b.snapshot().ready and b.snapshot().live
    b.paused = True
    assert b.snapshot().state == "backpressure" and b.snapshot().ready
    b.retrying("schema registry", "schema registry unavailable: 503")
    h = b.snapshot()
    assert h.state == "retrying" and h.reason == "schema registry unavailable: 503"
    assert not h.ready and h.live
    b.recovered("schema registry")
    b.paused = False
    b.broker_reachable = False
    b.broker_error = "1/1 brokers are down"
    h = b.snapshot()
    assert h.state == "retrying" and h.reason == "broker unreachable: 1/1 brokers are down"
    b.phase = "draining"
    assert b.snapshot().state == "draining" and not b.snapshot().ready
    b.phase = "failed"
    assert b.snapshot().state == "failed" and not b.snapshot().live


def test_missing_topic_keeps_joining():
    b = _board("running")
    b.missing_topics["orders"] = "Unknown topic or partition"
    h = b.snapshot()
    assert h.state == "joining" and "'orders' missing" in h.reason and not h.ready


def test_health_is_frozen_and_serialisable():
    h = _board().snapshot()
    assert h.state in STATES
    with pytest.raises(dataclasses.FrozenInstanceError):
        h.state = "failed"  # type: ignore[misc]
    d = h.as_dict()
    assert set(d) == {
        "state",
        "reason",
        "last_error",
        "last_batch_at",
        "last_commit_at",
        "broker_reachable",
        "assigned_partitions",
        "lag",
        "live",
        "ready",
    }
