"""Pipeline inputs as pipes sources. Each produces batches (lists of Envelopes).

The blocking inputs (``python``, ``stdin``, ``generate``, ``file``) run in a thread of
their own, so a script that sleeps or blocks does not stall the pipeline, and their
batches are flushed when they pause. Connectors of :mod:`pipes.io` are wrapped as they
are, one message per batch, keeping their own checkpoints.
"""

from __future__ import annotations

import asyncio
import ast
import collections
import glob
import inspect
import os
import pickle
import sys
import threading
import time
import types
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

from ..errors import ConfigError
from ..message import Message
from ..nodes import maybe_await
from ..script import Envelope, Script, described, encode

_ITEM, _END, _ERROR = 0, 1, 2


class _Stopped(Exception):
    pass


class InputError(Exception):
    """An input's own code failed (the message says where)."""


class ThreadedInput:
    """Runs ``produce(work)`` — a blocking iterator of Envelopes that keeps its position
    in the dict `work` — in a thread of its own, which groups the messages into batches of
    `batch_size`. A batch still filling is flushed when the producer pauses (no batch
    completed for `batch_period` seconds since its first message) and when it ends.

    :meth:`read` is the pipes source (a function taking ``state``): the thread works on a
    copy of the state, and with each batch ``state`` becomes that copy as it was right
    after the batch's last message, so a restart resumes exactly after it. A source
    stopped and started again (a rebalance) starts a new thread from the state it is given.
    """

    def __init__(self, produce: Callable[[dict], Iterator[Envelope]], *, batch_size: int = 1,
                 batch_period: float = 0.2):
        self.produce = produce
        self.batch_size = batch_size
        self.batch_period = batch_period
        self._feed: _Feed | None = None

    async def read(self, state: dict) -> list[Envelope] | None:
        if self._feed is None or self._feed.stop:
            self._feed = _Feed(self, state, asyncio.get_running_loop())
        try:
            return await self._feed.next(state)
        except BaseException:
            self._feed.stop = True
            raise


class _Feed:
    """One run of a ThreadedInput's thread, and the batches it made."""

    def __init__(self, source: ThreadedInput, state: dict, loop: asyncio.AbstractEventLoop):
        self.size = source.batch_size
        self.period = source.batch_period
        self.lock = threading.Lock()
        self.partial: list[Envelope] = []  # the batch filling up, its state, when it began
        self.snap: bytes | None = None
        self.since = 0.0
        self.ready: collections.deque = collections.deque()  # (kind, batch or error, state)
        self.limit = max(4, 4096 // self.size)  # batches ready at most
        self.drained = threading.Event()  # set when the ready batches fall below half the limit
        self.event = asyncio.Event()
        self.waiting = False
        self.stop = False
        self.ended = False
        self.loop = loop
        work = pickle.loads(pickle.dumps(state, protocol=5))
        threading.Thread(target=self._work, args=(source.produce, work), name="pipes input", daemon=True).start()

    async def next(self, state: dict) -> list[Envelope] | None:
        while not self.ended:
            if self.ready:
                kind, batch, snap = self.ready.popleft()
                if len(self.ready) < self.limit // 2:
                    self.drained.set()
                if kind == _END:
                    self.ended = True
                    return None
                if kind == _ERROR:
                    self.ended = True
                    raise batch
                return self._give(batch, snap, state)
            timeout = None
            with self.lock:
                if self.partial:
                    timeout = self.since + self.period - time.monotonic()
                    if timeout <= 0:  # the producer paused: flush the batch filling up
                        batch, snap, self.partial, self.snap = self.partial, self.snap, [], None
                        return self._give(batch, snap, state)
                self.waiting = True
                self.event.clear()
            try:
                if not self.ready:
                    await asyncio.wait_for(self.event.wait(), timeout)
            except TimeoutError:
                pass
            finally:
                self.waiting = False
        return None

    @staticmethod
    def _give(batch: list[Envelope], snap: bytes, state: dict) -> list[Envelope]:
        state.clear()
        state.update(pickle.loads(snap))
        return batch

    # -- in the thread -------------------------------------------------------------------------
    def _work(self, produce: Callable[[dict], Iterator[Envelope]], work: dict) -> None:
        try:
            try:
                for env in produce(work):
                    snap = pickle.dumps(work, protocol=5)
                    with self.lock:
                        first = not self.partial
                        self.partial.append(env)
                        self.snap = snap
                        if first:
                            self.since = time.monotonic()
                        full = len(self.partial) >= self.size
                        if full:
                            batch, self.partial, self.snap = self.partial, [], None
                    if full:
                        self._push((_ITEM, batch, snap))
                    elif first:
                        self._wake()  # so the reader starts timing the pause
                    if self.stop:
                        return
                with self.lock:
                    batch, snap, self.partial, self.snap = self.partial, self.snap, [], None
                if batch:
                    self._push((_ITEM, batch, snap))
                self._push((_END, None, None))
            except _Stopped:
                return
            except BaseException as e:
                self._push((_ERROR, e, None))
        except (_Stopped, RuntimeError):  # stopped, or the loop is gone
            return

    def _push(self, item: tuple) -> None:
        while len(self.ready) >= self.limit:
            self.drained.clear()
            if len(self.ready) >= self.limit:
                self.drained.wait(0.2)
            if self.stop:
                raise _Stopped
        self.ready.append(item)
        self._wake()

    def _wake(self) -> None:
        if self.waiting:
            self.loop.call_soon_threadsafe(self.event.set)


# -- producers --------------------------------------------------------------------------------
def to_envelope(item: Any, serializer: str) -> Envelope:
    if serializer == "json":
        return Envelope(encode(item))
    if serializer == "pickle":
        return Envelope(pickle.dumps(item, protocol=5))
    return Envelope(None, obj=item)


def _skip_counted(items: Iterator[Any], work: dict) -> Iterator[Any]:
    """Items after the first ``work["count"]`` (a restart resumes after them)."""
    count = work.get("count", 0)
    for i, item in enumerate(items):
        if i < count:
            continue
        work["count"] = i + 1
        yield item


def python_producer(source: str, name: str, serializer: str, filename: str, line: int) -> Callable:
    """The ``python`` input: run the script once, then read the global `name`: an iterator
    is drained, a list or tuple gives an item each, a function is called until it returns
    None (with ``state``, the persisted dict, when it takes one); anything else is one item.
    Without ``state``, a restart skips as many items as were produced before."""
    tree = ast.parse(source, filename)
    ast.increment_lineno(tree, line - 1)
    code = compile(tree, filename, "exec")

    def produce(work: dict) -> Iterator[Envelope]:
        try:
            yield from _produce(work)
        except ConfigError:
            raise
        except Exception as e:
            raise InputError(f"the python input's script raised {described(e, filename)}") from e

    def _produce(work: dict) -> Iterator[Envelope]:
        # A module of its own, so classes it defines can be pickled and unpickled downstream.
        module = sys.modules["__pipes_input__"] = types.ModuleType("__pipes_input__")
        ns = module.__dict__
        exec(code, ns)
        if name not in ns:
            raise ConfigError(f"{filename}:{line}: the python input's script defines no {name!r} "
                              f"(set name: to the global it should read)")
        target = ns[name]
        if inspect.isgeneratorfunction(target) or (callable(target) and not inspect.isclass(target)
                                                   and not hasattr(target, "__next__")):
            takes_state = _takes_state(target)
            if inspect.isgeneratorfunction(target):
                items = target(work) if takes_state else _skip_counted(target(), work)
            else:
                items = _calls(target, work) if takes_state else _skip_counted(_calls(target, None), work)
        elif hasattr(target, "__next__") or isinstance(target, (list, tuple)):
            items = _skip_counted(iter(target), work)
        else:
            items = _skip_counted(iter([target]), work)
        for item in items:
            yield to_envelope(item, serializer)

    return produce


def _takes_state(fn: Callable) -> bool:
    try:
        return "state" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _calls(fn: Callable, state: dict | None) -> Iterator[Any]:
    """fn(state=state) (or fn() without state) until it returns None."""
    while (item := fn() if state is None else fn(state=state)) is not None:
        yield item


def stdin_producer() -> Callable:
    """One message per line of standard input (without its line ending)."""

    def produce(work: dict) -> Iterator[Envelope]:
        # os.read, not sys.stdin: a thread blocked in sys.stdin holds its lock, which the
        # interpreter needs at exit (a stopped run would abort instead of exiting).
        fd = sys.stdin.fileno()
        rest = b""
        while chunk := os.read(fd, 1 << 16):
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            for line in lines:
                yield Envelope(line.rstrip(b"\r"))
        if rest:
            yield Envelope(rest.rstrip(b"\r"))

    return produce


def generate_producer(script: Script, count: int, interval: float) -> Callable:
    """``count`` messages (0: no end), one every `interval` seconds: each is the ``root``
    the script makes (``batch_index()`` counts from 0)."""

    def produce(work: dict) -> Iterator[Envelope]:
        i = first = work.get("count", 0)
        while not count or i < count:
            if interval and i > first:
                time.sleep(interval)
            env = script.apply(Envelope(b""), i, count)
            i += 1
            work["count"] = i
            if env is not None:
                yield env

    return produce


def file_producer(paths: list[str], codec: str) -> Callable:
    """The files matching the globs `paths`, in name order: a message per line
    (``codec: lines``) or per file (``all``), with metadata ``path``, ``mod_time_unix``
    and ``mod_time``. The position (file and line) is the checkpoint."""

    def produce(work: dict) -> Iterator[Envelope]:
        files = sorted({f for p in paths for f in glob.glob(p, recursive=True) if os.path.isfile(f)})
        done = set(work.get("done", ()))
        for path in files:
            if path in done:
                continue
            mtime = os.stat(path).st_mtime
            meta = {"path": path, "mod_time_unix": int(mtime),
                    "mod_time": datetime.fromtimestamp(mtime, timezone.utc).isoformat().replace("+00:00", "Z")}
            with open(path, "rb") as f:
                if codec == "all":
                    yield Envelope(f.read(), dict(meta))
                else:
                    skip = work.get("line", 0) if work.get("path") == path else 0
                    for n, line in enumerate(f):
                        if n < skip:
                            continue
                        work["path"], work["line"] = path, n + 1
                        yield Envelope(line.rstrip(b"\n").rstrip(b"\r"), dict(meta))
            done.add(path)
            work["done"] = sorted(done)
            work.pop("path", None), work.pop("line", None)

    return produce


# -- connectors -------------------------------------------------------------------------------
def envelope_of(item: Any) -> Envelope:
    """What a connector gives, as a message: a pipes.Message's headers become metadata."""
    if type(item) is Message:
        meta = {k: v.decode(errors="replace") if isinstance(v, bytes) else v for k, v in item.headers.items()}
        return Envelope(encode(item.value), meta)
    return Envelope(encode(item))


class ConnectorInput:
    """A pipes.io source as a pipeline input: one message per batch, its checkpoint as it is."""

    def __init__(self, inner: Any):
        self.inner = inner

    def checkpoint(self) -> Any:
        return self.inner.checkpoint()

    def restore(self, state: Any) -> Any:
        return self.inner.restore(state)

    async def open(self) -> None:
        if hasattr(self.inner, "open"):
            await maybe_await(self.inner.open())

    async def close(self) -> None:
        if hasattr(self.inner, "close"):
            await maybe_await(self.inner.close())

    async def committed(self, state: Any) -> None:
        if hasattr(self.inner, "committed"):
            await maybe_await(self.inner.committed(state))

    def __aiter__(self) -> Any:
        return self._batches()

    async def _batches(self) -> Any:
        inner = self.inner
        if hasattr(inner, "__aiter__"):
            async for item in inner:
                yield [envelope_of(item)]
            return
        while (item := await maybe_await(inner.read())) is not None:
            yield [envelope_of(item)]

    def __repr__(self) -> str:
        return f"ConnectorInput({self.inner!r})"
