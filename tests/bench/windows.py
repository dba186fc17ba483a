"""Throughput of a tumbling-window count over 10k keys on local:// (and the state it leaves).

    .venv/bin/python -m tests.bench.windows                 # N=500k, 1 partition
    .venv/bin/python -m tests.bench.windows --n 1000000 --partitions 2
    .venv/bin/python -m tests.bench.windows --commit-every 50000   # fewer, larger checkpoints

The input topic is keyed (``app.topic(..., keyed=True)``: producers set the key) and
preloaded outside the timed region: N JSON values ``{"user", "amount"}`` whose broker
timestamps advance 1 ms every 10 messages, so a 10 s window (10 messages per key) closes every 100,000 messages. The
timed region is ``pipes.runtime.run(..., until_done=True)``; msg/s is by the wall clock,
and, because a shared machine is noisy, also per CPU second the process used. The run is then checked:
the emitted counts plus the counts of the windows still open sum to N, every emitted
window is one of the closed ones exactly once, and state holds only the windows that
are still open (one or two per key, none closed).
"""

from __future__ import annotations

import argparse
import asyncio
import pickle
import shutil
import tempfile
import time

import orjson

import pipes
from pipes import windows as w
from pipes.brokers import Changes
from pipes.brokers.local import LocalBroker
from pipes.eventtime import IDX
from pipes.partitioner import split
from pipes.runtime import run
from pipes.store import state_prefix

IN, OUT, NODE = "clicks", "counts", "count.clicks"
KEYS = 10_000
SIZE_MS = 10_000
T0 = 1_700_000_000_000


def build(partitions: int) -> pipes.App:
    app = pipes.App("bench-windows", partitions=partitions)
    app.topic(IN, keyed=True)
    app.window(IN, to=OUT, window=w.tumbling(SIZE_MS / 1000), agg=w.count())
    return app


async def preload(broker: LocalBroker, n: int) -> None:
    parts = broker.partitions(IN)
    for start in range(0, n, 50_000):
        recs = [(f"u{i % KEYS}".encode(), orjson.dumps({"user": f"u{i % KEYS}", "amount": i % 400}), None, T0 + i // 10)
                for i in range(start, min(n, start + 50_000))]
        changes = Changes()
        for p, part in enumerate(split(recs, parts) if parts > 1 else [recs]):
            if part:
                changes.records[(IN, p)] = part
        await broker.commit("bench.preload", changes)


def check(broker: LocalBroker, n: int, partitions: int) -> dict:
    emitted: dict[tuple, int] = {}
    for p in range(partitions):
        off, end = broker.start_offsets(OUT)[p], broker.end_offsets(OUT)[p]
        while off < end:
            recs = broker.read(OUT, p, off, 50_000)
            for _, _, raw, _, _ in recs:
                v = orjson.loads(raw)
                assert (v["key"], v["start"]) not in emitted, f"window emitted twice: {v}"
                emitted[(v["key"], v["start"])] = v["value"]
            off = recs[-1][0] + 1
    open_windows, open_count = 0, 0
    for p in range(partitions):
        prefix = state_prefix(NODE, p)
        for k, raw in broker.store.scan("state", prefix):
            if k[len(prefix):] == IDX:
                continue
            windows = pickle.loads(raw)
            open_windows += len(windows)
            open_count += sum(windows.values())
    assert sum(emitted.values()) + open_count == n, (sum(emitted.values()), open_count, n)
    last_start = (n - 1) // SIZE_MS * SIZE_MS + T0 - T0 % SIZE_MS
    assert open_windows <= 2 * KEYS, f"{open_windows} windows left in state: closed ones were not expired"
    return {"emitted windows": len(emitted), "open windows in state": open_windows, "last window": last_start}


async def bench(n: int, partitions: int, commit_every: int) -> None:
    root = tempfile.mkdtemp(prefix="pipes-bench-windows-")
    try:
        settings = pipes.Settings(broker=f"local://{root}", log_level="WARNING", commit_every=commit_every)
        graph = build(partitions).build(settings)
        broker = LocalBroker(root, settings)
        try:
            await broker.open(graph, list(graph.topologies.values()))
            await preload(broker, n)
            t0, cpu0 = time.perf_counter(), time.process_time()
            await run(graph, settings, until_done=True, broker=broker)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            facts = check(broker, n, partitions)
        finally:
            await broker.close()
        print(f"tumbling-window count, {KEYS} keys, {n} messages, {partitions} partition(s), "
              f"commit_every={commit_every}, local://: "
              f"{n / seconds:,.0f} msg/s ({seconds:.2f} s; {n / cpu:,.0f} msg per CPU second of this process); {facts}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500_000)
    ap.add_argument("--partitions", type=int, default=1)
    ap.add_argument("--commit-every", type=int, default=pipes.Settings().commit_every,
                    help="messages per checkpoint (each checkpoint writes every key touched since the last)")
    args = ap.parse_args()
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(bench(args.n, args.partitions, args.commit_every))


if __name__ == "__main__":
    main()
