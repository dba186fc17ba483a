"""The embedded broker (local://): durable atomic commits, offsets, retention, the data-dir
lock, and the on_error policies of a worker running on it."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from collections import defaultdict

import msgpack
import orjson
import pytest

import pipes
import pipes.runtime
from pipes.brokers import Changes, local
from pipes.brokers.local import LocalBroker
from pipes.store import Store, state_prefix

NOW = 1_700_000_000_000


# -- helpers -------------------------------------------------------------------------------
#
# Store.close() does not release the RocksDB lock while the Python objects of the database
# are alive (see test_close_releases_the_data_dir), so helpers open brokers in their own
# scope and collect garbage before the directory is opened again. Results are read with
# read-only (secondary) access, which needs no lock: a worker's skipped errors are logged
# with their traceback, and a log handler that keeps records (pytest's does) keeps the
# worker's database open.


def open_broker(path, **settings) -> LocalBroker:
    try:
        return LocalBroker(str(path), pipes.Settings(**settings))
    except pipes.BrokerError as e:
        if "in use" not in str(e):
            raise
        gc.collect()  # the previous broker of `path` is closed but not yet collected
        return LocalBroker(str(path), pipes.Settings(**settings))


def with_broker(path, fn, *, read_only=False, **settings):
    """Run `await fn(broker)` on a fresh broker of `path`, closed afterwards."""

    async def main():
        broker = LocalBroker(str(path), pipes.Settings(**settings), read_only=True) if read_only \
            else open_broker(path, **settings)
        try:
            return await fn(broker)
        finally:
            await broker.close()

    return asyncio.run(main())


def feed(path, topic, records, **settings):
    """Commit raw (key, value bytes, headers, timestamp) records to `topic`."""

    async def commit(broker):
        await broker.commit("test.feeder", Changes(outputs={topic: list(records)}))

    with_broker(path, commit, **settings)


def read_all(path, topic):
    """Every record of `topic`, partition by partition: (partition, offset, key, value, headers, ts)."""

    async def read(broker):
        if topic not in broker.topics():
            return None
        out = []
        for p, start in broker.start_offsets(topic).items():
            for off, key, value, headers, ts in broker.read(topic, p, start, 1_000_000):
                out.append((p, off, key, value, headers, ts))
        return out

    return with_broker(path, read, read_only=True)


def json_values(path, topic):
    return [orjson.loads(r[3]) for r in read_all(path, topic)]


def for_app(app, settings):
    """`settings` over the app's own (App(...) settings), as the CLI builds them."""
    defaults = pipes.Settings()
    return app.settings.override(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)
                                    if getattr(settings, f.name) != getattr(defaults, f.name)})


def run_local(app, settings):
    settings = for_app(app, settings)
    graph = app.build(settings)
    try:
        return asyncio.run(pipes.runtime.run(graph, settings, until_done=True))
    except pipes.BrokerError as e:
        if "in use" not in str(e):
            raise
        gc.collect()  # as in open_broker
        return asyncio.run(pipes.runtime.run(graph, settings, until_done=True))


def failure_of(app, settings) -> str:
    try:
        run_local(app, settings)
    except pipes.ProcessingError as e:
        return str(e)
    pytest.fail("the run did not fail")


def rec(value, key=None, headers=None, ts=NOW):
    raw = value if isinstance(value, bytes) else orjson.dumps(value)
    return (key, raw, headers, ts)


# -- commits -------------------------------------------------------------------------------


def test_a_commit_is_durable_across_close_and_reopen(data_dir):
    skey = state_prefix("total", 0) + b"c1"
    written = [(b"k1", b"v1", (("h", b"x"),), 111), (None, b"v2", None, 222), (b"k3", b"v3", None, 333)]

    async def write(broker):
        await broker.commit("g", Changes(outputs={"t": written}, offsets={("in", 0): 7, ("in", 1): 3},
                                         state={skey: b"state"}, sources={"numbers": b"checkpoint"}))

    with_broker(data_dir, write, partitions=2)

    async def check(broker):
        assert broker.partitions("t") == 2
        assert sum(broker.end_offsets("t").values()) == 3
        assert broker.store.offsets("g") == {("in", 0): 7, ("in", 1): 3}
        assert broker.store.get("state", skey) == b"state"
        assert broker.store.get("sources", b"numbers") == b"checkpoint"
        # Offsets go on where they stopped; None deletes state.
        await broker.commit("g", Changes(outputs={"t": [(b"k1", b"v4", None, 444)]}, state={skey: None}))

    with_broker(data_dir, check)
    records = read_all(data_dir, "t")
    assert sorted(((r[2], r[3], r[4], r[5]) for r in records), key=lambda r: r[1]) == sorted(
        written + [(b"k1", b"v4", None, 444)], key=lambda r: r[1])
    by_partition = defaultdict(list)
    for p, off, key, value, *_ in records:
        by_partition[p].append(off)
    for offsets in by_partition.values():
        assert offsets == list(range(len(offsets)))
    # A key always lands in the same partition.
    assert len({r[0] for r in records if r[2] == b"k1"}) == 1
    assert with_broker(data_dir, lambda b: _get(b, "state", skey)) is None


async def _get(broker, cf, key):
    return broker.store.get(cf, key)


def test_a_failed_commit_leaves_nothing_behind(data_dir):
    async def write(broker):
        broker.partitions("t")
        with pytest.raises(ValueError):
            await broker.commit("g", Changes(outputs={"t": [(None, b"v", None, 1)]}, offsets={("in", 0): 5},
                                             sources={"src": b"ckpt"}, state={b"bad": 42}))  # 42: not bytes
        assert broker.end_offsets("t") == {0: 0}
        assert broker.read("t", 0, 0, 10) == []

    with_broker(data_dir, write)

    async def check(broker):
        return (broker.end_offsets("t"), broker.store.offsets("g"), broker.store.get("sources", b"src"))

    assert with_broker(data_dir, check) == ({0: 0}, {}, None)


def test_consumers_read_from_their_committed_offsets(data_dir):
    feed(data_dir, "t", [rec(i) for i in range(10)])

    async def consume(broker):
        c = broker.consumer("g", ["t"])
        polled = await c.poll(4, 0)
        assert [(t, p, [r[0] for r in recs]) for t, p, recs in polled] == [("t", 0, [0, 1, 2, 3])]
        await broker.commit("g", Changes(offsets={("t", 0): 4}))
        assert c.lag() == {("t", 0): 6} and not c.caught_up()

    with_broker(data_dir, consume)

    async def resume(broker):
        c = broker.consumer("g", ["t"])
        polled = await c.poll(100, 0)
        fresh = broker.consumer("other", ["t"])
        return [r[0] for r in polled[0][2]], c.caught_up(), fresh.lag()

    assert with_broker(data_dir, resume) == (list(range(4, 10)), True, {("t", 0): 10})


def test_opening_a_data_dir_twice_is_a_broker_error_naming_it(data_dir, local_settings):
    first = open_broker(data_dir)
    try:
        with pytest.raises(pipes.BrokerError) as e:
            LocalBroker(str(data_dir), pipes.Settings())
        assert str(data_dir) in str(e.value)

        app = pipes.App("shop")
        app.sink("in", print)
        with pytest.raises(pipes.BrokerError, match=str(data_dir)):
            asyncio.run(pipes.runtime.run(app.build(local_settings), local_settings, until_done=True))
    finally:
        asyncio.run(first.close())


def test_close_releases_the_data_dir(data_dir):
    async def main():
        broker = LocalBroker(str(data_dir), pipes.Settings())
        await broker.close()
        again = LocalBroker(str(data_dir), pipes.Settings())  # e.g. a restart with backoff
        await again.close()
        return broker

    asyncio.run(main())


# -- record blocks -------------------------------------------------------------------------


def numbered(offsets, ts=NOW):
    """Records whose value names their offset, with headers on every third."""
    return [(b"k%d" % o, b"v%d" % o, (("n", b"%d" % o),) if o % 3 == 0 else None, ts + o) for o in offsets]


def test_reads_from_any_offset_with_any_limit_return_each_record_once_in_order(data_dir, monkeypatch):
    monkeypatch.setattr(local, "BLOCK", 4)
    sizes = [3, 10, 1, 7]  # commits of blocks of 3; 4, 4, 2; 1; 4, 3
    n = sum(sizes)

    async def check(broker):
        done = 0
        for size in sizes:
            await broker.commit("g", Changes(records={("t", 0): numbered(range(done, done + size))}))
            done += size
        expected = [(o, *r) for o, r in enumerate(numbered(range(n)))]
        for start in range(n + 2):
            for limit in (1, 3, 5, 100):
                got, off = [], start
                while recs := broker.read("t", 0, off, limit):
                    assert len(recs) <= limit
                    got += recs
                    off = recs[-1][0] + 1
                assert got == expected[start:], (start, limit)
        return broker.end_offsets("t")

    assert with_broker(data_dir, check) == {0: n}


def test_a_commit_larger_than_a_block_is_read_back_whole_after_a_reopen(data_dir):
    n = 2 * local.BLOCK + 5
    feed(data_dir, "t", numbered(range(n)))

    async def check(broker):
        blocks = sum(1 for _ in broker.store.scan("log", b"t\0"))
        return (blocks, broker.start_offsets("t"), broker.end_offsets("t"),
                broker.read("t", 0, 0, 1_000_000), broker.read("t", 0, local.BLOCK - 1, 3))

    blocks, starts, ends, records, across = with_broker(data_dir, check)
    assert (blocks, starts, ends) == (3, {0: 0}, {0: n})
    assert records == [(o, *r) for o, r in enumerate(numbered(range(n)))]
    assert records[3][3] == (("n", b"3"),) and records[1][3] is None  # headers: a tuple of pairs, or None
    assert [r[0] for r in across] == [local.BLOCK - 1, local.BLOCK, local.BLOCK + 1]
    # The next commit goes on from the end, and read-only access sees the same.
    feed(data_dir, "t", numbered([n]))
    assert [r[1] for r in read_all(data_dir, "t")] == list(range(n + 1))


def test_retention_cutting_a_block_keeps_the_rest_of_it_under_its_first_offset(data_dir, monkeypatch):
    monkeypatch.setattr(local, "BLOCK", 4)

    async def fill(broker):
        await broker.open(retained_app())
        # Blocks 0-3, 4-7, 8-9; offsets 0-5 expire: the second block is cut after 5.
        await broker.commit("g", Changes(outputs={"t": numbered(range(6), ts=NOW - 5000) +
                                                        numbered(range(6, 10))}))
        assert broker.sweep(NOW) == 6
        assert broker.sweep(NOW) == 0
        assert (broker.start_offsets("t"), broker.end_offsets("t")) == ({0: 6}, {0: 10})
        assert [r[0] for r in broker.read("t", 0, 0, 100)] == [6, 7, 8, 9]
        assert [r[0] for r in broker.read("t", 0, 7, 2)] == [7, 8]
        assert [k for k, _ in broker.store.scan("log", b"t\0")] == [
            b"t\0" + (0).to_bytes(4, "big") + o.to_bytes(8, "big") for o in (6, 8)]

    with_broker(data_dir, fill)

    async def reopen(broker):
        await broker.open(retained_app())
        bounds = broker.start_offsets("t"), broker.end_offsets("t")
        await broker.commit("g", Changes(outputs={"t": numbered([10])}))
        return bounds, [(r[0], r[2]) for r in broker.read("t", 0, 0, 100)]

    assert with_broker(data_dir, reopen) == (({0: 6}, {0: 10}), [(o, b"v%d" % o) for o in range(6, 11)])


def test_a_data_dir_of_the_one_record_per_value_log_is_refused(data_dir):
    store = Store(str(data_dir))
    store.put("log", b"t\0" + bytes(4) + bytes(8), msgpack.packb([None, b"v", None, NOW]))  # offset 0
    store.close()
    del store
    gc.collect()
    refusals = []  # kept, as a supervisor keeps its last error: a refusal still releases the data dir
    for read_only in (False, True, False):
        with pytest.raises(pipes.BrokerError, match=f"older pipes.*remove {data_dir} to start afresh") as e:
            LocalBroker(str(data_dir), pipes.Settings(), read_only=read_only)
        refusals.append(e.value)


def test_a_new_data_dir_is_marked_with_its_log_format(data_dir):
    assert with_broker(data_dir, lambda b: _get(b, "meta", b"logformat")) == b"2"
    feed(data_dir, "t", numbered(range(3)))  # a marked data dir with records opens again
    assert len(read_all(data_dir, "t")) == 3


# -- running on local:// ------------------------------------------------------------------


def doubling_app(**app_settings):
    app = pipes.App("shop", **app_settings)

    @app.transform("raw", to="out")
    def double(v):
        return v["n"] * 2

    return app


def test_a_worker_resumes_from_its_committed_offsets(data_dir, local_settings):
    feed(data_dir, "raw", [rec({"n": n}) for n in range(5)])
    first = run_local(doubling_app(), local_settings)
    assert first.processed == 5
    assert json_values(data_dir, "out") == [0, 2, 4, 6, 8]

    feed(data_dir, "raw", [rec({"n": n}) for n in range(5, 8)])
    second = run_local(doubling_app(), local_settings)
    assert second.processed == 3
    assert json_values(data_dir, "out") == [0, 2, 4, 6, 8, 10, 12, 14]


def test_a_finished_app_does_nothing_on_a_second_run(data_dir, local_settings):
    seen = []

    def build():
        app = pipes.App("shop")

        @app.source(to="in")
        def numbers(state):
            i = state.get("i", 0)
            if i == 5:
                return None
            state["i"] = i + 1
            return i

        @app.transform("in", to="out", key=lambda v: f"k{v % 2}")
        def count(v, state):
            state["n"] = state.get("n", 0) + 1
            return state["n"]

        app.sink("out", seen.append, name="collect")
        return app

    first = run_local(build(), local_settings)
    assert (first.produced, first.processed) == (5, 15)  # in, the re-key topic, out
    assert sorted(seen) == [1, 1, 2, 2, 3]

    second = run_local(build(), local_settings)
    assert (second.processed, second.produced) == (0, 0)
    assert sorted(seen) == [1, 1, 2, 2, 3]
    assert json_values(data_dir, "in") == [0, 1, 2, 3, 4]


def test_a_worker_killed_at_any_point_loses_and_duplicates_nothing(tmp_path, data_dir):
    """Kill -9 mid-batch, restart, and compare with an independent recomputation."""
    (tmp_path / "killapp.py").write_text(textwrap.dedent("""
        import os, signal
        import pipes

        N = 3000
        app = pipes.App("kill", commit_every=200)

        @app.source(to="orders")
        def numbers(state):
            i = state.get("i", 0)
            if i == N:
                return None
            state["i"] = i + 1
            return {"i": i, "k": f"k{i % 7}"}

        @app.transform("orders", to="doubled")
        def double(order):
            if os.environ.get("KILL_AT") == str(order["i"]):
                os.kill(os.getpid(), signal.SIGKILL)
            return order["i"] * 2

        @app.transform("orders", to="totals", key="k")
        def total(order, state):
            state["n"] = state.get("n", 0) + 1
            state["sum"] = state.get("sum", 0) + order["i"]
            return {"k": order["k"], "n": state["n"], "sum": state["sum"]}
    """))
    runner = textwrap.dedent(f"""
        import asyncio, sys
        sys.path.insert(0, {str(tmp_path)!r})
        import pipes.runtime, killapp
        s = killapp.app.settings.override(broker={'local://' + str(data_dir)!r})
        r = asyncio.run(pipes.runtime.run(killapp.app.build(s), s, until_done=True))
        print(r.produced, r.processed)
    """)

    def worker(**env):
        return subprocess.run([sys.executable, "-c", runner], capture_output=True, text=True, timeout=60,
                              env={**os.environ, **env})

    killed = worker(KILL_AT="1500")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    partial = json_values(data_dir, "doubled")
    assert 0 < len(partial) < 3000  # the kill came after a checkpoint and before the end

    done = worker()
    assert done.returncode == 0, done.stderr
    assert json_values(data_dir, "orders") == [{"i": i, "k": f"k{i % 7}"} for i in range(3000)]
    assert json_values(data_dir, "doubled") == [2 * i for i in range(3000)]

    expected, running = defaultdict(list), defaultdict(lambda: [0, 0])
    for i in range(3000):
        r = running[f"k{i % 7}"]
        r[0] += 1
        r[1] += i
        expected[f"k{i % 7}"].append({"k": f"k{i % 7}", "n": r[0], "sum": r[1]})
    totals = defaultdict(list)
    for t in json_values(data_dir, "totals"):
        totals[t["k"]].append(t)
    assert totals == expected

    async def state(broker):
        prefix = state_prefix("total", 0)
        return {k[len(prefix):].decode(): pickle.loads(v) for k, v in broker.store.scan("state", prefix)}

    assert with_broker(data_dir, state, read_only=True) == {k: {"n": n, "sum": s} for k, (n, s) in running.items()}


# -- retention -----------------------------------------------------------------------------


def retained_app(retention_ms=1000):
    app = pipes.App("shop")
    app.topic("t", retention_ms=retention_ms)
    app.sink("t", print)
    return app.build()


def test_the_retention_sweep_deletes_old_records_and_offsets_never_go_back(data_dir):
    async def fill(broker):
        await broker.open(retained_app())
        old = [rec(i, ts=NOW - 5000) for i in range(5)]
        new = [rec(i, ts=NOW) for i in range(5, 10)]
        await broker.commit("g", Changes(outputs={"t": old + new}))
        assert broker.sweep(NOW) == 5
        assert broker.start_offsets("t") == {0: 5} and broker.end_offsets("t") == {0: 10}
        assert [r[0] for r in broker.read("t", 0, 0, 100)] == [5, 6, 7, 8, 9]
        assert broker.consumer("fresh", ["t"]).positions == {("t", 0): 5}
        assert broker.sweep(NOW) == 0
        # Everything expires.
        assert broker.sweep(NOW + 10_000) == 5
        assert broker.start_offsets("t") == {0: 10} and broker.end_offsets("t") == {0: 10}
        assert broker.read("t", 0, 0, 100) == []

    with_broker(data_dir, fill)

    async def reopen(broker):
        await broker.open(retained_app())
        bounds = (broker.start_offsets("t"), broker.end_offsets("t"))
        await broker.commit("g", Changes(outputs={"t": [rec("after", ts=NOW)]}))
        return bounds, [(r[0], r[2]) for r in broker.read("t", 0, 0, 100)]

    assert with_broker(data_dir, reopen) == (({0: 10}, {0: 10}), [(10, b'"after"')])


def test_topics_without_retention_keep_everything(data_dir):
    async def fill(broker):
        await broker.open(retained_app(retention_ms=None))
        await broker.commit("g", Changes(outputs={"t": [rec(i, ts=1) for i in range(3)]}))
        return broker.sweep(NOW), [r[0] for r in broker.read("t", 0, 0, 10)]

    assert with_broker(data_dir, fill) == (0, [0, 1, 2])


def test_records_kept_by_a_partial_sweep_survive_a_restart(data_dir):
    async def fill(broker):
        await broker.open(retained_app())
        old = [rec(i, ts=NOW - 5000) for i in range(5)]
        new = [rec(i, ts=NOW) for i in range(5, 10)]
        await broker.commit("g", Changes(outputs={"t": old + new}))
        assert broker.sweep(NOW) == 5

    with_broker(data_dir, fill)

    async def reopen(broker):
        await broker.open(retained_app())
        return broker.start_offsets("t"), broker.consumer("fresh", ["t"]).positions

    assert with_broker(data_dir, reopen) == ({0: 5}, {("t", 0): 5})


def test_the_sweep_never_deletes_a_record_newer_than_the_retention(data_dir):
    async def fill(broker):
        await broker.open(retained_app())
        await broker.commit("g", Changes(outputs={"t": [rec("new", ts=NOW), rec("old1", ts=NOW - 5000),
                                                        rec("old2", ts=NOW - 5000)]}))
        broker.sweep(NOW)
        return [(r[0], r[2]) for r in broker.read("t", 0, 0, 10)]

    kept = with_broker(data_dir, fill)
    assert (0, b'"new"') in kept


# -- on_error ------------------------------------------------------------------------------

RAW = [rec({"n": 1}), rec({"n": 2}), rec(b"not json", key=b"k", headers=(("trace", b"t1"),), ts=NOW + 1),
       rec({"n": 4})]


def test_stop_raises_naming_node_topic_partition_and_offset(data_dir, local_settings):
    feed(data_dir, "raw", RAW)
    text = failure_of(doubling_app(on_error="stop"), local_settings)
    assert "'double'" in text
    assert "topic 'raw'" in text and "partition 0" in text and "offset 2" in text
    assert "JSONDecodeError" in text
    assert read_all(data_dir, "out") in (None, [])  # nothing of the failed batch was committed


def test_after_a_stop_a_restart_with_skip_gets_past_the_bad_record(data_dir, local_settings):
    feed(data_dir, "raw", RAW)
    settings = local_settings.override(poll_records=2, commit_every=2)
    assert "offset 2" in failure_of(doubling_app(on_error="stop"), settings)
    assert json_values(data_dir, "out") == [2, 4]  # the batch before the bad record was committed

    report = run_local(doubling_app(on_error="skip"), settings)
    assert report.processed == 2
    assert json_values(data_dir, "out") == [2, 4, 8]
    assert report.lines == ["node 'double': 1 JSONDecodeError skipped"]


def test_after_a_stop_a_restart_with_settings_on_error_skip_gets_past_the_bad_record(data_dir, local_settings):
    feed(data_dir, "raw", RAW)
    app = doubling_app(on_error="stop")
    assert "offset 2" in failure_of(app, local_settings)
    report = run_local(app, local_settings.override(on_error="skip"))
    assert json_values(data_dir, "out") == [2, 4, 8]
    assert report.processed == 4


def test_a_worker_can_restart_in_process_after_a_failure(data_dir, local_settings):
    feed(data_dir, "raw", RAW)
    errors = []
    for policy in ("stop", "skip"):  # a supervisor loop that keeps the last error for its report
        try:
            app = doubling_app(on_error=policy)
            settings = for_app(app, local_settings)
            asyncio.run(pipes.runtime.run(app.build(settings), settings, until_done=True))
        except pipes.PipesError as e:
            errors.append(e)
    assert [type(e) for e in errors] == [pipes.ProcessingError]
    assert json_values(data_dir, "out") == [2, 4, 8]


def test_dlq_keeps_the_original_record_with_error_headers(data_dir, local_settings):
    feed(data_dir, "raw", RAW)
    report = run_local(doubling_app(), local_settings)  # dlq is the default
    assert json_values(data_dir, "out") == [2, 4, 8]
    [(p, off, key, value, headers, ts)] = read_all(data_dir, "raw.dlq")
    assert (key, value, ts) == (b"k", b"not json", NOW + 1)  # the original bytes, key and time
    h = dict(headers)
    assert h["trace"] == b"t1"
    assert h["pipes.error.node"] == b"double"
    assert h["pipes.error.type"] == b"JSONDecodeError"
    assert h["pipes.error.message"]
    assert (h["pipes.topic"], h["pipes.partition"], h["pipes.offset"]) == (b"raw", b"0", b"2")
    assert report.lines == ["node 'double': 1 JSONDecodeError sent to the DLQ"]


def test_skip_drops_counts_and_logs_once(data_dir, local_settings, caplog):
    feed(data_dir, "raw", RAW + [rec(b"{broken"), rec({"n": 5})])
    with caplog.at_level(logging.ERROR, logger="pipes"):
        report = run_local(doubling_app(on_error="skip"), local_settings)
    assert json_values(data_dir, "out") == [2, 4, 8, 10]
    assert read_all(data_dir, "raw.dlq") is None
    assert report.lines == ["node 'double': 2 JSONDecodeError skipped"]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "offset 2" in errors[0].getMessage()
