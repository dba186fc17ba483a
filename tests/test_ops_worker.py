"""The worker process on local://: SIGTERM mid-run drains, checkpoints and exits 0 within the
deadline, and the next run continues with nothing lost or duplicated; a crashing source is
restarted from its last checkpoint; a topology that keeps crashing makes the worker give up."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson

import pipes
from pipes.brokers.local import LocalBroker
from pipes.store import state_prefix
from tansu import free_port

N = 200_000
USERS = 1000

LONG_APP = f'''
import pipes

app = pipes.App("longrun")


@app.source(to="numbers")
def numbers(state):
    i = state.get("i", 0)
    if i == {N}:
        return None
    state["i"] = i + 1
    return {{"i": i, "user": f"u{{i % {USERS}}}"}}


@app.transform("numbers", to="counts", key="user")
def count(event, state):
    state["n"] = state.get("n", 0) + 1
    state["sum"] = state.get("sum", 0) + event["i"]
    return {{"user": event["user"], "i": event["i"], "n": state["n"]}}
'''


def values(data: Path, topic: str) -> list:
    if not (data / "CURRENT").exists():  # the worker has not created its database yet
        return []
    broker = LocalBroker(str(data), pipes.Settings(), read_only=True)
    try:
        if topic not in broker.topics():
            return []
        out = []
        for p in range(broker.partitions(topic)):
            off = broker.start_offsets(topic)[p]
            while recs := broker.read(topic, p, off, 50_000):
                out += [orjson.loads(r[2]) for r in recs]
                off = recs[-1][0] + 1
        return out
    finally:
        asyncio.run(broker.close())


def values_while_starting(data: Path, topic: str) -> list:
    try:
        return values(data, topic)
    except pipes.BrokerError:  # caught the worker creating its database
        return []


def worker(app: Path, data: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipes", "worker", "-A", str(app), "--broker", f"local://{data}",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def test_sigterm_mid_run_exits_0_in_time_and_the_next_run_loses_and_duplicates_nothing(tmp_path):
    app = tmp_path / "longrun.py"
    app.write_text(LONG_APP)
    data = tmp_path / "data"
    first = worker(app, data, "--shutdown-timeout", "10")
    deadline = time.monotonic() + 60
    while len(values_while_starting(data, "counts")) < 20_000:  # well under way
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    first.send_signal(signal.SIGTERM)
    asked = time.monotonic()
    _, err = first.communicate(timeout=30)
    took = time.monotonic() - asked
    assert first.returncode == 0, err
    assert took < 10, f"shutdown took {took:.1f} s"
    done_first = len(values(data, "counts"))
    assert 20_000 <= done_first < N, "the signal must come mid-run for this test to mean anything"

    second = worker(app, data, "--until-done")
    _, err = second.communicate(timeout=120)
    assert second.returncode == 0, err

    # Recomputed independently: every number once, and per user the running count in order.
    assert sorted(v["i"] for v in values(data, "numbers")) == list(range(N))
    counts = values(data, "counts")
    assert len(counts) == N
    assert sorted((c["i"], c["n"]) for c in counts) == [(i, i // USERS + 1) for i in range(N)]
    broker = LocalBroker(str(data), pipes.Settings(), read_only=True)
    try:
        state = {}
        for p in range(broker.partitions("longrun.count.rekey")):
            prefix = state_prefix("count", p)
            state.update({k[len(prefix):].decode(): pickle.loads(v) for k, v in broker.store.scan("state", prefix)})
    finally:
        asyncio.run(broker.close())
    expected = {f"u{u}": {"n": N // USERS, "sum": sum(range(u, N, USERS))} for u in range(USERS)}
    assert state == expected


RESTART_APP = '''
import os
from pathlib import Path

import pipes

MARK = Path(os.environ["CRASH_MARK"])
app = pipes.App("restarts")


@app.source(to="numbers")
def numbers(state):
    i = state.get("i", 0)
    if i == 1000:
        return None
    if i == 700 and not MARK.exists():  # once: the connection drops
        MARK.write_text("crashed")
        raise ConnectionError("feed went away")
    state["i"] = i + 1
    return {"i": i}


@app.transform("numbers", to="doubled")
def double(n):
    return {"i": n["i"], "x": 2 * n["i"]}
'''


def test_a_crashing_source_is_restarted_from_its_last_checkpoint(tmp_path):
    app = tmp_path / "restarts.py"
    app.write_text(RESTART_APP)
    data = tmp_path / "data"
    mark = tmp_path / "crashed"
    env = {"CRASH_MARK": str(mark), "PIPES_RESTART_BACKOFF": "0.05", "PIPES_POLL_RECORDS": "50"}
    run = worker(app, data, "--until-done", "--commit-every", "100", env=env)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    assert mark.exists()
    assert "topology 'main' failed: ProcessingError: source 'numbers'" in err
    assert "feed went away; restarting it from its last checkpoint in 0.1 s (restart 1 of at most 5 in a row)" in err
    assert "restarted 1 time after crashes" in err
    assert sorted(v["i"] for v in values(data, "numbers")) == list(range(1000))
    assert sorted((v["i"], v["x"]) for v in values(data, "doubled")) == [(i, 2 * i) for i in range(1000)]


GIVE_UP_APP = '''
import pipes

app = pipes.App("giveup")
app.source(list(range(10)), to="numbers", name="numbers")


class Flaky:
    """A sink whose store is down: every flush fails."""

    def write(self, batch):
        pass

    def flush(self):
        raise OSError("store unreachable")


app.sink("numbers", Flaky(), name="store")
'''


def test_a_topology_that_keeps_crashing_makes_the_worker_give_up_with_exit_1(tmp_path):
    app = tmp_path / "giveup.py"
    app.write_text(GIVE_UP_APP)
    data = tmp_path / "data"
    env = {"PIPES_RESTART_BACKOFF": "0.05", "PIPES_RESTART_ATTEMPTS": "2"}
    began = time.monotonic()
    run = worker(app, data, "--until-done", env=env)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 1, err
    assert err.count("restarting it from its last checkpoint") == 2
    assert err.strip().splitlines()[-1] == (
        "pipes: error: topology 'main' gave up after 2 restarts: store unreachable")
    assert time.monotonic() - began < 30


PROGRESS_APP = '''
import time

import pipes

app = pipes.App("progress")
STARTED = time.monotonic()


@app.source(to="numbers")
def numbers(state):  # for 1.5 s, however fast the machine: the line is redrawn every 0.5 s
    i = state.get("i", 0)
    if time.monotonic() - STARTED > 1.5:
        return None
    state["i"] = i + 1
    return i


@app.transform("numbers", to="odd")
def odd(n):
    if n % 2:
        return n
'''


def test_a_long_run_shows_a_progress_line_on_a_terminal_only(tmp_path):
    import pty
    import re

    app = tmp_path / "progress.py"
    app.write_text(PROGRESS_APP)
    master, slave = pty.openpty()
    run = subprocess.Popen([sys.executable, "-m", "pipes", "worker", "-A", str(app), "--broker",
                            f"local://{tmp_path / 'tty'}", "--until-done"], stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the worker is gone
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert run.wait(timeout=60) == 0, seen
    text = seen.decode()
    lines = re.findall(r"\r\x1b\[Kpipes: ([\d,]+) messages, ([\d,]+) msg/s, lag ([\d,]+), \d+ s", text)
    assert lines, text
    assert int(lines[-1][0].replace(",", "")) > 0
    assert re.search(r"\r\x1b\[Kpipes: processed \d+ messages", text)  # the summary, after the erased line

    piped = worker(app, tmp_path / "piped", "--until-done")
    _, err = piped.communicate(timeout=60)
    assert piped.returncode == 0 and "msg/s, lag" not in err and "\x1b[K" not in err


def test_json_logs(tmp_path):
    app = tmp_path / "giveup.py"
    app.write_text(GIVE_UP_APP)
    run = worker(app, tmp_path / "data", "--until-done", "--log-format", "json", "--restart-attempts", "1",
                 env={"PIPES_RESTART_BACKOFF": "0.05"})
    _, err = run.communicate(timeout=60)
    assert run.returncode == 1
    records = [orjson.loads(line) for line in err.splitlines()]  # every line is one JSON object
    assert records[0]["level"] == "INFO" and records[0]["message"].startswith("worker for app 'giveup'")
    assert records[0]["time"].endswith("Z") and records[0]["logger"] == "pipes"
    assert [r["level"] for r in records[1:]] == ["ERROR", "ERROR"]
    assert "restarting it from its last checkpoint" in records[1]["message"]
    assert records[2]["message"] == "error: topology 'main' gave up after 1 restart: store unreachable"


HANGING_APP = '''
import asyncio

import pipes

app = pipes.App("hanging")
app.source(list(range(10)), to="numbers", name="numbers")


class Stuck:
    """A sink whose flush never returns (a remote store that hangs)."""

    def write(self, batch):
        pass

    async def flush(self):
        await asyncio.sleep(3600)


app.sink("numbers", Stuck(), name="stuck")
'''


def test_a_shutdown_that_outlasts_its_deadline_is_cut_short_with_exit_1(tmp_path):
    app = tmp_path / "hanging.py"
    app.write_text(HANGING_APP)
    port = free_port()
    run = worker(app, tmp_path / "data", "--shutdown-timeout", "1", "--web", str(port))
    deadline = time.monotonic() + 30
    while True:  # ready (so its signal handlers are in place), then hanging in its first checkpoint
        assert run.poll() is None and time.monotonic() < deadline
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.05)
    time.sleep(0.3)
    run.send_signal(signal.SIGTERM)
    asked = time.monotonic()
    _, err = run.communicate(timeout=30)
    assert run.returncode == 1, err
    assert 0.9 < time.monotonic() - asked < 5
    assert err.strip().splitlines()[-1] == (
        "pipes: error: shutdown took longer than 1 s (shutdown_timeout): topology 'main' cancelled; "
        "what they did since their last checkpoint is redone by the next run")
    # Before giving up, it says where the hanging topology waits: in the sink's flush.
    assert "shutdown is taking longer than 1 s; where its tasks wait:" in err
    assert "flush (hanging.py:" in err, err
