"""The code that runs inside a pool worker (a sub-interpreter or a process), kept small.

Only the standard library is imported at module level: in a sub-interpreter this file is
loaded by path before ``pipes`` itself, so that :func:`install_json` can first stand in
for orjson (which refuses sub-interpreters, and crashes in shared-GIL ones), letting
``import pipes`` and the user's module work there.

The protocol is bytes both ways, marshalled tuples: :func:`boot` builds the handler from
``"module:function"`` and its argument, :func:`call` runs it on a list of items. Neither
raises; they return ``("ok", ...)``, ``("refused", module, message)`` or ``("error",
type, message, traceback text)``.

:func:`transform` is the handler of :class:`pipes.modes.PooledTransform`: it decodes each
item, calls the user's function and encodes its results, or returns the error with the
innermost frames of its traceback, so the main interpreter applies the node's ``on_error``.
"""

from __future__ import annotations

import importlib
import json
import marshal
import pickle
import signal
import sys
import traceback
import types
from typing import Any, Callable

_handler: Callable[[list[bytes]], list[bytes]] | None = None


# -- orjson's stand-in in sub-interpreters ------------------------------------------------------
class JSONEncodeError(TypeError):
    pass


def _json_module() -> types.ModuleType:
    """orjson's API (dumps/loads and its OPT_ flags) on the standard json module's C
    scanner and encoder: the same JSON for the same values, compact and UTF-8."""
    import json.encoder
    import json.scanner

    m = types.ModuleType("orjson", "pipes' standard-library stand-in for orjson in a sub-interpreter")
    flags = ("OPT_APPEND_NEWLINE", "OPT_INDENT_2", "OPT_NAIVE_UTC", "OPT_NON_STR_KEYS", "OPT_OMIT_MICROSECONDS",
             "OPT_PASSTHROUGH_DATACLASS", "OPT_PASSTHROUGH_DATETIME", "OPT_PASSTHROUGH_SUBCLASS",
             "OPT_SERIALIZE_DATACLASS", "OPT_SERIALIZE_NUMPY", "OPT_SERIALIZE_UUID", "OPT_SORT_KEYS",
             "OPT_STRICT_INTEGER", "OPT_UTC_Z")
    for bit, name in enumerate(flags):
        setattr(m, name, 1 << bit)
    # What json.dumps(ensure_ascii=False, separators=(",", ":"), allow_nan=False) runs, built once.
    encode = json.encoder.c_make_encoder(None, _default, json.encoder.c_encode_basestring, None, ":", ",",
                                         False, False, False)
    decoder = json.JSONDecoder()
    scan = json.scanner.make_scanner(decoder)

    def dumps(obj: Any, default: Callable | None = None, option: int | None = None) -> bytes:
        option = option or 0
        try:
            if default is None and not option & (m.OPT_INDENT_2 | m.OPT_SORT_KEYS):
                text = "".join(encode(obj, 0))
            else:
                text = json.dumps(obj, ensure_ascii=False, allow_nan=False,
                                  default=_default if default is None else _chain(default),
                                  indent=2 if option & m.OPT_INDENT_2 else None,
                                  separators=(",", ": ") if option & m.OPT_INDENT_2 else (",", ":"),
                                  sort_keys=bool(option & m.OPT_SORT_KEYS))
        except (TypeError, ValueError, RecursionError) as e:
            raise JSONEncodeError(str(e)) from e
        return (text + "\n" if option & m.OPT_APPEND_NEWLINE else text).encode()

    def loads(data: bytes | bytearray | memoryview | str) -> Any:
        try:
            text = data if isinstance(data, str) else bytes(data).decode()
        except UnicodeDecodeError as e:
            raise json.JSONDecodeError(f"str is not valid UTF-8: {e.reason}", "", e.start) from None
        try:  # the common case, a document without surrounding whitespace, in one C call
            obj, end = scan(text, 0)
            if end == len(text):
                return obj
        except StopIteration:
            pass
        return decoder.decode(text)  # whitespace, or the error with its position

    m.dumps, m.loads = dumps, loads
    m.JSONDecodeError, m.JSONEncodeError = json.JSONDecodeError, JSONEncodeError
    m.__version__ = "0 (json)"
    return m


def _default(obj: Any) -> Any:
    """What orjson serializes natively beyond plain JSON types."""
    import dataclasses
    import datetime
    import enum
    import uuid

    if isinstance(obj, (datetime.datetime, datetime.date, datetime.time)):
        return obj.isoformat()
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, uuid.UUID):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    raise TypeError(f"Type is not JSON serializable: {type(obj).__name__}")


def _chain(default: Callable) -> Callable:
    def both(obj: Any) -> Any:
        try:
            return _default(obj)
        except TypeError:
            return default(obj)

    return both


def install_json() -> None:
    sys.modules["orjson"] = _json_module()


# -- booting and calling ---------------------------------------------------------------------
def boot_subinterpreter(path: tuple[str, ...], factory: str, arg: bytes | str | None) -> bytes:
    """In a fresh sub-interpreter, with this file loaded by path as ``pipes._mode_worker``:
    the main interpreter's import path, orjson's stand-in, ``pipes``, then the handler."""
    sys.path[:] = path
    install_json()
    try:
        import pipes
    except BaseException as e:
        return _failure(e)
    pipes._mode_worker = sys.modules[__name__]
    return boot(factory, arg)


def boot(factory: str, arg: bytes | str | None) -> bytes:
    global _handler
    try:
        module, _, name = factory.partition(":")
        _handler = getattr(importlib.import_module(module), name)(arg)
    except BaseException as e:
        return _failure(e)
    return marshal.dumps(("ok",))


def call(payload: bytes) -> bytes:
    try:
        return marshal.dumps(("ok", _handler(marshal.loads(payload))))
    except BaseException as e:
        return _failure(e)


# How extension modules word their refusal (CPython's check, PyO3, Cython).
_REFUSALS = ("subinterpreter", "one interpreter per process")


def _failure(e: BaseException) -> bytes:
    if isinstance(e, ImportError) and any(r in str(e) for r in _REFUSALS):
        return marshal.dumps(("refused", _refusing_module(e), str(e)))
    return marshal.dumps(("error", type(e).__name__, str(e), "".join(traceback.format_exception(e))))


def _refusing_module(e: ImportError) -> str:
    """The module whose import refused, from "module X does not support loading in
    subinterpreters", else the last frame that imported something outside the stdlib."""
    words = str(e).split()
    if len(words) > 1 and words[0] == "module":
        return words[1].split(".")[0]
    if e.name:
        return e.name.split(".")[0]
    files = [f.filename for f in traceback.extract_tb(e.__traceback__) if "site-packages" in f.filename]
    return files[-1].split("site-packages/")[1].split("/")[0] if files else "?"


def serve(conn: Any, factory: str, arg: bytes | str | None) -> None:
    """A process worker: boot, then answer each payload until the pipe closes. Ctrl-C
    reaches the whole process group: the main process drains and then closes the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn.send_bytes(boot(factory, arg))
    while True:
        try:
            payload = conn.recv_bytes()
        except EOFError:
            return
        conn.send_bytes(call(payload))


# -- PooledTransform's handler ------------------------------------------------------------------
def transform(arg: bytes) -> Callable[[list[bytes]], list[bytes]]:
    """The per-item work of a pooled transform (see :func:`pipes.modes.transform_spec`).

    An item is ``marshal((topic, partition, offset, key, value, headers, ts, state))``;
    its result ``("ok", outputs, state)`` with outputs ``[(topic, (key, value, headers,
    ts))]``, or ``("err", type, message, frames, state)``. ``state`` is the pickled state
    of the item's key (sent with the first item of each key in a batch; later items of that
    key use the worker's copy) and comes back after every item of a stateful transform.
    """
    import asyncio
    import inspect

    from .emit import Emitter, decode_headers, key_getter
    from .message import Message
    from .serializers import Serializer, resolve
    from .topology import Graph, Node, TopicSpec

    spec = pickle.loads(arg)
    fn = _resolve(spec["fn"])
    keyfn = key_getter(spec["key_field"] or (spec["key_fn"] and _resolve(spec["key_fn"])))

    def serializer(ref: str | bytes) -> Serializer:
        return resolve(ref) if isinstance(ref, str) else pickle.loads(ref)

    topics = {t: TopicSpec(t, 1, serializer(v), serializer(k)) for t, (v, k) in spec["topics"].items()}
    graph = Graph("", topics, {})
    emitter = Emitter(Node(id=spec["node"], kind="transform", topology="", target=None,
                           outputs=tuple(spec["outputs"])), graph)
    stateful, wants_message = spec["stateful"], spec["wants_message"]
    is_async, is_gen, is_agen = (inspect.iscoroutinefunction(fn), inspect.isgeneratorfunction(fn),
                                 inspect.isasyncgenfunction(fn))
    out = _Outputs(spec["unsendable"])
    bufs = emitter.buffers(out)
    kdumps = bufs[0][1]
    loads_of = {t: (s.value_serializer.loads, s.key_serializer.loads) for t, s in topics.items()}

    async def collect(agen: Any) -> list:
        return [item async for item in agen]

    def one(item: bytes, states: dict, loop: asyncio.AbstractEventLoop | None) -> bytes:
        topic, partition, offset, rkey, raw, headers, ts, shipped = marshal.loads(item)
        if shipped is not None:
            states[rkey] = pickle.loads(shipped)
        state = states[rkey] if stateful else None
        try:
            vloads, kloads = loads_of[topic]
            value = vloads(raw)
            key = rkey if keyfn is None else (None if (k := keyfn(value)) is None else kdumps(k))
            if wants_message:
                value = Message(value, key=kloads(key) if key is not None else None,
                                headers=decode_headers(headers), topic=topic, partition=partition,
                                offset=offset, timestamp=ts)
            result = fn(value, state) if stateful else fn(value)
            if is_async:
                result = loop.run_until_complete(result)
            elif is_agen:
                result = loop.run_until_complete(collect(result))
            staged: list = []
            if result is not None:
                for r in (result if is_gen or is_agen else (result,)):
                    if r is not None:
                        emitter.encode(r, key, headers, ts, bufs, out, staged, topic)
            records = [(out.topic_of[id(buf)], rec) for buf, rec in staged]
            return marshal.dumps(("ok", records, _state(state)))
        except Exception as e:
            frames = [(f.filename, f.lineno, f.name) for f in traceback.extract_tb(e.__traceback__)[-10:]]
            return marshal.dumps(("err", type(e).__name__, str(e), frames, _state(state)))

    def _state(state: dict | None) -> bytes | None:
        return None if state is None else pickle.dumps(state, protocol=5)

    def handle(items: list[bytes]) -> list[bytes]:
        states: dict = {}  # this chunk's keyed state: every item of a key comes in one chunk
        if not (is_async or is_agen):
            return [one(item, states, None) for item in items]
        loop = asyncio.new_event_loop()
        try:
            return [one(item, states, loop) for item in items]
        finally:
            loop.close()

    return handle


class _Outputs:
    """Stands in for the checkpoint: one list per topic, and which topic a list is for."""

    def __init__(self, unsendable: list[str]) -> None:
        self.buffers: dict[str, list] = {}
        self.topic_of: dict[int, str] = {}
        self.unsendable = set(unsendable)

    def buffer(self, topic: str, scope: tuple | None = None) -> list:
        buf = self.buffers.get(topic)
        if buf is None:
            if topic in self.unsendable:
                raise ValueError(f"topic {topic!r} has a serializer that cannot be pickled, so pool workers "
                                 f"cannot encode for it: define its functions at module level")
            buf = self.buffers[topic] = []
            self.topic_of[id(buf)] = topic
        return buf


def _resolve(ref: str) -> Any:
    module, _, qualname = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj
