"""Files: a source reading files matched by a glob pattern, and the sinks JsonLines, CSV
and Parquet.

:class:`Files` is a connector (``checkpoint()``/``restore()``/``open()``/``committed()``
and an async iterator): its checkpoint is the file it is reading and the byte offset
(or Parquet row) after the last message it produced, stored by pipes atomically with
those messages, so a restarted worker resumes exactly there.
"""

from __future__ import annotations

import asyncio
import csv
import errno
import glob
import logging
import os
import shutil
from typing import Any, AsyncIterator, Iterator

import orjson

from ..errors import ConfigError
from ..message import Message
from .dataset import STAGING, Parts, csv_cell, fsync_dir, lock_dir, need_pyarrow, part_name, row_of

log = logging.getLogger("pipes")

_CHUNK = 64 * 1024  # bytes read at a time; the event loop gets control between chunks
_PARQUET_BATCH = 1024  # rows read at a time from a Parquet file
_BOM = b"\xef\xbb\xbf"


class Files:
    """A source: one message per line, JSON line, CSV row or Parquet row of the files
    matching `pattern` (a glob; ``**`` matches subdirectories), read one at a time in
    name order.

    * ``format``: ``"lines"`` (each line as a str, without its line ending),
      ``"jsonl"`` (each line parsed as JSON; blank lines are skipped), ``"csv"`` (each
      row as a dict of str, keyed by the file's header row) or ``"parquet"`` (each row
      as a dict; needs pyarrow; read in batches of rows, never the whole file).
    * ``follow=True`` (the default) keeps watching for new files, every ``poll``
      seconds, and waits at the end of the newest file for more lines: a line without
      its line ending (a writer still appending) is held back until it is complete.
      A file is finished once it is read to its end and another file is waiting to be
      read (Parquet files: once read). With ``follow=False`` the source reads the files
      there are, last lines included, and ends.
    * ``after="delete"`` or ``after="move:DIR"`` deletes, or moves into DIR, each
      finished file once the checkpoint covering its last message is durable.

    Messages have the headers ``path`` and ``offset`` (the byte offset where the line or
    CSV row starts; ``row`` for Parquet, the row's index in the file).

    Without ``after=``, files that sort before the one being read are taken as read, so
    name new files so that they sort after older ones (timestamps, sequence numbers).
    With ``after=``, every file present that was not yet finished is read, in name
    order.
    """

    FORMATS = ("lines", "jsonl", "csv", "parquet")

    def __init__(self, pattern: str, format: str = "lines", *, poll: float = 1.0, follow: bool = True,
                 after: str | None = None):
        if format not in self.FORMATS:
            raise ConfigError(f"Files format={format!r}: use one of {', '.join(self.FORMATS)}")
        if not isinstance(poll, (int, float)) or poll <= 0:
            raise ConfigError(f"Files poll={poll!r}: must be a positive number of seconds")
        self._move_to: str | None = None
        if after is not None:
            if after.startswith("move:") and after[5:]:
                self._move_to = os.path.abspath(after[5:])
            elif after != "delete":
                raise ConfigError(f"Files after={after!r}: use None, 'delete' or 'move:DIR'")
        if format == "parquet":
            need_pyarrow()
        self.pattern = str(pattern)
        self.format = format
        self.poll = poll
        self.follow = follow
        self.after = after
        self._restored: dict | None = None
        self._opened = False
        self._reset({})

    def __repr__(self) -> str:
        return f"Files({self.pattern!r}, format={self.format!r})"

    def _reset(self, state: dict) -> None:
        self._path: str | None = state.get("path")  # the file being read (or the last one read)
        self._offset: int = state.get("offset", 0)  # bytes (rows for Parquet) of it already produced
        self._done: bool = state.get("done", False)  # whether it is finished
        self._finished: list[str] = list(state.get("finished", ()))  # finished, `after=` still to do
        self._header: list[str] | None = None  # the CSV header of the file being read
        self._pending: list[str] = []  # CSV: lines of a row not complete yet
        self._quotes = 0
        self._row_start = 0
        self._known: set[str] | None = None
        self._warned: set[str] = set()
        self._status = "ok"

    # -- the connector API ----------------------------------------------------------------
    def checkpoint(self) -> dict:
        """Where to resume: after the last message produced."""
        if self._path is None:
            return {}
        state = {"path": self._path, "offset": self._offset, "done": self._done}
        if self.after is not None:
            state["finished"] = list(self._finished)
        return state

    def restore(self, state: dict) -> None:
        self._restored = dict(state)

    def open(self) -> None:
        self._reset(self._restored or {})
        self._restored = None
        self._opened = True
        # Files finished in a checkpoint that is durable: their `after=` may not have run.
        self._dispose(self._finished)
        self._finished = []

    def committed(self, state: dict) -> None:
        """The checkpoint holding `state` is durable: delete or move the files it finished."""
        files = state.get("finished") or []
        if files:
            self._dispose(files)
            gone = set(files)
            self._finished = [f for f in self._finished if f not in gone]

    def close(self) -> None:
        self._opened = False

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._items()

    # -- choosing files ---------------------------------------------------------------------
    def _list(self) -> list[str]:
        files = [f for f in glob.glob(self.pattern, recursive=True) if os.path.isfile(f)]
        if self._move_to is not None:
            inside = self._move_to + os.sep
            files = [f for f in files if not os.path.abspath(f).startswith(inside)]
        files.sort()
        if self.after is None and self._path is not None:
            new = set(files) - self._known if self._known is not None else set()
            for f in sorted(new):
                if f < self._path and f not in self._warned:
                    self._warned.add(f)
                    log.warning("%r: new file %r sorts before %r, which is being read or was read: it is "
                                "skipped (name new files so that they sort after older ones)", self, f, self._path)
        self._known = set(files)
        return files

    def _next(self, files: list[str]) -> str | None:
        """The next file to read after the current one."""
        if self.after is None:
            return next((f for f in files if self._path is None or f > self._path), None)
        skip = set(self._finished)
        skip.add(self._path)
        return next((f for f in files if f not in skip), None)

    def _finish(self) -> None:
        self._done = True
        self._header = None
        if self.after is not None:
            self._finished.append(self._path)

    def _dispose(self, files: list[str]) -> None:
        """Delete or move finished files (those already gone are skipped)."""
        for path in files:
            try:
                if self._move_to is None:
                    os.unlink(path)
                else:
                    _move(path, self._move_to)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise OSError(e.errno, f"{self!r} cannot {'delete' if self._move_to is None else 'move'} "
                                       f"{path!r}, which it has read: {e.strerror}") from e

    # -- reading ------------------------------------------------------------------------------
    async def _items(self) -> AsyncIterator[Message]:
        if not self._opened:
            self.open()
        read = self._read_parquet if self.format == "parquet" else self._read_text
        while True:
            files = self._list()
            if self._path is not None and not self._done:
                path = self._path  # resume the current file
            else:
                path = self._next(files)
                if path is None:
                    if not self.follow:
                        return
                    await asyncio.sleep(self.poll)
                    continue
                self._path, self._offset, self._done, self._header = path, 0, False, None
            complete = self.format == "parquet" or not self.follow
            async for m in read(path, final=complete):
                yield m
            if self._status == "missing":
                log.warning("%r: %r is gone before it was read to its end", self, path)
                self._done = True  # nothing of it left to read, nothing to delete
                continue
            if self._status == "unreadable" or (not complete and self._next(self._list()) is None):
                await asyncio.sleep(self.poll)  # wait for more lines, or for a newer file
                continue
            if not complete:
                # Another file is waiting, so this one is finished: read what was appended
                # since, and its last line even without a line ending.
                async for m in read(path, final=True):
                    yield m
            self._finish()

    async def _read_text(self, path: str, final: bool) -> AsyncIterator[Message]:
        """Messages of the complete lines of `path` after the current offset, and with
        `final` its unterminated last line too."""
        self._status = "ok"
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            self._status = "missing"
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            if size < self._offset:
                raise ValueError(f"{self!r}: {path!r} has {size} bytes, fewer than the {self._offset} already "
                                 f"read: a file must only grow until it is finished")
            if self.format == "csv" and self._header is None and self._offset > 0:
                header, header_end = _csv_header(f, path)
                if header_end <= self._offset:  # else the header is read below
                    self._header = header
            self._pending = []
            self._quotes = 0
            f.seek(self._offset)
            pos = self._offset  # file offset of buf[0]
            buf = bytearray()
            while True:
                chunk = f.read(_CHUNK)
                if not chunk:
                    break
                buf += chunk
                if pos == 0 and buf.startswith(_BOM):
                    del buf[:3]
                    pos = self._offset = 3
                cut = buf.rfind(b"\n") + 1
                if cut:
                    for m in self._records(path, bytes(buf[:cut]), pos, False):
                        yield m
                    del buf[:cut]
                    pos += cut
                await asyncio.sleep(0)
            if final and (buf or self._pending):
                for m in self._records(path, bytes(buf), pos, True):
                    yield m

    def _records(self, path: str, data: bytes, pos: int, last: bool) -> Iterator[Message]:
        """Messages of the lines in `data`, read at file offset `pos`: its complete lines,
        and with `last` the rest too. The offset after each is set before it is yielded."""
        lines = data.split(b"\n")
        tail = lines.pop()  # what follows the last line ending: b"" unless `last`
        if last and tail:
            lines.append(tail)
        fmt, stop = self.format, pos + len(data)
        start = pos
        for raw in lines:
            end = min(start + len(raw) + 1, stop)
            line = raw[:-1] if raw.endswith(b"\r") else raw
            at = start
            if fmt == "lines":
                value: Any = _decode(line, path, start)
            elif fmt == "jsonl":
                if not line.strip():
                    value = None
                else:
                    try:
                        value = orjson.loads(line)
                    except orjson.JSONDecodeError as e:
                        raise ValueError(f"{self!r}: {path!r} at byte {start}: not JSON: {e}") from None
            else:
                value = self._csv_row(path, raw, start, end, force=False)
                at = self._row_start
            start = end
            if value is None:  # a blank line, the CSV header, or a CSV row that goes on
                continue
            self._offset = end
            yield Message(value, headers={"path": path, "offset": at})
        if last and self._pending:  # an unclosed quote at the very end: what csv makes of it
            value = self._csv_row(path, b"", stop, stop, force=True)
            if value is not None:
                yield Message(value, headers={"path": path, "offset": self._row_start})

    def _csv_row(self, path: str, raw: bytes, start: int, end: int, force: bool = False) -> dict | None:
        """Add one line to the CSV row being assembled; the row as a dict once complete
        (None while it goes on, for the header and for blank lines)."""
        if raw or not force:
            text = _decode(raw, path, start) + "\n"
            if not self._pending:
                self._row_start = start
            self._pending.append(text)
            self._quotes += text.count('"')
            if self._quotes % 2 and not force:
                return None  # inside a quoted field that goes on on the next line
        row = next(csv.reader(self._pending), [])
        self._pending, self._quotes = [], 0
        self._offset = end
        if self._header is None:
            self._header = row
            return None
        if not row:
            return None
        header = self._header
        if len(row) > len(header):
            raise ValueError(f"{self!r}: {path!r} at byte {self._row_start}: {len(row)} fields, "
                             f"but the header has {len(header)}")
        return dict(zip(header, row + [None] * (len(header) - len(row))))

    async def _read_parquet(self, path: str, final: bool) -> AsyncIterator[Message]:
        """Messages of the rows of a Parquet file after the current row, in batches."""
        pa = need_pyarrow()
        self._status = "ok"
        try:
            pf = pa.parquet.ParquetFile(path)
        except FileNotFoundError:
            self._status = "missing"
            return
        except (pa.ArrowException, OSError) as e:
            if not self.follow:
                raise ValueError(f"{self!r}: {path!r} is not a readable Parquet file: {e}") from None
            if path not in self._warned:  # perhaps still being written: try again later
                self._warned.add(path)
                log.warning("%r: cannot read %r yet (%s); trying again every %s s", self, path, e, self.poll)
            self._status = "unreadable"
            return
        with pf:
            meta = pf.metadata
            groups, first, seen = [], 0, 0
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                if seen + n > self._offset:
                    if not groups:
                        first = seen
                    groups.append(g)
                seen += n
            if not groups:
                return
            row = first
            for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, row_groups=groups):
                rows = batch.to_pylist()
                skip = self._offset - row
                for i in range(max(skip, 0), len(rows)):
                    self._offset = row + i + 1
                    yield Message(rows[i], headers={"path": path, "row": row + i})
                row += len(rows)
                await asyncio.sleep(0)


def _decode(raw: bytes, path: str, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"Files: {path!r} at byte {offset}: not UTF-8 ({e})") from None


def _csv_header(f: Any, path: str) -> tuple[list[str], int]:
    """The header row of a CSV file and the offset after it (read from its start; the
    file position is not kept)."""
    f.seek(0)
    lines, quotes = [], 0
    while True:
        line = f.readline()
        if not line:
            break
        text = _decode(line.removeprefix(_BOM) if not lines else line, path, 0)
        lines.append(text)
        quotes += text.count('"')
        if quotes % 2 == 0:
            break
    return next(csv.reader(lines), []), f.tell()


def _move(path: str, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    name = os.path.basename(path)
    target = os.path.join(directory, name)
    n = 0
    while os.path.exists(target):  # keep an earlier file of the same name
        n += 1
        target = os.path.join(directory, f"{name}.{n}")
    try:
        os.rename(path, target)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        shutil.move(path, target)  # another file system


# -- sinks ------------------------------------------------------------------------------------


class _AppendingFile:
    """A sink appending to one file: flushed (optionally fsynced) at every checkpoint."""

    def __init__(self, path: str, *, fsync: bool = False):
        self.path = path
        self.fsync = fsync
        self._file: Any = None

    def flush(self) -> None:
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"


class JsonLines(_AppendingFile):
    """Appends each value as one line of JSON to `path` (directories are created).

    Lines are written at every checkpoint, before it is committed: after a crash the
    file may hold the lines of the last uncommitted checkpoint again (at-least-once).
    ``fsync=True`` also survives a machine crash, at the cost of a disk sync per checkpoint.
    """

    def open(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._file = open(self.path, "ab")

    def write(self, batch: list[Any]) -> None:
        dumps = orjson.dumps
        self._file.write(b"".join(dumps(v) + b"\n" for v in batch))


class CSV(_AppendingFile):
    """Appends each value as one CSV row to `path` (directories are created).

    A dict is written under the file's header: the header already in the file, else
    `columns`, else the keys of the first dict (written as the header of a new file);
    a dict with a key not in the header is an error (its batch goes to the DLQ). A list
    or tuple is written as a row as it is; any other value as a one-column row. None is
    an empty cell, dicts and lists in cells are JSON.

    Like JsonLines: rows are flushed at every checkpoint, before it is committed, so
    after a crash the rows of the last uncommitted checkpoint may be written again
    (at-least-once). A row left incomplete by a crash is removed when the sink opens.
    """

    def __init__(self, path: str, *, columns: list[str] | None = None, fsync: bool = False):
        super().__init__(path, fsync=fsync)
        self.columns = list(columns) if columns is not None else None
        self._header: list[str] | None = None

    def open(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        header = None
        with open(self.path, "a+b") as f:
            size = f.seek(0, os.SEEK_END)
            if size:
                f.seek(max(0, size - _CHUNK))
                tail = f.read()
                if not tail.endswith(b"\n"):  # a row cut short by a crash, never committed
                    f.truncate(size - len(tail) + tail.rfind(b"\n") + 1)
                header = _csv_header(f, self.path)[0] or None
        if header is not None and self.columns is not None and header != self.columns:
            raise ConfigError(f"CSV {self.path!r} has the header {header}, not columns={self.columns}")
        self._header = header
        self._file = open(self.path, "a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        if self._header is None and self.columns is not None:
            self._set_header(self.columns)

    def _set_header(self, columns: list[str]) -> None:
        self._header = list(columns)
        if self._file.tell() == 0:
            self._writer.writerow(self._header)

    def write(self, batch: list[Any]) -> None:
        rows = []
        header = self._header
        for v in batch:
            if isinstance(v, dict):
                if header is None:
                    header = list(v)
                extra = [k for k in v if k not in header]
                if extra:
                    raise ValueError(f"CSV {self.path!r}: columns {extra} are not in the header {header}")
                rows.append([csv_cell(v.get(c)) for c in header])
            elif isinstance(v, (list, tuple)):
                rows.append([csv_cell(x) for x in v])
            else:
                rows.append([csv_cell(v)])
        if header is not None and self._header is None:
            self._set_header(header)
        self._writer.writerows(rows)


class Parquet:
    """Writes values as rows (a dict as it is, any other value as {"value": v}) to
    Parquet part files ``part-<n>.parquet`` in the directory `dir`. Needs pyarrow.

    Rows are written to part files under ``dir/_staging`` and renamed into `dir` at
    every checkpoint, before it is committed, so a reader never sees a partial file.
    A checkpoint makes one part file (none if there were no rows), or more when a part
    reaches `rows_per_file` rows or when the rows change columns or types. After a crash,
    rows staged and not flushed are dropped and delivered again; the rows of a
    checkpoint whose part files were renamed just before the crash may be written again
    (at-least-once; use :class:`~pipes.io.Dataset` for exactly-once).
    """

    def __init__(self, dir: str, *, rows_per_file: int = 100_000, fsync: bool = False):
        if not isinstance(rows_per_file, int) or rows_per_file < 1:
            raise ConfigError(f"Parquet rows_per_file={rows_per_file!r}: must be a positive integer")
        need_pyarrow()
        self.dir = str(dir)
        self.rows_per_file = rows_per_file
        self.fsync = fsync
        self._parts: Parts | None = None
        self._lock: Any = None

    def open(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        self._lock = lock_dir(self.dir, "Parquet directory")
        staging = os.path.join(self.dir, STAGING)
        shutil.rmtree(staging, ignore_errors=True)  # never renamed: not covered by a checkpoint
        last = 0
        for name in os.listdir(self.dir):
            if name.startswith("part-") and name.endswith(".parquet") and name[5:-8].isdigit():
                last = max(last, int(name[5:-8]))
        self._parts = Parts(staging, "parquet", first_seq=last + 1, rows_per_file=self.rows_per_file,
                            fsync=self.fsync)

    def write(self, batch: list[Any]) -> None:
        self._parts.add([row_of(v) for v in batch], convert=True)

    def flush(self) -> None:
        sealed = self._parts.seal()
        self._parts.done()
        for seq, staged in sealed:
            os.replace(staged, os.path.join(self.dir, part_name(seq, "parquet")))
        if sealed and self.fsync:
            fsync_dir(self.dir)

    def close(self) -> None:
        if self._parts is not None:
            self._parts.drop()
            self._parts = None
            shutil.rmtree(os.path.join(self.dir, STAGING), ignore_errors=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __repr__(self) -> str:
        return f"Parquet({self.dir!r})"
