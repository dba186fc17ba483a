"""Interpreter modes: transforms on pools of sub-interpreters and processes, through real
apps on memory://, checked against global mode and against a recomputation."""

from __future__ import annotations

import asyncio
import importlib
import sys
import traceback

import pytest

import pipes
from pipes.modes import Pool, PoolError
from pipes.testing import run_app

POOLED = ["isolated", "isolated_legacy", "process"]

# Workers import the user's functions by module and name, and this test module imports
# rocksdict (through pipes.testing), which refuses sub-interpreters: the apps live in a
# small module of their own, written to a temporary directory on the import path.
APP = '''
import os

import pipes


def enrich(order):
    if order["amount"] == 13:
        raise ValueError("unlucky 13")
    if order["amount"] % 5 == 0:
        return None
    return {**order, "double": order["amount"] * 2}


def customer(order):
    return order["customer"]


def split(line):
    yield from line.split()


async def route(msg: pipes.Message):
    word = msg.value
    headers = {"len": len(word), "in": msg.offset}
    if word.startswith("x"):
        return pipes.Message(word.upper(), key=word[0], headers=headers, topic="x_words")
    return pipes.Message(word, key=word[0], headers=headers)


def running(order, state):
    state["n"] = state.get("n", 0) + 1
    state["sum"] = state.get("sum", 0) + order["amount"]
    if order["amount"] == 13:
        raise ValueError("unlucky 13")
    return {"customer": order["customer"], "id": order["id"], "n": state["n"], "sum": state["sum"]}


def build(mode, workers=2):
    app = pipes.App("modes")
    app.transform("orders", to="by_customer", key=customer, mode=mode, workers=workers)(enrich)
    app.transform("lines", to="words", mode=mode, workers=workers)(split)
    app.transform("words", to="routed", mode=mode, workers=workers)(route)
    app.transform("orders", to="totals", key=customer, name="running", mode=mode, workers=workers)(running)
    return app


# -- Pool handlers: handler(list[bytes]) -> list[bytes] -----------------------------------------
def tagger(arg):
    """Tags each item with this worker's identity and a running count, to see routing."""
    seen = []
    me = f"{os.getpid()}-{id(seen)}"

    def handle(items):
        out = []
        for item in items:
            seen.append(item)
            out.append(b"%s|%s|%d|%s" % (arg.encode(), me.encode(), len(seen), item))
        return out
    return handle


def modules(arg):
    import sys
    return lambda names: [b"imported" if n.decode() in sys.modules else b"not imported" for n in names]


def raiser(arg):
    def handle(items):
        raise RuntimeError("handler broke")
    return handle


def dier(arg):
    def handle(items):
        os._exit(3)
    return handle
'''

REFUSING = '''
import rocksdict  # a PyO3 extension: refuses sub-interpreters, isolated or not

import pipes


def same(value):
    return value


def build(mode):
    app = pipes.App("refusing")
    app.transform("in", to="out", mode=mode, workers=1)(same)
    return app
'''


@pytest.fixture(scope="module")
def mod(tmp_path_factory):
    root = tmp_path_factory.mktemp("modes_apps")
    (root / "pipes_modes_app.py").write_text(APP)
    (root / "pipes_refusing_app.py").write_text(REFUSING)
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module("pipes_modes_app")
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("pipes_modes_app", None)
        sys.modules.pop("pipes_refusing_app", None)


ORDERS = [{"id": i, "customer": f"c{i * 7 % 5}", "amount": i % 23} for i in range(300)]
LINES = [" ".join(f"{w}{i}" for w in ("ab", "xy", "cd")[: 1 + i % 3]) for i in range(60)]


def _run(app):
    # Small polls: many batches, so keyed state goes back and forth between them.
    return run_app(app, {"orders": ORDERS, "lines": LINES}, poll_records=37)


def _view(result, topic):
    return [(m.key, m.value, m.headers) for m in result.messages(topic)]


@pytest.fixture(scope="module")
def global_result(mod):
    return _run(mod.build("global"))


def test_global_matches_a_recomputation(global_result):
    """The reference the pooled modes are compared with is itself right."""
    r = global_result
    kept = [o for o in ORDERS if o["amount"] % 5 and o["amount"] != 13]
    assert _view(r, "by_customer") == [(o["customer"], {**o, "double": o["amount"] * 2}, {}) for o in kept]
    words = [w for line in LINES for w in line.split()]
    assert r["words"] == words
    assert _view(r, "routed") == [(w[0], w, {"len": str(len(w)).encode(), "in": str(i).encode()})
                                  for i, w in enumerate(words) if not w.startswith("x")]
    assert r["x_words"] == [w.upper() for w in words if w.startswith("x")]
    expected, sums = [], {}
    for o in ORDERS:  # the running count and sum per customer, in input order
        n, s = sums.get(o["customer"], (0, 0))
        sums[o["customer"]] = (n + 1, s + o["amount"])
        if o["amount"] != 13:
            expected.append({"customer": o["customer"], "id": o["id"], "n": n + 1, "sum": s + o["amount"]})
    assert r["totals"] == expected
    assert r.state("running") == {c: {"n": n, "sum": s} for c, (n, s) in sums.items()}
    unlucky = [o for o in ORDERS if o["amount"] == 13]
    assert r["orders.dlq"] == unlucky
    assert r["modes.running.rekey.dlq"] == unlucky


@pytest.mark.parametrize("mode", POOLED)
def test_pooled_modes_give_the_global_results(mod, global_result, mode):
    r = _run(mod.build(mode, workers=2))
    for topic in ("by_customer", "words", "routed", "x_words", "totals"):
        assert _view(r, topic) == _view(global_result, topic), topic
    # Keyed state, with updates made before a function raised, as in global mode.
    assert r.state("running") == global_result.state("running")
    # Failures: the original records on the dead-letter topics with the same error headers.
    dlq = r.messages("orders.dlq") + r.messages("modes.running.rekey.dlq")
    ref = global_result.messages("orders.dlq") + global_result.messages("modes.running.rekey.dlq")
    assert [(m.value, m.headers["pipes.error.node"]) for m in dlq] == [(m.value, m.headers["pipes.error.node"])
                                                                        for m in ref]
    for m, g in zip(dlq, ref):
        assert m.headers.keys() == g.headers.keys()
        for h in g.headers:
            if h != "pipes.error.traceback":
                assert m.headers[h] == g.headers[h], h
        # The innermost frame is the user's line, in the worker as in the main interpreter.
        inner = m.headers["pipes.error.traceback"].split(b" < ")[0]
        assert inner == g.headers["pipes.error.traceback"].split(b" < ")[0]
        assert inner.startswith(b"pipes_modes_app.py:") and inner.endswith((b" in enrich", b" in running"))
    assert len(dlq) == 2 * sum(o["amount"] == 13 for o in ORDERS)


def test_stop_and_skip_policies_apply_to_pooled_failures(mod, caplog):
    app = pipes.App("stopping")
    app.transform("orders", to="enriched", mode="isolated", on_error="stop")(mod.enrich)
    with pytest.raises(pipes.ProcessingError, match=r"node 'enrich' failed on topic 'orders' partition 0 "
                                                     r"offset 13: ValueError: unlucky 13"):
        run_app(app, {"orders": ORDERS})
    app = pipes.App("skipping")
    app.transform("orders", to="enriched", mode="isolated", on_error="skip")(mod.enrich)
    r = run_app(app, {"orders": ORDERS})
    assert len(r["enriched"]) == sum(1 for o in ORDERS if o["amount"] % 5 and o["amount"] != 13)
    assert "orders.dlq" not in r.topics or r["orders.dlq"] == []
    # The logged traceback goes through the worker's frames, down to the user's line.
    logged = [rec for rec in caplog.records if "unlucky 13" in rec.getMessage()]
    assert logged and logged[0].exc_info[1].__traceback__ is not None
    line = APP.splitlines().index('        raise ValueError("unlucky 13")') + 1
    assert f'pipes_modes_app.py", line {line}, in enrich' in "".join(traceback.format_exception(logged[0].exc_info[1]))


def test_import_pipes_works_in_an_isolated_sub_interpreter(mod):
    """Workers import pipes (the user's module does): nothing it imports may refuse
    sub-interpreters. orjson does, and is stood in for; rocksdict must not be imported."""
    async def go():
        pool = Pool("isolated", 1, "pipes_modes_app:modules")
        await pool.start()
        try:
            return await pool.run([b"rocksdict"], [None])
        finally:
            await pool.close()

    assert asyncio.run(go()) == [b"not imported"]


def test_per_key_order_and_routing_in_a_pool(mod):
    """Items of one key go to one worker, in order; results come back in input order."""
    keys = [b"k%d" % (i % 5) for i in range(40)] + [None] * 10
    items = [b"%d" % i for i in range(50)]

    async def go():
        pool = Pool("isolated", 2, "pipes_modes_app:tagger", "t")
        await pool.start()
        try:
            return [await pool.run(items, keys) for _ in range(2)]
        finally:
            await pool.close()

    first, second = asyncio.run(go())
    for results in (first, second):
        assert [r.split(b"|")[3] for r in results] == items
    rows = [r.split(b"|") for r in first + second]
    workers = {row[1] for row in rows}
    assert len(workers) == 2  # both workers got work
    for k in set(keys) - {None}:
        mine = [rows[i] for i in range(100) if keys[i % 50] == k]
        assert len({row[1] for row in mine}) == 1  # one worker per key...
        assert [int(row[2]) for row in mine] == sorted(int(row[2]) for row in mine)  # ...in input order
    counts = {}
    for row in rows:  # each worker counted its own items without gaps
        counts.setdefault(row[1], []).append(int(row[2]))
    assert all(c == list(range(1, len(c) + 1)) for c in counts.values())


@pytest.mark.parametrize("mode", POOLED)
def test_a_raising_handler_is_a_pool_error(mod, mode):
    async def go():
        pool = Pool(mode, 1, "pipes_modes_app:raiser")
        await pool.start()
        try:
            await pool.run([b"x"], [None])
        finally:
            await pool.close()

    with pytest.raises(PoolError, match=f"pipes_modes_app:raiser failed in a worker \\(mode='{mode}'\\): "
                                         f"RuntimeError: handler broke"):
        asyncio.run(go())


def test_a_dead_process_worker_is_a_pool_error(mod):
    async def go():
        pool = Pool("process", 1, "pipes_modes_app:dier")
        await pool.start()
        try:
            await pool.run([b"x"], [None])
        finally:
            await pool.close()

    with pytest.raises(PoolError, match=r"worker process \d+ died \(exit code 3\)"):
        asyncio.run(go())


def test_functions_workers_cannot_import_are_config_errors(mod):
    app = pipes.App("lambdas")
    app.transform("in", to="out", mode="isolated")(lambda v: v)
    with pytest.raises(pipes.ConfigError, match=r"transform '<lambda>' .*mode='isolated' runs its function in "
                                                r"other interpreters.* is a lambda: define it at the top level"):
        run_app(app, {"in": [1]})

    def local(v):
        return v

    app = pipes.App("closures")
    app.transform("in", to="out", mode="process")(local)
    with pytest.raises(pipes.ConfigError, match="is defined inside a function"):
        run_app(app, {"in": [1]})
    app = pipes.App("keys")
    app.transform("in", to="out", mode="isolated", key=lambda v: v)(mod.enrich)
    with pytest.raises(pipes.ConfigError, match="runs its key= in other interpreters"):
        run_app(app, {"in": [1]})


@pytest.mark.parametrize("mode", ["isolated", "isolated_legacy"])
def test_a_module_that_refuses_sub_interpreters_is_a_config_error(mod, mode):
    refusing = importlib.import_module("pipes_refusing_app")
    with pytest.raises(pipes.ConfigError, match=r"transform 'same' .*module 'rocksdict' refuses sub-interpreters "
                                                r".*use mode='global' or mode='process'"):
        run_app(refusing.build(mode), {"in": [1]})


def test_process_mode_runs_what_sub_interpreters_refuse(mod):
    refusing = importlib.import_module("pipes_refusing_app")
    assert run_app(refusing.build("process"), {"in": [1, {"a": 2}]})["out"] == [1, {"a": 2}]


def test_the_json_stand_in_writes_what_orjson_writes():
    """Sub-interpreter workers encode JSON with the standard library in orjson's place."""
    import dataclasses
    import datetime
    import enum
    import uuid

    import orjson

    from pipes._mode_worker import _json_module

    class Color(enum.Enum):
        RED = "red"

    @dataclasses.dataclass
    class Point:
        x: int
        label: str

    stand_in = _json_module()
    values = [{"a": 1, "b": [1, 2.5, None, True], "ü": "héllo ✓", "q": "line\n\t\"q\"\\\u2028\x00"},
              {1: "int key", None: 2, True: 3}, 123456789.125, -0.0, 2 ** 63 - 1, -2 ** 63, [], {},
              datetime.datetime(2026, 1, 2, 3, 4, 5, 123456), datetime.date(2026, 1, 2),
              datetime.datetime(2026, 1, 2, tzinfo=datetime.timezone.utc), uuid.UUID(int=5), Color.RED,
              Point(1, "p")]
    for v in values:
        expected = orjson.dumps(v, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)
        assert stand_in.dumps(v, option=stand_in.OPT_NON_STR_KEYS | stand_in.OPT_SERIALIZE_NUMPY) == expected
        assert stand_in.loads(expected) == orjson.loads(expected)
    assert stand_in.dumps(1.5e-7) != orjson.dumps(1.5e-7)  # exponents are written 1.5e-07: the same number
    assert stand_in.loads(stand_in.dumps(1.5e-7)) == 1.5e-7
    with pytest.raises(stand_in.JSONEncodeError, match="Type is not JSON serializable: set"):
        stand_in.dumps({1, 2})
    with pytest.raises(stand_in.JSONDecodeError):
        stand_in.loads(b"{nope")
