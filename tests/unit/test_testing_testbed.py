"""Unit tests for the pure-Python parts of kfast.testing (no broker, no database)."""

from __future__ import annotations

import os
import socket
import stat
import sys
import textwrap
from pathlib import Path

import pytest

from kfast.testing import _proc, kafka, postgres
from kfast.testing.pytest_plugin import unique_name

# -- pom and version -----------------------------------------------------------------------------


def test_packaged_pom_names_kafka_and_version() -> None:
    pom = kafka.pom_text()
    assert "<artifactId>kafka_2.13</artifactId>" in pom
    assert kafka.kafka_version(pom) == kafka.KAFKA_VERSION
    assert kafka.KAFKA_VERSION.startswith("4.")


def test_kafka_version_read_from_pom_property() -> None:
    pom = kafka.pom_text().replace(
        f"<kafka.version>{kafka.KAFKA_VERSION}</kafka.version>",
        "<kafka.version>9.9.9</kafka.version>",
    )
    assert kafka.kafka_version(pom) == "9.9.9"
    with pytest.raises(ValueError, match=r"kafka\.version"):
        kafka.kafka_version('<project xmlns="http://maven.apache.org/POM/4.0.0"/>')


def test_cache_root_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KFAST_CACHE_DIR", str(tmp_path / "c"))
    assert kafka.cache_root() == tmp_path / "c"
    assert kafka.jar_dir("1.2.3") == tmp_path / "c" / "kafka-1.2.3"
    monkeypatch.delenv("KFAST_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kafka.cache_root() == tmp_path / "xdg" / "kfast"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert kafka.cache_root() == Path.home() / ".cache" / "kfast"


def test_mvn_command_copies_runtime_dependencies(tmp_path: Path) -> None:
    cmd = kafka.mvn_command(tmp_path / "pom.xml", tmp_path / "out", "/usr/bin/mvn")
    assert cmd[0] == "/usr/bin/mvn"
    assert "dependency:copy-dependencies" in cmd
    assert f"-DoutputDirectory={tmp_path / 'out'}" in cmd
    assert "-DincludeScope=runtime" in cmd
    assert ["-f", str(tmp_path / "pom.xml")] == cmd[cmd.index("-f") : cmd.index("-f") + 2]


FAKE_MVN = """\
#!{python}
import os, sys
from pathlib import Path
log = Path(os.environ["FAKE_MVN_LOG"])
log.write_text(log.read_text() + "called\\n" if log.exists() else "called\\n")
if os.environ.get("FAKE_MVN_FAIL"):
    print("[ERROR] Could not find artifact org.apache.kafka:kafka_2.13:jar")
    sys.exit(1)
out = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("-DoutputDirectory="))
for name in ("kafka_2.13-9.9.9.jar", "kafka-clients-9.9.9.jar"):
    Path(out, name).write_bytes(b"PK")
"""


@pytest.fixture
def fake_mvn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    script = tmp_path / "mvn"
    script.write_text(FAKE_MVN.format(python=sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("FAKE_MVN_LOG", str(tmp_path / "mvn.log"))
    return script


def test_fetch_caches_and_reuses(fake_mvn: Path, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    target = kafka.fetch_kafka(root, mvn=str(fake_mvn))
    assert target == root / f"kafka-{kafka.KAFKA_VERSION}"
    assert (target / "kafka_2.13-9.9.9.jar").exists()
    assert kafka.is_complete(target)
    assert (target / "pom.xml").read_text() == kafka.pom_text()
    # Second call: served from the cache, mvn not run again.
    assert kafka.fetch_kafka(root, mvn=str(fake_mvn)) == target
    assert (tmp_path / "mvn.log").read_text().count("called") == 1
    # No staging directories left behind.
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [target.name]


def test_fetch_redoes_incomplete_or_stale_cache(fake_mvn: Path, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    target = root / f"kafka-{kafka.KAFKA_VERSION}"
    target.mkdir(parents=True)
    (target / "kafka_2.13-half.jar").write_bytes(b"")  # an interrupted copy: no marker
    assert not kafka.is_complete(target)
    kafka.fetch_kafka(root, mvn=str(fake_mvn))
    assert kafka.is_complete(target)
    assert not (target / "kafka_2.13-half.jar").exists()
    # A different pom (e.g. a version bump) invalidates the marker.
    other = kafka.pom_text().replace("<packaging>pom</packaging>", "<packaging>pom</packaging> ")
    assert not kafka.is_complete(target, other)
    kafka.fetch_kafka(root, mvn=str(fake_mvn), pom=other)
    assert kafka.is_complete(target, other)
    assert (tmp_path / "mvn.log").read_text().count("called") == 2


def test_fetch_failure_is_reported_and_leaves_no_marker(
    fake_mvn: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_MVN_FAIL", "1")
    root = tmp_path / "cache"
    with pytest.raises(kafka.KafkaStartError, match="Could not find artifact"):
        kafka.fetch_kafka(root, mvn=str(fake_mvn))
    assert not kafka.is_complete(root / f"kafka-{kafka.KAFKA_VERSION}")
    assert [p for p in root.iterdir() if p.is_dir()] == []


def test_fetch_without_maven_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(kafka.KafkaStartError, match="mvn"):
        kafka.fetch_kafka(tmp_path / "cache")


# -- broker configuration ------------------------------------------------------------------------


def test_cluster_id_is_kraft_shaped() -> None:
    ids = {kafka.new_cluster_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(len(i) == 22 and "=" not in i for i in ids)
    # 1 in 64 random ids would start with "-", which the storage tool parses as an option.
    assert not any(i.startswith("-") for i in ids)


def test_server_properties_single_node_fast_groups(tmp_path: Path) -> None:
    props = kafka.server_properties(port=1111, controller_port=2222, log_dir=tmp_path)
    assert props["process.roles"] == "broker,controller"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:2222"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:1111,CONTROLLER://127.0.0.1:2222"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:1111"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert int(props["group.consumer.heartbeat.interval.ms"]) <= 1000
    assert props["auto.create.topics.enable"] == "false"
    assert props["log.dirs"] == str(tmp_path)
    for key, value in props.items():
        if key.endswith("replication.factor") or key.endswith("min.isr"):
            assert value == "1", key
    extra = kafka.server_properties(
        port=1, controller_port=2, log_dir=tmp_path, extra={"num.partitions": "3"}
    )
    assert extra["num.partitions"] == "3"


def test_consumer_config_defaults_and_overrides() -> None:
    conf = kafka.consumer_config("127.0.0.1:9", "g", **{"auto.offset.reset": "latest"})
    assert conf["bootstrap.servers"] == "127.0.0.1:9"
    assert conf["group.id"] == "g"
    assert conf["enable.auto.commit"] is False
    assert conf["auto.offset.reset"] == "latest"
    # Keys pass through untouched (librdkafka and the Python client have underscored keys).
    conf = kafka.consumer_config("b", "g", log_level=3, **{"fetch.wait.max.ms": None})
    assert conf["log_level"] == 3 and "fetch.wait.max.ms" not in conf
    conf = kafka.consumer_config("b", "g", **{"group.protocol": "consumer"})
    assert "session.timeout.ms" not in conf and "heartbeat.interval.ms" not in conf
    conf = kafka.consumer_config(
        "b", "g", **{"group.protocol": "consumer", "session.timeout.ms": 45000}
    )
    assert conf["session.timeout.ms"] == 45000


def test_external_broker_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KFAST_TEST_BOOTSTRAP", "10.0.0.1:9092")
    broker = kafka.KafkaBroker()
    assert broker.external
    assert broker.bootstrap == "10.0.0.1:9092"
    broker.stop()  # no-op
    broker.close()  # no-op
    with pytest.raises(kafka.KafkaStartError, match="KFAST_TEST_BOOTSTRAP"):
        broker.restart()


def test_unstarted_broker_has_no_bootstrap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KFAST_TEST_BOOTSTRAP", raising=False)
    with pytest.raises(kafka.KafkaStartError, match="not been started"):
        _ = kafka.KafkaBroker().bootstrap


# -- PostgreSQL ----------------------------------------------------------------------------------


def test_external_postgres_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KFAST_TEST_PG_DSN", "postgresql://u@db.example:5433/x")
    server = postgres.PostgresServer()
    assert server.external
    assert server.dsn == "postgresql://u@db.example:5433/x"
    assert "dbname=other" in server.dsn_for("other")
    for method in (server.stop, server.restart):
        with pytest.raises(postgres.PostgresStartError, match="KFAST_TEST_PG_DSN"):
            method()
    server.close()  # no-op


def test_find_pg_bindir_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for prog in ("initdb", "postgres"):
        (tmp_path / prog).write_text("")
    monkeypatch.setenv("KFAST_PG_BINDIR", str(tmp_path))
    assert postgres.find_pg_bindir() == tmp_path


def test_find_pg_bindir_reports_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres, "Path", lambda p: tmp_path / str(p).lstrip("/"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("KFAST_PG_BINDIR", raising=False)
    with pytest.raises(postgres.PostgresStartError, match="initdb"):
        postgres.find_pg_bindir()


def test_server_settings_are_for_tests(tmp_path: Path) -> None:
    s = postgres.server_settings(5555, tmp_path)
    assert s["port"] == "5555"
    assert s["listen_addresses"] == "'127.0.0.1'"
    assert s["unix_socket_directories"] == f"'{tmp_path}'"
    assert s["fsync"] == s["synchronous_commit"] == s["full_page_writes"] == "off"


# -- ports, processes, names -------------------------------------------------------------------


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = _proc.free_ports(5)
    assert len(set(ports)) == 5
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    with pytest.raises(ValueError):
        _proc.free_ports(0)


def test_port_is_open_and_wait_for_port() -> None:
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert _proc.port_is_open("127.0.0.1", port)
        assert _proc.wait_for_port("127.0.0.1", port, time.monotonic() + 5)
    assert not _proc.port_is_open("127.0.0.1", port)
    assert not _proc.wait_for_port("127.0.0.1", port, time.monotonic() + 0.2)
    assert not _proc.wait_for_port("127.0.0.1", port, time.monotonic() + 5, alive=lambda: False)


def test_parent_death_signal_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_proc.shutil, "which", lambda name: f"/bin/{name}")
    cmd = _proc.with_parent_death_signal(["java", "-version"], "TERM")
    assert cmd == ["/bin/setpriv", "--pdeathsig", "TERM", "--", "java", "-version"]
    cmd = _proc.with_parent_death_signal(["initdb"], "KILL", user="postgres")
    assert cmd[:4] == ["/bin/setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]
    assert cmd[-1] == "initdb"
    monkeypatch.setattr(
        _proc.shutil, "which", lambda name: None if name == "setpriv" else f"/bin/{name}"
    )
    assert _proc.with_parent_death_signal(["x"], "TERM") == ["x"]
    assert _proc.with_parent_death_signal(["x"], "TERM", user="postgres") == [
        "/bin/runuser",
        "-u",
        "postgres",
        "--",
        "x",
    ]


def test_stop_process_escalates_to_kill(tmp_path: Path) -> None:
    import subprocess

    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"1\n"
    code = _proc.stop_process(proc, timeout=0.5)
    assert code == -9
    proc.stdout.close()


def test_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    assert _proc.log_tail(log) == ""
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert _proc.log_tail(log, 3) == "line 97\nline 98\nline 99"


def test_atexit_cleanup_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    # A private registry: the real one holds this session's broker and database,
    # which _run_cleanups() would stop for every test that runs after this one.
    monkeypatch.setattr(_proc, "_cleanups", {})
    calls: list[str] = []
    owner = object()
    _proc.register_cleanup(owner, lambda: calls.append("ran"))
    _proc.unregister_cleanup(owner)
    _proc._run_cleanups()
    assert calls == []
    _proc.register_cleanup(owner, lambda: calls.append("ran"))
    _proc._run_cleanups()
    assert calls == ["ran"]


def test_unique_name_is_a_legal_topic_name() -> None:
    a = unique_name("t", "test_x[param-1/ü]")
    b = unique_name("t", "test_x[param-1/ü]")
    assert a != b
    import re

    assert re.fullmatch(r"[A-Za-z0-9._-]+", a)
    assert len(unique_name("t", "x" * 500)) <= 120


# -- plugin registration -----------------------------------------------------------------------

# The guard from tests/conftest.py (the rest of that file needs built extensions).
CONFTEST_GUARD = textwrap.dedent(
    """
    import sys

    if "kfast.testing.pytest_plugin" not in sys.modules:
        pytest_plugins = ["kfast.testing.pytest_plugin"]
    """
)

PLUGIN_TEST = textwrap.dedent(
    """
    def test_fixtures_available(unique_topic, unique_group, request):
        assert unique_topic.startswith("t-") and unique_group.startswith("g-")
        names = [name for name, _ in request.config.pluginmanager.list_name_plugin()]
        mods = [p for p in request.config.pluginmanager.get_plugins()
                if getattr(p, "__name__", "") == "kfast.testing.pytest_plugin"]
        assert len(mods) == 1, names
    """
)


def _run_pytest(tmp_path: Path, extra_path: list[Path], disable_autoload: bool) -> str:
    import subprocess

    root = Path(__file__).resolve().parents[2]
    suite = tmp_path / "suite"
    suite.mkdir()
    guard = CONFTEST_GUARD.strip()
    real = (root / "tests" / "conftest.py").read_text()
    assert all(line in real for line in guard.splitlines()), "keep the guard in sync"
    (suite / "conftest.py").write_text(guard + "\n")
    (suite / "test_plugin.py").write_text(PLUGIN_TEST)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), *map(str, extra_path)])
    env.pop("PYTEST_ADDOPTS", None)
    if disable_autoload:
        env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    else:
        env.pop("PYTEST_DISABLE_PLUGIN_AUTOLOAD", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(suite),
            str(suite),
        ],
        cwd=suite,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_plugin_from_conftest_only(tmp_path: Path) -> None:
    assert "1 passed" in _run_pytest(tmp_path, [], disable_autoload=True)


def test_plugin_from_entry_point_and_conftest_registers_once(tmp_path: Path) -> None:
    # Pretend kfast is pip-installed: a dist-info that declares the pytest11 entry point.
    site = tmp_path / "site"
    dist = site / "kfast_fake-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kfast-fake\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[pytest11]\nkfast = kfast.testing.pytest_plugin\n")
    out = _run_pytest(tmp_path, [site], disable_autoload=False)
    assert "1 passed" in out


# -- JVM class-data-sharing archive and temp-dir sweeping -----------------------------------------


def test_cds_archive_path_depends_on_java_and_jars(tmp_path: Path) -> None:
    jars = tmp_path / "jars"
    jars.mkdir()
    (jars / "a.jar").write_bytes(b"")
    java1, java2 = tmp_path / "java1", tmp_path / "java2"
    java1.write_text("1")
    java2.write_text("22")
    p1 = kafka.cds_archive_path(jars, str(java1))
    assert p1.parent == jars / "cds" and p1.suffix == ".jsa"
    assert p1 == kafka.cds_archive_path(jars, str(java1))
    assert p1 != kafka.cds_archive_path(jars, str(java2))
    (jars / "b.jar").write_bytes(b"")
    assert p1 != kafka.cds_archive_path(jars, str(java1))


def test_cds_can_be_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KFAST_KAFKA_CDS", raising=False)
    assert kafka.cds_enabled()
    for off in ("0", "false", "off", "no"):
        monkeypatch.setenv("KFAST_KAFKA_CDS", off)
        assert not kafka.cds_enabled()


def test_cds_recording_skipped_on_ci_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KFAST_KAFKA_CDS", raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert kafka.cds_record_at_exit()
    monkeypatch.setenv("CI", "true")
    assert not kafka.cds_record_at_exit()
    monkeypatch.setenv("KFAST_KAFKA_CDS", "1")
    assert kafka.cds_record_at_exit()
    monkeypatch.setenv("KFAST_KAFKA_CDS", "0")
    assert not kafka.cds_record_at_exit()


def test_empty_bootstrap_forces_own_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KFAST_TEST_BOOTSTRAP", "10.0.0.1:9092")
    assert not kafka.KafkaBroker(bootstrap="").external


def test_sweep_removes_only_dirs_of_dead_owners(tmp_path: Path) -> None:
    import subprocess

    mine = _proc.make_owned_tmp_dir("kfast-x-", tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / "kfast-x-stale"
    stale.mkdir()
    (stale / _proc.OWNER_FILE).write_text(f"{dead.pid}\n")
    fresh = tmp_path / "kfast-x-fresh"  # dead owner but too recent: maybe still being set up
    fresh.mkdir()
    (fresh / _proc.OWNER_FILE).write_text(f"{dead.pid}\n")
    foreign = tmp_path / "kfast-x-foreign"  # no owner file: not ours to judge
    foreign.mkdir()
    old = os.stat(stale / _proc.OWNER_FILE).st_mtime - 3600
    os.utime(stale / _proc.OWNER_FILE, (old, old))

    assert _proc.sweep_stale_tmp_dirs("kfast-x-", tmp_path, min_age=60) == 1
    assert not stale.exists()
    assert mine.exists() and fresh.exists() and foreign.exists()


def test_spawned_child_outlives_the_thread_that_asked_for_it() -> None:
    import shutil
    import threading
    import time

    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is needed for the parent-death signal")
    procs = []

    def start() -> None:
        argv = _proc.with_parent_death_signal(["sleep", "30"], "KILL")
        procs.append(_proc.spawn(argv))

    t = threading.Thread(target=start)
    t.start()
    t.join()
    time.sleep(0.3)  # a parent-death signal tied to the finished thread would have fired
    try:
        assert procs[0].poll() is None, "child died with the thread that requested it"
    finally:
        _proc.stop_process(procs[0], timeout=5)
