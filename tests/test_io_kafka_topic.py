"""pipes.io.kafka_topic against a Kafka-protocol broker on loopback (Tansu, the session
fixture `kafka_url`) as "another cluster" than the app's, which runs on local://: the
source resumes from the offsets in pipes' checkpoint (each record once across restarts),
restore() seeks, the group hears the durable offsets; the sink produces.

Every test uses topics of its own (a uuid in the name).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

import pipes
from pipes.io.kafka_topic import KafkaTopic, KafkaTopicSink
from pipes.testing import run_app_async
from helpers import read_topic, run_until


def _bootstrap(url: str) -> str:
    return url.removeprefix("kafka://")


async def create(url: str, topic: str, partitions: int = 3) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=_bootstrap(url))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()


async def produce(url: str, topic: str, first: int, last: int, partitions: int = 3) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=_bootstrap(url), acks="all")
    await producer.start()
    try:
        for i in range(first, last + 1):
            await producer.send_and_wait(topic, b'{"i": %d}' % i, key=b"k%d" % (i % partitions),
                                         partition=i % partitions, headers=[("origin", b"test")])
    finally:
        await producer.stop()


@pytest.fixture
def topic(kafka_url):
    name = f"other-{uuid.uuid4().hex[:10]}"
    asyncio.run(create(kafka_url, name))
    return name


def by_partition(values: list[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i in values:
        out.setdefault(i % 3, []).append(i)
    return out


def test_source_resumes_from_pipes_checkpoint_each_record_once(kafka_url, topic, tmp_path):
    asyncio.run(produce(kafka_url, topic, 1, 300))
    settings = pipes.Settings(broker=f"local://{tmp_path / 'data'}", commit_interval=0.05)

    def make_app(seen: list) -> pipes.App:
        app = pipes.App("ktsrc")
        app.source(KafkaTopic(kafka_url, topic, group="pipes-mirror", json=True, poll=0.1), to="copy",
                   name="src")
        app.sink("copy", lambda m: seen.append(m["i"]), name="seen")
        return app

    first: list = []
    asyncio.run(run_until(make_app(first), settings, first, 300, more=0.3))
    asyncio.run(produce(kafka_url, topic, 301, 390))  # while no worker runs
    second: list = []
    asyncio.run(run_until(make_app(second), settings, second, 90, more=0.3))

    assert sorted(first) == list(range(1, 301)) and sorted(second) == list(range(301, 391))
    got = read_topic(tmp_path / "data", "copy")
    values = [m.value["i"] for m in got]
    assert sorted(values) == list(range(1, 391))  # each record once
    assert by_partition(values) == by_partition(list(range(1, 391)))  # in order within a partition
    for m in got:
        i = m.value["i"]
        assert m.key == f"k{i % 3}" and m.headers["kafka.partition"] == str(i % 3).encode()
        assert m.headers["origin"] == b"test"

    async def group_offsets() -> dict:
        c = AIOKafkaConsumer(bootstrap_servers=_bootstrap(kafka_url), group_id="pipes-mirror",
                             enable_auto_commit=False)
        await c.start()
        try:
            return {p: await c.committed(TopicPartition(topic, p)) for p in range(3)}
        finally:
            await c.stop()

    assert asyncio.run(group_offsets()) == {0: 130, 1: 130, 2: 130}  # the durable offsets, for monitoring


def test_restore_seeks_to_the_checkpoint_offsets(kafka_url, topic):
    asyncio.run(produce(kafka_url, topic, 1, 30))  # 10 per partition, offsets 0-9

    async def go() -> tuple[list, dict]:
        src = KafkaTopic(kafka_url, topic, json=True, follow=False, poll=0.1)
        src.restore({"offsets": {0: 4, 1: 10, 2: 7}})
        await src.open()
        try:
            out = []
            while (m := await src.read()) is not None:
                out.append(m.value["i"])
            return out, src.checkpoint()
        finally:
            await src.close()

    out, state = asyncio.run(go())
    # partition 0 holds 3, 6, ..., 30 (i % 3 == 0): from offset 4 on; partition 2 from offset 7
    assert sorted(out) == sorted([3 * (k + 1) for k in range(4, 10)] + [3 * k + 2 for k in range(7, 10)])
    assert state == {"offsets": {0: 10, 1: 10, 2: 10}}


def test_sink_produces_to_the_other_cluster(kafka_url, topic):
    msgs = [pipes.Message({"i": i}, key=f"user{i % 5}", headers={"h": "x"}) for i in range(100)] + ["text"]

    async def go() -> list:
        app = pipes.App("ktsink")
        app.sink("values", KafkaTopicSink(kafka_url, topic))
        await run_app_async(app, {"values": msgs})
        c = AIOKafkaConsumer(topic, bootstrap_servers=_bootstrap(kafka_url), auto_offset_reset="earliest",
                             enable_auto_commit=False)
        await c.start()
        try:
            out = []
            deadline = time.monotonic() + 10
            while len(out) < len(msgs) and time.monotonic() < deadline:
                got = await c.getmany(timeout_ms=200)
                out += [r for batch in got.values() for r in batch]
            return out
        finally:
            await c.stop()

    recs = asyncio.run(go())
    assert len(recs) == 101
    keyed = [r for r in recs if r.key is not None]
    assert sorted(r.value for r in keyed) == sorted(b'{"i":%d}' % i for i in range(100))
    for r in keyed:  # one key, one partition
        i = int(r.value[5:-1])
        assert r.key == f"user{i % 5}".encode() and dict(r.headers) == {"h": b"x"}
    assert len({(r.key, r.partition) for r in keyed}) == 5
    assert [r.value for r in recs if r.key is None] == [b"text"]
