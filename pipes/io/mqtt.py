"""MQTT: a source subscribing to a topic filter with a persistent session, and a sink
publishing to a topic.

Both use aiomqtt (``pip install aiomqtt``, which brings paho-mqtt), imported when they open.

The guarantee depends on when a QoS 1 message is acknowledged (PUBACK). Most clients,
aiomqtt and paho-mqtt included, acknowledge a message as soon as it arrives: a worker
that dies between that and pipes' next durable checkpoint loses it (at-most-once across
a crash). ``MQTT(ack="checkpoint")``, the default, turns paho's automatic
acknowledgement off and sends the PUBACKs only once the checkpoint holding the
messages is durable, with a persistent session (``clean_session=False`` and a fixed
client id), so the broker redelivers what was never acknowledged when the worker comes
back: at-least-once. ``ack="receipt"`` keeps the client's default.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from typing import Any

import orjson

from ..errors import ConfigError
from ..message import Message

log = logging.getLogger("pipes")


def _aiomqtt() -> Any:
    try:
        import aiomqtt
    except ImportError:
        raise ConfigError("the MQTT connectors need aiomqtt: pip install aiomqtt") from None
    return aiomqtt


# -- the source ----------------------------------------------------------------------------
class MQTT:
    """The messages published to `topic` (a topic filter: ``+`` and ``#`` allowed) on the
    broker at `host`:`port`, subscribed with `qos`. Each value is the payload as text, or
    decoded as JSON with ``json=True``; its headers are ``mqtt.topic`` (the topic it was
    published to) and ``mqtt.retain`` (``"1"`` for a retained message).

    The session is persistent (``clean_session=False``) under `client_id` (by default
    ``pipes-`` and the topic filter): while the worker is down, the broker queues the
    QoS 1 and 2 messages for it (up to its ``max_queued_messages``).

    With ``ack="checkpoint"`` (the default) a QoS 1/2 message is acknowledged only once
    the checkpoint holding it is durable; a message the worker received and did not get
    into a durable checkpoint is redelivered by the broker when it reconnects: at-least-
    once, and a message whose acknowledgement was lost comes twice. The broker stops
    sending once `max_inflight_messages` of its messages are unacknowledged (Mosquitto:
    20 by default; ``max_inflight_messages 0`` in mosquitto.conf lifts the limit), so
    throughput is about that many messages per checkpoint. ``ack="receipt"`` acknowledges
    on arrival (no such limit, but at-most-once across a crash). QoS 0 messages are never
    acknowledged and are lost while the worker is down.

    The checkpoint holds the acknowledgements still to send for the current connection;
    after a restart there is nothing to restore: the broker's session is the position.
    ``follow=False`` ends once no message arrives for `idle` seconds.
    """

    def __init__(self, host: str, port: int = 1883, topic: str = "#", qos: int = 1, *,
                 client_id: str | None = None, ack: str = "checkpoint", json: bool = False,
                 username: str | None = None, password: str | None = None, follow: bool = True,
                 idle: float = 1.0):
        if not topic or not isinstance(topic, str):
            raise ConfigError(f"MQTT: topic must be a topic filter, not {topic!r}")
        if qos not in (0, 1, 2):
            raise ConfigError(f"MQTT: qos= must be 0, 1 or 2, not {qos!r}")
        if ack not in ("checkpoint", "receipt"):
            raise ConfigError(f"MQTT: ack= must be 'checkpoint' or 'receipt', not {ack!r}")
        self.host = host
        self.port = port
        self.topic = topic
        self.qos = qos
        self.client_id = client_id or "pipes-" + re.sub(r"[^A-Za-z0-9_-]", "_", topic)[:40]
        self.ack = ack
        self.json = json
        self.username = username
        self.password = password
        self.follow = follow
        self.idle = idle
        self._session = ""  # one per connection: mids mean nothing on another
        self._unacked: list[tuple[int, int]] = []  # (mid, qos) given out, in order
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None

    # -- checkpoint ------------------------------------------------------------------------
    def checkpoint(self) -> dict:
        return {"session": self._session, "acks": tuple(self._unacked)}

    def restore(self, state: dict) -> None:
        pass  # the broker's persistent session is where this source resumes

    def committed(self, state: dict) -> None:
        """The checkpoint holding `state` is durable: acknowledge the messages it covers
        (in the order they arrived, as MQTT requires)."""
        acks = state.get("acks", ())
        if not acks or state.get("session") != self._session or self._client is None:
            return  # another connection: the broker redelivers them, and they come again
        done = set(acks)
        paho = self._client._client
        for mid, qos in acks:
            paho.ack(mid, qos)
        self._unacked = [a for a in self._unacked if a not in done]

    # -- reading ---------------------------------------------------------------------------
    async def open(self) -> None:
        aiomqtt = _aiomqtt()
        self._stack = contextlib.AsyncExitStack()
        client = aiomqtt.Client(self.host, self.port, identifier=self.client_id, clean_session=False,
                                username=self.username, password=self.password)
        if self.ack == "checkpoint":
            client._client.manual_ack_set(True)
        try:
            self._client = await self._stack.enter_async_context(client)
            self._session = uuid.uuid4().hex
            await self._client.subscribe(self.topic, qos=self.qos)
        except Exception:
            await self.close()
            raise
        self._messages = self._client.messages

    async def read(self) -> Message | None:
        if self.follow:
            m = await anext(self._messages)
        else:
            try:
                m = await asyncio.wait_for(anext(self._messages), self.idle)
            except TimeoutError:
                return None
        if self.ack == "checkpoint" and m.qos > 0:
            self._unacked.append((m.mid, m.qos))
        payload = bytes(m.payload) if isinstance(m.payload, (bytes, bytearray)) else str(m.payload).encode()
        value = orjson.loads(payload) if self.json else payload.decode("utf-8", "replace")
        return Message(value, headers={"mqtt.topic": m.topic.value, "mqtt.retain": "1" if m.retain else "0"})

    async def close(self) -> None:
        stack, self._stack = self._stack, None
        self._client = None
        self._unacked = []  # never acknowledged: the broker sends them again on the next connection
        if stack is not None:
            with contextlib.suppress(Exception):
                await stack.aclose()

    def __repr__(self) -> str:
        return f"MQTT({self.host!r}, {self.port}, {self.topic!r})"


# -- the sink ------------------------------------------------------------------------------
class MQTTSink:
    """Publishes each value to `topic` with `qos` (and `retain`) at every checkpoint,
    waiting for the broker's acknowledgement of every QoS 1/2 message before the
    checkpoint is made durable. A string is sent as UTF-8, bytes as they are, anything
    else as JSON (``json=True``: strings too).

    At-least-once with QoS 1 (and 2): after a crash the messages of the last unfinished
    checkpoint are published again; MQTT has no deduplication across publishes.
    """

    def __init__(self, host: str, port: int = 1883, topic: str = "pipes", qos: int = 1, *,
                 retain: bool = False, json: bool = False, client_id: str | None = None,
                 username: str | None = None, password: str | None = None):
        if not topic or not isinstance(topic, str) or "+" in topic or "#" in topic:
            raise ConfigError(f"MQTTSink: topic must be a topic name without wildcards, not {topic!r}")
        if qos not in (0, 1, 2):
            raise ConfigError(f"MQTTSink: qos= must be 0, 1 or 2, not {qos!r}")
        self.host = host
        self.port = port
        self.topic = topic
        self.qos = qos
        self.retain = retain
        self.json = json
        self.client_id = client_id
        self.username = username
        self.password = password
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._pending: list[bytes] = []
        self.written = 0

    async def open(self) -> None:
        aiomqtt = _aiomqtt()
        self._stack = contextlib.AsyncExitStack()
        self._client = await self._stack.enter_async_context(aiomqtt.Client(
            self.host, self.port, identifier=self.client_id, username=self.username, password=self.password))

    def write(self, batch: list[Any]) -> None:
        self._pending += [v if isinstance(v, bytes) else v.encode() if isinstance(v, str) and not self.json
                          else orjson.dumps(v, default=str) for v in batch]

    async def flush(self) -> None:
        pending, self._pending = self._pending, []
        for i in range(0, len(pending), 100):
            chunk = pending[i:i + 100]
            await asyncio.gather(*(self._client.publish(self.topic, p, qos=self.qos, retain=self.retain)
                                   for p in chunk))
            self.written += len(chunk)

    async def close(self) -> None:
        stack, self._stack = self._stack, None
        self._client = None
        if stack is not None:
            await stack.aclose()

    def __repr__(self) -> str:
        return f"MQTTSink({self.host!r}, {self.port}, {self.topic!r})"
