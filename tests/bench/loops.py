"""The hand-written aiokafka consume -> produce loops pipes is compared with (run in a child).

* naive: ``getmany`` -> per message orjson.loads, the user function(s), orjson.dumps and
  ``await producer.send(...)`` (one await per message), a commit per getmany batch. The
  loop people write first.
* batched: ``getmany`` -> decode/call/encode the batch -> ``create_batch``/``send_batch``
  -> wait for the acks -> commit. The practical ceiling of a one-process aiokafka loop.
* forward (the latency run only): ``getmany`` with pipes' fetch settings -> the batch
  decoded, called and encoded -> ``send_batch``, never waiting for an ack and never
  committing. No guarantee at all: the floor of end-to-end latency through one aiokafka
  process on this broker.

The keyed count keeps its counts in a dict (no changelog, no durable state): for the
loops it is the same per-message work without what makes pipes' state recoverable.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Callable

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from pipes.brokers.kafka import FETCH_DEFAULTS

from .functions import count, enrich, keep_tenth, stamp, tier

# Large fetches for the batched loop (and the suite's readers). pipes itself fetches 2 MiB a
# partition with a 5 ms wait (pipes/brokers/kafka.py FETCH_DEFAULTS); the wait matters for
# latency only: on Tansu, which holds every fetch for it, the batched loop's p99 is ~100 ms.
FETCH = dict(fetch_max_bytes=64 << 20, max_partition_fetch_bytes=16 << 20, fetch_max_wait_ms=100)
Process = Callable[[bytes], "tuple[bytes | None, bytes] | None"]


def processor(workload: str) -> Process:
    """value bytes -> (key, value bytes) of the output, or None when it is dropped."""
    loads, dumps = orjson.loads, orjson.dumps
    if workload == "stateless":
        return lambda b: (None, dumps(enrich(loads(b))))
    if workload == "chain3":
        return lambda b: (None, dumps(stamp(tier(enrich(loads(b))))))
    if workload == "filter":
        def keep(b: bytes) -> tuple[None, bytes] | None:
            v = keep_tenth(loads(b))
            return None if v is None else (None, dumps(v))
        return keep
    if workload == "keyed":
        states: dict[str, dict] = {}

        def counted(b: bytes) -> tuple[bytes, bytes]:
            v = loads(b)
            user = v["user"]
            state = states.get(user)
            if state is None:
                state = states[user] = {}
            return user.encode(), dumps(count(v, state))
        return counted
    raise ValueError(f"no loop for workload {workload!r}")


async def run_loop(spec: dict) -> dict:
    """Consume spec["in_topic"] until spec["n"] inputs are done (or, in the latency mode,
    until SIGTERM); returns the first-batch and last-ack times (time.monotonic())."""
    batched = spec["runner"] == "batched"
    forward = spec["runner"] == "forward"
    process = processor(spec["workload"])
    n = spec.get("n") or 0
    out_topic = spec["out_topic"]
    fetch = FETCH if batched else FETCH_DEFAULTS if forward else {}
    consumer = AIOKafkaConsumer(spec["in_topic"], bootstrap_servers=spec["bootstrap"], group_id=spec["group"],
                                enable_auto_commit=False, auto_offset_reset="earliest", **fetch)
    producer = AIOKafkaProducer(bootstrap_servers=spec["bootstrap"], acks="all",
                                **(dict(max_batch_size=1 << 20, max_request_size=16 << 20) if batched else {}))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await producer.start()
    await consumer.start()
    t_first = None
    consumed = batches = 0
    try:
        while not stop.is_set() and (not n or consumed < n):
            batch = await consumer.getmany(timeout_ms=200)
            if not batch:
                continue
            if t_first is None:
                t_first = time.monotonic()
            batches += 1
            if forward:
                await _send_batched(producer, out_topic, process, batch, acked=False)
                continue
            if batched:
                await _send_batched(producer, out_topic, process, batch)
            else:
                for msgs in batch.values():
                    for m in msgs:
                        out = process(m.value)
                        if out is not None:
                            await producer.send(out_topic, out[1], key=out[0])
            consumed += sum(len(msgs) for msgs in batch.values())
            await consumer.commit()
        await producer.flush()
        t_last = time.monotonic()
    finally:
        await consumer.stop()
        await producer.stop()
    return {"t_first": t_first, "t_last": t_last, "consumed": consumed, "batches": batches}


async def _send_batched(producer: AIOKafkaProducer, topic: str, process: Process, batch: dict,
                        acked: bool = True) -> None:
    futures = []
    for msgs in batch.values():
        out = producer.create_batch()
        append = out.append
        held = 0
        for m in msgs:
            r = process(m.value)
            if r is None:
                continue
            if append(key=r[0], value=r[1], timestamp=None) is None:
                out.close()
                futures.append(await producer.send_batch(out, topic, partition=0))
                out = producer.create_batch()
                append = out.append
                append(key=r[0], value=r[1], timestamp=None)
                held = 0
            held += 1
        if held:
            out.close()
            futures.append(await producer.send_batch(out, topic, partition=0))
    if acked:
        await asyncio.gather(*futures)
