"""YAML pipelines: `pipes run`, `pipes lint` and `pipes test` on the example files and on
pipelines written here."""

from __future__ import annotations

import codecs
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import orjson
import pytest

from pipes.cli import main

ROOT = Path(__file__).parent.parent
EXAMPLES = ROOT / "apps" / "pipelines"
PIPES = str(Path(sys.executable).parent / "pipes")


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def run(capsys, *argv: str) -> tuple[int, list[str], str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def test_rot13_from_stdin():
    phrase = "My voice is my passport"
    proc = subprocess.run([PIPES, "run", str(EXAMPLES / "rot13.yaml")], input=phrase + "\n", capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert [orjson.loads(line) for line in proc.stdout.splitlines()] == [
        {"original": phrase, "encoded": codecs.encode(phrase, "rot_13")}]
    assert proc.stdout.strip() != "" and "Zl ibvpr vf zl cnffcbeg" in proc.stdout


@pytest.mark.parametrize("example, lines", [
    ("python_object.yaml", ["Dave"]),
    ("python_list.yaml", [str(i) for i in range(10)]),
    ("python_generator.yaml", [str(i) for i in range(10)]),
    ("python_function.yaml", [str(i) for i in range(10)]),
])
def test_python_inputs(capsys, example, lines):
    code, out, err = run(capsys, "run", str(EXAMPLES / example))
    assert code == 0, err
    assert out == lines


def test_a_function_with_state_resumes_after_a_restart(tmp_path):
    """Stopped midway (SIGTERM while the function waits), the run resumes from the state the
    function left in its checkpoint: the outputs continue without repeats."""
    pause = tmp_path / "pause"
    pause.touch()
    out = tmp_path / "out.txt"
    path = write(tmp_path, f"""
        input:
          python:
            name: fetch
            script: |
              import os, time
              def fetch(state):
                  i = state.get("i", 0)
                  if i == 10:
                      return None
                  while i == 5 and os.path.exists({str(pause)!r}):
                      time.sleep(0.01)
                  state["i"] = i + 1
                  return i
        output:
          file:
            path: {out}
        broker: local://{tmp_path / 'data'}
        """)
    argv = [PIPES, "run", path]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (out.exists() and len(out.read_text().splitlines()) >= 5):
        if first.poll() is not None or time.monotonic() > deadline:
            first.kill()
            pytest.fail(f"the first run ended or stalled: {first.communicate()}")
        time.sleep(0.02)
    time.sleep(0.2)
    first.send_signal(signal.SIGTERM)
    _, first_err = first.communicate(timeout=30)
    assert first.returncode == 0, first_err
    assert out.read_text().splitlines() == ["0", "1", "2", "3", "4"]
    pause.unlink()
    second = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0, second.stderr
    assert out.read_text().splitlines() == [str(i) for i in range(10)]
    third = subprocess.run(argv, capture_output=True, text=True, timeout=60)  # finished: nothing again
    assert third.returncode == 0, third.stderr
    assert out.read_text().splitlines() == [str(i) for i in range(10)]


def test_pickle_serializer_and_unpickle(capsys):
    code, out, err = run(capsys, "run", str(EXAMPLES / "pickle.yaml"))
    assert code == 0, err
    assert out == ["Maple is 8", "Moxie is 3"]


def test_serializer_none_passes_live_objects_to_global_processors(capsys):
    code, out, err = run(capsys, "run", str(EXAMPLES / "live_objects.yaml"))
    assert code == 0, err
    assert [orjson.loads(line) for line in out] == [{"kind": "Point", "sum": 3}, {"kind": "Point", "sum": 7}]


def test_serializer_none_needs_memory_and_global_mode(tmp_path, capsys):
    base = """
        input:
          python: {name: x, serializer: none, script: "x = [1]"}
        pipeline:
          processors:
            - python: {script: "root = this", mode: MODE}
        output:
          stdout: {}
        """
    path = write(tmp_path, base.replace("MODE", "global"))
    code, _, err = run(capsys, "run", path, "--broker", f"local://{tmp_path / 'd'}")
    assert code == 2 and "serializer: none passes live objects" in err
    path = write(tmp_path, base.replace("MODE", "isolated"))
    code, _, err = run(capsys, "run", path)
    assert code == 2 and "mode: isolated takes messages as bytes" in err


def test_batches_of_5_5_and_1(capsys):
    code, out, err = run(capsys, "run", str(EXAMPLES / "batching.yaml"))
    assert code == 0, err
    rows = [orjson.loads(line) for line in out]
    assert [r["i"] for r in rows] == list(range(11))
    assert [r["batch_size"] for r in rows] == [5] * 10 + [1]
    assert [r["batch_index"] for r in rows] == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0]


def test_errors_reach_catch_and_the_rest_pass(capsys, caplog):
    code, out, err = run(capsys, "run", str(EXAMPLES / "errors.yaml"))
    assert code == 0, err
    rows = [orjson.loads(line) for line in out]
    values = [4, 2, 0, 1, 0]
    assert len(rows) == len(values)
    for v, row in zip(values, rows):
        if v:
            assert row == {"result": 8 // v}
        else:
            assert row["failed"] == "0"
            assert row["error"].startswith("ZeroDivisionError: integer division or modulo by zero (")
            assert row["error"].endswith("errors.yaml:13)")
    logged = [r.getMessage() for r in caplog.records if "ZeroDivisionError" in r.getMessage()]
    assert len(logged) == 2  # the first error with its traceback, then the count at the end
    assert "Traceback" in logged[0] and 'errors.yaml", line 13' in logged[0]
    assert logged[1].endswith("2 ZeroDivisionError flagged")


def test_switch_processors_and_outputs(capsys):
    code, out, err = run(capsys, "run", str(EXAMPLES / "switch.yaml"))
    assert code == 0, err
    assert [orjson.loads(line) for line in out] == [{"kind": "order", "amount": 250, "big": True},
                                                   {"kind": "refund", "amount": -40}]


def test_metadata_keeps_types(capsys):
    code, out, err = run(capsys, "run", str(EXAMPLES / "metadata.yaml"))
    assert code == 0, err
    assert [orjson.loads(line) for line in out] == [
        {"n": n, "even": n % 2 == 0, "keys": ["even", "n"]} for n in range(3)]


def test_fan_out_to_stdout_and_a_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "run", str(EXAMPLES / "fanout.yaml"))
    assert code == 0, err
    expected = [{"n": n} for n in range(3)]
    assert [orjson.loads(line) for line in out] == expected
    assert [orjson.loads(line) for line in (tmp_path / "out" / "fanout.jsonl").read_text().splitlines()] == expected


def test_file_input_lines_and_all_with_metadata(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("one\ntwo\n")
    (tmp_path / "b.txt").write_text("three\n")
    for codec, contents in (("lines", ["one", "two", "three"]), ("all", ["one\ntwo\n", "three\n"])):
        path = write(tmp_path, f"""
            input:
              file:
                paths: ["{tmp_path}/*.txt"]
                codec: {codec}
            pipeline:
              processors:
                - python:
                    script: |
                      root.text = content().decode()
                      root.path = metadata("path")
                      root.mtime = metadata("mod_time_unix")
                      root.iso = metadata("mod_time")
            output:
              stdout: {{}}
            """)
        code, out, err = run(capsys, "run", path)
        assert code == 0, err
        rows = [orjson.loads(line) for line in out]
        assert [r["text"] for r in rows] == contents
        assert {os.path.basename(r["path"]) for r in rows} == {"a.txt", "b.txt"}
        a = tmp_path / "a.txt"
        assert rows[0]["mtime"] == int(a.stat().st_mtime) and rows[0]["iso"].endswith("Z")


def test_generate_and_python_output(tmp_path, capsys):
    path = write(tmp_path, """
        input:
          generate:
            count: 4
            interval: ""
            script: |
              root = "hello world"
        output:
          python:
            script: |
              msg = content().decode()
              print(f"you said: '{msg}'")
        """)
    code, out, err = run(capsys, "run", path)
    assert code == 0, err
    assert out == ["you said: 'hello world'"] * 4


def test_lint_reports_unknown_fields_and_wrong_types_with_lines(tmp_path, capsys):
    path = write(tmp_path, """\
        input:
          python:
            name: g
            batch_size: five
            script: |
              g = [1]
        pipeline:
          processors:
            - python:
                script: "root = 1"
                wrokers: 2
            - nonsense: {}
        output:
          stdout: {}
          stdout_extra: 1
        """)
    code, _, err = run(capsys, "lint", path)
    assert code == 1
    lines = err.splitlines()
    assert f"{path}:4: input.python.batch_size: expected an integer, got text 'five'" in lines
    assert any(l.startswith(f"{path}:11: pipeline.processors[0].python: unknown field 'wrokers'") for l in lines)
    assert any(l.startswith(f"{path}:12: pipeline.processors[1]: unknown processor 'nonsense'") for l in lines)
    assert any(l.startswith(f"{path}:13: output: a output names exactly one component") for l in lines)
    code, out, err = run(capsys, "run", path)
    assert code == 2 and out == [] and "nothing was run" in err


def test_lint_knows_connectors_and_python_syntax(tmp_path, capsys):
    path = write(tmp_path, """\
        input:
          sse:
            url: http://127.0.0.1:1/stream
            retries: 3
        pipeline:
          processors:
            - python:
                script: |
                  x = 1
                  root = (
        output:
          kafka_topc: {url: "kafka://x", topic: t}
        """)
    code, _, err = run(capsys, "lint", path)
    assert code == 1
    assert f"{path}:4: input.sse: unknown field 'retries'" in err
    assert f"{path}:12: output: unknown output 'kafka_topc' (known: " in err and "kafka_topic" in err
    assert f"{path}:10: pipeline.processors[0].python.script: invalid Python" in err
    assert run(capsys, "lint", str(EXAMPLES / "rot13.yaml"))[0] == 0


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_examples_lint_clean(capsys, example):
    code, _, err = run(capsys, "lint", str(EXAMPLES / example))
    assert code == 0, err


def test_the_rot13_example_passes_its_tests(capsys):
    code, out, _ = run(capsys, "test", str(EXAMPLES / "rot13.yaml"))
    assert code == 0, out
    assert out == ["PASS encodes a line", "PASS keeps metadata", "2 passed, 0 failed"]


def test_a_key_given_twice_is_an_error(tmp_path, capsys):
    path = write(tmp_path, """\
        input:
          stdin: {}
        output:
          stdout: {}
        output:
          drop: {}
        """)
    code, _, err = run(capsys, "lint", path)
    assert code == 1 and f"{path}:5: 'output' is given twice (first on line 3)" in err


def test_pipes_test_passes_and_fails(tmp_path, capsys):
    tests = """
        tests:
          - name: encodes
            input_batch:
              - content: "hello"
                metadata: {source: t}
            output_batches:
              - - json_equals: {original: hello, encoded: uryyb}
                  json_contains: {encoded: uryyb}
                  metadata_equals: {source: t}
          - name: WRONG
            input_batch:
              - content: "abc"
              - content: "xyz"
            output_batches:
              - - content_equals: '{"original":"abc","encoded":"abc"}'
                - json_contains: {encoded: xyz}
        """
    rot13 = (EXAMPLES / "rot13.yaml").read_text().split("\ntests:")[0]
    path = write(tmp_path, rot13 + textwrap.dedent(tests))
    code, out, err = run(capsys, "test", path)
    assert code == 1, err
    assert out[0] == "PASS encodes"
    assert out[1] == "FAIL WRONG"
    assert "content_equals" in out[2] and "'{\"original\":\"abc\",\"encoded\":\"nop\"}'" in out[2]
    assert "json_contains" in out[3] and "'encoded': 'klm'" in out[3] and "want {'encoded': 'xyz'}" in out[3]
    assert out[-1] == "1 passed, 1 failed"
    passing = path.replace(".yaml", "_ok.yaml")
    Path(passing).write_text(Path(path).read_text().split("  - name: WRONG")[0])
    code, out, err = run(capsys, "test", passing)
    assert code == 0, out
    assert out == ["PASS encodes", "1 passed, 0 failed"]


@pytest.mark.parametrize("mode", ["isolated", "isolated_legacy", "process"])
def test_pooled_modes(tmp_path, capsys, caplog, mode):
    path = write(tmp_path, f"""
        input:
          python: {{name: xs, batch_size: 4, script: "xs = list(range(20))"}}
        pipeline:
          processors:
            - python:
                mode: {mode}
                workers: 2
                script: |
                  if this == 3:
                      root = 1 / 0
                  root = [this * this, batch_index(), batch_size()]
            - catch:
                - python:
                    script: |
                      root = error()
        output:
          stdout: {{}}
        """)
    code, out, err = run(capsys, "run", path)
    assert code == 0, err
    expected = [[i * i, i % 4, 4] for i in range(20)]
    assert [orjson.loads(line) if not line.startswith("ZeroDivisionError") else line for line in out] == [
        e if i != 3 else f"ZeroDivisionError: division by zero ({path}:11)" for i, e in enumerate(expected)]
    assert any("Traceback" in r.getMessage() and f'{path}", line 11' in r.getMessage() for r in caplog.records)


def test_log_processor(tmp_path, capsys, caplog):
    path = write(tmp_path, """
        input:
          python: {name: xs, script: "xs = [1, 2, 0]"}
        pipeline:
          processors:
            - log:
                level: WARN
                message: 'f"got {this} of {batch_size()}: {10 // this}"'
            - log: {}
        output:
          drop: {}
        """)
    code, _, err = run(capsys, "run", path)
    assert code == 0, err
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.getMessage().startswith("got")]
    assert warned == ["got 1 of 1: 10", "got 2 of 1: 5"]
    assert [r.getMessage() for r in caplog.records if r.levelname == "INFO" and len(r.getMessage()) == 1] == ["1", "2", "0"]
    assert any("ZeroDivisionError" in r.getMessage() and "nothing was logged for it" in r.getMessage()
               for r in caplog.records)
