"""Value and key serializers: the built-in ones by name, custom ones, and through a topic."""

from __future__ import annotations

import datetime
import decimal
import fractions

import pytest

import pipes
from pipes.serializers import SERIALIZERS, SerializationError, resolve
from pipes.testing import run_app


def roundtrip(name, value):
    s = resolve(name)
    raw = s.dumps(value)
    assert isinstance(raw, bytes)
    return s.loads(raw)


@pytest.mark.parametrize("value", [
    {"id": 1, "customer": "c1", "amount": 1.5, "tags": ["a", "b"], "ok": True, "none": None},
    [1, "two", 3.0, None],
    "ünïcode",
    -7,
    0.1,
    None,
])
def test_json_roundtrip(value):
    assert roundtrip("json", value) == value


def test_json_is_compact_utf8_and_accepts_non_str_keys():
    assert resolve("json").dumps({"a": "é"}) == '{"a":"é"}'.encode()
    assert roundtrip("json", {1: "x"}) == {"1": "x"}


def test_json_outputs_are_right_sized_copies():
    # orjson's own result keeps a 4 KiB buffer; outputs wait for the checkpoint in memory.
    import tracemalloc

    dumps = resolve("json").dumps
    tracemalloc.start()
    try:
        kept = [dumps({"id": i, "user": f"u{i}", "nested": [{1: i}]}) for i in range(1000)]
        size, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kept[7] == b'{"id":7,"user":"u7","nested":[{"1":7}]}'
    assert size < 1000 * 200


def test_json_rejects_what_it_cannot_encode():
    with pytest.raises(TypeError):
        resolve("json").dumps({1, 2})


@pytest.mark.parametrize("value,expected", [("héllo", "héllo"), (42, "42"), (b"raw", "raw")])
def test_str_roundtrip(value, expected):
    assert roundtrip("str", value) == expected


@pytest.mark.parametrize("value", [b"\x00\xff\x10", bytearray(b"ab"), memoryview(b"cd")])
def test_bytes_roundtrip(value):
    out = roundtrip("bytes", value)
    assert type(out) is bytes and out == bytes(value)


def test_bytes_takes_str_and_refuses_others():
    assert roundtrip("bytes", "hé") == "hé".encode()
    with pytest.raises(SerializationError, match="int"):
        resolve("bytes").dumps(5)


def test_pickle_roundtrip_keeps_python_types():
    value = {"when": datetime.datetime(2024, 1, 2, 3, 4, 5), "d": decimal.Decimal("1.10"),
             "set": {1, 2}, "tuple": (1, (2, 3)), "frac": fractions.Fraction(1, 3), b"k": b"v"}
    out = roundtrip("pickle", value)
    assert out == value
    assert type(out["tuple"]) is tuple and type(out["set"]) is set


def test_msgpack_roundtrip():
    value = {"a": [1, 2, {"b": b"\x00bin"}], "s": "ünï", "f": 1.25, "n": None, "t": True}
    assert roundtrip("msgpack", value) == value
    assert roundtrip("msgpack", (1, 2)) == [1, 2]  # msgpack has arrays, not tuples


def test_every_built_in_name_is_known():
    assert set(SERIALIZERS) == {"json", "str", "bytes", "pickle", "msgpack"}
    for name, s in SERIALIZERS.items():
        assert s.name == name and resolve(name) is s


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError) as e:
        resolve("yaml")
    text = str(e.value)
    assert "'yaml'" in text and "pipes.Serializer" in text
    for name in SERIALIZERS:
        assert repr(name) in text
    with pytest.raises(ValueError, match="unknown value serializer"):
        resolve(None, what="value serializer")


def test_custom_serializer_is_accepted_as_it_is():
    rot = pipes.Serializer("rot13", lambda v: v.translate(_ROT).encode(), lambda b: b.decode().translate(_ROT))
    assert resolve(rot) is rot
    assert rot.dumps("hello") == b"uryyb"
    assert roundtrip(rot, "hello") == "hello"


_ROT = str.maketrans("abcdefghijklmnopqrstuvwxyz", "nopqrstuvwxyzabcdefghijklm")


# -- through topics -----------------------------------------------------------------------


@pytest.mark.parametrize("name,value", [
    ("json", {"a": [1, 2]}),
    ("msgpack", {"a": [1, 2], "b": b"\x00"}),
    ("pickle", {"when": datetime.date(2024, 5, 6), "s": frozenset({1})}),
    ("str", "plain text"),
    ("bytes", b"\x00\x01"),
])
def test_values_cross_topics_with_their_serializer(name, value):
    app = pipes.App("ser")
    app.topic("in", value_serializer=name)
    app.topic("out", value_serializer=name)
    seen = []

    @app.transform("in", to="out")
    def same(v):
        seen.append(v)
        return v

    result = run_app(app, {"in": [value]})
    assert seen == [value]
    assert result["out"] == [value]


def test_a_custom_serializer_encodes_what_is_stored():
    calls = []

    def dumps(v):
        calls.append(v)
        return f"<{v}>".encode()

    def loads(b):
        text = b.decode()
        assert text[0] == "<" and text[-1] == ">"
        return int(text[1:-1])

    angle = pipes.Serializer("angle", dumps, loads)
    app = pipes.App("ser")
    app.topic("in", value_serializer=angle)
    app.topic("out", value_serializer=angle, key_serializer=angle)

    @app.transform("in", to="out", key=lambda v: v % 2)
    def add_ten(v):
        return v + 10

    result = run_app(app, {"in": [1, 2, 3]})
    assert result["out"] == [11, 12, 13]
    assert [m.key for m in result.messages("out")] == [1, 0, 1]
    assert sorted(calls) == sorted([1, 2, 3, 11, 12, 13, 1, 0, 1])  # inputs, outputs, keys


def test_a_value_the_serializer_cannot_encode_goes_to_the_dlq():
    app = pipes.App("ser")

    @app.transform("in", to="out")
    def to_set(v):
        return {v} if v == 2 else v

    result = run_app(app, {"in": [1, 2, 3]})
    assert result["out"] == [1, 3]
    assert result["in.dlq"] == [2]
    assert result.messages("in.dlq")[0].headers["pipes.error.node"] == b"to_set"
