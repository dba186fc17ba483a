"""pipes.io.sqs against moto_server (started on a free loopback port by this file): the
source deletes messages only once pipes' checkpoint holding them is durable, extends the
visibility of messages in flight, re-deletes after a restart; the sink sends batches.

Every test uses queues of its own; results are checked with boto3 against the server.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import pytest

import pipes
from pipes.brokers.local import LocalBroker
from pipes.io.sqs import SQS, SQSSink
from pipes.testing import read_messages, run_app
from helpers import free_port, read_topic, run_until

MOTO = Path(sys.executable).with_name("moto_server")
for _k, _v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ.setdefault(_k, _v)


@pytest.fixture(scope="module")
def endpoint():
    port = free_port()
    proc = subprocess.Popen([str(MOTO), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, "moto_server exited"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "moto_server did not listen"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def sqs(endpoint):
    return boto3.client("sqs", region_name="us-east-1", endpoint_url=endpoint)


@pytest.fixture
def queue(sqs):
    def make(fifo: bool = False, **attrs) -> str:
        name = f"pipes-{uuid.uuid4().hex[:10]}" + (".fifo" if fifo else "")
        if fifo:
            attrs["FifoQueue"] = "true"
        return sqs.create_queue(QueueName=name, Attributes={k: str(v) for k, v in attrs.items()})["QueueUrl"]
    return make


def send(sqs, url: str, bodies: list[str]) -> list[str]:
    ids = []
    for i in range(0, len(bodies), 10):
        resp = sqs.send_message_batch(QueueUrl=url, Entries=[
            {"Id": str(j), "MessageBody": b, "MessageAttributes": {"n": {"DataType": "String", "StringValue": b}}}
            for j, b in enumerate(bodies[i:i + 10])])
        assert not resp.get("Failed")
        ids += [s["MessageId"] for s in sorted(resp["Successful"], key=lambda s: int(s["Id"]))]
    return ids


def counts(sqs, url: str) -> tuple[int, int]:
    a = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    return int(a["ApproximateNumberOfMessages"]), int(a["ApproximateNumberOfMessagesNotVisible"])


def test_source_deletes_only_after_the_checkpoint_is_durable(sqs, queue, endpoint, tmp_path, monkeypatch):
    url = queue()
    bodies = [f'{{"i": {i}, "text": "message {i}"}}' for i in range(1, 301)]
    ids = send(sqs, url, bodies)
    body_of = dict(zip(ids, bodies))

    # Observe the order: every delete must find its messages already durable in the topic.
    brokers: list = []
    commits: list[int] = []
    deletes: list[int] = []
    real_commit, real_delete = LocalBroker.commit, SQS._delete

    async def commit(self, *a, **kw):
        brokers.append(self)
        await real_commit(self, *a, **kw)
        commits.append(len(deletes))

    async def delete(self, handles):
        durable = {m.headers["sqs.message_id"].decode() for m in read_messages(brokers[-1], graph, "orders")}
        missing = [h for h in handles if self._ids[h] not in durable]
        assert not missing, f"{len(missing)} messages deleted before the checkpoint holding them was durable"
        deletes.append(len(handles))
        await real_delete(self, handles)

    real_read = SQS.read

    async def read(self):  # remember which message each receipt handle is
        m = await real_read(self)
        if m is not None:
            self._ids = getattr(self, "_ids", {})
            self._ids[list(self._inflight)[-1]] = m.headers["sqs.message_id"]
        return m

    monkeypatch.setattr(LocalBroker, "commit", commit)
    monkeypatch.setattr(SQS, "_delete", delete)
    monkeypatch.setattr(SQS, "read", read)

    settings = pipes.Settings(broker=f"local://{tmp_path / 'data'}", commit_interval=0.05)
    seen: list = []
    app = pipes.App("sqsrc")
    app.source(SQS(url, endpoint_url=endpoint, wait=1), to="orders", name="src")
    app.sink("orders", lambda m: seen.append(m), name="seen")
    graph = app.build(settings)
    asyncio.run(run_until(app, settings, seen, 300))

    assert sum(deletes) == 300 and len(deletes) > 1 and commits
    assert counts(sqs, url) == (0, 0)  # all deleted
    got = read_topic(tmp_path / "data", "orders")
    assert len(got) == 300
    assert sorted(m.headers["sqs.message_id"].decode() for m in got) == sorted(ids)  # each once
    for m in got:  # exactly as sent: body and attributes
        assert m.value == body_of[m.headers["sqs.message_id"].decode()]
        assert m.headers["n"] == body_of[m.headers["sqs.message_id"].decode()].encode()


def test_source_contract_in_flight_until_committed_extended_and_redeleted_after_restart(sqs, queue, endpoint):
    url = queue()
    send(sqs, url, [f"m{i}" for i in range(1, 8)])

    async def life_one() -> dict:
        src = SQS(url, endpoint_url=endpoint, wait=0, visibility_timeout=2, follow=False)
        await src.open()
        try:
            got = [(await src.read()).value for _ in range(7)]
            assert sorted(got) == [f"m{i}" for i in range(1, 8)]
            first = src.checkpoint()
            await asyncio.sleep(3.5)  # past the visibility timeout: extended, so still in flight
            assert counts(sqs, url) == (0, 7)
            assert sqs.receive_message(QueueUrl=url, WaitTimeSeconds=0).get("Messages") is None
            await src.committed({"handles": first["handles"][:3]})  # a durable checkpoint of the first 3
            assert counts(sqs, url) == (0, 4)
            assert len(src.checkpoint()["handles"]) == 4
            return src.checkpoint()  # durable, but the worker dies before committed()
        finally:
            await src.close()

    state = asyncio.run(life_one())

    async def life_two() -> list:
        src = SQS(url, endpoint_url=endpoint, wait=0, follow=False)
        src.restore(state)
        await src.open()  # deletes what the restored checkpoint covers
        try:
            assert src.checkpoint() == {"handles": ()}
            out = []
            while (m := await src.read()) is not None:
                out.append(m.value)
            return out
        finally:
            await src.close()

    assert asyncio.run(life_two()) == []
    assert counts(sqs, url) == (0, 0)


def test_source_without_extend_lets_messages_come_back(sqs, queue, endpoint):
    url = queue()
    send(sqs, url, ["a"])

    async def go() -> None:
        src = SQS(url, endpoint_url=endpoint, wait=0, visibility_timeout=2, extend=False, follow=False)
        await src.open()
        try:
            assert (await src.read()).value == "a"
            await asyncio.sleep(3)
            again = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=0).get("Messages", [])
            assert [m["Body"] for m in again] == ["a"]  # redelivered: at-least-once
        finally:
            await src.close()

    asyncio.run(go())


def test_sink_sends_every_value(sqs, queue, endpoint):
    url = queue()
    values = [{"i": i, "tags": ["x", i]} for i in range(95)] + ["plain text"]
    app = pipes.App("sqssink")
    app.sink("values", SQSSink(url, endpoint_url=endpoint), batch=7)
    run_app(app, {"values": values})

    bodies = []
    for _ in range(50):
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get("Messages", [])
        if not got:
            break
        bodies += [m["Body"] for m in got]
        sqs.delete_message_batch(QueueUrl=url, Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                                                         for i, m in enumerate(got)])
    import json
    expected = [json.dumps(v, separators=(",", ":")) for v in values[:95]] + ["plain text"]
    assert sorted(bodies) == sorted(expected)


def test_sink_to_a_fifo_queue_keeps_order_and_deduplicates_a_replay(sqs, queue, endpoint):
    url = queue(fifo=True)
    msgs = [pipes.Message(f"v{i}", key="k") for i in range(25)]
    app = pipes.App("sqsfifo")
    app.sink("values", SQSSink(url, endpoint_url=endpoint))
    run_app(app, {"values": msgs})
    run_app(app, {"values": msgs})  # the same offsets again: a replay, dropped by SQS

    bodies = []
    for _ in range(10):
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get("Messages", [])
        if not got:
            break
        bodies += [m["Body"] for m in got]
        sqs.delete_message_batch(QueueUrl=url, Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                                                         for i, m in enumerate(got)])
    assert bodies == [f"v{i}" for i in range(25)]
