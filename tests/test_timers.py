"""Timers: periodic and cron sources, and per-key timeouts that fire once, across restarts."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone

import pytest

import pipes
from pipes.brokers.local import LocalBroker
from pipes.runtime import run
from pipes.testing import read_messages
from pipes.timers import parse_cron


def utc(*args) -> int:
    return int(datetime(*args, tzinfo=timezone.utc).timestamp() * 1000)


@pytest.mark.parametrize("spec,after,want", [
    ("*/5 * * * *", utc(2026, 1, 1, 10, 3), utc(2026, 1, 1, 10, 5)),
    ("*/5 * * * *", utc(2026, 1, 1, 10, 5), utc(2026, 1, 1, 10, 10)),
    ("0 9 * * 1-5", utc(2026, 1, 2, 10, 0), utc(2026, 1, 5, 9, 0)),  # Friday after 9 -> Monday
    ("15,45 */6 * * *", utc(2026, 3, 1, 6, 50), utc(2026, 3, 1, 12, 15)),
    ("0 0 1 */3 *", utc(2026, 2, 10), utc(2026, 4, 1)),
    ("0 12 13 * 5", utc(2026, 2, 1), utc(2026, 2, 6, 12)),  # day 13 or a Friday, as cron does
    ("30 2 29 2 *", utc(2026, 1, 1), utc(2028, 2, 29, 2, 30)),
    ("0 0 * * 7", utc(2026, 1, 1), utc(2026, 1, 4)),  # 7 is Sunday too
])
def test_cron_next_firing(spec, after, want):
    assert parse_cron(spec, "t").next_after(after) == want


@pytest.mark.parametrize("spec", ["* * * *", "60 * * * *", "*/0 * * * *", "a * * * *", "0 0 31 2 *"])
def test_cron_errors(spec):
    app = pipes.App("cron")
    with pytest.raises(pipes.ConfigError, match="crontab|never fires"):
        app.crontab(spec)(lambda: None)
        parse_cron(spec, "t").next_after(0)


async def _run_for(app: pipes.App, settings: pipes.Settings, seconds: float) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(run(app.build(settings), settings, stop=stop))
    await asyncio.sleep(seconds)
    assert not task.done(), task.exception()
    stop.set()
    await task


def _read(settings: pipes.Settings, app: pipes.App, topic: str) -> list[pipes.Message]:
    async def main():
        broker = LocalBroker(settings.broker.removeprefix("local://"), settings)
        try:
            return read_messages(broker, app.build(settings), topic) if topic in broker.topics() else []
        finally:
            await broker.close()

    return asyncio.run(main())


def test_timer_fires_every_period_and_resumes_its_schedule(tmp_path):
    settings = pipes.Settings(broker=f"local://{tmp_path / 'data'}", commit_interval=0.05)
    app = pipes.App("tick")

    @app.timer(every=0.3, to="ticks")
    def tick():
        return {"at": int(time.time() * 1000)}

    asyncio.run(_run_for(app, settings, 1.1))
    first = [m.value["at"] for m in _read(settings, app, "ticks")]
    assert len(first) == 3  # at 0.3, 0.6 and 0.9 s
    asyncio.run(_run_for(app, settings, 0.8))
    fired = [m.value["at"] for m in _read(settings, app, "ticks")]
    assert len(fired) > len(first)
    gaps = [b - a for a, b in zip(fired, fired[1:])]
    # Fixed rate: a late call is followed by a shorter gap, but never a double firing.
    assert min(gaps) >= 150, f"fired twice in a row (or too early after the restart): {gaps}"


def test_timeout_fires_once_per_key_after_the_quiet_period_across_restarts(tmp_path):
    settings = pipes.Settings(broker=f"local://{tmp_path / 'data'}", commit_interval=0.05)
    app = pipes.App("carts", partitions=2)
    fired_at: dict[str, int] = {}

    @app.timeout("checkouts", key="cart", after=1.5, to="abandoned", cancel=lambda v: v["type"] == "paid")
    def abandoned(last):
        fired_at[last["cart"]] = int(time.time() * 1000)
        return {"cart": last["cart"], "n": last["n"]}

    carts = [f"c{i}" for i in range(12)]
    sent: dict[str, int] = {}

    async def phase1():
        await _feed(settings, app, "checkouts", [{"cart": c, "type": "checkout", "n": 1} for c in carts])
        for c in carts:
            sent[c] = int(time.time() * 1000)
        await _run_for(app, settings, 0.5)
        # a second message pushes the deadline back; a payment cancels the timer
        await _feed(settings, app, "checkouts", [{"cart": "c1", "type": "checkout", "n": 2},
                                                 {"cart": "c2", "type": "paid", "n": 2}])
        sent["c1"] = int(time.time() * 1000)
        await _run_for(app, settings, 0.3)

    asyncio.run(phase1())
    assert not fired_at, "fired before the quiet period"
    time.sleep(1.0)  # every deadline passes while no worker runs
    asyncio.run(_run_for(app, settings, 1.5))
    asyncio.run(_run_for(app, settings, 1.0))  # a third run fires nothing again
    out = [m.value for m in _read(settings, app, "abandoned")]
    want = {c: 1 for c in carts if c not in ("c1", "c2")} | {"c1": 2}
    assert sorted((o["cart"], o["n"]) for o in out) == sorted(want.items())
    for c, at in fired_at.items():
        assert at >= sent[c] + 1500


async def _feed(settings: pipes.Settings, app: pipes.App, topic: str, values: list) -> None:
    from pipes.brokers import Changes
    from pipes.emit import Emitter
    from pipes.topology import Node

    graph = app.build(settings)
    broker = LocalBroker(settings.broker.removeprefix("local://"), settings)
    try:
        await broker.open(graph, list(graph.topologies.values()))
        outputs: dict[str, list] = {}

        class Buffers:
            def buffer(self, t, scope=None):
                return outputs.setdefault(t, [])

        emitter = Emitter(Node(id="feed", kind="source", topology="", target=None, outputs=(topic,)), graph)
        bufs = emitter.buffers(Buffers())
        now = int(time.time() * 1000)
        for v in values:
            emitter.encode(v, None, None, now, bufs, Buffers())
        await broker.commit("feed", Changes(outputs=outputs))
    finally:
        await broker.close()


# -- once per topology across workers, on kafka:// -------------------------------------------------
KAFKA_APP = '''
import os
import time

import pipes

NAME = os.environ["TIMERS_KAFKA_APP"]
app = pipes.App(NAME)


@app.timer(every=0.4, to=f"{NAME}.ticks")
def tick():
    return {"pid": os.getpid(), "at": int(time.time() * 1000)}
'''


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_timer_runs_on_one_worker_and_fails_over(kafka_url, tmp_path):
    """Two workers in one consumer group: only the holder of the topology's source lease
    fires; when it is SIGKILLed, the other takes the lease and the timer goes on there."""
    asyncio.run(_one_worker(kafka_url, tmp_path))


async def _one_worker(kafka_url: str, tmp_path) -> None:
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import orjson
    from tansu import unique
    from test_kafka_faults import Reader, wait_for_topic

    name = unique("tim")
    bootstrap = kafka_url.removeprefix("kafka://")
    worker_url = f"{kafka_url}?session_timeout_ms=6000&heartbeat_interval_ms=1000"  # a dead worker is noticed sooner
    app_file = tmp_path / "timers_app.py"
    app_file.write_text(KAFKA_APP)
    cli = Path(sys.executable).with_name("pipes")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PIPES_")}, "TIMERS_KAFKA_APP": name}
    procs = []
    for tag in ("a", "b"):
        with open(tmp_path / f"{tag}.log", "ab") as log:
            procs.append(subprocess.Popen([str(cli), "worker", "-A", str(app_file), "--broker", worker_url,
                                           "--data-dir", str(tmp_path / tag)], env=env, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    by_pid = {p.pid: p for p in procs}

    def logs() -> str:
        return "\n".join(p.read_text(errors="replace")[-1500:] for p in tmp_path.glob("*.log"))

    try:
        await wait_for_topic(bootstrap, f"{name}.ticks")
        async with Reader(bootstrap, f"{name}.ticks", 1) as r:
            async def ticks(until, timeout: float) -> list[dict]:
                deadline = time.monotonic() + timeout
                while True:
                    await r.poll(0.3)
                    got = [orjson.loads(raw) for _, _, raw in r.records[0]]
                    if until(got):
                        return got
                    assert time.monotonic() < deadline, f"{len(got)} ticks\n{logs()}"

            await asyncio.sleep(3)  # both workers in the group by now (their join takes a few seconds)
            before = await ticks(lambda got: len(got) >= 12, 60)
            holder = before[-1]["pid"]
            recent = before[-8:]
            assert {t["pid"] for t in recent} == {holder}, "two workers ran the timer at once"
            gaps = [b["at"] - a["at"] for a, b in zip(recent, recent[1:])]
            assert min(gaps) >= 200, gaps
            by_pid[holder].send_signal(signal.SIGKILL)
            n = len(before)
            after = await ticks(lambda got: len([t for t in got[n:] if t["pid"] != holder]) >= 3, 90)
            (other,) = set(by_pid) - {holder}
            assert {t["pid"] for t in after[n:]} - {holder} == {other}  # the survivor took the timer over
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
