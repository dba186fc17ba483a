"""Running topologies: one asyncio loop, micro-batches in and out, checkpoints.

A :class:`TopologyRunner` owns one topology's consumer, nodes, sources and checkpoint.
Its loop polls a batch, runs every node reading each polled partition, records the
processed offsets, and commits when the checkpoint is due. :func:`run` runs several
runners on one broker until they are stopped, fail, or (``until_done``) have nothing
left to do; a :class:`Supervisor` per topology restarts a crashed runner when asked
(``pipes worker``), and counts what its runners did for ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import struct
import time
from dataclasses import dataclass, field

from .brokers import Broker, Consumer, connect, lease_topic
from .checkpoint import Checkpoint
from .errors import ConfigError, ProcessingError
from .metrics import TopologyMetrics
from .nodes import Sink, maybe_await, processor
from .settings import Settings
from .sources import Source
from .state import StateTable
from .topology import Graph, Topology

log = logging.getLogger("pipes")
_MS = struct.Struct(">Q")
INPUT_PAUSE = 0.02  # seconds without input after which outputs sent ahead are checkpointed


def checkpoint_time_key(group: str) -> bytes:
    """Meta key of a consumer group's last durable checkpoint time (ms since the epoch)."""
    return b"checkpoint\0" + group.encode()


class TopologyRunner:
    def __init__(self, topology: Topology, graph: Graph, broker: Broker, settings: Settings,
                 metrics: TopologyMetrics | None = None):
        self.topology = topology
        self.graph = graph
        self.broker = broker
        self.settings = settings
        self.ckpt = Checkpoint(broker, topology.group, commit_interval=settings.commit_interval,
                               commit_every=settings.commit_every, scoped=broker.scoped,
                               sends_ahead=broker.sends_ahead)
        self.tables = {n.id: StateTable(broker.store, n.id) for n in topology.nodes if n.stateful}
        self.transforms = [processor(n, graph, self.tables.get(n.id))
                           for n in topology.nodes if n.kind == "transform"]
        # Processors driven by wall-clock time too (windows closing, timers), and how often.
        self.ticking = [p for p in self.transforms if hasattr(p, "tick")]
        if self.ticking and broker.scoped:
            raise ConfigError(f"guarantee='exactly_once' cannot cover what node "
                              f"{self.ticking[0].node.id!r} emits on wall-clock time (timers, windows closed "
                              f"by the clock): its outputs belong to no input partition's transaction; use "
                              f"guarantee='at_least_once' for topology {topology.name!r}")
        self.tick_interval = min([getattr(p, "tick_interval", 1.0) for p in self.ticking] or [settings.commit_interval])
        self._next_tick = 0.0
        self.sinks = [Sink(n, graph) for n in topology.nodes if n.kind == "sink"]
        self.sources: list[Source] = []
        self.lease = lease_topic(topology) if topology.sources else None
        # Per input topic: (processor, its metrics, its output topics).
        self.metrics = metrics or TopologyMetrics()
        self.by_topic: dict[str, list] = {}
        for proc in [*self.transforms, *self.sinks]:
            counted = (proc, self.metrics.node(proc.node.id), proc.node.outputs)
            for t in proc.node.inputs:
                self.by_topic.setdefault(t, []).append(counted)
        self.ckpt.on_commit.append(self._checkpointed)
        self.ckpt.tables = list(self.tables.values())
        self.ckpt.sinks = self.sinks
        self.consumer: Consumer | None = None
        self.started = False
        self.ready = False  # started, assigned its partitions, and their state restored
        self.stopping = False
        self.processed = 0
        self.produced = 0
        # A batch (processing and its checkpoint) and a revocation never interleave.
        self._lock = asyncio.Lock()
        self._source_tasks: list[asyncio.Task] = []
        self._restoring: asyncio.Task | None = None  # a gained partitions' restore, while it runs

    def idle(self) -> bool:
        """Started, nothing running or pending, the sources this worker runs finished (timers,
        which never finish, aside), every assigned input consumed. The lock is held from a
        batch's processing to the end of its checkpoint (outputs still in flight to the
        broker are not yet in any partition's end) and while partitions move."""
        return (self.started and not self._lock.locked() and not self.ckpt.pending and self.consumer.caught_up()
                and all(s.done or getattr(s.node.target, "pipes_endless", False) for s in self.sources))

    def stop(self) -> None:
        self.stopping = True
        self.ckpt.wake()
        if self._restoring is not None:  # a long changelog restore does not hold a shutdown up
            self._restoring.cancel()

    # -- partitions come and go -----------------------------------------------------
    async def assigned(self, tps: list[tuple[str, int]]) -> None:
        self.ready = False  # until the state of what it gained is restored
        async with self._lock:
            if self.stopping:
                return
            self._restoring = asyncio.ensure_future(self.broker.restore(self.topology, tps))
            try:
                await self._restoring
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling() or not self.stopping:
                    raise
                return  # stop() cut it short: what it wrote is consistent, the next owner goes on
            finally:
                self._restoring = None
            if self.lease is not None and (self.lease, 0) in tps:
                self._start_sources()
            self.ready = True

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
            await self.broker.release(self.topology, tps)

    def _start_sources(self) -> None:
        self.sources = [Source(n, self.graph, self.broker.store, (self.lease, 0)) for n in self.topology.sources]
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
            self.metrics.node(source.id).messages_out += source.produced
        self.produced += sum(s.produced for s in self.sources)
        self.sources = self.ckpt.sources = []

    def _check_sources(self) -> None:
        for task in self._source_tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()

    def _checkpointed(self) -> None:
        """A checkpoint is durable: time it (from when its changes were collected) and record
        when, for `pipes state` and the checkpoint-age metric."""
        self.metrics.checkpoints.observe(time.monotonic() - self.ckpt.started)
        self.metrics.last_checkpoint = now = time.time()
        self.broker.store.put("meta", checkpoint_time_key(self.topology.group), _MS.pack(int(now * 1000)))

    # -- the loop ---------------------------------------------------------------------
    async def run(self) -> None:
        # Every topology consumes something: its input topics, its lease topic, or both.
        topics = list(self.by_topic) + ([self.lease] if self.lease else [])
        self.consumer = self.broker.consumer(self.topology.group, topics, self)
        self.ckpt.wake = self.consumer.wake
        opened = []  # closed at the end, even when a later one fails to open
        try:
            for proc in [*self.sinks, *self.transforms]:
                if hasattr(proc, "open"):
                    await maybe_await(proc.open())
                opened.append(proc)
            await self.consumer.start()
            self.started = True
            await self._loop()
            async with self._lock:
                await self._stop_sources()
                await self.ckpt.commit()
                await self._close_sources()
        except BaseException as e:
            if isinstance(e, asyncio.CancelledError):
                self.ckpt.abandon()
            else:  # a checkpoint taken before the failure still lands (on_error="stop": all before it);
                with contextlib.suppress(Exception):  # if it cannot, a restart resumes from the last that did
                    await self.ckpt.landed()
            await self._stop_sources()
            await self._close_sources()
            raise
        finally:
            for proc in opened:
                if hasattr(proc, "close"):
                    await maybe_await(proc.close())
            await self.consumer.close()

    async def _loop(self) -> None:
        ckpt = self.ckpt
        consumer = self.consumer
        max_records = self.settings.poll_records
        by_topic = self.by_topic
        while not self.stopping:
            timeout = self._poll_timeout(ckpt)
            polled = await consumer.poll(max_records, timeout)
            self._check_sources()
            async with self._lock:
                ckpt.check()
                n = await self._process(polled, by_topic, ckpt) if polled else 0
                if self.ticking:
                    await self._tick(ckpt)
                ckpt.count += n
                self.processed += n
                # Outputs sent ahead are on their way at once, so their checkpoint waits for a
                # pause in the input (or commit_every, or commit_interval); without sending ahead,
                # it is taken as soon as the input is drained, so a lone message is not held.
                if ckpt.sends_ahead:
                    ckpt.send_ahead()
                if ckpt.due(backlog=n > 0 if ckpt.sends_ahead else n >= max_records):
                    # The broker makes it durable while the next batch is processed.
                    await ckpt.advance()

    def _poll_timeout(self, ckpt: Checkpoint) -> float:
        """How long a poll may wait for input: not at all while a checkpoint waits to be taken
        once the input is drained; a short pause when outputs are sent ahead; else until the
        next tick or checkpoint (a checkpoint landing wakes the poll)."""
        if ckpt.collected and not ckpt.landing:
            return INPUT_PAUSE if ckpt.sends_ahead else 0.0
        return min(self.settings.commit_interval, self.tick_interval)

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
        clock = time.perf_counter
        for topic, partition, records in polled:
            floor = floors.get((topic, partition))
            if floor is None:
                continue
            if records[0][0] < floor:
                records = [r for r in records if r[0] >= floor]
                if not records:
                    continue
            ckpt.scope = (topic, partition)  # whose transaction its outputs join (exactly-once)
            for proc, m, topics in by_topic.get(topic, ()):
                outs = [ckpt.buffer(t) for t in topics]
                before = sum(map(len, outs))
                began = clock()
                await proc.process(topic, partition, records, ckpt)
                m.batches.observe(clock() - began)
                m.messages_in += len(records)
                m.messages_out += sum(map(len, outs)) - before
            ckpt.offsets[(topic, partition)] = records[-1][0] + 1
            n += len(records)
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
    restarts: int = 0
    lines: list[str] = field(default_factory=list)


class Supervisor:
    """Runs one topology, and with `restart` starts it again after a crash (a source or
    connector raising, a sink's flush failing, the broker going away): a new runner resumes
    from the last checkpoint, after an exponential backoff. It gives up, and the worker
    fails, after ``restart_attempts`` restarts in a row; a runner that stayed up for
    ``restart_backoff_max`` seconds counts as recovered. A node whose policy is ``stop``
    and configuration errors are never restarted."""

    def __init__(self, topology: Topology, graph: Graph, broker: Broker, settings: Settings, restart: bool):
        self.topology = topology
        self.graph = graph
        self.broker = broker
        self.settings = settings
        self.restart = restart
        self.metrics = TopologyMetrics()
        self.runner: TopologyRunner | None = None
        self.stopping = False
        self._wake = asyncio.Event()
        self._done = Report()  # what runners that crashed had done

    @property
    def ready(self) -> bool:
        return self.runner is not None and self.runner.ready

    def idle(self) -> bool:
        return self.runner is not None and self.runner.idle()

    def stop(self) -> None:
        self.stopping = True
        self._wake.set()
        if self.runner is not None:
            self.runner.stop()

    async def run(self) -> None:
        s = self.settings
        failures = 0
        while not self.stopping:
            self.runner = runner = TopologyRunner(self.topology, self.graph, self.broker, s, self.metrics)
            began = time.monotonic()
            try:
                await runner.run()
                return
            except Exception as e:
                if not self.restart or self.stopping or isinstance(e, ConfigError) or getattr(e, "stopped", False):
                    raise
                self._absorb(runner)
                failures = 1 if time.monotonic() - began >= s.restart_backoff_max else failures + 1
                if failures > s.restart_attempts:
                    raise ProcessingError(f"topology {self.topology.name!r} gave up after {s.restart_attempts} "
                                          f"restart{'s' if s.restart_attempts != 1 else ''}: {e}") from e
                delay = min(s.restart_backoff * 2 ** (failures - 1), s.restart_backoff_max)
                log.error("topology %r failed: %s: %s; restarting it from its last checkpoint in %.1f s "
                          "(restart %d of at most %d in a row)", self.topology.name, type(e).__name__, e,
                          delay, failures, s.restart_attempts)
                self.metrics.restarts += 1
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                except TimeoutError:
                    pass

    def _absorb(self, runner: TopologyRunner) -> None:
        self._done.processed += runner.processed
        self._done.produced += runner.produced  # its sources were closed and counted
        self._done.commits += runner.ckpt.commits

    def counts(self) -> tuple[int, int]:
        """Messages consumed and produced so far, by this topology's runners in this process."""
        r = self.runner
        if r is None:
            return self._done.processed, self._done.produced
        return (self._done.processed + r.processed,
                self._done.produced + r.produced + sum(s.produced for s in r.sources))

    def report(self, into: Report) -> None:
        r = self.runner
        into.processed += self._done.processed + (r.processed if r else 0)
        into.produced += self._done.produced + (r.produced if r else 0)
        into.commits += self._done.commits + (r.ckpt.commits if r else 0)
        into.restarts += self.metrics.restarts
        into.lines += r.summary() if r else []


async def run(graph: Graph, settings: Settings, *, topologies: list[str] | None = None, until_done: bool = False,
              broker: Broker | None = None, install_signals: bool = False, stop: asyncio.Event | None = None,
              restart: bool = False, progress: bool = False) -> Report:
    """Run the selected topologies until stopped (`stop` is set, or SIGINT/SIGTERM when
    `install_signals`), until a node fails, or with `until_done` until the sources this
    worker runs are exhausted and every input partition it is assigned is consumed.

    Once stopped, the topologies have ``settings.shutdown_timeout`` seconds to finish the
    batch in hand and take a last checkpoint; past it they are cancelled (what they did
    since their last checkpoint is redone by the next run) and ProcessingError is raised.
    With `restart`, a crashed topology is restarted (:class:`Supervisor`). With
    ``settings.web``, the worker's web server runs meanwhile (:mod:`pipes.web`); with
    `progress`, a progress line is kept on stderr."""
    own_broker = broker is None
    broker = broker or connect(graph.app, settings)
    started = time.monotonic()
    server = None
    try:
        selected = graph.select(topologies)
        await broker.open(graph, selected)
        workers = [Supervisor(t, graph, broker, settings, restart) for t in selected]
        if settings.web:
            from .web import serve

            server = await serve(settings.web, graph, broker, workers)
        tasks = [asyncio.create_task(w.run(), name=f"topology {w.topology.name}") for w in workers]
        stop = stop or asyncio.Event()
        if install_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
        watchers = [asyncio.create_task(stop.wait())]
        if until_done:
            watchers.append(asyncio.create_task(_until_idle(workers)))
        if progress:
            from .ops.progress import show_progress

            watchers.append(asyncio.create_task(show_progress(workers)))
        try:
            await asyncio.wait([*tasks, *watchers], return_when=asyncio.FIRST_COMPLETED)
            for w in workers:
                w.stop()
            _, late = await asyncio.wait(tasks, timeout=settings.shutdown_timeout)
            if late:
                log.warning("shutdown is taking longer than %g s; where its tasks wait:\n%s",
                            settings.shutdown_timeout, _where_tasks_wait())
            for t in late:
                t.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for t in [*watchers, *tasks]:  # run() itself cancelled: so are its topologies
                t.cancel()
            if install_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    asyncio.get_running_loop().remove_signal_handler(sig)
        errors = [e for e in results if isinstance(e, BaseException) and not isinstance(e, asyncio.CancelledError)]
        if errors:
            raise errors[0]
        if late:
            names = ", ".join(repr(w.topology.name) for w, t in zip(workers, tasks) if t in late)
            raise ProcessingError(f"shutdown took longer than {settings.shutdown_timeout:g} s "
                                  f"(shutdown_timeout): topolog{'ies' if len(late) > 1 else 'y'} {names} cancelled; "
                                  f"what they did since their last checkpoint is redone by the next run")
        report = Report(seconds=time.monotonic() - started)
        for w in workers:
            w.report(report)
        return report
    finally:
        if server is not None:
            server.close()
            await server.wait_closed()
        if own_broker:
            await broker.close()


async def _until_idle(workers: list[Supervisor]) -> None:
    """Returns once every topology has been idle twice in a row, one loop turn apart."""
    quiet = 0
    while quiet < 2:
        await asyncio.sleep(0.01 if quiet else 0.02)
        quiet = quiet + 1 if all(w.idle() for w in workers) else 0


__all__ = ["run", "Report", "Supervisor", "TopologyRunner", "ProcessingError"]


def _where_tasks_wait() -> str:
    """Each pending task of this loop and where it waits (its innermost coroutines), for a
    shutdown that hangs."""
    lines = []
    for task in asyncio.all_tasks():
        if task is asyncio.current_task() or task.done():
            continue
        frames, coro = [], task.get_coro()
        while coro is not None:  # down the chain of awaits
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
            if frame is not None:
                frames.append(f"{frame.f_code.co_name} ({frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno})")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        lines.append(f"  {task.get_name()}: {' -> '.join(frames[-5:]) or 'not started'}")
    return "\n".join(lines)
