"""The Python script API of YAML pipelines, modelled on Redpanda Connect's Python plugin.

A :class:`Script` is compiled once. Its leading imports, ``def``s and ``class``es run
once, at compile time; the rest runs per message in a fresh view of the namespace (the
names the previous message bound are gone), with these names:

* ``content()``: the message as bytes; ``metadata(key)`` one metadata value (None if
  absent), ``metadata()`` all of them as a dict;
* ``meta``: a dict of the metadata to write back (``meta["k"] = v`` sets, ``None``
  deletes; values keep their types);
* ``root``: the output. ``root.a.b = 1`` (or ``root["a"]["b"]``) builds nested dicts;
  assigning ``root`` replaces it; an untouched root leaves the content as it was;
  ``root = None`` drops the message. str and bytes are written as they are, anything
  else as JSON;
* ``this``: the upstream live object (``serializer: none``), else the content decoded
  as JSON; ``unpickle()``: ``pickle.loads(content())``;
* ``error()``/``errored()``: the error an earlier processor flagged the message with;
  ``batch_index()``/``batch_size()``: the message's position in its batch.

A script that raises flags the message with the error (its content unchanged).

This module imports only the standard library (and orjson when the interpreter can
load it), so :func:`worker_handler` runs in sub-interpreters too.
"""

from __future__ import annotations

import ast
import pickle
import traceback
import types
from typing import Any, Callable

try:
    import orjson

    from ._json import dumps as dumps_json

    loads_json: Callable[[bytes], Any] = orjson.loads
except ImportError:  # an isolated sub-interpreter cannot load orjson
    import json

    def dumps_json(value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()

    def loads_json(raw: bytes) -> Any:
        return json.loads(raw)


NOTHING: Any = type("Nothing", (), {"__repr__": lambda self: "NOTHING"})()


def encode(value: Any) -> bytes:
    """A value as message content: str as UTF-8, bytes as they are, anything else as JSON."""
    if type(value) is str:
        return value.encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    try:
        return dumps_json(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{type(value).__name__} is not JSON ({e}): use str, bytes, JSON-able data, "
                        f"or pickle.dumps() it") from None


def decode(content: bytes) -> Any:
    """Content as a value: JSON when it is JSON, else the text, else the bytes."""
    try:
        return loads_json(content)
    except ValueError:
        try:
            return content.decode()
        except UnicodeDecodeError:
            return content


class Envelope:
    """One message between the components of a pipeline: content, metadata, the live
    object of ``serializer: none`` (its content is made from it when asked for), and the
    error an earlier processor flagged it with."""

    __slots__ = ("_content", "meta", "obj", "error", "trace")

    def __init__(self, content: bytes | None = None, meta: dict | None = None, obj: Any = NOTHING,
                 error: str | None = None, trace: str | None = None):
        self._content = content
        self.meta = meta if meta is not None else {}
        self.obj = obj
        self.error = error
        self.trace = trace  # the traceback of `error`, until a processor has logged it

    @property
    def content(self) -> bytes:
        if self._content is None:
            try:
                self._content = encode(self.obj)
            except TypeError:
                self._content = str(self.obj).encode()
        return self._content

    def value(self) -> Any:
        """For connector sinks: the live object, else the content decoded (JSON, text or bytes)."""
        return self.obj if self.obj is not NOTHING else decode(self.content)

    def state(self) -> tuple:
        """What crosses a topic or an interpreter: (content, metadata, error)."""
        return (self.content, self.meta, self.error)

    def __repr__(self) -> str:
        return f"Envelope({self.content!r}, meta={self.meta!r}" + (f", error={self.error!r})" if self.error else ")")


class Root(dict):
    """``root``: a dict that also takes attributes; ``root.a.b = 1`` creates ``a``. Reading a
    missing attribute gives an empty Root that joins its parent only when written to."""

    __slots__ = ("_parent", "_key")

    def __init__(self, parent: Root | None = None, key: Any = None):
        super().__init__()
        object.__setattr__(self, "_parent", parent)
        object.__setattr__(self, "_key", key)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            return Root(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setitem__(self, key: Any, value: Any) -> None:
        parent = self._parent
        if parent is not None:  # first write: join the parent
            object.__setattr__(self, "_parent", None)
            parent[self._key] = self
        dict.__setitem__(self, key, value)


_SETUP = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _names(code: types.CodeType) -> set[str]:
    out = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            out |= _names(const)
    return out


def described(exc: BaseException, filename: str) -> str:
    """``Type: message (file:line)``, the line being the innermost one of `filename`."""
    at = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == filename]
    return f"{type(exc).__name__}: {exc}" + (f" ({filename}:{at[-1].lineno})" if at else "")


def _fail(env: Envelope, exc: BaseException, filename: str) -> Envelope:
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:  # from the script's frame on
        tb = tb.tb_next
    trace = "".join(traceback.format_exception(type(exc), exc, tb or exc.__traceback__))
    return Envelope(env._content, env.meta, env.obj, described(exc, filename), trace)


class Script:
    """A script compiled once and run per message.

    `filename` and `line` place it in its YAML file, so tracebacks and errors point there.
    ``check=True`` compiles an expression (or a script whose ``root`` is its value): a
    condition, or a log message.
    """

    def __init__(self, source: str, *, filename: str = "<script>", line: int = 1, check: bool = False):
        self.source = source
        self.filename = filename
        self.line = line
        tree = None
        if check:
            try:
                expr = ast.parse(source.strip(), filename, mode="eval")
                tree = ast.Module([ast.Assign([ast.Name("root", ast.Store())], expr.body)], [])
                ast.fix_missing_locations(tree)
            except SyntaxError:
                tree = None
        if tree is None:
            tree = ast.parse(source, filename, mode="exec")
        ast.increment_lineno(tree, line - 1)
        n = 0
        while n < len(tree.body) and (isinstance(tree.body[n], _SETUP) or (
                isinstance(tree.body[n], ast.Expr) and isinstance(tree.body[n].value, ast.Constant))):
            n += 1
        setup = compile(ast.Module(tree.body[:n], []), filename, "exec")
        self.body = compile(ast.Module(tree.body[n:], []), filename, "exec")
        self.uses_this = "this" in _names(setup) | _names(self.body)
        self._env = Envelope(b"")
        self._index = 0
        self._size = 1
        self.ns: dict[str, Any] = {
            "__name__": "__pipes_script__", "__builtins__": __builtins__,
            "content": self._content, "metadata": self._metadata, "unpickle": self._unpickle,
            "error": self._error, "errored": self._errored,
            "batch_index": lambda: self._index, "batch_size": lambda: self._size,
            "root": None, "meta": None, "this": None,
        }
        exec(setup, self.ns)
        self._keep = frozenset(self.ns)

    # -- the hooks --------------------------------------------------------------------
    def _content(self) -> bytes:
        return self._env.content

    def _metadata(self, key: str | None = None) -> Any:
        if key is None:
            return dict(self._env.meta)
        return self._env.meta.get(key)

    def _unpickle(self) -> Any:
        return pickle.loads(self._env.content)

    def _error(self) -> str | None:
        return self._env.error

    def _errored(self) -> bool:
        return self._env.error is not None

    # -- running ------------------------------------------------------------------------
    def _run(self, env: Envelope, index: int, size: int) -> tuple[Any, Root, dict]:
        """Run the body for `env`: (the final root, the Root it started with, meta)."""
        ns = self.ns
        self._env, self._index, self._size = env, index, size
        ns["root"] = root = Root()
        ns["meta"] = dict(env.meta)
        try:
            if self.uses_this:
                if env.obj is not NOTHING:
                    ns["this"] = env.obj
                else:
                    try:
                        ns["this"] = loads_json(env.content)
                    except ValueError as e:
                        raise ValueError(f"`this`: the content is not JSON ({e}): {env.content[:60]!r}") from None
            exec(self.body, ns)
            return ns["root"], root, ns["meta"]
        finally:
            if len(ns) != len(self._keep):
                for k in [k for k in ns if k not in self._keep]:
                    del ns[k]
            ns["this"] = None

    def apply(self, env: Envelope, index: int = 0, size: int = 1) -> Envelope | None:
        """The message after the script: a new Envelope, None when dropped, or `env`
        flagged with the error when the script raised."""
        try:
            out, root, meta = self._run(env, index, size)
            if None in meta.values():
                meta = {k: v for k, v in meta.items() if v is not None}
            if out is root:
                if not root:  # untouched: the content (and live object) stay
                    return Envelope(env._content, meta, env.obj, env.error)
                return Envelope(encode(root), meta, NOTHING, env.error)
            if out is None:
                return None
            return Envelope(encode(out), meta, NOTHING, env.error)
        except Exception as e:
            return _fail(env, e, self.filename)

    def evaluate(self, env: Envelope, index: int = 0, size: int = 1) -> tuple[Any, Envelope | None]:
        """(the value of ``root``, None), or (None, `env` flagged with the error it raised)."""
        try:
            return self._run(env, index, size)[0], None
        except Exception as e:
            return None, _fail(env, e, self.filename)

    def check(self, env: Envelope, index: int = 0, size: int = 1) -> bool | Envelope:
        """Whether the condition holds for `env`, or `env` flagged with the error it raised."""
        value, failed = self.evaluate(env, index, size)
        return bool(value) if failed is None else failed


def worker_handler(arg: bytes) -> Callable[[list[bytes]], list[bytes]]:
    """A python processor in a pool worker (see pipes.modes): `arg` pickles
    (source, filename, line); each item pickles (content, metadata, error, index, size)
    and each result (content, metadata, error, traceback), or None for a dropped message."""
    source, filename, line = pickle.loads(arg)
    script = Script(source, filename=filename, line=line)

    def handle(items: list[bytes]) -> list[bytes]:
        out = []
        for raw in items:
            content, meta, error, index, size = pickle.loads(raw)
            env = script.apply(Envelope(content, meta, error=error), index, size)
            out.append(pickle.dumps(None if env is None else (env.content, env.meta, env.error, env.trace),
                                    protocol=5))
        return out

    return handle
