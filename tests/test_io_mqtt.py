"""pipes.io.mqtt against the real Mosquitto on loopback (PIPES_TEST_MQTT, default
127.0.0.1:1883): the source with a persistent session, acknowledging QoS 1 messages only
once the checkpoint holding them is durable (so a crash loses nothing), and, with
ack="receipt", the client's default (a crash loses what was not durable yet); the sink.

Every test uses topics and client ids of its own (a uuid) and wipes its sessions.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import aiomqtt
import pytest

import pipes
from pipes.io.mqtt import MQTT, MQTTSink
from helpers import read_topic, run_until

HOST, _, PORT = os.environ.get("PIPES_TEST_MQTT", "127.0.0.1:1883").partition(":")
PORT = int(PORT)


@pytest.fixture
def names():
    """(topic, client id) factories; every session made is wiped afterwards."""
    ids: list[str] = []
    prefix = f"pipes-test/{uuid.uuid4().hex[:10]}"

    def client_id() -> str:
        ids.append(f"pipes-test-{uuid.uuid4().hex[:10]}")
        return ids[-1]

    yield prefix, client_id

    async def wipe():
        for cid in ids:
            async with aiomqtt.Client(HOST, PORT, identifier=cid, clean_session=True):
                pass
    asyncio.run(wipe())


def session(topic: str, cid: str) -> None:
    """Create the persistent session, so the broker queues what is published meanwhile."""
    async def go():
        async with aiomqtt.Client(HOST, PORT, identifier=cid, clean_session=False) as c:
            await c.subscribe(topic, qos=1)
    try:
        asyncio.run(go())
    except aiomqtt.MqttError as e:
        pytest.fail(f"Mosquitto is not reachable at {HOST}:{PORT} ({e})", pytrace=False)


def publish(topic: str, first: int, last: int) -> None:
    async def go():
        async with aiomqtt.Client(HOST, PORT) as c:
            for i in range(first, last + 1):
                await c.publish(topic, b'{"i": %d}' % i, qos=1)
    asyncio.run(go())


def test_source_through_the_runtime_resumes_from_the_session(names, tmp_path):
    prefix, client_id = names
    cid, topic = client_id(), f"{prefix}/orders"
    session(topic, cid)
    publish(topic, 1, 150)  # queued for the session (more than Mosquitto's 20 in flight)
    settings = pipes.Settings(broker=f"local://{tmp_path / 'data'}", commit_interval=0.05)

    def make_app(seen: list) -> pipes.App:
        app = pipes.App("mqttsrc")
        app.source(MQTT(HOST, PORT, topic, client_id=cid, json=True), to="orders", name="src")
        app.sink("orders", lambda m: seen.append(m["i"]), name="seen")
        return app

    first: list = []
    asyncio.run(run_until(make_app(first), settings, first, 150))
    publish(topic, 151, 200)  # while no worker runs
    second: list = []
    asyncio.run(run_until(make_app(second), settings, second, 50, more=0.5))

    assert first == list(range(1, 151))
    assert second == list(range(151, 201))  # all acknowledged at the stop: none redelivered
    got = read_topic(tmp_path / "data", "orders")
    assert [m.value["i"] for m in got] == list(range(1, 201))
    assert {m.headers["mqtt.topic"] for m in got} == {topic.encode()}


def test_ack_at_checkpoint_a_crash_loses_nothing(names):
    prefix, client_id = names
    cid, topic = client_id(), f"{prefix}/x"
    session(topic, cid)
    publish(topic, 1, 10)

    async def life_one() -> None:
        src = MQTT(HOST, PORT, topic, client_id=cid, json=True, follow=False)
        await src.open()
        got = [(await src.read()).value["i"] for _ in range(6)]
        src.committed(src.checkpoint())  # durable: 1-6 acknowledged
        got += [(await src.read()).value["i"] for _ in range(4)]
        assert got == list(range(1, 11))
        # The worker dies: the connection drops without acknowledging 7-10.
        src._client._client.socket().close()
        await asyncio.sleep(0.2)

    async def life_two() -> list:
        src = MQTT(HOST, PORT, topic, client_id=cid, json=True, follow=False, idle=1.0)
        await src.open()
        try:
            out = []
            while (m := await src.read()) is not None:
                out.append(m.value["i"])
            src.committed(src.checkpoint())
            return out
        finally:
            await src.close()

    asyncio.run(life_one())
    assert asyncio.run(life_two()) == [7, 8, 9, 10]  # redelivered by the broker
    assert asyncio.run(life_two()) == []


def test_ack_on_receipt_a_crash_loses_what_was_not_durable(names):
    """The honest caveat: the client's default acknowledges on arrival."""
    prefix, client_id = names
    cid, topic = client_id(), f"{prefix}/x"
    session(topic, cid)
    publish(topic, 1, 5)

    async def life_one() -> None:
        src = MQTT(HOST, PORT, topic, client_id=cid, ack="receipt", json=True, follow=False)
        await src.open()
        assert [(await src.read()).value["i"] for _ in range(5)] == [1, 2, 3, 4, 5]
        src._client._client.socket().close()  # dies before any checkpoint
        await asyncio.sleep(0.2)

    async def life_two() -> list:
        src = MQTT(HOST, PORT, topic, client_id=cid, ack="receipt", json=True, follow=False, idle=1.0)
        await src.open()
        try:
            out = []
            while (m := await src.read()) is not None:
                out.append(m.value["i"])
            return out
        finally:
            await src.close()

    asyncio.run(life_one())
    assert asyncio.run(life_two()) == []  # lost


def test_sink_publishes_every_value(names):
    prefix, client_id = names
    topic = f"{prefix}/out"
    values = [{"i": i} for i in range(120)] + ["text"]

    async def go() -> list:
        async with aiomqtt.Client(HOST, PORT, identifier=client_id()) as c:
            await c.subscribe(topic, qos=1)
            app = pipes.App("mqttsink")
            app.sink("values", MQTTSink(HOST, PORT, topic))
            from pipes.testing import run_app_async
            await run_app_async(app, {"values": values})
            out = []
            while len(out) < len(values):
                m = await asyncio.wait_for(anext(c.messages), 5)
                out.append(bytes(m.payload))
            return out

    assert asyncio.run(go()) == [b'{"i":%d}' % i for i in range(120)] + [b"text"]
