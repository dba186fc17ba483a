"""Shared pytest fixtures.

Keep each group of fixtures in its own clearly marked section, so helpers can add
theirs without touching others'.
"""

from __future__ import annotations

import pytest

import pipes

# --- core unit tests (test_app, test_runtime, test_local_broker, ...) -------------------


@pytest.fixture
def data_dir(tmp_path):
    """A path for a local:// broker's RocksDB database (not created yet: the broker creates it)."""
    return tmp_path / "data"


@pytest.fixture
def local_settings(data_dir):
    """Settings for a local:// broker in `data_dir`."""
    return pipes.Settings(broker=f"local://{data_dir}")


# --- Kafka-protocol broker (test_kafka*) ---------------------------------------------------

from tansu import tansu as _tansu  # noqa: E402


@pytest.fixture(scope="session")
def kafka_url():
    """kafka://127.0.0.1:PORT of a Tansu broker started for this test session."""
    with _tansu() as url:
        yield url
