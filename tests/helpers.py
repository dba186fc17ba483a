"""Helpers shared by connector tests: run an app until it has seen enough, read a topic back."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pipes
import pipes.runtime
from pipes.brokers.local import LocalBroker
from pipes.testing import read_messages


def read_topic(data_dir: Path, topic: str) -> list[pipes.Message]:
    """Every message of `topic` in a local:// data dir (read-only: a worker may be running)."""
    app = pipes.App("probe")
    app.sink(topic, print)
    broker = LocalBroker(str(data_dir), pipes.Settings(), read_only=True)
    try:
        return read_messages(broker, app.build(), topic)
    finally:
        asyncio.run(broker.close())


async def run_until(app: pipes.App, settings: pipes.Settings, seen: list, want: int, *, more: float = 0.2,
                    timeout: float = 20.0) -> None:
    """Run `app` until `seen` holds `want` items, `more` seconds longer, then stop it cleanly."""
    stop = asyncio.Event()
    task = asyncio.create_task(pipes.runtime.run(app.build(settings), settings, stop=stop))
    deadline = time.monotonic() + timeout
    while len(seen) < want:
        assert not task.done(), task.exception()
        assert time.monotonic() < deadline, f"{len(seen)} seen, want {want}"
        await asyncio.sleep(0.01)
    await asyncio.sleep(more)
    stop.set()
    await task
