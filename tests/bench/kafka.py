"""kafka:// measurements on one Tansu broker (tests/tansu.py; PIPES_TEST_KAFKA=kafka://host:port
uses another broker): topics, preloading, reading back and verifying, and pipes' child runner.

Each measurement gets fresh topics and a fresh group (unique names). The suite creates the
input and output topics and preloads N ~40-byte JSON values into the one-partition input
topic with send_batch, outside the timing; a child process (child.py, or a peer in
.venv-peers) then consumes it and reports when it handed the first record to user code and
when its last output was acknowledged (``time.monotonic()``, one clock for every process);
the suite then reads the output topic back in full and checks every value (and for pipes
and the loops the group's committed offsets, for pipes also its changelog and RocksDB state).
"""

from __future__ import annotations

import asyncio
import cProfile
import os
import pickle
import time
import uuid
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

import pipes
from pipes.brokers.kafka import KafkaBroker, changelog_topic, parse_url
from pipes.runtime import run
from pipes.store import Store, state_prefix

from .functions import count, enrich, expected_outputs, keep_tenth, stamp, tier
from .loops import FETCH
from .workloads import Wrong, check_chain3, check_filter, check_keyed, check_keyed_state, check_stateless

CHECKS = {"stateless": check_stateless, "chain3": check_chain3, "filter": check_filter, "keyed": check_keyed}


def unique(what: str) -> str:
    return f"bench-{what}-{uuid.uuid4().hex[:8]}"


# -- topics --------------------------------------------------------------------------------
# Set explicitly: Quix derives its repartition topics' config from the input topic's, and
# Tansu describes only the configs a topic was created with.
TOPIC_CONFIG = {"retention.ms": "604800000", "retention.bytes": "-1"}


async def create_topics(bootstrap: str, topics: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, 1, 1, topic_configs=TOPIC_CONFIG) for t in topics])
    finally:
        await admin.close()


async def preload(bootstrap: str, topic: str, inputs: list[bytes]) -> float:
    """Write the inputs to partition 0 of `topic` in full batches; returns the seconds it took."""
    t = time.perf_counter()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_batch_size=1 << 20,
                                max_request_size=16 << 20)
    await producer.start()
    try:
        for _ in range(50):  # the new topic's metadata
            if await producer.partitions_for(topic):
                break
            await asyncio.sleep(0.1)
        ts = int(time.time() * 1000)
        futures = []
        batch = producer.create_batch()
        for v in inputs:
            if batch.append(key=None, value=v, timestamp=ts) is None:
                batch.close()
                futures.append(await producer.send_batch(batch, topic, partition=0))
                batch = producer.create_batch()
                batch.append(key=None, value=v, timestamp=ts)
        batch.close()
        futures.append(await producer.send_batch(batch, topic, partition=0))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return time.perf_counter() - t


async def read_topic(bootstrap: str, topic: str) -> tuple[list[tuple[int, bytes | None, bytes | None]], dict[int, int]]:
    """Every record of `topic` as (partition, key, value), read up to each partition's high
    watermark as fetches report it (Tansu's ListOffsets(latest) is inexact), and those marks."""
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                         auto_offset_reset="earliest", **FETCH)
    await c.start()
    try:
        await c.topics()
        parts = sorted(c.partitions_for_topic(topic) or ())
        if not parts:
            raise Wrong(f"no topic {topic}")
        tps = [TopicPartition(topic, p) for p in parts]
        c.assign(tps)
        out: list = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            batch = await c.getmany(timeout_ms=200)
            for tp, msgs in batch.items():
                out += [(tp.partition, m.key, m.value) for m in msgs]
            marks = {tp.partition: c.highwater(tp) for tp in tps}
            if all(hw is not None for hw in marks.values()):
                if all([await c.position(tp) >= marks[tp.partition] for tp in tps]):
                    return out, marks
        raise Wrong(f"could not read {topic} to its end")
    finally:
        await c.stop()


async def committed(bootstrap: str, group: str, tps: list[tuple[str, int]]) -> dict[tuple[str, int], int | None]:
    """The group's committed offsets (OffsetFetch through a consumer of the group that never
    joins it: Tansu closes the connection on the admin client's OffsetFetch)."""
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await c.start()
    try:
        return {tp: await c.committed(TopicPartition(*tp)) for tp in tps}
    finally:
        await c.stop()


async def prepare(url: str, runner: str, workload: str, inputs: list[bytes] | None, root: str) -> dict:
    """Fresh topics (the input preloaded with `inputs` unless None) and the spec a child runs."""
    bootstrap, _ = parse_url(url)
    name = unique(f"{runner}-{workload}")
    spec = {"runner": runner, "workload": workload, "url": url, "bootstrap": bootstrap, "name": name,
            "in_topic": f"{name}.in", "out_topic": f"{name}.out", "group": f"{name}.group",
            "n": len(inputs) if inputs is not None else 0, "data_dir": os.path.join(root, name)}
    spec["expected"] = expected_outputs(workload, spec["n"])
    await create_topics(bootstrap, [spec["in_topic"], spec["out_topic"]])
    spec["preload_s"] = await preload(bootstrap, spec["in_topic"], inputs) if inputs else 0.0
    return spec


async def verify(spec: dict, result: dict) -> None:
    """Raise Wrong unless the output topic holds exactly the workload's outputs; for pipes
    and the loops also the group's committed offsets, for pipes its keyed state."""
    bootstrap, workload, n = spec["bootstrap"], spec["workload"], spec["n"]
    outputs, _ = await read_topic(bootstrap, spec["out_topic"])
    CHECKS[workload](outputs, n)  # exact count, and every value
    if spec["runner"] in ("naive", "batched"):
        offsets = await committed(bootstrap, spec["group"], [(spec["in_topic"], 0)])
        if offsets[(spec["in_topic"], 0)] != n:
            raise Wrong(f"group committed {offsets}, expected offset {n}")
    if spec["runner"] == "pipes":
        await _verify_pipes(spec, result)


async def _verify_pipes(spec: dict, result: dict) -> None:
    bootstrap, n = spec["bootstrap"], spec["n"]
    graph = pipes_app(spec).build(pipes.Settings(broker=spec["url"]))
    topology = next(iter(graph.topologies.values()))
    for topic in topology.input_topics:  # the input and every intermediate topic: all consumed
        _, marks = await read_topic(bootstrap, topic)
        offsets = await committed(bootstrap, topology.group, [(topic, p) for p in marks])
        if sum(marks.values()) != n:
            raise Wrong(f"topic {topic} holds {marks}, expected {n} records")
        for p, hw in marks.items():
            if offsets.get((topic, p)) != hw:
                raise Wrong(f"group {topology.group} committed {offsets.get((topic, p))} for {topic}[{p}], "
                            f"its end is {hw}")
    if result["processed"] != n * len(topology.input_topics):
        raise Wrong(f"pipes processed {result['processed']} messages, expected {n * len(topology.input_topics)}")
    stateful = [node.id for node in topology.nodes if node.stateful]
    for node in stateful:
        logged, _ = await read_topic(bootstrap, changelog_topic(spec["name"], node))
        last: dict[str, dict] = {}
        for _, key, value in logged:
            last[key.decode()] = pickle.loads(value) if value is not None else {}
        check_keyed_state({k: v for k, v in last.items() if v}, n)  # the changelog's latest per key
        store = Store(spec["data_dir"])
        try:
            prefix = state_prefix(node, 0)
            check_keyed_state({k[len(prefix):].decode(): pickle.loads(v) for k, v in store.scan("state", prefix)},
                              n)  # the worker's RocksDB
        finally:
            store.close()


# -- pipes, in the child ---------------------------------------------------------------------
def pipes_app(spec: dict) -> pipes.App:
    name, src, out = spec["name"], spec["in_topic"], spec["out_topic"]
    app = pipes.App(name)
    app.topic(src, partitions=1)
    workload = spec["workload"]
    if workload == "stateless":
        app.transform(src, to=out)(enrich)
    elif workload == "chain3":
        app.transform(src, to=f"{name}.a")(enrich)
        app.transform(f"{name}.a", to=f"{name}.b")(tier)
        app.transform(f"{name}.b", to=out)(stamp)
    elif workload == "filter":
        app.transform(src, to=out)(keep_tenth)
    elif workload == "keyed":
        app.transform(src, to=out, key="user")(count)
    else:
        raise ValueError(f"no pipes app for workload {workload!r}")
    return app


async def run_pipes(spec: dict, base: pipes.Settings, profiler: cProfile.Profile | None = None) -> dict:
    """pipes.runtime.run on kafka://: until the last output is durable (throughput: timed from
    the first polled record to the checkpoint whose produce completes the output topic), or
    until SIGTERM (latency)."""
    out_topic = spec["out_topic"]
    settings = base.override(broker=spec["url"], data_dir=spec["data_dir"])
    graph = pipes_app(spec).build(settings)
    broker = KafkaBroker(spec["name"], settings)
    first: list[float] = []
    done_at: list[float] = []
    polls = [0]
    make_consumer, commit = broker.consumer, broker.commit

    def consumer(group: str | None, topics: Any, listener: Any = None) -> Any:
        c = make_consumer(group, topics, listener)
        poll = c.poll

        async def timed_poll(max_records: int, timeout: float) -> list:
            polled = await poll(max_records, timeout)
            if polled:
                polls[0] += 1
                if not first:
                    first.append(time.monotonic())
                    if profiler is not None:
                        profiler.enable()
            return polled

        c.poll = timed_poll
        return c

    expected = spec["expected"]

    async def timed_commit(group: str, changes: Any) -> None:
        await commit(group, changes)
        if not done_at and expected and broker.produced.get((out_topic, 0), 0) >= expected:
            done_at.append(time.monotonic())
            if profiler is not None:
                profiler.disable()

    broker.consumer, broker.commit = consumer, timed_commit
    try:
        if spec.get("mode") == "latency":
            report = await run(graph, settings, broker=broker, install_signals=True)
        else:
            report = await run(graph, settings, until_done=True, broker=broker)
    finally:
        if profiler is not None:
            profiler.disable()
        await broker.close()
    if spec.get("mode") != "latency" and not done_at:
        raise Wrong(f"pipes {spec['workload']}: the run ended with {broker.produced.get((out_topic, 0), 0)} of "
                    f"{expected} outputs")
    return {"t_first": first[0] if first else None, "t_last": done_at[0] if done_at else None,
            "commits": report.commits, "processed": report.processed, "batches": polls[0]}

