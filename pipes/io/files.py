"""File sinks."""

from __future__ import annotations

import os
from typing import Any

import orjson


class JsonLines:
    """Appends each value as one line of JSON to `path` (directories are created).

    Lines are written at every checkpoint, before it is committed: after a crash the
    file may hold the lines of the last uncommitted checkpoint again (at-least-once).
    ``fsync=True`` also survives a machine crash, at the cost of a disk sync per checkpoint.
    """

    def __init__(self, path: str, *, fsync: bool = False):
        self.path = path
        self.fsync = fsync
        self._file: Any = None

    def open(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._file = open(self.path, "ab")

    def write(self, batch: list[Any]) -> None:
        dumps = orjson.dumps
        self._file.write(b"".join(dumps(v) + b"\n" for v in batch))

    def flush(self) -> None:
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __repr__(self) -> str:
        return f"JsonLines({self.path!r})"
