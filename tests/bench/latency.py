"""Workload (e): end-to-end latency at a fixed input rate (default 5,000 msg/s).

Latency = consumer receipt of an output minus the producer's timestamp of its input
(``time.time()`` written into the value as ``ts``; the stateless enrich() keeps it).

* kafka:// (:func:`drive`): the runner (pipes, a loop or a peer) runs in its child; the
  suite's own process produces to its input topic at the fixed rate and reads its output
  topic (with a 5 ms fetch wait: Tansu holds a fetch for its whole wait). Warm-up messages
  are sent until the first output comes back (the group has joined) and are not counted.
* local:// and memory:// (:func:`local_app`): the embedded broker lives in the worker's
  process, so the producer is a pipes source (an async generator that keeps the rate)
  and the consumer a pipes sink, all in the child: source -> topic -> enrich() -> topic
  -> sink.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

import pipes
from pipes.runtime import run

from .functions import enrich, make_value

RATE = 5_000
SECONDS = 5.0
WARMUP_ID = -1


def summary(latencies_s: list[float], sent: int) -> dict:
    """p50/p99/max in milliseconds of what came back."""
    if not latencies_s:
        return {"received": 0, "sent": sent}
    q = statistics.quantiles(latencies_s, n=100, method="inclusive")
    return {"p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000, "max_ms": max(latencies_s) * 1000,
            "received": len(latencies_s), "sent": sent}


async def _paced(rate: int, seconds: float, send) -> tuple[int, float]:
    """Call send(i, ts) so that i messages have gone out i / rate seconds after the start."""
    t0 = time.monotonic()
    sent = 0
    total = int(rate * seconds)
    while sent < total:
        due = min(total, int((time.monotonic() - t0) * rate) + 1)
        while sent < due:
            await send(sent, time.time())
            sent += 1
        await asyncio.sleep(0.001)
    return sent, time.monotonic() - t0


async def drive(bootstrap: str, in_topic: str, out_topic: str, rate: int, seconds: float,
                join_timeout: float = 60.0) -> dict:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=5)
    await producer.start()
    await consumer.start()
    try:
        consumer.assign([TopicPartition(out_topic, 0)])
        dumps, loads = orjson.dumps, orjson.loads
        latencies: list[float] = []
        got_warm = asyncio.Event()
        done = asyncio.Event()
        wanted = [0]

        async def read() -> None:
            while not done.is_set():
                batch = await consumer.getmany(timeout_ms=50)
                now = time.time()
                for msgs in batch.values():
                    for m in msgs:
                        v = loads(m.value)
                        if v["id"] == WARMUP_ID:
                            got_warm.set()
                        else:
                            latencies.append(now - v["ts"])
                if wanted[0] and len(latencies) >= wanted[0]:
                    done.set()

        reader = asyncio.create_task(read())
        deadline = time.monotonic() + join_timeout
        while not got_warm.is_set():  # until the runner has joined and answers
            if time.monotonic() > deadline:
                raise TimeoutError(f"no output on {out_topic} within {join_timeout:.0f} s")
            await producer.send(in_topic, dumps({**make_value(0), "id": WARMUP_ID, "ts": time.time()}))
            try:
                await asyncio.wait_for(got_warm.wait(), 0.2)
            except TimeoutError:
                pass
        await asyncio.sleep(0.5)  # warm-up stragglers come back

        async def send(i: int, ts: float) -> None:
            await producer.send(in_topic, dumps({**make_value(i), "ts": ts}))

        sent, took = await _paced(rate, seconds, send)
        wanted[0] = sent
        try:
            await asyncio.wait_for(done.wait(), 15)
        except TimeoutError:
            pass
        done.set()
        await reader
        return {**summary(latencies, sent), "rate": sent / took}  # the rate actually sent
    finally:
        await consumer.stop()
        await producer.stop()


def local_app(rate: int, seconds: float, latencies: list[float]) -> pipes.App:
    """source (at `rate`) -> lat.in -> enrich() -> lat.out -> sink recording receipt - ts."""
    app = pipes.App("bench-latency")

    @app.source(to="lat.in")
    async def paced():
        queue: asyncio.Queue = asyncio.Queue()

        async def send(i: int, ts: float) -> None:
            queue.put_nowait({**make_value(i), "ts": ts})

        pacer = asyncio.create_task(_paced(rate, seconds, send))
        while not (pacer.done() and queue.empty()):
            try:
                yield await asyncio.wait_for(queue.get(), 0.1)
            except TimeoutError:
                pass
        await pacer

    app.transform("lat.in", to="lat.out")(enrich)

    @app.sink("lat.out", batch=5_000)
    def record(rows):
        now = time.time()
        latencies.extend(now - v["ts"] for v in rows)

    return app


async def run_local(kind: str, rate: int, seconds: float, base: pipes.Settings, path: str | None) -> dict:
    """The latency run on local:// (a fresh database in `path`) or memory://."""
    latencies: list[float] = []
    url = "memory://" if kind == "memory" else f"local://{path}"
    settings = base.override(broker=url)
    app = local_app(rate, seconds, latencies)
    await run(app.build(settings), settings, until_done=True)
    return summary(latencies, int(rate * seconds))
