"""A worker on local:// killed with SIGKILL mid-run loses nothing and duplicates nothing.

tests/crash_app.py pushes 200,000 messages through a source with `state`, a filter, a
generator transform and a keyed transform with `state` (4 partitions everywhere). One
worker runs it uninterrupted (the reference); another is killed with SIGKILL at seeded
random points of its progress, restarted each time, and finished with `--until-done`.
Both runs are then checked against a plain-Python recomputation of the app (no pipes),
the way Kafka's EosTestDriver checks: every topic's records, every key's sequence of
running values and every key's final state, exactly; and the crashed run against the
reference. CRASH_SEED picks other kill points; CRASH_N another size.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import orjson
import pytest

import pipes
from pipes.brokers.local import LocalBroker
from pipes.errors import BrokerError
from pipes.store import Store
from pipes.testing import read_messages

pytestmark = pytest.mark.slow

APP_FILE = Path(__file__).with_name("crash_app.py")
PIPES_CLI = Path(sys.executable).with_name("pipes")
SEED = int(os.environ.get("CRASH_SEED", "1337"))
GROUP = "crash.main"
REKEY = "crash.tally.rekey"  # the internal topic key="k" re-keys through
# The fields of each topic's values, in the order rows hold them.
FIELDS = {"raw": ("i", "v"), "kept": ("i", "v"), "items": ("i", "j", "k", "x"),
          REKEY: ("i", "j", "k", "x"), "totals": ("k", "i", "j", "n", "sum")}


def _load_app():
    spec = importlib.util.spec_from_file_location("crash_app_under_test", APP_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the independent recomputation --------------------------------------------------------
def recompute(n: int) -> dict:
    """What the app must produce, from its definition, in plain Python."""
    raw = [(i, i % 97) for i in range(n)]
    kept = [(i, v) for i, v in raw if v % 5]
    items = [(i, j, f"k{(i * 7 + j * 13) % 1000}", (i + j) % 11) for i, _ in kept for j in range(1 + i % 3)]
    state: dict[str, dict] = {}
    for _, _, k, x in items:
        s = state.setdefault(k, {"n": 0, "sum": 0})
        s["n"] += 1
        s["sum"] += x
    return {
        "raw": Counter((None, r) for r in raw),
        "kept": Counter((None, r) for r in kept),
        "items": Counter((None, r) for r in items),
        REKEY: Counter((r[2], r) for r in items),
        "totals": Counter((k, (k, i, j)) for i, j, k, _ in items),  # n and sum depend on arrival order
        "state": state,
    }


# -- reading a data dir -------------------------------------------------------------------
def read_topics(data_dir: Path, graph) -> tuple[dict[str, list[list[tuple]]], dict[str, int]]:
    """The app's topics: per partition, in offset order, (key, value fields) rows; and how
    many records every other topic (dead letters, pipes' own bookkeeping) holds."""
    broker = LocalBroker(str(data_dir), pipes.Settings(), read_only=True)
    try:
        topics, others = {}, {}
        for topic in sorted(broker.topics()):
            if topic not in graph.topics:
                ends, starts = broker.end_offsets(topic), broker.start_offsets(topic)
                others[topic] = sum(ends[p] - starts[p] for p in ends)
                continue
            fields = FIELDS.get(topic, ())
            parts: list[list[tuple]] = [[] for _ in range(broker.partitions(topic))]
            for m in read_messages(broker, graph, topic):
                assert set(m.value) == set(fields), f"{topic}: unexpected value {m.value!r}"
                assert not m.headers, f"{topic}: unexpected headers {m.headers!r}"
                parts[m.partition].append((m.key, tuple(m.value[f] for f in fields)))
            topics[topic] = parts
        return topics, others
    finally:
        asyncio.run(broker.close())


def pipes_state(data_dir: Path, *node: str):
    """`pipes state` (read-only) as parsed JSON."""
    cmd = [str(PIPES_CLI), "state", "-A", str(APP_FILE), "--data-dir", str(data_dir), *node]
    done = subprocess.run(cmd, capture_output=True, timeout=60, env=_env())
    assert done.returncode == 0, done.stderr.decode()
    return orjson.loads(done.stdout)


def progress(data_dir: Path) -> tuple[int, bool, int]:
    """What is durable now: (source count, source done, items the keyed transform processed)."""
    try:
        store = Store(str(data_dir), read_only=True)
    except BrokerError:  # the worker has not created the database yet
        return 0, False, 0
    try:
        raw = store.get("sources", b"numbers")
        src = pickle.loads(raw) if raw else {}
        tallied = sum(off for (topic, _), off in store.offsets(GROUP).items() if topic == REKEY)
        return src.get("count", 0), src.get("done", False), tallied
    finally:
        store.close()


# -- checking -----------------------------------------------------------------------------
def _sample(c: Counter) -> str:
    return ", ".join(f"{n}x {r!r}" for r, n in itertools.islice(c.items(), 3))


def _diff(problems: list[str], what: str, got: Counter, want: Counter) -> None:
    if dict.__eq__(got, want):  # Counter.__eq__ is a Python loop; no zero counts here
        return
    lost, extra = want - got, got - want
    if lost or extra:
        problems.append(f"{what}: {sum(got.values())} records, want {sum(want.values())}; "
                        f"{sum(lost.values())} lost [{_sample(lost)}], "
                        f"{sum(extra.values())} extra or duplicated [{_sample(extra)}]")


def _order(problems: list[str], topic: str, parts: list[list[tuple]], origin) -> None:
    """Per partition, the records that came from one upstream partition keep their order.
    `origin(row)` is (upstream partition, rank), or None for a record with no origin."""
    for q, part in enumerate(parts):
        last: dict[int, object] = {}
        for off, row in enumerate(part):
            o = origin(row)
            if o is None:
                continue
            p, rank = o
            if p in last and not last[p] < rank:
                problems.append(f"{topic}[{q}] offset {off}: {row!r} out of order (after rank {last[p]!r} "
                                f"from upstream partition {p})")
                break
            last[p] = rank


def _positions(parts: list[list[tuple]], ident) -> dict:
    return {ident(row): (p, off) for p, part in enumerate(parts) for off, row in enumerate(part)}


def check_run(name: str, topics: dict, state: dict, want: dict) -> list[str]:
    """Everything one run wrote, against the recomputation. Returns the problems found."""
    problems: list[str] = []
    if set(topics) != set(FIELDS):
        problems.append(f"{name}: topics {sorted(topics)}, want {sorted(FIELDS)}")
    raw, kept, items, rekeyed, totals = (topics.get(t, [[]]) for t in ("raw", "kept", "items", REKEY, "totals"))
    for t, parts in (("raw", raw), ("kept", kept), ("items", items), (REKEY, rekeyed)):
        _diff(problems, f"{name}: topic {t!r}", Counter(r for part in parts for r in part), want[t])
    _diff(problems, f"{name}: topic 'totals' (key, (k, i, j))",
          Counter((key, v[:3]) for part in totals for key, v in part), want["totals"])

    # Order: the source emits i in order; each node keeps the order of each input partition.
    raw_at = _positions(raw, lambda r: r[1][0])
    kept_at = _positions(kept, lambda r: r[1][0])
    items_at = _positions(items, lambda r: r[1][:2])

    def item_origin(row: tuple):  # items of one message follow it, in j order
        at = kept_at.get(row[1][0])
        return (at[0], (at[1], row[1][1])) if at else None

    _order(problems, f"{name}: raw", raw, lambda r: (0, r[1][0]))
    _order(problems, f"{name}: kept", kept, lambda r: raw_at.get(r[1][0]))
    _order(problems, f"{name}: items", items, item_origin)
    _order(problems, f"{name}: {REKEY}", rekeyed, lambda r: items_at.get(r[1][:2]))
    # The keyed transform reads each re-keyed partition in offset order, one output per input.
    for q, part in enumerate(totals):
        seq = [v[1:3] for _, v in part]
        src = [v[:2] for _, v in rekeyed[q]] if q < len(rekeyed) else []
        if seq != src:
            at = next((o for o, (a, b) in enumerate(zip(seq, src)) if a != b), min(len(seq), len(src)))
            problems.append(f"{name}: totals[{q}] is not {REKEY}[{q}] in order: {len(seq)} vs {len(src)} "
                            f"records, first difference at offset {at}")

    # Per key: one partition, running count 1..n, running sum of x in that order, final state.
    by_key: dict[str, list] = defaultdict(list)
    for q, part in enumerate(totals):
        for key, v in part:
            by_key[key].append((q, v))
    bad = []
    for key, seq in sorted(by_key.items()):
        parts = sorted({q for q, _ in seq})
        counts = [v[3] for _, v in seq]
        sums = list(itertools.accumulate((i + j) % 11 for _, (_, i, j, _, _) in seq))
        if len(parts) > 1:
            bad.append(f"key {key!r} in partitions {parts} of totals")
        if any(v[0] != key for _, v in seq):
            bad.append(f"key {key!r}: a value of another key")
        if counts != list(range(1, len(seq) + 1)):
            at = next(o for o, c in enumerate(counts) if c != o + 1)
            bad.append(f"key {key!r}: running count {counts[at]} at update #{at + 1}, "
                       f"counts {counts[max(0, at - 3):at + 3]}..., want 1..{len(seq)}")
        elif [v[4] for _, v in seq] != sums:
            bad.append(f"key {key!r}: running sums differ from the sums of its items in order")
    problems += [f"{name}: {b}" for b in bad[:5]] + ([f"{name}: ... {len(bad) - 5} more"] if len(bad) > 5 else [])
    if state != want["state"]:
        wrong = sorted(k for k in set(state) | set(want["state"]) if state.get(k) != want["state"].get(k))
        problems.append(f"{name}: keyed state of {len(wrong)} keys differs, e.g. "
                        + "; ".join(f"{k}: {state.get(k)} want {want['state'].get(k)}" for k in wrong[:3]))
    return problems


def compare_runs(topics: dict, ref: dict) -> list[str]:
    """The crashed run against the uninterrupted one. The source emits in one order and
    partitions deterministically (murmur2 of the key, CRC of an unkeyed value), so "raw"
    is identical offset for offset and every record of every topic lands in the same
    partition. Downstream of it, a node reads its input partitions interleaved as they
    become ready, which depends on timing, so those sequences (and so the order of a
    key's running values) may differ between any two runs: they are compared as
    multisets per partition, with order checked within each run by check_run."""
    problems = []
    for t in sorted(set(topics) | set(ref)):
        mine, theirs = topics.get(t, []), ref.get(t, [])
        if t == "raw":
            problems += [f"crashed run: raw[{q}] differs from the reference's ({len(a)} vs {len(b)} records)"
                         for q, (a, b) in enumerate(itertools.zip_longest(mine, theirs, fillvalue=[])) if a != b]
            continue
        proj = (lambda r: (r[0], r[1][:3])) if t == "totals" else (lambda r: r)
        for q in range(max(len(mine), len(theirs))):
            a = Counter(map(proj, mine[q] if q < len(mine) else []))
            b = Counter(map(proj, theirs[q] if q < len(theirs) else []))
            _diff(problems, f"crashed run vs reference: {t}[{q}]", a, b)
    return problems


# -- running workers ----------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPES_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Workers:
    """The worker processes this test starts; all killed and reaped at the end."""

    def __init__(self, cwd: Path):
        self.cwd = cwd
        self.procs: list[tuple[subprocess.Popen, object]] = []

    def start(self, data_dir: Path, *args: str, log: str) -> subprocess.Popen:
        f = open(self.cwd / log, "wb")
        cmd = [str(PIPES_CLI), "worker", "-A", str(APP_FILE), "--data-dir", str(data_dir), *args]
        proc = subprocess.Popen(cmd, cwd=self.cwd, env=_env(), stdout=f, stderr=subprocess.STDOUT)
        self.procs.append((proc, f))
        return proc

    def log(self, name: str) -> str:
        return (self.cwd / name).read_text(errors="replace")[-3000:]

    def close(self) -> None:
        for proc, f in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            f.close()


@pytest.fixture
def workers(tmp_path):
    w = Workers(tmp_path)
    yield w
    w.close()


def _sigkill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def test_sigkilled_worker_loses_and_duplicates_nothing(tmp_path, workers):
    crash_app = _load_app()
    n = crash_app.N
    assert n >= 200_000 or "CRASH_N" in os.environ
    graph = crash_app.app.build()
    want = recompute(n)
    total = sum(want[REKEY].values())  # items the keyed transform must process
    rng = random.Random(SEED)
    started = time.monotonic()

    # The reference: one uninterrupted run, alongside the crashed one.
    ref_dir, crash_dir = tmp_path / "reference", tmp_path / "crashed"
    reference = workers.start(ref_dir, "--until-done", log="reference.log")

    # Kill points: the durable progress of the keyed transform (the last node) to wait for,
    # spread over the run, then a random delay of up to 40 ms so the kill lands anywhere
    # in a checkpoint cycle (~10 ms). The second life is killed 0.2-1 s after
    # it starts, whatever it is doing: importing, opening RocksDB, recovering, running.
    targets = [int(total * rng.uniform(lo, lo + 0.15)) for lo in (0.05, 0.3, 0.55, 0.75)]
    plan: list[int | float] = [targets[0], rng.uniform(0.2, 1.0), *targets[1:]]
    kills = []  # (life, what, durable progress after the kill, landed mid-run)
    before = progress(crash_dir)
    for life, point in enumerate(plan, 1):
        log = f"crashed-{life}.log"
        proc = workers.start(crash_dir, log=log)
        if isinstance(point, float):
            time.sleep(point)
            what = f"{point:.2f} s after start"
        else:
            # Wait for the target, and for this life to have committed something of its own.
            deadline = time.monotonic() + 60
            while True:
                now = progress(crash_dir)
                if now[2] >= point and now[2] > before[2]:
                    break
                assert proc.poll() is None, f"worker exited by itself ({proc.returncode}):\n{workers.log(log)}"
                assert time.monotonic() < deadline, f"no progress to {point:,} in 60 s ({now}):\n{workers.log(log)}"
                time.sleep(0.02)
            time.sleep(rng.uniform(0, 0.04))
            what = f"at >= {point:,} of {total:,} items tallied"
        assert proc.poll() is None, f"worker exited by itself ({proc.returncode}):\n{workers.log(log)}"
        _sigkill(proc)
        now = progress(crash_dir)
        assert now[0] >= before[0] and now[2] >= before[2], f"durable progress went back: {before} -> {now}"
        kills.append((life, what, now, isinstance(point, int) and now[2] < total))
        before = now
        if now[2] == total:
            break  # nothing left to interrupt
    mid_run = [k for k in kills if k[3]]
    assert len(mid_run) >= 3, (f"only {len(mid_run)} kills landed before the work was done ({kills}): "
                               f"the app runs too fast for this test; raise CRASH_N")

    final = workers.start(crash_dir, "--until-done", log="crashed-final.log")
    assert final.wait(timeout=120) == 0, workers.log("crashed-final.log")
    assert reference.wait(timeout=120) == 0, workers.log("reference.log")
    ran = time.monotonic() - started

    for life, what, (count, done, tallied), _ in kills:
        print(f"kill {life} {what}: durable source count {count:,}{' (done)' if done else ''}, "
              f"{tallied:,} items tallied")
    problems = []
    runs = {}
    for name, d in (("reference", ref_dir), ("crashed run", crash_dir)):
        topics, others = read_topics(d, graph)
        state = pipes_state(d, "tally")
        print(f"{name}: " + ", ".join(f"{t} {sum(map(len, p)):,}" for t, p in topics.items())
              + f"; {len(state)} keys; other topics {others}")
        problems += check_run(name, topics, state, want)
        # No dead letters, and nothing written to pipes' own topics (the sources' lease topic).
        problems += [f"{name}: {c} records in topic {t!r}" for t, c in others.items() if c]
        source = pipes_state(d, "numbers")
        if source["state"] != {"i": n} or not source["done"]:
            problems.append(f"{name}: source checkpoint {source}")
        lagging = {tp: o for tp, o in pipes_state(d)["offsets"].get(GROUP, {}).items() if o["lag"]}
        if lagging:
            problems.append(f"{name}: unconsumed records {lagging}")
        runs[name] = topics
    problems += compare_runs(runs["crashed run"], runs["reference"])
    print(f"workers ran {ran:.1f} s; checked in {time.monotonic() - started - ran:.1f} s (seed {SEED})")
    assert not problems, f"CRASH_SEED={SEED}, kills {kills}:\n" + "\n".join(problems)
