"""A pipeline file compiled into an ordinary pipes App.

The input is a source writing batches to ``<name>.input``; the processors are one
transform (their chain) from there to ``<name>.output``; the output is one sink. Messages
cross these topics as batches of (content, metadata, error): pickled on a topic-backed
broker (local://DIR, kafka://), so a restarted run resumes; handed over in memory, live
objects included, on the ephemeral memory:// (the default).
"""

from __future__ import annotations

import itertools
import os
import pickle
import re
from dataclasses import dataclass

from ..app import App
from ..errors import ConfigError
from ..script import Envelope
from ..serializers import Serializer
from .components import Context, build_chain, build_input, build_output, serializer_of
from .lint import LEVELS, Issue, lint
from .loader import Map, load_file
from .outputs import OutputSink
from .processors import Pipeline

DEFAULT_BROKER = "memory://"


def live_transport() -> Serializer:
    """Batches handed over in memory, as they are (memory:// only): a topic holds their ids."""
    held: dict[int, list[Envelope]] = {}
    ids = itertools.count()

    def dumps(batch: list[Envelope]) -> bytes:
        i = next(ids)
        held[i] = batch
        return i.to_bytes(8, "big")

    def loads(raw: bytes) -> list[Envelope]:
        return held.pop(int.from_bytes(raw, "big"))

    return Serializer("pipes.pipeline.live", dumps, loads)


def _dumps(batch: list[Envelope]) -> bytes:
    return pickle.dumps([e.state() for e in batch], protocol=5)


def _loads(raw: bytes) -> list[Envelope]:
    return [Envelope(c, m, error=err) for c, m, err in pickle.loads(raw)]


PICKLED = Serializer("pipes.pipeline.batches", _dumps, _loads)


@dataclass(frozen=True)
class Compiled:
    app: App
    pipeline: Pipeline  # the processors (also what `pipes test` runs)


def app_name(filename: str) -> str:
    stem = os.path.splitext(os.path.basename(filename))[0]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem) or "pipeline"


def compile_pipeline(doc: Map, filename: str, *, broker: str | None = None) -> Compiled:
    """The App a linted pipeline document describes. `broker` overrides the file's ``broker:``."""
    url = broker or doc.get("broker") or DEFAULT_BROKER
    ephemeral = url.startswith("memory:")
    live = serializer_of(doc["input"]) == "none"
    if live and not ephemeral:
        raise ConfigError(f"{filename}:{doc.lines.get('broker', doc['input'].line)}: serializer: none passes live "
                          f"objects, which cannot cross the topics of {url}: use serializer: pickle (or json), or "
                          f"run on memory:// (no broker:)")
    ctx = Context(filename, live)
    name = app_name(filename)
    level = (doc.get("logger") or {}).get("level", "INFO")
    level = "OFF" if level is False else str(level).upper()  # YAML reads an unquoted OFF as false
    if level not in LEVELS:
        raise ConfigError(f"{filename}:{doc['logger'].lines['level']}: logger.level: {level!r} is not one of "
                          f"{', '.join(LEVELS)}")
    app = App(name, broker=url, on_error="stop", log_level=LEVELS[level])
    transport = live_transport() if ephemeral else PICKLED
    first = last = app.topic(f"{name}.input", value_serializer=transport)
    app.source(build_input(ctx, doc["input"]), to=first, name="input")
    procs = (doc.get("pipeline") or {}).get("processors") or []
    pipeline = Pipeline(build_chain(ctx, procs), transport, f"{name}.output")
    if procs:
        last = app.topic(f"{name}.output", value_serializer=transport)
        app.transform(first, to=last, name="pipeline")(pipeline)
    app.sink(last, OutputSink(build_output(ctx, doc["output"])), name="output")
    return Compiled(app, pipeline)


def load(filename: str) -> tuple[Map, list[Issue]]:
    """The document of a pipeline file and its lint issues."""
    doc = load_file(filename)
    if not isinstance(doc, Map):
        return doc, [Issue(1, "a pipeline file is a mapping with input:, pipeline: and output:")]
    return doc, lint(doc)
