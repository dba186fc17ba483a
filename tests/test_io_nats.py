"""pipes.io.nats against the real NATS server with JetStream on loopback
(PIPES_TEST_NATS, default nats://127.0.0.1:4222): the durable-consumer source acknowledges
only what a durable checkpoint covers and resumes after a stop and after a crash without
loss; the sink publishes with deduplication ids.

Every test uses a stream and subjects of its own (a uuid) and deletes the stream.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import nats
import pytest

import pipes
from pipes.io.nats import NATS, NATSSink
from pipes.testing import run_app
from helpers import read_topic, run_until

URL = os.environ.get("PIPES_TEST_NATS", "nats://127.0.0.1:4222")


async def _js(fn):
    nc = await nats.connect(URL, allow_reconnect=False, connect_timeout=3)
    try:
        return await fn(nc.jetstream())
    finally:
        await nc.close()


def js(fn):
    return asyncio.run(_js(fn))


@pytest.fixture
def stream():
    """A fresh stream capturing subject `<name>.>`; deleted afterwards."""
    name = f"pipes_{uuid.uuid4().hex[:10]}"
    try:
        js(lambda j: j.add_stream(name=name, subjects=[f"{name}.>"]))
    except Exception as e:
        pytest.fail(f"NATS JetStream is not reachable at {URL} ({type(e).__name__}: {e})", pytrace=False)
    yield name
    js(lambda j: j.delete_stream(name))


def publish(subject: str, first: int, last: int) -> None:
    async def go(j):
        for i in range(first, last + 1):
            await j.publish(subject, b'{"i": %d}' % i, headers={"origin": "test"})
    js(go)


def consumer(stream: str, durable: str):
    return js(lambda j: j.consumer_info(stream, durable))


async def aconsumer(stream: str, durable: str):
    return await _js(lambda j: j.consumer_info(stream, durable))


def test_source_through_the_runtime_resumes_after_a_stop(stream, tmp_path):
    subject = f"{stream}.orders"
    publish(subject, 1, 300)
    settings = pipes.Settings(broker=f"local://{tmp_path / 'data'}", commit_interval=0.05)

    def make_app(seen: list) -> pipes.App:
        app = pipes.App("natsrc")
        app.source(NATS(URL, f"{stream}.>", stream=stream, durable="pipes", json=True, timeout=0.1, batch=50),
                   to="orders", name="src")
        app.sink("orders", lambda m: seen.append(m["i"]), name="seen")
        return app

    first: list = []
    asyncio.run(run_until(make_app(first), settings, first, 300))
    info = consumer(stream, "pipes")
    assert info.num_ack_pending == 0 and info.num_pending == 0  # all acknowledged at the last checkpoint
    publish(subject, 301, 380)  # while no worker runs
    second: list = []
    asyncio.run(run_until(make_app(second), settings, second, 80))

    assert first == list(range(1, 301)) and second == list(range(301, 381))
    got = read_topic(tmp_path / "data", "orders")
    assert [m.value["i"] for m in got] == list(range(1, 381))
    assert [int(m.headers["nats.seq"]) for m in got] == list(range(1, 381))
    assert {m.headers["origin"] for m in got} == {b"test"} and got[0].headers["nats.subject"] == subject.encode()
    info = consumer(stream, "pipes")
    assert info.num_ack_pending == 0 and info.num_pending == 0


def test_source_acks_only_what_a_durable_checkpoint_covers_and_a_crash_loses_nothing(stream):
    subject = f"{stream}.x"
    publish(subject, 1, 10)

    def source() -> NATS:
        return NATS(URL, subject, stream=stream, durable="d", json=True, batch=4, timeout=2.5, ack_wait=1,
                    follow=False)

    async def life_one() -> dict:
        src = source()
        await src.open()
        got = [(await src.read()).value["i"] for _ in range(6)]
        at_six = src.checkpoint()
        got += [(await src.read()).value["i"] for _ in range(4)]
        assert got == list(range(1, 11))
        assert (await aconsumer(stream, "d")).num_ack_pending == 10  # delivered, none acknowledged
        await src.committed(at_six)  # the checkpoint holding the first six is durable
        assert (await aconsumer(stream, "d")).num_ack_pending == 4
        await src._nc.close()  # the worker dies: 7-10 never acknowledged
        return at_six

    at_six = asyncio.run(life_one())
    publish(subject, 11, 13)

    async def life_two(state: dict) -> list:
        src = source()
        src.restore(state)
        await src.open()
        try:
            out = []
            while (m := await src.read()) is not None:
                out.append(m.value["i"])
            await src.committed(src.checkpoint())
            return out
        finally:
            await src.close()

    # From the durable checkpoint (after 6): 7-10 are redelivered (after ack_wait), then 11-13.
    assert sorted(asyncio.run(life_two(at_six))) == list(range(7, 14))
    info = consumer(stream, "d")
    assert info.num_ack_pending == 0 and info.num_pending == 0


def test_source_keeps_messages_in_progress_while_they_wait_for_a_checkpoint(stream):
    subject = f"{stream}.x"
    publish(subject, 1, 3)

    async def go() -> None:
        src = NATS(URL, subject, stream=stream, durable="slow", json=True, timeout=0.5, ack_wait=1, follow=False)
        await src.open()
        try:
            assert [(await src.read()).value["i"] for _ in range(3)] == [1, 2, 3]
            await asyncio.sleep(2.5)  # past ack_wait twice: kept in progress, not redelivered
            assert await src.read() is None
            assert (await aconsumer(stream, "slow")).num_redelivered == 0
            await src.committed(src.checkpoint())
        finally:
            await src.close()

    asyncio.run(go())
    assert consumer(stream, "slow").num_ack_pending == 0


def test_sink_publishes_and_a_replay_is_deduplicated(stream):
    subject = f"{stream}.out"
    values = [{"i": i} for i in range(200)] + ["text"]
    app = pipes.App("natssink")
    app.sink("values", NATSSink(URL, subject))
    run_app(app, {"values": values})
    run_app(app, {"values": values})  # the same offsets again: dropped by the stream

    async def read_all(j):
        sub = await j.pull_subscribe(subject, stream=stream)
        out = []
        while True:
            try:
                msgs = await sub.fetch(100, timeout=0.5)
            except TimeoutError:  # nats-py raises its own or, past its deadline, the plain one
                return out
            out += [m.data for m in msgs]

    got = js(read_all)
    assert got == [b'{"i":%d}' % i for i in range(200)] + [b"text"]
