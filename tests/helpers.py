"""Helpers shared by connector tests: run an app until it has seen enough, read a topic back."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pipes
import pipes.runtime
from pipes.brokers.local import LocalBroker
from pipes.testing import read_messages
from tansu import free_port  # noqa: F401  (re-exported for the tests)

DSN = os.environ.get("PIPES_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


async def sql_async(query: str, *args, fetch: bool = False):
    import asyncpg

    conn = await asyncpg.connect(DSN, timeout=5)
    try:
        return await (conn.fetch if fetch else conn.execute)(query, *args)
    finally:
        await conn.close()


def sql(query: str, *args):
    """One PostgreSQL statement on a connection of its own, independent of the connectors'."""
    return asyncio.run(sql_async(query, *args))


def rows(query: str, *args) -> list[dict]:
    """The rows of a PostgreSQL query, as dicts."""
    return [dict(r.items()) for r in asyncio.run(sql_async(query, *args, fetch=True))]


def read_topic(data_dir: Path, topic: str, app: pipes.App | None = None) -> list[pipes.Message]:
    """Every message of `topic` in a local:// data dir (read-only: a worker may be running),
    decoded with `app`'s serializers (default: json values, str keys)."""
    if app is None:
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
