"""Windowed aggregations over keyed streams, built on keyed state.

    from pipes import windows as w

    app.window("clicks", to="clicks_per_minute", key="user", window=w.tumbling(60), agg=w.count())

    @app.window("orders", to="baskets", key="customer", window=w.session(gap=1800), initial=list,
                merge=lambda a, b: a + b)
    def basket(items, order):                 # a user aggregate: (accumulator, value) -> accumulator
        return items + [order["sku"]]

Window kinds (times in seconds or timedeltas; windows are in event time, see
:mod:`pipes.eventtime`): ``tumbling(size)``, ``hopping(size, every)``, ``sliding(size)``
(one window ``[t - size, t]`` per distinct message timestamp ``t``) and
``session(gap)`` (a key's messages at most ``gap`` apart; a message bridging two sessions merges them).

Aggregations: ``count()``, ``sum(field)``, ``min(field)``, ``max(field)``, ``mean(field)``,
``collect(field)`` (in arrival order), ``reduce(fn)`` and ``aggregate(fn, initial, merge)``.

Each output is ``{"key", "start", "end", "value"}`` keyed by the key: ``start``/``end``
in ms; ``end`` is exclusive for tumbling and hopping windows and inclusive for sliding
and session windows. ``emit="final"`` sends one output per window when it closes;
``emit="update"`` one after every change. A window closes once the partition's stream
time reaches its end plus ``grace`` (sessions: last message + ``gap`` + ``grace`` + 1 ms;
sliding: end + ``grace`` + 1 ms) and is then deleted from state, so state holds only open windows. With
``close_on="wall"`` the stream time of every assigned partition also advances with the
wall clock (checked about every second), so quiet keys' windows close too.

State, per key: ``{start: accumulator}`` (sessions: ``{start: [end, accumulator]}``;
sliding: ``{timestamp: [values]}``), plus per partition the stream time and an index of
when windows close (keys as latin-1 text), under the reserved key ``\\x00idx``.
"""

from __future__ import annotations

import builtins
import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from .emit import Emitter, key_getter
from .errors import ConfigError
from .eventtime import IDX, NEVER, Late, LateFailures, as_key, as_text, check_key, duration_ms, timestamp_getter
from .nodes import Decoder
from .topology import Graph, Node

if TYPE_CHECKING:  # rocksdict (under pipes.state) cannot load in sub-interpreters
    from .state import StateTable

EMITS = ("final", "update")
CLOSE_ON = ("stream", "wall")


# -- window kinds -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Hopping:
    """Windows of ``size`` ms starting every ``step`` ms (tumbling: step == size)."""

    size: int
    step: int


@dataclass(frozen=True, slots=True)
class Sliding:
    size: int


@dataclass(frozen=True, slots=True)
class Session:
    gap: int


Window = Hopping | Sliding | Session


def tumbling(size: Any) -> Hopping:
    """Back-to-back windows of ``size`` seconds: [0, size), [size, 2 size), ..."""
    ms = duration_ms(size, "tumbling(size)")
    if ms <= 0:
        raise ConfigError("tumbling(size): size must be > 0")
    return Hopping(ms, ms)


def hopping(size: Any, every: Any) -> Hopping:
    """Windows of ``size`` seconds starting every ``every`` seconds (overlapping when every < size)."""
    s, e = duration_ms(size, "hopping(size)"), duration_ms(every, "hopping(every)")
    if s <= 0 or e <= 0 or e > s:
        raise ConfigError(f"hopping(size={size}, every={every}): need 0 < every <= size")
    return Hopping(s, e)


def sliding(size: Any) -> Sliding:
    """One window [t - size, t] per distinct message timestamp t of a key."""
    ms = duration_ms(size, "sliding(size)")
    if ms <= 0:
        raise ConfigError("sliding(size): size must be > 0")
    return Sliding(ms)


def session(gap: Any) -> Session:
    """A key's messages less than ``gap`` seconds apart (at most ``gap`` ms) form one session."""
    ms = duration_ms(gap, "session(gap)")
    if ms <= 0:
        raise ConfigError("session(gap): gap must be > 0")
    return Session(ms)


# -- aggregations -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Aggregation:
    """``add(initial(), x)`` folds values in; ``merge(a, b)`` joins two accumulators (session
    windows merging); ``result(acc)`` is what is emitted. Accumulators must pickle."""

    name: str
    initial: Callable[[], Any]
    add: Callable[[Any, Any], Any]
    merge: Callable[[Any, Any], Any] | None = None
    result: Callable[[Any], Any] | None = None


def _field(field: str | Callable | None) -> Callable[[Any], Any] | None:
    return key_getter(field)


def _on_field(name: str, field: Any, initial: Callable, add: Callable, merge: Callable,
              result: Callable | None = None) -> Aggregation:
    get = _field(field)
    if get is not None:
        inner = add
        add = lambda acc, v: inner(acc, get(v))  # noqa: E731
    return Aggregation(name, initial, add, merge, result)


def count() -> Aggregation:
    return Aggregation("count", int, lambda acc, v: acc + 1, lambda a, b: a + b)


def sum(field: str | Callable | None = None) -> Aggregation:  # noqa: A001
    """The sum of the values (or of ``field`` of each value, a name or a callable)."""
    return _on_field("sum", field, int, lambda acc, x: acc + x, lambda a, b: a + b)


def _pick(better: Callable[[Any, Any], bool]) -> Callable[[Any, Any], Any]:
    return lambda acc, x: x if acc is None or better(x, acc) else acc


def min(field: str | Callable | None = None) -> Aggregation:  # noqa: A001
    pick = _pick(lambda x, acc: x < acc)
    return _on_field("min", field, lambda: None, pick, lambda a, b: b if a is None else pick(a, b))


def max(field: str | Callable | None = None) -> Aggregation:  # noqa: A001
    pick = _pick(lambda x, acc: x > acc)
    return _on_field("max", field, lambda: None, pick, lambda a, b: b if a is None else pick(a, b))


def mean(field: str | Callable | None = None) -> Aggregation:
    """The mean; the accumulator is ``[sum, count]``."""
    return _on_field("mean", field, lambda: [0, 0], lambda acc, x: [acc[0] + x, acc[1] + 1],
                     lambda a, b: [a[0] + b[0], a[1] + b[1]], lambda acc: acc[0] / acc[1])


def collect(field: str | Callable | None = None) -> Aggregation:
    """The values in arrival order (merged sessions: the earlier session's first)."""
    return _on_field("collect", field, list, lambda acc, x: acc + [x], lambda a, b: a + b)


def reduce(fn: Callable[[Any, Any], Any]) -> Aggregation:
    """``fn(a, b)`` combines two values of the same kind; the first value starts the window.
    The accumulator is ``[value]`` (``[]`` before the first)."""
    return Aggregation(getattr(fn, "__name__", "reduce"), list, lambda acc, v: [fn(acc[0], v)] if acc else [v],
                       lambda a, b: [fn(a[0], b[0])] if a and b else a or b, lambda acc: acc[0])


def aggregate(fn: Callable[[Any, Any], Any], initial: Callable[[], Any] | Any,
              merge: Callable[[Any, Any], Any] | None = None) -> Aggregation:
    """``fn(accumulator, value) -> accumulator`` from ``initial`` (a callable, or a value that
    is copied); ``merge(a, b)`` is needed for session windows."""
    make = initial if callable(initial) else (lambda: copy.deepcopy(initial))
    return Aggregation(getattr(fn, "__name__", "aggregate"), make, fn, merge)


# -- the operator -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Windowed:
    """A windowed aggregation node's target (see :func:`pipes.App.window`)."""

    window: Window
    agg: Aggregation
    emit: str = "final"
    grace: int = 0
    timestamp: Any = None
    late: str | None = None
    close_on: str = "stream"

    def check(self, node_id: str) -> Windowed:
        if not isinstance(self.window, (Hopping, Sliding, Session)):
            raise ConfigError(f"window {node_id!r}: window= takes pipes.windows.tumbling/hopping/sliding/session(...), "
                              f"not {self.window!r}")
        if self.emit not in EMITS:
            raise ConfigError(f"window {node_id!r}: emit={self.emit!r}; use one of {', '.join(EMITS)}")
        if self.close_on not in CLOSE_ON:
            raise ConfigError(f"window {node_id!r}: close_on={self.close_on!r}; use one of {', '.join(CLOSE_ON)}")
        if isinstance(self.window, Session) and self.agg.merge is None:
            raise ConfigError(f"window {node_id!r}: session windows merge accumulators when a message bridges two "
                              f"sessions: pass merge=lambda a, b: ... (or use a built-in aggregation)")
        if isinstance(self.window, Sliding) and self.emit != "final":
            raise ConfigError(f"window {node_id!r}: sliding windows emit='final' only")
        timestamp_getter(self.timestamp, f"window {node_id!r}")
        return self

    def pipes_processor(self, node: Node, graph: Graph, table: StateTable | None) -> WindowProcessor:
        return WindowProcessor(self, node, graph, table)


class WindowProcessor:
    """Folds each batch into the open windows of its keys, then closes what stream time passed."""

    tick_interval = 1.0

    def __init__(self, op: Windowed, node: Node, graph: Graph, table: StateTable | None):
        if table is None:
            raise ConfigError(f"window {node.id!r} needs keyed state (stateful=True)")
        self.op, self.node, self.table = op, node, table
        self.decoder = Decoder(graph, False)
        self.emitter = Emitter(node, graph)
        self.late = Late(node.id, op.late)
        self.failures = LateFailures(node, self.late)
        self.ts_of = timestamp_getter(op.timestamp, f"window {node.id!r}")
        self.kloads = self.decoder.for_topic(node.inputs[0])[1]
        w = op.window
        self.fold, self.close_window = {Hopping: (None, self._close_hopping),  # folded inline in process()
                                        Session: (self._fold_session, self._close_session),
                                        Sliding: (self._fold_sliding, self._close_sliding)}[type(w)]
        if op.close_on == "wall":
            self.tick = self._tick

    # -- records in --------------------------------------------------------------------
    async def process(self, topic: str, partition: int, records: list[tuple], ckpt: Any) -> None:
        table, grace, ts_of, loads = self.table, self.op.grace, self.ts_of, self.decoder.for_topic(topic)[0]
        idx = table.get(partition, IDX)
        st = idx.get("t", NEVER)
        due = idx.setdefault("c", {})
        out = self._outputs(ckpt) if self.op.emit == "update" else None
        w, agg, fold, tget = self.op.window, self.op.agg, self.fold, table.get
        hop = type(w) is Hopping
        size, step = getattr(w, "size", 0), getattr(w, "step", 0)
        tumbling = size == step
        initial, add = agg.initial, agg.add
        floor = st - grace  # messages before it are late
        for rec in records:
            try:
                value = loads(rec[2])
                key = rec[1]
                ts = rec[4] if ts_of is None else ts_of(value)
                if ts < floor:
                    self.late.send(topic, partition, rec, ts, st, grace, ckpt)
                    continue
                state = tget(partition, key)
                if hop:  # the hot loop, inline: the windows [start, start + size) that hold ts
                    last = ts - ts % step
                    start = last if tumbling else -((size - 1 - ts) // step) * step
                    while True:
                        acc = state.get(start, state)  # the state dict itself marks "no window yet"
                        if acc is state:
                            check_key(key)
                            acc = initial()
                            keys = due.get(start + size + grace)
                            if keys is None:
                                keys = due[start + size + grace] = {}
                            keys[as_text(key)] = None
                        acc = state[start] = add(acc, value)
                        if out is not None:
                            out(key, start, start + size, acc, ts)
                        if start == last:
                            break
                        start += step
                else:
                    check_key(key)
                    fold(state, key, ts, value, due, out)
                if ts > st:
                    st = ts
                    floor = st - grace
            except Exception as e:
                self.failures.handle(e, topic, partition, rec, ckpt)
        idx["t"] = st
        self._close_due(partition, idx, ckpt)

    async def _tick(self, now: float, ckpt: Any, assigned: dict) -> None:
        now_ms = int(now * 1000)
        for partition in sorted({p for t, p in assigned if t in self.node.inputs}):
            idx = self.table.get(partition, IDX)
            idx["t"] = builtins.max(idx.get("t", NEVER), now_ms)
            self._close_due(partition, idx, ckpt)

    def _close_due(self, partition: int, idx: dict, ckpt: Any) -> None:
        due, st = idx.get("c"), idx.get("t", NEVER)
        if not due or builtins.min(due) > st:
            return
        out = self._outputs(ckpt)
        get = self.table.get
        for at in sorted(d for d in due if d <= st):
            for text in due.pop(at):
                key = as_key(text)
                self.close_window(get(partition, key), key, at, st, out, due)

    def _outputs(self, ckpt: Any) -> Callable[[bytes | None, int, int, Any, int], None]:
        """emit(key, start, end, accumulator, timestamp) for this batch."""
        bufs = self.emitter.buffers(ckpt)
        kloads, result, encode = self.kloads, self.op.agg.result, self.emitter.encode

        def emit(key: bytes | None, start: int, end: int, acc: Any, ts: int) -> None:
            value = {"key": kloads(key) if key is not None else None, "start": start, "end": end,
                     "value": result(acc) if result is not None else acc}
            encode(value, key, None, ts, bufs, ckpt)

        return emit

    # -- tumbling and hopping ----------------------------------------------------------------
    def _close_hopping(self, state: dict, key: bytes | None, at: int, st: int, out: Any, due: dict) -> None:
        w = self.op.window
        start = at - self.op.grace - w.size
        if start in state:
            acc = state.pop(start)
            if self.op.emit == "final":
                out(key, start, start + w.size, acc, start + w.size - 1)

    # -- sessions ---------------------------------------------------------------------------
    def _fold_session(self, state: dict, key: bytes | None, ts: int, value: Any, due: dict, out: Any) -> None:
        gap, agg = self.op.window.gap, self.op.agg
        near = sorted(s for s, (e, _) in state.items() if s - gap <= ts <= e + gap)
        if len(near) == 1:
            start = near[0]
            end, acc = state.pop(start)
            acc = agg.add(acc, value)
        else:
            acc = None
            start = end = ts
            for s in near:
                e, a = state.pop(s)
                acc = a if acc is None else agg.merge(acc, a)
                start, end = builtins.min(start, s), builtins.max(end, e)
            acc = agg.add(agg.initial() if acc is None else acc, value)
        start, end = builtins.min(start, ts), builtins.max(end, ts)
        state[start] = [end, acc]
        at = end + gap + self.op.grace + 1
        keys = due.get(at)
        if keys is None:
            keys = due[at] = {}
        keys[as_text(key)] = None
        if out is not None:
            out(key, start, end, acc, ts)

    def _close_session(self, state: dict, key: bytes | None, at: int, st: int, out: Any, due: dict) -> None:
        limit = st - self.op.window.gap - self.op.grace - 1
        for start in sorted(s for s, (e, _) in state.items() if e <= limit):
            end, acc = state.pop(start)
            if self.op.emit == "final":
                out(key, start, end, acc, end)

    # -- sliding ----------------------------------------------------------------------------
    def _fold_sliding(self, state: dict, key: bytes | None, ts: int, value: Any, due: dict, out: Any) -> None:
        values = state.get(ts)
        if values is None:
            state[ts] = [value]
            at = ts + self.op.grace + 1  # the window ending at ts closes
            keys = due.get(at)
            if keys is None:
                keys = due[at] = {}
            keys[as_text(key)] = None
        else:
            values.append(value)

    def _close_sliding(self, state: dict, key: bytes | None, at: int, st: int, out: Any, due: dict) -> None:
        size, grace, agg = self.op.window.size, self.op.grace, self.op.agg
        end = at - grace - 1  # windows close in order of their end, so none before this one is open
        if end in state:
            acc = agg.initial()
            for t in sorted(state):
                if end - size <= t <= end:
                    for v in state[t]:
                        acc = agg.add(acc, v)
            out(key, end - size, end, acc, end)
        # Values before end - size are needed by no open window, nor by any message not yet late.
        for t in [t for t in state if t < end - size]:
            del state[t]
        if state:  # look again when the oldest value can go
            due.setdefault(builtins.min(state) + size + grace + 2, {})[as_text(key)] = None
