"""Reading a pipeline YAML file into plain dicts and lists that remember their lines."""

from __future__ import annotations

from typing import Any

import yaml

from ..errors import ConfigError


class Map(dict):
    """A YAML mapping: ``line`` is where it starts, ``lines[key]`` where `key` is, and
    ``starts[key]`` the first line of the key's value (the line after ``|`` for a block)."""

    line: int
    lines: dict[Any, int]
    starts: dict[Any, int]


class Seq(list):
    """A YAML sequence: ``line`` is where it starts, ``lines[i]`` where item i is."""

    line: int
    lines: list[int]


def _first_line(node: yaml.Node) -> int:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.ScalarNode) and node.style in ("|", ">"):
        return line + 1
    return line


def _build(node: yaml.Node, loader: yaml.SafeLoader) -> Any:
    if isinstance(node, yaml.MappingNode):
        m = Map()
        m.line, m.lines, m.starts = node.start_mark.line + 1, {}, {}
        for k, v in node.value:
            key = _build(k, loader)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise ConfigError(f"{k.start_mark.name}:{k.start_mark.line + 1}: a key must be a scalar")
            if key in m:
                raise ConfigError(f"{k.start_mark.name}:{k.start_mark.line + 1}: {key!r} is given twice "
                                  f"(first on line {m.lines[key]})")
            m[key] = _build(v, loader)
            m.lines[key] = k.start_mark.line + 1
            m.starts[key] = _first_line(v)
        return m
    if isinstance(node, yaml.SequenceNode):
        s = Seq(_build(v, loader) for v in node.value)
        s.line, s.lines = node.start_mark.line + 1, [v.start_mark.line + 1 for v in node.value]
        return s
    return loader.construct_object(node, deep=True)


def load(text: str, filename: str = "<pipeline>") -> Any:
    """The document in `text`, with Map and Seq in place of dicts and lists."""
    loader = yaml.SafeLoader(text)
    loader.name = filename
    try:
        node = loader.get_single_node()
        return _build(node, loader) if node is not None else Map()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{filename}:{mark.line + 1}" if mark is not None else filename
        raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    finally:
        loader.dispose()


def load_file(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read pipeline {path!r}: {e.strerror}") from None
    return load(text, path)


def line_of(container: Any, key: Any) -> int:
    """The line of `key` in a Map (or index in a Seq), else of the container, else 0."""
    lines = getattr(container, "lines", None)
    if isinstance(container, Map) and key in lines:
        return lines[key]
    if isinstance(container, Seq) and isinstance(key, int) and 0 <= key < len(lines):
        return lines[key]
    return getattr(container, "line", 0)
