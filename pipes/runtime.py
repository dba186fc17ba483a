"""Running topologies: one asyncio loop, micro-batches in and out, checkpoints.

A :class:`TopologyRunner` owns one topology's consumer, nodes, sources and checkpoint.
Its loop polls a batch, runs every node reading each polled partition, records the
processed offsets, and commits when the checkpoint is due. :func:`run` runs several
runners on one broker until they are stopped, fail, or (``until_done``) have nothing
left to do.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass, field

from .brokers import Broker, Consumer, connect, lease_topic
from .checkpoint import Checkpoint
from .errors import ProcessingError
from .nodes import Sink, maybe_await, processor
from .settings import Settings
from .sources import Source
from .state import StateTable
from .topology import Graph, Topology

log = logging.getLogger("pipes")


class TopologyRunner:
    def __init__(self, topology: Topology, graph: Graph, broker: Broker, settings: Settings):
        self.topology = topology
        self.graph = graph
        self.broker = broker
        self.settings = settings
        self.ckpt = Checkpoint(broker, topology.group, commit_interval=settings.commit_interval,
                               commit_every=settings.commit_every)
        self.tables = {n.id: StateTable(broker.store, n.id) for n in topology.nodes if n.stateful}
        self.transforms = [processor(n, graph, self.tables.get(n.id))
                           for n in topology.nodes if n.kind == "transform"]
        # Processors driven by wall-clock time too (windows closing, timers), and how often.
        self.ticking = [p for p in self.transforms if hasattr(p, "tick")]
        self.tick_interval = min([getattr(p, "tick_interval", 1.0) for p in self.ticking] or [settings.commit_interval])
        self._next_tick = 0.0
        self.sinks = [Sink(n, graph) for n in topology.nodes if n.kind == "sink"]
        self.sources: list[Source] = []
        self.lease = lease_topic(topology) if topology.sources else None
        self.by_topic: dict[str, list] = {}
        for proc in [*self.transforms, *self.sinks]:
            for t in proc.node.inputs:
                self.by_topic.setdefault(t, []).append(proc)
        self.ckpt.tables = list(self.tables.values())
        self.ckpt.sinks = self.sinks
        self.consumer: Consumer | None = None
        self.busy = False
        self.started = False
        self.stopping = False
        self.processed = 0
        self.produced = 0
        # A batch (processing and its checkpoint) and a revocation never interleave.
        self._lock = asyncio.Lock()
        self._source_tasks: list[asyncio.Task] = []

    def idle(self) -> bool:
        """Started, nothing running or pending, the sources this worker runs finished, every
        assigned input consumed."""
        return (self.started and not self.busy and not self.ckpt.pending and all(s.done for s in self.sources)
                and self.consumer.caught_up())

    def stop(self) -> None:
        self.stopping = True
        self.ckpt.wake()

    # -- partitions come and go -----------------------------------------------------
    async def assigned(self, tps: list[tuple[str, int]]) -> None:
        async with self._lock:
            await self.broker.restore(self.topology, tps)
            if self.lease is not None and (self.lease, 0) in tps:
                self._start_sources()

    async def revoked(self, tps: list[tuple[str, int]]) -> None:
        async with self._lock:
            lease_lost = self.lease is not None and (self.lease, 0) in tps
            if lease_lost:
                await self._stop_sources()
            await self.ckpt.commit()
            if lease_lost:
                await self._close_sources()
            for table in self.tables.values():
                table.forget()

    def _start_sources(self) -> None:
        self.sources = [Source(n, self.graph, self.broker.store) for n in self.topology.sources]
        self.ckpt.sources = self.sources
        self._source_tasks = [asyncio.create_task(s.run(self.ckpt), name=f"source {s.id}") for s in self.sources]

    async def _stop_sources(self) -> None:
        for task in self._source_tasks:
            task.cancel()
        for task in self._source_tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._source_tasks = []

    async def _close_sources(self) -> None:
        """After the checkpoint that covers what they produced: close connectors."""
        for source in self.sources:
            await source.close()
        self.produced += sum(s.produced for s in self.sources)
        self.sources = self.ckpt.sources = []

    def _check_sources(self) -> None:
        for task in self._source_tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()

    # -- the loop ---------------------------------------------------------------------
    async def run(self) -> None:
        # Every topology consumes something: its input topics, its lease topic, or both.
        topics = list(self.by_topic) + ([self.lease] if self.lease else [])
        self.consumer = self.broker.consumer(self.topology.group, topics, self)
        self.ckpt.wake = self.consumer.wake
        for proc in [*self.sinks, *self.transforms]:
            if hasattr(proc, "open"):
                await maybe_await(proc.open())
        try:
            await self.consumer.start()
            self.started = True
            await self._loop()
            async with self._lock:
                await self._stop_sources()
                await self.ckpt.commit()
                await self._close_sources()
        except BaseException:
            await self._stop_sources()
            await self._close_sources()
            raise
        finally:
            for proc in [*self.sinks, *self.transforms]:
                if hasattr(proc, "close"):
                    await maybe_await(proc.close())
            await self.consumer.close()

    async def _loop(self) -> None:
        ckpt = self.ckpt
        consumer = self.consumer
        max_records = self.settings.poll_records
        by_topic = self.by_topic
        while not self.stopping:
            timeout = 0.0 if ckpt.pending else min(self.settings.commit_interval, self.tick_interval)
            polled = await consumer.poll(max_records, timeout)
            self._check_sources()
            async with self._lock:
                n = await self._process(polled, by_topic, ckpt) if polled else 0
                if self.ticking:
                    await self._tick(ckpt)
                ckpt.count += n
                self.processed += n
                if ckpt.due(backlog=n >= max_records):
                    await ckpt.commit()

    async def _tick(self, ckpt: Checkpoint) -> None:
        now = time.time()
        if now < self._next_tick:
            return
        self._next_tick = now + self.tick_interval
        assigned = self.consumer.assignment()
        for proc in self.ticking:
            await proc.tick(now, ckpt, assigned)

    async def _process(self, polled: list, by_topic: dict, ckpt: Checkpoint) -> int:
        # A rebalance may have happened since these were fetched: partitions this member no
        # longer owns are skipped, and records below a partition's floor (the first offset
        # its restored state has not seen) are stale.
        floors = self.consumer.assignment()
        n = 0
        self.busy = True
        try:
            for topic, partition, records in polled:
                floor = floors.get((topic, partition))
                if floor is None:
                    continue
                if records[0][0] < floor:
                    records = [r for r in records if r[0] >= floor]
                    if not records:
                        continue
                for proc in by_topic.get(topic, ()):
                    await proc.process(topic, partition, records, ckpt)
                ckpt.offsets[(topic, partition)] = records[-1][0] + 1
                n += len(records)
        finally:
            self.busy = False
        return n

    def summary(self) -> list[str]:
        lines = []
        for s in self.sources:
            lines.append(f"source {s.id!r}: {s.produced} produced" + (" (finished)" if s.done else ""))
        for proc in [*self.transforms, *self.sinks]:
            text = proc.failures.summary()
            if text:
                lines.append(text)
        return lines


@dataclass
class Report:
    """What a worker did in this process."""

    processed: int = 0  # messages consumed by transforms and sinks
    produced: int = 0  # messages produced by sources
    commits: int = 0
    seconds: float = 0.0
    lines: list[str] = field(default_factory=list)


async def run(graph: Graph, settings: Settings, *, topologies: list[str] | None = None, until_done: bool = False,
              broker: Broker | None = None, install_signals: bool = False, stop: asyncio.Event | None = None) -> Report:
    """Run the selected topologies until stopped (`stop` is set, or SIGINT/SIGTERM when
    `install_signals`), until a node fails, or with `until_done` until the sources this
    worker runs are exhausted and every input partition it is assigned is consumed."""
    own_broker = broker is None
    broker = broker or connect(graph.app, settings)
    started = time.monotonic()
    try:
        selected = graph.select(topologies)
        await broker.open(graph, selected)
        runners = [TopologyRunner(t, graph, broker, settings) for t in selected]
        tasks = [asyncio.create_task(r.run(), name=f"topology {r.topology.name}") for r in runners]
        stop = stop or asyncio.Event()
        if install_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
        watchers = [asyncio.create_task(stop.wait())]
        if until_done:
            watchers.append(asyncio.create_task(_until_idle(runners)))
        try:
            done, _ = await asyncio.wait([*tasks, *watchers], return_when=asyncio.FIRST_COMPLETED)
            for r in runners:
                r.stop()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for t in [*watchers, *tasks]:  # run() itself cancelled: so are its topologies
                t.cancel()
            if install_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    asyncio.get_running_loop().remove_signal_handler(sig)
        errors = [e for e in results if isinstance(e, BaseException)]
        if errors:
            raise errors[0]
        report = Report(seconds=time.monotonic() - started)
        for r in runners:
            report.processed += r.processed
            report.produced += r.produced
            report.commits += r.ckpt.commits
            report.lines += r.summary()
        return report
    finally:
        if own_broker:
            await broker.close()


async def _until_idle(runners: list[TopologyRunner]) -> None:
    """Returns once every runner has been idle twice in a row, one loop turn apart."""
    quiet = 0
    while quiet < 2:
        await asyncio.sleep(0.01 if quiet else 0.02)
        quiet = quiet + 1 if all(r.idle() for r in runners) else 0


__all__ = ["run", "Report", "TopologyRunner", "ProcessingError"]
