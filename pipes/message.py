"""The message a transform can ask for, and return to override key, headers or topic."""

from __future__ import annotations

from dataclasses import dataclass, field, replace as _replace
from typing import Any


@dataclass(slots=True)
class Message:
    """A value with its key, headers and position.

    Annotate a transform's parameter with ``pipes.Message`` to receive one; return
    one to set the key, headers or destination topic of an output.
    """

    value: Any
    key: Any = None
    headers: dict[str, Any] = field(default_factory=dict)
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    timestamp: int | None = None  # milliseconds since the epoch

    def replace(self, **changes: Any) -> Message:
        """A copy with some fields changed; ``headers`` are merged into the existing ones."""
        if "headers" in changes and changes["headers"] is not None:
            changes["headers"] = {**self.headers, **changes["headers"]}
        return _replace(self, **changes)


@dataclass(slots=True)
class Record:
    """A raw record as brokers store it: bytes in, bytes out."""

    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp: int = 0
    offset: int = -1
