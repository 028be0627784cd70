"""kfast.prometheus: collector families, register/unregister, the standalone server."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kfast import prometheus as kprom


class Health:
    def __init__(self, state: str) -> None:
        self.state = state
        self.live = state != "failed"
        self.ready = state in ("running", "backpressure")

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "live": self.live, "ready": self.ready, "reason": "r"}


class FakePipe:
    """Stands in for a Pipeline: the shape of ``metrics()`` and ``health()`` only."""

    def __init__(self, state: str = "running") -> None:
        self.state = state
        self.calls = 0

    def health(self) -> Health:
        return Health(self.state)

    def metrics(self) -> dict[str, Any]:
        self.calls += 1
        inf = float("inf")
        return {
            "running": True,
            "uptime_s": 2.5,
            "consumed": 100,
            "decoded": 97,
            "decode_errors": 3,
            "written": 90,
            "batches": 4,
            "batches_decoded": 4,
            "ring": {
                "capacity_messages": 1000,
                "capacity_bytes": 1 << 20,
                "used_messages": 10,
                "used_bytes": 640,
                "dropped_duplicate": 1,
                "dropped_rewind": 0,
                "dropped_unassigned": 2,
                "fill": 0.01,
            },
            "in_flight": 10,
            "batch_size": {"histogram": {"<=1": 1, "<=10": 0, "<=100": 3, ">100000": 0}},
            "latency_histograms": {
                "decode": {"buckets": [(0.001, 3), (0.01, 4), (inf, 4)], "sum": 0.02, "count": 4},
            },
            "consumer_lag": {"orders[0]": 5, "orders[1]": -1, "my[topic][2]": 7},
            "paused": False,
            "paused_partitions": 0,
            "pauses": 2,
            "resumes": 2,
            "rebalances": {"assigned": 3, "assign_callbacks": 1, "revoked": 0, "lost": 0},
            "commits": {
                "submitted": 6,
                "failed": 1,
                "async_ok": 5,
                "async_failed": 0,
                "partitions": {"orders[0]": {"committed": 40, "durable_next": 45}},
            },
            "kafka_errors": {"_TRANSPORT": 2},
            "memory_plan": {"limit": 1 << 28, "ring": 1 << 26, "prefetch": 1 << 25},
            "delivery": {
                "retries": 2,
                "dlq_records_by_reason": {"decode/DecodeError": 3, "sink/PermanentSinkError": 4},
            },
        }


def families(registry: CollectorRegistry) -> dict[str, Any]:
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(fam: Any, suffix: str = "") -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value for s in fam.samples if s.name == fam.name + suffix
    }


def test_types_labels_and_names() -> None:
    reg = CollectorRegistry()
    kprom.register(FakePipe(), reg)
    fams = families(reg)
    for name, fam in fams.items():
        assert name.startswith("kfast_"), name
        assert fam.documentation and fam.documentation != name
        if fam.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in fam.samples)
    assert fams["kfast_rows_written"].type == "counter"
    assert samples(fams["kfast_rows_written"], "_total") == {(): 90.0}
    assert fams["kfast_ring_fill_ratio"].type == "gauge"
    assert samples(fams["kfast_consumer_lag_messages"]) == {
        (("partition", "0"), ("topic", "orders")): 5.0,
        (("partition", "2"), ("topic", "my[topic]")): 7.0,
    }  # -1 (not known yet) is left out
    assert samples(fams["kfast_ring_dropped_messages"], "_total") == {
        (("reason", "duplicate"),): 1.0,
        (("reason", "rewind"),): 0.0,
        (("reason", "unassigned"),): 2.0,
    }
    assert samples(fams["kfast_dlq_records"], "_total") == {
        (("reason", "DecodeError"), ("stage", "decode")): 3.0,
        (("reason", "PermanentSinkError"), ("stage", "sink")): 4.0,
    }
    assert samples(fams["kfast_rebalance_partitions"], "_total")[(("event", "assigned"),)] == 3.0
    assert samples(fams["kfast_kafka_errors"], "_total") == {(("error", "_TRANSPORT"),): 2.0}
    assert samples(fams["kfast_committed_offset"]) == {
        (("partition", "0"), ("topic", "orders")): 40.0
    }
    assert samples(fams["kfast_memory_budget_bytes"])[(("component", "ring"),)] == 1 << 26

    lat = fams["kfast_stage_latency_seconds"]
    assert lat.type == "histogram"
    assert samples(lat, "_bucket") == {
        (("le", "0.001"), ("stage", "decode")): 3.0,
        (("le", "0.01"), ("stage", "decode")): 4.0,
        (("le", "+Inf"), ("stage", "decode")): 4.0,
    }
    assert samples(lat, "_count") == {(("stage", "decode"),): 4.0}
    assert samples(lat, "_sum") == {(("stage", "decode"),): 0.02}

    rows = fams["kfast_batch_rows"]
    assert rows.type == "histogram"
    buckets = samples(rows, "_bucket")
    assert buckets[(("le", "1.0"),)] == 1.0
    assert buckets[(("le", "100.0"),)] == 4.0  # cumulative
    assert buckets[(("le", "+Inf"),)] == 4.0

    state = samples(fams["kfast_health_state"])
    assert state[(("state", "running"),)] == 1.0
    assert sum(state.values()) == 1.0
    assert samples(fams["kfast_ready"]) == {(): 1.0}


def test_register_default_registry_and_unregister() -> None:
    from prometheus_client import REGISTRY

    pipe = FakePipe()
    collector = kprom.register(pipe)
    try:
        assert "kfast_rows_written_total 90.0" in generate_latest(REGISTRY).decode()
        with pytest.raises(ValueError, match="Duplicated"):
            kprom.register(FakePipe())  # same names twice in one registry: refused at once
    finally:
        kprom.unregister(collector)
    assert "kfast_rows_written" not in generate_latest(REGISTRY).decode()


def test_several_pipelines_by_name() -> None:
    reg = CollectorRegistry()
    kprom.register({"orders": FakePipe(), "refunds": FakePipe("failed")}, reg)
    fams = families(reg)
    assert samples(fams["kfast_rows_written"], "_total") == {
        (("pipeline", "orders"),): 90.0,
        (("pipeline", "refunds"),): 90.0,
    }
    assert samples(fams["kfast_live"]) == {
        (("pipeline", "orders"),): 1.0,
        (("pipeline", "refunds"),): 0.0,
    }


def test_not_a_pipeline() -> None:
    with pytest.raises(kprom.ConfigError, match="expected a kfast.Pipeline"):
        kprom.register(object(), CollectorRegistry())


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


def test_server_endpoints_and_close() -> None:
    pipe = FakePipe("joining")
    before = {t.ident for t in threading.enumerate()}
    server = kprom.serve(pipe, 0)
    assert server.host == "127.0.0.1" and server.port > 0
    status, ctype, body = get(server.url + "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    assert any(
        f.name == "kfast_rows_written" for f in text_string_to_metric_families(body.decode())
    )
    status, ctype, body = get(server.url + "/healthz")
    assert (status, ctype) == (200, "application/json")
    assert json.loads(body)["state"] == "joining"
    status, _, body = get(server.url + "/readyz")
    assert status == 503 and json.loads(body)["ready"] is False
    pipe.state = "running"
    assert get(server.url + "/readyz")[0] == 200
    pipe.state = "failed"
    assert get(server.url + "/healthz")[0] == 503
    assert get(server.url + "/nope")[0] == 404
    port = server.port
    server.close()
    server.close()  # idempotent
    assert {t.ident for t in threading.enumerate()} <= before
    # the port is free again at once: the next pipeline's server gets it
    kprom.serve(pipe, port).close()


def test_server_without_health_falls_back_to_running() -> None:
    class Old:
        def metrics(self) -> dict[str, Any]:
            return {"running": False}

    with kprom.serve(Old(), 0) as server:
        assert get(server.url + "/healthz")[0] == 200
        assert get(server.url + "/readyz")[0] == 503


def test_server_port_in_use_is_a_config_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(kprom.ConfigError, match="cannot listen"):
            kprom.serve(FakePipe(), s.getsockname()[1])


def test_scrape_error_answers_500_and_server_survives() -> None:
    class Broken(FakePipe):
        def metrics(self) -> dict[str, Any]:
            raise RuntimeError("boom")

    with kprom.serve(Broken(), 0) as server:
        assert get(server.url + "/metrics")[0] == 500
        assert get(server.url + "/healthz")[0] == 200


def test_health_families_read_the_same_snapshot() -> None:
    class Snap(FakePipe):
        def metrics(self) -> dict[str, Any]:
            m = super().metrics()
            m["health"] = {"state": "backpressure", "live": True, "ready": True}
            return m

    reg = CollectorRegistry()
    kprom.register(Snap("failed"), reg)  # health() would say failed; the snapshot wins
    fams = families(reg)
    assert samples(fams["kfast_health_state"])[(("state", "backpressure"),)] == 1.0
    assert samples(fams["kfast_live"]) == {(): 1.0}
