"""Interpreter modes: a transform run by a pool of sub-interpreters or of processes.

``mode="isolated"`` runs it in sub-interpreters that each have their own GIL, so pure
Python work runs in parallel; ``"isolated_legacy"`` in sub-interpreters sharing the GIL
(for extension modules not ready for per-interpreter GILs); ``"process"`` in processes.
Values cross as bytes: the raw record goes to a worker, which decodes it, calls the
function and encodes what it returns (see :mod:`pipes._mode_worker`).

:class:`Pool` is the seam: ``workers`` workers built from a ``"module:function"``
factory, batches of byte items in, one byte result per item out, items of one key
always on the same worker, in order. :class:`PooledTransform` runs a transform node on
a pool with the same outputs, keyed state and ``on_error`` handling as in ``global``.
"""

from __future__ import annotations

import asyncio
import functools
import marshal
import multiprocessing
import pickle
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from . import _mode_worker
from .errors import ConfigError, PipesError
from .failures import Failures
from .serializers import SERIALIZERS, Serializer
from .state import StateTable
from .topology import Graph, Node

POOL_MODES = ("isolated", "isolated_legacy", "process")


class PoolError(PipesError):
    """A pool worker failed outside the per-item contract: its handler raised, or it died."""


# -- workers ----------------------------------------------------------------------------------
# Run in the fresh sub-interpreter: load pipes/_mode_worker.py by path (before pipes, whose
# import needs orjson's stand-in there), then boot it; replies come back through a queue.
_BOOT = """
import importlib.util, sys, _interpqueues as _q
_spec = importlib.util.spec_from_file_location("pipes._mode_worker", _file)
_w = importlib.util.module_from_spec(_spec)
sys.modules["pipes._mode_worker"] = _w
_spec.loader.exec_module(_w)
_q.put(_qid, _w.boot_subinterpreter(_path, _factory, _arg), 0, 1)
"""
_CALL = "_q.put(_qid, _w.call(_payload), 0, 1)"


class _SubInterpreter:
    """One sub-interpreter, driven by one thread: ``exec`` releases the caller's GIL while
    the sub-interpreter runs (under its own GIL when isolated)."""

    def __init__(self, legacy: bool):
        self.legacy = legacy
        self.id: int | None = None
        self.queue: int | None = None

    def start(self, factory: str, arg: bytes | str | None) -> bytes:
        import _interpqueues
        import _interpreters

        self.queue = _interpqueues.create(0, 0, 1)  # no size limit; shareable objects (bytes) only
        self.id = _interpreters.create("legacy" if self.legacy else "isolated")
        return self._exec(_BOOT, {"_file": _mode_worker.__file__, "_path": tuple(sys.path), "_factory": factory,
                                  "_arg": arg, "_qid": self.queue})

    def call(self, payload: bytes) -> bytes:
        return self._exec(_CALL, {"_payload": payload})

    def _exec(self, code: str, shared: dict) -> bytes:
        import _interpqueues
        import _interpreters

        failed = _interpreters.exec(self.id, code, shared)
        if failed is not None:
            raise PoolError(f"sub-interpreter worker failed: {failed.errdisplay}")
        return _interpqueues.get(self.queue)[0]

    def close(self) -> None:
        import _interpqueues
        import _interpreters

        if self.id is not None:
            _interpreters.destroy(self.id)
            self.id = None
        if self.queue is not None:
            _interpqueues.destroy(self.queue)
            self.queue = None


class _Process:
    """One spawned process, talked to through a pipe."""

    def __init__(self) -> None:
        self.proc: Any = None
        self.conn: Any = None

    def start(self, factory: str, arg: bytes | str | None) -> bytes:
        ctx = multiprocessing.get_context("spawn")  # fork is unsafe in a threaded process
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_mode_worker.serve, args=(child, factory, arg), daemon=True,
                                name=f"pipes worker {factory}")
        self.proc.start()
        child.close()
        return self._reply()

    def call(self, payload: bytes) -> bytes:
        try:
            self.conn.send_bytes(payload)
        except OSError:
            pass  # it died: _reply says how
        return self._reply()

    def _reply(self) -> bytes:
        try:
            return self.conn.recv_bytes()
        except (EOFError, OSError):
            self.proc.join(1)
            raise PoolError(f"worker process {self.proc.pid} died (exit code {self.proc.exitcode})") from None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()  # the worker sees EOF and returns
            self.conn = None
        if self.proc is not None and self.proc.pid is not None:  # started
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
            self.proc.close()
            self.proc = None


class Pool:
    """``workers`` workers of ``mode`` (isolated | isolated_legacy | process), each running
    ``handler = function(arg)`` for ``factory = "module:function"``, then
    ``handler(list[bytes]) -> list[bytes]`` on its share of each batch."""

    def __init__(self, mode: str, workers: int, factory: str, arg: bytes | str | None = None):
        if mode not in POOL_MODES:
            raise ConfigError(f"pool mode={mode!r}: use one of {', '.join(POOL_MODES)}")
        if not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"pool workers={workers!r}: must be a positive integer")
        if mode != "process" and sys.version_info[:2] != (3, 13):
            raise ConfigError(f"mode={mode!r} drives sub-interpreters through CPython 3.13's private modules, and "
                              f"this is Python {sys.version.split()[0]}: use mode='process' or mode='global'")
        self.mode = mode
        self.factory = factory
        self.arg = arg
        self._workers = [_Process() if mode == "process" else _SubInterpreter(mode == "isolated_legacy")
                         for _ in range(workers)]
        # One thread per worker: a sub-interpreter runs in one thread at a time.
        self._threads = [ThreadPoolExecutor(1, thread_name_prefix=f"pipes-{mode}-{i}") for i in range(workers)]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        replies = await asyncio.gather(*[loop.run_in_executor(t, w.start, self.factory, self.arg)
                                         for w, t in zip(self._workers, self._threads)], return_exceptions=True)
        try:
            for reply in replies:
                if isinstance(reply, BaseException):
                    raise reply
                self._check(reply)
        except BaseException:
            await self.close()
            raise

    async def run(self, items: list[bytes], keys: list[bytes | None]) -> list[bytes]:
        """Each worker gets one chunk of the batch (items of one key in one chunk, in
        order; items without a key spread evenly); the chunks run in parallel."""
        n = len(self._workers)
        chunks: list[list[bytes]] = [[] for _ in range(n)]
        places: list[list[int]] = [[] for _ in range(n)]
        for i, key in enumerate(keys):
            w = i % n if key is None else zlib.crc32(key) % n
            chunks[w].append(items[i])
            places[w].append(i)
        loop = asyncio.get_running_loop()
        busy = [w for w in range(n) if chunks[w]]
        replies = await asyncio.gather(*[loop.run_in_executor(self._threads[w], self._workers[w].call,
                                                              marshal.dumps(chunks[w])) for w in busy])
        results: list[Any] = [None] * len(items)
        for w, reply in zip(busy, replies):
            outs = self._check(reply)[1]
            if len(outs) != len(places[w]):
                raise PoolError(f"{self.factory}: the handler returned {len(outs)} results for {len(places[w])} items")
            for i, out in zip(places[w], outs):
                results[i] = out
        return results

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.gather(*[loop.run_in_executor(t, w.close) for w, t in zip(self._workers, self._threads)])
        finally:
            for t in self._threads:
                t.shutdown()

    def _check(self, reply: bytes) -> tuple:
        status = marshal.loads(reply)
        if status[0] == "refused":
            raise ConfigError(f"{self.factory}: module {status[1]!r} refuses sub-interpreters ({status[2]}): "
                              f"use mode='global' or mode='process' (mode={self.mode!r})")
        if status[0] == "error":
            raise PoolError(f"{self.factory} failed in a worker (mode={self.mode!r}): {status[1]}: {status[2]}\n"
                            f"{status[3]}")
        return status


# -- transforms --------------------------------------------------------------------------------
class PooledTransform:
    """A transform node run on a :class:`Pool`: the processor :func:`pipes.nodes.processor`
    chooses for a mode other than ``global``.

    Keyed state travels with the items: the pickled state of each key goes with its first
    item of a batch, and the updated state comes back with every item.
    """

    def __init__(self, node: Node, graph: Graph, table: StateTable | None):
        self.node = node
        self.table = table
        self.failures = Failures(node)
        self.pool = Pool(node.mode, node.workers, "pipes._mode_worker:transform", transform_spec(node, graph))

    async def open(self) -> None:
        try:
            await self.pool.start()
        except PipesError as e:
            raise type(e)(f"transform {self.node.id!r} ({self.node.where}): {e}") from None

    async def close(self) -> None:
        await self.pool.close()

    async def process(self, topic: str, partition: int, records: list[tuple], ckpt: Any) -> None:
        table = self.table
        dumps = marshal.dumps
        items, keys = [], []
        shipped: set = set()
        for offset, key, raw, headers, ts in records:
            state = None
            if table is not None and key not in shipped:
                shipped.add(key)
                state = pickle.dumps(table.get(partition, key), protocol=5)
            items.append(dumps((topic, partition, offset, key, raw, headers, ts, state)))
            keys.append(b"" if key is None and table is not None else key)  # one worker for the no-key state
        results = await self.pool.run(items, keys)
        loads = marshal.loads
        buffers: dict[str, list] = {}
        for rec, result in zip(records, results):
            reply = loads(result)
            if table is not None:
                state = table.get(partition, rec[1])
                state.clear()
                state.update(pickle.loads(reply[-1]))
            if reply[0] == "ok":
                for t, out in reply[1]:
                    buf = buffers.get(t)
                    if buf is None:
                        buf = buffers[t] = ckpt.buffer(t)
                    buf.append(out)
            else:
                self.failures.handle(remote_error(reply[1], reply[2], reply[3]), topic, partition, rec, ckpt)


def transform_spec(node: Node, graph: Graph) -> bytes:
    """What a worker needs to run `node`: its function and key= by reference, and the
    serializers of the topics it reads and writes (by name, or pickled if custom)."""
    key = node.key
    unsendable = []
    topics = {}
    for name, spec in graph.topics.items():
        try:
            topics[name] = (_serializer_ref(spec.value_serializer), _serializer_ref(spec.key_serializer))
        except Exception as e:
            if name in node.inputs or name in node.outputs:
                raise ConfigError(f"transform {node.id!r} ({node.where}): mode={node.mode!r} sends the serializers "
                                  f"of topic {name!r} to its workers, but they cannot be pickled ({e}): define "
                                  f"their functions at module level") from None
            unsendable.append(name)
    return pickle.dumps({
        "node": node.id,
        "fn": reference(node.target, node, "function"),
        "key_field": key if isinstance(key, str) else None,
        "key_fn": reference(key, node, "key=") if callable(key) else None,
        "stateful": node.stateful,
        "wants_message": node.wants_message,
        "outputs": node.outputs,
        "topics": topics,
        "unsendable": unsendable,
    })


def _serializer_ref(s: Serializer) -> str | bytes:
    return s.name if SERIALIZERS.get(s.name) is s else pickle.dumps(s)


def reference(fn: Any, node: Node, what: str) -> str:
    """``module:qualname`` by which a worker imports `fn`; a ConfigError if it cannot."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    owner = sys.modules.get(module) if module else None
    if module == "__main__":  # run with `python -m pkg.mod`: importable by that name
        spec = getattr(owner, "__spec__", None)
        module = spec.name if spec is not None else None
    found: Any = owner
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if module is None or found is not fn:
        why = ("a lambda" if "<lambda>" in qualname else "defined inside a function" if "<locals>" in qualname
               else "defined in a script run as __main__" if getattr(fn, "__module__", None) == "__main__"
               else f"not reachable as {module}.{qualname}")
        raise ConfigError(f"transform {node.id!r} ({node.where}): mode={node.mode!r} runs its {what} in other "
                          f"interpreters, which import it by module and name, but {fn!r} is {why}: define it at "
                          f"the top level of an importable module (or use mode='global')")
    return f"{module}:{qualname}"


# -- errors raised in workers ------------------------------------------------------------------
class RemoteError(Exception):
    """An exception raised in a pool worker: a subclass named like the original, with its
    message, and a traceback through the worker's frames (file, line, function)."""


_REMOTE_TYPES: dict[str, type[RemoteError]] = {}


def remote_error(kind: str, message: str, frames: list[tuple[str, int, str]]) -> RemoteError:
    cls = _REMOTE_TYPES.get(kind)
    if cls is None:
        cls = _REMOTE_TYPES[kind] = type(kind, (RemoteError,), {"__module__": __name__})
    tb = None
    for filename, lineno, name in reversed(frames):  # innermost first, each linking to the one below
        tb = _frame(filename, lineno or 1, name, tb)
    return cls(message).with_traceback(tb)


class _Unwind(Exception):
    pass


@functools.lru_cache(maxsize=512)
def _raising_code(filename: str, lineno: int, name: str) -> Any:
    return compile("\n" * (lineno - 1) + "raise _Unwind", filename, "exec").replace(co_name=name)


def _frame(filename: str, lineno: int, name: str, below: Any) -> Any:
    """A traceback entry at filename:lineno in `name` (the tblib technique)."""
    try:
        exec(_raising_code(filename, lineno, name), {"_Unwind": _Unwind})
    except _Unwind as e:
        tb = e.__traceback__.tb_next
    tb.tb_next = below
    return tb
