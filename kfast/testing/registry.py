"""A real, throwaway schema registry for tests: Apicurio Registry with its Confluent-compatible API.

Apicurio Registry's ``-all`` distribution (``io.apicurio:apicurio-registry-app:<version>`` as
``tar.gz``, classifier ``all``: a Quarkus runner jar and its ``lib/``) comes from Maven Central
through the machine's ``mvn``, once, into ``~/.cache/kfast/apicurio-registry-<version>`` (moved by
``KFAST_CACHE_DIR``). 3.0.x runs on Java 17 (3.3.x needs Java 21).

Each :class:`SchemaRegistry` runs ``java -jar`` on a free loopback port with H2 storage in a file
of its temporary directory, so :meth:`SchemaRegistry.stop` / :meth:`SchemaRegistry.start` (and
:meth:`SchemaRegistry.restart`) keep every registered schema and its id, like a real registry
restarting. The Confluent-compatible API is at :attr:`SchemaRegistry.url`
(``http://127.0.0.1:PORT/apis/ccompat/v7``), what confluent-kafka's ``SchemaRegistryClient`` and
kfast's decoders are given.

``KFAST_TEST_REGISTRY=URL`` (a Confluent-compatible API) makes :class:`SchemaRegistry` use that
registry instead (start and stop do nothing then, restart raises).

Command line::

    python -m kfast.testing.registry fetch   # download the distribution only
    python -m kfast.testing.registry run     # run a registry in the foreground, print its URL
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kfast.testing import _proc
from kfast.testing.kafka import _file_lock, cache_root

__all__ = [
    "REGISTRY_VERSION",
    "RegistryStartError",
    "SchemaRegistry",
    "fetch_registry",
    "registry_dir",
]

REGISTRY_VERSION = "3.0.9"
ENV_REGISTRY = "KFAST_TEST_REGISTRY"
MARKER = ".kfast-complete"
CCOMPAT_PATH = "/apis/ccompat/v7"

# The app's pom names a parent pom (io.apicurio:apicurio-registry) that Maven Central does not
# serve for every release, and Maven refuses to resolve an artifact whose descriptor has no
# parent. The distribution itself needs nothing from it (no transitive dependencies are used), so
# the fetch runs against a private, throwaway local repository holding this stand-in parent.
_STUB_PARENT = """<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>io.apicurio</groupId>
  <artifactId>apicurio-registry</artifactId>
  <version>{version}</version>
  <packaging>pom</packaging>
</project>
"""


class RegistryStartError(RuntimeError):
    """The registry (or its distribution) could not be made available; the message says why."""


def registry_dir(version: str = REGISTRY_VERSION, root: Path | None = None) -> Path:
    """Where the distribution of Apicurio Registry ``version`` is (or will be) cached."""
    return (root if root is not None else cache_root()) / f"apicurio-registry-{version}"


def _runner_jar(directory: Path) -> Path | None:
    found = sorted(directory.glob("apicurio-registry-app-*-runner.jar"))
    return found[0] if found else None


def is_complete(directory: Path, version: str = REGISTRY_VERSION) -> bool:
    try:
        recorded = (directory / MARKER).read_text(encoding="utf-8").strip()
    except OSError:
        return False
    return recorded == version and _runner_jar(directory) is not None


def mvn_command(repo: Path, out_dir: Path, version: str, mvn: str = "mvn") -> list[str]:
    return [
        mvn,
        "-q",
        "-B",
        "-Dstyle.color=never",
        f"-Dmaven.repo.local={repo}",
        "org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy",
        f"-Dartifact=io.apicurio:apicurio-registry-app:{version}:tar.gz:all",
        f"-DoutputDirectory={out_dir}",
    ]


def fetch_registry(
    root: Path | None = None,
    *,
    version: str = REGISTRY_VERSION,
    mvn: str | None = None,
    quiet: bool = True,
) -> Path:
    """Make sure the registry distribution is cached and unpacked; return its directory.

    Staged next to the final directory, the marker written last, then renamed into place under a
    lock file, so concurrent sessions never see it half-written.
    """
    root = root if root is not None else cache_root()
    target = registry_dir(version, root)
    if is_complete(target, version):
        return target
    mvn_path = mvn or shutil.which("mvn")
    if mvn_path is None:
        raise RegistryStartError(
            "Maven (`mvn`) is not on PATH: it is needed once to fetch Apicurio Registry into "
            f"{target}. Install Maven, or set {ENV_REGISTRY} to use a running registry."
        )
    with _file_lock(root / f".apicurio-registry-{version}.lock"):
        if is_complete(target, version):
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".apicurio-registry-{version}-", dir=root))
        try:
            repo = staging / "m2"
            parent = repo / "io" / "apicurio" / "apicurio-registry" / version
            parent.mkdir(parents=True)
            (parent / f"apicurio-registry-{version}.pom").write_text(
                _STUB_PARENT.format(version=version), encoding="utf-8"
            )
            download = staging / "download"
            cmd = mvn_command(repo, download, version, mvn_path)
            proc = subprocess.run(
                cmd,
                cwd=staging,
                stdout=subprocess.PIPE if quiet else None,
                stderr=subprocess.STDOUT if quiet else None,
                text=True,
            )
            archives = sorted(download.glob("*.tar.gz")) if download.exists() else []
            if proc.returncode != 0 or not archives:
                out = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout or "")[-4000:]
                raise RegistryStartError(
                    f"`{' '.join(cmd)}` failed (exit code {proc.returncode}) while fetching "
                    f"Apicurio Registry {version} from Maven Central:\n{out}"
                )
            dist = staging / "dist"
            with tarfile.open(archives[0]) as tar:
                if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
                    tar.extractall(dist, filter="data")
                else:  # pragma: no cover - older patch releases
                    tar.extractall(dist)
            if _runner_jar(dist) is None:
                raise RegistryStartError(
                    f"no *-runner.jar in the Apicurio Registry {version} tar.gz"
                )
            (dist / MARKER).write_text(version + "\n", encoding="utf-8")
            if target.exists():
                shutil.rmtree(target)
            os.replace(dist, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _get(url: str, timeout: float) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class SchemaRegistry(_proc.LocalService):
    """Apicurio Registry on loopback (Confluent-compatible API at :attr:`url`), or an external one.

    Use as a context manager, or call :meth:`start` and :meth:`close`. :meth:`stop` and
    :meth:`start` keep the port and the stored schemas. ``url``: an external registry (default
    ``$KFAST_TEST_REGISTRY``; ``""`` forces an own one). ``heap``: the JVM's ``-Xmx``.
    """

    log_name = "registry.log"

    def __init__(
        self,
        *,
        url: str | None = None,
        dist: Path | None = None,
        heap: str = "384m",
        startup_timeout: float = 90.0,
        java: str | None = None,
        base_dir: Path | None = None,
    ) -> None:
        if url is None:
            url = os.environ.get(ENV_REGISTRY) or None
        elif not url:
            url = None
        self.external = url is not None
        self._url = url.rstrip("/") if url else None
        self._dist = dist
        self.heap = heap
        self.startup_timeout = startup_timeout
        self._java_path = java
        self._base_dir = base_dir
        self.tmp_dir: Path | None = None
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self.timings: dict[str, float] = {}

    @property
    def url(self) -> str:
        """The Confluent-compatible API, e.g. ``http://127.0.0.1:PORT/apis/ccompat/v7``."""
        if self._url is None:
            raise RegistryStartError("the registry has not been started")
        return self._url

    def client(self, **conf: Any) -> Any:
        """A confluent-kafka ``SchemaRegistryClient`` for this registry (``conf`` is added)."""
        from confluent_kafka.schema_registry import SchemaRegistryClient

        return SchemaRegistryClient({"url": self.url, **conf})

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> SchemaRegistry:
        """Start the registry (first time: fetch the distribution) and wait until it answers."""
        if self.external:
            self._wait_ready(time.monotonic() + self.startup_timeout)
            return self
        if self.running:
            return self
        t0 = time.monotonic()
        if self.tmp_dir is None:
            self._dist = self._dist if self._dist is not None else fetch_registry()
            self.timings["fetch_s"] = time.monotonic() - t0
            _proc.sweep_stale_tmp_dirs("kfast-registry-", self._base_dir)
            self.tmp_dir = _proc.make_owned_tmp_dir("kfast-registry-", self._base_dir)
            _proc.register_cleanup(self, self._atexit)
            self.port = _proc.free_port()
            self._url = f"http://127.0.0.1:{self.port}{CCOMPAT_PATH}"
        t1 = time.monotonic()
        self._launch()
        try:
            self._wait_ready(time.monotonic() + self.startup_timeout)
        except RegistryStartError:
            self.stop()
            raise
        self.timings["start_s"] = time.monotonic() - t1
        self.timings["total_s"] = time.monotonic() - t0
        return self

    def _launch(self) -> None:
        assert self.tmp_dir is not None and self._dist is not None and self.port is not None
        java = self._java_path or shutil.which("java")
        if java is None:
            raise RegistryStartError("`java` (Java 17+) is not on PATH; Apicurio Registry needs it")
        jar = _runner_jar(self._dist)
        if jar is None:
            raise RegistryStartError(f"no Apicurio Registry runner jar in {self._dist}")
        argv = [
            java,
            f"-Xmx{self.heap}",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",  # start-up and low CPU matter more than peak speed here
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            "-Dquarkus.http.host=127.0.0.1",
            f"-Dquarkus.http.port={self.port}",
            f"-Dapicurio.datasource.url=jdbc:h2:file:{self.tmp_dir / 'db' / 'registry'}",
            "-jar",
            str(jar),
        ]
        if self._log_file is not None:
            self._log_file.close()
        self._log_file = open(self.tmp_dir / self.log_name, "ab")
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

    def _wait_ready(self, deadline: float) -> None:
        probe = f"{self.url}/subjects"
        while time.monotonic() < deadline:
            if not self.running:
                break
            try:
                status, _ = _get(probe, timeout=2.0)
                if status == 200:
                    return
            except OSError:
                pass  # not listening yet
            time.sleep(0.1)
        if self.external:
            raise RegistryStartError(
                f"the external schema registry {self._url} ({ENV_REGISTRY}) did not answer "
                f"GET /subjects within {self.startup_timeout:.0f} s"
            )
        state = self.process_state
        raise RegistryStartError(
            f"Apicurio Registry {REGISTRY_VERSION} on {self._url} did not answer within "
            f"{self.startup_timeout:.0f} s (the JVM {state}). Log {self.log_path}, last lines:\n"
            + self.log_tail(40)
        )

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the registry (SIGTERM, then SIGKILL); keeps the port and the stored schemas."""
        if self.external:
            return
        if self._proc is not None:
            _proc.stop_process(self._proc, signal.SIGTERM, timeout)
            self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def restart(self, downtime: float = 0.0) -> None:
        """Stop, stay down ``downtime`` seconds, start again on the same port and storage."""
        if self.external:
            raise RegistryStartError(
                f"restart() is not possible with an external registry ({ENV_REGISTRY})"
            )
        self.stop()
        if downtime > 0:
            time.sleep(downtime)
        self.start()

    def close(self) -> None:
        """Stop the registry and delete its temporary directory."""
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

    def register(
        self,
        subject: str,
        schema: str,
        schema_type: str = "AVRO",
        references: Sequence[dict[str, Any]] = (),
    ) -> int:
        """Register ``schema`` under ``subject`` (Confluent API) and return its schema id."""
        body: dict[str, Any] = {"schema": schema, "schemaType": schema_type}
        if references:
            body["references"] = list(references)
        req = urllib.request.Request(
            f"{self.url}/subjects/{subject}/versions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/vnd.schemaregistry.v1+json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return int(json.loads(resp.read())["id"])
        except urllib.error.HTTPError as exc:
            raise RegistryStartError(
                f"registering {subject} failed: HTTP {exc.code} {exc.read()[:500]!r}"
            ) from None


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kfast.testing.registry")
    parser.add_argument("command", choices=["fetch", "run"])
    args = parser.parse_args(argv)
    if args.command == "fetch":
        t0 = time.monotonic()
        where = fetch_registry(quiet=False)
        print(f"Apicurio Registry {REGISTRY_VERSION} in {where} ({time.monotonic() - t0:.1f} s)")
        return 0
    with SchemaRegistry(url="") as reg:
        print(reg.url, flush=True)

        def on_signal(_signum: int, _frame: object) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, on_signal)
        with contextlib.suppress(KeyboardInterrupt):
            while reg.running:
                time.sleep(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
