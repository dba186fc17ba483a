"""pipes.io.redis against the real Redis on loopback (PIPES_TEST_REDIS, default
redis://127.0.0.1:6379/0): the stream source alone and in a consumer group, resuming
after a stop and a SIGKILL, acknowledging entries only once pipes' checkpoint holding
them is durable; the stream sink.

Every test uses streams of its own (a uuid in the name) and deletes them. Results are
checked against XRANGE and XPENDING.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import orjson
import pytest
import redis

import pipes
from pipes.io.redis import RedisStreamSink, RedisStreamSource
from pipes.testing import run_app
from helpers import read_topic

URL = os.environ.get("PIPES_TEST_REDIS", "redis://127.0.0.1:6379/0")
PIPES_CLI = Path(sys.executable).with_name("pipes")


@pytest.fixture(scope="module")
def r():
    client = redis.Redis.from_url(URL, decode_responses=True, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as e:
        pytest.fail(f"Redis is not reachable at {URL} ({type(e).__name__}: {e}); it is expected to be running: "
                    f"start it with `service redis-server start`, or set PIPES_TEST_REDIS", pytrace=False)
    yield client
    client.close()


@pytest.fixture
def stream(r):
    """A factory of unique stream names; every stream made with them is deleted afterwards."""
    made: list[str] = []

    def name(what: str = "s") -> str:
        made.append(f"pipes-test-{what}-{uuid.uuid4().hex[:10]}")
        return made[-1]

    yield name
    if made:
        r.delete(*made)


def add(r, s: str, first: int, last: int) -> list[str]:
    """XADD entries i=first..last (and a text field); their ids."""
    pipe = r.pipeline(transaction=False)
    for i in range(first, last + 1):
        pipe.xadd(s, {"i": i, "text": f"entry {i}"})
    return pipe.execute()


def pending(r, s: str, group: str) -> int:
    return r.xpending(s, group)["pending"]


async def run_until(app: pipes.App, settings: pipes.Settings, seen: list, want: int, during=None) -> None:
    """Run `app` until `seen` holds `want` items (and a moment longer), then stop it."""
    stop = asyncio.Event()
    task = asyncio.create_task(pipes.runtime.run(app.build(settings), settings, stop=stop))
    deadline = time.monotonic() + 15
    while len(seen) < want:
        assert not task.done(), task.exception()
        assert time.monotonic() < deadline, f"{len(seen)} seen, want {want}"
        if during is not None and during(seen):
            during = None
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.15)  # a few more reads: nothing else may come
    stop.set()
    await task


# -- the source ----------------------------------------------------------------------------
def test_source_reads_the_stream_resumes_after_a_stop_and_picks_up_new_entries(r, stream, tmp_path):
    s = stream()
    add(r, s, 1, 300)
    settings = pipes.Settings(broker=f"local://{tmp_path / 'data'}", commit_interval=0.05)

    def make_app(seen: list) -> pipes.App:
        app = pipes.App("rsrc")
        app.source(RedisStreamSource(URL, s, block=0.05, count=64), to="entries", name="src")
        app.sink("entries", lambda m: seen.append(int(m["i"])), name="seen")
        return app

    first: list = []
    asyncio.run(run_until(make_app(first), settings, first, 500,
                          during=lambda seen: len(seen) >= 100 and add(r, s, 301, 500)))
    add(r, s, 501, 650)  # while no worker runs
    second: list = []
    asyncio.run(run_until(make_app(second), settings, second, 150))

    assert first == list(range(1, 501))
    assert second == list(range(501, 651))  # resumed after the last entry of the first life
    entries = r.xrange(s)
    got = read_topic(tmp_path / "data", "entries")
    assert [(m.headers["redis.id"].decode(), m.value) for m in got] == entries
    assert len(entries) == 650


def test_source_with_field_decodes_json_and_other_fields_become_headers(r, stream):
    s = stream()
    for i in range(5):
        r.xadd(s, {"body": orjson.dumps({"i": i, "xs": [i, None]}), "origin": "test"})
    app = pipes.App("rfield")
    app.source(RedisStreamSource(URL, s, field="body", follow=False), to="values", name="src")

    result = run_app(app)

    assert result["values"] == [{"i": i, "xs": [i, None]} for i in range(5)]
    assert [m.headers for m in result.messages("values")] == [
        {"origin": b"test", "redis.id": e[0].encode()} for e in r.xrange(s)]


def test_group_source_acknowledges_only_what_a_durable_checkpoint_covers(r, stream):
    """The connector's contract, step by step: read, checkpoint, committed(), crash, restore."""
    s, g = stream(), "workers"
    ids = add(r, s, 1, 10)

    async def life_one() -> dict:
        source = RedisStreamSource(URL, s, group=g, follow=False, count=4)
        await source.open()
        try:
            got = [await source.read() for _ in range(6)]
            at_six = source.checkpoint()
            got += [await source.read() for _ in range(4)]
            assert [int(m.value["i"]) for m in got] == list(range(1, 11))
            assert pending(r, s, g) == 10  # read, none acknowledged
            source.committed(at_six)  # the checkpoint holding the first six is durable
            assert pending(r, s, g) == 4
            assert [e["message_id"] for e in r.xpending_range(s, g, "-", "+", 10)] == ids[6:]
            return source.checkpoint()  # taken, but the worker dies before it is durable
        finally:
            await source.close()

    async def life_two(state: dict) -> list:
        source = RedisStreamSource(URL, s, group=g, follow=False)
        source.restore(state)
        await source.open()
        try:
            got = []
            while (m := await source.read()) is not None:
                got.append(int(m.value["i"]))
            source.committed(source.checkpoint())
            return got
        finally:
            await source.close()

    at_six = {"last": ids[5]}
    asyncio.run(life_one())
    add(r, s, 11, 15)
    # Restarted from the durable checkpoint (after entry 6): 7-10 come again from the
    # consumer's pending entries, then the new ones.
    assert asyncio.run(life_two(at_six)) == list(range(7, 16))
    assert pending(r, s, g) == 0
    # Restarted from a checkpoint that covers pending entries whose ack was lost: they are
    # acknowledged, not read again.
    add(r, s, 16, 20)
    asyncio.run(life_two({"last": ids[5]}))  # reads 16-20, acknowledges them
    stale = add(r, s, 21, 23)
    r.xreadgroup(g, "pipes", {s: ">"})  # delivered, then the worker died after its checkpoint
    assert pending(r, s, g) == 3
    assert asyncio.run(life_two({"last": stale[-1]})) == []
    assert pending(r, s, g) == 0


def test_group_source_through_the_runtime_acks_after_each_checkpoint(r, stream, tmp_path):
    s, g = stream(), "pipes-group"
    add(r, s, 1, 400)
    settings = pipes.Settings(broker=f"local://{tmp_path / 'data'}", commit_interval=0.05)

    def make_app(seen: list) -> pipes.App:
        app = pipes.App("rgroup")
        app.source(RedisStreamSource(URL, s, group=g, block=0.05, count=50), to="entries", name="src")

        app.sink("entries", lambda m: seen.append(int(m["i"])), name="seen")
        return app

    first: list = []
    asyncio.run(run_until(make_app(first), settings, first, 400))
    assert pending(r, s, g) == 0  # the last checkpoint, at the stop, acknowledged the rest
    add(r, s, 401, 480)
    second: list = []
    asyncio.run(run_until(make_app(second), settings, second, 80))

    assert first == list(range(1, 401)) and second == list(range(401, 481))
    assert pending(r, s, g) == 0
    assert [int(m.value["i"]) for m in read_topic(tmp_path / "data", "entries")] == list(range(1, 481))


CRASH_APP = '''
import os

import pipes
from pipes.io.redis import RedisStreamSource

app = pipes.App("rcrash", commit_every=500, commit_interval=0.05)
app.source(RedisStreamSource(os.environ["R_URL"], os.environ["R_STREAM"], group="g", count=100, block=0.05,
                             follow=os.environ.get("FOLLOW") == "1"), to="entries", name="src")
'''


def test_group_source_after_sigkill_acked_entries_are_durable_and_none_lost(r, stream, tmp_path):
    s, n = stream(), 30_000
    add(r, s, 1, n)
    app_file = tmp_path / "rcrash_app.py"
    app_file.write_text(textwrap.dedent(CRASH_APP))
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPES_")}
    env.update(R_URL=URL, R_STREAM=s, PYTHONUNBUFFERED="1")
    cmd = [str(PIPES_CLI), "worker", "-A", str(app_file), "--data-dir", str(data)]

    proc = subprocess.Popen(cmd, env={**env, "FOLLOW": "1"}, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not r.exists(s) or not r.xinfo_groups(s) or r.xinfo_groups(s)[0]["last-delivered-id"] == "0-0":
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-3000:]
            time.sleep(0.01)
        time.sleep(0.3)  # mid-run: reading, checkpointing, acknowledging
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()

    # Every entry acknowledged at the kill is in pipes' durable topic.
    ids = [e[0] for e in r.xrange(s)]
    info = r.xinfo_groups(s)[0]
    delivered = [i for i in ids if _id(i) <= _id(info["last-delivered-id"])]
    unacked = {e["message_id"] for e in r.xpending_range(s, "g", "-", "+", n)}
    acked = [i for i in delivered if i not in unacked]
    durable = [m.headers["redis.id"].decode() for m in read_topic(data, "entries")]
    assert 0 < len(acked) and len(delivered) < n, "the kill did not land mid-run"
    assert set(acked) <= set(durable), f"{len(set(acked) - set(durable))} entries acknowledged, not durable"

    done = subprocess.run(cmd + ["--until-done"], env={**env, "FOLLOW": "0"}, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    got = read_topic(data, "entries")
    assert [m.headers["redis.id"].decode() for m in got] == ids  # each entry once, in order
    assert [int(m.value["i"]) for m in got] == list(range(1, n + 1))
    assert pending(r, s, "g") == 0


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


# -- the sink ------------------------------------------------------------------------------
def test_sink_adds_entries_as_fields_or_as_json(r, stream):
    fields, json = stream("fields"), stream("json")
    values = [{"i": i, "name": f"n{i}", "tags": ["a", i], "ok": i % 2 == 0} for i in range(1, 1201)]
    app = pipes.App("rsink")
    app.sink("values", RedisStreamSink(URL, fields))
    app.sink("values", RedisStreamSink(URL, json, field="value", maxlen=1000, approximate=False), name="as_json")

    run_app(app, {"values": values})

    got = [f for _, f in r.xrange(fields)]
    assert got == [{"i": str(v["i"]), "name": v["name"], "tags": f'["a",{v["i"]}]',
                    "ok": "true" if v["ok"] else "false"} for v in values]
    assert [orjson.loads(f["value"]) for _, f in r.xrange(json)] == values[-1000:]  # capped at maxlen


def test_sink_rejects_a_value_it_cannot_write_to_the_dead_letter_topic(r, stream):
    s = stream()
    app = pipes.App("rsinkbad")
    app.sink("values", RedisStreamSink(URL, s), batch=2)

    result = run_app(app, {"values": [{"a": 1}, {"b": 2}, 3, {"c": 4}]})

    assert result["values.dlq"] == [3, {"c": 4}]  # the batch holding the non-dict value
    assert [f for _, f in r.xrange(s)] == [{"a": "1"}, {"b": "2"}]
