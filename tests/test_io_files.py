"""pipes.io.files on the real file system: the Files source (each format, resuming mid-file
after a stop, following new files, holding back partial lines, after=delete/move only
once durable) and the CSV and Parquet sinks. Results are checked against an independent
read of the same files (csv, json, pyarrow), and the topics read back from the data dir.
"""

from __future__ import annotations

import asyncio
import csv
import gc
import json
import os
import pickle
import time

import pytest

import pipes
import pipes.runtime
from pipes.brokers.local import LocalBroker
from pipes.io.files import CSV, Files, Parquet
from pipes.testing import read_messages, run_app

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:  # pyarrow is optional: only Parquet needs it
    pa = pq = None
needs_pyarrow = pytest.mark.skipif(pa is None, reason="pyarrow is not installed")


# -- helpers --------------------------------------------------------------------------------


def local(data_dir, **app_settings) -> tuple[pipes.App, pipes.Settings]:
    app = pipes.App("files", **app_settings)
    return app, app.settings.override(broker=f"local://{data_dir}")


async def _run(app, settings, stop=None):
    try:
        return await pipes.runtime.run(app.build(settings), settings, until_done=stop is None, stop=stop)
    except pipes.BrokerError as e:  # the previous broker of the data dir is closed, not yet collected
        if "in use" not in str(e):
            raise
        gc.collect()
        return await pipes.runtime.run(app.build(settings), settings, until_done=stop is None, stop=stop)


def topic(data_dir, name="out") -> list[pipes.Message]:
    """The (JSON) messages on `name`, read from the data dir (read-only)."""
    gc.collect()
    broker = LocalBroker(str(data_dir), pipes.Settings(), read_only=True)
    try:
        return read_messages(broker, None, name) if name in broker.topics() else []
    finally:
        asyncio.run(broker.close())


def source_state(data_dir, node="files") -> dict:
    gc.collect()
    broker = LocalBroker(str(data_dir), pipes.Settings(), read_only=True)
    try:
        raw = broker.store.get("sources", node.encode())
        return pickle.loads(raw) if raw else {}
    finally:
        asyncio.run(broker.close())


def rows(messages) -> list[tuple]:
    """(value, path, offset or row) of each message."""
    return [(m.value, m.headers["path"].decode(), int((m.headers.get("offset") or m.headers["row"]).decode()))
            for m in messages]


# -- independent readers ------------------------------------------------------------------------


def expected_lines(path: str) -> list[tuple]:
    with open(path, "rb") as f:
        data = f.read()
    out, start = [], 0
    for raw in data.split(b"\n"):
        end = start + len(raw) + 1
        if start < len(data):
            out.append((raw.removesuffix(b"\r").decode(), path, start))
        start = end
    return out


def expected_jsonl(path: str) -> list[tuple]:
    return [(json.loads(v), p, o) for v, p, o in expected_lines(path) if v.strip()]


def expected_csv(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def expected_parquet(path: str) -> list[tuple]:
    return [(r, path, i) for i, r in enumerate(pq.read_table(path).to_pylist())]


def write_lines(path, n, start=0, width=40):
    with open(path, "w") as f:
        for i in range(start, start + n):
            f.write(f"{i:07d} " + "x" * (i % width) + "\n")


# -- each format ------------------------------------------------------------------------------


def test_lines_one_message_per_line_with_path_and_offset(tmp_path):
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    a.write_bytes(b"first\r\nsecond\n\nfourth after a blank\n" + "caf\u00e9 \u2603\n".encode())
    b.write_bytes(b"no line ending at the end")
    app = pipes.App("lines")
    app.source(Files(str(tmp_path / "*.log"), follow=False), to="out", name="files")
    got = rows(run_app(app).messages("out"))
    assert got == expected_lines(str(a)) + expected_lines(str(b))
    assert [v for v, _, _ in got] == ["first", "second", "", "fourth after a blank", "caf\u00e9 \u2603",
                                      "no line ending at the end"]


def test_jsonl_skips_blank_lines_and_a_bad_line_stops_naming_file_and_offset(tmp_path):
    good = tmp_path / "1.jsonl"
    good.write_text('{"a": 1}\n\n  \n{"a": [2, {"b": null}]}\n"just a string"\n')
    app = pipes.App("jsonl")
    app.source(Files(str(tmp_path / "*.jsonl"), "jsonl", follow=False), to="out", name="files")
    assert rows(run_app(app).messages("out")) == expected_jsonl(str(good))

    (tmp_path / "2.jsonl").write_text('{"ok": true}\n{"broken": \n')
    app = pipes.App("jsonl")
    app.source(Files(str(tmp_path / "*.jsonl"), "jsonl", follow=False), to="out", name="files")
    with pytest.raises(pipes.ProcessingError) as e:
        run_app(app)
    assert "2.jsonl" in str(e.value) and "at byte 13" in str(e.value) and "not JSON" in str(e.value)


def test_csv_rows_as_dicts_keyed_by_the_header(tmp_path):
    f = tmp_path / "people.csv"
    f.write_bytes(b'\xef\xbb\xbfid,name,note\r\n1,Ann,"says ""hi"""\r\n2,Bob,"two\nlines"\r\n\r\n3,"Chl, oe",\r\n4,Dan')
    app = pipes.App("csv")
    app.source(Files(str(f), "csv", follow=False), to="out", name="files")
    msgs = run_app(app).messages("out")
    assert [m.value for m in msgs] == expected_csv(str(f))
    assert [m.value["name"] for m in msgs] == ["Ann", "Bob", "Chl, oe", "Dan"]
    assert msgs[1].value["note"] == "two\nlines"
    # The offset is where each row starts.
    data = f.read_bytes()
    assert [data[int(m.headers["offset"]):].split(b",")[0] for m in msgs] == [b"1", b"2", b"3", b"4"]


@needs_pyarrow
def test_parquet_rows_as_dicts_read_in_batches(tmp_path, monkeypatch):
    monkeypatch.setattr("pipes.io.files._PARQUET_BATCH", 7)  # batches across row groups
    table = pa.table({"id": list(range(50)), "name": [f"n{i}" for i in range(50)],
                      "score": [i / 3 if i % 4 else None for i in range(50)]})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=16)
    pq.write_table(table.slice(10, 5), tmp_path / "b.parquet")
    app = pipes.App("pq")
    app.source(Files(str(tmp_path / "*.parquet"), "parquet", follow=False), to="out", name="files")
    got = rows(run_app(app).messages("out"))
    assert got == expected_parquet(str(tmp_path / "a.parquet")) + expected_parquet(str(tmp_path / "b.parquet"))


# -- resuming -------------------------------------------------------------------------------


def _make(fmt, d):
    """Three input files of `fmt` in `d` (bigger than the read chunk), and their expected rows."""
    paths = [str(d / f"in-{k}.{fmt}") for k in range(3)]
    if fmt == "lines":
        for k, p in enumerate(paths):
            write_lines(p, 9000, start=k * 9000)
        return paths, [r for p in paths for r in expected_lines(p)]
    if fmt == "csv":
        for k, p in enumerate(paths):
            with open(p, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["i", "text"])
                for i in range(k * 6000, (k + 1) * 6000):
                    w.writerow([i, f"row {i}" + ("\nwith a, \"quoted\" newline" if i % 7 == 0 else "")])
        return paths, [r for p in paths for r in expected_csv(p)]
    for k, p in enumerate(paths):
        pq.write_table(pa.table({"i": list(range(k * 6000, (k + 1) * 6000))}), p, row_group_size=1000)
    return paths, [r for p in paths for r in expected_parquet(p)]


@pytest.mark.parametrize("fmt", ["lines", "csv", pytest.param("parquet", marks=needs_pyarrow)])
def test_a_stopped_worker_resumes_mid_file_without_loss_or_duplicates(tmp_path, data_dir, fmt):
    paths, want = _make(fmt, tmp_path)
    total = len(want)
    stops = [total // 4] * 3  # messages each life sees before it is stopped

    def build(stop_at, stop):
        app, settings = local(data_dir, commit_every=250)
        app.source(Files(str(tmp_path / f"in-*.{fmt}"), fmt, follow=False), to="out", name="files")
        seen = []

        @app.sink("out", batch=100)
        def watch(values):
            seen.extend(values)
            if len(seen) >= stop_at:
                stop.set()

        return app, settings

    positions = []
    for stop_at in stops:
        async def life():
            stop = asyncio.Event()
            app, settings = build(stop_at, stop)
            await _run(app, settings, stop)

        asyncio.run(life())
        positions.append(source_state(data_dir))
    app, settings = build(10 ** 9, asyncio.Event())
    asyncio.run(_run(app, settings))

    # Each stop left the source in the middle of a file, at a position further on.
    for saved in positions:
        assert not saved["done"] and saved["state"]["path"] in paths and saved["state"]["offset"] > 0
        size = os.path.getsize(saved["state"]["path"]) if fmt != "parquet" else 6000
        assert saved["state"]["offset"] < size
    assert [(p["state"]["path"], p["state"]["offset"]) for p in positions] == sorted(
        (p["state"]["path"], p["state"]["offset"]) for p in positions)
    got = topic(data_dir)
    if fmt == "csv":
        assert [m.value for m in got] == want
    else:
        assert rows(got) == want


# -- following --------------------------------------------------------------------------------


async def _until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_follow_picks_up_appended_lines_and_new_files_and_holds_back_a_partial_line(tmp_path, data_dir):
    a, b = tmp_path / "2024-01-01.log", tmp_path / "2024-01-02.log"
    a.write_bytes(b"a1\na2\npart")  # a writer is still appending to the last line
    seen = []

    async def main():
        stop = asyncio.Event()
        app, settings = local(data_dir, commit_interval=0.02)
        app.source(Files(str(tmp_path / "*.log"), poll=0.02), to="out", name="files")
        app.sink("out", seen.append, name="watch")
        task = asyncio.create_task(_run(app, settings, stop))
        await _until(lambda: len(seen) == 2)
        await asyncio.sleep(0.3)  # a dozen polls: the partial line stays back
        assert seen == ["a1", "a2"]
        with open(a, "ab") as f:
            f.write(b"ial\na3\n")
        await _until(lambda: len(seen) == 4)
        assert seen[2:] == ["partial", "a3"]
        b.write_bytes(b"b1\nb2")  # a newer file: "a" is finished, "b" followed
        await _until(lambda: len(seen) == 5)
        with open(a, "ab") as f:
            f.write(b"too late\n")  # "a" is finished: not read again
        await asyncio.sleep(0.2)
        assert seen[4:] == ["b1"]
        stop.set()
        await task

    asyncio.run(main())
    saved = source_state(data_dir)
    assert saved["state"] == {"path": str(b), "offset": 3, "done": False}

    # Restarted without following: "b" is read from where it was, its last line included.
    app, settings = local(data_dir)
    app.source(Files(str(tmp_path / "*.log"), follow=False), to="out", name="files")
    asyncio.run(_run(app, settings))
    assert [m.value for m in topic(data_dir)] == ["a1", "a2", "partial", "a3", "b1", "b2"]
    assert [m.headers["offset"] for m in topic(data_dir)] == [b"0", b"3", b"6", b"14", b"0", b"3"]


# -- after= -----------------------------------------------------------------------------------


def test_after_delete_deletes_a_file_only_once_the_checkpoint_covering_it_is_durable(
        tmp_path, data_dir, monkeypatch):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    paths = [str(inbox / f"{k}.jsonl") for k in range(3)]
    for k, p in enumerate(paths):
        with open(p, "w") as f:
            f.writelines(json.dumps({"f": k, "i": i}) + "\n" for i in range(400))
    want = [r for p in paths for r in expected_jsonl(p)]

    # Watch every commit: which files exist, and what the source's checkpoint says.
    commits = []
    real_commit = LocalBroker.commit

    async def commit(self, group, changes):
        before = {p for p in paths if os.path.exists(p)}
        await real_commit(self, group, changes)
        if "files" in changes.sources:
            state = pickle.loads(changes.sources["files"])["state"]
            commits.append((before, set(state.get("finished", ()))))

    monkeypatch.setattr(LocalBroker, "commit", commit)
    app, settings = local(data_dir, commit_every=100)
    app.source(Files(str(inbox / "*.jsonl"), "jsonl", follow=False, after="delete"), to="out", name="files")
    asyncio.run(_run(app, settings))

    assert rows(topic(data_dir)) == want
    assert os.listdir(inbox) == []
    deleted: set = set()
    for existing, finished in commits:
        # A file is there until the commit after the one that made its end durable.
        assert existing == set(paths) - deleted
        deleted |= finished
    assert deleted == set(paths)
    assert len(commits) > 10


def test_after_move_a_crash_between_the_checkpoint_and_the_move_is_made_good_on_restart(
        tmp_path, data_dir, monkeypatch):
    inbox, done = tmp_path / "inbox", tmp_path / "done"
    inbox.mkdir()
    for k in range(3):
        (inbox / f"{k}.txt").write_text(f"{k}-a\n{k}-b\n")
    (done / "sub").mkdir(parents=True)
    (done / "0.txt").write_text("an older file of the same name\n")

    # First life: its checkpoints become durable, but it "dies" before it moves any file.
    monkeypatch.setattr(Files, "committed", lambda self, state: None)
    seen = []

    async def first_life():
        stop = asyncio.Event()
        app, settings = local(data_dir, commit_interval=0.02)
        app.source(Files(str(inbox / "*.txt"), poll=0.02, after=f"move:{done}"), to="out", name="files")
        app.sink("out", seen.append, name="watch")
        task = asyncio.create_task(_run(app, settings, stop))
        await _until(lambda: len(seen) == 6)
        stop.set()
        await task

    asyncio.run(first_life())
    assert sorted(os.listdir(inbox)) == ["0.txt", "1.txt", "2.txt"]
    # 2.txt, the newest, is still followed; the other two are finished in the durable checkpoint.
    state = source_state(data_dir)["state"]
    assert state["finished"] == [str(inbox / "0.txt"), str(inbox / "1.txt")] and state["path"] == str(inbox / "2.txt")

    # Restarted (not following): those two are moved, nothing is read twice, and 2.txt,
    # finished now, is moved at the end.
    monkeypatch.undo()
    app, settings = local(data_dir)
    app.source(Files(str(inbox / "*.txt"), follow=False, after=f"move:{done}"), to="out", name="files")
    asyncio.run(_run(app, settings))
    assert [m.value for m in topic(data_dir)] == ["0-a", "0-b", "1-a", "1-b", "2-a", "2-b"]
    assert os.listdir(inbox) == []
    assert sorted(os.listdir(done)) == ["0.txt", "0.txt.1", "1.txt", "2.txt", "sub"]
    assert (done / "0.txt").read_text() == "an older file of the same name\n"
    assert (done / "0.txt.1").read_text() == "0-a\n0-b\n"


def test_after_with_follow_reads_files_arriving_in_any_name_order(tmp_path, data_dir):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "m.txt").write_text("m\n")
    seen = []

    async def main():
        stop = asyncio.Event()
        app, settings = local(data_dir, commit_interval=0.02)
        app.source(Files(str(inbox / "*.txt"), poll=0.02, after="delete"), to="out", name="files")
        app.sink("out", seen.append, name="watch")
        task = asyncio.create_task(_run(app, settings, stop))
        await _until(lambda: seen == ["m"])
        (inbox / "a.txt").write_text("a\n")  # sorts before m.txt, arrives after it
        await _until(lambda: seen == ["m", "a"])
        await _until(lambda: not (inbox / "m.txt").exists())  # finished and durable
        await asyncio.sleep(0.2)
        assert (inbox / "a.txt").exists()  # the newest file is followed, not deleted
        stop.set()
        await task

    asyncio.run(main())
    assert [m.value for m in topic(data_dir)] == ["m", "a"]


# -- sinks ------------------------------------------------------------------------------------


def test_csv_sink_writes_a_header_once_and_rows_readable_by_csv(tmp_path):
    out = tmp_path / "out" / "people.csv"
    values = [{"id": i, "name": f"n,{i}", "tags": ["x", i] if i % 2 else None} for i in range(5)]
    app = pipes.App("csvsink")
    app.source(values, to="people", name="people_in")
    app.sink("people", CSV(str(out)))
    run_app(app)
    run_app(app)  # again: appended under the same header
    got = expected_csv(str(out))
    want = [{"id": str(v["id"]), "name": v["name"], "tags": json.dumps(v["tags"], separators=(",", ":"))
             if v["tags"] else ""} for v in values]
    assert got == want + want
    assert out.read_text().count("id,name,tags") == 1

    # A row cut short by a crash (never committed) is removed when the sink opens again.
    with open(out, "a") as f:
        f.write("9,half a ro")
    app = pipes.App("csvsink")
    app.source([{"id": 10, "name": "x"}], to="people", name="people_in")
    app.sink("people", CSV(str(out)))
    run_app(app)
    assert expected_csv(str(out))[-1] == {"id": "10", "name": "x", "tags": ""}
    assert "half" not in out.read_text()


def test_csv_sink_rejects_a_column_not_in_the_header_into_the_dlq(tmp_path):
    out = tmp_path / "t.csv"
    app = pipes.App("csvsink")
    app.source([{"a": 1}, {"a": 2, "b": 3}], to="t", name="t_in")
    app.sink("t", CSV(str(out), columns=["a"]), batch=1)
    result = run_app(app)
    assert expected_csv(str(out)) == [{"a": "1"}]
    assert [m.value for m in result.messages("t.dlq")] == [{"a": 2, "b": 3}]


@needs_pyarrow
def test_parquet_sink_renames_part_files_into_place_only_at_flush(tmp_path):
    sink = Parquet(str(tmp_path / "pq"), rows_per_file=10)
    sink.open()
    sink.write([{"i": i, "s": str(i)} for i in range(25)])
    assert [n for n in os.listdir(tmp_path / "pq") if n.endswith(".parquet")] == []  # all staged
    sink.flush()
    parts = sorted(n for n in os.listdir(tmp_path / "pq") if n.endswith(".parquet"))
    assert parts == ["part-000000001.parquet", "part-000000002.parquet", "part-000000003.parquet"]
    assert [pq.read_metadata(tmp_path / "pq" / p).num_rows for p in parts] == [10, 10, 5]
    sink.write([{"i": 99, "s": "dropped"}])  # staged, never flushed
    sink.close()
    read = pq.read_table(tmp_path / "pq").to_pylist()  # pyarrow's own dataset reader
    assert read == [{"i": i, "s": str(i)} for i in range(25)]

    # Through the runtime, a worker started again numbers its parts after the existing ones.
    app = pipes.App("pqsink")
    app.source([{"i": 100 + i} for i in range(3)] + ["not a dict"], to="t", name="t_in")
    app.sink("t", Parquet(str(tmp_path / "pq")))
    run_app(app)
    assert sorted(os.listdir(tmp_path / "pq"))[-1] == "part-000000004.parquet"
    assert pq.read_table(tmp_path / "pq" / "part-000000004.parquet").to_pylist() == [
        {"i": 100, "value": None}, {"i": 101, "value": None}, {"i": 102, "value": None},
        {"i": None, "value": "not a dict"}]


@needs_pyarrow
def test_parquet_sink_output_read_back_by_the_files_source(tmp_path):
    values = [{"n": i, "sq": i * i} for i in range(30)]
    app = pipes.App("roundtrip")
    app.source(values, to="t", name="t_in")
    app.sink("t", Parquet(str(tmp_path / "pq"), rows_per_file=7))
    run_app(app)
    app = pipes.App("roundtrip")
    app.source(Files(str(tmp_path / "pq" / "*.parquet"), "parquet", follow=False), to="t", name="files")
    assert run_app(app)["t"] == values
