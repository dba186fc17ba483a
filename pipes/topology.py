"""The frozen description of an app: topics, nodes with stable ids, and edges.

Decorators on :class:`pipes.App` only record; :meth:`App.build` freezes what they
recorded into a :class:`Graph`, which the runtime, the CLI and the renderers read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from .serializers import Serializer

NodeKind = Literal["source", "transform", "sink"]
OnError = Literal["dlq", "stop", "skip"]


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    value_serializer: Serializer
    key_serializer: Serializer
    retention_ms: int | None = None
    keyed: bool = False
    internal: bool = False
    replication: int | None = None
    config: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Node:
    id: str  # stable across runs: offsets, checkpoints and state are keyed by it
    kind: NodeKind
    topology: str
    target: Any  # the user's function or connector object
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    key: str | Callable[[Any], Any] | None = None  # re-key outputs by field or callable
    stateful: bool = False  # takes a per-key `state`
    wants_message: bool = False  # first parameter annotated pipes.Message
    batch: int | None = None  # sinks: call with lists of up to `batch` values
    on_error: OnError | None = None  # None until App.build() applies the app's setting
    internal: bool = False  # added by pipes (re-keying), not written by the user
    where: str = ""  # file:line of the user's definition, for error messages
    mode: str = "global"  # transforms: global | isolated | isolated_legacy | process (see pipes.modes)
    workers: int = 1  # pool size for the modes other than global


@dataclass(frozen=True, slots=True)
class Topology:
    """One consumer group and one deployable unit."""

    app: str
    name: str
    nodes: tuple[Node, ...]

    @property
    def group(self) -> str:
        return f"{self.app}.{self.name}"

    @property
    def sources(self) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if n.kind == "source")

    @property
    def consumers(self) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if n.kind != "source")

    @property
    def input_topics(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t for n in self.consumers for t in n.inputs))


@dataclass(frozen=True, slots=True)
class Graph:
    """Everything an app declares: its topics and its topologies."""

    app: str
    topics: dict[str, TopicSpec]
    topologies: dict[str, Topology]

    def nodes(self) -> list[Node]:
        return [n for t in self.topologies.values() for n in t.nodes]

    def node(self, node_id: str) -> Node:
        for n in self.nodes():
            if n.id == node_id:
                return n
        raise KeyError(node_id)

    def edges(self) -> list[tuple[str, str]]:
        """(from, to) pairs between node ids and topic names (topics prefixed 'topic:')."""
        out = []
        for n in self.nodes():
            out += [(f"topic:{t}", n.id) for t in n.inputs]
            out += [(n.id, f"topic:{t}") for t in n.outputs]
        return out

    def select(self, names: list[str] | None) -> list[Topology]:
        if not names:
            return list(self.topologies.values())
        missing = [n for n in names if n not in self.topologies]
        if missing:
            from .errors import ConfigError

            raise ConfigError(f"no topology {missing[0]!r}; this app has {', '.join(self.topologies)}")
        return [self.topologies[n] for n in names]
