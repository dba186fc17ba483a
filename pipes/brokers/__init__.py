"""The broker seam: what the runtime needs from memory://, local:// and kafka://.

The runtime never asks which broker it has. A broker

* creates topics (:meth:`Broker.open`, :meth:`Broker.partitions`),
* hands out consumers that poll batches of records per topic-partition, and
* makes a checkpoint (:class:`Changes`) durable in :meth:`Broker.commit`, in the
  order its guarantees need (one atomic RocksDB write batch on local://).

Keyed state and source checkpoints are read from ``broker.store``. Each topology with
sources also consumes its one-partition lease topic ``<app>.<topology>.sources``: the
worker that is assigned it runs the sources (everywhere on local://; once per consumer
group on Kafka).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol, Sequence
from urllib.parse import urlsplit

from ..errors import ConfigError
from ..settings import Settings
from ..store import Store
from ..partitioner import split
from ..topology import Graph, Topology

# A record as consumers see it: (offset, key, value, headers, timestamp_ms).
# Headers are a tuple of (name, bytes) pairs or None. Tuples, because the hot loop reads them.
Polled = tuple[int, bytes | None, bytes, tuple | None, int]
# An output waiting for the checkpoint: (key, value, headers, timestamp_ms).
Output = tuple[bytes | None, bytes, tuple | None, int]


@dataclass(slots=True)
class Changes:
    """Everything one checkpoint makes durable, all or nothing."""

    outputs: dict[str, list[Output]] = field(default_factory=dict)  # per topic; the broker partitions them
    records: dict[tuple[str, int], list[Output]] = field(default_factory=dict)  # to chosen partitions
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)  # next offset to process
    state: dict[bytes, bytes | None] = field(default_factory=dict)  # store key -> value (None deletes)
    sources: dict[str, bytes] = field(default_factory=dict)  # source node id -> checkpoint
    # Exactly-once on Kafka: outputs per input partition that caused them (its transaction).
    scoped: dict[tuple[str, int] | None, dict[str, list[Output]]] = field(default_factory=dict)
    # Outputs already handed to the broker (Broker.send_ahead): their acks, to wait for.
    sent: list[Awaitable] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.outputs or self.records or self.offsets or self.state or self.sources or self.scoped
                    or self.sent)

    def by_partition(self, partitions: Callable[[str], int]) -> dict[tuple[str, int], list[Output]]:
        """`records` plus `outputs` divided among partitions (murmur2 of the key, else CRC of the value)."""
        out = {tp: list(recs) for tp, recs in self.records.items() if recs}
        for topic, outputs in self.outputs.items():
            if not outputs:
                continue
            n = partitions(topic)
            parts = [outputs] if n == 1 else split(outputs, n)
            for p, part in enumerate(parts):
                if part:
                    out.setdefault((topic, p), []).extend(part)
        return out


class Listener(Protocol):
    """Told by a consumer which partitions it gains and loses (a rebalance, or once at start)."""

    async def assigned(self, tps: list[tuple[str, int]]) -> None: ...
    async def revoked(self, tps: list[tuple[str, int]]) -> None: ...


class Consumer(Protocol):
    async def start(self) -> None: ...  # joins; calls the listener's assigned() for its partitions
    def assignment(self) -> dict[tuple[str, int], int]: ...  # owned partition -> first offset to process
    async def poll(self, max_records: int, timeout: float) -> list[tuple[str, int, list[Polled]]]: ...
    def wake(self) -> None: ...
    def caught_up(self) -> bool: ...
    def lag(self) -> dict[tuple[str, int], int]: ...
    async def close(self) -> None: ...


class Broker(Protocol):
    url: str
    store: Store
    scoped: bool  # wants outputs kept per input partition (Changes.scoped): Kafka transactions
    # Kafka, at least once: send_ahead(outputs) starts producing outputs before the checkpoint
    # that covers them, which then waits for their acks (Changes.sent). local:// has one
    # atomic write batch per checkpoint instead.
    sends_ahead: bool

    async def open(self, graph: Graph, topologies: Sequence[Topology]) -> None: ...  # creates topics
    async def close(self) -> None: ...
    def partitions(self, topic: str) -> int: ...  # an undeclared topic is created with the defaults
    def consumer(self, group: str, topics: Sequence[str], listener: Listener | None = None) -> Consumer: ...
    async def restore(self, topology: Topology, tps: list[tuple[str, int]]) -> None: ...  # state of gained partitions
    async def release(self, topology: Topology, tps: list[tuple[str, int]]) -> None: ...  # after revoked ones' checkpoint
    async def commit(self, group: str, changes: Changes) -> None: ...


def lease_topic(topology: Topology) -> str:
    return f"{topology.group}.sources"


def data_dir(app_name: str, settings: Settings) -> str:
    """Where a worker keeps its RocksDB database."""
    url = urlsplit(settings.broker)
    if url.scheme == "local" and (url.netloc or url.path):
        return os.path.abspath(url.netloc + url.path)
    return os.path.abspath(settings.data_dir or os.path.join(".pipes", app_name))


SCHEMES = ("local", "memory", "kafka")


def check_url(url: str) -> str:
    """The URL's scheme, or a ConfigError saying which ones exist."""
    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown broker URL {url!r}: use local://[DIR], memory:// or kafka://host:port")
    return scheme


def connect(app_name: str, settings: Settings, *, read_only: bool = False) -> Broker:
    """The broker a URL names: local://[DIR], memory://, kafka://host:port[,host:port]."""
    scheme = check_url(settings.broker)
    if scheme in ("local", "memory"):
        from .local import LocalBroker

        path = None if scheme == "memory" else data_dir(app_name, settings)
        return LocalBroker(path, settings, read_only=read_only, url=settings.broker)
    if scheme == "kafka":
        try:
            from .kafka import KafkaBroker
        except ImportError:
            raise ConfigError("kafka:// is not available in this version of pipes yet") from None
        return KafkaBroker(app_name, settings, read_only=read_only)
