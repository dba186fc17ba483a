"""Where one pipes run on kafka:// spends its time: polls, processing, checkpoints, produces.

    .venv/bin/python -m tests.bench.timeline stateless 100000            # totals per phase
    .venv/bin/python -m tests.bench.timeline keyed 100000 commit_every=10000 --show   # and the last events

A fresh Tansu, fresh topics and N preloaded inputs (as the suite's kafka:// runs), then
pipes in this process with its runtime's and broker's steps wrapped in timers. msg/s is
timed as the suite times it (first record polled to the last output acknowledged). The
phases overlap (outputs sent ahead and a checkpoint in flight are produced while the next
batch is processed; a send counts from when it is handed over, queued behind the sends
before it, to its acks), so their sums exceed the wall time.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from typing import Any

import pipes
from pipes import checkpoint, runtime
from pipes.brokers import kafka as K

from ..tansu import tansu
from . import kafka as bench_kafka
from .functions import encode_inputs

events: list[tuple[str, float, float]] = []


def _timed(owner: Any, name: str, label: str) -> None:
    f = getattr(owner, name)

    async def timed(*args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            return await f(*args, **kwargs)
        finally:
            events.append((label, began, time.perf_counter()))

    setattr(owner, name, timed)


for owner, name, label in [(runtime.TopologyRunner, "_process", "process"), (checkpoint.Checkpoint, "commit", "checkpoint"),
                           (K.KafkaBroker, "_produce", "produce"), (K.KafkaBroker, "_send", "send"),
                           (K.KafkaConsumer, "poll", "poll"),
                           (K.KafkaConsumer, "commit", "offsets")]:
    _timed(owner, name, label)


async def main(url: str, workload: str, n: int, overrides: dict[str, int], show: bool) -> None:
    spec = await bench_kafka.prepare(url, "pipes", workload, encode_inputs(n), tempfile.mkdtemp())
    base = pipes.Settings().override(on_error="stop", log_level="WARNING", **overrides)
    result = await bench_kafka.run_pipes(spec, base)
    seconds = result["t_last"] - result["t_first"]
    print(f"{workload}: {n / seconds:,.0f} msg/s, {seconds:.3f} s, {result['commits']} checkpoints, "
          f"{result['batches']} batches")
    start = result["t_first"] - time.monotonic() + time.perf_counter()  # the first poll, on this clock
    totals: dict[str, float] = {}
    for label, began, ended in events:
        if ended >= start:
            totals[label] = totals.get(label, 0.0) + ended - max(began, start)
    print("seconds in each phase after the first poll: " + ", ".join(f"{k} {v:.3f}" for k, v in totals.items()))
    if show:
        for label, began, ended in events[-60:]:
            print(f"{label:10} at {1000 * (began - start):9.1f} ms for {1000 * (ended - began):7.2f} ms")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--show"]
    workload = args[0] if args else "stateless"
    count = int(args[1]) if len(args) > 1 else 100_000
    settings = {k: int(v) for k, v in (a.split("=", 1) for a in args[2:])}
    with tansu() as kafka_url:
        asyncio.run(main(kafka_url, workload, count, settings, "--show" in sys.argv))
