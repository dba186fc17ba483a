"""Datasets: a directory of part files and a manifest, written by a continuous writer
whose rows become visible atomically at ``checkpoint(state)``.

Layout of a dataset directory::

    _dataset.json        the manifest: format, last committed part number, state, offsets
    part-000000001.parquet ...   committed part files, numbered in commit order
    _staging/            part files being written (not yet committed)
    _lock                held by the one writer

A checkpoint seals the staged part files, then replaces the manifest (``os.replace``)
with one that counts them as committed and holds the new state: that replacement is
the commit. The sealed parts are then renamed out of ``_staging`` into the dataset;
a writer or reader that finds a committed part still in ``_staging`` (a crash came
between the two steps) uses or moves it from there. Staged parts numbered past the
manifest's count were never committed and are deleted by the next writer.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import decimal
import os
import re
from typing import Any, Iterable, Iterator

import orjson

from ..errors import ConfigError

MANIFEST = "_dataset.json"
STAGING = "_staging"
LOCK = "_lock"
FORMATS = ("parquet", "jsonl", "csv")
_PART = re.compile(r"^part-(\d+)\.(parquet|jsonl|csv)$")
_GROUP_ROWS = 10_000  # Parquet rows buffered in memory before a row group is written
_CONVERT_ROWS = 1_000  # Parquet rows buffered as dicts before they are converted to Arrow


def need_pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ConfigError("Parquet needs pyarrow: pip install pyarrow") from None
    return pyarrow


def part_name(seq: int, fmt: str) -> str:
    return f"part-{seq:09d}.{fmt}"


def row_of(value: Any) -> dict:
    """A value as a row: a dict as it is, anything else as {"value": value}."""
    return value if isinstance(value, dict) else {"value": value}


def _json_default(v: Any) -> Any:
    if isinstance(v, decimal.Decimal):
        return str(v)
    if isinstance(v, (set, frozenset, tuple)):
        return list(v)
    if hasattr(v, "isoformat"):  # pandas.Timestamp and other date-likes
        return v.isoformat()
    if hasattr(v, "item"):  # numpy scalars
        return v.item()
    raise TypeError(f"cannot write a {type(v).__name__} as JSON")


def json_line(row: Any) -> bytes:
    return orjson.dumps(row, default=_json_default, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"


def csv_cell(v: Any) -> Any:
    """None as an empty cell, nested values as JSON, anything else as csv writes it."""
    if v is None:
        return ""
    if isinstance(v, (dict, list, tuple)):
        return orjson.dumps(v, default=_json_default).decode()
    if isinstance(v, (datetime.date, datetime.time)):
        return v.isoformat()
    return v


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_dir(path: str, what: str) -> Any:
    """An exclusive lock on `path`/_lock, released when the returned file is closed
    (or the process dies); a second writer gets a clear error."""
    import fcntl

    f = open(os.path.join(path, LOCK), "a+b")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ConfigError(f"{what} {path!r} is in use by another writer (one writer at a time)") from None
    return f


# -- part files ---------------------------------------------------------------------------


class _TextPart:
    """A JSON lines or CSV part file, written row by row."""

    def __init__(self, path: str, fmt: str, columns: list[str]):
        self.path = path
        self.fmt = fmt
        self.rows = 0
        self.columns = columns
        self._colset = set(columns)
        self._file = open(path, "w" if fmt == "csv" else "wb", **({"newline": ""} if fmt == "csv" else {}))
        if fmt == "csv":
            self._csv = csv.writer(self._file)
            self._csv.writerow(columns)

    def fits(self, row: dict) -> bool:
        return self.fmt == "jsonl" or row.keys() <= self._colset

    def add(self, encoded: list) -> None:
        """Rows encoded by Parts: JSON lines, or dicts of CSV cells."""
        if self.fmt == "jsonl":
            self._file.write(b"".join(encoded))
        else:
            cols = self.columns
            self._csv.writerows([r.get(c, "") for c in cols] for r in encoded)
        self.rows += len(encoded)

    def close(self, fsync: bool) -> None:
        self._file.flush()
        if fsync:
            os.fsync(self._file.fileno())
        self._file.close()


class _ParquetPart:
    """A Parquet part file: Arrow tables buffered, written as row groups."""

    def __init__(self, path: str, schema: Any):
        self.path = path
        self.schema = schema
        self.rows = 0
        self._tables: list = []
        self._buffered = 0
        self._writer: Any = None

    def add(self, table: Any) -> None:
        self._tables.append(table)
        self._buffered += table.num_rows
        self.rows += table.num_rows
        if self._buffered >= _GROUP_ROWS:
            self._write()

    def _write(self) -> None:
        pa = need_pyarrow()
        if not self._tables:
            return
        if self._writer is None:
            self._writer = pa.parquet.ParquetWriter(self.path, self.schema)
        self._writer.write_table(pa.concat_tables(self._tables), row_group_size=max(self._buffered, 1))
        self._tables, self._buffered = [], 0

    def close(self, fsync: bool) -> None:
        self._write()
        if self._writer is None:  # no rows: still a valid, empty file
            self._writer = need_pyarrow().parquet.ParquetWriter(self.path, self.schema)
        self._writer.close()
        if fsync:
            with open(self.path, "rb") as f:
                os.fsync(f.fileno())


def _arrow_tables(rows: list[dict]) -> list:
    """Rows as Arrow tables: columns in order of first appearance, types inferred. Rows
    whose values do not share a type per column are split into runs that do."""
    try:
        return [_arrow_table(rows)]
    except ValueError:
        if len(rows) == 1:
            raise
    runs: list[list[dict]] = []
    types: dict[str, type] = {}
    for r in rows:
        kinds = {k: float if type(v) is int else type(v) for k, v in r.items() if v is not None}
        if not runs or any(types.get(k, t) is not t for k, t in kinds.items()):
            runs.append([])
            types = {}
        runs[-1].append(r)
        types.update(kinds)
    if len(runs) == 1:
        raise ValueError(f"cannot convert {len(rows)} rows to Arrow: {_error(rows)}")
    return [t for run in runs for t in _arrow_tables(run)]


def _error(rows: list[dict]) -> str:
    try:
        _arrow_table(rows)
    except ValueError as e:
        return str(e)
    return "?"


def _arrow_table(rows: list[dict]) -> Any:
    pa = need_pyarrow()
    names: dict[str, None] = {}
    for r in rows:
        names.update(dict.fromkeys(r))
    arrays = []
    for name in names:
        try:
            arrays.append(pa.array([r.get(name) for r in rows]))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise ValueError(f"column {name!r} has values of more than one type ({e})") from None
    return pa.Table.from_arrays(arrays, names=list(names))


def _conform(table: Any, schema: Any) -> Any:
    """`table` in `schema` (missing columns null, nulls and ints widened), or None when
    it has other columns or other types: those start a new part file."""
    pa = need_pyarrow()
    if not set(table.column_names) <= set(schema.names):
        return None
    arrays = []
    for field in schema:
        if field.name not in table.column_names:
            arrays.append(pa.nulls(table.num_rows, field.type))
            continue
        col = table[field.name]
        if col.type != field.type:
            if not (pa.types.is_null(col.type)
                    or (pa.types.is_integer(col.type) and pa.types.is_floating(field.type))):
                return None
            col = col.cast(field.type)
        arrays.append(col)
    return pa.Table.from_arrays(arrays, schema=schema)


class Parts:
    """Rows staged in numbered part files ``part-<seq>.<fmt>`` in the directory `staging`.

    A part is sealed when it holds `rows_per_file` rows, when a row does not fit its
    columns (CSV: a new column; Parquet: a new column or another type), and at
    :meth:`seal`, which returns every sealed part as (seq, path)."""

    def __init__(self, staging: str, fmt: str, *, first_seq: int, rows_per_file: int,
                 columns: list[str] | None = None, fsync: bool = False):
        self.staging = staging
        self.fmt = fmt
        self.first_seq = self.next_seq = first_seq
        self.rows_per_file = rows_per_file
        self.columns = list(columns or [])
        self.fsync = fsync
        self.sealed: list[tuple[int, str]] = []
        self.rows = 0  # staged since the last seal or drop
        self._part: Any = None
        self._pending: list[dict] = []  # Parquet rows not yet converted to Arrow

    def add(self, rows: list[dict], *, convert: bool = False) -> None:
        """Stage `rows`. For Parquet, rows are converted to Arrow in runs; `convert=True`
        converts now, so an error belongs to these rows."""
        if not rows:
            return
        if self.fmt == "parquet":
            self._pending += rows
            if convert or len(self._pending) >= _CONVERT_ROWS:
                self._convert()
        else:
            self._add_text(rows)
        self.rows += len(rows)

    def _open(self, **kw: Any) -> Any:
        os.makedirs(self.staging, exist_ok=True)
        path = os.path.join(self.staging, part_name(self.next_seq, self.fmt))
        self.next_seq += 1
        return _ParquetPart(path, **kw) if self.fmt == "parquet" else _TextPart(path, self.fmt, **kw)

    def _roll(self) -> None:
        if self._part is not None:
            self._part.close(self.fsync)
            self.sealed.append((self.next_seq - 1, self._part.path))
            self._part = None

    def _add_text(self, rows: list[dict]) -> None:
        # Encode everything first, so that a value that cannot be written stages no row.
        if self.fmt == "jsonl":
            encoded = [json_line(r) for r in rows]
        else:
            encoded = [{k: csv_cell(v) for k, v in r.items()} for r in rows]
        i = 0
        while i < len(rows):
            part = self._part
            if part is None or part.rows >= self.rows_per_file or not part.fits(rows[i]):
                self._roll()
                if self.fmt == "csv":
                    self.columns += [k for k in rows[i] if k not in self.columns]
                part = self._part = self._open(columns=list(self.columns))
            j = i
            room = self.rows_per_file - part.rows
            while j < len(rows) and j - i < room and part.fits(rows[j]):
                j += 1
            part.add(encoded[i:j])
            i = j

    def _convert(self) -> None:
        rows, self._pending = self._pending, []
        if not rows:
            return
        for table in _arrow_tables(rows):
            self._stage_table(table)

    def _stage_table(self, table: Any) -> None:
        while table.num_rows:
            part = self._part
            fitted = _conform(table, part.schema) if part is not None else None
            if fitted is None or part.rows >= self.rows_per_file:
                self._roll()
                part = self._part = self._open(schema=table.schema)
                fitted = table
            room = self.rows_per_file - part.rows
            part.add(fitted.slice(0, room))
            table = table.slice(room)

    def seal(self) -> list[tuple[int, str]]:
        """Close the open part; every part sealed since the last :meth:`done`, in order."""
        if self.fmt == "parquet":
            self._convert()
        self._roll()
        if self.sealed and self.fsync:
            fsync_dir(self.staging)
        return list(self.sealed)

    def done(self) -> None:
        """The sealed parts are committed: they are the caller's now."""
        self.sealed = []
        self.first_seq = self.next_seq
        self.rows = 0

    def drop(self) -> None:
        """Forget every staged row: close and delete the open and sealed parts."""
        self._pending = []
        if self._part is not None:
            with contextlib.suppress(Exception):
                self._part.close(False)
            self.sealed.append((self.next_seq - 1, self._part.path))
            self._part = None
        for _, path in self.sealed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.sealed = []
        self.next_seq = self.first_seq
        self.rows = 0


def read_part(path: str, fmt: str) -> Iterator[dict]:
    """The rows of one part file."""
    if fmt == "parquet":
        pq = need_pyarrow().parquet
        for batch in pq.ParquetFile(path).iter_batches(batch_size=_GROUP_ROWS):
            yield from batch.to_pylist()
    elif fmt == "jsonl":
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    yield orjson.loads(line)
    else:
        with open(path, newline="", encoding="utf-8") as f:
            yield from csv.DictReader(f)


# -- the dataset ----------------------------------------------------------------------------


def _load_manifest(path: str) -> dict:
    try:
        with open(os.path.join(path, MANIFEST), "rb") as f:
            return orjson.loads(f.read())
    except FileNotFoundError:
        return {}


class Dataset:
    """A dataset at `path` (a directory) in `format` "parquet" (the default, needs pyarrow),
    "jsonl" or "csv".

    * ``Dataset(path).writer()``: the continuous writer (:class:`DatasetWriter`).
    * ``Dataset(path).read()``: the committed rows, part by part, in commit order.
    * ``Dataset(path).get_state()``: the state of the last checkpoint.
    * ``app.sink(topic, Dataset(path))``: a sink, exactly-once: each pipes checkpoint
      commits the staged rows together with the highest offset written per
      (topic, partition), and messages at or below it are skipped when they are
      delivered again after a crash.

    `columns` names the columns (for ``write_tuple`` and the CSV header); without it
    they are those of the first row ever written. A part file holds at most
    `rows_per_file` rows. ``fsync=True`` makes a checkpoint durable across a machine
    crash too, at the cost of disk syncs.
    """

    wants_messages = True

    def __init__(self, path: str, format: str = "parquet", *, columns: list[str] | None = None,
                 rows_per_file: int = 100_000, fsync: bool = False):
        if format not in FORMATS:
            raise ConfigError(f"Dataset format={format!r}: use one of {', '.join(FORMATS)}")
        if not isinstance(rows_per_file, int) or rows_per_file < 1:
            raise ConfigError(f"Dataset rows_per_file={rows_per_file!r}: must be a positive integer")
        if format == "parquet":
            need_pyarrow()
        self.path = str(path)
        self.format = format
        self.columns = list(columns) if columns is not None else None
        self.rows_per_file = rows_per_file
        self.fsync = fsync
        self._sink: DatasetWriter | None = None

    def __repr__(self) -> str:
        return f"Dataset({self.path!r}, format={self.format!r})"

    # -- writing and reading ---------------------------------------------------------------
    def writer(self) -> DatasetWriter:
        """The continuous writer; use it as a context manager."""
        return DatasetWriter(self)

    def manifest(self) -> dict:
        """The last committed manifest ({} for a dataset never committed)."""
        m = _load_manifest(self.path)
        if m and m.get("format") != self.format:
            raise ConfigError(f"dataset {self.path!r} holds {m.get('format')} parts, not {self.format}: "
                              f"use Dataset({self.path!r}, format={m.get('format')!r})")
        return m

    def get_state(self) -> Any:
        """The state of the last checkpoint, or None."""
        return self.manifest().get("state")

    def read(self) -> Iterator[dict]:
        """The committed rows (dicts), part by part in commit order. Rows staged by a
        writer and not yet checkpointed are never read."""
        committed = self.manifest().get("parts", 0)
        for seq in range(1, committed + 1):
            yield from self._read_committed(seq)

    def _read_committed(self, seq: int) -> Iterator[dict]:
        name = part_name(seq, self.format)
        # A committed part is in the dataset, or still in _staging if the writer was
        # interrupted between the commit and the rename (or is renaming it now).
        for where in (self.path, os.path.join(self.path, STAGING), self.path):
            try:
                rows = read_part(os.path.join(where, name), self.format)
                first = next(rows, None)
            except FileNotFoundError:
                continue
            if first is not None:
                yield first
                yield from rows
            return
        raise FileNotFoundError(f"dataset {self.path!r}: committed part {name} is missing")

    # -- as a pipes sink ---------------------------------------------------------------------
    def open(self) -> None:
        self._sink = DatasetWriter(self)

    def write(self, batch: list[Any]) -> None:
        self._sink.write_messages(batch)

    def flush(self) -> None:
        self._sink.commit_messages()

    def close(self) -> None:
        # Called after the final checkpoint: anything still staged is not covered by one
        # and will be delivered again.
        if self._sink is not None:
            self._sink.close(failed=True)
            self._sink = None


class DatasetWriter:
    """Writes rows to a :class:`Dataset`; they are staged in part files and become
    visible atomically, together with `state`, at :meth:`checkpoint`.

        with pipes.io.Dataset("out/events").writer() as w:
            position = w.get_state()           # None on the first run
            for event in read_from(position):
                w.write_row_dict(event)
                w.checkpoint(event["position"])

    Leaving the ``with`` block normally commits rows written since the last checkpoint
    (with the last state); an exception, or ``close(failed=True)``, drops them.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        path = dataset.path
        os.makedirs(path, exist_ok=True)
        self._lock = lock_dir(path, "dataset")
        try:
            self._manifest = dataset.manifest()
            self._recover()
        except BaseException:
            self._lock.close()
            raise
        m = self._manifest
        self.columns: list[str] | None = dataset.columns or m.get("columns")
        self._state: Any = m.get("state")
        self._offsets: dict[tuple[str, int], int] = {
            (t, int(p)): o for t, parts in m.get("offsets", {}).items() for p, o in parts.items()}
        self._written: dict[tuple[str, int], int] = {}  # highest offsets staged, not committed
        self._parts = Parts(os.path.join(path, STAGING), dataset.format, first_seq=m.get("parts", 0) + 1,
                            rows_per_file=dataset.rows_per_file, columns=self.columns, fsync=dataset.fsync)
        self._closed = False

    def _recover(self) -> None:
        """Finish an interrupted commit (committed parts still staged) and delete what
        was staged and never committed."""
        path, fmt = self.dataset.path, self.dataset.format
        committed = self._manifest.get("parts", 0)
        staging = os.path.join(path, STAGING)
        for where in (staging, path):
            try:
                names = os.listdir(where)
            except FileNotFoundError:
                continue
            for name in names:
                m = _PART.match(name)
                if m is None or m.group(2) != fmt:
                    if where == staging:
                        os.unlink(os.path.join(staging, name))
                    continue
                if int(m.group(1)) > committed:
                    os.unlink(os.path.join(where, name))
                elif where == staging:
                    os.replace(os.path.join(staging, name), os.path.join(path, name))

    # -- writing rows ----------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"the writer of {self.dataset!r} is closed")

    def _learn_columns(self, row: dict) -> None:
        if self.columns is None:
            self.columns = list(row)
            self._parts.columns = list(self.columns)

    def write_row_dict(self, row: dict) -> None:
        """Stage one row: a dict of column name -> value."""
        self._check_open()
        row = dict(row)
        self._learn_columns(row)
        self._parts.add([row])

    def write_tuple(self, values: Iterable[Any]) -> None:
        """Stage one row given as values in column order (see Dataset(columns=...))."""
        self._check_open()
        values = tuple(values)
        if self.columns is None:
            raise ValueError(f"{self.dataset!r} has no columns yet: give Dataset(..., columns=[...]) "
                             f"or write a row dict first")
        if len(values) != len(self.columns):
            raise ValueError(f"write_tuple: {len(values)} values for {len(self.columns)} columns {self.columns}")
        self._parts.add([dict(zip(self.columns, values))])

    def write_dataframe(self, df: Any) -> None:
        """Stage every row of a pandas DataFrame (or a pyarrow Table or RecordBatch)."""
        self._check_open()
        if hasattr(df, "to_pylist"):
            rows = df.to_pylist()
        elif hasattr(df, "to_dict"):
            rows = df.to_dict(orient="records")
        else:
            raise TypeError(f"write_dataframe takes a pandas DataFrame or a pyarrow Table, not {type(df).__name__}")
        if rows:
            self._learn_columns(rows[0])
        self._parts.add(rows)

    # -- committing --------------------------------------------------------------------------
    def get_state(self) -> Any:
        """The state given to the last checkpoint (also one made before a restart), or None."""
        return self._state

    def checkpoint(self, state: Any) -> None:
        """Commit the rows written since the last checkpoint together with `state` (any
        JSON-serializable value): both become visible at once, or neither does."""
        self._check_open()
        self._commit(state, self._offsets)

    def _commit(self, state: Any, offsets: dict[tuple[str, int], int]) -> None:
        orjson.dumps(state, default=_json_default)  # fail before anything changes
        if not self._parts.rows and state == self._state and offsets == self._offsets \
                and self._manifest.get("parts") is not None:
            return
        path, fmt = self.dataset.path, self.dataset.format
        try:
            sealed = self._parts.seal()
            committed = sealed[-1][0] if sealed else self._manifest.get("parts", 0)
            by_topic: dict[str, dict[str, int]] = {}
            for (t, p), o in sorted(offsets.items()):
                by_topic.setdefault(t, {})[str(p)] = o
            manifest = {"format": fmt, "parts": committed, "columns": self.columns, "state": state,
                        "offsets": by_topic}
            tmp = os.path.join(path, MANIFEST + ".tmp")
            with open(tmp, "wb") as f:
                f.write(orjson.dumps(manifest, default=_json_default, option=orjson.OPT_INDENT_2))
                if self.dataset.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, os.path.join(path, MANIFEST))  # the commit
        except BaseException:
            self._parts.drop()  # a failed checkpoint drops what it would have committed
            raise
        self._parts.done()
        if self.dataset.fsync:
            fsync_dir(path)
        self._manifest, self._state, self._offsets = manifest, state, dict(offsets)
        for seq, staged in sealed:
            os.replace(staged, os.path.join(path, part_name(seq, fmt)))

    # -- as a sink -----------------------------------------------------------------------------
    def write_messages(self, batch: list[Any]) -> None:
        """Stage the values of pipes Messages, skipping those at or below the offset
        already committed for their (topic, partition)."""
        self._check_open()
        done, written = self._offsets, self._written
        rows, seen = [], {}
        for m in batch:
            tp = (m.topic, m.partition)
            last = seen.get(tp)
            if last is None:
                last = max(done.get(tp, -1), written.get(tp, -1))
            if m.offset <= last:
                continue  # committed before a crash, delivered again
            rows.append(row_of(m.value))
            seen[tp] = m.offset
        if rows:
            self._learn_columns(rows[0])
            self._parts.add(rows, convert=True)
        written.update(seen)

    def commit_messages(self) -> None:
        """Commit what write_messages staged, with the offsets it reached."""
        self._check_open()
        if not self._written and not self._parts.rows:
            return
        self._commit(self._state, {**self._offsets, **self._written})
        self._written = {}

    # -- closing -------------------------------------------------------------------------------
    def close(self, failed: bool = False) -> None:
        """Release the dataset. With `failed`, drop the rows written since the last
        checkpoint; without, commit them with the last state."""
        if self._closed:
            return
        try:
            if failed:
                self._parts.drop()
            elif self._parts.rows:
                self._commit(self._state, self._offsets)
        except BaseException:
            self._parts.drop()
            raise
        finally:
            self._closed = True
            with contextlib.suppress(OSError):  # left if a committed part could not be moved
                os.rmdir(os.path.join(self.dataset.path, STAGING))
            self._lock.close()

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(failed=exc_type is not None)
