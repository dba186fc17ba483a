"""The benchmark workloads.

Each workload is a small pipes app over the same input (N JSON values of ~45 bytes,
10k distinct users), a check that its output is exactly what it should be, and the
per-message work a hand-written equivalent does (for the baselines in baselines.py).

The user functions live in functions.py (module-level, so profiles name them), which
the peers import too.
"""

from __future__ import annotations

import pickle
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import orjson

import pipes

from .functions import N_USERS, count, enrich, expected_outputs, keep_tenth, make_value, stamp, tier

IN, OUT = "bench.in", "bench.out"

dumps = orjson.dumps
loads = orjson.loads


# -- apps --------------------------------------------------------------------------
def app_stateless(n: int) -> pipes.App:
    app = pipes.App("bench-stateless")
    app.transform(IN, to=OUT)(enrich)
    return app


def app_source(n: int) -> pipes.App:
    app = pipes.App("bench-source")

    @app.source(to=IN)
    def numbers(state):
        i = state.get("i", 0)
        if i == n:
            return None
        state["i"] = i + 1
        return {"id": i, "user": f"u{i % N_USERS}", "amount": (i % 400) / 8}

    app.transform(IN, to=OUT)(enrich)
    return app


def app_keyed(n: int) -> pipes.App:
    app = pipes.App("bench-keyed")
    app.transform(IN, to=OUT, key="user")(count)
    return app


def app_prekeyed(n: int) -> pipes.App:
    app = pipes.App("bench-prekeyed")
    app.topic(IN, keyed=True)
    app.transform(IN, to=OUT)(count)
    return app


def app_chain3(n: int) -> pipes.App:
    app = pipes.App("bench-chain3")
    app.transform(IN, to="bench.a")(enrich)
    app.transform("bench.a", to="bench.b")(tier)
    app.transform("bench.b", to=OUT)(stamp)
    return app


def app_filter(n: int) -> pipes.App:
    app = pipes.App("bench-filter")
    app.transform(IN, to=OUT)(keep_tenth)
    return app


# -- checks: outputs are (partition, key bytes, value bytes) in per-partition order --------
class Wrong(AssertionError):
    """The output of a run is not what the workload must produce."""


def _expect(cond: bool, text: str) -> None:
    if not cond:
        raise Wrong(text)


def _check_values(outputs: list, expected: Callable[[int], dict | None], n: int) -> None:
    want_ids = [i for i in range(n) if expected(i) is not None]
    _expect(len(outputs) == len(want_ids), f"{len(outputs)} outputs, expected {len(want_ids)}")
    got = sorted((loads(v) for _, _, v in outputs), key=lambda d: d.get("id", -1))
    for i, d in zip(want_ids, got):
        want = expected(i)
        if d != want:
            raise Wrong(f"output for id {i} is {d!r}, expected {want!r}")


def check_stateless(outputs: list, n: int) -> None:
    _check_values(outputs, lambda i: enrich(make_value(i)), n)


def check_chain3(outputs: list, n: int) -> None:
    _check_values(outputs, lambda i: stamp(tier(enrich(make_value(i)))), n)


def check_filter(outputs: list, n: int) -> None:
    _check_values(outputs, lambda i: make_value(i) if i % 10 == 0 else None, n)


def expected_counts(n: int) -> Counter:
    full, rest = divmod(n, N_USERS)
    return Counter({f"u{u}": full + (1 if u < rest else 0) for u in range(min(n, N_USERS))})


def check_keyed(outputs: list, n: int) -> None:
    _expect(len(outputs) == n, f"{len(outputs)} outputs, expected {n}")
    seen: dict[str, int] = {}
    partition_of: dict[str, int] = {}
    for p, key, raw in outputs:
        d = loads(raw)
        u = d["user"]
        if key is not None and key.decode() != u:
            raise Wrong(f"output {d!r} has key {key!r}")
        if partition_of.setdefault(u, p) != p:
            raise Wrong(f"user {u} appears on partitions {partition_of[u]} and {p}")
        nxt = seen.get(u, 0) + 1
        if d["count"] != nxt:
            raise Wrong(f"user {u}: count {d['count']} after {nxt - 1} (lost, duplicated or reordered)")
        seen[u] = nxt
    want = expected_counts(n)
    _expect(seen == dict(want), "final counts per user differ from the input's")


def check_keyed_state(state: dict[str, dict], n: int) -> None:
    want = {u: {"n": c} for u, c in expected_counts(n).items()}
    if state != want:
        missing = len(set(want) - set(state))
        wrong = sum(1 for u in want if u in state and state[u] != want[u])
        raise Wrong(f"committed keyed state: {len(state)} keys, {missing} missing, {wrong} wrong")


# -- what a hand-written equivalent does per message ------------------------------------
# naive(db) -> (process, on_batch): process(value bytes) -> output bytes or None;
# on_batch(put) stages what a checkpoint every 1000 messages would write besides outputs.
def _naive_stateless(db: Any) -> tuple:
    return (lambda b: dumps(enrich(loads(b)))), None


def _naive_chain3(db: Any) -> tuple:
    return (lambda b: dumps(stamp(tier(enrich(loads(b)))))), None


def _naive_filter(db: Any) -> tuple:
    def process(b: bytes) -> bytes | None:
        r = keep_tenth(loads(b))
        return None if r is None else dumps(r)

    return process, None


def _naive_keyed(db: Any) -> tuple:
    cache: dict[str, dict] = {}
    dirty: dict[str, dict] = {}

    def process(b: bytes) -> bytes:
        v = loads(b)
        u = v["user"]
        state = cache.get(u)
        if state is None:
            raw = db.get(b"state\0" + u.encode()) if db is not None else None
            state = cache[u] = pickle.loads(raw) if raw is not None else {}
        dirty[u] = state
        return dumps(count(v, state))

    def on_batch(put: Callable[[bytes, bytes], None]) -> None:
        for u, state in dirty.items():
            put(b"state\0" + u.encode(), pickle.dumps(state, protocol=5))
        dirty.clear()

    return process, on_batch


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    app: Callable[[int], pipes.App]
    check: Callable[[list, int], None]
    naive: Callable[[Any], tuple]
    preload: bool = True  # False: a source in the app produces the input
    keyed_input: bool = False  # preloaded records carry the user as key
    stateful_node: str | None = None  # node whose committed state is checked

    def expected(self, n: int) -> int:
        return expected_outputs(self.name, n)


WORKLOADS = {w.name: w for w in [
    Workload("stateless", "preloaded topic -> enrich() -> topic", app_stateless, check_stateless,
             _naive_stateless),
    Workload("source", "function source -> topic -> enrich() -> topic, in one run", app_source,
             check_stateless, _naive_stateless, preload=False),
    Workload("keyed", 'count per user: key="user" (re-key topic) + state', app_keyed, check_keyed,
             _naive_keyed, stateful_node="count"),
    Workload("prekeyed", "count per user on a keyed input topic (no re-key hop)", app_prekeyed, check_keyed,
             _naive_keyed, keyed_input=True, stateful_node="count"),
    Workload("chain3", "enrich() -> topic -> tier() -> topic -> stamp() -> topic", app_chain3, check_chain3,
             _naive_chain3),
    Workload("filter", "keep_tenth(): drops 90%", app_filter, check_filter, _naive_filter),
]}
