"""NATS JetStream: a source reading a stream through a durable pull consumer, acknowledging
messages only once pipes' checkpoint holding them is durable, and a sink publishing to
JetStream with a deduplication id per message.

Both use nats-py (``pip install nats-py``), imported when they open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson

from ..errors import ConfigError
from ..message import Message

log = logging.getLogger("pipes")


def _nats() -> Any:
    try:
        import nats
        import nats.js.api
        import nats.js.errors
    except ImportError:
        raise ConfigError("the NATS connectors need nats-py: pip install nats-py") from None
    return nats


def _decode(data: bytes, json: bool) -> Any:
    return orjson.loads(data) if json else data.decode("utf-8", "replace")


def _encode(value: Any, json: bool) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and not json:
        return value.encode()
    return orjson.dumps(value, default=str)


# -- the source ----------------------------------------------------------------------------
class NATS:
    """The messages of `subject` (wildcards allowed) in the JetStream stream `stream`, read
    with the durable pull consumer `durable` (created if missing, delivering everything
    in the stream the first time; the stream too is created for `subject` if missing).
    Each message's value is its payload as text, or decoded as JSON with ``json=True``;
    its headers are the NATS headers plus ``nats.subject`` and ``nats.seq`` (its stream
    sequence).

    Messages are acknowledged **only once the checkpoint holding them is durable** (in
    ``committed()``); until then the consumer keeps them pending, and the source tells
    the server it is still working on them every `ack_wait` / 2 seconds, so they are not
    redelivered meanwhile. The checkpoint is the ack subjects of the messages given out
    and not acknowledged yet: a restarted worker acknowledges them before it fetches
    more, and the server redelivers the pending messages the checkpoint does not cover
    (after `ack_wait` seconds), so nothing is lost.

    At-least-once: a message delivered after the last durable checkpoint is delivered
    again after a crash. ``follow=False`` ends once a fetch returns nothing within
    `timeout` seconds; `batch` is the number of messages asked for per fetch.
    """

    def __init__(self, url: str, subject: str, *, stream: str, durable: str, json: bool = False,
                 batch: int = 256, timeout: float = 1.0, ack_wait: float = 30.0, follow: bool = True):
        if not subject or not isinstance(subject, str):
            raise ConfigError(f"NATS: subject must be a subject, not {subject!r}")
        if not stream or not durable:
            raise ConfigError("NATS: stream= and durable= are required")
        if not isinstance(batch, int) or batch < 1:
            raise ConfigError(f"NATS: batch= must be a positive integer, not {batch!r}")
        if not isinstance(ack_wait, (int, float)) or ack_wait < 1:
            raise ConfigError(f"NATS: ack_wait= must be at least 1 second, not {ack_wait!r}")
        self.url = url
        self.subject = subject
        self.stream = stream
        self.durable = durable
        self.json = json
        self.batch = batch
        self.timeout = timeout
        self.ack_wait = ack_wait
        self.follow = follow
        self._unacked: dict[str, None] = {}  # ack subjects of messages given out, in order
        self._acked_seqs: set[int] = set()  # stream sequences acknowledged after a restart
        self._restored: tuple = ()
        self._buffer: list = []
        self._nc: Any = None
        self._sub: Any = None
        self._keeper: asyncio.Task | None = None

    # -- checkpoint ------------------------------------------------------------------------
    def checkpoint(self) -> dict:
        return {"acks": tuple(self._unacked)}

    def restore(self, state: dict) -> None:
        self._restored = tuple(state.get("acks", ()))
        self._unacked = dict.fromkeys(self._restored)

    async def committed(self, state: dict) -> None:
        """The checkpoint holding `state` is durable: acknowledge the messages it covers."""
        acks = list(state.get("acks", ()))
        if acks:
            await self._ack(acks)

    async def _ack(self, acks: list[str]) -> None:
        for a in acks:
            self._unacked.pop(a, None)
        nc = self._nc
        own = nc is None or not nc.is_connected  # after close(): a connection of its own
        if own:
            nc = await _nats().connect(self.url, allow_reconnect=False)
        try:
            for a in acks:
                await nc.publish(a, b"+ACK")
            await nc.flush(timeout=10)  # the server has them all
        finally:
            if own:
                await nc.close()

    # -- reading ---------------------------------------------------------------------------
    async def open(self) -> None:
        nats = _nats()
        api = nats.js.api
        self._nc = await nats.connect(self.url)
        try:
            js = self._nc.jetstream()
            try:
                await js.stream_info(self.stream)
            except nats.js.errors.NotFoundError:
                await js.add_stream(name=self.stream, subjects=[self.subject])
            if self._restored:  # covered by the durable checkpoint we restarted from
                restored, self._restored = list(self._restored), ()
                self._acked_seqs = {_seq(a) for a in restored}
                await self._ack(restored)
            self._sub = await js.pull_subscribe(
                self.subject, durable=self.durable, stream=self.stream,
                config=api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT, ack_wait=self.ack_wait,
                                          deliver_policy=api.DeliverPolicy.ALL))
        except Exception:
            await self.close()
            raise
        self._keeper = asyncio.create_task(self._keep_in_progress(), name=f"NATS in-progress {self.durable}")

    async def read(self) -> Message | None:
        while not self._buffer:
            try:
                msgs = await self._sub.fetch(self.batch, timeout=self.timeout)
            except TimeoutError:  # nats.errors.TimeoutError, or the plain one nats-py raises past its deadline
                msgs = []
            # A message the restored checkpoint covered and acknowledged, delivered again
            # because the server had redelivered it before the ack: skip it.
            fresh = []
            for m in msgs:
                if m.metadata.sequence.stream in self._acked_seqs:
                    await m.ack()
                else:
                    fresh.append(m)
            self._buffer = fresh[::-1]
            if not msgs and not self.follow:
                return None
        m = self._buffer.pop()
        self._unacked[m.reply] = None
        headers: dict[str, Any] = dict(m.headers or {})
        headers["nats.subject"] = m.subject
        headers["nats.seq"] = str(m.metadata.sequence.stream)
        return Message(_decode(m.data, self.json), headers=headers)

    async def _keep_in_progress(self) -> None:
        """Tell the server every ack_wait/2 that the messages given out and fetched are still
        being worked on, so it does not redeliver them while they wait for a checkpoint."""
        while True:
            await asyncio.sleep(self.ack_wait / 2)
            subjects = list(self._unacked) + [m.reply for m in self._buffer]
            try:
                for a in subjects:
                    await self._nc.publish(a, b"+WPI")
                await self._nc.flush(timeout=10)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("NATS %s: in-progress for %d messages failed (%s: %s)", self.durable, len(subjects),
                            type(e).__name__, e)

    async def close(self) -> None:
        task, self._keeper = self._keeper, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        nc, self._nc = self._nc, None
        buffered, self._buffer = self._buffer, []
        self._sub = None
        if nc is not None:
            with contextlib.suppress(Exception):
                for m in buffered:  # fetched, never given out: redeliver them at once
                    await nc.publish(m.reply, b"-NAK")
                await nc.flush(timeout=2)
            await nc.close()

    def __repr__(self) -> str:
        return f"NATS({self.subject!r}, stream={self.stream!r}, durable={self.durable!r})"


def _seq(ack_subject: str) -> int:
    # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>
    # (or, newer, with a domain, an account hash and a token: stream seq 8th)
    parts = ack_subject.split(".")
    try:
        return int(parts[5] if len(parts) == 9 else parts[7])
    except (ValueError, IndexError):
        return -1


# -- the sink ------------------------------------------------------------------------------
class NATSSink:
    """Publishes each value to `subject` through JetStream (a stream must capture the
    subject), at every checkpoint, waiting for every publish acknowledgement. A string is
    sent as UTF-8, bytes as they are, anything else as JSON (``json=True``: strings too).
    String headers become NATS headers.

    Each message carries ``Nats-Msg-Id: <topic>-<partition>-<offset>``, so the stream drops
    the copies a replay after a crash publishes within its duplicate window (two minutes
    by default): exactly-once within that window, at-least-once beyond it.
    """

    wants_messages = True

    def __init__(self, url: str, subject: str, *, json: bool = False, timeout: float = 10.0):
        if not subject or not isinstance(subject, str):
            raise ConfigError(f"NATSSink: subject must be a subject, not {subject!r}")
        self.url = url
        self.subject = subject
        self.json = json
        self.timeout = timeout
        self._nc: Any = None
        self._js: Any = None
        self._pending: list[tuple[bytes, dict]] = []
        self.written = 0

    async def open(self) -> None:
        self._nc = await _nats().connect(self.url)
        self._js = self._nc.jetstream(timeout=self.timeout)

    def write(self, batch: list[Message]) -> None:
        self._pending += [self._entry(m) for m in batch]

    def _entry(self, m: Message) -> tuple[bytes, dict]:
        headers = {k: v if isinstance(v, str) else v.decode() for k, v in (m.headers or {}).items()
                   if isinstance(v, (str, bytes))}
        if m.topic is not None and m.offset is not None:
            headers["Nats-Msg-Id"] = f"{m.topic}-{m.partition}-{m.offset}"
        return _encode(m.value, self.json), headers

    async def flush(self) -> None:
        pending, self._pending = self._pending, []
        for i in range(0, len(pending), 256):
            chunk = pending[i:i + 256]
            await asyncio.gather(*(self._js.publish(self.subject, data, headers=h or None) for data, h in chunk))
            self.written += len(chunk)

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        if nc is not None:
            await nc.close()

    def __repr__(self) -> str:
        return f"NATSSink({self.subject!r})"
