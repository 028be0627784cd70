"""Shared test configuration (keep small: fixtures live in kfast.testing.pytest_plugin)."""

import sys

# The kfast.testing plugin provides kafka_broker, pg_server, unique_topic, ... When kfast is
# pip-installed, pytest already loaded it through the `pytest11` entry point `kfast`; loading it
# a second time under its module name would make pytest fail with "Plugin already registered".
if "kfast.testing.pytest_plugin" not in sys.modules:
    pytest_plugins = ["kfast.testing.pytest_plugin"]
