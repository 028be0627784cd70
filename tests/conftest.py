"""Shared test configuration (keep small: fixtures live in kfast.testing.pytest_plugin)."""

import sys

# The kfast.testing plugin provides kafka_broker, pg_server, unique_topic, ... When kfast is
# pip-installed, pytest already loaded it through the `pytest11` entry point `kfast`; loading it
# a second time under its module name would make pytest fail with "Plugin already registered".
if "kfast.testing.pytest_plugin" not in sys.modules:
    pytest_plugins = ["kfast.testing.pytest_plugin"]


def pytest_sessionstart(session: object) -> None:
    """Fail the whole run when a compiled extension did not build or load.

    Every ``kfast/**/*.pyx`` must import as a compiled module; a missing one
    would otherwise surface as scattered ImportErrors (or not at all).
    """
    import importlib
    from pathlib import Path

    import pytest

    import kfast

    root = Path(kfast.__file__).parent
    missing = []
    for pyx in sorted(root.rglob("*.pyx")):
        name = ".".join(("kfast", *pyx.relative_to(root).with_suffix("").parts))
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            missing.append(f"{name}: {exc}")
            continue
        if not str(getattr(module, "__file__", "")).endswith((".so", ".pyd")):
            missing.append(f"{name}: loaded from {module.__file__}, not a compiled extension")
    if missing:
        pytest.exit("compiled extensions missing:\n  " + "\n  ".join(missing), returncode=3)
