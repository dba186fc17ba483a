"""What happens when a message cannot be decoded or its function raises: the node's
``on_error`` policy. ``dlq`` re-publishes the original record to ``<topic>.dlq`` with
headers that say what failed and where; ``stop`` stops the worker with an error naming
node, topic, partition and offset; ``skip`` logs the first of each kind and counts."""

from __future__ import annotations

import logging
import traceback
from collections import Counter
from typing import Any

from .errors import ProcessingError
from .topology import Node

log = logging.getLogger("pipes")


def _digest(exc: BaseException) -> str:
    """The innermost frames of a traceback on one line: ``file.py:12 in f < file.py:40 in g``."""
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    return " < ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} in {f.name}" for f in reversed(frames))


def where(topic: str, partition: int, offset: int) -> str:
    return f"topic {topic!r} partition {partition} offset {offset}"


class Failures:
    def __init__(self, node: Node):
        self.node = node
        self.counts: Counter[str] = Counter()

    def handle(self, exc: BaseException, topic: str, partition: int, rec: tuple, ckpt: Any) -> None:
        offset, key, raw, headers, ts = rec
        kind = type(exc).__name__
        text = f"node {self.node.id!r} failed on {where(topic, partition, offset)}: {kind}: {exc}"
        policy = self.node.on_error
        if policy == "stop":
            error = ProcessingError(text)
            error.stopped = True  # the worker stops, and is not restarted: the message would fail again
            raise error from exc
        self.counts[kind] += 1
        if policy == "dlq":
            error_headers = (
                ("pipes.error.node", self.node.id.encode()),
                ("pipes.error.type", kind.encode()),
                ("pipes.error.message", str(exc)[:1000].encode()),
                ("pipes.error.traceback", _digest(exc).encode()),
                ("pipes.topic", topic.encode()),
                ("pipes.partition", str(partition).encode()),
                ("pipes.offset", str(offset).encode()),
            )
            ckpt.buffer(f"{topic}.dlq", (topic, partition)).append((key, raw, (headers or ()) + error_headers, ts))
        if self.counts[kind] == 1:
            dest = f"sent to {topic}.dlq" if policy == "dlq" else "skipped"
            log.error("%s (%s; further %s errors of node %r are counted, not logged)",
                      text, dest, kind, self.node.id, exc_info=exc if policy == "skip" else None)

    def summary(self) -> str | None:
        if not self.counts:
            return None
        what = ", ".join(f"{n} {k}" for k, n in self.counts.most_common())
        dest = "sent to the DLQ" if self.node.on_error == "dlq" else "skipped"
        return f"node {self.node.id!r}: {what} {dest}"
