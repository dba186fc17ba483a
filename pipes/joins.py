"""Tables and joins, built on keyed state.

    customers = app.table("customers", key="id")      # each key's latest value; None deletes

    @app.join("orders", customers, to="enriched", key="customer", how="left")
    def enrich(order, customer):                       # customer is None when unknown (how="left")
        return {**order, "customer": customer}

    @app.join(customers, addresses, to="customer_addresses")   # table–table
    def with_address(customer, address): ...

    @app.join("clicks", "views", to="click_views", key="ad", within=60)   # stream–stream, 60 s
    def matched(click, view): ...

A table is a topic materialized into keyed state: its node's state for a key is
``{"value": latest}`` (what ``pipes state NODE KEY`` shows). A join node keeps its own
copy of the sides it needs, in its own keyed state, so it is restored, checkpointed and
changelogged like any keyed state.

* **stream–table**: each stream message is joined with the table's value for its key
  as of the table messages this node has processed before it (``inner``: dropped if
  there is none; ``left``: ``fn(value, None)``). Order across the two topics is the
  order the worker consumes them: pipes does not hold stream messages back waiting for
  the table (Kafka Streams with ``max.task.idle.ms=0`` behaves the same), so load a
  table before the stream that needs it. Table updates never emit.
* **table–table**: every update of either side emits ``fn(left, right)`` for its key
  (``inner``: when both exist; ``left``: when the left one does); when an update makes
  a joined key disappear, a ``None`` value (a tombstone) is emitted.
* **stream–stream** (``within=`` seconds): each message is joined with every message of
  the other stream with the same key and a timestamp at most ``within`` apart, in event
  time, as either arrives (``inner``); with ``left``, a left message that found no match
  by the time it expires emits ``fn(left, None)``. A message expires once the
  partition's stream time passes its timestamp + ``within`` + ``grace``; late messages
  (see :mod:`pipes.eventtime`) go to the ``late`` topic or the DLQ.

Both inputs of a join must be co-partitioned (same partition count and key
serializer), which is checked when the topology starts.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from .emit import Emitter
from .errors import ConfigError
from .eventtime import IDX, NEVER, Late, LateFailures, as_key, as_text, check_key, timestamp_getter
from .failures import Failures
from .nodes import Decoder
from .topology import Graph, Node

if TYPE_CHECKING:  # rocksdict (under pipes.state) cannot load in sub-interpreters
    from .state import StateTable

HOWS = ("inner", "left")
_MISSING = object()


@dataclass(frozen=True, slots=True)
class Table:
    """A materialized topic: pass it to :meth:`pipes.App.join`. ``topic`` is the keyed topic
    it is read from; ``node`` holds each key's latest value as ``{"value": ...}``."""

    topic: str
    node: str


def join_operator(fn: Callable, left: Any, right: Any, how: str, within: int | None, grace: int,
                  timestamp: Any, late: str | None, node_id: str) -> Any:
    """The target of a join node, chosen by what is joined: stream–table, table–table or stream–stream."""
    if how not in HOWS:
        raise ConfigError(f"join {node_id!r}: how={how!r}; use one of {', '.join(HOWS)}")
    if isinstance(left, Table) and not isinstance(right, Table):
        raise ConfigError(f"join {node_id!r}: a table–stream join is written stream first: "
                          f"app.join(stream, table, ...)")
    if isinstance(right, Table):
        if within is not None:
            raise ConfigError(f"join {node_id!r}: within= is for stream–stream joins; a table has no window")
        return TableTableJoin(fn, how) if isinstance(left, Table) else StreamTableJoin(fn, how)
    if within is None:
        raise ConfigError(f"join {node_id!r}: joining two streams needs a window: within=SECONDS "
                          f"(or make one side a table with app.table(...))")
    timestamp_getter(timestamp, f"join {node_id!r}")
    return StreamStreamJoin(fn, how, within, grace, timestamp, late)


class Materialize:
    """The target of a table node: each key's latest value as ``{"value": ...}``."""

    def pipes_processor(self, node: Node, graph: Graph, table: StateTable | None) -> _Processor:
        return _Processor(node, graph, table, self._update)

    @staticmethod
    def _update(proc: _Processor, topic: str, partition: int, rec: tuple, value: Any, ckpt: Any) -> None:
        state = proc.table.get(partition, rec[1])
        if value is None:
            state.clear()
        else:
            state["value"] = value


class _Processor:
    """A keyed operator calling ``handle(proc, topic, partition, record, value, ckpt)`` per record,
    then ``after(proc, partition, ckpt)`` once per batch."""

    def __init__(self, node: Node, graph: Graph, table: StateTable | None, handle: Callable,
                 after: Callable | None = None):
        if table is None:
            raise ConfigError(f"node {node.id!r} needs keyed state (stateful=True)")
        if len(node.inputs) > 1:
            _check_copartitioned(node, graph)
        self.node, self.table, self.handle, self.after = node, table, handle, after
        self.decoder = Decoder(graph, False)
        self.emitter = Emitter(node, graph)
        self.failures = Failures(node)

    async def process(self, topic: str, partition: int, records: list[tuple], ckpt: Any) -> None:
        loads = self.decoder.for_topic(topic)[0]
        handle = self.handle
        for rec in records:
            try:
                check_key(rec[1])
                handle(self, topic, partition, rec, loads(rec[2]), ckpt)
            except Exception as e:
                self.failures.handle(e, topic, partition, rec, ckpt)
        if self.after is not None:
            self.after(self, partition, ckpt)

    def emit(self, result: Any, rec: tuple, ckpt: Any, ts: int | None = None) -> None:
        self.emitter.encode(result, rec[1], rec[3], rec[4] if ts is None else ts, self.emitter.buffers(ckpt), ckpt)


def _check_copartitioned(node: Node, graph: Graph) -> None:
    a, b = (graph.topics[t] for t in node.inputs[:2])
    if a.name == b.name:
        raise ConfigError(f"join {node.id!r} joins topic {a.name!r} with itself: join two topics")
    if a.partitions != b.partitions or a.key_serializer.name != b.key_serializer.name:
        raise ConfigError(
            f"join {node.id!r}: topics {a.name!r} ({a.partitions} partitions, {a.key_serializer.name} keys) and "
            f"{b.name!r} ({b.partitions} partitions, {b.key_serializer.name} keys) are not co-partitioned, so "
            f"equal keys would not meet: declare both with the same partitions= and key_serializer= "
            f"(app.topic(...)), or re-key one side with key=")


# -- stream–table ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StreamTableJoin:
    fn: Callable[[Any, Any], Any]
    how: str

    def pipes_processor(self, node: Node, graph: Graph, table: StateTable | None) -> _Processor:
        stream, side = node.inputs
        fn, inner = self.fn, self.how == "inner"

        def handle(proc: _Processor, topic: str, partition: int, rec: tuple, value: Any, ckpt: Any) -> None:
            state = proc.table.get(partition, rec[1])
            if topic == side:
                if value is None:
                    state.clear()
                else:
                    state["value"] = value
                return
            other = state.get("value", _MISSING)
            if other is _MISSING:
                if inner:
                    return
                other = None
            result = fn(value, other)
            if result is not None:
                proc.emit(result, rec, ckpt)

        return _Processor(node, graph, table, handle)


# -- table–table ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TableTableJoin:
    fn: Callable[[Any, Any], Any]
    how: str

    def pipes_processor(self, node: Node, graph: Graph, table: StateTable | None) -> _Processor:
        left_topic = node.inputs[0]
        fn, inner = self.fn, self.how == "inner"

        def joined(state: dict) -> bool:
            return "left" in state and ("right" in state or not inner)

        def handle(proc: _Processor, topic: str, partition: int, rec: tuple, value: Any, ckpt: Any) -> None:
            state = proc.table.get(partition, rec[1])
            before = joined(state)
            side = "left" if topic == left_topic else "right"
            if value is None:
                state.pop(side, None)
            else:
                state[side] = value
            if joined(state):
                proc.emit(fn(state["left"], state.get("right")), rec, ckpt)
            elif before:
                proc.emit(None, rec, ckpt)  # the joined key is gone: a tombstone

        return _Processor(node, graph, table, handle)


# -- stream–stream ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StreamStreamJoin:
    """State per key: ``{"l": [[ts, value, matched], ...], "r": [[ts, value], ...]}``."""

    fn: Callable[[Any, Any], Any]
    how: str
    within: int
    grace: int
    timestamp: Any
    late: str | None

    def pipes_processor(self, node: Node, graph: Graph, table: StateTable | None) -> _Processor:
        left_topic = node.inputs[0]
        fn, within, grace, left_join = self.fn, self.within, self.grace, self.how == "left"
        ts_of = timestamp_getter(self.timestamp, f"join {node.id!r}")
        late = Late(node.id, self.late)

        def handle(proc: _Processor, topic: str, partition: int, rec: tuple, value: Any, ckpt: Any) -> None:
            idx = proc.table.get(partition, IDX)
            st = idx.get("t", NEVER)
            ts = rec[4] if ts_of is None else ts_of(value)
            if ts < st - grace:
                late.send(topic, partition, rec, ts, st, grace, ckpt)
                return
            key = rec[1]
            state = proc.table.get(partition, key)
            if topic == left_topic:
                entry = [ts, value, False]
                for other in state.get("r", ()):
                    if abs(other[0] - ts) <= within:
                        entry[2] = True
                        _emit(proc, fn(value, other[1]), rec, builtins.max(ts, other[0]), ckpt)
                state.setdefault("l", []).append(entry)
            else:
                for entry in state.get("l", ()):
                    if abs(entry[0] - ts) <= within:
                        entry[2] = True
                        _emit(proc, fn(entry[1], value), rec, builtins.max(ts, entry[0]), ckpt)
                state.setdefault("r", []).append([ts, value])
            idx.setdefault("c", {}).setdefault(ts + within + grace + 1, {})[as_text(key)] = None
            if ts > st:
                idx["t"] = ts

        def expire(proc: _Processor, partition: int, ckpt: Any) -> None:
            """Once per batch: no message that is not late can match an expired one."""
            idx = proc.table.get(partition, IDX)
            due, st = idx.get("c"), idx.get("t", NEVER)
            if not due or builtins.min(due) > st:
                return
            for at in sorted(d for d in due if d <= st):
                for key in map(as_key, due.pop(at)):
                    state = proc.table.get(partition, key)
                    for side in ("l", "r"):
                        keep = [e for e in state.get(side, ()) if e[0] + within + grace + 1 > st]
                        if left_join and side == "l":
                            for ts, value, matched in state.get("l", ()):
                                if not matched and ts + within + grace + 1 <= st:
                                    _emit(proc, fn(value, None), (None, key, None, None, ts), ts, ckpt)
                        if keep:
                            state[side] = keep
                        else:
                            state.pop(side, None)

        proc = _Processor(node, graph, table, handle, expire)
        proc.failures = LateFailures(node, late)
        return proc


def _emit(proc: _Processor, result: Any, rec: tuple, ts: int, ckpt: Any) -> None:
    if result is not None:
        proc.emit(result, rec, ckpt, ts)

