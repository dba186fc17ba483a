"""pipes.io.Dataset on the real file system: the continuous writer (staged rows invisible
until checkpoint(state), get_state() after a restart, close(failed=True) and exceptions
dropping staged rows, a crashed writer process) and the Dataset sink, exactly-once across
SIGKILLed worker processes, checked against the input files read independently."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter

import orjson
import pytest

import pipes
from pipes.io.dataset import Dataset
from pipes.testing import run_app

FORMATS = ["parquet", "jsonl", "csv"]


def fmt_param(fmt):
    return pytest.param(fmt, marks=pytest.mark.skipif(
        fmt == "parquet" and not _has_pyarrow(), reason="pyarrow is not installed"))


def _has_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


ALL = [fmt_param(f) for f in FORMATS]


def as_written(fmt, rows):
    """Rows as `fmt` gives them back: CSV cells are text, None an empty cell."""
    if fmt != "csv":
        return rows
    return [{k: "" if v is None else str(v) for k, v in r.items()} for r in rows]


def visible_parts(path) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.startswith("part-"))


# -- the continuous writer ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ALL)
def test_rows_are_invisible_until_checkpoint_then_visible_with_the_state(tmp_path, fmt):
    path = tmp_path / "events"
    ds = Dataset(str(path), fmt, rows_per_file=4)
    rows = [{"id": i, "name": f"n{i}"} for i in range(10)]
    with ds.writer() as w:
        assert w.get_state() is None
        for r in rows[:6]:
            w.write_row_dict(r)
        assert list(ds.read()) == [] and ds.get_state() is None and visible_parts(path) == []
        w.checkpoint({"position": 6})
        assert list(ds.read()) == as_written(fmt, rows[:6])
        assert ds.get_state() == {"position": 6} and w.get_state() == {"position": 6}
        assert len(visible_parts(path)) == 2  # 4 + 2 rows
        for r in rows[6:]:
            w.write_tuple((r["id"], r["name"]))  # columns learned from the first row
        assert list(ds.read()) == as_written(fmt, rows[:6])
        w.checkpoint({"position": 10})
    assert list(ds.read()) == as_written(fmt, rows)
    assert not (path / "_staging").exists()

    # A new writer (a restart) gets the last state back, and goes on from there.
    again = Dataset(str(path), fmt)
    with again.writer() as w:
        assert w.get_state() == {"position": 10}
        w.write_row_dict({"id": 10, "name": "n10"})
        w.checkpoint({"position": 11})
    assert list(Dataset(str(path), fmt).read()) == as_written(fmt, rows + [{"id": 10, "name": "n10"}])


@pytest.mark.parametrize("fmt", ALL)
def test_close_failed_and_an_exception_in_the_with_block_drop_the_staged_rows(tmp_path, fmt):
    path = str(tmp_path / "ds")
    ds = Dataset(path, fmt)
    with ds.writer() as w:
        w.write_row_dict({"a": 1})
        w.checkpoint("s1")

    w = ds.writer()
    w.write_row_dict({"a": 2})
    w.close(failed=True)
    with pytest.raises(ZeroDivisionError):
        with ds.writer() as w:
            w.write_row_dict({"a": 3})
            1 / 0
    assert list(ds.read()) == as_written(fmt, [{"a": 1}]) and ds.get_state() == "s1"
    assert not os.path.exists(os.path.join(path, "_staging"))

    # Leaving the block normally commits what was written since the checkpoint, with the
    # last state.
    with ds.writer() as w:
        w.write_row_dict({"a": 4})
    assert list(ds.read()) == as_written(fmt, [{"a": 1}, {"a": 4}]) and ds.get_state() == "s1"
    assert visible_parts(path) == [f"part-00000000{i}.{fmt}" for i in (1, 2)]


def test_one_writer_at_a_time_and_the_format_is_checked(tmp_path):
    path = str(tmp_path / "ds")
    with Dataset(path, "jsonl").writer() as w:
        with pytest.raises(pipes.ConfigError, match="in use by another writer"):
            Dataset(path, "jsonl").writer()
        w.checkpoint(1)
    with pytest.raises(pipes.ConfigError, match="holds jsonl parts, not csv"):
        list(Dataset(path, "csv").read())
    with pytest.raises(pipes.ConfigError, match="format='xml'"):
        Dataset(path, "xml")


@pytest.mark.parametrize("fmt", ALL)
def test_write_dataframe_and_new_columns(tmp_path, fmt):
    pa = pytest.importorskip("pyarrow")
    ds = Dataset(str(tmp_path / "ds"), fmt, columns=["x", "y"])
    with ds.writer() as w:
        w.write_dataframe(pa.table({"x": [1, 2], "y": ["a", "b"]}))
        w.write_tuple((3, "c"))
        w.write_row_dict({"x": 4, "y": "d", "z": 1.5})  # a new column: a new part file
        w.checkpoint(None)
    want = [{"x": 1, "y": "a"}, {"x": 2, "y": "b"}, {"x": 3, "y": "c"}, {"x": 4, "y": "d", "z": 1.5}]
    got = list(ds.read())
    if fmt == "parquet":  # rows converted to Arrow together share a schema: z is null
        assert got == [{"z": None, **r} for r in want]
    else:
        assert got == as_written(fmt, want)


def test_a_checkpoint_interrupted_before_its_parts_are_moved_is_completed(tmp_path, monkeypatch):
    path = str(tmp_path / "ds")
    ds = Dataset(path, "jsonl")
    with ds.writer() as w:
        w.write_row_dict({"n": 1})
        w.checkpoint("one")

    # The manifest is replaced (the commit), then the process fails before renaming the part.
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(dst).startswith("part-"):
            raise OSError("power cut")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    w = ds.writer()
    w.write_row_dict({"n": 2})
    with pytest.raises(OSError, match="power cut"):
        w.checkpoint("two")
    w._lock.close()  # the process is gone: so is its lock
    monkeypatch.undo()

    assert visible_parts(path) == ["part-000000001.jsonl"]
    assert list(ds.read()) == [{"n": 1}, {"n": 2}] and ds.get_state() == "two"  # committed: read from _staging
    with ds.writer() as w:  # the next writer moves it into place
        assert w.get_state() == "two"
    assert visible_parts(path) == ["part-000000001.jsonl", "part-000000002.jsonl"]
    assert list(ds.read()) == [{"n": 1}, {"n": 2}]


@pytest.mark.parametrize("fmt", ALL)
def test_a_killed_writer_process_leaves_only_what_it_checkpointed(tmp_path, fmt):
    path = str(tmp_path / "ds")
    script = textwrap.dedent(f"""
        import os, signal
        from pipes.io.dataset import Dataset
        with Dataset({path!r}, {fmt!r}, rows_per_file=50).writer() as w:
            start = w.get_state() or 0
            for i in range(start, start + 350):
                w.write_row_dict({{"i": i}})
                if i % 100 == 99:
                    w.checkpoint(i + 1)
            os.kill(os.getpid(), signal.SIGKILL)  # 50 rows staged since the last checkpoint
    """)
    for life in range(2):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
        assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    # The second life resumed from the last state, so rows 300..349, staged by both lives,
    # were committed once.
    ds = Dataset(path, fmt)
    assert ds.get_state() == 600
    assert [int(r["i"]) for r in ds.read()] == list(range(600))
    if fmt != "parquet":  # (Parquet buffers rows in memory before it writes a row group)
        assert os.listdir(os.path.join(path, "_staging"))  # the killed life's staged part is there ...
    with ds.writer():
        pass
    assert not os.path.exists(os.path.join(path, "_staging"))  # ... until the next writer
    assert [int(r["i"]) for r in ds.read()] == list(range(600))


# -- as a sink ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ALL)
def test_as_a_sink_rows_are_committed_with_the_offsets_written(tmp_path, fmt):
    path = str(tmp_path / "ds")
    values = [{"i": i, "k": f"k{i % 3}"} for i in range(50)] + [7, "text"]
    app = pipes.App("dsink", partitions=2)
    app.source(values, to="rows", name="rows_in")
    app.sink("rows", Dataset(path, fmt))
    result = run_app(app)
    written = [m for m in result.messages("rows")]
    got = list(Dataset(path, fmt).read())
    want = as_written(fmt, [v if isinstance(v, dict) else {"value": v} for v in values])
    # Parts differ in columns (Parquet: and types): a row reads back with the other columns
    # of its part empty.
    clean = [{k: v for k, v in r.items() if v not in (None, "")} for r in got]
    assert Counter(orjson.dumps(r) for r in clean) == Counter(orjson.dumps(r) for r in want)
    offsets = Dataset(path, fmt).manifest()["offsets"]["rows"]
    last = {}
    for m in written:
        last[str(m.partition)] = max(last.get(str(m.partition), -1), m.offset)
    assert offsets == last


APP = textwrap.dedent("""
    import os, signal
    import pipes
    from pipes.io.dataset import Dataset
    from pipes.io.files import Files

    app = pipes.App("eo", partitions=3, commit_every=400, poll_records=300, commit_interval=0.05)
    app.source(Files(os.environ["INPUT"] + "/*.jsonl", "jsonl", follow=False), to="rows", name="files")


    @app.transform("rows", to="enriched")
    def enrich(row):
        return {**row, "even": row["i"] % 2 == 0}


    KIND, _, AT = os.environ.get("KILL", ":").partition(":")


    class Killing(Dataset):
        # SIGKILLs the worker at a chosen point: KILL=write:N in the first write after N
        # checkpoints (rows staged, not committed), KILL=flush:N in the N-th checkpoint,
        # once the dataset has committed and before pipes' checkpoint is durable.
        commits = 0

        def write(self, batch):
            super().write(batch)
            if KIND == "write" and self.commits >= int(AT):
                os.kill(os.getpid(), signal.SIGKILL)

        def flush(self):
            super().flush()
            Killing.commits += 1
            if KIND == "flush" and self.commits == int(AT):
                os.kill(os.getpid(), signal.SIGKILL)


    app.sink("enriched", Killing(os.environ["OUTPUT"], rows_per_file=1000))
""")

RUNNER = textwrap.dedent("""
    import asyncio, sys
    sys.path.insert(0, sys.argv[1])
    import pipes.runtime, eoapp
    s = eoapp.app.settings.override(broker="local://" + sys.argv[2])
    asyncio.run(pipes.runtime.run(eoapp.app.build(s), s, until_done=True))
""")


def test_as_a_sink_exactly_once_across_sigkilled_workers(tmp_path):
    pytest.importorskip("pyarrow")
    inputs, out, data = tmp_path / "in", tmp_path / "out", tmp_path / "data"
    inputs.mkdir()
    (tmp_path / "eoapp.py").write_text(APP)
    n = 0
    for f in range(4):
        with open(inputs / f"{f}.jsonl", "wb") as fh:
            for _ in range(6000):
                fh.write(orjson.dumps({"i": n, "f": f, "pad": "x" * (n % 13)}) + b"\n")
                n += 1
    want = Counter()
    for name in sorted(os.listdir(inputs)):  # the input, read independently
        with open(inputs / name, "rb") as fh:
            for line in fh:
                row = orjson.loads(line)
                want[orjson.dumps({**row, "even": row["i"] % 2 == 0})] += 1

    def start(kill=None):
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIPES_")}
        env.update(INPUT=str(inputs), OUTPUT=str(out), **({"KILL": kill} if kill else {}))
        return subprocess.Popen([sys.executable, "-c", RUNNER, str(tmp_path), str(data)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def committed_rows() -> int:
        m = Dataset(str(out)).manifest()
        return sum(o + 1 for o in m.get("offsets", {}).get("enriched", {}).values())

    rng = random.Random(7)
    lives = []
    # Killed by itself at chosen points of a checkpoint, then from outside at a random moment.
    # The first life's first three checkpoints hold no sink rows yet (files -> rows -> enriched
    # -> sink: each stage sees the last one's outputs once its checkpoint has landed).
    for kill in ("flush:4", "write:5", "flush:2", None):
        before = committed_rows()
        proc = start(kill)
        if kill is None:
            deadline = time.monotonic() + 30
            while committed_rows() < before + 2000:
                assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
                assert time.monotonic() < deadline
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.05))
            assert proc.poll() is None, "the worker finished before it could be killed"
            proc.kill()
        proc.wait(timeout=60)
        output = proc.stdout.read().decode()
        proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL, output[-3000:]
        lives.append((kill, before, committed_rows()))
        assert committed_rows() > before, lives  # every life got somewhere
    assert committed_rows() < n, f"all rows were written before the last kill: {lives}"

    final = start()
    assert final.wait(timeout=60) == 0, final.stdout.read().decode()[-3000:]
    final.stdout.close()

    got = Counter(orjson.dumps(r) for r in Dataset(str(out)).read())
    assert sum(got.values()) == n, f"{sum(got.values())} rows in the dataset, {n} in the input; lives {lives}"
    assert got == want, (f"{sum((want - got).values())} rows lost, {sum((got - want).values())} extra "
                         f"or duplicated; lives {lives}")
    assert sorted(os.listdir(out)) == ["_dataset.json", "_lock"] + visible_parts(out)
