"""Amazon SQS: a source that receives messages from a queue and deletes them only once
pipes' checkpoint holding them is durable, and a sink that sends messages to a queue.

Both use aiobotocore (``pip install aiobotocore``), imported when they open. Credentials
come from the usual AWS chain (environment, ``~/.aws``, instance role).
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


def _aiobotocore() -> Any:
    try:
        import aiobotocore.session
    except ImportError:
        raise ConfigError("the SQS connectors need aiobotocore: pip install aiobotocore") from None
    return aiobotocore.session


async def _client(stack: contextlib.AsyncExitStack, region: str, endpoint_url: str | None) -> Any:
    session = _aiobotocore().get_session()
    return await stack.enter_async_context(session.create_client("sqs", region_name=region,
                                                                 endpoint_url=endpoint_url))


def _chunks(items: list, n: int = 10) -> list[list]:
    return [items[i:i + n] for i in range(0, len(items), n)]


# -- the source ----------------------------------------------------------------------------
class SQS:
    """The messages of the queue at `queue_url`, each as its body (a string), with the
    headers ``sqs.message_id`` and, for every string or number message attribute,
    that attribute. A FIFO queue's ``MessageGroupId`` becomes the message's key.

    Messages are received with long polling (`wait` seconds, at most 20) up to 10 at a
    time, and **deleted only once the checkpoint holding them is durable** (in
    ``committed()``). Until then they stay in flight: with ``extend=True`` (the default)
    their visibility timeout is extended to `visibility_timeout` seconds every
    `visibility_timeout` / 2 seconds, so SQS does not hand them to another consumer while
    they wait for a checkpoint. The checkpoint is the receipt handles of the messages given
    out and not deleted yet; a restarted worker deletes them again (SQS deletes are
    idempotent) before it receives more.

    At-least-once: a message is delivered again if the worker dies after receiving it
    and before the checkpoint holding it is durable, or if it stays in flight longer than
    its visibility timeout without being extended.

    ``follow=True`` (the default) waits for messages forever; ``follow=False`` ends once a
    receive returns nothing.
    """

    def __init__(self, queue_url: str, *, region: str = "us-east-1", endpoint_url: str | None = None,
                 wait: int = 20, visibility_timeout: int = 30, extend: bool = True, follow: bool = True):
        if not queue_url or not isinstance(queue_url, str):
            raise ConfigError(f"SQS: queue_url must be a queue URL, not {queue_url!r}")
        if not isinstance(wait, int) or not 0 <= wait <= 20:
            raise ConfigError(f"SQS: wait= must be a whole number of seconds from 0 to 20, not {wait!r}")
        if not isinstance(visibility_timeout, int) or not 2 <= visibility_timeout <= 43200:
            raise ConfigError(f"SQS: visibility_timeout= must be a whole number of seconds from 2 to 43200, "
                              f"not {visibility_timeout!r}")
        self.queue_url = queue_url
        self.region = region
        self.endpoint_url = endpoint_url
        self.wait = wait
        self.visibility_timeout = visibility_timeout
        self.extend = extend
        self.follow = follow
        self._inflight: dict[str, None] = {}  # receipt handles given out and not deleted, in order
        self._buffer: list[dict] = []  # received, not given out yet
        self._restored: tuple = ()
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None
        self._extender: asyncio.Task | None = None
        self.deleted = 0

    # -- checkpoint ------------------------------------------------------------------------
    def checkpoint(self) -> dict:
        return {"handles": tuple(self._inflight)}

    def restore(self, state: dict) -> None:
        self._restored = tuple(state.get("handles", ()))
        self._inflight = dict.fromkeys(self._restored)

    async def committed(self, state: dict) -> None:
        """The checkpoint holding `state` is durable: delete the messages it covers."""
        handles = list(state.get("handles", ()))
        if handles:
            await self._delete(handles)

    async def _delete(self, handles: list[str]) -> None:
        for h in handles:
            self._inflight.pop(h, None)
        async with contextlib.AsyncExitStack() as stack:
            # committed() may come after close() (the last checkpoint): then with a client of its own.
            client = self._client or await _client(stack, self.region, self.endpoint_url)
            failed = []
            for chunk in _chunks(handles):
                resp = await client.delete_message_batch(
                    QueueUrl=self.queue_url,
                    Entries=[{"Id": str(i), "ReceiptHandle": h} for i, h in enumerate(chunk)])
                for f in resp.get("Failed", []):
                    failed.append(f)
            self.deleted += len(handles) - len(failed)
            if failed:
                # An expired or unknown receipt handle: the message was (or will be) delivered
                # again, which at-least-once allows; nothing to retry.
                log.warning("SQS %s: %d of %d deletes failed (first: %s)", self.queue_url, len(failed),
                            len(handles), failed[0].get("Message") or failed[0].get("Code"))

    # -- reading ---------------------------------------------------------------------------
    async def open(self) -> None:
        self._stack = contextlib.AsyncExitStack()
        try:
            self._client = await _client(self._stack, self.region, self.endpoint_url)
            if self._restored:  # covered by the durable checkpoint we restarted from
                restored, self._restored = list(self._restored), ()
                await self._delete(restored)
        except Exception:
            await self.close()
            raise
        if self.extend:
            self._extender = asyncio.create_task(self._extend_forever(), name=f"SQS extend {self.queue_url}")

    async def read(self) -> Message | None:
        while not self._buffer:
            resp = await self._client.receive_message(
                QueueUrl=self.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=self.wait,
                VisibilityTimeout=self.visibility_timeout, AttributeNames=["All"],
                MessageAttributeNames=["All"])
            self._buffer = resp.get("Messages", [])[::-1]
            if not self._buffer and not self.follow:
                return None
        m = self._buffer.pop()
        self._inflight[m["ReceiptHandle"]] = None
        headers: dict[str, Any] = {"sqs.message_id": m["MessageId"]}
        for name, attr in (m.get("MessageAttributes") or {}).items():
            if "StringValue" in attr:
                headers[name] = attr["StringValue"]
            elif "BinaryValue" in attr:
                headers[name] = attr["BinaryValue"]
        return Message(m["Body"], key=(m.get("Attributes") or {}).get("MessageGroupId"), headers=headers)

    async def _extend_forever(self) -> None:
        every = self.visibility_timeout / 2
        while True:
            await asyncio.sleep(every)
            handles = list(self._inflight) + [m["ReceiptHandle"] for m in self._buffer]
            try:
                for chunk in _chunks(handles):
                    await self._client.change_message_visibility_batch(
                        QueueUrl=self.queue_url,
                        Entries=[{"Id": str(i), "ReceiptHandle": h, "VisibilityTimeout": self.visibility_timeout}
                                 for i, h in enumerate(chunk)])
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the next round tries again; at worst a message comes twice
                log.warning("SQS %s: extending the visibility of %d messages failed (%s: %s)", self.queue_url,
                            len(handles), type(e).__name__, e)

    async def close(self) -> None:
        task, self._extender = self._extender, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        stack, self._stack = self._stack, None
        self._client = None
        self._buffer = []  # received, never given out: they reappear after their visibility timeout
        if stack is not None:
            await stack.aclose()

    def __repr__(self) -> str:
        return f"SQS({self.queue_url!r})"


# -- the sink ------------------------------------------------------------------------------
class SQSSink:
    """Sends each value to the queue at `queue_url` as one message, at every checkpoint,
    with SendMessageBatch (10 per request). A string is sent as it is, bytes decoded as
    UTF-8, anything else as JSON. String headers become message attributes.

    For a FIFO queue (a URL ending in ``.fifo``) the message's key (or `group_id`) is its
    ``MessageGroupId`` and ``<topic>-<partition>-<offset>`` its ``MessageDeduplicationId``,
    so SQS drops the copies a replay sends within its five-minute deduplication window.

    At-least-once: messages are sent before the checkpoint that covers them, so after a
    crash those of the last unfinished checkpoint are sent again. A message SQS rejects
    fails the checkpoint (the worker resumes from the previous one).
    """

    wants_messages = True

    def __init__(self, queue_url: str, *, region: str = "us-east-1", endpoint_url: str | None = None,
                 group_id: str = "pipes"):
        if not queue_url or not isinstance(queue_url, str):
            raise ConfigError(f"SQSSink: queue_url must be a queue URL, not {queue_url!r}")
        self.queue_url = queue_url
        self.region = region
        self.endpoint_url = endpoint_url
        self.group_id = group_id
        self.fifo = queue_url.endswith(".fifo")
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None
        self._pending: list[dict] = []
        self.written = 0

    async def open(self) -> None:
        self._stack = contextlib.AsyncExitStack()
        self._client = await _client(self._stack, self.region, self.endpoint_url)

    def write(self, batch: list[Message]) -> None:
        self._pending += [self._entry(m) for m in batch]  # all or none of the batch

    def _entry(self, m: Message) -> dict:
        v = m.value
        body = v if isinstance(v, str) else v.decode() if isinstance(v, bytes) else orjson.dumps(v, default=str).decode()
        entry: dict[str, Any] = {"MessageBody": body}
        attrs = {k: {"DataType": "String", "StringValue": h if isinstance(h, str) else h.decode()}
                 for k, h in (m.headers or {}).items() if isinstance(h, (str, bytes)) and h}
        if attrs:
            entry["MessageAttributes"] = dict(list(attrs.items())[:10])  # SQS allows 10
        if self.fifo:
            key = m.key
            entry["MessageGroupId"] = str(key if not isinstance(key, bytes) else key.decode()) if key is not None \
                else self.group_id
            entry["MessageDeduplicationId"] = f"{m.topic}-{m.partition}-{m.offset}"
        return entry

    async def flush(self) -> None:
        pending = self._pending
        while pending:
            chunk = pending[:10]
            resp = await self._client.send_message_batch(
                QueueUrl=self.queue_url, Entries=[{"Id": str(i), **e} for i, e in enumerate(chunk)])
            failed = resp.get("Failed", [])
            if failed:
                self._pending = []  # the batch gets the sink's on_error policy
                self.written += len(chunk) - len(failed)
                raise RuntimeError(f"SQSSink {self.queue_url}: {len(failed)} messages rejected "
                                   f"(first: {failed[0].get('Code')}: {failed[0].get('Message')})")
            self.written += len(chunk)
            pending = self._pending = pending[10:]

    async def close(self) -> None:
        stack, self._stack = self._stack, None
        self._client = None
        if stack is not None:
            await stack.aclose()

    def __repr__(self) -> str:
        return f"SQSSink({self.queue_url!r})"
