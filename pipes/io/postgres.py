"""PostgreSQL: a source that reads a table (or a query) by an increasing column, and an
exactly-once sink that writes rows and its position in one transaction.

Both use asyncpg (``pip install asyncpg``), imported when they open.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Sequence

import orjson

from ..errors import ConfigError
from ..message import Message

log = logging.getLogger("pipes")


def _asyncpg() -> Any:
    try:
        import asyncpg
    except ImportError:
        raise ConfigError("the PostgreSQL connectors need asyncpg: pip install asyncpg") from None
    return asyncpg


def _ident(name: str) -> str:
    """A quoted SQL identifier; ``schema.table`` is quoted part by part."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


def _json_text(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


async def _connect(dsn: str) -> Any:
    conn = await _asyncpg().connect(dsn)
    # json and jsonb columns as Python objects, both ways.
    for t in ("json", "jsonb"):
        await conn.set_type_codec(t, encoder=_json_text, decoder=orjson.loads, schema="pg_catalog")
    return conn


async def _close(conn: Any) -> None:
    if conn is not None:
        try:
            await asyncio.wait_for(conn.close(), 5)
        except Exception:
            conn.terminate()


def _where(dsn: str) -> str:
    """The DSN without its password, for error messages."""
    head, at, tail = dsn.rpartition("@")
    if not at:
        return dsn
    scheme, sep, user = head.partition("://")
    return f"{scheme}{sep}{user.split(':', 1)[0]}@{tail}"


# -- the source ----------------------------------------------------------------------------
class PostgresSource:
    """The rows of `table` (or of `query`), in the order of `column`, one dict per row.

    `column` is a column, or a tuple of columns compared as a row, whose values increase
    and are unique: the checkpoint is the value of the last row given, and the next read
    asks for the rows after it (``WHERE column > last ORDER BY column LIMIT batch``, an
    index scan when `column` is indexed). A timestamp is not unique: pair it with the
    primary key, ``column=("created_at", "id")``.

    With ``follow=True`` (the default) the table is polled every `poll` seconds once read
    to its end, for ever; with ``follow=False`` the source ends at the end of the table.
    `where` is an extra SQL condition; `after` the value to start after at the first start.

    A row is read once its transaction has committed. A sequence-generated id is taken
    when a row is inserted, not when it commits, so ids can become visible out of order:
    a row committed after a higher id has been read is never read. Order by the inserting
    transaction to rule that out (see docs/connectors/postgres.md)::

        ALTER TABLE orders ADD COLUMN tx xid8 NOT NULL DEFAULT pg_current_xact_id();
        PostgresSource(dsn, "orders", column=("tx", "id"),
                       where="tx < pg_snapshot_xmin(pg_current_snapshot())")
    """

    def __init__(self, dsn: str, table: str | None = None, *, query: str | None = None,
                 column: str | Sequence[str] = "id", where: str | None = None, after: Any = None,
                 follow: bool = True, poll: float = 1.0, batch: int = 1000):
        if (table is None) == (query is None):
            raise ConfigError("PostgresSource takes a table or a query= (one of them)")
        columns = (column,) if isinstance(column, str) else tuple(column)
        if not columns or not all(isinstance(c, str) and c for c in columns):
            raise ConfigError(f"PostgresSource: column= takes a column name or a tuple of them, not {column!r}")
        if not isinstance(batch, int) or batch < 1:
            raise ConfigError(f"PostgresSource: batch= must be a positive integer, not {batch!r}")
        if not isinstance(poll, (int, float)) or poll <= 0:
            raise ConfigError(f"PostgresSource: poll= must be a positive number of seconds, not {poll!r}")
        if after is not None and len(columns) > 1 and (not isinstance(after, (tuple, list))
                                                        or len(after) != len(columns)):
            raise ConfigError(f"PostgresSource: after= must hold one value per column {columns}, not {after!r}")
        self.dsn = dsn
        self.table = table
        self.query = query
        self.columns = columns
        self.where = where
        self.follow = follow
        self.poll = poll
        self.batch = batch
        self._last: Any = tuple(after) if isinstance(after, list) else after
        self._rows: deque = deque()
        self._conn: Any = None
        self._first: Any = None  # prepared statements: from the start, and after a position
        self._next: Any = None

    # -- checkpoint ------------------------------------------------------------------------
    def checkpoint(self) -> dict:
        return {"after": self._last, "column": list(self.columns)}

    def restore(self, state: dict) -> None:
        saved = tuple(state.get("column") or ())
        if saved and saved != self.columns:
            raise ConfigError(f"PostgresSource on {self._what()}: the checkpoint is a position in column(s) "
                              f"{saved}, not {self.columns}; reset the app (pipes reset) or rename the source")
        self._last = state.get("after")

    # -- reading ---------------------------------------------------------------------------
    async def open(self) -> None:
        self._conn = await _connect(self.dsn)
        source = _ident(self.table) if self.table is not None else f"({self.query}) AS pipes_query"
        cols = ", ".join(_ident(c) for c in self.columns)
        if len(self.columns) == 1:
            after = f"{cols} > $1"
        else:
            after = f"({cols}) > ({', '.join(f'${i + 1}' for i in range(len(self.columns)))})"
        extra = f"({self.where})" if self.where else None

        def select(*conditions: str | None) -> str:
            conds = [c for c in conditions if c]
            where = f" WHERE {' AND '.join(conds)}" if conds else ""
            return f"SELECT * FROM {source}{where} ORDER BY {cols} LIMIT {self.batch}"

        try:
            self._first = await self._conn.prepare(select(extra))
            self._next = await self._conn.prepare(select(after, extra))
        except _retryable():
            await self._drop()
            raise
        except Exception as e:
            await self._drop()
            raise ConfigError(f"PostgresSource on {self._what()}: {type(e).__name__}: {e}") from e

    async def read(self) -> dict | None:
        """The next row, waiting for one when following; None at the end otherwise."""
        rows = self._rows
        while not rows:
            fetched = await self._fetch()
            if fetched:
                rows.extend(fetched)
                break
            if not self.follow:
                return None
            await asyncio.sleep(self.poll)
        row = rows.popleft()
        cols = self.columns
        self._last = row[cols[0]] if len(cols) == 1 else tuple(row[c] for c in cols)
        return dict(row.items())

    async def _fetch(self) -> list:
        """The next rows after the last one given; a lost connection is opened again (for
        about 15 s) before the source fails."""
        delay = 0.5
        while True:
            try:
                if self._conn is None:
                    await self.open()
                if self._last is None:
                    return await self._first.fetch()
                if len(self.columns) == 1:
                    return await self._next.fetch(self._last)
                return await self._next.fetch(*self._last)
            except _retryable() as e:
                if delay > 8:
                    raise
                log.warning("PostgresSource on %s: %s: %s; connecting again in %.1f s", self._what(),
                            type(e).__name__, e, delay)
                await self._drop()
                await asyncio.sleep(delay)
                delay *= 2

    async def close(self) -> None:
        self._rows.clear()
        await self._drop()

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        await _close(conn)

    def _what(self) -> str:
        return f"{self.table!r}" if self.table is not None else "a query"

    def __repr__(self) -> str:
        return f"PostgresSource({_where(self.dsn)!r}, {self._what()}, column={self.columns})"


# -- the sink ------------------------------------------------------------------------------
OFFSETS_TABLE = "pipes_offsets"


class PostgresSink:
    """Writes each value (a dict of column -> value) as a row of `table`, exactly once.

    Every batch is one transaction that inserts (or, with `upsert_on`, upserts) the rows
    and records, per input topic and partition, the highest offset written in the
    `offsets_table` (created if missing) under the sink's `name` (default: the table).
    Messages at or below the recorded offset are skipped, so those a crash makes pipes
    deliver again — written, but not yet covered by a pipes checkpoint — are not written
    twice.

    Rows go to the server as one JSON document per batch and are converted to the
    table's column types there (``jsonb_populate_recordset``): ISO date strings fill
    timestamp columns, nested values jsonb columns. A column missing from a value gets
    its default; `columns` lists the keys to write (others are ignored, a missing one is
    written as NULL). `upsert_on` names the columns of a unique index: a row with the same
    values replaces the one there (the last one wins within a batch too).

    A batch PostgreSQL rejects (a constraint, a type) is handed to the node's
    ``on_error`` (dead-letter topic by default), and its offsets are recorded in
    ``<offsets_table>_rejected`` in the same transaction, so that if a crash loses the
    dead letters before pipes' checkpoint, the batch is rejected again when it comes back
    rather than skipped as written. A lost connection fails the checkpoint instead: the
    worker restarts from the previous one, and nothing is lost or doubled.
    """

    wants_messages = True

    def __init__(self, dsn: str, table: str, *, upsert_on: Sequence[str] | None = None,
                 columns: Sequence[str] | None = None, name: str | None = None,
                 offsets_table: str = OFFSETS_TABLE):
        if not table or not isinstance(table, str):
            raise ConfigError(f"PostgresSink: table must be a table name, not {table!r}")
        if isinstance(upsert_on, str):
            upsert_on = (upsert_on,)
        if isinstance(columns, str):
            columns = (columns,)
        if upsert_on is not None and not upsert_on:
            raise ConfigError("PostgresSink: upsert_on= names at least one column")
        if columns is not None and upsert_on is not None and not set(upsert_on) <= set(columns):
            raise ConfigError(f"PostgresSink: upsert_on={list(upsert_on)} must be among columns={list(columns)}")
        self.dsn = dsn
        self.table = table
        self.upsert_on = tuple(upsert_on) if upsert_on is not None else None
        self.columns = tuple(columns) if columns is not None else None
        self.name = name or table
        self.offsets_table = offsets_table
        self.rejects_table = f"{offsets_table}_rejected"
        self._conn: Any = None
        self._statements: dict[tuple[str, ...], str] = {}
        self._stash: list[Message] = []  # batches a lost connection kept from PostgreSQL
        # Rejected (topic, partition, offset)s: of this checkpoint, and of checkpoints that are
        # durable once anything more is written (the process would have stopped otherwise).
        self._rejected: set[tuple[str, int, int]] = set()
        self._prunable: set[tuple[str, int, int]] = set()
        self.written = 0  # rows this process wrote
        self.skipped = 0  # messages it skipped as already written

    async def open(self) -> None:
        conn = await self._connection()
        if await conn.fetchval("SELECT to_regclass($1)", _ident(self.table)) is None:
            raise ConfigError(f"PostgresSink: no table {self.table!r} in {_where(self.dsn)}")
        for table, key in ((self.offsets_table, ""), (self.rejects_table, ', "offset"')):
            try:
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {_ident(table)} (sink text NOT NULL, topic text NOT NULL, "
                    f'"partition" integer NOT NULL, "offset" bigint NOT NULL, '
                    f'updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (sink, topic, "partition"{key}))')
            except _asyncpg().UniqueViolationError:
                pass  # another sink created it at the same moment

    async def write(self, batch: list[Message]) -> None:
        if batch and (type(batch[0]) is not Message or batch[0].offset is None):
            raise TypeError("PostgresSink takes pipes.Message objects with topic, partition and offset "
                            "(the runtime gives them, as the sink has wants_messages = True)")
        if self._stash:  # keep the order: behind what is waiting for the connection
            self._stash += batch
            return
        try:
            await self._commit(batch)
        except _retryable() as e:
            log.warning("PostgresSink %s: %s: %s; retrying at the checkpoint", self.name, type(e).__name__, e)
            self._stash = list(batch)
            await self._drop()

    async def flush(self) -> None:
        """Write what a lost connection held back; raise (failing the checkpoint) if it still cannot."""
        delay = 0.2
        while self._stash:
            try:
                await self._commit(self._stash)
                self._stash = []
            except _retryable() as e:
                await self._drop()
                if delay > 2:
                    raise ConnectionError(f"PostgresSink {self.name}: cannot write to {_where(self.dsn)}: "
                                          f"{type(e).__name__}: {e}") from e
                await asyncio.sleep(delay)
                delay *= 2
        self._prunable |= self._rejected
        self._rejected = set()

    async def close(self) -> None:
        self._rejected.clear()  # whether the last checkpoint is durable is not known here
        self._prunable.clear()
        await self._drop()

    # -- one transaction -------------------------------------------------------------------
    async def _commit(self, batch: list[Message]) -> None:
        if not batch:
            return
        conn = await self._connection()
        offsets, rejects = _ident(self.offsets_table), _ident(self.rejects_table)
        tps = sorted({(m.topic, m.partition) for m in batch})
        topics, parts = [t for t, _ in tps], [p for _, p in tps]
        failure: Exception | None = None
        again: list[tuple[str, int, int]] = []
        async with conn.transaction():
            await conn.execute(
                f'INSERT INTO {offsets} (sink, topic, "partition", "offset") '
                f"SELECT $1, t, p, -1 FROM unnest($2::text[], $3::int[]) AS x(t, p) ON CONFLICT DO NOTHING",
                self.name, topics, parts)
            rows = await conn.fetch(
                f'SELECT o.topic, o."partition", o."offset" FROM {offsets} o '
                f"JOIN unnest($2::text[], $3::int[]) AS x(t, p) ON o.topic = x.t AND o.\"partition\" = x.p "
                f'WHERE o.sink = $1 ORDER BY o.topic, o."partition" FOR UPDATE OF o',
                self.name, topics, parts)
            done = {(r[0], r[1]): r[2] for r in rows}
            fresh = [m for m in batch if m.offset > done[(m.topic, m.partition)]]
            if len(fresh) < len(batch):
                # Delivered again after a restart: written then, or rejected then.
                replayed = [(m.topic, m.partition, m.offset) for m in batch if m.offset <= done[(m.topic, m.partition)]]
                again = [tuple(r) for r in await conn.fetch(
                    f'SELECT topic, "partition", "offset" FROM {rejects} WHERE sink = $1 AND (topic, "partition", '
                    f'"offset") IN (SELECT * FROM unnest($2::text[], $3::int[], $4::bigint[]))',
                    self.name, *map(list, zip(*replayed)))]
                self.skipped += len(replayed) - len(again)
                if len(replayed) > len(again):
                        log.info("PostgresSink %s: skipped %d messages already written (delivered again after a "
                             "restart)", self.name, len(replayed) - len(again))
            if self._prunable:  # rejected in checkpoints that are durable now
                await conn.execute(
                    f'DELETE FROM {rejects} WHERE sink = $1 AND (topic, "partition", "offset") IN '
                    f"(SELECT * FROM unnest($2::text[], $3::int[], $4::bigint[]))",
                    self.name, *map(list, zip(*self._prunable)))
            if fresh:
                try:
                    async with conn.transaction():  # a savepoint
                        for keys, values in self._runs(fresh):
                            await conn.execute(self._statement(keys), values)  # encoded by the jsonb codec
                except _retryable():
                    raise
                except Exception as e:
                    failure = e
                    fresh_keys = [(m.topic, m.partition, m.offset) for m in fresh]
                    await conn.execute(
                        f'INSERT INTO {rejects} (sink, topic, "partition", "offset") '
                        f"SELECT $1, t, p, o FROM unnest($2::text[], $3::int[], $4::bigint[]) AS x(t, p, o) "
                        f"ON CONFLICT DO NOTHING", self.name, *map(list, zip(*fresh_keys)))
                    again += fresh_keys
                top: dict[tuple[str, int], int] = {}
                for m in fresh:
                    top[(m.topic, m.partition)] = max(m.offset, top.get((m.topic, m.partition), -1))
                await conn.execute(
                    f'UPDATE {offsets} o SET "offset" = x.o, updated_at = now() '
                    f"FROM unnest($2::text[], $3::int[], $4::bigint[]) AS x(t, p, o) "
                    f'WHERE o.sink = $1 AND o.topic = x.t AND o."partition" = x.p',
                    self.name, [t for t, _ in top], [p for _, p in top], list(top.values()))
        self._prunable = set()
        self._rejected.update(again)
        if failure is not None:
            raise failure
        self.written += len(fresh)
        if again:
            raise ValueError(f"PostgresSink {self.name}: {len(again)} message(s) of this batch were rejected "
                             f"before a restart, and are rejected again (e.g. {again[0][0]}[{again[0][1]}] "
                             f"offset {again[0][2]})")

    def _runs(self, batch: list[Message]) -> list[tuple[tuple[str, ...], list[dict]]]:
        """Consecutive values with the same columns, as (columns, rows); with `upsert_on`,
        the last row of each key only (one statement cannot update a row twice)."""
        runs: list[tuple[tuple[str, ...], list[dict]]] = []
        for m in batch:
            v = m.value
            if not isinstance(v, dict):
                raise TypeError(f"PostgresSink {self.name}: a value must be a dict of column -> value, "
                                f"not {type(v).__name__} ({m.topic}[{m.partition}] offset {m.offset})")
            keys = self.columns or tuple(v)
            if not keys:
                raise ValueError(f"PostgresSink {self.name}: an empty row ({m.topic}[{m.partition}] offset {m.offset})")
            if self.columns is not None:
                v = {c: v.get(c) for c in keys}
            if runs and runs[-1][0] == keys:
                runs[-1][1].append(v)
            else:
                runs.append((keys, [v]))
        if self.upsert_on is not None:
            on = self.upsert_on
            for i, (keys, values) in enumerate(runs):
                missing = [c for c in on if c not in keys]
                if missing:
                    raise ValueError(f"PostgresSink {self.name}: upsert_on column(s) {missing} missing from a value")
                last = {tuple(orjson.dumps(v[c], default=str) for c in on): v for v in values}
                if len(last) < len(values):
                    runs[i] = (keys, list(last.values()))
        return runs

    def _statement(self, keys: tuple[str, ...]) -> str:
        sql = self._statements.get(keys)
        if sql is None:
            cols = ", ".join(_ident(k) for k in keys)
            table = _ident(self.table)
            sql = f"INSERT INTO {table} ({cols}) SELECT {cols} FROM jsonb_populate_recordset(NULL::{table}, $1::jsonb)"
            if self.upsert_on is not None:
                update = [k for k in keys if k not in self.upsert_on]
                target = ", ".join(_ident(k) for k in self.upsert_on)
                sql += (f" ON CONFLICT ({target}) DO UPDATE SET "
                        + ", ".join(f"{_ident(k)} = EXCLUDED.{_ident(k)}" for k in update)
                        if update else f" ON CONFLICT ({target}) DO NOTHING")
            self._statements[keys] = sql
        return sql

    async def _connection(self) -> Any:
        if self._conn is None or self._conn.is_closed():
            self._conn = await _connect(self.dsn)
        return self._conn

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        await _close(conn)

    def __repr__(self) -> str:
        return f"PostgresSink({_where(self.dsn)!r}, {self.table!r})"


def _retryable() -> tuple[type[BaseException], ...]:
    """Errors after which the same transaction may succeed on a new connection."""
    asyncpg = _asyncpg()
    # InternalClientError: how asyncpg may report a connection killed mid-message, under load.
    return (OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
            asyncpg.exceptions.InternalClientError,
            asyncpg.exceptions.OperatorInterventionError, asyncpg.exceptions.TransactionRollbackError)
