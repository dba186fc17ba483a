"""The user API: App, its topics, and the source/transform/sink decorators.

Decorators only record node definitions; :meth:`App.build` validates them and
returns the frozen :class:`~pipes.topology.Graph`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

from .errors import ConfigError
from .message import Message
from .serializers import Serializer, resolve
from .settings import Settings
from .topology import Graph, Node, TopicSpec, Topology

_ON_ERROR = ("dlq", "stop", "skip")
MODES = ("global", "isolated", "isolated_legacy", "process")


@dataclass(frozen=True, slots=True)
class Topic:
    """A declared topic; pass it (or its name) to ``to=`` and to transforms and sinks."""

    name: str
    partitions: int | None = None
    value_serializer: Serializer = field(default_factory=lambda: resolve("json"))
    key_serializer: Serializer = field(default_factory=lambda: resolve("str"))
    retention_ms: int | None = None
    keyed: bool = False
    replication: int | None = None
    config: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        return self.name


TopicRef = Topic | str


def _where(fn: Any) -> str:
    try:
        code = fn.__code__
        return f"{code.co_filename}:{code.co_firstlineno}"
    except AttributeError:
        return type(fn).__name__


def _params(fn: Callable) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return []


def _is_message_annotation(ann: Any) -> bool:
    if ann is Message:
        return True
    return isinstance(ann, str) and ann.split(".")[-1] == "Message"


class _Builder:
    """The decorators, shared by App (topology "main") and app.topology(name)."""

    def __init__(self, app: App, topology: str):
        self._app = app
        self._topology = topology

    # -- sources ---------------------------------------------------------------
    def source(self, target: Any = None, *, to: TopicRef | list[TopicRef], name: str | None = None) -> Any:
        """A source: a function called until it returns None (optionally taking `state`),
        a (async) generator, a list/tuple (one message per item), a connector object, or any
        other object (one message)."""

        def record(t: Any) -> Any:
            node_id = name or getattr(t, "__name__", None) or type(t).__name__.lower()
            self._app._add(Node(id=node_id, kind="source", topology=self._topology, target=t,
                                outputs=self._app._topics_of(to, node_id), where=_where(t)))
            return t

        return record if target is None else record(target)

    # -- transforms ------------------------------------------------------------
    def transform(self, topic: TopicRef | list[TopicRef], *, to: TopicRef | list[TopicRef] | None = None,
                  key: str | Callable[[Any], Any] | None = None, name: str | None = None,
                  on_error: str | None = None, mode: str = "global",
                  workers: int | None = None) -> Callable[[Callable], Callable]:
        """A transform from `topic` to `to`: returns one message, None to drop, or yields many.
        ``mode`` runs it in the main interpreter (``global``), a pool of sub-interpreters
        (``isolated``, ``isolated_legacy``) or of processes (``process``) of ``workers``."""

        def record(fn: Callable) -> Callable:
            node_id = name or fn.__name__
            if to is None:
                raise ConfigError(f"transform {node_id!r} ({_where(fn)}) has no destination: "
                                  f"add to='topic' (or a list of topics) to @app.transform(...)")
            params = _params(fn)
            if not params:
                raise ConfigError(f"transform {node_id!r} ({_where(fn)}) takes no parameter: "
                                  f"it must accept the value (or a pipes.Message) as its first argument")
            stateful = any(p.name == "state" for p in params[1:])
            wants_message = _is_message_annotation(params[0].annotation)
            inputs = self._app._topics_of(topic, node_id)
            outputs = self._app._topics_of(to, node_id)
            policy = self._app._policy(on_error, node_id)
            if mode not in MODES:
                raise ConfigError(f"transform {node_id!r}: mode={mode!r}; use one of {', '.join(MODES)}")
            if workers is not None and (not isinstance(workers, int) or workers < 1):
                raise ConfigError(f"transform {node_id!r}: workers= must be a positive integer, not {workers!r}")
            if key is not None and not (isinstance(key, str) or callable(key)):
                raise ConfigError(f"transform {node_id!r}: key= takes a field name or a callable, not {key!r}")
            if stateful and key is not None:
                # Keyed state is partitioned by key, so re-keying goes through a topic.
                rekeyed = f"{self._app.name}.{node_id}.rekey"
                self._app._declare(Topic(rekeyed, keyed=True), internal=True)
                self._app._add(Node(id=f"{node_id}.rekey", kind="transform", topology=self._topology,
                                    target=_identity, inputs=inputs, outputs=(rekeyed,), key=key,
                                    on_error=policy, internal=True, where=_where(fn)))
                inputs, node_key = (rekeyed,), None
            else:
                node_key = key
            self._app._add(Node(id=node_id, kind="transform", topology=self._topology, target=fn,
                                inputs=inputs, outputs=outputs, key=node_key, stateful=stateful,
                                wants_message=wants_message, on_error=policy, where=_where(fn),
                                mode=mode, workers=workers or (1 if mode == "global" else 2)))
            return fn

        return record

    # -- sinks -----------------------------------------------------------------
    def sink(self, topic: TopicRef | list[TopicRef], target: Any = None, *, batch: int | None = None,
             name: str | None = None, on_error: str | None = None) -> Any:
        """A sink: a function called per value (or with lists of up to `batch` values), or an
        object with ``write(batch)`` and optionally ``flush()``, ``open()``, ``close()``."""

        def record(t: Any) -> Any:
            is_object = not callable(t) or hasattr(t, "write")
            inputs = self._app._topics_of(topic, name or "sink")
            # An object sink is named after its class and topics: JsonLines on "totals" -> jsonlines.totals
            node_id = name or (f"{type(t).__name__.lower()}.{'+'.join(inputs)}" if is_object else t.__name__)
            if is_object and not hasattr(t, "write"):
                raise ConfigError(f"sink {node_id!r}: {t!r} is neither a function nor an object with write(batch)")
            if batch is not None and (not isinstance(batch, int) or batch < 1):
                raise ConfigError(f"sink {node_id!r}: batch= must be a positive integer, not {batch!r}")
            params = [] if is_object else _params(t)
            wants_message = bool(params) and _is_message_annotation(params[0].annotation)
            self._app._add(Node(id=node_id, kind="sink", topology=self._topology, target=t,
                                inputs=inputs,
                                batch=batch if batch is not None else (500 if is_object else None),
                                wants_message=wants_message, on_error=self._app._policy(on_error, node_id),
                                where=_where(t)))
            return t

        return record if target is None else record(target)

    # -- windows, tables, joins, timers (pipes.windows, pipes.joins, pipes.timers) --------------
    def window(self, topic: TopicRef, *, to: TopicRef | list[TopicRef], window: Any, agg: Any = None,
               initial: Any = None, merge: Callable[[Any, Any], Any] | None = None,
               key: str | Callable[[Any], Any] | None = None, emit: str = "final", grace: Any = 0,
               timestamp: str | Callable[[Any], Any] | None = None, late: TopicRef | None = None,
               close_on: str = "stream", name: str | None = None, on_error: str | None = None) -> Any:
        """A windowed aggregation (see :mod:`pipes.windows`): with ``agg=`` (e.g.
        ``pipes.windows.count()``) it is recorded at once; without, it decorates
        ``fn(accumulator, value) -> accumulator``, starting from ``initial`` (else a reduce)."""
        from . import windows

        def record(fn: Any) -> Any:
            node_id = name or (fn.__name__ if agg is None else f"{agg.name}.{topic}")
            how = agg or (windows.aggregate(fn, initial, merge) if initial is not None else windows.reduce(fn))
            op = windows.Windowed(window, how, emit, self._duration(grace, node_id, "grace"), timestamp,
                                  str(late) if late is not None else None, close_on).check(node_id)
            self._operator(node_id, op, self._keyed(node_id, topic, key, on_error, fn), to, on_error, fn)
            return fn

        return record if agg is None else record(agg)

    def table(self, topic: TopicRef, *, key: str | Callable[[Any], Any] | None = None,
              name: str | None = None) -> Any:
        """Materialize `topic` into keyed state: each key's latest value, readable as
        ``{"value": ...}`` in node `name` (default: the topic's name); a None value deletes.
        Returns a :class:`pipes.joins.Table` to pass to :meth:`join`."""
        from . import joins

        node_id = name or str(topic)
        inputs = self._keyed(node_id, topic, key, None, None)
        self._operator(node_id, joins.Materialize(), inputs, None, None, None)
        return joins.Table(inputs[0], node_id)

    def join(self, left: TopicRef | Any, right: Any, *, to: TopicRef | list[TopicRef],
             key: str | Callable[[Any], Any] | None = None, how: str = "inner", within: Any = None,
             grace: Any = 0, timestamp: str | Callable[[Any], Any] | None = None, late: TopicRef | None = None,
             name: str | None = None, on_error: str | None = None) -> Callable[[Callable], Callable]:
        """Decorates ``fn(left_value, right_value)``: a stream–table join (`right` from
        :meth:`table`), a table–table join (both tables) or, with ``within=`` seconds, a
        windowed stream–stream join (see :mod:`pipes.joins`)."""
        from . import joins

        def record(fn: Callable) -> Callable:
            node_id = name or fn.__name__
            op = joins.join_operator(fn, left, right, how, self._duration(within, node_id, "within"),
                                     self._duration(grace, node_id, "grace"), timestamp,
                                     str(late) if late is not None else None, node_id)
            table = next((s.topic for s in (left, right) if isinstance(s, joins.Table)), None)
            parts = self._app._topics[table].partitions if table in self._app._topics else None
            sides = [(s.topic,) if isinstance(s, joins.Table) else
                     self._keyed(node_id, s, key, on_error, fn, f".{side}", parts)
                     for s, side in ((left, "left"), (right, "right"))]
            if any(len(s) != 1 for s in sides):
                raise ConfigError(f"join {node_id!r}: each side is one topic or table, not a list")
            sides = [s[0] for s in sides]
            self._operator(node_id, op, tuple(sides), to, on_error, fn)
            return fn

        return record

    def timer(self, every: Any, *, to: TopicRef | list[TopicRef] | None = None,
              name: str | None = None) -> Callable[[Callable], Callable]:
        """Call ``fn()`` every `every` seconds on one worker of the topology; what it returns
        (not None) goes to `to`."""
        from . import timers

        return self._timed(lambda fn: timers.Every(fn, self._duration(every, fn.__name__, "every")), to, name)

    def crontab(self, spec: str, *, to: TopicRef | list[TopicRef] | None = None,
                name: str | None = None) -> Callable[[Callable], Callable]:
        """Call ``fn()`` at the times of a five-field cron `spec` (UTC), on one worker."""
        from . import timers

        return self._timed(lambda fn: timers.Cron(fn, timers.parse_cron(spec, fn.__name__)), to, name)

    def timeout(self, topic: TopicRef, *, after: Any, to: TopicRef | list[TopicRef],
                key: str | Callable[[Any], Any] | None = None, cancel: Callable[[Any], bool] | None = None,
                timestamp: str | Callable[[Any], Any] | None = None, name: str | None = None,
                on_error: str | None = None) -> Callable[[Callable], Callable]:
        """A per-key timer: ``fn(last_value)`` is called once for a key `after` seconds (wall
        clock) past the timestamp of its last message, unless a message with ``cancel(value)``
        true came first. Timers are keyed state: they survive restarts."""
        from . import timers

        def record(fn: Callable) -> Callable:
            node_id = name or fn.__name__
            op = timers.Timeout(fn, self._duration(after, node_id, "after"), cancel, timestamp)
            self._operator(node_id, op, self._keyed(node_id, topic, key, on_error, fn), to, on_error, fn)
            return fn

        return record

    def _timed(self, make: Callable[[Callable], Any], to: Any, name: str | None) -> Callable[[Callable], Callable]:
        def record(fn: Callable) -> Callable:
            node_id = name or fn.__name__
            outputs = self._app._topics_of(to, node_id) if to is not None else ()
            self._app._add(Node(id=node_id, kind="source", topology=self._topology, target=make(fn),
                                outputs=outputs, where=_where(fn)))
            return fn

        return record

    def _duration(self, value: Any, node_id: str, what: str) -> int | None:
        from .eventtime import duration_ms

        return None if value is None else duration_ms(value, f"node {node_id!r}: {what}=")

    def _keyed(self, node_id: str, topic: TopicRef, key: Any, on_error: str | None, fn: Any,
               part: str = "", partitions: int | None = None) -> tuple[str, ...]:
        """The input of a keyed operator: `topic`, or with ``key=`` a re-key topic fed from it
        (with `partitions`, e.g. those of the table it is joined with)."""
        inputs = self._app._topics_of(topic, node_id)
        if key is None:
            return inputs
        if not (isinstance(key, str) or callable(key)):
            raise ConfigError(f"node {node_id!r}: key= takes a field name or a callable, not {key!r}")
        rekeyed = f"{self._app.name}.{node_id}{part}.rekey"
        self._app._declare(Topic(rekeyed, partitions, keyed=True), internal=True)
        self._app._add(Node(id=f"{node_id}{part}.rekey", kind="transform", topology=self._topology, target=_identity,
                            inputs=inputs, outputs=(rekeyed,), key=key, on_error=self._app._policy(on_error, node_id),
                            internal=True, where=_where(fn) if fn is not None else node_id))
        return (rekeyed,)

    def _operator(self, node_id: str, op: Any, inputs: tuple[str, ...], to: Any, on_error: str | None,
                  fn: Any) -> None:
        outputs = self._app._topics_of(to, node_id) if to is not None else ()
        self._app._add(Node(id=node_id, kind="transform", topology=self._topology, target=op, inputs=inputs,
                            outputs=outputs, stateful=True, on_error=self._app._policy(on_error, node_id),
                            where=_where(fn) if fn is not None else node_id))


def _identity(value: Any) -> Any:
    return value


class App(_Builder):
    """A pipes application: a name, topics, and nodes grouped into topologies.

    ``name`` names consumer groups (``<name>.<topology>``), the data directory
    (``./.pipes/<name>``) and internal topics. Settings may be given here and are
    overridden by ``PIPES_*`` environment variables and command-line options.
    """

    def __init__(self, name: str, **settings: Any):
        if not name or not isinstance(name, str) or any(c in name for c in "/\\ \0"):
            raise ConfigError(f"App name {name!r} must be a non-empty string without spaces or slashes")
        self.name = name
        try:
            self.settings = Settings(**settings).check()
        except TypeError as e:
            raise ConfigError(f"App({name!r}): {e}") from None
        self._topics: dict[str, Topic] = {}
        self._internal: set[str] = set()
        self._nodes: dict[str, Node] = {}
        self._topologies: dict[str, _Builder] = {}
        super().__init__(self, "main")

    def __repr__(self) -> str:
        return f"<pipes.App {self.name!r}: {len(self._nodes)} nodes>"

    def topic(self, name: str, *, partitions: int | None = None, value_serializer: str | Serializer = "json",
              key_serializer: str | Serializer = "str", retention_ms: int | None = None, keyed: bool = False,
              replication: int | None = None, config: dict[str, str] | None = None) -> Topic:
        """Declare a topic. Undeclared topics are created on first use with the defaults.
        ``keyed=True`` says its producers set message keys, so a transform may keep keyed
        ``state`` over it without ``key=``."""
        if partitions is not None and (not isinstance(partitions, int) or partitions < 1):
            raise ConfigError(f"topic {name!r}: partitions= must be a positive integer, not {partitions!r}")
        t = Topic(name, partitions, resolve(value_serializer, what=f"value serializer of topic {name!r}"),
                  resolve(key_serializer, what=f"key serializer of topic {name!r}"), retention_ms, keyed,
                  replication, tuple(sorted((config or {}).items())))
        return self._declare(t)

    def topology(self, name: str) -> _Builder:
        """The decorators of another topology: its own consumer group and deployable unit."""
        if name not in self._topologies:
            self._topologies[name] = _Builder(self, name)
        return self._topologies[name]

    # -- recording ---------------------------------------------------------------
    def _declare(self, topic: Topic, internal: bool = False) -> Topic:
        old = self._topics.get(topic.name)
        if old is not None and old != topic and old != Topic(topic.name):
            raise ConfigError(f"topic {topic.name!r} is declared twice with different settings")
        self._topics[topic.name] = topic
        if internal:
            self._internal.add(topic.name)
        return topic

    def _topics_of(self, refs: TopicRef | Iterable[TopicRef], node_id: str) -> tuple[str, ...]:
        items = [refs] if isinstance(refs, (str, Topic)) else list(refs)
        if not items:
            raise ConfigError(f"node {node_id!r}: an empty list of topics")
        names = []
        for r in items:
            if isinstance(r, Topic):
                self._declare(r) if r.name not in self._topics else None
                names.append(r.name)
            elif isinstance(r, str) and r:
                names.append(r)
            else:
                raise ConfigError(f"node {node_id!r}: {r!r} is not a topic (use a name or app.topic(...))")
        return tuple(names)

    def _policy(self, on_error: str | None, node_id: str) -> str | None:
        if on_error is not None and on_error not in _ON_ERROR:
            raise ConfigError(f"node {node_id!r}: on_error={on_error!r}; use one of {', '.join(_ON_ERROR)}")
        return on_error

    def _add(self, node: Node) -> None:
        if node.id in self._nodes:
            other = self._nodes[node.id]
            raise ConfigError(f"two nodes are named {node.id!r} ({other.where} and {node.where}): "
                              f"rename a function or pass name='...' to one of them")
        self._nodes[node.id] = node

    # -- freezing ----------------------------------------------------------------
    def build(self, settings: Settings | None = None) -> Graph:
        """Validate the recorded nodes and freeze them into a Graph."""
        s = (settings or self.settings).check()
        nodes = [n if n.on_error else replace(n, on_error=s.on_error) for n in self._nodes.values()]
        if not nodes:
            raise ConfigError(f"app {self.name!r} has no sources, transforms or sinks")
        names = {t for n in nodes for t in n.inputs + n.outputs}
        topics = {}
        inherit = {}  # re-key topic -> the topic it re-keys, whose value serializer it keeps
        for n in nodes:
            if n.internal and len(n.inputs) == 1 and n.inputs[0] in self._topics:
                inherit[n.outputs[0]] = self._topics[n.inputs[0]].value_serializer
        for name in sorted(names | set(self._topics)):
            t = self._topics.get(name) or Topic(name)
            if name in inherit:
                t = replace(t, value_serializer=inherit[name])
            topics[name] = TopicSpec(name, t.partitions or s.partitions, t.value_serializer, t.key_serializer,
                                     t.retention_ms if t.retention_ms is not None else s.retention_ms,
                                     t.keyed, name in self._internal, t.replication, t.config)
        keyed = {t for t, spec in topics.items() if spec.keyed}
        keyed |= {t for n in nodes if n.key is not None for t in n.outputs}
        for n in nodes:
            unkeyed = [t for t in n.inputs if t not in keyed]
            if n.stateful and unkeyed:
                raise ConfigError(
                    f"{n.kind} {n.id!r} ({n.where}) keeps state per message key, but its input {unkeyed[0]!r} "
                    f"is not keyed: add key='field' or key=callable to its decorator, "
                    f"or declare app.topic({unkeyed[0]!r}, keyed=True) if its producers set message keys")
        by_topology: dict[str, list[Node]] = {}
        for n in nodes:
            by_topology.setdefault(n.topology, []).append(n)
        topologies = {name: Topology(self.name, name, tuple(ns)) for name, ns in by_topology.items()}
        return Graph(self.name, topics, topologies)
