"""From a linted YAML component to the object that runs it: inputs, processors, outputs.

Connectors of :mod:`pipes.io` are components under snake_case names of their classes,
without ``Source``/``Sink`` (``SSE`` is ``sse``, ``KafkaTopic`` and ``KafkaTopicSink``
are ``kafka_topic``, ``RedisStreamSource`` is ``redis_stream``); their fields are their
constructors' keyword arguments.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass
from typing import Any

from .. import io
from ..errors import ConfigError
from ..script import Script
from ..sources import is_connector
from . import inputs, outputs, processors
from .lint import LEVELS, seconds
from .loader import Map

_BUILT_IN = {"Stdout"}  # the pipeline's own stdout writes content, not values


def _snake(name: str) -> str:
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()
    return re.sub(r"_(source|sink)$", "", name)


def io_sources() -> dict[str, type]:
    return {_snake(n): getattr(io, n) for n in io.__all__
            if n not in _BUILT_IN and is_connector(getattr(io, n))}


def io_sinks() -> dict[str, type]:
    return {_snake(n): getattr(io, n) for n in io.__all__
            if n not in _BUILT_IN and hasattr(getattr(io, n), "write") and not is_connector(getattr(io, n))}


@dataclass(frozen=True)
class Context:
    filename: str
    live: bool  # the input passes live objects (serializer: none)


def _named(component: Map) -> tuple[str, Any, int]:
    """(name, config, line) of a component mapping such as ``{stdin: {}}``."""
    name = next(k for k in component if k != "label")
    config = component[name]
    if config is None:  # `stdin:` with nothing after it
        config = Map()
        config.line, config.lines, config.starts = component.lines[name], {}, {}
    return name, config, component.lines[name]


def _script(ctx: Context, config: Map, key: str = "script", *, check: bool = False) -> Script:
    line = config.starts.get(key, config.line)
    try:
        return Script(config[key], filename=ctx.filename, line=line, check=check)
    except SyntaxError as e:
        raise ConfigError(f"{ctx.filename}:{e.lineno or line}: {key}: invalid Python: {e.msg}") from None
    except Exception as e:
        raise ConfigError(f"{ctx.filename}:{line}: {key}: its imports and definitions failed: "
                          f"{type(e).__name__}: {e}") from None


def _connector(ctx: Context, cls: type, name: str, config: Map, line: int) -> Any:
    try:
        return cls(**config)
    except ConfigError as e:
        raise ConfigError(f"{ctx.filename}:{line}: {name}: {e}") from None
    except TypeError as e:
        raise ConfigError(f"{ctx.filename}:{line}: {name}: {e}") from None


def serializer_of(component: Map) -> str:
    """The serializer a ``python`` input asks for (json unless said otherwise)."""
    name, config, _ = _named(component)
    if name != "python":
        return "json"
    return config.get("serializer") or ("pickle" if config.get("pickle") else "json")


# -- inputs -------------------------------------------------------------------------------------
def build_input(ctx: Context, component: Map) -> Any:
    """The pipes source target of an input."""
    name, config, line = _named(component)
    if name == "python":
        if config.get("mode", "global") != "global":
            raise ConfigError(f"{ctx.filename}:{line}: the python input runs in the main interpreter: "
                              f"remove mode: {config['mode']} (processors may use it)")
        produce = inputs.python_producer(config["script"], config.get("name", "read"), serializer_of(component),
                                         ctx.filename, config.starts["script"])
        return inputs.ThreadedInput(produce, batch_size=config.get("batch_size", 1),
                                    batch_period=seconds(config.get("batch_period", 0.2))).read
    if name == "stdin":
        return inputs.ThreadedInput(inputs.stdin_producer()).read
    if name == "generate":
        produce = inputs.generate_producer(_script(ctx, config), config.get("count", 0),
                                           seconds(config.get("interval")))
        return inputs.ThreadedInput(produce, batch_size=config.get("batch_size", 1)).read
    if name == "file":
        return inputs.ThreadedInput(inputs.file_producer(list(config["paths"]), config.get("codec", "lines"))).read
    return inputs.ConnectorInput(_connector(ctx, io_sources()[name], name, config, line))


# -- processors ---------------------------------------------------------------------------------
def build_chain(ctx: Context, items: list) -> processors.Chain:
    return processors.Chain([build_processor(ctx, p) for p in items or []])


def _modes_available() -> bool:
    return importlib.util.find_spec("pipes.modes") is not None


def build_processor(ctx: Context, component: Map) -> processors.Step:
    name, config, line = _named(component)
    where = f"processor {name} ({ctx.filename}:{line})"
    if name == "python":
        mode = config.get("mode", "global")
        script = _script(ctx, config)
        if mode == "global":
            return processors.Python(script, where)
        if ctx.live:
            raise ConfigError(f"{ctx.filename}:{line}: mode: {mode} takes messages as bytes, but the input has "
                              f"serializer: none (live objects): use mode: global, or serializer: json or pickle")
        if not _modes_available():
            raise ConfigError(f"{ctx.filename}:{line}: mode: {mode} needs pipes.modes, which this version of pipes "
                              f"does not have yet: use mode: global")
        return processors.PooledPython(script, where, mode, config.get("workers", 2))
    if name == "catch":
        return processors.Catch(build_chain(ctx, config))
    if name == "switch":
        cases = [(_script(ctx, case, "check", check=True) if "check" in case else None,
                  build_chain(ctx, case.get("processors"))) for case in config]
        return processors.Switch(cases, where)
    if name == "log":
        message = _script(ctx, config, "message", check=True) if "message" in config else None
        return processors.Log(logging.getLevelNamesMapping()[LEVELS[config.get("level", "INFO")]], message, where)
    raise AssertionError(name)  # lint knows every processor


# -- outputs ------------------------------------------------------------------------------------
def build_output(ctx: Context, component: Map) -> outputs.Output:
    name, config, line = _named(component)
    where = f"output {name} ({ctx.filename}:{line})"
    if name == "stdout":
        return outputs.Stdout()
    if name == "file":
        return outputs.File(config["path"])
    if name == "drop":
        return outputs.Drop()
    if name == "python":
        return outputs.Python(_script(ctx, config), where)
    if name == "switch":
        return outputs.Switch([(_script(ctx, case, "check", check=True) if "check" in case else None,
                                build_output(ctx, case["output"])) for case in config["cases"]], where)
    if name == "broker":
        return outputs.FanOut([build_output(ctx, o) for o in config["outputs"]])
    return outputs.Connector(_connector(ctx, io_sinks()[name], name, config, line))
