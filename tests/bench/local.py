"""pipes on local:// and memory:// in one process (run by child.py): a fresh database (a
temporary directory for local://), the input topic preloaded outside the timed region, then
``pipes.runtime.run(graph, settings, until_done=True)`` timed from its start until the
checkpoint that makes the last expected output durable (msg/s = input messages / that
time). The output is then read back and checked message by message, with the committed
offsets and keyed state, so a run that drops or duplicates messages fails loudly.
"""

from __future__ import annotations

import cProfile
import gc
import pickle
import shutil
import tempfile
import time
from typing import Any

import pipes
from pipes.brokers import Changes
from pipes.brokers.local import LocalBroker
from pipes.runtime import run

from .functions import user_of
from .workloads import IN, OUT, Workload, Wrong

PRELOAD_CHUNK = 50_000


async def _preload(broker: LocalBroker, inputs: list[bytes], keyed: bool) -> None:
    from pipes.partitioner import split

    parts = broker.partitions(IN)
    ts = int(time.time() * 1000)
    for start in range(0, len(inputs), PRELOAD_CHUNK):
        chunk = inputs[start:start + PRELOAD_CHUNK]
        if keyed:
            recs = [(user_of(i).encode(), v, None, ts) for i, v in enumerate(chunk, start)]
        else:
            recs = [(None, v, None, ts) for v in chunk]
        changes = Changes()
        for p, part in enumerate(split(recs, parts) if parts > 1 else [recs]):
            if part:
                changes.records[(IN, p)] = part
        await broker.commit("bench.preload", changes)


def _read_topic(broker: LocalBroker, topic: str) -> list[tuple[int, bytes | None, bytes]]:
    out = []
    ends = broker.end_offsets(topic)
    for p, off in broker.start_offsets(topic).items():
        while off < ends[p]:
            recs = broker.read(topic, p, off, 50_000)
            if not recs:
                break
            out += [(p, r[1], r[2]) for r in recs]
            off = recs[-1][0] + 1
    return out


def _verify(wl: Workload, n: int, broker: LocalBroker, graph: Any, report: Any) -> None:
    """Raises Wrong unless the committed outputs, offsets and state are exactly right."""
    from pipes.store import state_prefix

    if not wl.preload and report.produced != n:
        raise Wrong(f"the source produced {report.produced} messages, expected {n}")
    wl.check(_read_topic(broker, OUT), n)
    # Every input topic consumed, and the consumed offsets committed.
    topology = next(iter(graph.topologies.values()))
    committed = broker.store.offsets(topology.group)
    for topic in topology.input_topics:
        for p, end in broker.end_offsets(topic).items():
            if committed.get((topic, p), 0) != end:
                raise Wrong(f"committed offset of {topic}[{p}] is {committed.get((topic, p))}, its end is {end}")
    for topic in topology.input_topics:  # the input and every intermediate topic hold n records
        total = sum(broker.end_offsets(topic).values())
        if total != n:
            raise Wrong(f"topic {topic} has {total} records, expected {n}")
    dlq = {t: sum(broker.end_offsets(t).values()) for t in broker.topics() if t.endswith(".dlq")}
    if any(dlq.values()):
        raise Wrong(f"dead letters: {dlq}")
    if wl.stateful_node:
        state = {}
        node = graph.node(wl.stateful_node)
        for p in range(max(broker.partitions(t) for t in node.inputs)):
            prefix = state_prefix(wl.stateful_node, p)
            for k, v in broker.store.scan("state", prefix):
                state[k[len(prefix):].decode()] = pickle.loads(v)
        from .workloads import check_keyed_state

        check_keyed_state(state, n)


async def run_pipes(wl: Workload, n: int, kind: str, inputs: list[bytes], base: pipes.Settings,
                    root: str | None, profiler: cProfile.Profile | None = None) -> dict:
    path = None if kind == "memory" else tempfile.mkdtemp(prefix=f"pipes-bench-{wl.name}-", dir=root)
    url = "memory://" if path is None else f"local://{path}"
    settings = base.override(broker=url)
    app = wl.app(n)
    graph = app.build(settings)
    broker = LocalBroker(path, settings, url=url)
    try:
        await broker.open(graph, list(graph.topologies.values()))
        t = time.perf_counter()
        if wl.preload:
            await _preload(broker, inputs, wl.keyed_input)
        preload_s = time.perf_counter() - t

        # When did the checkpoint holding the last expected output land?
        expected = wl.expected(n)
        done_at: list[float] = []
        commit = broker.commit

        async def timed_commit(group: str, changes: Changes) -> None:
            await commit(group, changes)
            if not done_at and sum(broker.end_offsets(OUT).values()) >= expected:
                done_at.append(time.perf_counter())

        broker.commit = timed_commit
        gc.collect()
        if profiler is not None:
            profiler.enable()
        t0 = time.perf_counter()
        try:
            report = await run(graph, settings, until_done=True, broker=broker)
        finally:
            wall = time.perf_counter() - t0
            if profiler is not None:
                profiler.disable()
            broker.commit = commit
        if not done_at:
            raise Wrong(f"the run ended with {sum(broker.end_offsets(OUT).values())} outputs, expected {expected}")
        seconds = done_at[0] - t0
        _verify(wl, n, broker, graph, report)
        return {"seconds": seconds, "wall": wall, "msg_s": n / seconds, "commits": report.commits,
                "processed": report.processed, "produced": report.produced, "preload_s": preload_s}
    finally:
        await broker.close()
        if path:
            shutil.rmtree(path, ignore_errors=True)

