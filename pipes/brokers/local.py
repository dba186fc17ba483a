"""The embedded broker: topic logs, offsets, state and checkpoints in one RocksDB database.

``local://DIR`` keeps it on disk; ``memory://`` is the same code on an in-memory
RocksDB environment, gone when the process ends. Each commit is one write batch, so a
process killed at any instant restarts from its last checkpoint with nothing lost and
nothing duplicated.

A topic partition's log is a run of record blocks in the ``log`` column family: key
``<topic>\\0<partition:4><first offset:8>``, value one msgpack array of up to ``BLOCK``
consecutive records ``[offset, key, value, headers, timestamp_ms]``, so that one
``unpackb`` returns the records as consumers get them (:data:`Polled`). A commit writes
its records as new blocks; blocks are never appended to.
"""

from __future__ import annotations

import asyncio
import struct
import time
from itertools import takewhile
from typing import Sequence

import msgpack

from ..errors import BrokerError
from ..settings import Settings
from ..store import Store
from ..topology import Graph, Topology
from . import Changes, Listener, Polled, lease_topic

_POS = struct.Struct(">IQ")  # partition, offset
_Q = struct.Struct(">Q")
_RETENTION_EVERY = 10.0  # seconds between retention sweeps
BLOCK = 512  # records per log block at most (see docs/performance.md)
_BLOCK_BYTES = 1 << 20  # and about this many bytes of values
_FORMAT = b"2"  # meta b"logformat": record blocks (1: one RocksDB value per record, unmarked)
_pack = msgpack.Packer(use_bin_type=True).pack


def _block_size(outputs: list) -> int:
    """Records per block: BLOCK, fewer for large values (about _BLOCK_BYTES a block, by the first ones)."""
    sample = outputs[:16]
    size = sum(len(o[1] or b"") for o in sample) // len(sample)
    return max(1, min(BLOCK, _BLOCK_BYTES // (size + 1)))


def _log_prefix(topic: str, partition: int) -> bytes:
    return topic.encode() + b"\0" + struct.pack(">I", partition)


class LocalBroker:
    scoped = False  # one write batch makes a whole checkpoint atomic: no transactions to scope
    sends_ahead = False  # nor outputs to send before it

    def __init__(self, path: str | None, settings: Settings, *, read_only: bool = False, url: str = "local://"):
        self.url = url
        self.settings = settings
        self.read_only = read_only
        self.store = Store(path, read_only=read_only)
        self._log = self.store.cf["log"]
        self._log_handle = self.store.handle["log"]
        self._topics: dict[str, dict] = {}  # name -> {"partitions": n, "retention_ms": ms|None}
        self._start: dict[tuple[str, int], int] = {}
        self._end: dict[tuple[str, int], int] = {}
        self._changed = asyncio.Event()
        self._committing = asyncio.Lock()  # a log's next offsets are taken and written in turn
        self._last_sweep = time.monotonic()
        try:
            self._check_format()
        except BrokerError:
            self._log = self._log_handle = None
            self.store.close()  # releases the data dir
            raise
        self._load_topics()

    def _check_format(self) -> None:
        """Refuse a log this version would misread; mark a new one as record blocks."""
        found = self.store.get("meta", b"logformat")
        if found == _FORMAT:
            return
        if found is None and not self._written():
            if not self.read_only:
                self.store.put("meta", b"logformat", _FORMAT)
            return
        path = self.store.path
        if found is None:
            raise BrokerError(f"data dir {path} was written by an older pipes (one RocksDB value per "
                              f"record), which this version cannot read: remove {path} to start afresh")
        raise BrokerError(f"data dir {path} has log format {found.decode(errors='replace')!r}, which this "
                          f"version of pipes cannot read: use the pipes that wrote it, or remove {path}")

    def _written(self) -> bool:
        it = self._log.iter()
        it.seek_to_first()
        return it.valid()

    # -- topics ------------------------------------------------------------------
    def _load_topics(self) -> None:
        for k, v in self.store.scan("meta", b"topic\0"):
            name = k[len(b"topic\0"):].decode()
            self._topics[name] = msgpack.unpackb(v)
            for p in range(self._topics[name]["partitions"]):
                self._bounds(name, p)

    def _bounds(self, topic: str, p: int) -> None:
        prefix = _log_prefix(topic, p)
        it = self._log.iter()
        it.seek_for_prev(prefix + b"\xff" * 8)
        end = 0
        if it.valid() and it.key().startswith(prefix):  # the last block: its first offset + its length
            block = it.value()
            header = msgpack.Unpacker(max_buffer_size=len(block))
            header.feed(block)
            end = _Q.unpack(it.key()[-8:])[0] + header.read_array_header()
        it.seek(prefix)
        start = _Q.unpack(it.key()[-8:])[0] if it.valid() and it.key().startswith(prefix) else end
        # A partition emptied by retention keeps its end offset in meta, so offsets never go back.
        floor = self.store.get("meta", b"end\0" + prefix)
        if floor is not None and start == end:
            start = end = max(end, _Q.unpack(floor)[0])
        self._start[(topic, p)], self._end[(topic, p)] = start, end

    def topics(self) -> dict[str, dict]:
        return dict(self._topics)

    async def open(self, graph: Graph | None = None, topologies: Sequence[Topology] = ()) -> None:
        for spec in graph.topics.values() if graph is not None else ():
            self._create(spec.name, spec.partitions, spec.retention_ms)
        for topo in topologies:
            if topo.sources:
                self._create(lease_topic(topo), 1, None)

    async def restore(self, topology: Topology, tps: list[tuple[str, int]]) -> None:
        """Nothing to restore: keyed state and offsets already live in this database."""

    async def release(self, topology: Topology, tps: list[tuple[str, int]]) -> None:
        """Nothing to release: one process owns every partition."""

    def _create(self, name: str, partitions: int, retention_ms: int | None) -> None:
        old = self._topics.get(name)
        if old is not None and old["partitions"] >= partitions and old.get("retention_ms") == retention_ms:
            return
        if self.read_only:
            raise BrokerError(f"topic {name!r} does not exist")
        meta = {"partitions": max(partitions, old["partitions"] if old else 0), "retention_ms": retention_ms}
        self.store.put("meta", b"topic\0" + name.encode(), msgpack.packb(meta))
        self._topics[name] = meta
        for p in range(meta["partitions"]):
            self._start.setdefault((name, p), 0)
            self._end.setdefault((name, p), 0)

    def partitions(self, topic: str) -> int:
        t = self._topics.get(topic)
        if t is None:
            self._create(topic, self.settings.partitions, self.settings.retention_ms)
            t = self._topics[topic]
        return t["partitions"]

    async def describe(self, topic: str) -> int | None:
        """Partitions of an existing topic, or None."""
        t = self._topics.get(topic)
        return t["partitions"] if t else None

    def end_offsets(self, topic: str) -> dict[int, int]:
        return {p: self._end[(topic, p)] for p in range(self.partitions(topic))}

    def start_offsets(self, topic: str) -> dict[int, int]:
        return {p: self._start[(topic, p)] for p in range(self.partitions(topic))}

    # -- consuming ----------------------------------------------------------------
    def consumer(self, group: str | None, topics: Sequence[str], listener: Listener | None = None) -> LocalConsumer:
        return LocalConsumer(self, group, topics, listener)

    def read(self, topic: str, partition: int, offset: int, limit: int) -> list[Polled]:
        """Up to `limit` records of one partition from `offset` on."""
        end = self._end[(topic, partition)]
        out: list[Polled] = []
        if offset >= end or limit <= 0:
            return out
        prefix = _log_prefix(topic, partition)
        it = self._log.iter()
        it.seek_for_prev(prefix + _Q.pack(offset))  # the block holding `offset`
        if not it.valid() or not it.key().startswith(prefix):
            it.seek(prefix)  # `offset` is before the first record kept
        # Offsets are contiguous from the first record kept to the end: `offset` is record
        # `offset - first` of the block that starts at `first`.
        unpackb = msgpack.unpackb
        while len(out) < limit and it.valid():
            key = it.key()
            if not key.startswith(prefix):
                break
            first = _Q.unpack(key[-8:])[0]
            if first >= end:  # written by a commit still in flight
                break
            skip = max(offset - first, 0)
            out += unpackb(it.value(), use_list=False)[skip:skip + limit - len(out)]
            it.next()
        return out

    async def wait(self, timeout: float, wake: asyncio.Event | None = None) -> None:
        """Until some commit writes records, `wake` is set, or `timeout` passes."""
        changed = self._changed
        waiters = [asyncio.ensure_future(changed.wait())]
        if wake is not None:
            waiters.append(asyncio.ensure_future(wake.wait()))
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    def refresh(self) -> None:
        """Read-only access: catch up with the worker that writes the database."""
        self.store.catch_up()
        self._load_topics()

    # -- committing ---------------------------------------------------------------
    async def commit(self, group: str, changes: Changes) -> None:
        if self.read_only:
            raise BrokerError("this broker was opened read-only")
        async with self._committing:
            await self._commit(group, changes)

    async def _commit(self, group: str, changes: Changes) -> None:
        store = self.store
        wb = store.batch()
        ends = {}
        put = wb.put
        h = self._log_handle
        for (topic, p), outputs in changes.by_partition(self.partitions).items():
            self.partitions(topic)
            off = ends.get((topic, p), self._end[(topic, p)])
            prefix = _log_prefix(topic, p)
            records = [(o, key, value, headers, ts) for o, (key, value, headers, ts) in enumerate(outputs, off)]
            step = _block_size(outputs)
            for i in range(0, len(records), step):
                put(prefix + _Q.pack(off + i), _pack(records[i:i + step]), h)
            ends[(topic, p)] = off + len(records)
        if changes.offsets:
            store.stage_offsets(wb, group, changes.offsets)
        if changes.state:
            store.stage_state(wb, changes.state)
        if changes.sources:
            store.stage_sources(wb, changes.sources)
        await store.write_batch(wb)
        if ends:
            self._end.update(ends)
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()
        if time.monotonic() - self._last_sweep > _RETENTION_EVERY:
            self.sweep()

    def sweep(self, now_ms: int | None = None) -> int:
        """Delete records older than their topic's retention; returns how many."""
        self._last_sweep = time.monotonic()
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        deleted = 0
        for name, meta in self._topics.items():
            if meta.get("retention_ms"):
                for p in range(meta["partitions"]):
                    deleted += self._sweep(name, p, now_ms - meta["retention_ms"])
        return deleted

    def _sweep(self, topic: str, p: int, cutoff: int) -> int:
        """Delete the records of one partition before the first one at or after `cutoff`."""
        start = first = self._start[(topic, p)]
        end = self._end[(topic, p)]
        prefix = _log_prefix(topic, p)
        it = self._log.iter()
        it.seek(prefix)
        kept = ()
        while first < end and it.valid() and it.key().startswith(prefix):
            recs = msgpack.unpackb(it.value(), use_list=False)
            old = sum(1 for _ in takewhile(lambda r: r[4] < cutoff, recs))
            if old < len(recs):
                if old:  # the block expires in part: the rest is kept under its new first offset
                    first, kept = recs[old][0], recs[old:]
                break
            first = recs[-1][0] + 1
            it.next()
        if first == start:
            return 0
        wb = self.store.batch()
        wb.delete_range(prefix + _Q.pack(start), prefix + _Q.pack(first), self._log_handle)
        if kept:
            wb.put(prefix + _Q.pack(first), _pack(kept), self._log_handle)
        wb.put(b"end\0" + prefix, _Q.pack(end), self.store.handle["meta"])
        self.store.write(wb)
        self._start[(topic, p)] = first
        return first - start

    async def close(self) -> None:
        self._log = self._log_handle = None
        self.store.close()


class LocalConsumer:
    """Reads every partition of its topics (one process owns a local:// database)."""

    def __init__(self, broker: LocalBroker, group: str | None, topics: Sequence[str],
                 listener: Listener | None = None):
        self.broker = broker
        self.group = group
        self.topics = list(topics)
        self.listener = listener
        committed = broker.store.offsets(group) if group else {}
        self.positions: dict[tuple[str, int], int] = {}
        for t in self.topics:
            for p in range(broker.partitions(t)):
                self.positions[(t, p)] = max(committed.get((t, p), 0), broker._start[(t, p)])
        self._wake = asyncio.Event()
        self._turn = 0

    async def start(self) -> None:
        if self.listener is not None:
            await self.listener.assigned(list(self.positions))

    def assignment(self) -> dict[tuple[str, int], int]:
        return dict.fromkeys(self.positions, 0)

    def seek(self, tp: tuple[str, int], offset: int) -> None:
        self.positions[tp] = offset

    async def seek_to_end(self) -> None:
        for tp in self.positions:
            self.positions[tp] = self.broker._end[tp]

    def lag(self) -> dict[tuple[str, int], int]:
        end = self.broker._end
        return {tp: end[tp] - pos for tp, pos in self.positions.items()}

    def caught_up(self) -> bool:
        end = self.broker._end
        return all(end[tp] <= pos for tp, pos in self.positions.items())

    def wake(self) -> None:
        self._wake.set()

    async def poll(self, max_records: int, timeout: float) -> list[tuple[str, int, list[Polled]]]:
        out = self._take(max_records)
        if out or timeout <= 0:
            return out
        if self._wake.is_set():
            self._wake.clear()
            return out
        await self.broker.wait(timeout, self._wake)
        self._wake.clear()
        if self.broker.read_only:
            self.broker.refresh()
        return self._take(max_records)

    def _take(self, max_records: int) -> list[tuple[str, int, list[Polled]]]:
        end = self.broker._end
        ready = [tp for tp, pos in self.positions.items() if end[tp] > pos]
        if not ready:
            return []
        # Rotate the starting partition so none starves under load.
        self._turn = (self._turn + 1) % len(ready)
        ready = ready[self._turn:] + ready[:self._turn]
        share = max(1, max_records // len(ready))
        out = []
        for tp in ready:
            recs = self.broker.read(tp[0], tp[1], self.positions[tp], share)
            if recs:
                self.positions[tp] = recs[-1][0] + 1
                out.append((tp[0], tp[1], recs))
        return out

    async def close(self) -> None:
        pass
