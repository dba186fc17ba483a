"""Bad data and failing code on local://: dead letters with their headers, `pipes dlq replay`
after a fix, and on_error="stop" halting without committing past the failing message.
The worker runs as a subprocess (`pipes worker --until-done`) for its exit code."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import orjson

import pipes
from pipes.brokers import Changes
from pipes.brokers.local import LocalBroker

N = 100_000
PARTS = 4

APP = '''
import os

import orjson

import pipes

FIXED = os.environ.get("DLQ_FIXED") == "1"


def tolerant(raw):
    """The fix for malformed input: keep what arrived instead of failing to decode it."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {"malformed": raw.decode()}


json_values = pipes.Serializer("tolerant-json", orjson.dumps, tolerant) if FIXED else "json"
app = pipes.App("dlqapp")
events = app.topic("events", partitions=4, value_serializer=json_values)


@app.transform(events, to="out")
def work(event):
    if "malformed" in event:  # '{"i": 7' -> 7
        return {"i": int(event["malformed"].split(":")[1]), "recovered": True}
    if event.get("boom") and not FIXED:
        raise ValueError(f"boom on {event['i']}")
    return {"i": event["i"], "double": 2 * event["i"]}
'''


def kind(i: int) -> str:
    return "malformed" if i % 100 == 7 else "boom" if i % 100 == 42 else "good"


def raw_value(i: int) -> bytes:
    if kind(i) == "malformed":
        return b'{"i": %d' % i
    return orjson.dumps({"i": i, "boom": kind(i) == "boom"})


def fill(data: Path, topic: str, values: list[tuple[int, bytes]], partitions: int) -> None:
    """Write (partition, raw value) records straight into a local:// data dir."""
    async def main() -> None:
        broker = LocalBroker(str(data), pipes.Settings(partitions=partitions))
        try:
            records: dict[tuple[str, int], list] = {}
            for p, raw in values:
                records.setdefault((topic, p), []).append((None, raw, None, 1_700_000_000_000))
            await broker.commit("test.fill", Changes(records=records))
        finally:
            await broker.close()

    asyncio.run(main())


def raw_records(data: Path, topic: str) -> list[tuple[int, tuple]]:
    """(partition, (offset, key, value, headers, ts)) of every record of `topic`."""
    broker = LocalBroker(str(data), pipes.Settings(), read_only=True)
    try:
        out = []
        for p in range(broker.partitions(topic)):
            off = broker.start_offsets(topic)[p]
            while recs := broker.read(topic, p, off, 10_000):
                out += [(p, r) for r in recs]
                off = recs[-1][0] + 1
        return out
    finally:
        asyncio.run(broker.close())


def pipes_cmd(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 120):
    return subprocess.run([sys.executable, "-m", "pipes", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def test_bad_messages_go_to_the_dlq_with_their_origin_and_replay_after_a_fix(tmp_path):
    app = tmp_path / "dlqapp.py"
    app.write_text(APP)
    data = tmp_path / "data"
    fill(data, "events", [(i % PARTS, raw_value(i)) for i in range(N)], PARTS)
    broker = ["--broker", f"local://{data}"]

    run = pipes_cmd("worker", "-A", str(app), *broker, "--until-done")
    assert run.returncode == 0, run.stderr
    assert "node 'work': 1000 JSONDecodeError, 1000 ValueError sent to the DLQ" in run.stderr \
        or "node 'work': 1000 ValueError, 1000 JSONDecodeError sent to the DLQ" in run.stderr, run.stderr

    # Every good message had its effect, once.
    out = [orjson.loads(r[2]) for _, r in raw_records(data, "out")]
    good = [i for i in range(N) if kind(i) == "good"]
    assert sorted(o["i"] for o in out) == good
    assert all(o["double"] == 2 * o["i"] for o in out)

    # Exactly the 2,000 bad ones are dead letters, each with where it came from and why.
    dead = raw_records(data, "events.dlq")
    assert len(dead) == 2 * N // 100
    seen = set()
    for _, (_, key, value, headers, _) in dead:
        h = {k: v.decode() for k, v in headers}
        i = int(h["pipes.offset"]) * PARTS + int(h["pipes.partition"])  # record i went to i % 4, offset i // 4
        assert value == raw_value(i) and key is None
        assert h["pipes.topic"] == "events" and h["pipes.error.node"] == "work"
        if kind(i) == "malformed":
            assert h["pipes.error.type"] == "JSONDecodeError"
        else:
            assert h["pipes.error.type"] == "ValueError" and h["pipes.error.message"] == f"boom on {i}"
            assert "in work" in h["pipes.error.traceback"]
        seen.add(i)
    assert seen == {i for i in range(N) if kind(i) != "good"}

    # A dry run counts and sends nothing.
    dry = pipes_cmd("dlq", "replay", "events.dlq", "-A", str(app), *broker, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "events.dlq: would re-send 2000 to events" in dry.stderr
    assert len(raw_records(data, "events")) == N

    # The fix: a tolerant decoder, and work() no longer raises. Replay, then run again.
    fixed = {"DLQ_FIXED": "1"}
    replay = pipes_cmd("dlq", "replay", "events.dlq", "-A", str(app), *broker, env=fixed)
    assert replay.returncode == 0, replay.stderr
    assert "events.dlq: re-sent 2000 to events" in replay.stderr
    events = raw_records(data, "events")
    replayed = [(p, r) for p, r in events if r[0] >= N // PARTS]
    assert len(replayed) == 2000
    for p, (_, _, value, headers, _) in replayed:  # back in its own partition, without error headers
        i = orjson.loads(value)["i"] if kind_of_raw(value) != "malformed" else int(value.split(b":")[1])
        assert p == i % PARTS and value == raw_value(i) and not headers

    again = pipes_cmd("worker", "-A", str(app), *broker, "--until-done", env=fixed)
    assert again.returncode == 0, again.stderr
    out = [orjson.loads(r[2]) for _, r in raw_records(data, "out")]
    assert sorted(o["i"] for o in out) == list(range(N))  # every message had its effect, once
    assert sum(1 for o in out if o.get("recovered")) == 1000
    assert len(raw_records(data, "events.dlq")) == 2000  # nothing failed again

    # Progress was recorded with what was sent: a second replay sends nothing.
    second = pipes_cmd("dlq", "replay", "events.dlq", "-A", str(app), *broker, env=fixed)
    assert second.returncode == 0 and "events.dlq: re-sent nothing" in second.stderr, second.stderr


def kind_of_raw(value: bytes) -> str:
    try:
        orjson.loads(value)
        return "json"
    except orjson.JSONDecodeError:
        return "malformed"


STOP_APP = '''
import pipes

app = pipes.App("stopapp")


@app.transform("events", to="out", on_error="stop")
def strict(event):
    if event["i"] >= 500:
        raise ValueError(f"cannot take {event['i']}")
    return event
'''


def committed(data: Path, group: str) -> dict:
    broker = LocalBroker(str(data), pipes.Settings(), read_only=True)
    try:
        return broker.store.offsets(group)
    finally:
        asyncio.run(broker.close())


def test_stop_halts_with_one_error_naming_the_message_and_commits_nothing_past_it(tmp_path):
    app = tmp_path / "stopapp.py"
    app.write_text(STOP_APP)
    data = tmp_path / "data"
    fill(data, "events", [(0, orjson.dumps({"i": i})) for i in range(1000)], 1)
    args = ["worker", "-A", str(app), "--broker", f"local://{data}", "--until-done", "--commit-every", "100"]
    env = {"PIPES_POLL_RECORDS": "100"}  # batches of 100: the ones before the failure are committed

    for attempt in range(2):  # and after a restart, the same message fails again: it was not skipped
        run = pipes_cmd(*args, env=env)
        assert run.returncode == 1, run.stderr
        errors = [line for line in run.stderr.splitlines() if "error:" in line or "Error" in line]
        assert errors == ["pipes: error: node 'strict' failed on topic 'events' partition 0 offset 500: "
                          "ValueError: cannot take 500"], run.stderr
        assert "restarting" not in run.stderr
        assert committed(data, "stopapp.main") == {("events", 0): 500}
        assert sorted(orjson.loads(r[2])["i"] for _, r in raw_records(data, "out")) == list(range(500))


def test_skip_counts_and_logs_each_kind_once(tmp_path):
    app = tmp_path / "skipapp.py"
    app.write_text(textwrap.dedent('''
        import pipes

        app = pipes.App("skipapp")


        @app.transform("events", to="out", on_error="skip")
        def picky(event):
            if event["i"] % 10 == 0:
                raise KeyError("tens")
            return event
    '''))
    data = tmp_path / "data"
    fill(data, "events", [(0, orjson.dumps({"i": i})) for i in range(1000)] + [(0, b"nope")], 1)
    run = pipes_cmd("worker", "-A", str(app), "--broker", f"local://{data}", "--until-done")
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("failed on topic 'events'") == 2  # the first KeyError, the first JSONDecodeError
    assert "node 'picky': 100 KeyError, 1 JSONDecodeError skipped" in run.stderr
    assert len(raw_records(data, "out")) == 900
    assert "events.dlq" not in topics_of(data)  # skipped, not dead-lettered


def topics_of(data: Path) -> set[str]:
    broker = LocalBroker(str(data), pipes.Settings(), read_only=True)
    try:
        return set(broker.topics())
    finally:
        asyncio.run(broker.close())


def test_on_error_option_sets_the_policy_of_nodes_that_set_none(tmp_path):
    app = tmp_path / "dlqapp.py"
    app.write_text(APP)
    data = tmp_path / "data"
    fill(data, "events", [(0, raw_value(i)) for i in range(100)], 1)
    run = pipes_cmd("worker", "-A", str(app), "--broker", f"local://{data}", "--until-done", "--on-error", "stop")
    assert run.returncode == 1
    assert "pipes: error: node 'work' failed on topic 'events' partition 0 offset 7: JSONDecodeError" in run.stderr


def test_replay_on_kafka(tmp_path, kafka_url):
    import pipes.runtime
    from pipes.brokers.kafka import KafkaBroker

    app = pipes.App("dlqkafka")
    app.source([{"i": i} for i in range(200)], to=app.topic("dk.in", partitions=2), name="numbers")

    @app.transform("dk.in", to="dk.out")
    def fussy(n):
        if n["i"] % 10 == 3:
            raise ValueError("not yet")
        return n

    settings = pipes.Settings(broker=kafka_url, data_dir=str(tmp_path / "worker"))
    asyncio.run(asyncio.wait_for(pipes.runtime.run(app.build(settings), settings, until_done=True), 120))

    def records(topic: str, want: int) -> list[tuple[int, tuple]]:
        """`want` records of `topic` (and any more that come within half a second)."""
        async def read():
            broker = KafkaBroker("probe", pipes.Settings(broker=kafka_url, data_dir=str(tmp_path / "probe")))
            await broker.open(None, [])
            try:
                await broker.describe(topic)  # learn its partitions
                consumer = broker.consumer(None, [topic])
                await consumer.start()
                got, idle = [], 0
                deadline = time.monotonic() + 20
                while (len(got) < want and time.monotonic() < deadline) or idle < 2:
                    polled = await consumer.poll(1000, 0.25)
                    idle = 0 if polled else idle + 1
                    got += [(p, r) for _, p, recs in polled for r in recs]
                await consumer.close()
                return got
            finally:
                await broker.close()

        return asyncio.run(read())

    dead = records("dk.in.dlq", 20)
    # On Kafka outputs are at-least-once: a rebalance may have written a dead letter twice.
    assert {orjson.loads(r[2])["i"] for _, r in dead} == {i for i in range(200) if i % 10 == 3}
    where = {orjson.loads(r[2])["i"]: int(dict(r[3])["pipes.partition"]) for _, r in dead}
    ends: dict[int, int] = {}  # per partition of dk.in, the first offset a replay writes
    before = records("dk.in", 200)
    for p, r in before:
        ends[p] = max(ends.get(p, 0), r[0] + 1)
    args = ["dlq", "replay", "dk.in.dlq", "--broker", kafka_url, "--data-dir", str(tmp_path / "replay")]
    first = pipes_cmd(*args)
    assert first.returncode == 0 and f"dk.in.dlq: re-sent {len(dead)} to dk.in" in first.stderr, first.stderr
    inputs = records("dk.in", len(before) + len(dead))
    assert len(inputs) == len(before) + len(dead)
    replayed = [(p, r) for p, r in inputs if r[0] >= ends[p]]
    assert sorted(orjson.loads(r[2])["i"] for _, r in replayed) == sorted(orjson.loads(r[2])["i"] for _, r in dead)
    assert not any(r[3] for _, r in replayed)  # without the error headers
    assert all(p == where[orjson.loads(r[2])["i"]] for p, r in replayed)  # back to its own partition
    second = pipes_cmd(*args)
    assert second.returncode == 0 and "dk.in.dlq: re-sent nothing" in second.stderr, second.stderr
