"""The pipeline schema and its checker: unknown fields and wrong types, with line numbers.

A component is a mapping with one key naming it (``stdin: {}``, ``python: {...}``) and
optionally ``label``. Connectors of :mod:`pipes.io` are components too; their fields are
the keyword arguments of their classes.
"""

from __future__ import annotations

import ast
import inspect
import re
from dataclasses import dataclass, field
from typing import Any

from .loader import Map, Seq, line_of

MODES = ("global", "isolated", "isolated_legacy", "process")
# Redpanda Connect's log levels -> Python's
LEVELS = {"OFF": "CRITICAL", "NONE": "CRITICAL", "FATAL": "CRITICAL", "ERROR": "ERROR", "WARN": "WARNING",
          "WARNING": "WARNING", "INFO": "INFO", "DEBUG": "DEBUG", "TRACE": "DEBUG", "ALL": "DEBUG"}
SERIALIZERS = ("json", "pickle", "none")


@dataclass(frozen=True)
class Issue:
    line: int
    message: str

    def format(self, filename: str) -> str:
        return f"{filename}:{self.line}: {self.message}"


# -- types ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Type:
    name: str
    pytypes: tuple[type, ...] = ()
    nullable: bool = False

    def check(self, value: Any, at: int, path: str, issues: list[Issue]) -> None:
        if value is None and self.nullable:
            return
        if self.pytypes and (not isinstance(value, self.pytypes) or (bool not in self.pytypes and isinstance(value, bool))):
            issues.append(Issue(at, f"{path}: expected {self.name}, got {_kind(value)} {_short(value)}"))


@dataclass(frozen=True)
class Duration(Type):
    def check(self, value: Any, at: int, path: str, issues: list[Issue]) -> None:
        try:
            seconds(value)
        except ValueError as e:
            issues.append(Issue(at, f"{path}: {e}"))


@dataclass(frozen=True)
class Python(Type):
    """Python source; `at` is its first line. ``check=True``: an expression or a script."""

    check_expr: bool = False

    def check(self, value: Any, at: int, path: str, issues: list[Issue]) -> None:
        if not isinstance(value, str):
            issues.append(Issue(at, f"{path}: expected Python code (text), got {_kind(value)} {_short(value)}"))
            return
        if self.check_expr:
            try:
                ast.parse(value.strip(), mode="eval")
                return
            except SyntaxError:
                pass
        try:
            ast.parse(value)
        except SyntaxError as e:
            issues.append(Issue(at + (e.lineno or 1) - 1, f"{path}: invalid Python: {e.msg}"))


@dataclass(frozen=True)
class Enum(Type):
    choices: tuple[str, ...] = ()

    def check(self, value: Any, at: int, path: str, issues: list[Issue]) -> None:
        if value not in self.choices:
            issues.append(Issue(at, f"{path}: {_short(value)} is not one of {', '.join(self.choices)}"))


@dataclass(frozen=True)
class ListOf(Type):
    item: Any = None

    def check(self, value: Any, at: int, path: str, issues: list[Issue]) -> None:
        if not isinstance(value, list):
            issues.append(Issue(at, f"{path}: expected a list, got {_kind(value)} {_short(value)}"))
            return
        for i, v in enumerate(value):
            self.item.check(v, line_of(value, i), f"{path}[{i}]", issues)


@dataclass(frozen=True)
class Struct(Type):
    fields: dict[str, Any] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()  # accepted for compatibility, without effect

    def check(self, value: Any, at: int, path: str, issues: list[Issue]) -> None:
        if value is None and not self.required:
            return
        if not isinstance(value, dict):
            issues.append(Issue(at, f"{path}: expected a mapping, got {_kind(value)} {_short(value)}"))
            return
        for k, v in value.items():
            where = line_of(value, k)
            if k in self.fields:
                spec = self.fields[k]
                if isinstance(spec, Python) and isinstance(value, Map):
                    where = value.starts.get(k, where)  # the code's first line
                spec.check(v, where, _join(path, k), issues)
            elif k not in self.ignored:
                known = ", ".join(self.fields) or "none"
                issues.append(Issue(where, f"{path or 'top level'}: unknown field {k!r} (known: {known})"))
        for k in self.required:
            if k not in value:
                issues.append(Issue(at, f"{path or 'top level'}: missing field {k!r}"))


@dataclass(frozen=True)
class Component(Type):
    """One of `kinds` (name -> config type), named by the mapping's one key."""

    kinds: dict[str, Any] = field(default_factory=dict)

    def check(self, value: Any, at: int, path: str, issues: list[Issue]) -> None:
        if not isinstance(value, dict):
            issues.append(Issue(at, f"{path}: expected a mapping naming one {self.name}, got {_kind(value)} {_short(value)}"))
            return
        names = [k for k in value if k != "label"]
        if "label" in value:
            STR.check(value["label"], line_of(value, "label"), f"{path}.label", issues)
        if len(names) != 1:
            what = "none" if not names else ", ".join(map(repr, names))
            issues.append(Issue(at, f"{path}: a {self.name} names exactly one component, not {what}"))
            return
        name = names[0]
        where = line_of(value, name)
        if name not in self.kinds:
            issues.append(Issue(where, f"{path}: unknown {self.name} {name!r} (known: {', '.join(sorted(self.kinds))})"))
            return
        spec = self.kinds[name]
        spec.check({} if value[name] is None and isinstance(spec, Struct) else value[name], where, _join(path, name), issues)


class _Lazy(Type):
    """A Component whose kinds are filled in after the types that refer to it exist."""

    def __init__(self, name: str):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "target", None)

    def check(self, value: Any, at: int, path: str, issues: list[Issue]) -> None:
        self.target.check(value, at, path, issues)


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _kind(v: Any) -> str:
    return {dict: "a mapping", Map: "a mapping", list: "a list", Seq: "a list", str: "text", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "nothing"}.get(type(v), type(v).__name__)


def _short(v: Any) -> str:
    text = repr(v)
    return "" if isinstance(v, (dict, list)) else (text if len(text) < 40 else text[:37] + "...")


_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def seconds(value: Any) -> float:
    """A duration: a number of seconds, or text like ``1s``, ``100ms``, ``1m30s``; empty is 0."""
    if value is None or value == "":
        return 0.0
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    if isinstance(value, str):
        parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", value.strip())
        if parts and "".join(n + u for n, u in parts) == value.strip():
            return sum(float(n) * _UNITS[u] for n, u in parts)
    raise ValueError(f"{value!r} is not a duration (use e.g. 1s, 250ms, 1m30s, or empty)")


STR = Type("text", (str,))
INT = Type("an integer", (int,))
BOOL = Type("a boolean", (bool,))
NUMBER = Type("a number", (int, float))
ANY = Type("anything")
MAP = Type("a mapping", (dict,))
DURATION = Duration("a duration")
MODE = Enum("a mode", choices=MODES)
STR_OR_LIST = Type("text or a list", (str, list))

PROCESSOR = _Lazy("processor")
OUTPUT = _Lazy("output")
INPUT = _Lazy("input")

SCRIPT = Python("Python code")
CHECK = Python("a Python condition", check_expr=True)

INPUTS: dict[str, Any] = {
    "python": Struct("python input", fields={
        "script": SCRIPT, "name": STR, "serializer": Enum("a serializer", choices=SERIALIZERS), "pickle": BOOL,
        "batch_size": INT, "batch_period": DURATION, "mode": MODE}, required=("script",), ignored=("exe",)),
    "stdin": Struct("stdin input", fields={"codec": Enum("a codec", choices=("lines",))}),
    "generate": Struct("generate input", fields={"script": SCRIPT, "count": INT, "interval": DURATION,
                                                "batch_size": INT}, required=("script",)),
    "file": Struct("file input", fields={"paths": ListOf("a list", item=STR), "codec": Enum("a codec", choices=("lines", "all"))},
                   required=("paths",)),
}
PROCESSORS: dict[str, Any] = {
    "python": Struct("python processor", fields={"script": SCRIPT, "mode": MODE, "workers": INT}, required=("script",), ignored=("exe",)),
    "catch": ListOf("a list of processors", item=PROCESSOR),
    "switch": ListOf("a list of cases", item=Struct("case", fields={"check": CHECK, "processors": ListOf("a list", item=PROCESSOR)})),
    "log": Struct("log processor", fields={"level": Enum("a level", choices=tuple(LEVELS)),
                                           "message": Python("a Python expression", check_expr=True)}),
}
OUTPUTS: dict[str, Any] = {
    "stdout": Struct("stdout output", fields={"codec": Enum("a codec", choices=("lines",))}),
    "python": Struct("python output", fields={"script": SCRIPT, "mode": Enum("a mode", choices=("global",))},
                     required=("script",), ignored=("exe",)),
    "file": Struct("file output", fields={"path": STR, "codec": Enum("a codec", choices=("lines",))}, required=("path",)),
    "drop": Struct("drop output"),
    "switch": Struct("switch output", fields={"cases": ListOf("a list of cases", item=Struct(
        "case", fields={"check": CHECK, "output": OUTPUT}, required=("output",)))}, required=("cases",)),
    "broker": Struct("broker output", fields={"pattern": Enum("a pattern", choices=("fan_out",)),
                                             "outputs": ListOf("a list of outputs", item=OUTPUT)}, required=("outputs",)),
}

_CONDITION = Struct("condition", fields={"json_equals": ANY, "json_contains": ANY, "metadata_equals": MAP,
                                         "content_equals": STR})
TEST = Struct("test", fields={
    "name": STR, "target_processors": Enum("a target", choices=("/pipeline/processors",)),
    "input_batch": ListOf("a list of messages", item=Struct("message", fields={"content": ANY, "metadata": MAP})),
    "output_batches": ListOf("a list of batches", item=ListOf("a list of conditions", item=_CONDITION)),
}, required=("name", "input_batch"))

PIPELINE = Struct("pipeline file", fields={
    "input": INPUT, "output": OUTPUT, "broker": STR,
    "pipeline": Struct("pipeline", fields={"processors": ListOf("a list of processors", item=PROCESSOR)},
                       ignored=("threads",)),
    "logger": Struct("logger", fields={"level": Type("text", (str, bool))}),  # YAML reads OFF as false
    "tests": ListOf("a list of tests", item=TEST),
}, required=("input", "output"), ignored=("http", "metrics", "tracer", "shutdown_timeout"))


def _annotation_type(annotation: Any) -> Type:
    text = str(annotation)
    nullable = "None" in text
    for word, t in (("dict", MAP), ("tuple", Type("a list", (list,))), ("list", Type("a list", (list,))),
                    ("Sequence", STR_OR_LIST), ("bool", BOOL), ("float", NUMBER), ("int", INT), ("str", STR)):
        if word in text and "Any" not in text:
            return Type(t.name, t.pytypes, nullable)
    return ANY


def connector_struct(name: str, cls: type, kind: str) -> Struct:
    """A pipes.io class as a component: its constructor's parameters are the fields."""
    params = [p for p in inspect.signature(cls).parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return Struct(f"{name} {kind}", fields={p.name: _annotation_type(p.annotation) for p in params},
                  required=tuple(p.name for p in params if p.default is p.empty))


def _wire() -> None:
    from .components import io_sinks, io_sources

    inputs = {**{n: connector_struct(n, c, "input") for n, c in io_sources().items()}, **INPUTS}
    outputs = {**{n: connector_struct(n, c, "output") for n, c in io_sinks().items()}, **OUTPUTS}
    object.__setattr__(INPUT, "target", Component("input", kinds=inputs))
    object.__setattr__(OUTPUT, "target", Component("output", kinds=outputs))
    object.__setattr__(PROCESSOR, "target", Component("processor", kinds=PROCESSORS))


def lint(doc: Any) -> list[Issue]:
    """Every problem of a loaded pipeline document, in line order."""
    if INPUT.target is None:
        _wire()
    issues: list[Issue] = []
    PIPELINE.check(doc, getattr(doc, "line", 1), "", issues)
    return sorted({(i.line, i.message): i for i in issues}.values(), key=lambda i: i.line)
