"""kafka:// on a real Kafka-protocol broker (Tansu on loopback, see tests/tansu.py)."""

from __future__ import annotations

import asyncio
import pickle
from collections import Counter

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from tansu import unique

import pipes
from pipes.brokers.kafka import parse_url, redact
from pipes.errors import BrokerError
from pipes.runtime import run
from pipes.store import Store, state_prefix
from pipes.testing import run_app


def shop(name: str, n: int = 1000) -> pipes.App:
    """The DESIGN §1 example (minus the SSE source and the file sink)."""
    app = pipes.App(name)
    orders = app.topic(f"{name}.orders", partitions=4)

    @app.source(to=orders)
    def numbers(state):
        i = state.get("i", 0)
        if i == n:
            return None
        state["i"] = i + 1
        return {"id": i, "customer": f"c{i % 7}", "amount": i * 1.5}

    @app.transform(orders, to=f"{name}.big_orders")
    def big(order):
        if order["amount"] > 100:
            return order

    @app.transform(f"{name}.big_orders", to=f"{name}.totals", key=lambda o: o["customer"])
    def total(order, state):
        state["sum"] = state.get("sum", 0) + order["amount"]
        return {"customer": order["customer"], "sum": state["sum"]}

    return app


def expected_totals(n: int = 1000) -> dict[str, float]:
    sums: dict[str, float] = {}
    for i in range(n):
        if i * 1.5 > 100:
            sums[f"c{i % 7}"] = sums.get(f"c{i % 7}", 0) + i * 1.5
    return sums


def run_worker(app: pipes.App, url: str, data_dir, **settings) -> pipes.runtime.Report:
    s = app.settings.override(broker=url, data_dir=str(data_dir), **settings)
    return asyncio.run(run(app.build(s), s, until_done=True))


async def read_topic(url: str, topic: str) -> list:
    """Every record of a topic, read up to the high watermark of each partition."""
    bootstrap, opts = parse_url(url)
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest", **opts)
    await c.start()
    try:
        await c.topics()  # fetches metadata
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or ())]
        assert tps, f"no topic {topic}"
        c.assign(tps)
        out, done = [], set()
        for _ in range(200):
            batch = await c.getmany(timeout_ms=100)
            for msgs in batch.values():
                out += msgs
            done = {tp for tp in tps if c.highwater(tp) is not None and await c.position(tp) >= c.highwater(tp)}
            if done == set(tps):
                return out
        raise AssertionError(f"could not read {topic} to its end")
    finally:
        await c.stop()


def local_state(data_dir, node: str, partitions: int) -> dict[str, dict]:
    store = Store(str(data_dir), read_only=True)
    try:
        out = {}
        for p in range(partitions):
            prefix = state_prefix(node, p)
            out.update({k[len(prefix):].decode(): pickle.loads(v) for k, v in store.scan("state", prefix)})
        return out
    finally:
        store.close()


def test_design_example_runs_on_kafka_as_on_memory(kafka_url, tmp_path):
    name = unique("shop")
    report = run_worker(shop(name), kafka_url, tmp_path / "w1")
    reference = run_app(shop(unique("ref")))

    totals = asyncio.run(read_topic(kafka_url, f"{name}.totals"))
    assert len(totals) == 933
    # Running sums depend on how the four order partitions interleave; counts and finals do not.
    values = [orjson.loads(r.value) for r in totals]
    ref = reference[f"{reference.graph.app}.totals"]
    assert Counter(v["customer"] for v in values) == Counter(v["customer"] for v in ref)
    finals = {c: max(v["sum"] for v in values if v["customer"] == c) for c in expected_totals()}
    assert finals == expected_totals()
    expected = {k: {"sum": v} for k, v in expected_totals().items()}
    assert local_state(tmp_path / "w1", "total", 1) == expected == reference.state("total")
    assert report.produced == 1000

    # Restarted on the same data dir: nothing is processed again.
    again = run_worker(shop(name), kafka_url, tmp_path / "w1")
    assert (again.processed, again.produced) == (0, 0)


def test_a_new_worker_restores_state_and_source_checkpoints_from_kafka(kafka_url, tmp_path):
    name = unique("shop")
    run_worker(shop(name), kafka_url, tmp_path / "first")
    # An empty data dir: keyed state and the source's checkpoint come back from the changelog
    # and the lease topic, so nothing is produced or processed twice.
    report = run_worker(shop(name), kafka_url, tmp_path / "second")
    assert (report.processed, report.produced) == (0, 0)
    assert local_state(tmp_path / "second", "total", 1) == {k: {"sum": v} for k, v in expected_totals().items()}


def test_workers_of_one_group_share_partitions_and_run_sources_once(kafka_url, tmp_path):
    name = unique("scale")
    n = 20_000

    def make() -> pipes.App:
        app = pipes.App(name, commit_every=500)
        app.topic(f"{name}.events", partitions=4, keyed=True)

        @app.source(to=f"{name}.events")
        def numbers(state):
            i = state.get("i", 0)
            if i == n:
                return None
            state["i"] = i + 1
            return pipes.Message({"i": i}, key=f"k{i % 50}")

        @app.transform(f"{name}.events", to=f"{name}.counts")
        def count(event, state):
            state["n"] = state.get("n", 0) + 1
            return state["n"]

        return app

    async def two_workers():
        stop = asyncio.Event()
        runs = []
        for w in ("a", "b"):
            s = make().settings.override(broker=kafka_url, data_dir=str(tmp_path / w))
            app = make()
            runs.append(asyncio.create_task(run(app.build(s), s, stop=stop)))
            await asyncio.sleep(0.5)
        for _ in range(600):  # both workers done: every event counted
            await asyncio.sleep(0.1)
            counts = await read_topic(kafka_url, f"{name}.counts")
            if len(counts) >= n:
                break
        stop.set()
        return await asyncio.gather(*runs), counts

    reports, counts = asyncio.run(two_workers())
    assert len(counts) == n, "the source ran once: every event exactly once"
    per_key = Counter(r.key for r in counts)
    assert set(per_key.values()) == {n // 50}
    assert all(r.processed > 0 for r in reports), [r.processed for r in reports]
    assert sum(r.produced for r in reports) == n


def test_exactly_once_fails_clearly_on_a_broker_without_transactions(kafka_url, tmp_path):
    app = shop(unique("eos"))
    with pytest.raises(BrokerError, match="transactions"):
        run_worker(app, kafka_url, tmp_path, guarantee="exactly_once")


def test_kafka_urls_carry_credentials_that_are_never_shown():
    hosts, opts = parse_url("kafka://alice:s3cret@h1:9092,h2:9092?sasl_mechanism=SCRAM-SHA-256&request_timeout_ms=5000")
    assert hosts == "h1:9092,h2:9092"
    assert opts["sasl_plain_username"] == "alice" and opts["sasl_plain_password"] == "s3cret"
    assert opts["sasl_mechanism"] == "SCRAM-SHA-256" and opts["request_timeout_ms"] == 5000
    shown = redact("kafka://alice:s3cret@h1:9092?sasl_plain_password=x2&security_protocol=SASL_SSL")
    assert "s3cret" not in shown and "x2" not in shown and "alice" in shown


def test_url_options_reach_only_the_clients_that_take_them():
    from pipes.brokers.kafka import client_options

    _, opts = parse_url("kafka://h:9092?session_timeout_ms=6000&linger_ms=5&request_timeout_ms=9000&fetch_max_wait_ms=5")
    producer = client_options(opts, "producer", {"linger_ms": 1})
    consumer = client_options(opts, "consumer")
    admin = client_options(opts, "admin")
    assert producer == {"linger_ms": 5, "request_timeout_ms": 9000}
    assert consumer == {"session_timeout_ms": 6000, "request_timeout_ms": 9000, "fetch_max_wait_ms": 5}
    assert admin == {"request_timeout_ms": 9000}


def test_pipes_consumers_read_record_batches_as_tuples_and_others_are_untouched(kafka_url, tmp_path):
    # pipes/brokers/records_fast.py reads aiokafka's record batches itself: keys, values,
    # headers, tombstones and offsets must come out as they went in, and a plain aiokafka
    # consumer in the same process still gets ConsumerRecords.
    from aiokafka import AIOKafkaProducer
    from aiokafka.structs import ConsumerRecord

    from pipes.brokers.kafka import KafkaBroker

    topic = unique("tuples")
    sent = [(None, b"v0", []), (b"k1", b"v1", [("h", b"x"), ("h2", b"")]), (b"k2", None, [])]

    async def scenario():
        bootstrap, opts = parse_url(kafka_url)
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **opts)
        await producer.start()
        try:
            for key, value, headers in sent:  # the topic is created on first use
                await producer.send_and_wait(topic, value, key=key, headers=headers, partition=0,
                                             timestamp_ms=1_700_000_000_000)
        finally:
            await producer.stop()
        settings = pipes.Settings(broker=kafka_url, data_dir=str(tmp_path))
        broker = KafkaBroker("tuples", settings)
        broker._partitions[topic] = 1
        consumer = broker.consumer(None, [topic])
        await consumer.start()
        got = []
        try:
            for _ in range(100):
                for _, _, recs in await consumer.poll(100, 0.1):
                    got += recs
                if len(got) >= 3:
                    break
        finally:
            await consumer.close()
        plain = await read_topic(kafka_url, topic)
        return got, plain

    got, plain = asyncio.run(scenario())
    ts = 1_700_000_000_000
    assert got == [(0, None, b"v0", None, ts), (1, b"k1", b"v1", (("h", b"x"), ("h2", b"")), ts),
                   (2, b"k2", b"", None, ts)]
    assert all(type(m) is ConsumerRecord for m in plain)
    assert [(m.key, m.value, list(m.headers)) for m in plain] == sent


def test_polls_smaller_than_a_record_batch_hand_out_each_record_once_in_order(kafka_url, tmp_path):
    # records_fast reads whole record batches and keeps the rest of one for the next poll;
    # a seek into the middle of a batch starts at the record sought.
    from aiokafka import AIOKafkaProducer

    from pipes.brokers import records_fast
    from pipes.brokers.kafka import KafkaBroker

    topic = unique("batches")

    async def scenario():
        bootstrap, opts = parse_url(kafka_url)
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **opts)
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"first", partition=0)  # creates the topic
            for part in range(2):  # two record batches of 500
                batch = producer.create_batch()
                for i in range(500):
                    batch.append(key=None, value=b"%d" % (1 + part * 500 + i), timestamp=None)
                batch.close()
                await (await producer.send_batch(batch, topic, partition=0))
        finally:
            await producer.stop()
        broker = KafkaBroker("batches", pipes.Settings(broker=kafka_url, data_dir=str(tmp_path)))
        broker._partitions[topic] = 1
        consumer = broker.consumer(None, [topic])
        await consumer.start()
        try:
            sizes, got = [], []
            while len(got) < 1001:
                for _, _, recs in await consumer.poll(7, 0.1):
                    sizes.append(len(recs))
                    got += recs
            position = records_fast.position(consumer.c, TopicPartition(topic, 0))
            consumer.seek((topic, 0), 250)
            again = []
            while len(again) < 751:
                for _, _, recs in await consumer.poll(300, 0.1):
                    again += recs
            return sizes, got, position, again
        finally:
            await consumer.close()

    sizes, got, position, again = asyncio.run(scenario())
    assert max(sizes) == 7
    assert [r[0] for r in got] == list(range(1001))
    assert [r[2] for r in got] == [b"first"] + [b"%d" % i for i in range(1, 1001)]
    assert position == 1001
    assert [r[0] for r in again] == list(range(250, 1001))


def test_outputs_go_out_ahead_of_the_checkpoint_that_covers_them(kafka_url, tmp_path):
    # At least once on Kafka, each polled batch's outputs are handed to the producer at once
    # (Checkpoint.send_ahead); the checkpoint taken later waits for their acks before its
    # changelog records, RocksDB batch and offsets. Nothing is lost or doubled by it.
    from aiokafka import AIOKafkaProducer

    from pipes.brokers.kafka import KafkaBroker

    name = unique("ahead")
    n = 5000
    app = pipes.App(name)
    app.transform(f"{name}.in", to=f"{name}.out")(lambda v: {"i": v["i"], "twice": 2 * v["i"]})
    seen: list[tuple[int, int]] = []  # per checkpoint: outputs sent ahead, outputs handed with it
    commit = KafkaBroker.commit

    async def recording_commit(self, group, changes):
        seen.append((len(changes.sent), sum(len(o) for o in changes.outputs.values())))
        await commit(self, group, changes)

    async def produce():
        bootstrap, opts = parse_url(kafka_url)
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **opts)
        await producer.start()
        try:
            for i in range(n):
                await producer.send(f"{name}.in", orjson.dumps({"i": i}), partition=0)
            await producer.flush()
        finally:
            await producer.stop()

    asyncio.run(produce())
    KafkaBroker.commit = recording_commit
    try:
        report = run_worker(app, kafka_url, tmp_path, poll_records=500, commit_every=2000, commit_interval=3600)
    finally:
        KafkaBroker.commit = commit
    assert report.processed == n
    assert seen[0][0] >= 3 and seen[0][1] <= 500, seen  # batches went out before the first checkpoint
    outputs = asyncio.run(read_topic(kafka_url, f"{name}.out"))
    assert [orjson.loads(m.value) for m in outputs] == [{"i": i, "twice": 2 * i} for i in range(n)]
