"""Time-driven code: periodic timers, cron schedules, and per-key timeouts.

    @app.timer(every=60, to="heartbeats")       # every 60 s, on one worker of the topology
    def heartbeat():
        return {"at": time.time()}

    @app.crontab("*/5 * * * *", to="reports")     # minute hour day-of-month month day-of-week, UTC
    def report(): ...

    @app.timeout("checkouts", key="order", after=600, to="abandoned",
                 cancel=lambda v: v["type"] == "payment")
    def abandoned(last):                            # once per key, 10 min after its last message
        return {"order": last["order"], "reason": "no payment"}

``timer`` and ``crontab`` run as sources: they run on the one worker that holds the
topology's source lease (one per consumer group on Kafka), and their last firing time
is the source's checkpoint, so a restarted worker does not fire early; one that was down
past a firing fires once at start (not once per missed firing). A function returning
None emits nothing. Like any source that never ends, they keep ``--until-done`` waiting.

``timeout`` is keyed state: a key's deadline is the timestamp of its latest message
(broker timestamp, or ``timestamp=``) plus ``after``; once the wall clock passes it, the
function gets that message's value and the key's timer is deleted, in the same
checkpoint as what it emitted, so it fires once per key and survives restarts. A
message for which ``cancel(value)`` is true deletes the key's timer.
"""

from __future__ import annotations

import asyncio
import builtins
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Callable

from .emit import Emitter, serializers_of
from .errors import ConfigError
from .eventtime import IDX, as_key, as_text, check_key, timestamp_getter
from .failures import Failures
from .nodes import Decoder, maybe_await
from .topology import Graph, Node

if TYPE_CHECKING:  # rocksdict (under pipes.state) cannot load in sub-interpreters
    from .state import StateTable


def _now_ms() -> int:
    return int(time.time() * 1000)


class _Scheduled:
    """A source connector calling ``fn()`` at the times its ``next_after(ms)`` gives (after
    the last firing, or after the start); its checkpoint is the time of the last firing."""

    pipes_endless = True  # never finishes: `--until-done` does not wait for it

    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn
        self.last: int | None = None

    def checkpoint(self) -> dict:
        return {"last": self.last}

    def restore(self, state: dict) -> None:
        self.last = state.get("last")

    async def __aiter__(self) -> Any:
        while True:
            now = _now_ms()
            due = self.next_after(self.last) if self.last is not None else self.next_after(now)
            if due > now:
                await asyncio.sleep((due - now) / 1000)
            self.last = builtins.max(due, _now_ms() - 1) if due < now else due  # missed: fire once, now
            yield await maybe_await(self.fn())


class Every(_Scheduled):
    def __init__(self, fn: Callable[[], Any], every_ms: int):
        if not every_ms:
            raise ConfigError(f"timer {getattr(fn, '__name__', fn)!r}: every= must be > 0")
        super().__init__(fn)
        self.every = every_ms

    def next_after(self, ms: int) -> int:
        return ms + self.every


@dataclass(frozen=True, slots=True)
class CronSpec:
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    any_day: bool  # day of month is "*"
    any_weekday: bool

    def matches_day(self, d: datetime) -> bool:
        dom, dow = d.day in self.days, (d.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:
            return dom and dow
        return dom or dow  # both restricted: either matches, as in cron

    def next_after(self, ms: int) -> int:
        """The first matching minute strictly after `ms` (UTC), within four years."""
        t = datetime.fromtimestamp(ms / 1000, timezone.utc).replace(second=0, microsecond=0) + timedelta(minutes=1)
        limit = t + timedelta(days=4 * 366)
        while t < limit:
            if t.month not in self.months:
                t = (t.replace(day=1, hour=0, minute=0) + timedelta(days=32)).replace(day=1)
            elif not self.matches_day(t):
                t = t.replace(hour=0, minute=0) + timedelta(days=1)
            elif t.hour not in self.hours:
                t = t.replace(minute=0) + timedelta(hours=1)
            elif t.minute not in self.minutes:
                t += timedelta(minutes=1)
            else:
                return int(t.timestamp() * 1000)
        raise ConfigError("this cron schedule never fires")


_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7))


def parse_cron(spec: str, name: str) -> CronSpec:
    """Five fields: ``*``, ``*/n``, ``a``, ``a-b``, ``a-b/n`` and comma lists of those."""
    parts = spec.split() if isinstance(spec, str) else []
    if len(parts) != 5:
        raise ConfigError(f"crontab {name!r}: {spec!r} is not five fields (minute hour day month weekday), "
                          f"e.g. '*/5 * * * *'")
    sets = []
    for text, (what, lo, hi) in zip(parts, _FIELDS):
        values: set[int] = set()
        for item in text.split(","):
            rng, _, step = item.partition("/")
            try:
                n = int(step) if step else 1
                a, b = (lo, hi) if rng == "*" else (int(rng.split("-")[0]), int(rng.split("-")[-1]))
            except ValueError:
                raise ConfigError(f"crontab {name!r}: {item!r} in {spec!r} is not a number, range or step") from None
            if n < 1 or not lo <= a <= b <= hi:
                raise ConfigError(f"crontab {name!r}: {item!r} in {spec!r}: the {what} goes from {lo} to {hi}")
            values |= set(range(a, b + 1, n))
        sets.append(frozenset(values))
    weekdays = frozenset(d % 7 for d in sets[4])
    return CronSpec(sets[0], sets[1], sets[2], sets[3], weekdays, parts[2] == "*", parts[4] == "*")


class Cron(_Scheduled):
    def __init__(self, fn: Callable[[], Any], spec: CronSpec):
        super().__init__(fn)
        self.spec = spec

    def next_after(self, ms: int) -> int:
        return self.spec.next_after(ms)


# -- per-key timeouts ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Timeout:
    """A timeout node's target: see :meth:`pipes.App.timeout`."""

    fn: Callable[[Any], Any]
    after: int
    cancel: Callable[[Any], bool] | None = None
    timestamp: Any = None

    def pipes_processor(self, node: Node, graph: Graph, table: StateTable | None) -> TimeoutProcessor:
        return TimeoutProcessor(self, node, graph, table)


class TimeoutProcessor:
    """State per key: ``{"at": deadline ms, "value": last value}``; per partition, under
    ``\\x00idx``, the keys by deadline rounded up to the tick interval."""

    def __init__(self, op: Timeout, node: Node, graph: Graph, table: StateTable | None):
        if table is None:
            raise ConfigError(f"timeout {node.id!r} needs keyed state (stateful=True)")
        self.op, self.node, self.table = op, node, table
        self.decoder = Decoder(graph, False)
        self.emitter = Emitter(node, graph)
        self.failures = Failures(node)
        self.ts_of = timestamp_getter(op.timestamp, f"timeout {node.id!r}")
        self.tick_interval = builtins.max(0.05, builtins.min(1.0, op.after / 4000))
        self._slot = int(self.tick_interval * 1000)
        self._dumps = serializers_of(graph, node.inputs[0])[0].dumps  # a failing call's DLQ record

    async def process(self, topic: str, partition: int, records: list[tuple], ckpt: Any) -> None:
        loads, get, cancel, after, slot = (self.decoder.for_topic(topic)[0], self.table.get, self.op.cancel,
                                           self.op.after, self._slot)
        due = get(partition, IDX).setdefault("c", {})
        for rec in records:
            try:
                value = loads(rec[2])
                key = rec[1]
                check_key(key)
                state = get(partition, key)
                if cancel is not None and cancel(value):
                    state.clear()
                    continue
                at = (rec[4] if self.ts_of is None else self.ts_of(value)) + after
                if at >= state.get("at", at):
                    state["at"], state["value"] = at, value
                    due.setdefault(-(-at // slot) * slot, {})[as_text(key)] = None
            except Exception as e:
                self.failures.handle(e, topic, partition, rec, ckpt)

    async def tick(self, now: float, ckpt: Any, assigned: dict) -> None:
        now_ms, get = int(now * 1000), self.table.get
        bufs = None
        for partition in sorted({p for t, p in assigned if t in self.node.inputs}):
            due = get(partition, IDX).get("c")
            if not due or builtins.min(due) > now_ms:
                continue
            for slot in sorted(s for s in due if s <= now_ms):
                for key in map(as_key, due.pop(slot)):
                    state = get(partition, key)
                    if not state or state["at"] > now_ms:
                        continue  # cancelled, or pushed back (it is in a later slot too)
                    try:
                        result = await maybe_await(self.op.fn(state["value"]))
                        if result is not None:
                            bufs = bufs or self.emitter.buffers(ckpt)
                            self.emitter.encode(result, key, None, state["at"], bufs, ckpt)
                    except Exception as e:
                        rec = (-1, key, self._dumps(state["value"]), None, state["at"])
                        self.failures.handle(e, self.node.inputs[0], partition, rec, ckpt)
                    state.clear()
