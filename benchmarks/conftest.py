"""Benchmarks use the same real Kafka/PostgreSQL fixtures as the tests."""

import sys

if "kfast.testing.pytest_plugin" not in sys.modules:
    pytest_plugins = ["kfast.testing.pytest_plugin"]
