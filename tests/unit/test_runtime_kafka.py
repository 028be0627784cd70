"""The compiled consumer without a broker: loading librdkafka, configuration,
log routing, and closing without leaving a thread behind.

Windows has no compiled source (the release wheels run these tests there too):
``_source()`` then checks that asking for it is a ConfigError, and the test
ends there."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest

import kfast
from kfast.errors import ConfigError
from kfast.runtime.kafka import CompiledSource, _consumer, available
from kfast.runtime.ring import Ring

DEAD = "127.0.0.1:1"  # nothing listens: librdkafka logs connection errors
SUPPORTED = sys.platform != "win32"
PROC = os.path.isdir("/proc/self/task")  # Linux: threads and mappings are visible


def _unsupported() -> bool:
    """On Windows: asking for the compiled source is a ConfigError; True there."""
    if SUPPORTED:
        return False
    conf = {"bootstrap.servers": DEAD, "group.id": "g"}
    with pytest.raises(ConfigError, match="not supported"):
        CompiledSource(conf, ["t"], on_assign=print, on_revoke=print, on_lost=print, on_error=print)
    with pytest.raises(ConfigError, match="compiled"):
        kfast.Pipeline(conf, ["t"], kfast.AvroDecoder("long"), kfast.NullSink(), source="compiled")
    return True


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
    return len(os.listdir("/proc/self/task")) if PROC else 0


def test_uses_the_librdkafka_confluent_kafka_loaded():
    import confluent_kafka

    assert available() == SUPPORTED
    if not SUPPORTED:
        with pytest.raises(ImportError, match="not supported"):
            _consumer.load()
        return
    path = _consumer.load()
    assert os.path.basename(path).startswith("librdkafka")
    if PROC:
        with open("/proc/self/maps") as f:
            mapped = {line.split()[-1] for line in f if "librdkafka" in line}
        assert mapped == {path}, "a second librdkafka was loaded"
    assert _consumer.version() == confluent_kafka.libversion()


def test_cannot_switch_librdkafka_once_loaded():
    if _unsupported():
        return
    _consumer.load()
    with pytest.raises(ImportError, match="already loaded"):
        _consumer.load("/nonexistent/librdkafka.so.1")


def test_librdkafka_rejects_a_setting_as_config_error():
    if _unsupported():
        return
    with pytest.raises(ConfigError, match="no.such.setting"):
        _source(**{"no.such.setting": "1"})
    with pytest.raises(ConfigError, match="session.timeout.ms"):
        _source(**{"session.timeout.ms": "not a number"})


def test_kfast_settings_are_enforced():
    if _unsupported():
        return
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
    if _unsupported():
        return
    with pytest.raises(ConfigError, match="oauth_cb"):
        _source(oauth_cb=lambda cfg: ("token", 0))


def test_close_joins_every_librdkafka_thread():
    if _unsupported():
        return
    before = _threads()
    src = _source()
    src.subscribe()
    ring = Ring(100, 1 << 16)
    assert src.consume_into(ring, 10, 0.2) == 0
    assert _threads() > before or not PROC
    src.close()
    src.close()  # idempotent
    assert _threads() == before
    with pytest.raises(RuntimeError, match="closed"):
        src.consume_into(ring, 10, 0.0)


def test_librdkafka_log_lines_go_to_logging_not_stderr():
    if _unsupported():
        return
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


def test_pipeline_source_option_is_validated():
    conf = {"bootstrap.servers": DEAD, "group.id": "g"}
    with pytest.raises(ConfigError, match="source"):
        kfast.Pipeline(conf, ["t"], kfast.AvroDecoder("long"), kfast.NullSink(), source="rdkafka")
    pipe = kfast.Pipeline(conf, ["t"], kfast.AvroDecoder("long"), kfast.NullSink())
    assert pipe.source == ("compiled" if SUPPORTED else "confluent")


def test_cli_config_selects_the_source(tmp_path):
    from kfast.cli.config import build_pipeline

    doc = {
        "topics": ["t"],
        "source": "compiled" if SUPPORTED else "confluent",
        "kafka": {"bootstrap.servers": DEAD, "group.id": "g"},
        "decoder": {"type": "avro", "schema": '"long"'},
        "sink": {"type": "null"},
    }
    assert build_pipeline(doc, tmp_path).source == doc["source"]
    with pytest.raises(ConfigError, match="source"):
        build_pipeline({**doc, "source": "nope"}, tmp_path)


def test_a_source_dropped_without_close_frees_librdkafka():
    if _unsupported():
        return
    import gc

    before = _threads()
    src = _source()
    src.subscribe()
    src.consume_into(Ring(10, 1024), 10, 0.2)
    del src
    gc.collect()  # the source and its consumer refer to each other
    assert _threads() == before


def test_compiled_source_has_the_interface_of_source():
    """The poll loop cannot tell the sources apart: every public method of Source
    exists on CompiledSource with the same parameters, and so do the constructor's."""
    import inspect

    from kfast.runtime.source import Source

    for name, fn in vars(Source).items():
        if name.startswith("_") or not callable(fn):
            continue
        assert hasattr(CompiledSource, name), name
        theirs = list(inspect.signature(fn).parameters)
        ours = list(inspect.signature(getattr(CompiledSource, name)).parameters)
        assert ours == theirs, (name, ours, theirs)
    theirs = list(inspect.signature(Source.__init__).parameters)
    ours = list(inspect.signature(CompiledSource.__init__).parameters)
    assert ours[: len(theirs)] == theirs
