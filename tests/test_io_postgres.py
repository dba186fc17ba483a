"""pipes.io.postgres against the real PostgreSQL on loopback (PIPES_TEST_POSTGRES, default
postgresql://postgres@127.0.0.1:5432/test): the source through the runtime, resuming
after a stop and a SIGKILL; the sink exactly once across SIGKILLs that land after its
transaction committed and before pipes' checkpoint did; upserts; dead letters.

Every test uses tables of its own (a uuid in the name) and drops them. Results are
checked with independent queries.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import asyncpg
import orjson
import pytest

import pipes
from pipes.brokers.local import LocalBroker
from pipes.errors import ConfigError
from pipes.io.postgres import PostgresSink, PostgresSource
from pipes.store import Store
from pipes.testing import run_app
from helpers import DSN, read_topic, rows, sql, sql_async

PIPES_CLI = Path(sys.executable).with_name("pipes")


@pytest.fixture(scope="module")
def postgres():
    try:
        sql("SELECT 1")
    except Exception as e:
        pytest.fail(f"PostgreSQL is not reachable at {DSN} ({type(e).__name__}: {e}); it is expected to be "
                    f"running: start it with `service postgresql start`, or set PIPES_TEST_POSTGRES", pytrace=False)
    return DSN


@pytest.fixture
def names(postgres):
    """A factory of unique table names; every table made with them is dropped afterwards,
    with the tables a sink makes from them (<name>_rejected, <name>_offsets...)."""
    made: list[str] = []

    def name(what: str) -> str:
        made.append(f"pipes_test_{what}_{uuid.uuid4().hex[:10]}")
        return made[-1]

    yield name
    for t in made:
        for table in (t, f"{t}_rejected", f"{t}_offsets", f"{t}_offsets_rejected"):
            sql(f"DROP TABLE IF EXISTS {table}")


# -- the source ----------------------------------------------------------------------------
def test_source_reads_a_table_in_column_order_and_ends_when_caught_up(names):
    t = names("src")
    sql(f"CREATE TABLE {t} (id bigserial PRIMARY KEY, name text NOT NULL, amount float8, doc jsonb, "
        f"at timestamptz NOT NULL DEFAULT now())")
    sql(f"INSERT INTO {t} (name, amount, doc) SELECT 'n' || g, g * 1.5, jsonb_build_object('g', g, 'tags', "
        f"jsonb_build_array('a', g)) FROM generate_series(1, 53) g ORDER BY random()")
    app = pipes.App("pgsrc")
    app.source(PostgresSource(DSN, t, follow=False, batch=10), to="rows", name="rows_of_t")

    result = run_app(app)

    want = rows(f"SELECT * FROM {t} ORDER BY id")
    got = result["rows"]
    assert [r["id"] for r in got] == [w["id"] for w in want] == list(range(1, 54))
    for g, w in zip(got, want):
        assert (g["name"], g["amount"], g["doc"]) == (w["name"], w["amount"], orjson.loads(w["doc"]))
        assert datetime.datetime.fromisoformat(g["at"]) == w["at"]


def test_source_query_with_a_composite_column_and_where(names):
    t = names("events")
    sql(f"CREATE TABLE {t} (id int PRIMARY KEY, at timestamptz NOT NULL, kind text NOT NULL)")
    # Timestamps repeat: (at, id) orders them and is unique.
    sql(f"INSERT INTO {t} SELECT g, timestamptz '2024-01-01' + (g % 5) * interval '1 minute', "
        f"CASE WHEN g % 3 = 0 THEN 'skip' ELSE 'keep' END FROM generate_series(1, 40) g")
    app = pipes.App("pgquery")
    app.source(PostgresSource(DSN, query=f"SELECT id, at, kind, id * 10 AS ten FROM {t}", column=("at", "id"),
                              where="kind = 'keep'", follow=False, batch=3), to="rows", name="src")

    got = run_app(app)["rows"]

    want = rows(f"SELECT id FROM {t} WHERE kind = 'keep' ORDER BY at, id")
    assert [r["id"] for r in got] == [w["id"] for w in want] and len(got) == 27
    assert all(r["ten"] == r["id"] * 10 for r in got)


def test_source_resumes_after_a_stop_and_picks_up_new_rows(names, tmp_path):
    t = names("live")
    sql(f"CREATE TABLE {t} (id bigserial PRIMARY KEY, v int NOT NULL)")
    sql(f"INSERT INTO {t} (v) SELECT g FROM generate_series(1, 300) g")
    settings = pipes.Settings(broker=f"local://{tmp_path / 'data'}", commit_interval=0.05)

    def make_app(seen: list) -> pipes.App:
        app = pipes.App("pglive")
        app.source(PostgresSource(DSN, t, follow=True, poll=0.02, batch=64), to="rows", name="src")
        app.sink("rows", lambda v: seen.append(v["v"]), name="seen")
        return app

    async def life(seen: list, until: int, insert: tuple[int, int] | None = None) -> None:
        app = make_app(seen)
        stop = asyncio.Event()
        task = asyncio.create_task(pipes.runtime.run(app.build(settings), settings, stop=stop))
        inserted = False
        deadline = time.monotonic() + 15
        while len(seen) < until:
            assert not task.done(), task.exception()
            assert time.monotonic() < deadline, f"{len(seen)} rows seen, want {until}"
            if insert and not inserted and len(seen) >= 100:  # rows that commit while it runs
                await sql_async(f"INSERT INTO {t} (v) SELECT g FROM generate_series($1::int, $2::int) g", *insert)
                inserted = True
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # a few more polls: nothing else may come
        stop.set()
        await task

    first: list = []
    asyncio.run(life(first, 500, insert=(301, 500)))
    sql(f"INSERT INTO {t} (v) SELECT g FROM generate_series(501, 750) g")  # while no worker runs
    second: list = []
    asyncio.run(life(second, 250))

    assert first == list(range(1, 501))
    assert second == list(range(501, 751))  # resumed after the last row of the first life
    want = [r["id"] for r in rows(f"SELECT id FROM {t} ORDER BY id")]
    assert [m.value["id"] for m in read_topic(tmp_path / "data", app=make_app([]), topic="rows")] == want
    assert len(want) == 750


def test_source_in_transaction_order_misses_no_row_committed_late(names):
    """A sequence id is taken at INSERT, visible at COMMIT: ordered by id, a row that commits
    after a higher id was read is missed (the documented pitfall); ordered by the inserting
    transaction below the oldest running one, it is not."""
    t = names("xid")
    sql(f"CREATE TABLE {t} (id bigserial PRIMARY KEY, v text NOT NULL, "
        f"tx xid8 NOT NULL DEFAULT pg_current_xact_id())")

    async def scenario() -> tuple[list, list, list]:
        by_id = PostgresSource(DSN, t, follow=False)
        by_tx = PostgresSource(DSN, t, column=("tx", "id"), where="tx < pg_snapshot_xmin(pg_current_snapshot())",
                               follow=False)
        slow, fast = await asyncpg.connect(DSN), await asyncpg.connect(DSN)
        try:
            await by_id.open()
            await by_tx.open()
            tx = slow.transaction()
            await tx.start()
            await slow.execute(f"INSERT INTO {t} (v) VALUES ('slow')")  # takes id 1, not committed
            await fast.execute(f"INSERT INTO {t} (v) VALUES ('fast')")  # id 2, committed
            early = [await by_id.read(), await by_tx.read()]
            await tx.commit()
            late_id = [await by_id.read()]
            late_tx = [await by_tx.read(), await by_tx.read(), await by_tx.read()]
            return early, late_id, late_tx
        finally:
            await by_id.close()
            await by_tx.close()
            await slow.close()
            await fast.close()

    early, late_id, late_tx = asyncio.run(scenario())
    assert early[0]["v"] == "fast" and early[1] is None  # by id: 2 read first; by tx: nothing safe yet
    assert late_id == [None]  # ...so by id, row 1 is never read
    assert [r["v"] for r in late_tx[:2]] == ["slow", "fast"] and late_tx[2] is None


def test_source_connects_again_when_its_connection_is_lost(names):
    t = names("lost")
    sql(f"CREATE TABLE {t} (id int PRIMARY KEY)")
    sql(f"INSERT INTO {t} SELECT generate_series(1, 5)")

    async def scenario() -> list:
        source = PostgresSource(DSN, t, follow=True, poll=0.01, batch=2)
        await source.open()
        try:
            got = [(await source.read())["id"] for _ in range(3)]  # 3 given, 4 read ahead
            await sql_async("SELECT pg_terminate_backend($1)", source._conn.get_server_pid())
            await sql_async(f"INSERT INTO {t} SELECT generate_series(6, 8)")
            got += [(await source.read())["id"] for _ in range(5)]
            return got
        finally:
            await source.close()

    assert asyncio.run(scenario()) == list(range(1, 9))


def test_source_reports_a_missing_table_and_a_changed_column(names):
    missing = names("missing")
    source = PostgresSource(DSN, missing, follow=False)
    with pytest.raises(ConfigError, match=missing):
        asyncio.run(source.open())
    with pytest.raises(ConfigError, match="column"):
        PostgresSource(DSN, "t", column="at").restore({"after": 5, "column": ["id"]})


# -- the sink ------------------------------------------------------------------------------
def test_sink_writes_rows_with_defaults_types_and_dead_letters(names):
    t = names("dst")
    offsets = names("offsets")
    sql(f"CREATE TABLE {t} (id int PRIMARY KEY, name text NOT NULL, at timestamptz, doc jsonb, "
        f"amount numeric(10, 2), note text NOT NULL DEFAULT 'default')")
    values = [{"id": i, "name": f"n{i}", "at": f"2024-05-0{1 + i % 9}T12:00:00+00:00", "doc": {"i": [i, "x"]},
               "amount": i / 4} for i in range(1, 31)]
    values[7] = {"id": 8, "name": "eight", "note": "given"}  # other columns: NULL or default
    values[11] = {"id": 12, "name": None}  # NOT NULL: rejected, to the dead-letter topic
    app = pipes.App("pgsink")
    app.sink("rows", PostgresSink(DSN, t, offsets_table=offsets), batch=8)

    result = run_app(app, {"rows": values})

    got = {r["id"]: r for r in rows(f"SELECT * FROM {t}")}
    dead = result["rows.dlq"]
    # The batch holding the rejected row went to the dead-letter topic as a whole.
    assert {v["id"] for v in dead} == set(range(9, 17))
    assert set(got) == set(range(1, 31)) - set(range(9, 17))
    assert got[8] == {"id": 8, "name": "eight", "at": None, "doc": None, "amount": None, "note": "given"}
    r = got[5]
    assert (r["name"], r["at"], float(r["amount"]), r["note"]) == (
        "n5", datetime.datetime(2024, 5, 6, 12, tzinfo=datetime.timezone.utc), 1.25, "default")
    assert r["doc"] == '{"i": [5, "x"]}'  # asyncpg's own jsonb text: stored as JSON
    assert rows(f'SELECT topic, "partition", "offset" FROM {offsets}') == [
        {"topic": "rows", "partition": 0, "offset": 29}]


def test_sink_upserts_on_a_key_the_last_value_winning(names):
    t = names("upsert")
    sql(f"CREATE TABLE {t} (k text PRIMARY KEY, n int NOT NULL, seen int NOT NULL DEFAULT 0)")
    sql(f"INSERT INTO {t} VALUES ('k1', -1, 7)")
    values = [{"k": f"k{i % 7}", "n": i} for i in range(100)]
    app = pipes.App("pgupsert")
    app.sink("rows", PostgresSink(DSN, t, upsert_on=["k"], columns=["k", "n"], offsets_table=names("offsets")),
             batch=16)

    run_app(app, {"rows": values})

    last = {}
    for v in values:
        last[v["k"]] = v["n"]
    assert {r["k"]: (r["n"], r["seen"]) for r in rows(f"SELECT * FROM {t}")} == {
        k: (n, 7 if k == "k1" else 0) for k, n in last.items()}


def test_sink_skips_messages_at_or_below_the_offset_it_recorded(names):
    """What a restart after a crash does: the same (topic, partition, offset)s again."""
    t = names("replay")
    sql(f"CREATE TABLE {t} (i int NOT NULL, p int NOT NULL)")

    def batch(partition: int, offsets: range) -> list[pipes.Message]:
        return [pipes.Message({"i": o, "p": partition}, topic="in", partition=partition, offset=o) for o in offsets]

    async def scenario() -> None:
        sink = PostgresSink(DSN, t)  # the default offsets table, pipes_offsets
        await sink.open()
        try:
            await sink.write(batch(0, range(0, 10)) + batch(1, range(0, 5)))
            await sink.write(batch(0, range(5, 15)) + batch(1, range(0, 8)))  # replayed, then new
            await sink.flush()
            assert (sink.written, sink.skipped) == (23, 10)
        finally:
            await sink.close()

    try:
        asyncio.run(scenario())
        counts = rows(f"SELECT p, i, count(*) AS n FROM {t} GROUP BY p, i ORDER BY p, i")
        assert [(r["p"], r["i"]) for r in counts] == [(0, i) for i in range(15)] + [(1, i) for i in range(8)]
        assert all(r["n"] == 1 for r in counts)
        assert rows('SELECT topic, "partition", "offset" FROM pipes_offsets WHERE sink = $1 ORDER BY 2', t) == [
            {"topic": "in", "partition": 0, "offset": 14}, {"topic": "in", "partition": 1, "offset": 7}]
    finally:
        sql("DELETE FROM pipes_offsets WHERE sink = $1", t)


def test_sink_a_batch_rejected_before_a_crash_is_rejected_again_not_skipped(names):
    """Batch A is rejected (its dead letters are pending in pipes' checkpoint), batch B after
    it is written, and the worker dies before the checkpoint: A must not pass as written."""
    t, offsets = names("rejects"), names("offsets")
    sql(f"CREATE TABLE {t} (i int NOT NULL CHECK (i >= 0))")

    def batch(offsets: range, bad: int | None = None) -> list[pipes.Message]:
        return [pipes.Message({"i": -1 if o == bad else o}, topic="in", partition=0, offset=o) for o in offsets]

    async def scenario() -> None:
        first = PostgresSink(DSN, t, offsets_table=offsets)
        await first.open()
        with pytest.raises(asyncpg.CheckViolationError):
            await first.write(batch(range(0, 4), bad=2))
        await first.write(batch(range(4, 8)))
        await first.close()  # killed before its checkpoint: A and B come again
        assert len(await sql_async(f"SELECT * FROM {offsets}_rejected", fetch=True)) == 4

        second = PostgresSink(DSN, t, offsets_table=offsets)
        await second.open()
        try:
            with pytest.raises(ValueError, match="rejected before a restart"):
                await second.write(batch(range(0, 4), bad=2))
            await second.write(batch(range(4, 8)))
            await second.flush()  # the checkpoint holding A's dead letters
            await second.write(batch(range(8, 10)))  # ...was durable: A's record is let go
            assert (second.written, second.skipped) == (2, 4)
        finally:
            await second.close()

    asyncio.run(scenario())
    assert [r["i"] for r in rows(f"SELECT i FROM {t} ORDER BY i")] == [4, 5, 6, 7, 8, 9]
    assert rows(f"SELECT * FROM {offsets}_rejected") == []


def test_sink_retries_a_lost_connection_at_the_checkpoint(names):
    t, offsets = names("reconnect"), names("offsets")
    sql(f"CREATE TABLE {t} (i int NOT NULL)")

    def batch(offsets: range) -> list[pipes.Message]:
        return [pipes.Message({"i": o}, topic="in", partition=0, offset=o) for o in offsets]

    async def scenario() -> None:
        sink = PostgresSink(DSN, t, offsets_table=offsets)
        await sink.open()
        try:
            await sink.write(batch(range(0, 5)))
            # The connection dies inside the next transaction: it waits for a lock on the
            # sink's offsets row, and its backend is terminated meanwhile.
            locker = await asyncpg.connect(DSN)
            locking = locker.transaction()
            await locking.start()
            await locker.execute(f"SELECT * FROM {offsets} FOR UPDATE")
            pid = sink._conn.get_server_pid()
            writing = asyncio.create_task(sink.write(batch(range(5, 10))))
            while not await locker.fetchval("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1",
                                            pid):
                await asyncio.sleep(0.01)
            await locker.execute("SELECT pg_terminate_backend($1)", pid)
            await writing  # kept for the checkpoint, not raised
            await locking.rollback()
            await locker.close()
            await sink.write(batch(range(10, 12)))  # behind it, in order
            assert len(await sql_async(f"SELECT * FROM {t}", fetch=True)) == 5
            await sink.flush()  # a new connection
            assert sink.written == 12
        finally:
            await sink.close()

    asyncio.run(scenario())
    assert [r["i"] for r in rows(f"SELECT i FROM {t} ORDER BY i")] == list(range(12))


CRASH_APP = '''
import os
import signal

import pipes
from pipes.io.postgres import PostgresSink, PostgresSource

DSN, SRC, DST, MARKS = os.environ["PG_DSN"], os.environ["PG_SRC"], os.environ["PG_DST"], os.environ["MARKS"]
KILLS = [int(k) for k in os.environ["KILL_AT"].split(",")]


class KillingSink(PostgresSink):
    """SIGKILLs the worker right after the transaction holding row KILLS[n] committed,
    before pipes' checkpoint covering it: once per kill point, marked by a file."""

    async def write(self, batch):
        await super().write(batch)
        for n, at in enumerate(KILLS):
            mark = os.path.join(MARKS, f"killed-{n}")
            if any(m.value["i"] >= at for m in batch) and not os.path.exists(mark):
                open(mark, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)


app = pipes.App("pgcrash", partitions=3, commit_every=3_000, commit_interval=0.5)


@app.transform("rows", to="out", key="id")
def shape(row):
    return {"i": row["id"], "sq": row["id"] * row["id"] % 1009, "name": row["name"].upper()}


app.source(PostgresSource(DSN, SRC, follow=False, batch=700), to="rows", name="src")
app.sink("out", KillingSink(DSN, DST, offsets_table=DST + "_offsets"), batch=400)
'''


def test_sink_and_source_exactly_once_across_sigkills(names, tmp_path):
    n = 12_000
    src, dst = names("crash_src"), names("crash_dst")
    sql(f"CREATE TABLE {src} (id int PRIMARY KEY, name text NOT NULL)")
    sql(f"INSERT INTO {src} SELECT g, 'row' || g FROM generate_series(1, {n}) g")
    sql(f"CREATE TABLE {dst} (i int NOT NULL, sq int NOT NULL, name text NOT NULL)")
    app_file = tmp_path / "pgcrash_app.py"
    app_file.write_text(textwrap.dedent(CRASH_APP))
    data = tmp_path / "data"
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPES_")}
    env.update(PG_DSN=DSN, PG_SRC=src, PG_DST=dst, MARKS=str(marks), KILL_AT="2000,7000", PYTHONUNBUFFERED="1")

    def worker(*args: str) -> subprocess.CompletedProcess:
        cmd = [str(PIPES_CLI), "worker", "-A", str(app_file), "--data-dir", str(data), *args]
        return subprocess.run(cmd, env=env, capture_output=True, timeout=60)

    for life in range(2):
        done = worker()
        assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-3000:]
        # Rows are in the table that pipes' durable checkpoint does not cover yet.
        written = rows(f"SELECT count(*) AS n FROM {dst}")[0]["n"]
        store = Store(str(data), read_only=True)
        try:
            covered = sum(o for (topic, _), o in store.offsets("pgcrash.main").items() if topic == "out")
        finally:
            store.close()
        assert written > covered, (life, written, covered)
    done = worker("--until-done")
    assert done.returncode == 0, done.stderr.decode()[-3000:]

    got = rows(f"SELECT i, sq, name, count(*) AS n FROM {dst} GROUP BY i, sq, name ORDER BY i")
    want = rows(f"SELECT id AS i, id * id % 1009 AS sq, upper(name) AS name, 1::bigint AS n "
                f"FROM {src} ORDER BY id")
    assert len(got) == len(want) == n
    assert got == want  # every row once, none lost, none twice
    assert b"skipped" in done.stderr and b"already written" in done.stderr  # the replay after kill 2
    # The sink's recorded offsets are the last of each partition of "out".
    recorded = rows(f'SELECT "partition", "offset" FROM {dst}_offsets')
    broker = LocalBroker(str(data), pipes.Settings(), read_only=True)
    try:
        ends = broker.end_offsets("out")
    finally:
        asyncio.run(broker.close())
    assert {r["partition"]: r["offset"] + 1 for r in recorded} == ends
