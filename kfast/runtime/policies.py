"""Runtime policies: how big a batch may get and how much the ring may hold.

Policies are frozen dataclasses validated in ``__post_init__``; a mistake
raises :class:`kfast.ConfigError` naming the field and its allowed range.
Byte sizes accept an ``int`` or a string such as ``"64MiB"``, ``"512KiB"``,
``"1GB"`` and are normalised to ``int`` bytes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from kfast.errors import ConfigError

__all__ = ["BatchPolicy", "BufferPolicy", "parse_size", "parse_duration"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")

# Sizes above this are certainly a typo (and overflow C ssize_t arithmetic
# on 32-bit builds long before); the ring caps itself at 2**31 - 1 bytes.
MAX_SIZE = 1 << 40


def parse_size(value: Any, field: str) -> int:
    """``int`` bytes from an int or a string like ``"256MiB"``; names ``field`` on error."""
    if isinstance(value, bool):
        raise ConfigError(
            f"{field}: expected a size in bytes or a string like '64MiB', got {value!r}"
        )
    if isinstance(value, int):
        n = value
    elif isinstance(value, float) and value.is_integer():
        n = int(value)
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ConfigError(
                f"{field}: cannot parse size {value!r} (use bytes or a unit: "
                "B, KB, MB, GB, KiB, MiB, GiB)"
            )
        n = int(float(m.group(1)) * _UNITS[unit])
    else:
        raise ConfigError(
            f"{field}: expected a size in bytes or a string like '64MiB', "
            f"got {type(value).__name__}"
        )
    if n < 0 or n > MAX_SIZE:
        raise ConfigError(f"{field}: {n} bytes is out of range [0, {MAX_SIZE}]")
    return n


def parse_duration(value: Any, field: str) -> float:
    """Seconds as ``float`` from a number or a string like ``"50ms"``, ``"2s"``, ``"1m"``."""
    if isinstance(value, bool):
        raise ConfigError(f"{field}: expected seconds, got {value!r}")
    if isinstance(value, (int, float)):
        s = float(value)
    elif isinstance(value, str):
        m = re.match(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*$", value)
        if m is None:
            raise ConfigError(f"{field}: cannot parse duration {value!r} (e.g. 50ms, 2s, 1m)")
        s = float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[m.group(2) or "s"]
    else:
        raise ConfigError(f"{field}: expected seconds, got {type(value).__name__}")
    if math.isnan(s) or s < 0:
        raise ConfigError(f"{field}: {value!r} must be >= 0 seconds")
    return s


def _check_int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}: expected an integer in [{lo}, {hi}], got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{name}: {value} is out of range [{lo}, {hi}]")
    return value


def _check_size(name: str, value: Any, lo: int, hi: int) -> int:
    n = parse_size(value, name)
    if not lo <= n <= hi:
        raise ConfigError(f"{name}: {n} bytes is out of range [{lo}, {hi}]")
    return n


def _check_fraction(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}: expected a number in [{lo}, {hi}], got {value!r}")
    v = float(value)
    if not lo <= v <= hi:
        raise ConfigError(f"{name}: {value} is out of range [{lo}, {hi}]")
    return v


@dataclass(frozen=True)
class BatchPolicy:
    """When the worker closes a batch: at ``max_rows`` messages, ``max_bytes``
    of payload, or ``max_wait`` seconds after the first message arrived,
    whichever comes first.
    """

    max_rows: int = 10_000
    max_bytes: int | str = 8 << 20
    max_wait: float | str = 0.05

    def __post_init__(self) -> None:
        _check_int("BatchPolicy.max_rows", self.max_rows, 1, 10_000_000)
        object.__setattr__(
            self, "max_bytes", _check_size("BatchPolicy.max_bytes", self.max_bytes, 1024, 1 << 31)
        )
        wait = parse_duration(self.max_wait, "BatchPolicy.max_wait")
        if wait > 60.0:
            raise ConfigError(f"BatchPolicy.max_wait: {wait} s is out of range [0, 60] seconds")
        object.__setattr__(self, "max_wait", wait)


@dataclass(frozen=True)
class BufferPolicy:
    """The ring: how many messages and payload bytes may wait between poll and sink.

    ``None`` means "derive from ``memory_limit``" (see :mod:`kfast.runtime.memory`).
    Partitions are paused when the ring is ``pause_at`` full (messages or
    bytes) or a message did not fit, and resumed when it drains to
    ``resume_at`` (hysteresis: ``resume_at < pause_at``).
    """

    max_messages: int | None = None
    max_bytes: int | str | None = None
    pause_at: float = 0.9
    resume_at: float = 0.5

    def __post_init__(self) -> None:
        if self.max_messages is not None:
            _check_int("BufferPolicy.max_messages", self.max_messages, 16, 100_000_000)
        if self.max_bytes is not None:
            object.__setattr__(
                self,
                "max_bytes",
                _check_size("BufferPolicy.max_bytes", self.max_bytes, 64 << 10, (1 << 31) - 1),
            )
        pause = _check_fraction("BufferPolicy.pause_at", self.pause_at, 0.05, 1.0)
        resume = _check_fraction("BufferPolicy.resume_at", self.resume_at, 0.0, 0.95)
        if resume >= pause:
            raise ConfigError(
                f"BufferPolicy.resume_at: {resume} must be below pause_at ({pause}) "
                "so that pause/resume has hysteresis"
            )
        object.__setattr__(self, "pause_at", pause)
        object.__setattr__(self, "resume_at", resume)
