"""The compiled consumer without a broker: loading librdkafka, configuration,
log routing, and closing without leaving a thread behind."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from kfast.errors import ConfigError
from kfast.runtime.kafka import CompiledSource, _consumer, available
from kfast.runtime.ring import Ring

DEAD = "127.0.0.1:1"  # nothing listens: librdkafka logs connection errors


def _source(**kafka: Any) -> CompiledSource:
    conf = {"bootstrap.servers": DEAD, "group.id": "g", **kafka}
    return CompiledSource(
        conf,
        ["t"],
        on_assign=lambda parts: None,
        on_revoke=lambda parts: None,
        on_lost=lambda parts: None,
        on_error=lambda err: None,
    )


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_uses_the_librdkafka_confluent_kafka_loaded():
    import confluent_kafka

    assert available()
    path = _consumer.load()
    assert os.path.basename(path).startswith("librdkafka")
    with open("/proc/self/maps") as f:
        mapped = {line.split()[-1] for line in f if "librdkafka" in line}
    assert mapped == {path}, "a second librdkafka was loaded"
    assert _consumer.version() == confluent_kafka.libversion()


def test_cannot_switch_librdkafka_once_loaded():
    _consumer.load()
    with pytest.raises(ImportError, match="already loaded"):
        _consumer.load("/nonexistent/librdkafka.so.1")


def test_librdkafka_rejects_a_setting_as_config_error():
    with pytest.raises(ConfigError, match="no.such.setting"):
        _source(**{"no.such.setting": "1"})
    with pytest.raises(ConfigError, match="session.timeout.ms"):
        _source(**{"session.timeout.ms": "not a number"})


def test_kfast_settings_are_enforced():
    with pytest.raises(ConfigError, match="enable.auto.commit"):
        _source(**{"enable.auto.commit": True})
    src = _source()
    try:
        assert src.config["enable.auto.commit"] == "false"
        assert src.config["enable.auto.offset.store"] == "false"
        assert src.cooperative
    finally:
        src.close()


def test_unsupported_callback_is_a_config_error():
    with pytest.raises(ConfigError, match="oauth_cb"):
        _source(oauth_cb=lambda cfg: ("token", 0))


def test_close_joins_every_librdkafka_thread():
    before = _threads()
    src = _source()
    src.subscribe()
    ring = Ring(100, 1 << 16)
    assert src.consume_into(ring, 10, 0.2) == 0
    assert _threads() > before
    src.close()
    src.close()  # idempotent
    assert _threads() == before
    with pytest.raises(RuntimeError, match="closed"):
        src.consume_into(ring, 10, 0.0)


def test_librdkafka_log_lines_go_to_logging_not_stderr():
    code = textwrap.dedent(
        f"""
        import logging, sys
        logging.basicConfig(stream=sys.stdout, level=logging.DEBUG, format="%(name)s %(message)s")
        from kfast.runtime.kafka import CompiledSource
        from kfast.runtime.ring import Ring
        src = CompiledSource(
            {{"bootstrap.servers": "{DEAD}", "group.id": "g", "debug": "broker"}}, ["t"],
            on_assign=print, on_revoke=print, on_lost=print, on_error=print)
        src.subscribe()
        ring = Ring(10, 1024)
        for _ in range(5):
            src.consume_into(ring, 10, 0.2)
        src.close()
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stderr == ""
    assert "kfast.kafka" in out.stdout
    assert "BROKER" in out.stdout or "CONNECT" in out.stdout
