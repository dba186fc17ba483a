"""Test your app without a broker: run it on memory:// with given inputs, deterministically.

    from pipes.testing import run_app

    result = run_app(app, {"orders": [{"id": 1, "amount": 250}]})
    assert result["big_orders"] == [{"id": 1, "amount": 250}]
    assert result.state("total")["c1"] == {"sum": 250}
"""

from __future__ import annotations

import asyncio
import pickle
import time
from typing import Any

from .app import App
from .brokers import Changes
from .brokers.local import LocalBroker
from .emit import Emitter, decode_headers, serializers_of
from .message import Message
from .runtime import Report, run
from .store import state_prefix
from .topology import Graph, Node


class Result:
    """Every topic's messages and every stateful node's state after a run."""

    def __init__(self, graph: Graph, topics: dict[str, list[Message]], state: dict[str, dict], report: Report):
        self.graph = graph
        self._topics = topics
        self._state = state
        self.report = report

    def __getitem__(self, topic: str) -> list[Any]:
        """The values on `topic`, partition by partition, in offset order."""
        return [m.value for m in self.messages(topic)]

    def messages(self, topic: str) -> list[Message]:
        if topic not in self._topics:
            raise KeyError(f"no topic {topic!r}; topics: {', '.join(sorted(self._topics))}")
        return self._topics[topic]

    @property
    def topics(self) -> list[str]:
        return sorted(self._topics)

    def state(self, node: str) -> dict[Any, dict]:
        """Keyed state of a stateful node: decoded key -> state dict."""
        return self._state[node]


def run_app(app: App, inputs: dict[str, list[Any]] | None = None, *, topology: str | list[str] | None = None,
            **settings: Any) -> Result:
    """Run `app` (or some of its topologies) on memory:// with `inputs` (values or
    pipes.Message per topic) until every source is exhausted and every topic consumed."""
    return asyncio.run(run_app_async(app, inputs, topology=topology, **settings))


async def run_app_async(app: App, inputs: dict[str, list[Any]] | None = None, *,
                        topology: str | list[str] | None = None, **settings: Any) -> Result:
    s = app.settings.override(broker="memory://", **settings)
    graph = app.build(s)
    broker = LocalBroker(None, s, url="memory://")
    try:
        await broker.open(graph, list(graph.topologies.values()))
        if inputs:
            await _feed(broker, graph, inputs)
        names = [topology] if isinstance(topology, str) else topology
        report = await run(graph, s, topologies=names, until_done=True, broker=broker)
        return Result(graph, _read_topics(broker, graph), _read_state(broker, graph), report)
    finally:
        await broker.close()


async def _feed(broker: LocalBroker, graph: Graph, inputs: dict[str, list[Any]]) -> None:
    now = int(time.time() * 1000)
    ckpt = _Buffers()
    for topic, values in inputs.items():
        emitter = Emitter(Node(id="pipes.testing", kind="source", topology="", target=None, outputs=(topic,)), graph)
        bufs = emitter.buffers(ckpt)
        for v in values:
            emitter.encode(v, None, None, now, bufs, ckpt)
    await broker.commit("pipes.testing", Changes(outputs=ckpt.outputs))


class _Buffers:
    def __init__(self) -> None:
        self.outputs: dict[str, list] = {}

    def buffer(self, topic: str, scope: tuple | None = None) -> list:
        return self.outputs.setdefault(topic, [])


def read_messages(broker: LocalBroker, graph: Graph, topic: str) -> list[Message]:
    vs, ks = serializers_of(graph, topic)
    out = []
    for p in range(broker.partitions(topic)):
        offset = broker.start_offsets(topic)[p]
        while True:
            recs = broker.read(topic, p, offset, 10_000)
            if not recs:
                break
            for off, key, value, headers, ts in recs:
                out.append(Message(vs.loads(value), key=ks.loads(key) if key is not None else None,
                                   headers=decode_headers(headers), topic=topic, partition=p, offset=off,
                                   timestamp=ts))
            offset = recs[-1][0] + 1
    return out


def _read_topics(broker: LocalBroker, graph: Graph) -> dict[str, list[Message]]:
    return {t: read_messages(broker, graph, t) for t in sorted(broker.topics())}


def _read_state(broker: LocalBroker, graph: Graph) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for node in graph.nodes():
        if not node.stateful:
            continue
        ks = serializers_of(graph, node.inputs[0])[1]
        table: dict[Any, dict] = {}
        for p in range(max(broker.partitions(t) for t in node.inputs)):
            prefix = state_prefix(node.id, p)
            for k, v in broker.store.scan("state", prefix):
                table[ks.loads(k[len(prefix):])] = pickle.loads(v)
        out[node.id] = table
    return out
