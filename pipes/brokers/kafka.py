"""kafka:// — topologies on Kafka, Redpanda or any Kafka-protocol broker, through aiokafka.

One consumer group per topology (``<app>.<topology>``). Keyed state lives in the
worker's own RocksDB (``--data-dir``) and in a compacted changelog topic per stateful
node (``<app>.<node>.changelog``, one partition per input partition); source
checkpoints live in the topology's one-partition lease topic
(``<app>.<topology>.sources``), whose owner runs the sources.

A checkpoint (:meth:`KafkaBroker.commit`) is made durable in this order:

1. produce the outputs and wait for their acks (outputs are mostly sent ahead, as each
   batch is processed: :meth:`KafkaBroker.send_ahead`; the checkpoint waits for those);
2. produce changelog records and source checkpoints (each changelog record carries the
   processed input offsets in a ``pipes.offsets`` header) and wait for their acks;
3. write keyed state, processed offsets and changelog positions to RocksDB in one batch;
4. commit the consumer offsets of partitions still assigned.

So a changelog record at input offset X means every output up to X is durable. After
a crash, processing resumes at the larger of the committed offset and the processed
offset recorded with the state: keyed state is exactly-once, outputs at-least-once
(duplicates bounded by about two checkpoints: the one in flight and what was sent ahead
since), and nothing is lost.

With ``guarantee="exactly_once"`` steps 1, 2 and 4 are one Kafka transaction per input
partition: what the records of that partition caused (outputs, dead letters, changelog
records of its keyed state, for the lease partition the sources' outputs and checkpoints)
and its consumer offset commit together or not at all. The transactional id is
``<group>.<topic>.<partition>``: aiokafka has no KIP-447 fencing by group generation, so a
worker that gains a partition fences the producer of its previous owner (a zombie) by
starting its own with that id, before it reads the partition's committed offset.
Consumers read committed records only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
from typing import Any, Sequence
from urllib.parse import parse_qsl, unquote, urlsplit

import msgpack
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from . import records_fast

from ..errors import BrokerError, ConfigError
from ..settings import Settings
from ..store import Store, split_state_prefix, state_prefix
from ..topology import Graph, Topology
from . import Changes, Listener, Polled, data_dir, lease_topic

log = logging.getLogger("pipes")
_P = struct.Struct(">I")
_Q = struct.Struct(">Q")
_SECRET_OPTIONS = {"sasl_plain_password", "sasl_oauth_token", "ssl_password"}
_INT_OPTIONS = {"request_timeout_ms", "metadata_max_age_ms", "session_timeout_ms", "heartbeat_interval_ms",
                "max_poll_interval_ms", "rebalance_timeout_ms", "linger_ms", "max_batch_size",
                "max_request_size", "connections_max_idle_ms", "retry_backoff_ms", "fetch_max_wait_ms",
                "fetch_min_bytes", "fetch_max_bytes", "max_partition_fetch_bytes"}
# URL options that only one kind of client takes; the rest go to every client.
_CONSUMER_ONLY = {"session_timeout_ms", "heartbeat_interval_ms", "max_poll_interval_ms", "rebalance_timeout_ms",
                  "fetch_max_wait_ms", "fetch_min_bytes", "fetch_max_bytes", "max_partition_fetch_bytes"}
_PRODUCER_ONLY = {"linger_ms", "max_batch_size", "max_request_size", "compression_type"}


# pipes' consumers (the group's and the changelog restore's): 2 MiB per partition, large
# batches, yet every assigned partition gets its turn; a 5 ms fetch wait, because a broker
# that holds a fetch for its whole wait even when records arrive (Tansu does; Kafka answers
# at once) otherwise delays every stage, and every restore of an empty changelog, by it
# (aiokafka's default is 500 ms).
FETCH_DEFAULTS = {"fetch_max_bytes": 64 << 20, "max_partition_fetch_bytes": 2 << 20, "fetch_max_wait_ms": 5}
# pipes' producers (the worker's and the transactional ones): whole checkpoints in few requests.
PRODUCE_DEFAULTS = {"linger_ms": 1, "max_batch_size": 1 << 20, "max_request_size": 16 << 20}


def client_options(options: dict[str, Any], kind: str, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """The URL options one kind of client ("producer", "consumer", "admin") accepts, over `defaults`."""
    drop = {"producer": _CONSUMER_ONLY, "consumer": _PRODUCER_ONLY, "admin": _CONSUMER_ONLY | _PRODUCER_ONLY}[kind]
    return {**(defaults or {}), **{k: v for k, v in options.items() if k not in drop}}


def parse_url(url: str) -> tuple[str, dict[str, Any]]:
    """``kafka://[user:password@]host:port[,host:port][?option=value&...]`` -> (bootstrap servers,
    aiokafka client options). A user and password mean SASL PLAIN over SASL_PLAINTEXT unless
    the query says otherwise (``security_protocol=SASL_SSL``, ``sasl_mechanism=SCRAM-SHA-256``)."""
    u = urlsplit(url)
    hosts = u.netloc.rpartition("@")[2]
    if not hosts:
        raise ConfigError(f"kafka URL {redact(url)!r} names no host: use kafka://host:9092[,host:9092]")
    opts: dict[str, Any] = {}
    if "@" in u.netloc:
        user, _, password = u.netloc.rpartition("@")[0].partition(":")
        opts.update(sasl_plain_username=unquote(user), sasl_plain_password=unquote(password),
                    security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN")
    for k, v in parse_qsl(u.query):
        opts[k] = int(v) if k in _INT_OPTIONS else v
    if opts.get("security_protocol", "").endswith("SSL") and "ssl_context" not in opts:
        from aiokafka.helpers import create_ssl_context

        opts["ssl_context"] = create_ssl_context(cafile=opts.pop("ssl_cafile", None),
                                                 certfile=opts.pop("ssl_certfile", None),
                                                 keyfile=opts.pop("ssl_keyfile", None))
    return hosts, opts


def redact(url: str) -> str:
    """The URL without passwords, for logs and errors."""
    u = urlsplit(url)
    netloc = u.netloc
    if "@" in netloc:
        creds, _, hosts = netloc.rpartition("@")
        netloc = f"{creds.partition(':')[0]}:***@{hosts}"
    query = "&".join(f"{k}={'***' if k in _SECRET_OPTIONS else v}" for k, v in parse_qsl(u.query))
    return f"{u.scheme}://{netloc}" + (f"?{query}" if query else "")


def changelog_topic(app: str, node: str) -> str:
    return f"{app}.{node}.changelog"


class KafkaBroker:
    def __init__(self, app_name: str, settings: Settings, *, read_only: bool = False):
        self.app = app_name
        self.settings = settings
        self.url = redact(settings.broker)
        self.bootstrap, self.options = parse_url(settings.broker)
        self._path = data_dir(app_name, settings)
        self._read_only = read_only
        self._store: Store | None = None
        self.producer: AIOKafkaProducer | None = None
        self._partitions: dict[str, int] = {}
        self._creating: dict[str, asyncio.Task] = {}
        self._consumers: dict[str | None, KafkaConsumer] = {}
        self._changelogs: dict[str, str] = {}  # stateful node -> changelog topic
        self._inputs: dict[str, tuple[str, ...]] = {}  # stateful node -> its input topics
        self._input_of: dict[str, str] = {}  # changelog topic -> its node's first input topic
        self._replication: dict[str, int] = {}
        self.produced: dict[tuple[str, int], int] = {}  # next offset after what this process produced
        self.scoped = settings.guarantee == "exactly_once"  # a transaction per input partition
        # At least once, outputs may be produced before the checkpoint that covers them (send_ahead).
        self.sends_ahead = not self.scoped
        self._sending = asyncio.Lock()  # outputs are enqueued in the order they were handed over
        self._isolation = "read_committed" if self.scoped else "read_uncommitted"
        self._txn: dict[tuple[str, int], AIOKafkaProducer] = {}  # input partition -> its transactional producer

    @property
    def store(self) -> Store:
        """The worker's RocksDB, opened on first use (send and tail never need it)."""
        if self._store is None:
            if self._read_only and not os.path.isdir(self._path):
                raise BrokerError(f"no pipes data in {self._path}: has a worker run with this data dir?")
            self._store = Store(self._path, read_only=self._read_only)
        return self._store

    # -- topics ---------------------------------------------------------------------
    async def open(self, graph: Graph | None = None, topologies: Sequence[Topology] = ()) -> None:
        if self.scoped:
            _check_scopes(topologies)
            await self._check_transactions()
        try:
            self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", **client_options(
                self.options, "producer", PRODUCE_DEFAULTS))
            await self.producer.start()
        except KafkaError as e:
            await self.producer.stop()
            self.producer = None
            raise BrokerError(f"cannot reach Kafka at {self.url}: {e}") from None
        wanted: dict[str, tuple[int, dict[str, str]]] = {}
        self._replication: dict[str, int] = {}
        if graph is not None:
            for spec in graph.topics.values():
                config = dict(spec.config)
                if spec.retention_ms is not None:
                    config.setdefault("retention.ms", str(spec.retention_ms))
                wanted[spec.name] = (spec.partitions, config)
                if spec.replication:
                    self._replication[spec.name] = spec.replication
            for topo in topologies:
                if topo.sources:
                    wanted[lease_topic(topo)] = (1, {"cleanup.policy": "compact"})
                for node in topo.nodes:
                    if node.stateful:
                        topic = self._changelogs[node.id] = changelog_topic(self.app, node.id)
                        self._inputs[node.id] = node.inputs
                        self._input_of[topic] = node.inputs[0]
                        n = max(graph.topics[t].partitions for t in node.inputs)
                        wanted[topic] = (n, {"cleanup.policy": "compact"})
        await self._ensure(wanted)

    async def _check_transactions(self) -> None:
        """exactly_once needs Kafka transactions: fail clearly where the broker has none."""
        probe = AIOKafkaProducer(bootstrap_servers=self.bootstrap, transactional_id=f"{self.app}.pipes-probe",
                                 enable_idempotence=True, **client_options(self.options, "producer"))
        try:
            await asyncio.wait_for(probe.start(), 30)
        except (KafkaError, TimeoutError) as e:
            raise BrokerError(
                f"guarantee='exactly_once' needs Kafka transactions, and the broker at {self.url} does not "
                f"support them (InitProducerId failed: {e}); use guarantee='at_least_once' (the default): "
                f"keyed state stays exactly-once, outputs are at-least-once") from None
        finally:
            await probe.stop()

    async def _ensure(self, wanted: dict[str, tuple[int, dict[str, str]]]) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, **client_options(self.options, "admin"))
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            missing = [NewTopic(name, n, self._replication.get(name, self.settings.replication), topic_configs=cfg)
                       for name, (n, cfg) in wanted.items() if name not in existing]
            if missing:
                response = await admin.create_topics(missing)
                for topic, code, message in _topic_errors(response):
                    if code and code != TopicAlreadyExistsError.errno:
                        raise BrokerError(f"cannot create topic {topic!r} on {self.url}: error {code} {message or ''}")
            for topic in wanted:
                self._partitions[topic] = await self._count(topic)
        finally:
            await admin.close()
        for topic, (n, _) in wanted.items():
            if self._partitions[topic] != n:
                log.warning("topic %r has %d partitions on the broker, the app declares %d; using %d",
                            topic, self._partitions[topic], n, self._partitions[topic])

    async def _count(self, topic: str) -> int:
        for _ in range(50):
            parts = await self.producer.partitions_for(topic)
            if parts:
                return len(parts)
            await asyncio.sleep(0.1)
        raise BrokerError(f"topic {topic!r} has no partitions on {self.url}")

    def partitions(self, topic: str) -> int:
        n = self._partitions.get(topic)
        if n is None:
            # Created on first use with the defaults; commit() waits for it.
            n = self._partitions[topic] = self.settings.partitions
            self._creating[topic] = asyncio.ensure_future(self._ensure({topic: (n, {})}))
        return n

    def topics(self) -> dict[str, dict]:
        return {t: {"partitions": n} for t, n in self._partitions.items()}

    async def describe(self, topic: str) -> int | None:
        """Partitions of an existing topic, or None (without letting the broker auto-create it)."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, **client_options(self.options, "admin"))
        await admin.start()
        try:
            if topic not in await admin.list_topics():
                return None
        finally:
            await admin.close()
        self._partitions[topic] = await self._count(topic)
        return self._partitions[topic]

    # -- consuming ---------------------------------------------------------------------
    def consumer(self, group: str | None, topics: Sequence[str], listener: Listener | None = None) -> KafkaConsumer:
        consumer = KafkaConsumer(self, group, topics, listener)
        self._consumers[group] = consumer
        return consumer

    async def restore(self, topology: Topology, tps: list[tuple[str, int]]) -> None:
        """Bring the local RocksDB up to date for gained partitions, then seek each to the
        larger of its committed offset and the offset processed with the restored state."""
        if self.scoped:  # fence the previous owners first: their open transactions are aborted
            await asyncio.gather(*(self._transactional(topology.group, tp) for tp in tps))
        parts = {p for _, p in tps}
        sources: list[tuple[str, int, str, bytes]] = []  # (changelog topic, partition, cf, prefix)
        for node in topology.nodes:
            if node.id in self._changelogs:
                sources += [(self._changelogs[node.id], p, "state", state_prefix(node.id, p))
                            for p in sorted(parts) if any((t, p) in tps for t in node.inputs)]
        lease = lease_topic(topology)
        if (lease, 0) in tps:
            sources.append((lease, 0, "sources", b""))
        if sources:
            await self._replay(topology.group, sources)
        consumer = self._consumers.get(topology.group)
        if consumer is not None:
            await consumer.seek_processed(tps, self.store.offsets(topology.group))

    async def _transactional(self, group: str, tp: tuple[str, int]) -> None:
        """A new transactional producer for a gained partition, also when this worker had one
        (another worker may have owned the partition since, and fenced it)."""
        old = self._txn.pop(tp, None)
        if old is not None:
            await old.stop()
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True,
                                    transactional_id=f"{group}.{tp[0]}.{tp[1]}",
                                    **client_options(self.options, "producer", PRODUCE_DEFAULTS))
        try:
            await producer.start()  # InitProducerId: fences the id's previous producer
        except KafkaError as e:
            await producer.stop()
            raise BrokerError(f"cannot start the transactional producer for {tp[0]}[{tp[1]}] on {self.url}: {e}") from e
        self._txn[tp] = producer

    async def release(self, topology: Topology, tps: list[tuple[str, int]]) -> None:
        """Revoked partitions, after their last checkpoint: their transactional producers go."""
        for tp in tps:
            producer = self._txn.pop(tp, None)
            if producer is not None:
                await producer.stop()

    async def _replay(self, group: str, logs: list[tuple[str, int, str, bytes]]) -> None:
        """Apply changelog records from each log's recorded position to its end."""
        c = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest", isolation_level=self._isolation,
                             **client_options(self.options, "consumer", FETCH_DEFAULTS))
        await c.start()
        try:
            todo: dict[TopicPartition, tuple[str, bytes]] = {}
            pos: dict[TopicPartition, int] = {}
            for topic, p, cf, prefix in logs:
                tp = TopicPartition(topic, p)
                todo[tp] = (cf, prefix)
                raw = self.store.get("meta", _position_key(topic, p))
                pos[tp] = _Q.unpack(raw)[0] if raw else 0
            c.assign(list(todo))
            for tp in todo:
                c.seek(tp, pos[tp])
            processed: dict[tuple[str, int], int] = {}
            restored = 0
            pending = set(todo)
            while pending:
                # Short: an empty changelog answers no records; its high watermark says it is done.
                batch = await c.getmany(*pending, timeout_ms=20, max_records=50_000)
                wb = self.store.batch()
                for tp, msgs in batch.items():
                    cf, prefix = todo[tp]
                    h = self.store.handle[cf]
                    for m in msgs:
                        key = (prefix + m.key) if cf == "state" else m.key
                        if m.value is None:
                            wb.delete(key, h)
                        else:
                            wb.put(key, m.value, h)
                        for name, value in m.headers or ():
                            if name == "pipes.offsets":
                                for t, part, off in msgpack.unpackb(value):
                                    processed[(t, part)] = max(processed.get((t, part), 0), off)
                    restored += len(msgs)
                for tp in todo:  # past records and transaction markers alike
                    pos[tp] = records_fast.position(c, tp) or pos[tp]
                    wb.put(_position_key(tp.topic, tp.partition), _Q.pack(pos[tp]), self.store.handle["meta"])
                for tp in list(pending):
                    hw = c.highwater(tp)
                    if hw is not None and pos[tp] > hw:
                        raise BrokerError(f"changelog {tp.topic}[{tp.partition}] is behind this worker's state "
                                          f"({hw} < {pos[tp]}): it was deleted or recreated; remove the data dir "
                                          f"{self.store.path} to restore from it")
                    if hw is not None and pos[tp] >= hw:
                        pending.discard(tp)
                if processed:
                    known = self.store.offsets(group)
                    self.store.stage_offsets(wb, group, {tp: off for tp, off in processed.items()
                                                         if off > known.get(tp, -1)})
                self.store.write(wb)
            if restored:
                log.info("restored %d changelog records for %s", restored,
                         ", ".join(f"{t}[{p}]" for t, p, _, _ in logs))
        finally:
            await c.stop()

    # -- committing --------------------------------------------------------------------
    async def commit(self, group: str, changes: Changes) -> None:
        transactional = self.scoped and not (changes.outputs or changes.records)  # tools (send, replay): not
        # Partitioned first: a topic used for the first time is created now, and waited for.
        if transactional:
            scoped = {tp: Changes(outputs=outputs).by_partition(self.partitions)
                      for tp, outputs in changes.scoped.items()}
        else:
            records = changes.by_partition(self.partitions)
        logs = self._logs(group, changes)
        if transactional:
            await self._created()
            ends = await self._transactions(group, scoped, changes.offsets, logs)
        else:
            # 1. outputs, acknowledged (with those sent ahead of this checkpoint)
            await asyncio.gather(self._send(records), *changes.sent)
            # 2. changelogs and source checkpoints, acknowledged: what they record is durable
            ends = await self._produce(logs)
        # 3. state, processed offsets and changelog positions, in one write batch
        store = self.store
        wb = store.batch()
        store.stage_state(wb, changes.state)
        store.stage_offsets(wb, group, changes.offsets)
        store.stage_sources(wb, changes.sources)
        for (topic, p), end in ends.items():
            wb.put(_position_key(topic, p), _Q.pack(end), store.handle["meta"])
        await store.write_batch(wb)
        # 4. consumer offsets (exactly-once: committed with each transaction)
        consumer = self._consumers.get(group)
        if consumer is not None and changes.offsets and not transactional:
            await consumer.commit(changes.offsets)

    def _logs(self, group: str, changes: Changes) -> dict[tuple[str, int], list]:
        """Changelog records of the touched state (each carrying the processed offsets of the
        node's inputs) and the sources' checkpoints on the lease topic."""
        logs: dict[tuple[str, int], list] = {}
        prefix, cut, append, header = b"\xff", 0, None, None
        for k, v in changes.state.items():  # a table's keys of one partition share a prefix
            if not k.startswith(prefix):
                prefix, node, p = split_state_prefix(k)
                cut = len(prefix)
                tp = (self._changelogs[node], p)
                offsets = [(t, p, changes.offsets[(t, p)]) for t in self._inputs[node] if (t, p) in changes.offsets]
                header = (("pipes.offsets", msgpack.packb(offsets)),) if offsets else None
                append = logs.setdefault(tp, []).append
            append((k[cut:], v, header, 0))
        if changes.sources:
            logs[(f"{group}.sources", 0)] = [(node.encode(), v, None, 0) for node, v in changes.sources.items()]
        return logs

    async def _transactions(self, group: str, scoped: dict, offsets: dict[tuple[str, int], int],
                            logs: dict[tuple[str, int], list]) -> dict[tuple[str, int], int]:
        """Exactly-once steps 1, 2 and 4: per input partition, one transaction holding what its
        records caused and its consumer offset. Returns the changelogs' next offsets."""
        work: dict[tuple[str, int], tuple[dict, dict]] = {}  # input partition -> (records, offsets)

        def scope(tp: tuple[str, int]) -> tuple[dict, dict]:
            if tp not in self._txn:
                raise BrokerError(f"exactly-once: {tp[0]}[{tp[1]}] has outputs to commit but is not assigned "
                                  f"to this worker")
            return work.setdefault(tp, ({}, {}))

        for tp, records in scoped.items():
            if tp is None:
                raise BrokerError("exactly-once: outputs that belong to no input partition")
            scope(tp)[0].update(records)
        for (log_topic, p), recs in logs.items():
            # A stateful node's partition p is its (one) input topic's partition p; sources
            # checkpoint on the lease partition.
            tp = (log_topic, 0) if log_topic == f"{group}.sources" else (self._input_of[log_topic], p)
            scope(tp)[0][(log_topic, p)] = recs
        for tp, offset in offsets.items():
            scope(tp)[1][TopicPartition(*tp)] = offset
        ends: dict[tuple[str, int], int] = {}
        for part in await asyncio.gather(*(self._transaction(tp, group, records, offsets)
                                           for tp, (records, offsets) in work.items())):
            ends.update(part)
        return {tp: end for tp, end in ends.items() if tp in logs}

    async def _transaction(self, tp: tuple[str, int], group: str, records: dict, offsets: dict
                           ) -> dict[tuple[str, int], int]:
        """Input partition `tp`'s transaction. If it fails, its producer is dropped (it may have
        been fenced): the restarted topology starts a new one when it is assigned `tp` again."""
        producer = self._txn[tp]
        try:
            await producer.begin_transaction()
            try:
                ends = await self._produce(records, producer)
                if offsets:
                    await producer.send_offsets_to_transaction(offsets, group)
                await producer.commit_transaction()
            except BaseException:
                if producer._txn_manager.is_in_transaction():
                    await producer.abort_transaction()
                raise
        except KafkaError as e:
            self._txn.pop(tp, None)
            try:
                await producer.stop()
            except KafkaError:
                pass
            raise BrokerError(f"a transaction of {producer._txn_manager.transactional_id!r} on {self.url} "
                              f"failed: {type(e).__name__}: {e}") from e
        return ends

    def send_ahead(self, outputs: dict[str, list]) -> asyncio.Future:
        """Start producing `outputs` now, ahead of the checkpoint that will cover them (which
        waits for the acks this future gives)."""
        return asyncio.ensure_future(self._send(Changes(outputs=outputs).by_partition(self.partitions)))

    async def _send(self, records: dict[tuple[str, int], list]) -> dict[tuple[str, int], int]:
        """Outputs on the worker's producer, enqueued in the order they were handed over."""
        async with self._sending:
            await self._created()
            futures = await self._enqueue(records, self.producer)
        return await self._acked(futures)

    async def _created(self) -> None:
        """Wait for the topics being created (an undeclared topic's first use)."""
        if self._creating:
            creating, self._creating = self._creating, {}
            await asyncio.gather(*creating.values())

    async def _produce(self, records: dict[tuple[str, int], list], producer: AIOKafkaProducer | None = None
                       ) -> dict[tuple[str, int], int]:
        """Send every record in batches and wait for all acks; returns each partition's next offset."""
        return await self._acked(await self._enqueue(records, producer or self.producer))

    async def _enqueue(self, records: dict[tuple[str, int], list], producer: AIOKafkaProducer) -> list:
        futures = []
        for (topic, p), outputs in records.items():
            start = 0
            while start < len(outputs):
                batch = producer.create_batch()
                count = records_fast.fill(batch, outputs, start)
                if not count:
                    raise BrokerError(f"a record of {len(outputs[start][1])} bytes is larger than a batch to {topic!r}")
                futures.append((topic, p, count, await producer.send_batch(batch, topic, partition=p)))
                start += count
        return futures

    async def _acked(self, futures: list) -> dict[tuple[str, int], int]:
        ends: dict[tuple[str, int], int] = {}
        try:
            metas = await asyncio.gather(*(f for *_, f in futures))
        except KafkaError as e:
            raise BrokerError(f"producing to {self.url} failed: {e}") from e
        for (topic, p, count, _), meta in zip(futures, metas):
            ends[(topic, p)] = max(ends.get((topic, p), 0), meta.offset + count)
        produced = self.produced
        for tp, end in ends.items():
            if end > produced.get(tp, 0):
                produced[tp] = end
        return ends

    async def close(self) -> None:
        for consumer in list(self._consumers.values()):
            await consumer.close()
        for producer in self._txn.values():
            await producer.stop()
        self._txn = {}
        for task in self._creating.values():
            task.cancel()
        if self.producer is not None:
            await self.producer.stop()
        if self._store is not None:
            self._store.close()


def _check_scopes(topologies: Sequence[Topology]) -> None:
    """Exactly-once commits a stateful node's partition p with its input partition p: a node
    reading several topics (a join) would need their partitions p in one transaction."""
    for topo in topologies:
        for node in topo.nodes:
            if node.stateful and len(node.inputs) > 1:
                raise ConfigError(f"guarantee='exactly_once' does not cover node {node.id!r}: it keeps state over "
                                  f"several input topics ({', '.join(node.inputs)}); use "
                                  f"guarantee='at_least_once' for topology {topo.name!r}")


def _topic_errors(response: Any) -> list[tuple[str, int, str | None]]:
    out = []
    for item in response.topic_errors:
        topic, code = item[0], item[1]
        out.append((topic, code, item[2] if len(item) > 2 else None))
    return out


def _position_key(topic: str, p: int) -> bytes:
    return b"changelog\0" + topic.encode() + b"\0" + _P.pack(p)


class _Rebalance(ConsumerRebalanceListener):
    """Passes rebalances to the runner. aiokafka only logs what a listener raises, so the
    error is kept and raised by the consumer's next poll()."""

    def __init__(self, consumer: KafkaConsumer):
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked: Any) -> None:
        tps = [(tp.topic, tp.partition) for tp in revoked]
        if tps and self.consumer.listener is not None:
            await self._call(self.consumer.listener.revoked, tps)  # its checkpoint commits offsets
        self.consumer.owned = set()
        for tp in tps:
            self.consumer.floors.pop(tp, None)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        tps = [(tp.topic, tp.partition) for tp in assigned]
        if self.consumer.listener is not None:
            await self._call(self.consumer.listener.assigned, tps)
        self.consumer.owned = set(tps)

    async def _call(self, fn: Any, tps: list) -> None:
        try:
            await fn(tps)
        except Exception as e:
            self.consumer.failed = e
            self.consumer.wake()


class KafkaConsumer:
    """One topology's consumer-group member (or, without a group, a reader of all partitions)."""

    def __init__(self, broker: KafkaBroker, group: str | None, topics: Sequence[str], listener: Listener | None):
        self.broker = broker
        self.group = group
        self.topics = list(topics)
        self.listener = listener
        self.owned: set[tuple[str, int]] = set()
        self.floors: dict[tuple[str, int], int] = {}  # first offset to process, set when (re)assigned
        self.failed: Exception | None = None
        self._wake = asyncio.Event()
        self._fetch: asyncio.Task | None = None
        self.c = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=group, enable_auto_commit=False,
                                  auto_offset_reset="earliest", max_poll_records=broker.settings.poll_records,
                                  value_deserializer=records_fast.AS_TUPLES, isolation_level=broker._isolation,
                                  **client_options(broker.options, "consumer", FETCH_DEFAULTS))

    async def start(self) -> None:
        try:
            await self.c.start()
        except KafkaError as e:
            raise BrokerError(f"cannot reach Kafka at {self.broker.url}: {e}") from None
        if self.group is not None:
            self.c.subscribe(self.topics, listener=_Rebalance(self))
        else:
            tps = [TopicPartition(t, p) for t in self.topics for p in range(self.broker.partitions(t))]
            self.c.assign(tps)
            self.owned = {(tp.topic, tp.partition) for tp in tps}

    def assignment(self) -> dict[tuple[str, int], int]:
        floors = self.floors
        return {tp: floors.get(tp, 0) for tp in self.owned}

    async def seek_processed(self, tps: list[tuple[str, int]], processed: dict[tuple[str, int], int]) -> None:
        """Start each partition at the larger of its committed offset and the offset processed
        with its restored state. aiokafka may already have fetched records from before that
        while the state was being restored: the floor makes the runner skip them."""
        for topic, p in tps:
            tp = TopicPartition(topic, p)
            committed = await self.c.committed(tp)
            start = max(committed or 0, processed.get((topic, p), 0))
            if processed.get((topic, p), 0) > (committed or 0):
                self.c.seek(tp, start)
            self.floors[(topic, p)] = start

    def seek(self, tp: tuple[str, int], offset: int) -> None:
        self.c.seek(TopicPartition(*tp), offset)
        self.floors[tp] = offset

    async def seek_to_end(self) -> None:
        await self.c.seek_to_end()

    def wake(self) -> None:
        self._wake.set()

    def _end(self, tp: tuple[str, int]) -> int | None:
        """The high watermark the last fetch reported (not end_offsets(): some brokers answer
        it inexactly), or what this process has since produced there, whichever is later."""
        hw = self.c.highwater(TopicPartition(*tp))
        if hw is None:
            return None
        return max(hw, self.broker.produced.get(tp, 0))

    def _position(self, tp: tuple[str, int]) -> int | None:
        return records_fast.position(self.c, TopicPartition(*tp))

    def lag(self) -> dict[tuple[str, int], int]:
        out = {}
        for tp in self.owned:
            end = self._end(tp)
            if end is not None:
                out[tp] = max(0, end - (self._position(tp) or 0))
        return out

    def caught_up(self) -> bool:
        if not self.owned:
            return False
        for tp in self.owned:
            end = self._end(tp)
            position = self._position(tp)
            if end is None or position is None or position < end:
                return False
        return True

    async def poll(self, max_records: int, timeout: float) -> list[tuple[str, int, list[Polled]]]:
        if self.failed is not None:
            raise self.failed
        if self._fetch is None:
            self._fetch = asyncio.ensure_future(self.c.getmany(timeout_ms=int(timeout * 1000), max_records=max_records))
        fetch = self._fetch
        if not fetch.done():
            if self._wake.is_set():
                self._wake.clear()
                return []
            waker = asyncio.ensure_future(self._wake.wait())
            await asyncio.wait([fetch, waker], return_when=asyncio.FIRST_COMPLETED)
            waker.cancel()
            self._wake.clear()
            if not fetch.done():
                return []  # woken: the fetch goes on and is picked up by the next poll
        self._fetch = None
        try:
            data = fetch.result()
        except KafkaError as e:
            raise BrokerError(f"consuming from {self.broker.url} failed: {e}") from e
        # Records come as Polled tuples already (records_fast).
        return [(tp.topic, tp.partition, recs) for tp, recs in data.items() if recs]

    async def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        owned = {TopicPartition(*tp): off for tp, off in offsets.items() if tp in self.owned}
        if owned:
            try:
                await self.c.commit(owned)
            except KafkaError as e:
                # A rebalance took the partitions; their new owner resumes from the state's offsets.
                log.warning("offset commit for %s failed (%s); the next owner resumes from the checkpoint",
                            self.group, e)

    async def close(self) -> None:
        if self._fetch is not None:
            self._fetch.cancel()
            try:
                await self._fetch
            except (asyncio.CancelledError, Exception):
                pass
            self._fetch = None
        await self.c.stop()
        if self.broker._consumers.get(self.group) is self:
            del self.broker._consumers[self.group]
