"""Shared fixtures: the real engines (tests/fixtures/engines.py) and in-process servers."""

pytest_plugins = ["tests.fixtures.engines", "tests.fixtures.servers"]
