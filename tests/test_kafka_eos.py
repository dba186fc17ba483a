"""guarantee="exactly_once" on kafka://: a transaction per input partition (pipes/brokers/kafka.py).

Tansu, the test broker, has no transactions. What runs on it: the checkpoint's division of
a run's outputs, changelog records, source checkpoints, dead letters and offsets into
per-input-partition transactions, with each transaction's begin/commit stood in for (the
records really go to Tansu, the offsets are really committed). One transaction's sequence
of calls, and its abort on failure, against a stand-in producer. What needs a broker with
transactions runs when ``PIPES_TEST_KAFKA_TXN_BROKER=kafka://host:port`` names one and is
skipped otherwise: aiokafka's transaction features that pipes relies on, a run to the end,
and (tests/test_kafka_faults.py) the EOS-style fault test with no duplicate allowed.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter

import msgpack
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import InvalidProducerEpoch, ProducerFenced
from tansu import unique
from test_kafka import expected_totals, local_state, read_topic, run_worker, shop

import pipes
from pipes.brokers.kafka import KafkaBroker, changelog_topic
from pipes.errors import ConfigError

TXN_BROKER = os.environ.get("PIPES_TEST_KAFKA_TXN_BROKER")
needs_transactions = pytest.mark.skipif(
    not TXN_BROKER, reason="needs a broker with transactions: set PIPES_TEST_KAFKA_TXN_BROKER=kafka://host:port "
                           "(Tansu, the test broker, has none)")
P = 3


def tagged(name: str, n: int) -> pipes.App:
    """A source into 3 partitions; a transform that names the partition it read each value
    from (and fails on every 50th: the DLQ); a keyed count behind a re-key."""
    app = pipes.App(name)
    app.topic(f"{name}.in", partitions=P, keyed=True)

    @app.source(to=f"{name}.in")
    def numbers(state):
        i = state.get("i", 0)
        if i == n:
            return None
        state["i"] = i + 1
        return pipes.Message({"i": i}, key=f"k{i % 20}")

    @app.transform(f"{name}.in", to=f"{name}.out")
    def tag(msg: pipes.Message):
        if msg.value["i"] % 50 == 49:
            raise ValueError("every 50th")
        return {"i": msg.value["i"], "p": msg.partition}

    @app.transform(f"{name}.out", to=f"{name}.counts", key=lambda v: f"u{v['i'] % 7}")
    def count(v, state):
        state["n"] = state.get("n", 0) + 1
        return state["n"]

    return app


class _Stand:
    """Stands in for an input partition's transactional producer."""

    def __init__(self, tp: tuple[str, int]):
        self.tp = tp

    async def stop(self) -> None:
        pass


def test_each_input_partition_commits_what_its_records_caused(kafka_url, tmp_path, monkeypatch):
    transactions: list[tuple[tuple[str, int], dict, dict]] = []

    async def no_probe(self):
        pass

    async def stand_in(self, group, tp):
        self._txn[tp] = _Stand(tp)

    async def recorded(self, tp, group, records, offsets):
        assert self._txn[tp].tp == tp
        transactions.append((tp, records, offsets))
        ends = await self._produce(records)
        if offsets:
            await self._consumers[group].c.commit(offsets)
        return ends

    monkeypatch.setattr(KafkaBroker, "_check_transactions", no_probe)
    monkeypatch.setattr(KafkaBroker, "_transactional", stand_in)
    monkeypatch.setattr(KafkaBroker, "_transaction", recorded)
    name, n = unique("eos"), 600
    report = run_worker(tagged(name, n), kafka_url, tmp_path, guarantee="exactly_once", commit_every=97)

    lease, rekey = f"{name}.main.sources", f"{name}.count.rekey"
    seen_outputs = Counter()
    for (topic, p), records, offsets in transactions:
        assert set(offsets) <= {TopicPartition(topic, p)}, (topic, p, offsets)
        for (out_topic, out_p), recs in records.items():
            if out_topic == f"{name}.in":  # the source's outputs and checkpoint: the lease's transaction
                assert (topic, p) == (lease, 0)
            elif out_topic == lease:
                assert (topic, p, out_p) == (lease, 0, 0)
            elif out_topic == f"{name}.out":  # from partition p of .in, and only from it
                assert topic == f"{name}.in" and {orjson.loads(r[1])["p"] for r in recs} == {p}
                seen_outputs.update(orjson.loads(r[1])["i"] for r in recs)
            elif out_topic == f"{name}.in.dlq":
                assert topic == f"{name}.in"
                assert {dict(r[2])["pipes.partition"] for r in recs} == {str(p).encode()}
            elif out_topic == changelog_topic(name, "count"):  # state partition p of the count: rekey[p]
                assert (topic, p) == (rekey, out_p)
                for _, _, headers, _ in recs:
                    assert {(t, q) for t, q, _ in msgpack.unpackb(dict(headers)["pipes.offsets"])} == {(rekey, p)}
            elif out_topic == rekey:  # the re-key reads .out
                assert topic == f"{name}.out"
            else:
                assert out_topic == f"{name}.counts" and topic == rekey, (out_topic, topic)
    assert set(seen_outputs) == {i for i in range(n) if i % 50 != 49} and set(seen_outputs.values()) == {1}
    assert report.produced == n and len(transactions) > 3
    totals = asyncio.run(read_topic(kafka_url, f"{name}.counts"))
    assert len(totals) == n - n // 50


def test_what_no_single_partition_transaction_covers_is_refused_at_start(kafka_url, tmp_path):
    app = pipes.App(unique("eosjoin"))
    app.topic("customers", keyed=True)
    customers = app.table("customers")

    @app.join("orders", customers, to="enriched", key="customer")
    def enrich(order, customer):
        return {**order, "customer": customer}

    with pytest.raises(ConfigError, match="several input topics.*at_least_once"):
        run_worker(app, kafka_url, tmp_path, guarantee="exactly_once")


# -- with a broker that has transactions ------------------------------------------------------
@needs_transactions
def test_a_run_to_the_end_is_exactly_once(tmp_path):
    name = unique("shop")
    report = run_worker(shop(name), TXN_BROKER, tmp_path / "w1", guarantee="exactly_once")
    assert report.produced == 1000
    totals = asyncio.run(read_topic(TXN_BROKER + "?isolation_level=read_committed", f"{name}.totals"))
    assert len(totals) == 933
    expected = {k: {"sum": v} for k, v in expected_totals().items()}
    assert local_state(tmp_path / "w1", "total", 1) == expected
    again = run_worker(shop(name), TXN_BROKER, tmp_path / "w2", guarantee="exactly_once")
    assert (again.processed, again.produced) == (0, 0)
    assert local_state(tmp_path / "w2", "total", 1) == expected


def bootstrap() -> str:
    return TXN_BROKER.removeprefix("kafka://")


@needs_transactions
def test_the_broker_has_what_exactly_once_relies_on(tmp_path):
    # Offsets sent in a transaction, read_committed, and fencing by transactional id.
    source, sink, group = unique("in"), unique("out"), unique("g")
    tid = unique("txn")

    async def scenario():
        a = AIOKafkaProducer(bootstrap_servers=bootstrap(), transactional_id=tid)
        await a.start()
        async with a.transaction():
            await a.send_and_wait(sink, b"c1", partition=0)
            await a.send_offsets_to_transaction({TopicPartition(source, 0): 5}, group)
        await a.begin_transaction()
        await a.send_and_wait(sink, b"zombie", partition=0)
        b = AIOKafkaProducer(bootstrap_servers=bootstrap(), transactional_id=tid)
        await b.start()  # fences a, aborting its open transaction
        with pytest.raises((ProducerFenced, InvalidProducerEpoch)):
            await a.commit_transaction()
        async with b.transaction():
            await b.send_and_wait(sink, b"c2", partition=0)
        await a.stop()
        await b.stop()
        c = AIOKafkaConsumer(bootstrap_servers=bootstrap(), group_id=group, enable_auto_commit=False)
        await c.start()
        try:
            committed = await c.committed(TopicPartition(source, 0))
        finally:
            await c.stop()
        return await read_topic(TXN_BROKER + "?isolation_level=read_committed", sink), committed

    records, committed = asyncio.run(scenario())
    assert [r.value for r in records] == [b"c1", b"c2"] and committed == 5


# -- one transaction, against a stand-in producer (a coordinator cannot run here) --------------
class _TxnManager:
    def __init__(self, producer: "_TxnProducer"):
        self.producer = producer
        self.transactional_id = "g.t.0"

    def is_in_transaction(self) -> bool:
        return self.producer.open


class _TxnProducer:
    """Records the calls a transaction makes; `fail` names the call that raises."""

    def __init__(self, fail: str | None = None):
        from aiokafka.producer.message_accumulator import BatchBuilder

        self._batch = lambda: BatchBuilder(1 << 20, 0, is_transactional=1)
        self._txn_manager = _TxnManager(self)
        self.fail = fail
        self.open = False
        self.calls: list = []

    def _call(self, name: str, *args) -> None:
        self.calls.append((name, *args))
        if name == self.fail:
            from aiokafka.errors import KafkaError

            raise KafkaError(f"{name} failed")

    def create_batch(self):
        return self._batch()

    async def begin_transaction(self):
        self._call("begin")
        self.open = True

    async def send_batch(self, batch, topic, *, partition):
        self._call("send", topic, partition, batch.record_count())
        from aiokafka.structs import RecordMetadata

        future = asyncio.get_running_loop().create_future()
        future.set_result(RecordMetadata(topic, partition, None, 100, -1, None, 0))
        return future

    async def send_offsets_to_transaction(self, offsets, group):
        self._call("offsets", {(tp.topic, tp.partition): o for tp, o in offsets.items()}, group)

    async def stop(self):
        self.calls.append(("stop",))

    async def commit_transaction(self):
        self._call("commit")
        self.open = False

    async def abort_transaction(self):
        self._call("abort")
        self.open = False


def _transaction(producer: _TxnProducer):
    from pipes.errors import BrokerError

    broker = KafkaBroker("g", pipes.Settings(broker="kafka://127.0.0.1:1", guarantee="exactly_once"))
    records = {("out", 1): [(None, b"a", None, 0), (b"k", b"b", (("h", b"1"),), 5)],
               ("g.x.changelog", 0): [(b"k", b"s", None, 0)]}

    broker._txn[("t", 0)] = producer

    async def go():
        try:
            return await broker._transaction(("t", 0), "g", records, {TopicPartition("t", 0): 42})
        except BrokerError as e:
            return e

    return asyncio.run(go()), broker


def test_a_transaction_sends_its_records_then_its_offsets_then_commits():
    producer = _TxnProducer()
    ends, broker = _transaction(producer)
    assert broker._txn == {("t", 0): producer}
    assert producer.calls == [("begin",), ("send", "out", 1, 2), ("send", "g.x.changelog", 0, 1),
                              ("offsets", {("t", 0): 42}, "g"), ("commit",)]
    assert ends == {("out", 1): 102, ("g.x.changelog", 0): 101}


@pytest.mark.parametrize("fail", ["send", "offsets", "commit"])
def test_a_failing_transaction_is_aborted_reported_and_its_producer_dropped(fail):
    producer = _TxnProducer(fail=fail)
    error, broker = _transaction(producer)
    assert "a transaction of 'g.t.0'" in str(error) and f"{fail} failed" in str(error)
    assert producer.calls[-2:] == [("abort",), ("stop",)]  # nothing of it becomes visible
    assert [c[0] for c in producer.calls].count("commit") == (fail == "commit")
    assert broker._txn == {}  # perhaps fenced: the next assignment of t[0] starts a new producer
