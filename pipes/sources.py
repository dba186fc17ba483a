"""Sources: user functions, generators, sequences and connector objects, run until
exhausted, with a checkpoint that is committed atomically with what they produced.

What a source's checkpoint holds, and so how it resumes after a restart:

* a function called until it returns None: its ``state`` dict (if it takes one);
* a (async) generator function taking ``state``: that dict; without ``state``: how
  many items it had produced, which are skipped when it is started again (so a
  deterministic generator resumes exactly);
* a list or tuple: the index of the next item; any other object: whether it was sent;
* a connector (an object with ``checkpoint()`` and ``restore(state)``, and an async
  iterator or a ``read()`` returning the next item or None at the end): what its
  ``checkpoint()`` returns — its position after the last item it gave — handed back
  to ``restore()`` before it is opened again. Its optional ``committed(state)`` is
  called once the checkpoint holding ``state`` is durable; ``open()`` and ``close()``
  are called around reading.

A source that finished stays finished: a restarted worker does not run it again.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import pickle
import time
from typing import Any

from .emit import Emitter
from .errors import ProcessingError
from .message import Message
from .nodes import maybe_await
from .store import Store
from .topology import Graph, Node

log = logging.getLogger("pipes")
_BATCH = 1000  # items produced between yields to the event loop
_BATCH_SECONDS = 0.05  # or fewer, when producing them takes longer than this


def is_connector(target: Any) -> bool:
    return hasattr(target, "checkpoint") and hasattr(target, "restore") and (
        hasattr(target, "__aiter__") or hasattr(target, "read"))


class Source:
    def __init__(self, node: Node, graph: Graph, store: Store, scope: tuple[str, int] | None = None):
        self.node = node
        self.id = node.id
        self.emitter = Emitter(node, graph, scope)  # scope: the lease partition, whose checkpoint holds ours
        raw = store.get("sources", node.id.encode())
        saved = pickle.loads(raw) if raw is not None else {}
        self.state: dict = saved.get("state", {})
        self.count: int = saved.get("count", 0)
        self.done: bool = saved.get("done", False)
        self.produced = 0  # by this process
        self._changed = False
        # An async source can be suspended halfway through a call, its state already changed
        # for an item not yet emitted; it is then checkpointed as of its last emitted item.
        self._consistent: bytes | None = None
        self._snapshotted: bytes | None = None
        self._opened = False

    def _payload(self) -> bytes:
        target = self.node.target
        state = target.checkpoint() if is_connector(target) else self.state
        return pickle.dumps({"state": state, "count": self.count, "done": self.done}, protocol=5)

    def _mark_consistent(self) -> None:
        """Remember the checkpoint as of the item just produced: a state dict, which changes in
        place, is copied (pickled). A connector needs no copy: its checkpoint() describes the
        position after the last item it gave out, so it is asked at checkpoint time."""
        if not is_connector(self.node.target):
            self._consistent = self._payload()

    def snapshot(self, into: dict[str, bytes]) -> None:
        if self._changed:
            self._changed = False
            raw = self._consistent if self._consistent is not None else self._payload()
            into[self.id] = self._snapshotted = raw

    async def committed(self) -> None:
        """The checkpoint holding the last snapshot is durable: tell a connector that wants to
        know (an SQS source deletes the messages it covers)."""
        raw, self._snapshotted = self._snapshotted, None
        hook = getattr(self.node.target, "committed", None)
        if raw is not None and hook is not None and is_connector(self.node.target):
            await maybe_await(hook(pickle.loads(raw)["state"]))

    async def close(self) -> None:
        target = self.node.target
        if self._opened and hasattr(target, "close"):
            self._opened = False
            await maybe_await(target.close())

    async def run(self, ckpt: Any) -> None:
        if self.done:
            target = self.node.target
            if is_connector(target) and hasattr(target, "committed") and self.state:
                # Its last checkpoint is durable, but the worker may have stopped before telling it.
                await maybe_await(target.restore(self.state))
                await maybe_await(target.committed(self.state))
            return
        try:
            await self._run(ckpt)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            ckpt.wake()  # the runner notices at once
            raise ProcessingError(f"source {self.id!r} ({self.node.where}) failed: {type(e).__name__}: {e}") from e
        self.done = self._changed = True
        self._consistent = None
        ckpt.wake()

    async def _run(self, ckpt: Any) -> None:
        target = self.node.target
        takes_state = _takes_state(target)
        if is_connector(target):
            if self.state:
                await maybe_await(target.restore(self.state))
            if hasattr(target, "open"):
                await maybe_await(target.open())
            self._opened = True  # closed by the runner, after the checkpoint covering its items
            await self._drain(ckpt, _connector_items(target))
        elif inspect.isasyncgenfunction(target) or inspect.isgeneratorfunction(target):
            items = target(self.state) if takes_state else target()
            await self._drain(ckpt, items, skip=0 if takes_state else self.count)
        elif callable(target):
            await self._call_until_none(ckpt, target, takes_state)
        elif isinstance(target, (list, tuple)):
            await self._drain(ckpt, iter(target), skip=self.count)
        else:
            await self._drain(ckpt, iter([target]), skip=self.count)

    async def _drain(self, ckpt: Any, items: Any, skip: int = 0) -> None:
        """Emit every item of a (async) iterator, skipping the first `skip`."""
        is_async = hasattr(items, "__anext__")
        emit = self.emitter.encode
        if is_async:
            self._mark_consistent()
        while True:
            bufs = self.emitter.buffers(ckpt)
            n = 0
            started = time.monotonic()
            now = int(time.time() * 1000)
            while n < _BATCH:
                try:
                    item = await anext(items) if is_async else next(items)
                except (StopIteration, StopAsyncIteration):
                    self._emitted(n, ckpt)
                    return
                self.count += 1
                if skip:
                    skip -= 1
                    continue
                if item is not None:
                    emit(item, None, None, now, bufs, ckpt)
                    n += 1
                if is_async:
                    # An async source may wait for data: let the checkpoint see what it has.
                    self._mark_consistent()
                    self._emitted(n, ckpt)
                    n = 0
                    await ckpt.room()
                    now = int(time.time() * 1000)
                elif n and n % 64 == 0 and time.monotonic() - started > _BATCH_SECONDS:
                    break  # a slow source must not hold up checkpoints and shutdown
            self._emitted(n, ckpt)
            await asyncio.sleep(0)
            await ckpt.room()

    async def _call_until_none(self, ckpt: Any, fn: Any, takes_state: bool) -> None:
        state = self.state
        is_async = inspect.iscoroutinefunction(fn)
        emit = self.emitter.encode
        if is_async:
            self._mark_consistent()
        plain = len(self.emitter.groups) == 1 and len(self.emitter.groups[0][2]) == 1
        while True:
            bufs = self.emitter.buffers(ckpt)
            if plain:
                vdumps, _, (out,) = bufs[0]
                append = out.append
            started = time.monotonic()
            now = int(time.time() * 1000)
            n = 0
            while n < _BATCH:
                result = fn(state) if takes_state else fn()
                if is_async:
                    result = await result
                if result is None:
                    self._emitted(n, ckpt)
                    return
                self.count += 1
                n += 1
                if plain and type(result) is not Message:
                    append((None, vdumps(result), None, now))
                else:
                    emit(result, None, None, now, bufs, ckpt)
                if is_async:
                    # It may wait for data: let the checkpoint see what it has, as of this item.
                    self._mark_consistent()
                    self._emitted(n, ckpt)
                    n = 0
                    await ckpt.room()
                    now = int(time.time() * 1000)
                elif n % 64 == 0 and time.monotonic() - started > _BATCH_SECONDS:
                    break  # a slow source must not hold up checkpoints and shutdown
            self._emitted(n, ckpt)
            await asyncio.sleep(0)
            await ckpt.room()

    def _emitted(self, n: int, ckpt: Any) -> None:
        self._changed = True
        if n:
            self.produced += n
            ckpt.count += n
            ckpt.wake()


def _takes_state(target: Any) -> bool:
    if not callable(target) or is_connector(target):
        return False
    try:
        return "state" in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False


async def _connector_items(target: Any) -> Any:
    if hasattr(target, "__aiter__"):
        async for item in target:
            yield item
        return
    while True:
        item = await maybe_await(target.read())
        if item is None:
            return
        yield item
