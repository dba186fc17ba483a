"""Transforms and sinks compiled once into batch processors: records in, outputs out.

``process(topic, partition, records, ckpt)`` handles one polled batch of one
partition. Everything that can be decided when the topology starts (sync or async,
generator or not, value or Message, keyed state or not) is decided then.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from .emit import Emitter, decode_headers, key_getter, serializers_of
from .failures import Failures
from .message import Message
from .topology import Graph, Node

if TYPE_CHECKING:  # rocksdict (under pipes.state) cannot load in sub-interpreters
    from .state import StateTable


def _key_bytes(kdumps: Any, key: Any) -> bytes | None:
    return None if key is None else kdumps(key)


async def maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class Decoder:
    """Raw records of a topic -> the values (or Messages) a node takes."""

    def __init__(self, graph: Graph, wants_message: bool):
        self.graph = graph
        self.wants_message = wants_message
        self._cache: dict[str, tuple] = {}

    def for_topic(self, topic: str) -> tuple:
        s = self._cache.get(topic)
        if s is None:
            vs, ks = serializers_of(self.graph, topic)
            s = self._cache[topic] = (vs.loads, ks.loads)
        return s

    def message(self, topic: str, partition: int, rec: tuple, value: Any, key: bytes | None = None) -> Message:
        offset, _, _, headers, ts = rec
        key = rec[1] if key is None else key
        kloads = self.for_topic(topic)[1]
        return Message(value, key=kloads(key) if key is not None else None, headers=decode_headers(headers),
                       topic=topic, partition=partition, offset=offset, timestamp=ts)


class Transform:
    def __init__(self, node: Node, graph: Graph, table: StateTable | None):
        self.node = node
        self.fn = node.target
        self.table = table
        self.decoder = Decoder(graph, node.wants_message)
        self.emitter = Emitter(node, graph)
        self.keyfn = key_getter(node.key)  # key= re-keys by the input value
        self.failures = Failures(node)
        fn = self.fn
        self.is_async = inspect.iscoroutinefunction(fn)
        self.is_gen = inspect.isgeneratorfunction(fn)
        self.is_agen = inspect.isasyncgenfunction(fn)
        # One value (and its key's state) in, at most one result out: the common transform.
        self.plain = not (self.is_async or self.is_gen or self.is_agen or node.wants_message
                          or self.keyfn is not None)
        if node.internal:  # re-keying: values pass through as they are, only keys change
            self.process = self._rekey

    async def _rekey(self, topic: str, partition: int, records: list[tuple], ckpt: Any) -> None:
        loads = self.decoder.for_topic(topic)[0]
        keyfn = self.keyfn
        ((vdumps, kdumps, (out,)),) = self.emitter.buffers(ckpt)
        same = self.decoder.graph.topics[topic].value_serializer.name == self.decoder.graph.topics[
            self.node.outputs[0]].value_serializer.name
        append = out.append
        for rec in records:
            try:
                value = loads(rec[2])
                append((_key_bytes(kdumps, keyfn(value)), rec[2] if same else vdumps(value), rec[3], rec[4]))
            except Exception as e:
                self.failures.handle(e, topic, partition, rec, ckpt)

    async def process(self, topic: str, partition: int, records: list[tuple], ckpt: Any) -> None:
        emitter = self.emitter
        bufs = emitter.buffers(ckpt)
        fast = len(bufs) == 1 and len(bufs[0][2]) == 1
        if fast and self.plain:
            return self._plain(topic, partition, records, ckpt, bufs)
        loads = self.decoder.for_topic(topic)[0]
        wants_message = self.decoder.wants_message
        fn = self.fn
        table = self.table
        is_async, is_gen, is_agen = self.is_async, self.is_gen, self.is_agen
        keyfn = self.keyfn
        if fast:
            vdumps, _, (out,) = bufs[0]
            append = out.append
        for rec in records:
            try:
                value = loads(rec[2])
                key = rec[1] if keyfn is None else _key_bytes(bufs[0][1], keyfn(value))
                if wants_message:
                    value = self.decoder.message(topic, partition, rec, value, key)
                if table is not None:
                    result = fn(value, table.get(partition, key))
                else:
                    result = fn(value)
                if is_async:
                    result = await result
                if result is None:
                    continue
                if is_gen or is_agen:
                    staged: list = []  # a generator failing halfway leaves nothing behind
                    if is_agen:
                        async for item in result:
                            if item is not None:
                                emitter.encode(item, key, rec[3], rec[4], bufs, ckpt, staged, topic)
                    else:
                        for item in result:
                            if item is not None:
                                emitter.encode(item, key, rec[3], rec[4], bufs, ckpt, staged, topic)
                    for buf, out_rec in staged:
                        buf.append(out_rec)
                elif fast and type(result) is not Message:
                    append((key, vdumps(result), rec[3], rec[4]))
                else:
                    emitter.encode(result, key, rec[3], rec[4], bufs, ckpt, None, topic)
            except Exception as e:
                self.failures.handle(e, topic, partition, rec, ckpt)

    def _plain(self, topic: str, partition: int, records: list[tuple], ckpt: Any, bufs: list) -> None:
        """process() of a plain transform to one topic: the same steps, nothing else checked."""
        loads = self.decoder.for_topic(topic)[0]
        fn = self.fn
        state = self.table.get if self.table is not None else None
        vdumps, _, (out,) = bufs[0]
        append = out.append
        encode = self.emitter.encode
        for rec in records:
            try:
                result = fn(loads(rec[2])) if state is None else fn(loads(rec[2]), state(partition, rec[1]))
                if result is None:
                    continue
                if type(result) is Message:
                    encode(result, rec[1], rec[3], rec[4], bufs, ckpt, None, topic)
                else:
                    append((rec[1], vdumps(result), rec[3], rec[4]))
            except Exception as e:
                self.failures.handle(e, topic, partition, rec, ckpt)


class Sink:
    """A function called per value or with lists of up to `batch` values, or an object with
    ``write(batch)`` (and optionally ``flush()``, ``open()``, ``close()``)."""

    def __init__(self, node: Node, graph: Graph):
        self.node = node
        target = node.target
        self.is_object = hasattr(target, "write")
        self.call = target.write if self.is_object else target
        self.batch = node.batch
        self.wants_message = node.wants_message or bool(getattr(target, "wants_messages", False))
        self.decoder = Decoder(graph, self.wants_message)
        self.failures = Failures(node)
        # Buffered: (value, topic, partition, record) until `batch` is reached or the checkpoint.
        self.pending: list[tuple] = []

    async def open(self) -> None:
        if self.is_object and hasattr(self.node.target, "open"):
            await maybe_await(self.node.target.open())

    async def close(self) -> None:
        if self.is_object and hasattr(self.node.target, "close"):
            await maybe_await(self.node.target.close())

    async def process(self, topic: str, partition: int, records: list[tuple], ckpt: Any) -> None:
        loads = self.decoder.for_topic(topic)[0]
        items = []
        for rec in records:
            try:
                value = loads(rec[2])
                if self.wants_message:
                    value = self.decoder.message(topic, partition, rec, value)
            except Exception as e:
                self.failures.handle(e, topic, partition, rec, ckpt)
                continue
            items.append((value, topic, partition, rec))
        if self.batch is None:
            for item in items:
                await self._deliver([item], ckpt)
            return
        self.pending += items
        while len(self.pending) >= self.batch:
            chunk, self.pending = self.pending[:self.batch], self.pending[self.batch:]
            await self._deliver(chunk, ckpt)

    async def _deliver(self, items: list[tuple], ckpt: Any) -> None:
        try:
            if self.batch is None:
                await maybe_await(self.call(items[0][0]))
            else:
                await maybe_await(self.call([i[0] for i in items]))
        except Exception as e:
            for _, topic, partition, rec in items:
                self.failures.handle(e, topic, partition, rec, ckpt)

    async def committed(self) -> None:
        """The checkpoint after the last flush() is durable: an object sink may want to know."""
        if self.is_object and hasattr(self.node.target, "committed"):
            await maybe_await(self.node.target.committed())

    async def flush(self, ckpt: Any) -> None:
        if self.pending:
            chunk, self.pending = self.pending, []
            await self._deliver(chunk, ckpt)
        if self.is_object and hasattr(self.node.target, "flush"):
            await maybe_await(self.node.target.flush())


def processor(node: Node, graph: Graph, table: StateTable | None) -> Any:
    """The batch processor of a transform node, chosen once when the topology starts.

    A target with a ``pipes_processor(node, graph, table)`` method (windows, joins and
    other operators built on this API) makes its own. Such a processor has ``node``,
    ``failures`` and ``async process(topic, partition, records, ckpt)``; it may also have
    ``async tick(now, ckpt, assigned)``, called about every ``tick_interval`` seconds of
    wall-clock time with the assigned ``{(topic, partition): first offset}``, and
    ``async open()``/``async close()``. A transform with a ``mode`` other than ``global``
    runs in a pool (:mod:`pipes.modes`).
    """
    make = getattr(node.target, "pipes_processor", None)
    if make is not None:
        return make(node, graph, table)
    if node.mode != "global":
        from .modes import PooledTransform

        return PooledTransform(node, graph, table)
    return Transform(node, graph, table)
