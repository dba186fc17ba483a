"""`pipes topics` on local:// and on a Kafka-protocol broker (Tansu), and the checkpoint
age in `pipes state`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time

import pipes
import pipes.runtime

APP = textwrap.dedent('''
    import pipes

    app = pipes.App("topicsapp")
    billing = app.topology("billing")
    app.source([{"id": i, "amount": i} for i in range(30)], to=app.topic("orders", partitions=3), name="orders_in")


    @app.transform("orders", to="big")
    def big(order):
        if order["amount"] >= 10:
            return order


    @billing.sink("big")
    def invoice(order):
        pass
''')


def pipes_cmd(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipes", *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_topics_and_checkpoint_age_on_local(tmp_path):
    (tmp_path / "topicsapp.py").write_text(APP)
    app = str(tmp_path / "topicsapp.py")
    data = f"local://{tmp_path / 'data'}"
    run = pipes_cmd("worker", "-A", app, "--broker", data, "--topology", "main", "--until-done")
    assert run.returncode == 0, run.stderr

    listed = pipes_cmd("topics", "-A", app, "--broker", data, "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {t["topic"]: t for t in json.loads(listed.stdout)}
    assert set(rows) == {"orders", "big", "topicsapp.main.sources"}
    orders = rows["orders"]
    assert orders["partitions"] == 3 and sum(orders["end_offsets"]) == 30
    assert {p: o["lag"] for p, o in orders["groups"]["topicsapp.main"].items()} == {"0": 0, "1": 0, "2": 0}
    big = rows["big"]
    assert big["end_offsets"] == [20]
    assert big["groups"] == {}  # billing has not run yet: no offsets, so nothing to show

    # The billing topology runs: its group appears, caught up. Without -A, every topic is listed.
    assert pipes_cmd("worker", "-A", app, "--broker", data, "--topology", "billing", "--until-done").returncode == 0
    everything = json.loads(pipes_cmd("topics", "--broker", data, "--json").stdout)
    big = next(t for t in everything if t["topic"] == "big")
    assert big["groups"] == {"topicsapp.billing": {"0": {"offset": 20, "lag": 0}}}
    text = pipes_cmd("topics", "--broker", data).stdout
    assert "big  (1 partition)\n  [0] end 20  topicsapp.billing: offset 20, lag 0\n" in text

    state = json.loads(pipes_cmd("state", "-A", app, "--broker", data).stdout)
    ages = state["checkpoints"]
    assert set(ages) == {"topicsapp.main", "topicsapp.billing"}
    for age in ages.values():
        assert 0 <= age["age_seconds"] < 60 and age["time"].endswith("Z")


def test_topics_on_kafka_lists_end_offsets_and_group_lag(tmp_path, kafka_url):
    ns = {}
    exec(compile(APP.replace('"topicsapp"', '"topicskafka"'), "topicsapp", "exec"), ns)
    app = ns["app"]
    settings = pipes.Settings(broker=kafka_url, data_dir=str(tmp_path / "data"))
    asyncio.run(asyncio.wait_for(pipes.runtime.run(app.build(settings), settings, until_done=True), 120))

    deadline = time.monotonic() + 20
    while True:
        listed = pipes_cmd("topics", "--broker", kafka_url, "--json")
        assert listed.returncode == 0, listed.stderr
        rows = {t["topic"]: t for t in json.loads(listed.stdout)}
        if "topicskafka.billing" in rows.get("big", {}).get("groups", {}) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert rows["orders"]["partitions"] == 3 and sum(rows["orders"]["end_offsets"]) == 30
    assert rows["big"]["end_offsets"] == [20]
    assert rows["big"]["groups"]["topicskafka.billing"] == {"0": {"offset": 20, "lag": 0}}
    lags = rows["orders"]["groups"]["topicskafka.main"]
    assert sum(o["offset"] for o in lags.values()) == 30 and {o["lag"] for o in lags.values()} == {0}


def test_reset_removes_a_data_dir_of_any_log_format_but_not_one_in_use(tmp_path):
    # The message refusing an older data dir says to remove it; `pipes reset` must be able to.
    from pipes.store import Store

    (tmp_path / "topicsapp.py").write_text(APP)
    app = str(tmp_path / "topicsapp.py")
    data = tmp_path / "data"
    store = Store(str(data))
    store.put("log", b"orders\0" + bytes(12), b"\x94\xc0\xa1v\xc0\x01")  # one record per value, unmarked
    store.close()
    refused = pipes_cmd("topics", "-A", app, "--broker", f"local://{data}")
    assert refused.returncode != 0 and "older pipes" in refused.stderr
    assert pipes_cmd("reset", "-A", app, "--broker", f"local://{data}", "--yes").returncode == 0
    assert not data.exists()

    held = Store(str(data))  # a worker holds the data dir
    try:
        busy = pipes_cmd("reset", "-A", app, "--broker", f"local://{data}", "--yes")
        assert busy.returncode != 0 and "in use" in busy.stderr
        assert data.exists()
    finally:
        held.close()
