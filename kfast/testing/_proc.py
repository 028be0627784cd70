"""Process and port helpers shared by the Kafka and PostgreSQL test services.

Everything here is about not leaking anything: child servers are started in their own session
(so a Ctrl-C in the terminal does not kill them behind the test session's back), with a
parent-death signal when ``setpriv`` is available (so a SIGKILLed test session does not leave an
orphan JVM or postmaster), and are stopped from an ``atexit`` hook as a last resort.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "OWNER_FILE",
    "child_pids",
    "free_port",
    "free_ports",
    "log_tail",
    "make_owned_tmp_dir",
    "register_cleanup",
    "spawn",
    "stop_process",
    "sweep_stale_tmp_dirs",
    "unregister_cleanup",
    "wait_for_port",
    "with_parent_death_signal",
]

OWNER_FILE = "kfast-owner.pid"

_cleanups: dict[int, Callable[[], None]] = {}
_cleanup_lock = threading.Lock()
_atexit_installed = False


def _run_cleanups() -> None:
    with _cleanup_lock:
        items = list(_cleanups.values())
        _cleanups.clear()
    for fn in reversed(items):
        with contextlib.suppress(Exception):
            fn()


def register_cleanup(owner: object, fn: Callable[[], None]) -> None:
    """Run ``fn`` at interpreter exit unless ``unregister_cleanup(owner)`` is called first."""
    global _atexit_installed
    with _cleanup_lock:
        if not _atexit_installed:
            atexit.register(_run_cleanups)
            _atexit_installed = True
        _cleanups[id(owner)] = fn


def unregister_cleanup(owner: object) -> None:
    with _cleanup_lock:
        _cleanups.pop(id(owner), None)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Return ``count`` distinct TCP ports that are free on ``host`` right now.

    All sockets are held open until every port is chosen, so the ports are distinct.  Another
    process may still take a port before the server binds it; callers retry on bind errors.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def port_is_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(
    host: str,
    port: int,
    deadline: float,
    alive: Callable[[], bool] = lambda: True,
) -> bool:
    """Poll until ``host:port`` accepts connections, ``alive()`` is false or ``deadline`` passes."""
    while time.monotonic() < deadline:
        if not alive():
            return False
        if port_is_open(host, port):
            return True
        time.sleep(0.05)
    return False


def with_parent_death_signal(argv: Sequence[str], sig: str, user: str | None = None) -> list[str]:
    """Prefix ``argv`` so that the child gets ``sig`` when this process dies (and runs as ``user``).

    Uses util-linux ``setpriv``, which sets the credentials and the parent-death signal and then
    execs ``argv`` (no intermediate process, so the pid we hold is the server's).  Without
    setpriv the command runs unchanged (or through ``runuser`` when a user switch is needed);
    the atexit hook is then the only protection against orphans.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        prefix = [setpriv]
        if user is not None:
            prefix += [f"--reuid={user}", f"--regid={user}", "--init-groups"]
        prefix += ["--pdeathsig", sig, "--"]
        return prefix + list(argv)
    if user is not None:
        runuser = shutil.which("runuser")
        if runuser is not None:
            return [runuser, "-u", user, "--", *argv]
        import shlex

        return ["su", user, "-s", "/bin/sh", "-c", shlex.join(argv)]
    return list(argv)


def stop_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 20.0
) -> int | None:
    """Send ``sig``, wait up to ``timeout`` seconds, then SIGKILL. Returns the exit code."""
    if proc.poll() is not None:
        return proc.returncode
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        return proc.wait(timeout=10)


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux ``/proc``; empty elsewhere)."""
    out: list[int] = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            data = stat_file.read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may contain spaces and parentheses.
        fields = data[data.rfind(")") + 2 :].split()
        if len(fields) > 1 and fields[1] == str(pid):
            out.append(int(stat_file.parent.name))
    return out


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file ('' when it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_owned_tmp_dir(prefix: str, base: Path | None = None) -> Path:
    """``mkdtemp`` plus a file naming this process, so later runs can sweep it if we crash."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    (path / OWNER_FILE).write_text(f"{os.getpid()}\n", encoding="ascii")
    return path


def sweep_stale_tmp_dirs(prefix: str, base: Path | None = None, min_age: float = 60.0) -> int:
    """Delete ``<base>/<prefix>*`` directories left by test processes that no longer exist.

    Only directories with an owner file whose pid is dead and older than ``min_age`` seconds
    are removed (a SIGKILLed session cannot clean up after itself; its servers died with it
    through the parent-death signal).  Returns how many were removed.
    """
    import tempfile

    root = base if base is not None else Path(tempfile.gettempdir())
    removed = 0
    now = time.time()
    for d in root.glob(prefix + "*"):
        owner = d / OWNER_FILE
        try:
            pid = int(owner.read_text(encoding="ascii").strip())
            if _pid_alive(pid) or now - owner.stat().st_mtime < min_age:
                continue
        except (OSError, ValueError):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed += not d.exists()
    return removed


# -- spawning from a thread that lives as long as the process -----------------------------------
#
# Linux delivers the parent-death signal when the *thread* that forked the child exits, not the
# process.  A server started (or restarted) from a short-lived thread, e.g. a threading.Timer
# that brings the database back after an outage, would be killed as soon as that thread ends.
# So every long-lived server is forked by one daemon thread that never exits: the signal then
# fires only when the whole process dies.

_spawn_queue: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
_spawner: threading.Thread | None = None
_spawner_lock = threading.Lock()


def _spawner_main() -> None:
    while True:
        fn, fut = _spawn_queue.get()
        if not fut.set_running_or_notify_cancel():
            continue
        try:
            fut.set_result(fn())
        except BaseException as exc:
            fut.set_exception(exc)


def spawn(argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(argv, **popen_kwargs)``, forked by the process-lifetime spawner thread."""
    global _spawner
    if threading.current_thread() is _spawner:
        return subprocess.Popen(list(argv), **popen_kwargs)
    with _spawner_lock:
        if _spawner is None or not _spawner.is_alive():
            _spawner = threading.Thread(target=_spawner_main, name="kfast-spawner", daemon=True)
            _spawner.start()
    fut: Future[subprocess.Popen[bytes]] = Future()
    _spawn_queue.put((lambda: subprocess.Popen(list(argv), **popen_kwargs), fut))
    return fut.result()


_S = TypeVar("_S", bound="LocalService")


class LocalService:
    """What the Kafka and PostgreSQL launchers share: a child process (or an
    external service named by an environment variable), its log, and the
    context-manager protocol. Subclasses set ``external``, ``tmp_dir``,
    ``_proc`` and ``log_name`` and implement ``start`` and ``close``."""

    log_name = "service.log"
    external: bool
    tmp_dir: Path | None
    _proc: subprocess.Popen[bytes] | None

    def start(self: _S) -> _S:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    @property
    def log_path(self) -> Path | None:
        return self.tmp_dir / self.log_name if self.tmp_dir is not None else None

    @property
    def running(self) -> bool:
        if self.external:
            return True
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def process_state(self) -> str:
        """``"exited with code N"`` or ``"is still running"``, for start-up errors."""
        code = self._proc.poll() if self._proc is not None else None
        return f"exited with code {code}" if code is not None else "is still running"

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines) if self.log_path is not None else ""

    def __enter__(self: _S) -> _S:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
