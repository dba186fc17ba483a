"""pipes.io.Batcher: batches by size and by time, backpressure, close."""

from __future__ import annotations

import asyncio
import time

import pytest

from pipes.io import Batcher


def test_full_batches_go_at_once_and_the_rest_after_the_time_limit():
    async def main():
        b = Batcher(size=3, seconds=0.2)
        for i in range(7):
            await b.put(i)
        started = time.monotonic()
        assert await b.get() == [0, 1, 2]
        assert await b.get() == [3, 4, 5]
        assert time.monotonic() - started < 0.1  # full batches are not held
        assert await b.get() == [6]
        held = time.monotonic() - started
        assert 0.15 <= held < 1.0  # a partial batch waits for the time limit, no longer

    asyncio.run(main())


def test_put_waits_while_max_pending_items_are_buffered():
    async def main():
        b = Batcher(size=2, seconds=10, max_pending=4)
        for i in range(4):
            await b.put(i)
        with pytest.raises(asyncio.QueueFull):
            b.put_nowait(4)
        blocked = asyncio.create_task(b.put(4))
        await asyncio.sleep(0.05)
        assert not blocked.done()
        assert await b.get() == [0, 1]
        await asyncio.wait_for(blocked, 1)
        assert len(b) == 3

    asyncio.run(main())


def test_close_hands_out_the_rest_and_ends_the_iteration():
    async def main():
        b = Batcher(size=10, seconds=60)
        got = []

        async def read():
            async for batch in b:
                got.append(batch)

        reader = asyncio.create_task(read())
        for i in range(12):
            await b.put(i)
        await asyncio.sleep(0.01)
        b.close()
        await asyncio.wait_for(reader, 1)
        assert got == [list(range(10)), [10, 11]]
        with pytest.raises(RuntimeError):
            b.put_nowait(1)

    asyncio.run(main())


def test_a_reader_waiting_on_an_empty_batcher_wakes_for_the_first_item():
    async def main():
        b = Batcher(size=100, seconds=0.05)
        reader = asyncio.create_task(b.get())
        await asyncio.sleep(0.05)
        assert not reader.done()
        await b.put("x")
        assert await asyncio.wait_for(reader, 1) == ["x"]

    asyncio.run(main())


@pytest.mark.parametrize("kwargs", [{"size": 0}, {"seconds": 0}, {"size": 10, "max_pending": 5}])
def test_bad_limits_are_refused(kwargs):
    with pytest.raises(ValueError):
        Batcher(**kwargs)
