"""Event time: a message's timestamp, per-partition stream time, and late messages.

A message's timestamp is the broker timestamp by default, or ``timestamp=`` a field
name or a callable of the value, giving milliseconds since the epoch (an int or float),
a :class:`datetime.datetime` or an ISO 8601 string. The *stream time* of a partition is
the largest timestamp seen on it so far. A message is *late* when its timestamp is more
than ``grace`` before the stream time: it changes nothing and goes to the ``late`` topic
if one is given, else to the dead-letter topic ``<topic>.dlq``, with headers saying why.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any, Callable

from .errors import ConfigError
from .failures import Failures
from .topology import Node

log = logging.getLogger("pipes")

NEVER = -(1 << 62)  # the stream time of a partition that has seen nothing yet
IDX = b"\x00idx"  # per-partition bookkeeping key in an operator's state (keys never start with \0)


def to_ms(t: Any) -> int:
    """A timestamp as integer milliseconds since the epoch."""
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return int(t)
    if isinstance(t, datetime):
        return int(t.timestamp() * 1000)
    if isinstance(t, str):
        return int(datetime.fromisoformat(t).timestamp() * 1000)
    raise TypeError(f"a timestamp must be milliseconds, a datetime or an ISO 8601 string, not {t!r}")


def duration_ms(d: Any, what: str) -> int:
    """Seconds (int or float) or a timedelta, as milliseconds; a ConfigError naming `what` otherwise."""
    if isinstance(d, timedelta):
        d = d.total_seconds()
    if not isinstance(d, (int, float)) or isinstance(d, bool) or d < 0:
        raise ConfigError(f"{what} must be a number of seconds >= 0 or a timedelta, not {d!r}")
    return int(round(d * 1000))


def timestamp_getter(spec: str | Callable[[Any], Any] | None, what: str) -> Callable[[Any], int] | None:
    """``timestamp=`` as a function of the decoded value; None means the broker timestamp."""
    if spec is None:
        return None
    if callable(spec):
        return lambda value: to_ms(spec(value))
    if isinstance(spec, str):
        def get(value: Any) -> int:
            try:
                return to_ms(value[spec])
            except (TypeError, KeyError):
                raise KeyError(f"timestamp={spec!r}: the value has no field {spec!r}") from None
        return get
    raise ConfigError(f"{what}: timestamp= takes a field name or a callable, not {spec!r}")


def as_text(key: bytes | None) -> str | None:
    """A message key as it is kept in an index of keys: latin-1 text, which any bytes decode
    to and encode back from, so the index stays a plain JSON-able dict for ``pipes state``."""
    return None if key is None else key.decode("latin-1")


def as_key(text: str | None) -> bytes | None:
    return None if text is None else text.encode("latin-1")


def check_key(key: bytes | None) -> None:
    if key is not None and key[:1] == b"\x00":
        raise KeyError("message keys starting with a NUL byte are reserved for pipes' bookkeeping")


class Late:
    """Sends late records, unchanged, to the ``late`` topic or to ``<topic>.dlq``."""

    def __init__(self, node_id: str, topic: str | None):
        self.node_id = node_id
        self.topic = topic
        self.count = 0

    def send(self, topic: str, partition: int, rec: tuple, ts: int, stream_time: int, grace: int, ckpt: Any) -> None:
        offset, key, raw, headers, rec_ts = rec
        why = f"timestamp {ts} is more than grace {grace} ms before stream time {stream_time}"
        extra = (("pipes.late.node", self.node_id.encode()), ("pipes.late.reason", why.encode()),
                 ("pipes.topic", topic.encode()), ("pipes.partition", str(partition).encode()),
                 ("pipes.offset", str(offset).encode()))
        if self.topic is None:
            extra = (("pipes.error.node", self.node_id.encode()), ("pipes.error.type", b"LateMessage"),
                     ("pipes.error.message", why.encode())) + extra
        ckpt.buffer(self.topic or f"{topic}.dlq").append((key, raw, (headers or ()) + extra, rec_ts))
        self.count += 1
        if self.count == 1:
            log.warning("node %r: late message on topic %r partition %d offset %d (%s) sent to %s; "
                        "further late messages are counted, not logged", self.node_id, topic, partition,
                        offset, why, self.topic or f"{topic}.dlq")

    def summary(self) -> str | None:
        return f"node {self.node_id!r}: {self.count} late messages sent to {self.topic or 'the DLQ'}" if self.count else None


class LateFailures(Failures):
    """A node's failures, whose summary also counts its late messages."""

    def __init__(self, node: Node, late: Late):
        super().__init__(node)
        self.late = late

    def summary(self) -> str | None:
        parts = [s for s in (super().summary(), self.late.summary()) if s]
        return "; ".join(parts) or None
