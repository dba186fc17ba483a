"""Grouping items into batches by size and time, with backpressure.

A connector that receives items one by one (a callback, a socket, a client library's
iterator) and hands them on in batches puts them into a :class:`Batcher` and reads
batches from it::

    batcher = Batcher(size=500, seconds=0.2, max_pending=10_000)
    await batcher.put(item)          # waits while max_pending items are buffered
    async for batch in batcher:      # up to 500 items, or fewer 0.2 s after the first
        await send(batch)
    batcher.close()                  # the reader gets what is left, then the iteration ends

A batch is handed out when it is full, when ``seconds`` have passed since its first item
(so a lone item is not held longer than that), or when the batcher is closed.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class Batcher(Generic[T]):
    def __init__(self, size: int = 500, seconds: float = 1.0, max_pending: int | None = None):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"Batcher: size= must be a positive integer, not {size!r}")
        if seconds <= 0:
            raise ValueError(f"Batcher: seconds= must be positive, not {seconds!r}")
        self.size = size
        self.seconds = seconds
        self.max_pending = max_pending or 4 * size
        if self.max_pending < size:
            raise ValueError(f"Batcher: max_pending={max_pending} is smaller than size={size}")
        self._items: deque[T] = deque()
        self._times: deque[float] = deque()  # when each buffered item arrived
        self._closed = False
        self._changed = asyncio.Event()  # an item was added, taken, or the batcher closed

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    async def put(self, item: T) -> None:
        """Buffer one item, waiting while `max_pending` items are buffered."""
        while len(self._items) >= self.max_pending and not self._closed:
            self._changed.clear()
            await self._changed.wait()
        self.put_nowait(item)

    def put_nowait(self, item: T) -> None:
        """Buffer one item now; raises ``asyncio.QueueFull`` when `max_pending` are buffered."""
        if self._closed:
            raise RuntimeError("Batcher: put() after close()")
        if len(self._items) >= self.max_pending:
            raise asyncio.QueueFull(f"Batcher: {self.max_pending} items pending")
        self._items.append(item)
        self._times.append(time.monotonic())
        self._changed.set()

    def close(self) -> None:
        """No more items: the reader gets what is buffered, then the iteration ends."""
        self._closed = True
        self._changed.set()

    def take(self) -> list[T]:
        """Up to `size` buffered items, now, whether or not a batch is due."""
        items = self._items
        n = min(self.size, len(items))
        batch = [items.popleft() for _ in range(n)]
        for _ in range(n):
            self._times.popleft()
        self._changed.set()
        return batch

    def due(self) -> bool:
        if not self._items:
            return False
        return (len(self._items) >= self.size or self._closed
                or time.monotonic() - self._times[0] >= self.seconds)

    async def get(self) -> list[T]:
        """The next batch, when one is due; [] once closed and empty."""
        while not self.due():
            if self._closed:
                return []
            self._changed.clear()
            timeout = None if not self._items else max(0.0, self._times[0] + self.seconds - time.monotonic())
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except TimeoutError:
                pass
        return self.take()

    def __aiter__(self) -> Batcher[T]:
        return self

    async def __anext__(self) -> list[T]:
        batch = await self.get()
        if not batch:
            raise StopAsyncIteration
        return batch


__all__ = ["Batcher"]
