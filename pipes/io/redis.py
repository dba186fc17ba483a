"""Redis streams: a source that reads a stream (alone with XREAD, or in a consumer group
with XREADGROUP and XACK), and a sink that appends to one with XADD.

Both use redis-py (``pip install 'redis>=5'``), imported when they open.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import orjson

from ..errors import ConfigError
from ..message import Message

log = logging.getLogger("pipes")


def _redis() -> Any:
    try:
        import redis
        import redis.asyncio
    except ImportError:
        raise ConfigError("the Redis connectors need redis-py: pip install 'redis>=5'") from None
    return redis


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


# -- the source ----------------------------------------------------------------------------
class RedisStreamSource:
    """The entries of `stream`, in order, each as a dict of its fields (strings); with
    `field`, that field's content decoded as JSON instead (the entry's other fields become
    headers). Every message has the header ``redis.id``, the entry's id.

    Without `group`, entries are read with XREAD from the last id given, which is the
    source's checkpoint; `start` is where the first start begins: ``"0"`` (the whole
    stream, the default) or ``"$"`` (entries added from then on), or an entry id.

    With `group`, entries are read with XREADGROUP as `consumer` of that consumer group
    (created at `start` if missing) and acknowledged with XACK once the checkpoint
    holding them is durable, not before. After a restart, the consumer's pending entries
    the checkpoint covers are acknowledged, and those it does not are read again.

    ``follow=True`` (the default) waits for new entries, blocking up to `block` seconds
    per read; ``follow=False`` ends once a read returns nothing. `count` is the number of
    entries asked for per read.
    """

    def __init__(self, url: str, stream: str, *, group: str | None = None, consumer: str = "pipes",
                 start: str = "0", field: str | None = None, follow: bool = True, block: float = 1.0,
                 count: int = 500):
        if not stream or not isinstance(stream, str):
            raise ConfigError(f"RedisStreamSource: stream must be a stream name, not {stream!r}")
        if not isinstance(count, int) or count < 1:
            raise ConfigError(f"RedisStreamSource: count= must be a positive integer, not {count!r}")
        if not isinstance(block, (int, float)) or block <= 0:
            raise ConfigError(f"RedisStreamSource: block= must be a positive number of seconds, not {block!r}")
        if start != "$":
            try:
                _id(start)
            except ValueError:
                raise ConfigError(f"RedisStreamSource: start= takes '0', '$' or an entry id, not {start!r}") from None
        self.url = url
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.start = start
        self.field = field
        self.follow = follow
        self.block = block
        self.count = count
        self._last: str | None = None  # the id of the last entry given
        self._entries: deque = deque()
        self._client: Any = None
        self._acker: Any = None  # a blocking client for XACK, which committed() sends
        self._pending_phase = group is not None  # re-reading this consumer's pending entries first
        self._cursor = "0"  # where in them
        self._unacked: list[str] = []  # ids given, in order, not yet acknowledged

    # -- checkpoint ------------------------------------------------------------------------
    def checkpoint(self) -> dict:
        return {"last": self._last}

    def restore(self, state: dict) -> None:
        self._last = state.get("last")

    def committed(self, state: dict) -> None:
        """The checkpoint holding `state` is durable: acknowledge what it covers."""
        if self.group is None or not state.get("last") or not self._unacked:
            return
        upto = _id(state["last"])
        n = 0
        while n < len(self._unacked) and _id(self._unacked[n]) <= upto:
            n += 1
        if not n:
            return
        ids, self._unacked = self._unacked[:n], self._unacked[n:]
        # committed() is called synchronously, possibly after close(): one blocking round trip.
        client = self._acker or _redis().Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)
        try:
            client.xack(self.stream, self.group, *ids)
        except _redis().RedisError as e:
            self._unacked = ids + self._unacked
            log.warning("RedisStreamSource %s: XACK of %d entries failed (%s: %s); they stay pending and "
                        "are acknowledged later", self.stream, len(ids), type(e).__name__, e)
        finally:
            if client is not self._acker:
                client.close()

    # -- reading ---------------------------------------------------------------------------
    async def open(self) -> None:
        redis = _redis()
        self._client = redis.asyncio.Redis.from_url(self.url, decode_responses=True)
        try:
            if self.group is not None:
                self._acker = redis.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)
                try:
                    await self._client.xgroup_create(self.stream, self.group, id=self.start, mkstream=True)
                except redis.ResponseError as e:
                    if "BUSYGROUP" not in str(e):
                        raise
            elif self._last is None:
                self._last = await self._resolve(self.start)
        except Exception:
            await self.close()
            raise

    async def _resolve(self, start: str) -> str:
        if start != "$":
            return start
        try:
            info = await self._client.xinfo_stream(self.stream)
        except _redis().ResponseError:  # no such stream yet: everything in it will be new
            return "0-0"
        return info["last-generated-id"]

    async def read(self) -> Message | None:
        """The next entry, waiting for one when following; None at the end otherwise."""
        entries = self._entries
        while not entries:
            fetched = await self._fetch()
            if fetched:
                entries.extend(fetched)
                break
            if self._pending_phase:
                self._pending_phase = False  # no more pending entries: read new ones
                continue
            if not self.follow:
                return None
        entry_id, fields = entries.popleft()
        self._last = entry_id
        if self.group is not None:
            self._unacked.append(entry_id)
        return self._message(entry_id, fields)

    async def _fetch(self) -> list:
        client = self._client
        block = int(self.block * 1000) if self.follow else None
        if self.group is None:
            got = await client.xread({self.stream: self._last}, count=self.count, block=block)
            return got[0][1] if got else []
        if not self._pending_phase:
            got = await client.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=self.count,
                                          block=block)
            return got[0][1] if got else []
        # Entries delivered to this consumer before a restart and never acknowledged: those
        # the checkpoint covers were produced durably, so acknowledge them; read the rest.
        upto = _id(self._last) if self._last else (-1, -1)
        while True:
            got = await client.xreadgroup(self.group, self.consumer, {self.stream: self._cursor}, count=self.count)
            entries = got[0][1] if got else []
            if not entries:
                return []
            self._cursor = entries[-1][0]
            done = [i for i, f in entries if _id(i) <= upto or not f]  # (an entry trimmed away has no fields)
            if done:
                await client.xack(self.stream, self.group, *done)
            fresh = [(i, f) for i, f in entries if _id(i) > upto and f]
            if fresh:
                return fresh

    def _message(self, entry_id: str, fields: dict) -> Message:
        if self.field is None:
            return Message(fields, headers={"redis.id": entry_id})
        headers = {k: v for k, v in fields.items() if k != self.field}
        headers["redis.id"] = entry_id
        raw = fields.get(self.field)
        if raw is None:
            raise ValueError(f"RedisStreamSource {self.stream}: entry {entry_id} has no field {self.field!r} "
                             f"(fields: {', '.join(fields)})")
        return Message(orjson.loads(raw), headers=headers)

    async def close(self) -> None:
        client, self._client = self._client, None
        acker, self._acker = self._acker, None
        self._entries.clear()
        if client is not None:
            await client.aclose()
        if acker is not None:
            acker.close()

    def __repr__(self) -> str:
        return f"RedisStreamSource({self.stream!r}" + (f", group={self.group!r})" if self.group else ")")


# -- the sink ------------------------------------------------------------------------------
class RedisStreamSink:
    """Appends each value to `stream` with XADD, at every checkpoint, in one pipeline.

    Without `field`, a value must be a dict: its items become the entry's fields (str,
    bytes, int and float as they are, anything else as JSON). With `field`, any value is
    written as JSON in that one field. `maxlen` caps the stream's length (approximately,
    unless ``approximate=False``).

    At-least-once: entries are added before the checkpoint that covers them, so after a
    crash the entries of the last unfinished checkpoint are added again (with new ids).
    A Redis error fails the checkpoint and the worker resumes from the previous one.
    """

    def __init__(self, url: str, stream: str, *, field: str | None = None, maxlen: int | None = None,
                 approximate: bool = True):
        if not stream or not isinstance(stream, str):
            raise ConfigError(f"RedisStreamSink: stream must be a stream name, not {stream!r}")
        if maxlen is not None and (not isinstance(maxlen, int) or maxlen < 1):
            raise ConfigError(f"RedisStreamSink: maxlen= must be a positive integer, not {maxlen!r}")
        self.url = url
        self.stream = stream
        self.field = field
        self.maxlen = maxlen
        self.approximate = approximate
        self._client: Any = None
        self._pending: list[dict] = []
        self.written = 0

    async def open(self) -> None:
        self._client = _redis().asyncio.Redis.from_url(self.url)

    def write(self, batch: list[Any]) -> None:
        self._pending += [self._fields(v) for v in batch]  # all or none of the batch

    async def flush(self) -> None:
        if not self._pending:
            return
        pipe = self._client.pipeline(transaction=False)
        for fields in self._pending:
            pipe.xadd(self.stream, fields, maxlen=self.maxlen, approximate=self.approximate)
        await pipe.execute()
        self.written += len(self._pending)
        self._pending = []

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _fields(self, value: Any) -> dict:
        if self.field is not None:
            return {self.field: orjson.dumps(value, default=str)}
        if not isinstance(value, dict) or not value:
            raise TypeError(f"RedisStreamSink {self.stream}: without field=, a value must be a non-empty dict "
                            f"(its fields), not {type(value).__name__}; pass field='value' to write any value as JSON")
        return {k: v if type(v) in (str, bytes, int, float) else orjson.dumps(v, default=str)
                for k, v in value.items()}

    def __repr__(self) -> str:
        return f"RedisStreamSink({self.stream!r})"
