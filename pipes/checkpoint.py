"""The checkpoint: what one topology has done since the last one, made durable in one order.

Between checkpoints, nodes append encoded outputs to :meth:`Checkpoint.buffer`, the
runner records processed offsets, stateful nodes mutate their tables, and sources
advance. :meth:`Checkpoint.commit` then, in this order:

1. flushes sinks (external sinks receive data before the checkpoint that covers it);
2. collects outputs, processed offsets, touched keyed state and source
   checkpoints into one :class:`~pipes.brokers.Changes`;
3. hands it to the broker, which partitions the outputs and makes it all durable: one atomic RocksDB write batch on
   local:// and memory://; on Kafka, produce outputs and changelogs, wait for acks,
   write state and offsets to RocksDB, commit consumer offsets.

If anything fails before step 3 completes, nothing of this checkpoint is durable and a
restart resumes from the previous one.

Steps 1 and 2 happen when the checkpoint is taken; step 3, the broker's part (on Kafka
mostly waiting for acks), may stay *in flight* while the runner processes the next batch
(``commit(wait=False)``): the next checkpoint is taken only after it has landed, so
checkpoints land one at a time and in order, and a failure surfaces at the runner's next
step. What is announced as durable (sources, sinks, tables, ``on_commit``) is announced
when it has landed.

On Kafka at least once (``sends_ahead``), outputs need no checkpoint to go out: the
runner hands each batch's outputs to the broker as soon as it is processed
(:meth:`Checkpoint.send_ahead`), and the checkpoint that covers them waits for their acks
before anything else of it. So outputs are not held by a checkpoint landing, and while
one lands the runner goes on (:meth:`Checkpoint.advance`) up to twice ``commit_every``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Protocol

from .brokers import Broker, Changes


class Flushable(Protocol):
    async def flush(self, ckpt: "Checkpoint") -> None: ...
    async def committed(self) -> None: ...


class Snapshotting(Protocol):
    def snapshot(self, into: dict[str, bytes]) -> None: ...
    async def committed(self) -> None: ...


class Checkpoint:
    def __init__(self, broker: Broker, group: str, *, commit_interval: float, commit_every: int,
                 scoped: bool = False, sends_ahead: bool = False):
        self.broker = broker
        self.group = group
        self.commit_interval = commit_interval
        self.commit_every = commit_every
        self.sinks: list[Flushable] = []
        self.tables: list[Any] = []  # StateTable
        self.sources: list[Snapshotting] = []
        self.on_commit: list[Callable[[], Any]] = []
        self.wake: Callable[[], None] = lambda: None
        self.commits = 0
        self.committed_messages = 0
        self._committed = asyncio.Event()
        # Encoded outputs since the last checkpoint, topic -> list. With `scoped` (exactly-once
        # on Kafka: a transaction per input partition) they are kept apart per input partition:
        # `scope`, set by the runner to the partition being processed, or the one a caller
        # names (sources: their lease partition; the DLQ: the failed record's partition).
        self.scoped = scoped
        self.scope: tuple[str, int] | None = None
        self.scopes: dict[tuple[str, int] | None, dict[str, list]] = {None: {}}
        self.outputs = self.scopes[None]
        self._flight: asyncio.Task | None = None  # the last checkpoint taken, until it has landed
        # Kafka at least once: outputs are handed to the broker before the checkpoint that covers
        # them is taken (send_ahead), so they need not wait for the one in flight to land.
        self.sends_ahead = sends_ahead
        self._sent: list[asyncio.Future] = []  # their acks, until that checkpoint takes them
        self._reset()

    def _reset(self) -> None:
        self.offsets: dict[tuple[str, int], int] = {}
        self.count = 0  # messages consumed or produced since the last checkpoint
        self.started = time.monotonic()

    def buffer(self, topic: str, scope: tuple[str, int] | None = None) -> list:
        """The list outputs to `topic` are appended to until the next checkpoint."""
        outputs = self.outputs
        if self.scoped:
            scope = scope or self.scope
            outputs = self.scopes.get(scope)
            if outputs is None:
                outputs = self.scopes[scope] = {}
        buf = outputs.get(topic)
        if buf is None:
            buf = outputs[topic] = []
        return buf

    @property
    def collected(self) -> bool:
        """Anything done since the last checkpoint was taken."""
        return bool(self.count or self.offsets or self._sent
                    or any(buf for outputs in self.scopes.values() for buf in outputs.values()))

    @property
    def pending(self) -> bool:
        """Anything not yet durable: done since the last checkpoint, or a checkpoint in flight."""
        return self._flight is not None or self.collected

    def due(self, *, backlog: bool) -> bool:
        """Commit now? Yes once there is something to commit and there is no `backlog`
        (the runner says when: a drained input, so a lone message is not held; with
        outputs sent ahead, a pause in the input), or enough messages or time have gone by."""
        if not self.collected:
            return False
        return (not backlog or self.count >= self.commit_every
                or time.monotonic() - self.started >= self.commit_interval)

    @property
    def landing(self) -> bool:
        """A checkpoint taken is not durable yet."""
        return self._flight is not None and not self._flight.done()

    async def advance(self) -> None:
        """The checkpoint is due: take it. With outputs sent ahead, not while the last one is
        still landing and less than twice ``commit_every`` is collected: it is taken once that
        one has landed (which wakes the runner), and the runner polls meanwhile."""
        if not (self.sends_ahead and self.landing and self.count < 2 * self.commit_every):
            await self.commit(wait=False)

    async def room(self) -> None:
        """Sources wait here while a full checkpoint's worth of outputs is pending."""
        while self.count >= self.commit_every:
            self.wake()
            await self._committed.wait()

    def send_ahead(self) -> None:
        """Hand the outputs buffered so far to the broker now (``sends_ahead`` only): it
        produces them while the runner goes on, and the next checkpoint waits for their acks."""
        taken = _take(self.outputs)
        if taken:
            sent = self.broker.send_ahead(taken)
            sent.add_done_callback(_retrieved)
            self._sent.append(sent)

    async def commit(self, *, wait: bool = True) -> None:
        """Take a checkpoint of everything since the last one, once that one has landed; with
        `wait`, return when this one has landed too, else while the broker still works on it."""
        await self.landed()
        for sink in self.sinks:
            await sink.flush(self)
        changes = Changes(offsets=self.offsets, sent=self._sent)
        self._sent = []
        for scope, outputs in self.scopes.items():
            taken = _take(outputs)
            if taken and not self.scoped:
                changes.outputs = taken
            elif taken:
                changes.scoped[scope] = taken
        for table in self.tables:
            table.drain(changes.state)
        for source in self.sources:
            source.snapshot(changes.sources)
        count = self.count
        self._reset()
        self._flight = asyncio.ensure_future(self._land(changes, count))
        self._flight.add_done_callback(lambda _: self.wake())  # a runner waiting for input looks up
        if wait:
            await self.landed()

    async def landed(self) -> None:
        """Wait for the checkpoint in flight, if any; raise its error if it failed."""
        flight = self._flight
        if flight is not None:
            try:
                await flight
            finally:
                if self._flight is flight:
                    self._flight = None

    def check(self) -> None:
        """Clear a checkpoint that has landed meanwhile; raise its error if it failed."""
        flight = self._flight
        if flight is not None and flight.done():
            self._flight = None
            flight.result()

    def abandon(self) -> None:
        """The runner is cancelled: a checkpoint still in flight is given up (a restart
        resumes from the last one that landed)."""
        if self._flight is not None:
            self._flight.cancel()
            self._flight = None
        self._sent = []  # produced or not: a restart produces them again

    async def _land(self, changes: Changes, count: int) -> None:
        if changes:
            await self.broker.commit(self.group, changes)
        self.commits += 1
        self.committed_messages += count
        for table in self.tables:
            table.committed()
        for source in self.sources:
            await source.committed()
        for sink in self.sinks:
            await sink.committed()
        for hook in self.on_commit:
            hook()
        committed, self._committed = self._committed, asyncio.Event()
        committed.set()


def _take(outputs: dict[str, list]) -> dict[str, list]:
    """The buffered outputs per topic, the buffers emptied in place (nodes and sources hold
    them across an await)."""
    taken = {t: list(o) for t, o in outputs.items() if o}
    if taken:
        for buf in outputs.values():
            buf.clear()
    return taken


def _retrieved(future: asyncio.Future) -> None:
    """A send whose checkpoint never came (the runner failed first): its error is not news."""
    if not future.cancelled():
        future.exception()
