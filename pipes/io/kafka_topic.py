"""A topic on another Kafka cluster than the app's broker: a source whose position
(the next offset per partition) is stored in pipes' own checkpoint, and a sink.

Both use aiokafka (``pip install aiokafka``), imported when they open.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson

from ..errors import ConfigError
from ..message import Message

log = logging.getLogger("pipes")


def _aiokafka() -> Any:
    try:
        import aiokafka
        import aiokafka.structs
    except ImportError:
        raise ConfigError("the Kafka topic connectors need aiokafka: pip install aiokafka") from None
    return aiokafka


def _bootstrap(url: str) -> str:
    """kafka://host:port[,host:port] (or host:port,...) -> host:port,..."""
    if not url or not isinstance(url, str):
        raise ConfigError(f"KafkaTopic: url must be kafka://host:port, not {url!r}")
    for prefix in ("kafka://", "tcp://"):
        if url.startswith(prefix):
            url = url[len(prefix):]
    return url.rstrip("/")


def _bytes(value: Any, json: bool) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str) and not json:
        return value.encode()
    return orjson.dumps(value, default=str)


# -- the source ----------------------------------------------------------------------------
class KafkaTopic:
    """The records of `topic` on the Kafka cluster at `url` (``kafka://host:port``, a
    comma-separated list for several bootstrap servers), every partition, in offset
    order within a partition. Each value is the record's value as text, or decoded as
    JSON with ``json=True`` (``None`` for a tombstone stays ``None`` and is skipped); the
    key as text; its headers are the record's plus ``kafka.topic``, ``kafka.partition``
    and ``kafka.offset``; its timestamp the record's.

    The checkpoint is the next offset of every partition, kept in pipes' checkpoint,
    atomically with what the source produced; the source **does not commit offsets to
    that cluster** as its position, and a restart seeks every partition to the
    checkpoint's offset. So reading is exactly-once into an app on ``local://`` (at-least-
    once into one on Kafka, as every source: see the guarantees). Without a checkpoint,
    reading starts at `start`: ``"earliest"`` (the default) or ``"latest"``. The
    partitions are those of the topic when the source opens.

    With `group`, the offsets of each durable checkpoint are also committed to that
    consumer group on the other cluster, for lag monitoring there; they are read back
    only to start from when pipes has no checkpoint yet.

    ``follow=False`` ends once every partition has been read up to where it ended when
    the source opened.
    """

    def __init__(self, url: str, topic: str, *, group: str | None = None, start: str = "earliest",
                 json: bool = False, follow: bool = True, max_records: int = 500, poll: float = 0.5,
                 client_options: dict | None = None):
        if not topic or not isinstance(topic, str):
            raise ConfigError(f"KafkaTopic: topic must be a topic name, not {topic!r}")
        if start not in ("earliest", "latest"):
            raise ConfigError(f"KafkaTopic: start= must be 'earliest' or 'latest', not {start!r}")
        self.url = url
        self.bootstrap = _bootstrap(url)
        self.topic = topic
        self.group = group
        self.start = start
        self.json = json
        self.follow = follow
        self.max_records = max_records
        self.poll = poll
        self.client_options = client_options or {}
        self._offsets: dict[int, int] = {}  # partition -> next offset to give
        self._ends: dict[int, int] = {}
        self._records: list = []
        self._consumer: Any = None

    # -- checkpoint ------------------------------------------------------------------------
    def checkpoint(self) -> dict:
        return {"offsets": dict(self._offsets)}

    def restore(self, state: dict) -> None:
        self._offsets = dict(state.get("offsets", {}))

    async def committed(self, state: dict) -> None:
        """For monitoring only: the group on the other cluster hears the durable offsets."""
        consumer = self._consumer
        if self.group is None or consumer is None or not state.get("offsets"):
            return
        tp = _aiokafka().structs.TopicPartition
        try:
            await consumer.commit({tp(self.topic, p): o for p, o in state["offsets"].items()})
        except Exception as e:  # only monitoring: never fails the worker
            log.warning("KafkaTopic %s: committing offsets to group %s failed (%s: %s)", self.topic, self.group,
                        type(e).__name__, e)

    # -- reading ---------------------------------------------------------------------------
    async def open(self) -> None:
        aiokafka = _aiokafka()
        tp = aiokafka.structs.TopicPartition
        self._consumer = consumer = aiokafka.AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=self.group, enable_auto_commit=False,
            auto_offset_reset=self.start, max_poll_records=self.max_records, **self.client_options)
        await consumer.start()
        try:
            partitions = None
            for _ in range(50):  # the cluster may need a moment to know a new topic
                partitions = await self._partitions()
                if partitions:
                    break
                await asyncio.sleep(0.1)
            if not partitions:
                raise ConfigError(f"KafkaTopic: topic {self.topic!r} does not exist on {self.url}")
            tps = [tp(self.topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            firsts = await consumer.beginning_offsets(tps)
            lasts = await consumer.end_offsets(tps)
            self._ends = {t.partition: lasts[t] for t in tps}
            for t in tps:
                p = t.partition
                if p not in self._offsets and self.group is not None:
                    c = await consumer.committed(t)
                    if c is not None:
                        self._offsets[p] = c
                if p not in self._offsets:
                    self._offsets[p] = firsts[t] if self.start == "earliest" else lasts[t]
                # A position below what the cluster still keeps (retention): the first kept.
                consumer.seek(t, max(self._offsets[p], firsts[t]))
        except Exception:
            await self.close()
            raise

    async def _partitions(self) -> set[int] | None:
        await self._consumer.topics()  # a metadata refresh for every topic
        return self._consumer.partitions_for_topic(self.topic)

    def _finished(self) -> bool:
        return all(self._offsets.get(p, 0) >= end for p, end in self._ends.items())

    async def read(self) -> Message | None:
        while True:
            while not self._records:
                if not self.follow and self._finished():
                    return None
                got = await self._consumer.getmany(timeout_ms=int(self.poll * 1000), max_records=self.max_records)
                self._records = [r for batch in got.values() for r in batch][::-1]
            r = self._records.pop()
            self._offsets[r.partition] = r.offset + 1
            if r.value is not None:
                break  # (a tombstone is skipped, its offset passed)
        value = orjson.loads(r.value) if self.json else r.value.decode("utf-8", "replace")
        headers: dict[str, Any] = {k: v for k, v in (r.headers or ())}
        headers.update({"kafka.topic": r.topic, "kafka.partition": str(r.partition), "kafka.offset": str(r.offset)})
        key = r.key.decode("utf-8", "replace") if r.key is not None else None
        return Message(value, key=key, headers=headers, timestamp=r.timestamp)

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        self._records = []
        if consumer is not None:
            await consumer.stop()

    def __repr__(self) -> str:
        return f"KafkaTopic({self.url!r}, {self.topic!r})"


# -- the sink ------------------------------------------------------------------------------
class KafkaTopicSink:
    """Produces each value to `topic` on the Kafka cluster at `url`, at every checkpoint,
    waiting for the cluster's acknowledgement (``acks="all"``) of every record before the
    checkpoint is made durable. The message's key is the record's key; a string value is
    sent as UTF-8, bytes as they are, anything else (and a string with ``json=True``) as
    JSON; string and bytes headers become record headers. Records with the same key go
    to the same partition (the cluster's default partitioner).

    At-least-once: after a crash, the records of the last unfinished checkpoint are
    produced again.
    """

    wants_messages = True

    def __init__(self, url: str, topic: str, *, json: bool = False, client_options: dict | None = None):
        if not topic or not isinstance(topic, str):
            raise ConfigError(f"KafkaTopicSink: topic must be a topic name, not {topic!r}")
        self.url = url
        self.bootstrap = _bootstrap(url)
        self.topic = topic
        self.json = json
        self.client_options = client_options or {}
        self._producer: Any = None
        self._pending: list[tuple] = []
        self.written = 0

    async def open(self) -> None:
        self._producer = _aiokafka().AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all",
                                                      **self.client_options)
        await self._producer.start()

    def write(self, batch: list[Message]) -> None:
        self._pending += [self._record(m) for m in batch]

    def _record(self, m: Message) -> tuple:
        key = m.key if m.key is None or isinstance(m.key, bytes) else \
            m.key.encode() if isinstance(m.key, str) else orjson.dumps(m.key, default=str)
        headers = [(k, v if isinstance(v, bytes) else v.encode()) for k, v in (m.headers or {}).items()
                   if isinstance(v, (str, bytes))]
        return key, _bytes(m.value, self.json), headers

    async def flush(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        futures = [await self._producer.send(self.topic, value, key=key, headers=headers or None)
                   for key, value, headers in pending]
        await asyncio.gather(*futures)
        self.written += len(pending)

    async def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    def __repr__(self) -> str:
        return f"KafkaTopicSink({self.url!r}, {self.topic!r})"
