"""The script API of pipeline processors (pipes/script.py)."""

from __future__ import annotations

import pickle
from pathlib import Path

import orjson
import pytest

from pipes.script import Envelope, Root, Script, worker_handler


def run(source: str, content: bytes = b"", meta: dict | None = None, **kw) -> Envelope | None:
    return Script(source).apply(Envelope(content, meta or {}, **kw))


def test_root_attributes_build_nested_dicts():
    out = run("root.a.b = 1\nroot.name.first = 'Dave'\nroot['x'] = [1.5, True, None]")
    assert orjson.loads(out.content) == {"a": {"b": 1}, "name": {"first": "Dave"}, "x": [1.5, True, None]}


def test_reading_a_missing_attribute_creates_nothing():
    out = run("x = root.nothing\nif not root.other: root.y = 2")
    assert orjson.loads(out.content) == {"y": 2}


def test_untouched_root_keeps_the_content_and_metadata_changes_apply():
    out = run("meta['k'] = 3", b"\x00raw", {"old": "v"})
    assert out.content == b"\x00raw"
    assert out.meta == {"old": "v", "k": 3}


@pytest.mark.parametrize("value, content", [
    ("'text'", b"text"), ("b'\\x01bytes'", b"\x01bytes"), ("1.5", b"1.5"), ("True", b"true"),
    ("(1, 2)", b"[1,2]"), ("{'a': {'b': [1]}}", b'{"a":{"b":[1]}}'), ("0", b"0"),
])
def test_reassigned_root_is_raw_for_str_and_bytes_else_json(value, content):
    assert run(f"root = {value}", b"in").content == content


def test_root_none_drops_the_message():
    assert run("root = None", b"x") is None


def test_content_metadata_and_meta():
    src = ("root.c = content().decode()\nroot.k = metadata('k')\nroot.missing = metadata('nope')\n"
           "root.all = metadata()\nmeta['k'] = None\nmeta['n'] = 7\nmeta['f'] = 1.5")
    out = run(src, b"hello", {"k": "v", "j": 2})
    assert orjson.loads(out.content) == {"c": "hello", "k": "v", "missing": None, "all": {"k": "v", "j": 2}}
    assert out.meta == {"j": 2, "n": 7, "f": 1.5}  # None deleted; values keep their types


def test_this_is_decoded_json_or_the_live_object():
    assert orjson.loads(run("root.n = this['n'] + 1", b'{"n": 41}').content) == {"n": 42}
    script = Script("root.kind = type(this).__name__")
    assert orjson.loads(script.apply(Envelope(None, obj=object())).content) == {"kind": "object"}
    bad = run("root = this", b"not json")
    assert bad.error.startswith("ValueError: `this`: the content is not JSON")


def test_unpickle():
    out = run("root = sorted(unpickle())", pickle.dumps({3, 1, 2}))
    assert orjson.loads(out.content) == [1, 2, 3]


def test_leading_imports_and_definitions_run_once_and_functions_see_them():
    script = Script("import math\nclass Seen:\n    calls = []\ndef area(r):\n    return math.pi * r * r\n"
                    "Seen.calls.append(1)\nroot.calls = len(Seen.calls)\nroot.area = area(1)")
    outs = [orjson.loads(script.apply(Envelope(b"")).content) for _ in range(3)]
    assert [o["calls"] for o in outs] == [1, 2, 3]  # the class was made once
    assert outs[0]["area"] == pytest.approx(3.14159, rel=1e-5)


def test_each_message_gets_a_fresh_namespace():
    script = Script("root.had = 'x' in globals()\nx = 1")
    assert [orjson.loads(script.apply(Envelope(b"")).content)["had"] for _ in range(3)] == [False] * 3


def test_a_raising_script_flags_the_message_with_its_place_in_the_file():
    script = Script("x = 1\nroot.y = 1 / 0", filename="p.yaml", line=20)
    out = script.apply(Envelope(b"in", {"m": 1}))
    assert out.content == b"in" and out.meta == {"m": 1}
    assert out.error == "ZeroDivisionError: division by zero (p.yaml:21)"
    assert 'File "p.yaml", line 21' in out.trace


def test_checks_are_expressions_or_scripts_setting_root():
    expr = Script("this['a'] > 1", check=True)
    assert expr.check(Envelope(b'{"a": 2}')) is True
    assert expr.check(Envelope(b'{"a": 0}')) is False
    assert expr.check(Envelope(b'{"b": 0}')).error.startswith("KeyError")
    script = Script("v = this['a']\nroot = v % 2 == 0", check=True)
    assert [script.check(Envelope(str(n).encode().join([b'{"a":', b"}"]))) for n in (1, 2)] == [False, True]


def test_error_and_batch_position():
    out = Script("root = [error(), errored(), batch_index(), batch_size()]").apply(Envelope(b"", error="E: x"), 2, 5)
    assert orjson.loads(out.content) == ["E: x", True, 2, 5]


def test_root_is_a_dict():
    r = Root()
    r.a.b = 1
    assert r == {"a": {"b": 1}} and isinstance(r, dict)


def test_worker_handler_round_trip():
    handle = worker_handler(pickle.dumps(("root.n = this['n'] * 2\nif this['n'] == 2: root = None", "w.yaml", 1)))
    items = [pickle.dumps((orjson.dumps({"n": n}), {"i": n}, None, n, 3)) for n in range(3)]
    results = [pickle.loads(r) for r in handle(items)]
    assert results[0][:3] == (b'{"n":0}', {"i": 0}, None)
    assert results[1][:3] == (b'{"n":2}', {"i": 1}, None)
    assert results[2] is None


def test_worker_handler_runs_in_an_isolated_subinterpreter(tmp_path):
    interpreters = pytest.importorskip("_interpreters")
    path = Path(__file__).parent.parent / "pipes" / "script.py"
    out = tmp_path / "out.pickle"
    code = f"""
import importlib.util, pickle, sys
spec = importlib.util.spec_from_file_location("pipes_script", {str(path)!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
handle = module.worker_handler(pickle.dumps(("import json\\nroot.n = this['n'] + 1", "w.yaml", 1)))
result = handle([pickle.dumps((b'{{"n": 1}}', {{}}, None, 0, 1))])
open({str(out)!r}, "wb").write(pickle.dumps((result, "orjson" in sys.modules)))
"""
    interp = interpreters.create("isolated")
    try:
        failure = interpreters.run_string(interp, code)
    finally:
        interpreters.destroy(interp)
    assert failure is None, failure
    result, had_orjson = pickle.loads(out.read_bytes())
    assert pickle.loads(result[0])[0] == b'{"n":2}'
    assert not had_orjson  # orjson refuses isolated sub-interpreters: the json fallback ran
