"""Pipeline outputs, composed into one pipes sink object.

An output has ``async write(envelopes)``, ``flush()``, ``open()`` and ``close()``;
:class:`OutputSink` is the sink pipes runs, handing each output the messages of the
batches it receives.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from ..errors import ConfigError
from ..nodes import maybe_await
from ..script import Envelope, Script
from .processors import Errors

log = logging.getLogger("pipes")


class Output:
    async def open(self) -> None:
        pass

    async def write(self, envs: list[Envelope]) -> None:
        raise NotImplementedError

    async def flush(self) -> None:
        pass

    async def close(self) -> None:
        pass


class Stdout(Output):
    """Each message's content on a line of standard output."""

    async def write(self, envs: list[Envelope]) -> None:
        sys.stdout.buffer.write(b"".join([e.content + b"\n" for e in envs]))

    async def flush(self) -> None:
        sys.stdout.buffer.flush()


class File(Output):
    """Each message's content on a line of `path` (appended; directories created)."""

    def __init__(self, path: str):
        self.path = path
        self._file: Any = None

    async def open(self) -> None:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._file = open(self.path, "ab")
        except OSError as e:
            raise ConfigError(f"file output: cannot write to {self.path!r}: {e.strerror}") from None

    async def write(self, envs: list[Envelope]) -> None:
        self._file.write(b"".join([e.content + b"\n" for e in envs]))

    async def flush(self) -> None:
        self._file.flush()

    async def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Drop(Output):
    async def write(self, envs: list[Envelope]) -> None:
        pass


class Python(Output):
    """A script called per message (what it does with ``root`` is ignored)."""

    def __init__(self, script: Script, where: str):
        self.script = script
        self.errors = Errors(where, "the rest of the script was skipped for this message")

    async def write(self, envs: list[Envelope]) -> None:
        apply = self.script.apply
        n = len(envs)
        for i, env in enumerate(envs):
            res = apply(env, i, n)
            if res is not None and res.trace is not None:
                self.errors.seen(res)

    async def close(self) -> None:
        if self.errors.summary():
            log.warning("%s", self.errors.summary())


class Composite(Output):
    def __init__(self, outputs: list[Output]):
        self.outputs = outputs

    async def open(self) -> None:
        for o in self.outputs:
            await o.open()

    async def flush(self) -> None:
        for o in self.outputs:
            await o.flush()

    async def close(self) -> None:
        for o in self.outputs:
            await o.close()


class FanOut(Composite):
    """``broker`` with ``pattern: fan_out``: every output gets every message."""

    async def write(self, envs: list[Envelope]) -> None:
        for o in self.outputs:
            await o.write(envs)


class Switch(Composite):
    """Each message goes to the output of the first case whose ``check`` holds (a case
    without check always holds); a message no case takes is dropped."""

    def __init__(self, cases: list[tuple[Script | None, Output]], where: str):
        super().__init__([o for _, o in cases])
        self.checks = [c for c, _ in cases]
        self.errors = Errors(where, "the message was dropped")

    async def write(self, envs: list[Envelope]) -> None:
        groups: list[list[Envelope]] = [[] for _ in self.outputs]
        n = len(envs)
        for i, env in enumerate(envs):
            for c, check in enumerate(self.checks):
                ok = True if check is None else check.check(env, i, n)
                if isinstance(ok, Envelope):
                    self.errors.seen(ok)
                    break
                if ok:
                    groups[c].append(env)
                    break
        for out, group in zip(self.outputs, groups):
            if group:
                await out.write(group)

    async def close(self) -> None:
        await super().close()
        if self.errors.summary():
            log.warning("%s", self.errors.summary())


class Connector(Output):
    """A pipes.io sink: it gets each message's live object or decoded content (JSON, text
    or bytes)."""

    def __init__(self, inner: Any):
        self.inner = inner

    async def open(self) -> None:
        if hasattr(self.inner, "open"):
            await maybe_await(self.inner.open())

    async def write(self, envs: list[Envelope]) -> None:
        await maybe_await(self.inner.write([e.value() for e in envs]))

    async def flush(self) -> None:
        if hasattr(self.inner, "flush"):
            await maybe_await(self.inner.flush())

    async def close(self) -> None:
        if hasattr(self.inner, "close"):
            await maybe_await(self.inner.close())


class OutputSink:
    """The pipes sink of a pipeline: receives batches, writes their messages to `output`."""

    def __init__(self, output: Output):
        self.output = output

    async def open(self) -> None:
        await self.output.open()

    async def write(self, batches: list[list[Envelope]]) -> None:
        await self.output.write([e for batch in batches for e in batch])

    async def flush(self) -> None:
        await self.output.flush()

    async def close(self) -> None:
        await self.output.close()

    def __repr__(self) -> str:
        return f"OutputSink({type(self.output).__name__})"
