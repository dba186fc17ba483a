"""Acceptance tests of the I/O connectors under stress, each driving real `pipes worker`
subprocesses (apps in tests/acceptance_apps.py):

* PostgreSQL sink under crashes: a worker writing 100,000 rows is SIGKILLed at random
  moments three times and restarted; the table then holds exactly the 100,000 rows, none
  twice (checked with an independent SELECT).
* HTTP ingest under load: a second process POSTs >= 2,000 requests/s on loopback for a
  bounded time; every request answered 200 is in the topic, every malformed body got 400
  with a reason.

ACCEPT_SEED picks other kill moments.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson
import pytest

import pipes
from helpers import DSN, free_port, read_topic, rows, sql


pytestmark = pytest.mark.slow

APPS = Path(__file__).with_name("acceptance_apps.py")
PIPES_CLI = Path(sys.executable).with_name("pipes")
SEED = int(os.environ.get("ACCEPT_SEED", "20240611"))


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPES_", "ACCEPT_"))}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


class Workers:
    """The worker processes a test starts; any still running at the end are killed and reaped."""

    def __init__(self, data_dir: Path, logs: Path, env: dict[str, str]):
        self.data_dir, self.logs, self.env = data_dir, logs, env
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str) -> subprocess.Popen:
        log = open(self.logs / f"worker-{len(self.procs)}.log", "wb")
        cmd = [str(PIPES_CLI), "worker", "-A", str(APPS), "--data-dir", str(self.data_dir), *args]
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(proc)
        return proc

    def log(self, proc: subprocess.Popen) -> str:
        return (self.logs / f"worker-{self.procs.index(proc)}.log").read_text(errors="replace")[-3000:]

    def reap(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


# -- PostgreSQL sink under crashes --------------------------------------------------------------
N_ROWS = 100_000


@pytest.fixture
def pg_table():
    try:
        sql("SELECT 1")
    except Exception as e:
        pytest.fail(f"PostgreSQL is not reachable at {DSN} ({type(e).__name__}: {e}); it is expected to be "
                    f"running: start it with `service postgresql start`, or set PIPES_TEST_POSTGRES", pytrace=False)
    table = f"pipes_accept_{uuid.uuid4().hex[:10]}"
    sql(f"CREATE TABLE {table} (id int NOT NULL, v int NOT NULL, name text NOT NULL)")
    yield table
    for t in (table, f"{table}_offsets", f"{table}_offsets_rejected"):
        sql(f"DROP TABLE IF EXISTS {t}")


def test_postgres_sink_exactly_once_across_three_random_sigkills(pg_table, tmp_path):
    """~5,000 transactions of 20 rows, a checkpoint every 50 ms or 200 messages: a run takes
    about 6 s, so each kill lands in the middle of the writing."""
    rng = random.Random(SEED)
    logs = tmp_path / "logs"
    logs.mkdir()
    workers = Workers(tmp_path / "data", logs, _env(
        ACCEPT_APP="pg", ACCEPT_DSN=DSN, ACCEPT_TABLE=pg_table, ACCEPT_N=str(N_ROWS),
        ACCEPT_COMMIT_EVERY="200", ACCEPT_COMMIT_INTERVAL="0.05", ACCEPT_SINK_BATCH="20"))

    def count() -> int:
        return rows(f"SELECT count(*) AS n FROM {pg_table}")[0]["n"]

    # Each life is killed once the table has grown past a random row count drawn from its
    # own stretch of the run (so the three kills spread over it), after a further random
    # 0-50 ms so the kill falls anywhere within a transaction and checkpoint cycle.
    stretches = [(3_000, 25_000), (35_000, 55_000), (65_000, 88_000)]
    kills = []  # (target, rows before the kill, rows just after it)
    try:
        for life, (lo, hi) in enumerate(stretches):
            target = rng.randint(lo, hi)
            proc = workers.start()
            deadline = time.monotonic() + 25
            while (before := count()) < target:
                assert proc.poll() is None, f"life {life}: the worker exited ({proc.returncode}) at {before} " \
                                            f"rows, before the kill:\n{workers.log(proc)}"
                assert time.monotonic() < deadline, f"life {life}: {before} rows after 25 s, want {target}"
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.05))
            growing = count()
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(10) == -signal.SIGKILL
            after = count()
            # The kill landed mid-run: rows were being written (the count still growing
            # right before it) and not all of them yet.
            assert 0 < before < growing <= after < N_ROWS, (life, before, growing, after)
            kills.append((target, growing, after))
        final = workers.start("--until-done")
        assert final.wait(45) == 0, workers.log(final)
    finally:
        workers.reap()
    print(f"\nkills (target, rows just before, rows just after): {kills}")
    print(workers.log(final).strip().splitlines()[-1])

    # The independent check: every id 0..99,999 exactly once, with its values.
    stats = rows(f"SELECT count(*) AS n, count(DISTINCT id) AS ids, min(id) AS lo, max(id) AS hi, "
                  f"count(*) FILTER (WHERE v <> id % 1009 OR name <> 'row ' || id) AS wrong FROM {pg_table}")[0]
    assert stats == {"n": N_ROWS, "ids": N_ROWS, "lo": 0, "hi": N_ROWS - 1, "wrong": 0}, stats
    doubled = rows(f"SELECT id, count(*) AS n FROM {pg_table} GROUP BY id HAVING count(*) > 1 LIMIT 10")
    assert doubled == []


# -- HTTP ingest under load ---------------------------------------------------------------------
LOAD_SECONDS = 10.0
LOAD_MAX_REQUESTS = 150_000
LOAD_CONCURRENCY = 100
MIN_RATE = 2_000  # requests/s


def wait_listening(port: int, proc: subprocess.Popen, workers: Workers, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, f"the worker exited ({proc.returncode}):\n{workers.log(proc)}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on {port} after {seconds} s"
            time.sleep(0.05)


@pytest.mark.serial
def test_http_ingest_under_load_loses_no_accepted_request(tmp_path):
    port = free_port()
    logs = tmp_path / "logs"
    logs.mkdir()
    data = tmp_path / "data"
    workers = Workers(data, logs, _env(ACCEPT_APP="http", ACCEPT_PORT=str(port), ACCEPT_COMMIT_INTERVAL="0.02"))
    out = tmp_path / "load.json"
    try:
        worker = workers.start()
        wait_listening(port, worker, workers)
        t0 = time.monotonic()
        load = subprocess.run(
            [sys.executable, str(APPS), f"http://127.0.0.1:{port}/ingest", str(out), "--seconds", str(LOAD_SECONDS),
             "--max-requests", str(LOAD_MAX_REQUESTS), "--concurrency", str(LOAD_CONCURRENCY)],
            env=_env(), capture_output=True, timeout=LOAD_SECONDS + 40)
        load_wall = time.monotonic() - t0
        assert load.returncode == 0, load.stderr.decode()[-3000:]
        assert worker.poll() is None, f"the worker exited under load:\n{workers.log(worker)}"
        worker.send_signal(signal.SIGTERM)  # it drains and exits 0
        assert worker.wait(20) == 0, workers.log(worker)
    finally:
        workers.reap()
    result = orjson.loads(out.read_bytes())
    ok, bad, other = result["ok"], {int(k): v for k, v in result["bad"].items()}, result["other"]
    print(f"\n{load.stdout.decode().strip()} (load process wall time {load_wall:.1f} s)")
    print(workers.log(worker).strip().splitlines()[-1])

    values = [m.value for m in read_topic(data, "events")]
    in_topic = [v["id"] for v in values]
    # No accepted request lost: every id answered 200 is in the topic, as sent.
    assert len(ok) == len(set(ok))
    missing = set(ok) - set(in_topic)
    assert not missing, f"{len(missing)} ids answered 200 are not in the topic, e.g. {sorted(missing)[:10]}"
    assert all(v == {"id": v["id"], "k": f"k{v['id'] % 64}", "pad": "x" * (v["id"] % 50)} for v in values)
    # Every malformed body got 400 with a reason, and none of them reached the topic.
    expected_bad = {i for i in ok + list(bad) + [o[0] for o in other] if i % 100 == 37}
    assert set(bad) == expected_bad and len(bad) > 0
    wrong = {i: v for i, v in bad.items() if v[0] != 400 or not (isinstance(v[1], str) and "invalid JSON" in v[1])}
    assert not wrong, f"malformed bodies not answered 400 with a reason: {list(wrong.items())[:10]}"
    assert not set(bad) & set(in_topic)
    # While the worker ran (it was stopped only after the load), every well-formed request
    # was accepted; the topic holds nothing that was not (a 200 always followed the checkpoint).
    assert other == [], f"{len(other)} requests got another answer, e.g. {other[:5]}"
    assert sorted(in_topic) == sorted(ok)

    rate = result["rate"]
    assert rate >= MIN_RATE, (f"achieved {rate:.0f} requests/s ({result['requests']} in {result['seconds']:.1f} s, "
                              f"{LOAD_CONCURRENCY} connections), want >= {MIN_RATE}")
