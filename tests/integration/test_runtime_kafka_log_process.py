"""librdkafka's own log lines go through Python logging (kfast.kafka), never to stderr."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = str(Path(__file__).resolve().parents[2])

CHILD = """
import logging, sys, time
sys.path.insert(0, {tests!r})
logging.basicConfig(stream=sys.stdout, level=logging.INFO,
                    format="LOG %(levelname)s %(name)s: %(message)s")
from runtime_util import Recorder, pipeline
conf = {{"bootstrap.servers": "127.0.0.1:{port}", "group.id": "g",
        "reconnect.backoff.ms": 10, "reconnect.backoff.max.ms": 50}}
pipe = pipeline(conf, "t", Recorder())
pipe.start()
time.sleep(4)  # ~80 connection attempts at this backoff
pipe.close()
print("health", pipe.health().state)
"""


def test_librdkafka_lines_go_to_logging_not_stderr(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: a dead broker
    code = CHILD.format(tests=str(Path(__file__).parent), port=port)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == "", proc.stderr[-2000:]  # nothing from librdkafka (or kfast) on stderr
    lines = proc.stdout.splitlines()
    kafka = [ln for ln in lines if " kfast.kafka: " in ln]
    # librdkafka's connection failures arrive through logging, rate-limited
    assert any("Connect to" in ln and f"127.0.0.1:{port}" in ln for ln in kafka), lines[:20]
    assert len(kafka) < 10, kafka
    # the error event is logged once, not per reconnect
    down = [ln for ln in lines if "brokers unreachable" in ln]
    assert len(down) == 1, down
    assert any(ln.startswith("LOG INFO kfast.runtime.pipeline: started") for ln in lines)
    assert any("memory_limit" in ln for ln in lines if "started" in ln)
    assert any(ln.startswith("LOG INFO kfast.runtime.pipeline: stopped") for ln in lines)
    assert "health stopped" in lines
