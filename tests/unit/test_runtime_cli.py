"""kfast run pipeline.toml: invalid files fail naming the field (no broker needed)."""

from __future__ import annotations

import json

import pytest

import kfast
from kfast.cli import load_pipeline, main

SCHEMA = {"type": "record", "name": "R", "fields": [{"name": "id", "type": "long"}]}

GOOD = """
topics = ["orders"]
memory_limit = "64MiB"
drain_timeout = 5

[kafka]
"bootstrap.servers" = "127.0.0.1:1"
"group.id" = "g"

[decoder]
type = "avro"
schema = "r.avsc"

[sink]
type = "null"

[batch]
max_rows = 500
max_wait = "20ms"

[buffer]
pause_at = 0.8
resume_at = 0.4
"""


@pytest.fixture
def cfg(tmp_path):
    (tmp_path / "r.avsc").write_text(json.dumps(SCHEMA))

    def write(text: str) -> str:
        p = tmp_path / "pipeline.toml"
        p.write_text(text)
        return str(p)

    return write


def test_good_file_builds_the_pipeline(cfg):
    pipe = load_pipeline(cfg(GOOD))
    assert isinstance(pipe, kfast.Pipeline)
    assert pipe.topics == ["orders"]
    assert pipe.batch_policy.max_rows == 500
    assert pipe.buffer_policy.pause_at == 0.8
    assert pipe.memory_plan().limit == 64 << 20
    assert isinstance(pipe.sink, kfast.NullSink)


def test_plan_flag_prints_the_memory_plan(cfg, capsys):
    assert main(["run", cfg(GOOD), "--plan"]) == 0
    out = capsys.readouterr().out
    assert "librdkafka prefetch" in out and "ring" in out and "64.0 MiB" in out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("[batch]\nmax_rows = 500", "[batch]\nmax_rows = 0"), r"\[batch\]: BatchPolicy.max_rows"),
        (('type = "null"', 'type = "kafka"'), r"\[sink\].type: unknown sink 'kafka'"),
        (('type = "avro"', 'type = "xml"'), r"\[decoder\].type: unknown decoder"),
        (('schema = "r.avsc"', 'schema = "missing.avsc"'), r"\[decoder\].schema: schema file"),
        (('topics = ["orders"]', 'topic = ["orders"]'), r"topic: unknown field"),
        (('topics = ["orders"]', "topics = []"), r"topics: expected a non-empty list"),
        (('memory_limit = "64MiB"', 'memory_limit = "64 parsecs"'), r"memory_limit: cannot parse"),
        (('"group.id" = "g"', ""), r"kafka\['group.id'\]: required"),
        (("pause_at = 0.8", "pause_at = 0.3"), r"\[buffer\]: BufferPolicy.resume_at"),
        (("[batch]", "[batch]\nmax_rowz = 5"), r"\[batch\]: .*max_rowz"),
        (('type = "null"', 'type = "callable"\nfunction = "os:nope"'), r"\[sink\].function"),
        (("drain_timeout = 5", "drain_timeout = -1"), r"drain_timeout"),
        (
            ('[kafka]\n"bootstrap.servers" = "127.0.0.1:1"\n"group.id" = "g"', ""),
            r"\[kafka\]: required",
        ),
    ],
)
def test_invalid_files_name_the_field(cfg, capsys, change, message):
    old, new = change
    assert old in GOOD
    path = cfg(GOOD.replace(old, new, 1))
    with pytest.raises(kfast.ConfigError, match=message):
        load_pipeline(path)
    assert main(["run", path, "--plan"]) == 2
    err = capsys.readouterr().err
    assert "pipeline.toml" in err and "configuration error" in err


def test_invalid_toml_and_missing_file(cfg, tmp_path):
    with pytest.raises(kfast.ConfigError, match="invalid TOML"):
        load_pipeline(cfg("topics = [\n"))
    with pytest.raises(kfast.ConfigError, match="no such file"):
        load_pipeline(tmp_path / "nope.toml")


def test_replay_subcommand_is_delegated(capsys):
    with pytest.raises(SystemExit) as e:
        main(["replay", "--help"])
    assert e.value.code == 0
    assert "kfast replay" in capsys.readouterr().out
