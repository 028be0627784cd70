"""A real, throwaway Apache Kafka broker for tests, benchmarks and demos.

The broker's jars come from Maven Central: ``kafka-pom.xml`` (next to this file) is resolved with
the machine's ``mvn`` into a cache directory outside the source tree, once.  Each
:class:`KafkaBroker` then formats KRaft storage in a fresh temporary directory with Kafka's own
storage tool and runs a combined broker+controller with ``java -cp 'jars/*' kafka.Kafka`` on free
loopback ports.

``KFAST_TEST_BOOTSTRAP=host:port`` makes :class:`KafkaBroker` use that broker instead (start and
stop do nothing then, restart raises).  ``KFAST_CACHE_DIR`` moves the jar cache (default
``~/.cache/kfast``).

Command line::

    python -m kfast.testing.kafka fetch   # download the jars only
    python -m kfast.testing.kafka run     # run a broker in the foreground, print its bootstrap
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from kfast.testing import _proc

__all__ = [
    "KAFKA_VERSION",
    "KafkaBroker",
    "KafkaStartError",
    "cache_root",
    "consumer_config",
    "fetch_kafka",
    "jar_dir",
    "kafka_version",
    "pom_text",
    "prepare_cds_archive",
]

ENV_BOOTSTRAP = "KFAST_TEST_BOOTSTRAP"
ENV_CACHE_DIR = "KFAST_CACHE_DIR"
MARKER = ".kfast-complete"
_POM_NS = "{http://maven.apache.org/POM/4.0.0}"

Header = tuple[str, "bytes | str | None"]


class KafkaStartError(RuntimeError):
    """The broker (or its jars) could not be made available; the message says why."""


# --------------------------------------------------------------------------------------------
# Jars: pom, cache, fetch
# --------------------------------------------------------------------------------------------


def pom_text() -> str:
    """The pom kept in the package (the Kafka version lives in its ``kafka.version`` property)."""
    return resources.files("kfast.testing").joinpath("kafka-pom.xml").read_text(encoding="utf-8")


def kafka_version(pom: str | None = None) -> str:
    """The ``kafka.version`` property of ``pom`` (default: the packaged pom)."""
    root = ET.fromstring(pom if pom is not None else pom_text())
    node = root.find(f"{_POM_NS}properties/{_POM_NS}kafka.version")
    if node is None or not (node.text or "").strip():
        raise ValueError("kafka-pom.xml has no <properties><kafka.version>")
    return (node.text or "").strip()


KAFKA_VERSION = kafka_version()


def pom_digest(pom: str) -> str:
    return hashlib.sha256(pom.encode("utf-8")).hexdigest()


def cache_root() -> Path:
    """``$KFAST_CACHE_DIR`` or ``~/.cache/kfast`` (honours ``XDG_CACHE_HOME``)."""
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kfast"


def jar_dir(version: str | None = None, root: Path | None = None) -> Path:
    """Where the jars of Kafka ``version`` are (or will be) cached."""
    return (root if root is not None else cache_root()) / f"kafka-{version or KAFKA_VERSION}"


def is_complete(directory: Path, pom: str | None = None) -> bool:
    """True when ``directory`` holds a complete copy made from ``pom`` (marker matches)."""
    marker = directory / MARKER
    try:
        recorded = marker.read_text(encoding="utf-8").strip()
    except OSError:
        return False
    expected = pom_digest(pom if pom is not None else pom_text())
    return recorded == expected and any(directory.glob("kafka_2.13-*.jar"))


def mvn_command(pom_path: Path, out_dir: Path, mvn: str = "mvn") -> list[str]:
    return [
        mvn,
        "-q",
        "-B",
        "-Dstyle.color=never",
        "-f",
        str(pom_path),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={out_dir}",
        "-DincludeScope=runtime",
    ]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def fetch_kafka(
    root: Path | None = None, *, mvn: str | None = None, pom: str | None = None, quiet: bool = True
) -> Path:
    """Make sure the broker jars are cached and return their directory.

    The jars are copied into a staging directory next to the final one, the marker (the pom's
    sha256) is written last, and the staging directory is renamed into place; concurrent
    callers (parallel test sessions) serialise on a lock file, so the cache is never seen
    half-written.
    """
    pom = pom if pom is not None else pom_text()
    version = kafka_version(pom)
    root = root if root is not None else cache_root()
    target = jar_dir(version, root)
    if is_complete(target, pom):
        return target
    mvn_path = mvn or shutil.which("mvn")
    if mvn_path is None:
        raise KafkaStartError(
            "Maven (`mvn`) is not on PATH: it is needed once to fetch Apache Kafka's jars "
            f"into {target}. Install Maven, or set {ENV_BOOTSTRAP} to use a running broker."
        )
    with _file_lock(root / f".kafka-{version}.lock"):
        if is_complete(target, pom):
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".kafka-{version}-", dir=root))
        try:
            pom_path = staging / "pom.xml"
            pom_path.write_text(pom, encoding="utf-8")
            cmd = mvn_command(pom_path, staging, mvn_path)
            proc = subprocess.run(
                cmd,
                cwd=staging,
                stdout=subprocess.PIPE if quiet else None,
                stderr=subprocess.STDOUT if quiet else None,
                text=True,
            )
            if proc.returncode != 0:
                out = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout or "")[-4000:]
                raise KafkaStartError(
                    f"`{' '.join(cmd)}` failed with exit code {proc.returncode} while fetching "
                    f"Apache Kafka {version} from Maven Central:\n{out}"
                )
            if not any(staging.glob("kafka_2.13-*.jar")):
                raise KafkaStartError(f"mvn finished but no kafka_2.13 jar is in {staging}")
            (staging / MARKER).write_text(pom_digest(pom) + "\n", encoding="utf-8")
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return target


ENV_CDS = "KFAST_KAFKA_CDS"


def cds_archive_path(jars: Path, java: str) -> Path:
    """Where the JVM class-data-sharing archive for ``java`` + these jars lives.

    A dynamic CDS archive (``-XX:ArchiveClassesAtExit``) of the broker's classes roughly halves
    JVM start-up (class loading dominates it).  It is only valid for one JVM build and one
    class path, so its name hashes the java binary (path, size, mtime) and the jar names.  The
    JVM itself validates the archive and silently runs without it on any mismatch.
    """
    real = Path(java).resolve()
    st = real.stat()
    h = hashlib.sha256(f"{real}|{st.st_size}|{st.st_mtime_ns}".encode())
    for jar in sorted(p.name for p in jars.glob("*.jar")):
        h.update(jar.encode())
    return jars / "cds" / f"kafka-{h.hexdigest()[:16]}.jsa"


def cds_enabled() -> bool:
    """Use (and record) the archive unless ``KFAST_KAFKA_CDS`` is 0/false/no/off."""
    return os.environ.get(ENV_CDS, "1").strip().lower() not in ("0", "false", "no", "off")


def cds_record_at_exit() -> bool:
    """Whether a broker started without an archive should record one when it stops.

    Recording costs about 10 s once (the JVM writes ~50 MB at exit) and pays off from the third
    or so session on a machine.  CI runners usually start fresh and run one session, so there
    (``CI`` set) it is left to ``fetch --cds`` or ``KFAST_KAFKA_CDS=1``.
    """
    if not cds_enabled():
        return False
    if os.environ.get(ENV_CDS, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    return not os.environ.get("CI")


# --------------------------------------------------------------------------------------------
# Broker configuration
# --------------------------------------------------------------------------------------------


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding (22 characters).

    Like Kafka's ``Uuid.randomUuid()``, never one that starts with ``-``: the storage tool's
    argument parser would take it for an option (1 in 64 random ids).
    """
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode("ascii")
        if not cid.startswith("-"):
            return cid


def server_properties(
    *,
    port: int,
    controller_port: int,
    log_dir: Path,
    node_id: int = 1,
    host: str = "127.0.0.1",
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """server.properties of a single-node combined broker+controller tuned for fast tests."""
    props: dict[str, str] = {
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        "controller.quorum.voters": f"{node_id}@{host}:{controller_port}",
        "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{host}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(log_dir),
        "num.partitions": "1",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "auto.create.topics.enable": "false",
        "delete.topic.enable": "true",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "4",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "4",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        # Let tests use short session timeouts (e.g. to evict a crashed member quickly).
        "group.min.session.timeout.ms": "1000",
        # KIP-848 groups (group.protocol=consumer): 1 s heartbeats instead of 5 s, so two
        # members settle in about 2 s instead of 10 s; crashed members leave after 10 s.
        "group.consumer.min.heartbeat.interval.ms": "500",
        "group.consumer.heartbeat.interval.ms": "1000",
        "group.consumer.min.session.timeout.ms": "3000",
        "group.consumer.session.timeout.ms": "10000",
        "num.network.threads": "2",
        "num.io.threads": "4",
        "num.recovery.threads.per.data.dir": "1",
        # 16 MiB instead of 128 MiB: less memory per broker (several sessions share a machine)
        # and a faster start; test topics are tiny.
        "log.cleaner.dedupe.buffer.size": str(16 << 20),
        "socket.request.max.bytes": str(200 * 1024 * 1024),
    }
    if extra:
        props.update({k: str(v) for k, v in extra.items()})
    return props


LOG4J2_PROPERTIES = """\
status = warn
appender.file.type = Console
appender.file.name = OUT
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.out.ref = OUT
logger.state.name = state.change.logger
logger.state.level = WARN
logger.controller.name = kafka.controller
logger.controller.level = WARN
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
"""


def _write_properties(path: Path, props: Mapping[str, str]) -> None:
    lines = [f"{k}={v}" for k, v in props.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


CLASSIC_GROUP_ONLY = ("session.timeout.ms", "heartbeat.interval.ms")


def consumer_config(bootstrap: str, group: str, **overrides: Any) -> dict[str, Any]:
    """A librdkafka consumer config suited to tests against the local broker.

    Manual commits, read from the beginning, fast heartbeats (classic-protocol rebalances settle
    in about a second).  ``overrides`` are librdkafka keys as they are, passed with
    ``**{"dotted.key": value}``; a value of ``None`` removes the key.  With
    ``group.protocol=consumer`` (KIP-848) the classic-only session and heartbeat settings are
    left out (librdkafka rejects them; the broker's group settings apply).
    """
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 500,
        "topic.metadata.refresh.interval.ms": 5000,
        "fetch.wait.max.ms": 100,
    }
    if overrides.get("group.protocol") == "consumer":
        for key in CLASSIC_GROUP_ONLY:
            conf.pop(key)
    for key, value in overrides.items():
        if value is None:
            conf.pop(key, None)
        else:
            conf[key] = value
    return conf


# --------------------------------------------------------------------------------------------
# The broker
# --------------------------------------------------------------------------------------------


class KafkaBroker(_proc.LocalService):
    """A single-node Apache Kafka (KRaft) broker on loopback, or an external one.

    Use as a context manager, or call :meth:`start` and :meth:`close`.  :meth:`stop` and
    :meth:`start` (and :meth:`restart`) keep the ports and the log dir, so data survives.

    ``bootstrap``: an external broker to use (default ``$KFAST_TEST_BOOTSTRAP``; ``""`` forces
    an own broker).  ``jars``: a directory of broker jars (default: :func:`fetch_kafka`).
    ``config``: extra ``server.properties`` entries.  ``heap``: the JVM's ``-Xmx``.
    """

    log_name = "broker.log"

    def __init__(
        self,
        *,
        bootstrap: str | None = None,
        jars: Path | None = None,
        heap: str = "1g",
        startup_timeout: float = 90.0,
        config: Mapping[str, str] | None = None,
        java: str | None = None,
        base_dir: Path | None = None,
    ) -> None:
        if bootstrap is None:
            bootstrap = os.environ.get(ENV_BOOTSTRAP) or None
        elif not bootstrap:
            bootstrap = None  # "": always run an own broker, whatever the environment says
        self.external = bootstrap is not None
        self._bootstrap = bootstrap
        self._jars = jars
        self.heap = heap
        self.startup_timeout = startup_timeout
        self._extra = dict(config or {})
        self._java_path = java
        self._base_dir = base_dir
        self.tmp_dir: Path | None = None
        self.port: int | None = None
        self.controller_port: int | None = None
        self.cluster_id: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._cds_target: Path | None = None
        self._force_cds = False
        self._producer: Any = None
        self._admin: Any = None
        self.timings: dict[str, float] = {}

    # -- properties ---------------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """``host:port`` for ``bootstrap.servers``."""
        if self._bootstrap is None:
            raise KafkaStartError("the broker has not been started")
        return self._bootstrap

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> KafkaBroker:
        """Start the broker (first time: fetch jars, format storage) and wait until it serves."""
        if self.external:
            self._wait_ready(time.monotonic() + self.startup_timeout, external=True)
            return self
        if self.running:
            return self
        if self.tmp_dir is None:
            self._first_start()
        else:
            self._launch()
            self._await_started()
        return self

    def _first_start(self) -> None:
        t0 = time.monotonic()
        jars = self._jars if self._jars is not None else fetch_kafka()
        self._jars = jars
        self.timings["fetch_s"] = time.monotonic() - t0
        _proc.sweep_stale_tmp_dirs("kfast-kafka-", self._base_dir)
        self.tmp_dir = _proc.make_owned_tmp_dir("kfast-kafka-", self._base_dir)
        _proc.register_cleanup(self, self._atexit)
        (self.tmp_dir / "log4j2.properties").write_text(
            LOG4J2_PROPERTIES.format(level="INFO"), encoding="utf-8"
        )
        (self.tmp_dir / "log4j2-tool.properties").write_text(
            LOG4J2_PROPERTIES.format(level="WARN"), encoding="utf-8"
        )
        last_error: KafkaStartError | None = None
        for _attempt in range(3):
            self.port, self.controller_port = _proc.free_ports(2)
            self._bootstrap = f"127.0.0.1:{self.port}"
            data = self.tmp_dir / "data"
            shutil.rmtree(data, ignore_errors=True)
            _write_properties(
                self.tmp_dir / "server.properties",
                server_properties(
                    port=self.port,
                    controller_port=self.controller_port,
                    log_dir=data,
                    extra=self._extra,
                ),
            )
            t1 = time.monotonic()
            self._format()
            self.timings["format_s"] = time.monotonic() - t1
            t2 = time.monotonic()
            self._launch()
            try:
                self._await_started()
            except KafkaStartError as exc:
                last_error = exc
                if "Address already in use" in self.log_tail(200):
                    self.stop()
                    continue  # someone took a port between picking and binding: new ports
                raise
            self.timings["start_s"] = time.monotonic() - t2
            self.timings["total_s"] = time.monotonic() - t0
            return
        assert last_error is not None
        raise last_error

    def _java(self, *jvm_options: str, record_cds: bool = True) -> list[str]:
        """``java <options> -cp 'jars/*'`` (the main class and its arguments follow)."""
        java = self._java_path or shutil.which("java")
        if java is None:
            raise KafkaStartError("`java` (Java 17+) is not on PATH; the Kafka broker needs it")
        assert self._jars is not None
        cds = self._cds_options(java, record_cds)
        return [java, *cds, *jvm_options, "-cp", str(self._jars / "*")]

    def _cds_options(self, java: str, record: bool) -> list[str]:
        """Use the class-data-sharing archive if there is one; else record one at exit."""
        if not cds_enabled() or self._jars is None or self.tmp_dir is None:
            return []
        archive = cds_archive_path(self._jars, java)
        if archive.is_file():
            return [f"-XX:SharedArchiveFile={archive}", "-Xshare:auto"]
        if record and self._cds_target is None and (self._force_cds or cds_record_at_exit()):
            # Only the broker records (its run loads every class); stop() publishes it.
            self._cds_target = archive
            return [f"-XX:ArchiveClassesAtExit={self.tmp_dir / 'kafka.jsa'}"]
        return []

    def _publish_cds_archive(self) -> None:
        """Move the archive the JVM wrote at exit into the jar cache (atomically)."""
        target, self._cds_target = self._cds_target, None
        if target is None or self.tmp_dir is None:
            return
        dumped = self.tmp_dir / "kafka.jsa"
        try:
            if dumped.stat().st_size == 0 or target.exists():
                return
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = target.with_name(f".{target.name}.{os.getpid()}")
            shutil.copyfile(dumped, staging)
            os.replace(staging, target)
        except OSError:
            return
        finally:
            with contextlib.suppress(OSError):
                dumped.unlink()

    def _format(self) -> None:
        assert self.tmp_dir is not None
        self.cluster_id = new_cluster_id()
        cmd = [
            *self._java(
                "-Xmx256m",
                "-XX:TieredStopAtLevel=1",
                "-XX:+UseSerialGC",
                f"-Dlog4j2.configurationFile={self.tmp_dir / 'log4j2-tool.properties'}",
                record_cds=False,
            ),
            "kafka.tools.StorageTool",
            "format",
            "--cluster-id",
            self.cluster_id,
            "--config",
            str(self.tmp_dir / "server.properties"),
        ]
        proc = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120
        )
        (self.tmp_dir / "format.log").write_text(proc.stdout or "", encoding="utf-8")
        if proc.returncode != 0:
            raise KafkaStartError(
                f"kafka.tools.StorageTool format failed (exit {proc.returncode}):\n"
                + "\n".join((proc.stdout or "").splitlines()[-30:])
            )

    def _launch(self) -> None:
        assert self.tmp_dir is not None and self._jars is not None
        argv = [
            *self._java(
                f"-Xmx{self.heap}",
                "-Xms128m",
                "-XX:+UseSerialGC",
                "-XX:+ExitOnOutOfMemoryError",
                "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={self.tmp_dir / 'log4j2.properties'}",
                f"-Dkafka.logs.dir={self.tmp_dir}",
            ),
            "kafka.Kafka",
            str(self.tmp_dir / "server.properties"),
        ]
        if self._log_file is not None:
            self._log_file.close()
        self._log_file = open(self.tmp_dir / "broker.log", "ab")
        self._log_file.write(f"\n===== kfast: starting {' '.join(argv)}\n".encode())
        self._log_file.flush()
        self._proc = _proc.spawn(
            _proc.with_parent_death_signal(argv, "TERM"),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.tmp_dir,
            start_new_session=True,
        )

    def _await_started(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        try:
            self._wait_ready(deadline)
        except KafkaStartError:
            self.stop()
            raise

    def _wait_ready(self, deadline: float, external: bool = False) -> None:
        from confluent_kafka.admin import AdminClient

        host, _, port = self.bootstrap.rpartition(":")
        alive = (lambda: True) if external else (lambda: self.running)
        if not _proc.wait_for_port(host, int(port), deadline, alive):
            raise self._start_error("did not open its port")
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        while time.monotonic() < deadline:
            if not alive():
                break
            try:
                md = admin.list_topics(timeout=1.0)
                if md.brokers:
                    return
            except Exception:  # KafkaException while the broker is still coming up
                pass
            time.sleep(0.1)
        raise self._start_error("did not answer a metadata request")

    def _start_error(self, what: str) -> KafkaStartError:
        if self.external:
            return KafkaStartError(
                f"the external Kafka broker {self._bootstrap} ({ENV_BOOTSTRAP}) {what} "
                f"within {self.startup_timeout:.0f} s"
            )
        state = self.process_state
        return KafkaStartError(
            f"Apache Kafka {KAFKA_VERSION} on {self._bootstrap} {what} within "
            f"{self.startup_timeout:.0f} s (the JVM {state}). Log {self.log_path}, last lines:\n"
            + self.log_tail(40)
        )

    def _close_clients(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                producer.flush(0)
        self._admin = None

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after ``timeout``); keeps ports and data."""
        if self.external:
            return
        self._close_clients()
        if self._proc is not None:
            _proc.stop_process(self._proc, signal.SIGTERM, timeout)
            self._proc = None
        self._publish_cds_archive()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def kill(self) -> None:
        """SIGKILL the broker (a crash); :meth:`start` recovers from the same log dir."""
        if self.external:
            raise KafkaStartError(f"cannot kill the external broker {ENV_BOOTSTRAP}")
        self._close_clients()
        if self._proc is not None:
            _proc.stop_process(self._proc, signal.SIGKILL, 10)
            self._proc = None

    def restart(self, downtime: float = 0.0) -> None:
        """Stop, stay down ``downtime`` seconds, start again on the same ports and log dir."""
        if self.external:
            raise KafkaStartError(
                f"restart() is not possible with an external broker ({ENV_BOOTSTRAP}="
                f"{self._bootstrap}); unset it to let kfast.testing run its own broker"
            )
        self.stop()
        if downtime > 0:
            time.sleep(downtime)
        self.start()

    def close(self) -> None:
        """Stop the broker and delete its temporary directory."""
        if self.external:
            return
        self.stop()
        _proc.unregister_cleanup(self)
        if self.tmp_dir is not None:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            self.tmp_dir = None

    def _atexit(self) -> None:
        if self._proc is not None:
            _proc.stop_process(self._proc, signal.SIGTERM, 10)
        if self.tmp_dir is not None:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    # -- helpers --------------------------------------------------------------------------------

    def admin(self) -> Any:
        """A cached ``confluent_kafka.admin.AdminClient`` for this broker."""
        if self._admin is None:
            from confluent_kafka.admin import AdminClient

            self._admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 3})
        return self._admin

    def consumer_config(self, group: str, **overrides: Any) -> dict[str, Any]:
        """See :func:`consumer_config`."""
        return consumer_config(self.bootstrap, group, **overrides)

    def create_topic(
        self,
        name: str,
        partitions: int = 1,
        config: Mapping[str, str] | None = None,
        *,
        timeout: float = 30.0,
    ) -> str:
        """Create ``name`` and wait until metadata shows every partition with a leader."""
        from confluent_kafka.admin import NewTopic

        admin = self.admin()
        topic = NewTopic(
            name,
            num_partitions=partitions,
            replication_factor=1,
            config=dict(config or {}),
        )
        futures = admin.create_topics([topic], operation_timeout=timeout, request_timeout=timeout)
        futures[name].result(timeout=timeout)
        deadline = time.monotonic() + timeout
        while True:
            md = admin.list_topics(topic=name, timeout=5)
            t = md.topics.get(name)
            if (
                t is not None
                and t.error is None
                and len(t.partitions) == partitions
                and all(p.leader >= 0 and p.error is None for p in t.partitions.values())
            ):
                return name
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {name!r}: partitions without leaders after {timeout} s")
            time.sleep(0.05)

    def delete_topic(self, name: str, *, timeout: float = 30.0) -> None:
        """Delete ``name`` and wait until metadata no longer shows it."""
        admin = self.admin()
        futures = admin.delete_topics([name], operation_timeout=timeout, request_timeout=timeout)
        futures[name].result(timeout=timeout)
        deadline = time.monotonic() + timeout
        while name in admin.list_topics(timeout=5).topics:
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {name!r} still listed {timeout} s after deletion")
            time.sleep(0.05)

    def _get_producer(self) -> Any:
        if self._producer is None:
            from confluent_kafka import Producer

            self._producer = Producer(
                {
                    "bootstrap.servers": self.bootstrap,
                    "linger.ms": 5,
                    "batch.num.messages": 10000,
                    "batch.size": 1 << 20,
                    "queue.buffering.max.messages": 200000,
                    "queue.buffering.max.kbytes": 256 * 1024,
                    "enable.idempotence": True,
                    "acks": "all",
                    "log_level": 3,
                }
            )
        return self._producer

    def produce(
        self,
        topic: str,
        values: Sequence[bytes | str | None],
        keys: Sequence[bytes | str | None] | None = None,
        partition: int | None = None,
        headers: Sequence[Sequence[Header] | None] | None = None,
        *,
        timeout: float = 60.0,
    ) -> int:
        """Produce ``values`` (with per-message ``keys``/``headers``) and wait for delivery.

        ``partition=None`` lets the partitioner choose (by key).  Messages to one partition keep
        their order (idempotent producer).  Returns the number delivered; raises
        ``confluent_kafka.KafkaException`` on the first delivery error.
        """
        from confluent_kafka import KafkaError, KafkaException

        n = len(values)
        if keys is not None and len(keys) != n:
            raise ValueError(f"keys has {len(keys)} items for {n} values")
        if headers is not None and len(headers) != n:
            raise ValueError(f"headers has {len(headers)} items for {n} values")
        producer = self._get_producer()
        errors: list[KafkaError] = []
        delivered = 0

        def on_delivery(err: KafkaError | None, _msg: Any) -> None:
            nonlocal delivered
            if err is not None:
                errors.append(err)
            else:
                delivered += 1

        kwargs: dict[str, Any] = {"on_delivery": on_delivery}
        if partition is not None:
            kwargs["partition"] = partition
        for i in range(n):
            if keys is not None:
                kwargs["key"] = keys[i]
            if headers is not None:
                h = headers[i]
                if h is not None:
                    kwargs["headers"] = list(h)
                else:
                    kwargs.pop("headers", None)
            while True:
                try:
                    producer.produce(topic, values[i], **kwargs)
                    break
                except BufferError:
                    producer.poll(0.05)
            if errors:
                break
            if i & 1023 == 0:
                producer.poll(0)
        remaining = producer.flush(timeout)
        if errors:
            raise KafkaException(errors[0])
        if remaining:
            raise TimeoutError(f"{remaining} messages to {topic!r} not delivered in {timeout} s")
        return delivered


def prepare_cds_archive(jars: Path | None = None) -> Path | None:
    """Record the class-data-sharing archive now (a short broker run), if it is missing.

    Returns the archive's path, or None when CDS is disabled or the JVM did not write one.
    """
    jars = jars if jars is not None else fetch_kafka()
    java = shutil.which("java")
    if not cds_enabled() or java is None:
        return None
    archive = cds_archive_path(jars, java)
    if archive.is_file():
        return archive
    broker = KafkaBroker(bootstrap="", jars=jars)
    broker._force_cds = True
    with broker:
        from confluent_kafka import Consumer

        # Exercise produce, fetch and group coordination so their classes get archived too.
        broker.create_topic("kfast-cds-warmup", partitions=2)
        broker.produce("kfast-cds-warmup", [b"x"] * 100)
        consumer = Consumer(broker.consumer_config("kfast-cds-warmup"))
        try:
            consumer.subscribe(["kfast-cds-warmup"])
            got, deadline = 0, time.monotonic() + 30
            while got < 100 and time.monotonic() < deadline:
                got += len(consumer.consume(100, 0.5))
            with contextlib.suppress(Exception):
                consumer.commit(asynchronous=False)
        finally:
            consumer.close()
    return archive if archive.is_file() else None


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kfast.testing.kafka",
        description="Fetch Apache Kafka's jars or run a throwaway broker.",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    fetch = sub.add_parser("fetch", help="download the broker jars into the cache (no broker)")
    fetch.add_argument(
        "--cds",
        action="store_true",
        help="also record the JVM class-data-sharing archive now (a short broker run)",
    )
    run = sub.add_parser("run", help="run a broker in the foreground until Ctrl-C")
    run.add_argument("--topic", action="append", default=[], help="NAME[:PARTITIONS] to create")
    args = parser.parse_args(argv)

    if args.cmd == "fetch":
        t0 = time.monotonic()
        if not is_complete(jar_dir()):
            print(
                f"Fetching Apache Kafka {KAFKA_VERSION} with mvn into {jar_dir()} ...", flush=True
            )
        path = fetch_kafka()
        print(f"Apache Kafka {KAFKA_VERSION} jars in {path} ({time.monotonic() - t0:.1f} s)")
        java = shutil.which("java")
        if args.cds and cds_enabled() and java and not cds_archive_path(path, java).exists():
            print("Recording the JVM class-data-sharing archive (one broker run) ...", flush=True)
        if args.cds:
            t1 = time.monotonic()
            archive = prepare_cds_archive(path)
            if archive is not None:
                print(f"JVM class-data-sharing archive {archive} ({time.monotonic() - t1:.1f} s)")
        return 0

    stop = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with KafkaBroker() as broker:
        for spec in args.topic:
            name, _, parts = spec.partition(":")
            broker.create_topic(name, int(parts or 1))
        print(broker.bootstrap, flush=True)
        print(
            f"Apache Kafka {KAFKA_VERSION} running (pid {broker.pid}, log {broker.log_path}); "
            f"started in {broker.timings.get('total_s', 0):.1f} s. Ctrl-C to stop.",
            file=sys.stderr,
            flush=True,
        )
        while not stop and broker.running:
            time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
