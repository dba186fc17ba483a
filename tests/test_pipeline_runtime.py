"""How a YAML pipeline runs on pipes: one transform for the processors, batches flushed
when the input pauses, pipes.io connectors by name, topic-backed on Kafka."""

from __future__ import annotations

import asyncio
import textwrap
import time
import uuid
from pathlib import Path

import orjson

from pipes.cli import main
from pipes.pipeline import compile_pipeline, load
from pipes.pipeline.inputs import ThreadedInput
from pipes.script import Envelope


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_processors_are_one_transform_between_two_topics(tmp_path):
    path = write(tmp_path, """
        input:
          python: {name: x, script: "x = [1]"}
        pipeline:
          processors:
            - python: {script: "root = this + 1"}
            - python: {script: "root = this * 2"}
            - catch: [{python: {script: "root = 0"}}]
        output:
          stdout: {}
        """, "shape.yaml")
    doc, issues = load(path)
    assert issues == []
    graph = compile_pipeline(doc, path).app.build()
    assert [(n.kind, n.id, n.inputs, n.outputs) for n in graph.nodes()] == [
        ("source", "input", (), ("shape.input",)),
        ("transform", "pipeline", ("shape.input",), ("shape.output",)),
        ("sink", "output", ("shape.output",), ()),
    ]


def test_a_batch_filling_up_is_flushed_when_the_producer_pauses():
    gate = {"release": False}

    def produce(work):
        for i in range(5):
            while i == 2 and not gate["release"]:
                time.sleep(0.005)
            work["n"] = i + 1
            yield Envelope(str(i).encode())

    async def main_():
        source = ThreadedInput(produce, batch_size=3, batch_period=0.05)
        state: dict = {}
        started = time.monotonic()
        first = await source.read(state)
        waited = time.monotonic() - started
        first_state = dict(state)
        gate["release"] = True
        rest = []
        while (batch := await source.read(state)) is not None:
            rest.append(batch)
        return first, waited, first_state, rest, state

    first, waited, first_state, rest, state = asyncio.run(main_())
    assert [e.content for e in first] == [b"0", b"1"]  # not held until a third message
    assert 0.05 <= waited < 2
    assert first_state == {"n": 2}  # the state as of the batch's last message
    assert [[e.content for e in b] for b in rest] == [[b"2", b"3", b"4"]]
    assert state == {"n": 5}


def test_pipes_io_connectors_by_name(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"n": 1}\n{"n": 2}\n')
    out = tmp_path / "out.jsonl"
    path = write(tmp_path, f"""
        input:
          files:
            pattern: "{tmp_path}/in/*.jsonl"
            format: jsonl
            follow: false
        pipeline:
          processors:
            - python:
                script: |
                  root.n = this["n"] * 10
                  root.path = metadata("path")
        output:
          json_lines:
            path: {out}
        """)
    assert main(["run", path]) == 0, capsys.readouterr().err
    rows = [orjson.loads(line) for line in out.read_text().splitlines()]
    assert [r["n"] for r in rows] == [10, 20]
    assert rows[0]["path"].endswith("a.jsonl")


def test_topic_backed_on_kafka(kafka_url, tmp_path, capsys):
    name = f"kp{uuid.uuid4().hex[:8]}"
    path = write(tmp_path, """
        input:
          python:
            name: fetch
            batch_size: 3
            script: |
              def fetch(state):
                  i = state.get("i", 0)
                  if i == 7:
                      return None
                  state["i"] = i + 1
                  return {"i": i}
        pipeline:
          processors:
            - python:
                script: |
                  meta["square"] = this["i"] ** 2
            - python:
                script: |
                  root.i = this["i"]
                  root.square = metadata("square")
                  root.batch = batch_size()
                  meta["odd"] = this["i"] % 2 == 1
        output:
          python:
            script: |
              print(content().decode(), metadata("odd"))
        """, f"{name}.yaml")
    argv = ["run", path, "--broker", kafka_url, "--data-dir", str(tmp_path / "data")]
    assert main(argv) == 0, capsys.readouterr().err
    rows = [line.rsplit(" ", 1) for line in capsys.readouterr().out.splitlines()]
    assert [(orjson.loads(row), odd) for row, odd in rows] == [
        ({"i": i, "square": i * i, "batch": 3 if i < 6 else 1}, str(i % 2 == 1)) for i in range(7)]


def test_a_stopped_input_starts_again_from_the_state_it_is_given():
    """As after a rebalance: the pending read is cancelled, and the next read starts a new
    thread from the checkpointed state, not from where the old thread had got to."""

    def produce(work):
        while (i := work.get("i", 0)) < 6:
            work["i"] = i + 1
            if i == 3:
                time.sleep(0.3)  # still producing when the read is cancelled
            yield Envelope(str(i).encode())

    async def main_():
        source = ThreadedInput(produce, batch_size=2, batch_period=5)
        state: dict = {}
        first = await source.read(state)
        pending = asyncio.create_task(source.read(dict(state)))
        await asyncio.sleep(0.05)
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)
        checkpointed = dict(state)
        rest = []
        while (batch := await source.read(state)) is not None:
            rest.append(batch)
        return first, checkpointed, rest

    first, checkpointed, rest = asyncio.run(main_())
    assert [e.content for e in first] == [b"0", b"1"] and checkpointed == {"i": 2}
    assert [[e.content for e in b] for b in rest] == [[b"2", b"3"], [b"4", b"5"]]
