"""Windowed aggregations against a plain-Python recomputation.

Random keyed streams with out-of-order messages (within grace) and late ones (beyond it)
run through pipes; the recomputation reads the window node's input back (per partition,
in offset order, as the node saw it), applies the lateness rule of pipes.eventtime, and
computes every window from scratch: which ones closed (and so were emitted and left
state), their values, and what is still open in state. The same check runs on memory://
for every window kind, after SIGKILLs and restarts of a `pipes worker` on local://, and
after a worker failover on kafka:// (Tansu).
"""

from __future__ import annotations

import random
from collections import defaultdict

import pytest

import pipes
from pipes import windows as w
from pipes.eventtime import IDX
from pipes.testing import run_app

GRACE = 3000
PARTS = 3


def stream(seed: int, n: int, keys: int = 8) -> list[dict]:
    """Events 0..n with timestamps mostly rising, jittered within grace, some far behind (late)."""
    rnd = random.Random(seed)
    out, base = [], 1_000_000
    for i in range(n):
        base += rnd.randint(0, 700)
        r = rnd.random()
        ts = base - rnd.randint(0, GRACE - 1) if r < 0.3 else base - rnd.randint(GRACE + 500, 30_000) if r < 0.35 else base
        out.append({"i": i, "k": f"k{rnd.randrange(keys)}", "ts": ts, "x": rnd.randint(-50, 100)})
    return out


def node_input(result, topic: str) -> dict[int, list[dict]]:
    parts: dict[int, list[dict]] = defaultdict(list)
    for m in result.messages(topic):
        parts[m.partition].append(m.value)
    return parts


def split_late(records: list[dict]) -> tuple[list[dict], list[dict], int]:
    """(kept, late, stream time) of one partition by the rule: late iff ts < stream time - grace."""
    st, kept, late = None, [], []
    for r in records:
        if st is not None and r["ts"] < st - GRACE:
            late.append(r)
            continue
        kept.append(r)
        st = r["ts"] if st is None else max(st, r["ts"])
    return kept, late, st


AGGS = {
    "count": (w.count(), lambda xs: len(xs)),
    "sum": (w.sum("x"), lambda xs: sum(xs)),
    "min": (w.min("x"), lambda xs: min(xs)),
    "max": (w.max("x"), lambda xs: max(xs)),
    "mean": (w.mean("x"), lambda xs: sum(xs) / len(xs)),
    "collect": (w.collect("x"), lambda xs: sorted(xs)),
}


def expected_windows(kind: str, kept: list[dict], st: int, size: int, step: int) -> dict:
    """(key, start, end) -> (closed, xs in arrival order) for one partition."""
    by_key: dict[str, list[dict]] = defaultdict(list)
    for r in kept:
        by_key[r["k"]].append(r)
    out = {}
    for k, rs in by_key.items():
        if kind in ("tumbling", "hopping"):
            xs_of: dict[int, list] = defaultdict(list)
            for r in rs:  # arrival order
                for s in range(r["ts"] - r["ts"] % step - (size // step + 1) * step, r["ts"] + 1, step):
                    if s <= r["ts"] < s + size:
                        xs_of[s].append(r["x"])
            for s, xs in xs_of.items():
                out[(k, s, s + size)] = (st >= s + size + GRACE, xs)
        elif kind == "session":
            order = sorted(rs, key=lambda r: r["ts"])
            groups = [[order[0]]]
            for r in order[1:]:
                if r["ts"] - groups[-1][-1]["ts"] <= size:
                    groups[-1].append(r)
                else:
                    groups.append([r])
            group_of = {r["i"]: n for n, g in enumerate(groups) for r in g}
            xs_of = defaultdict(list)
            for r in rs:
                xs_of[group_of[r["i"]]].append(r["x"])
            for n, g in enumerate(groups):
                s, e = g[0]["ts"], g[-1]["ts"]
                out[(k, s, e)] = (st >= e + size + GRACE + 1, xs_of[n])
        else:  # sliding
            for t in {r["ts"] for r in rs}:
                out[(k, t - size, t)] = (st >= t + GRACE + 1, [r["x"] for r in rs if t - size <= r["ts"] <= t])
    return out


def window_of(kind: str, size: int, step: int):
    return {"tumbling": lambda: w.tumbling(size / 1000), "hopping": lambda: w.hopping(size / 1000, step / 1000),
            "session": lambda: w.session(size / 1000), "sliding": lambda: w.sliding(size / 1000)}[kind]()


def norm(agg: str, value):
    return sorted(value) if agg == "collect" else value


CASES = [("tumbling", "count"), ("tumbling", "sum"), ("tumbling", "collect"), ("hopping", "max"),
         ("hopping", "mean"), ("session", "count"), ("session", "collect"), ("session", "min"),
         ("sliding", "sum"), ("sliding", "count")]


@pytest.mark.parametrize("kind,agg", CASES)
def test_final_windows_equal_recomputation(kind, agg):
    size, step = (10_000, 10_000) if kind != "hopping" else (10_000, 4_000)
    if kind == "session":
        size = 2_000
    events = stream(hash((kind, agg)) % 1000, 3000)
    app = pipes.App("win", partitions=PARTS)
    app.window("events", to="out", key="k", window=window_of(kind, size, step), agg=AGGS[agg][0], grace=GRACE / 1000,
               timestamp="ts", late="late", name="agg")
    result = run_app(app, {"events": events})

    fold = AGGS[agg][1]
    want_out, want_state, want_late = set(), defaultdict(dict), set()
    for p, records in node_input(result, "win.agg.rekey").items():
        kept, late, st = split_late(records)
        want_late |= {r["i"] for r in late}
        for (k, s, e), (closed, xs) in expected_windows(kind, kept, st, size, step).items():
            if closed:
                want_out.add((k, s, e, repr(fold(xs))))
            else:
                want_state[k][(s, e)] = fold(xs)
    got = [(o["key"], o["start"], o["end"], repr(norm(agg, o["value"]))) for o in result["out"]]
    assert len(got) == len(set(got)), "a window was emitted twice"
    assert set(got) == want_out
    assert len(want_late) > 20 and {m["i"] for m in result["late"]} == want_late
    assert "dlq" not in " ".join(result.topics)
    # What is left in state is exactly the open windows.
    state = result.state("agg")
    assert set(state.pop(IDX.decode())) == {"t", "c"}
    left: dict[str, dict] = {}
    for k, windows in state.items():
        if kind in ("tumbling", "hopping"):
            left[k] = {(s, s + size): norm(agg, AGGS[agg][0].result(a) if AGGS[agg][0].result else a)
                       for s, a in windows.items()}
        elif kind == "session":
            left[k] = {(s, e): norm(agg, AGGS[agg][0].result(a) if AGGS[agg][0].result else a)
                       for s, (e, a) in windows.items()}
    if kind != "sliding":  # sliding keeps raw values, not windows
        assert left == {k: v for k, v in want_state.items() if v}
    assert want_state, "the test should leave some windows open"


def test_update_mode_emits_every_change_in_arrival_order():
    events = stream(7, 2000)
    app = pipes.App("win", partitions=2)
    app.window("events", to="out", key="k", window=w.hopping(10, 5), agg=w.sum("x"), emit="update",
               grace=GRACE / 1000, timestamp="ts", name="agg")
    result = run_app(app, {"events": events})
    want: dict[tuple, list] = defaultdict(list)
    for records in node_input(result, "win.agg.rekey").values():
        kept, _, _ = split_late(records)
        running: dict[tuple, int] = defaultdict(int)
        for r in kept:
            for s in range(r["ts"] - r["ts"] % 5000 - 5000, r["ts"] + 1, 5000):
                if s <= r["ts"] < s + 10_000:
                    running[(r["k"], s)] += r["x"]
                    want[(r["k"], s)].append(running[(r["k"], s)])
    got: dict[tuple, list] = defaultdict(list)
    for o in result["out"]:
        assert o["end"] == o["start"] + 10_000
        got[(o["key"], o["start"])].append(o["value"])
    assert got == want
    assert any(m.headers.get("pipes.error.type") == b"LateMessage" for m in result.messages("win.agg.rekey.dlq"))


def test_user_aggregate_and_reduce():
    events = [{"k": "a", "ts": t, "x": x} for t, x in [(0, 1), (500, 2), (9_999, 3), (10_000, 4), (30_000, 5)]]
    app = pipes.App("win")

    @app.window("events", to="spans", key="k", window=w.tumbling(10), timestamp="ts", initial=dict)
    def span(acc, v):
        acc["lo"] = min(acc.get("lo", v["x"]), v["x"])
        acc["hi"] = max(acc.get("hi", v["x"]), v["x"])
        return acc

    @app.window("events", to="products", key="k", window=w.session(5), timestamp="ts")
    def product(a, b):
        return {"x": a["x"] * b["x"]}

    result = run_app(app, {"events": events})
    assert [(o["start"], o["value"]) for o in result["spans"]] == [(0, {"lo": 1, "hi": 3}), (10_000, {"lo": 4, "hi": 4})]
    assert [(o["start"], o["end"], o["value"]) for o in result["products"]] == [(0, 500, {"x": 2}), (9_999, 10_000, {"x": 12})]


def test_config_errors_name_the_node():
    app = pipes.App("win")
    with pytest.raises(pipes.ConfigError, match="'agg'.*merge="):
        app.window("e", to="o", window=w.session(5), initial=list, name="agg")(lambda a, v: a)
    with pytest.raises(pipes.ConfigError, match="emit="):
        app.window("e", to="o", window=w.tumbling(5), agg=w.count(), emit="sometimes")
    with pytest.raises(pipes.ConfigError, match="every <= size"):
        w.hopping(5, 10)
    with pytest.raises(pipes.ConfigError, match="grace="):
        app.window("e", to="o", window=w.tumbling(5), agg=w.count(), grace=-1)


def test_wall_clock_closes_quiet_keys():
    import asyncio
    import time

    app = pipes.App("win")
    app.window("events", to="out", key="k", window=w.tumbling(1), agg=w.count(), close_on="wall", grace=2,
               name="agg")
    seen: list = []
    app.sink("out", seen.append)
    now = int(time.time() * 1000)

    asyncio.run(asyncio.wait_for(_run_until(app, [{"k": "quiet"}], seen, 1), 10))
    assert seen[0]["key"] == "quiet" and seen[0]["value"] == 1 and seen[0]["end"] > now


async def _run_until(app, values, seen, want):
    """Run on memory:// with `values` on "events" until `seen` has `want` items."""
    import asyncio

    from pipes.brokers.local import LocalBroker
    from pipes.runtime import run
    from pipes.testing import _feed

    s = app.settings.override(broker="memory://")
    graph = app.build(s)
    broker = LocalBroker(None, s, url="memory://")
    await broker.open(graph, list(graph.topologies.values()))
    await _feed(broker, graph, {"events": values})
    stop = asyncio.Event()
    task = asyncio.create_task(run(graph, s, broker=broker, stop=stop))
    try:
        while len(seen) < want:
            assert not task.done(), task
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
        await broker.close()


# -- SIGKILL and restart on local:// --------------------------------------------------------
CRASH_APP = '''
import pipes
from pipes import windows as w

N = {n}
app = pipes.App("wincrash", partitions=2, commit_every=2000)
app.topic("events", partitions=1)

@app.source(to="events")
def events(state):
    i = state.get("i", 0)
    if i == N:
        return None
    state["i"] = i + 1
    r = (i * 2654435761) % 1000
    base = 1_000_000 + i * 5
    ts = base - r * 9 if r < 300 else base - 6000 - r if r < 330 else base
    return {{"i": i, "k": f"k{{(i * 31) % 50}}", "ts": ts, "x": r % 17}}

app.window("events", to="out", key="k", window=w.tumbling(2), agg=w.sum("x"), grace=3, timestamp="ts",
           late="late", name="agg")
'''


def _worker(app_file, data_dir, log):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPES_")}
    cli = Path(sys.executable).with_name("pipes")
    return subprocess.Popen([str(cli), "worker", "-A", str(app_file), "--data-dir", str(data_dir), "--until-done"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)


def _windowed(data) -> int:
    """How many messages the window node has processed, durably (its committed offsets)."""
    from pipes.errors import BrokerError
    from pipes.store import Store

    try:
        store = Store(str(data), read_only=True)
    except BrokerError:
        return 0
    try:
        return sum(off for (topic, _), off in store.offsets("wincrash.main").items() if topic == "wincrash.agg.rekey")
    finally:
        store.close()


@pytest.mark.slow
def test_sigkill_and_restart_give_the_recomputed_windows(tmp_path):
    import signal
    import time

    from helpers import read_topic

    n = 400_000
    app_file = tmp_path / "wincrash.py"
    app_file.write_text(CRASH_APP.format(n=n))
    data = tmp_path / "data"
    rnd = random.Random(int(time.time()))
    kills = 0
    with open(tmp_path / "worker.log", "wb") as log:
        for _ in range(3):
            proc = _worker(app_file, data, log)
            time.sleep(rnd.uniform(0.6, 1.6))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                done = _windowed(data)
                kills += 0 < done < n  # killed mid-stream: some, not all, messages windowed
            proc.wait()
        proc = _worker(app_file, data, log)
        assert proc.wait(timeout=120) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    assert kills, "no worker was killed mid-stream: make n larger"

    inputs: dict[int, list[dict]] = defaultdict(list)
    for m in read_topic(data, "wincrash.agg.rekey"):
        inputs[m.partition].append(m.value)
    assert sorted(v["i"] for vs in inputs.values() for v in vs) == list(range(n)), "input lost or duplicated"
    want, want_late = set(), set()
    for records in inputs.values():
        kept, late, st = split_late(records)
        want_late |= {r["i"] for r in late}
        for (k, s, e), (closed, xs) in expected_windows("tumbling", kept, st, 2000, 2000).items():
            if closed:
                want.add((k, s, e, sum(xs)))
    got = [(v["key"], v["start"], v["end"], v["value"]) for v in (m.value for m in read_topic(data, "out"))]
    assert len(got) == len(set(got)), "a window was emitted twice"
    assert set(got) == want
    late = [m.value["i"] for m in read_topic(data, "late")]
    assert sorted(late) == sorted(want_late) and len(late) > 100


def test_state_holds_only_open_windows():
    """40k messages over 400 keys and 40 one-second windows: closed windows leave state
    (the benchmark, tests/bench/windows.py --n 1000000, checks the same at 1M)."""
    n, keys = 40_000, 400
    app = pipes.App("bounded")
    app.topic("events", keyed=True)
    app.window("events", to="out", window=w.tumbling(1), agg=w.count(), name="agg")
    events = [pipes.Message(None, key=f"k{i % keys}", timestamp=i) for i in range(n)]
    result = run_app(app, {"events": events})
    state = result.state("agg")
    idx = state.pop(IDX.decode())
    assert list(idx["c"]) == [n], "only the last window is still due"
    assert len(state) == keys and all(list(s) == [n - 1000] for s in state.values())
    emitted = result["out"]
    assert len(emitted) == 39 * keys and len({(o["key"], o["start"]) for o in emitted}) == len(emitted)
    assert sum(o["value"] for o in emitted) + sum(s[n - 1000] for s in state.values()) == n


# -- worker failover on kafka:// ---------------------------------------------------------------
KAFKA_APP = '''
import os

import pipes
from pipes import windows as w

NAME = os.environ["WINDOWS_KAFKA_APP"]
app = pipes.App(NAME)
app.topic(f"{NAME}.input", partitions=4, keyed=True)
app.topic(f"{NAME}.output", partitions=4)
app.window(f"{NAME}.input", to=f"{NAME}.output", window=w.tumbling(1), agg=w.sum("x"), grace=GRACE_S,
           timestamp="ts", late=f"{NAME}.late", name="agg")
'''.replace("GRACE_S", str(GRACE / 1000))


@pytest.mark.slow
@pytest.mark.serial  # once, beside the parallel suite, a wrong window: not yet understood (see the session notes)
@pytest.mark.timeout(180)
def test_worker_failover_on_kafka_gives_the_recomputed_windows(kafka_url, tmp_path):
    """Two workers share the input; one is SIGKILLed mid-stream and a fresh one (empty data
    dir: its state comes from the changelog) joins. Outputs are at-least-once on Kafka, so
    exact duplicates are allowed; every distinct output must be a recomputed closed window
    and every closed window must be there."""
    import asyncio

    asyncio.run(_failover(kafka_url, tmp_path))


async def _failover(kafka_url: str, tmp_path) -> None:
    import asyncio
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import orjson
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.partitioner import murmur2
    from tansu import unique
    from test_kafka_faults import Reader, wait_for_topic

    name = unique("win")
    bootstrap = kafka_url.removeprefix("kafka://")
    worker_url = f"{kafka_url}?session_timeout_ms=6000&heartbeat_interval_ms=1000"  # a dead worker is noticed sooner
    app_file = tmp_path / "winkafka.py"
    app_file.write_text(KAFKA_APP)
    n = 4000
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(f"{name}.input", 4, 1)])
    finally:
        await admin.close()
    events = list(stream(11, n, keys=40))

    async def produce(batch: list[dict]) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
        await producer.start()
        try:
            for e in batch:
                key = e["k"].encode()
                await producer.send(f"{name}.input", orjson.dumps(e), key=key,
                                    partition=(murmur2(key) & 0x7FFFFFFF) % 4)
            await producer.flush()
        finally:
            await producer.stop()

    # The first half now; the second only after the kill, so the kill always lands mid-stream.
    await produce(events[: n // 2])

    cli = Path(sys.executable).with_name("pipes")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PIPES_")}, "WINDOWS_KAFKA_APP": name,
           "PIPES_POLL_RECORDS": "50", "PIPES_COMMIT_EVERY": "50", "PIPES_COMMIT_INTERVAL": "0.2"}
    procs: list[subprocess.Popen] = []

    def start(tag: str) -> subprocess.Popen:
        with open(tmp_path / f"{tag}.log", "ab") as log:  # the worker has its own copy of the descriptor
            procs.append(subprocess.Popen([str(cli), "worker", "-A", str(app_file), "--broker", worker_url,
                                           "--data-dir", str(tmp_path / tag)], env=env, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        return procs[-1]

    def logs() -> str:
        return "\n".join(p.read_text(errors="replace")[-1500:] for p in tmp_path.glob("*.log"))

    try:
        a, _ = start("a"), start("b")
        await wait_for_topic(bootstrap, f"{name}.output")
        async with Reader(bootstrap, f"{name}.output", 4) as out:
            deadline = time.monotonic() + 120

            def seen() -> set:
                return {(v["key"], v["start"], v["end"], v["value"])
                        for v in (orjson.loads(raw) for recs in out.records.values() for _, _, raw in recs)}

            while not seen():  # the workers are under way
                await out.poll(0.3)
                assert time.monotonic() < deadline, f"no window within 120 s\n{logs()}"
            a.send_signal(signal.SIGKILL)
            at_kill = len(seen())
            start("c")
            await produce(events[n // 2:])
            # The recomputation, from the input topic as the workers read it (per partition, offset order).
            async with Reader(bootstrap, f"{name}.input", 4) as r:
                await r.drain()
                inputs = {p: [orjson.loads(raw) for _, _, raw in recs] for p, recs in r.records.items()}
            want, want_late = set(), set()
            for records in inputs.values():
                kept, late, st = split_late(records)
                want_late |= {x["i"] for x in late}
                for (k, s, e), (closed, xs) in expected_windows("tumbling", kept, st, 1000, 1000).items():
                    if closed:
                        want.add((k, s, e, sum(xs)))
            while True:
                got = seen()
                assert got <= want, f"wrong windows {sorted(got - want)[:5]}\n{logs()}"
                if got == want:
                    break
                assert time.monotonic() < deadline, f"{len(got)} of {len(want)} windows\n{logs()}"
                assert all(p.poll() is None for p in procs[1:]), logs()
                await out.poll(0.3)
        assert at_kill < len(want), "the worker was killed after everything was done"
        await wait_for_topic(bootstrap, f"{name}.late")
        async with Reader(bootstrap, f"{name}.late", 1) as late:  # undeclared: the default partitions
            await late.drain()
            assert {orjson.loads(raw)["i"] for recs in late.records.values() for _, _, raw in recs} == want_late
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def test_clickstream_app_accounts_for_every_click(monkeypatch, tmp_path):
    """apps/clickstream.py: every click is in an emitted session, an open one, or the late topic."""
    import importlib
    import sys

    monkeypatch.setenv("PIPES_CLICKSTREAM_CLICKS", "3000")
    monkeypatch.setenv("PIPES_CLICKSTREAM_OUT", str(tmp_path))
    module = importlib.reload(sys.modules["apps.clickstream"]) if "apps.clickstream" in sys.modules else \
        importlib.import_module("apps.clickstream")
    result = run_app(module.app)
    emitted = sum(s["value"]["clicks"] for s in result["sessions"])
    still_open = sum(acc["clicks"] for k, windows in result.state("sessions").items() if k != IDX.decode()
                     for _, acc in windows.values())
    late = len(result["clicks.late"])
    assert late and emitted and still_open and emitted + still_open + late == 3000
    assert len((tmp_path / "sessions.jsonl").read_text().splitlines()) == len(result["sessions"])
    # page views per 10 minutes, emitted on every change: the last value per window counts its clicks
    last: dict = {}
    for o in result["page_views"]:
        last[(o["key"], o["start"])] = o["value"]
    assert sum(last.values()) + len(result["page_views.late"]) == 3000
