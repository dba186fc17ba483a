"""Turning what user code returns into encoded outputs on the node's topics.

Built once per node when the topology starts. A plain value is encoded once per
serializer and appended to every destination's buffer; a :class:`~pipes.Message`
may override key, headers and destination.
"""

from __future__ import annotations

from typing import Any, Callable

from .message import Message
from .serializers import SerializationError, Serializer, resolve
from .topology import Graph, Node


def key_getter(spec: str | Callable[[Any], Any] | None) -> Callable[[Any], Any] | None:
    """key= as a function of the value: a field name (dict item or attribute) or a callable."""
    if spec is None or callable(spec):
        return spec
    field = spec

    def get(value: Any) -> Any:
        try:
            return value[field]
        except (TypeError, KeyError, IndexError):
            try:
                return getattr(value, field)
            except AttributeError:
                raise KeyError(f"key={field!r}: the value has no field {field!r}") from None

    return get


def encode_headers(headers: dict[str, Any] | None) -> tuple | None:
    if not headers:
        return None
    out = []
    for k, v in headers.items():
        if v is None:
            continue
        out.append((k, v if isinstance(v, bytes) else str(v).encode()))
    return tuple(out) or None


def decode_headers(headers: tuple | None) -> dict[str, bytes]:
    return dict(headers) if headers else {}


def serializers_of(graph: Graph | None, topic: str) -> tuple[Serializer, Serializer]:
    """A topic's serializers; a dead-letter topic ``<topic>.dlq`` holds records of ``<topic>``."""
    spec = graph.topics.get(topic) if graph is not None else None
    if spec is None and topic.endswith(".dlq"):
        return serializers_of(graph, topic[:-4])
    if spec is None:
        return resolve("json"), resolve("str")
    return spec.value_serializer, spec.key_serializer


class Emitter:
    """Encodes a node's results onto its output topics."""

    def __init__(self, node: Node, graph: Graph, scope: tuple[str, int] | None = None):
        self.graph = graph
        self.scope = scope  # the input partition its outputs belong to, if not the checkpoint's current one
        # Destinations grouped by (value, key) serializer, so each value is encoded once per group.
        groups: dict[tuple[str, str], list[str]] = {}
        sers: dict[tuple[str, str], tuple[Serializer, Serializer]] = {}
        for t in node.outputs:
            vs, ks = serializers_of(graph, t)
            groups.setdefault((vs.name, ks.name), []).append(t)
            sers[(vs.name, ks.name)] = (vs, ks)
        self.groups = [(sers[g][0].dumps, sers[g][1].dumps, tuple(ts)) for g, ts in groups.items()]

    def buffers(self, ckpt: Any) -> list[tuple[Callable, Callable, list[list]]]:
        """Per serializer group: (value dumps, key dumps, [buffer per topic]) for this batch."""
        scope = self.scope
        return [(vd, kd, [ckpt.buffer(t, scope) for t in ts]) for vd, kd, ts in self.groups]

    def encode(self, result: Any, key: bytes | None, headers: tuple | None, ts: int,
               bufs: list, ckpt: Any, staged: list | None = None, came_from: str | None = None) -> None:
        """Encode one result. With `staged`, append (buffer, record) pairs there instead,
        so a generator that fails halfway leaves nothing behind. A Message routes to its
        own topic unless that is `came_from`, the topic its input was read from."""
        if type(result) is Message:
            return self._encode_message(result, key, headers, ts, bufs, ckpt, staged, came_from)
        for vdumps, kdumps, targets in bufs:
            rec = (key, _dumps(vdumps, result), headers, ts)
            for buf in targets:
                if staged is None:
                    buf.append(rec)
                else:
                    staged.append((buf, rec))

    def _encode_message(self, m: Message, key: bytes | None, headers: tuple | None, ts: int,
                        bufs: list, ckpt: Any, staged: list | None, came_from: str | None) -> None:
        if m.topic is not None and m.topic != came_from:
            vs, ks = serializers_of(self.graph, m.topic)
            bufs = [(vs.dumps, ks.dumps, [ckpt.buffer(m.topic, self.scope)])]
        h = encode_headers(m.headers) if m.headers else headers
        t = m.timestamp if m.timestamp is not None else ts
        for vdumps, kdumps, targets in bufs:
            k = kdumps(m.key) if m.key is not None else key
            rec = (k, _dumps(vdumps, m.value), h, t)
            for buf in targets:
                if staged is None:
                    buf.append(rec)
                else:
                    staged.append((buf, rec))


def _dumps(dumps: Callable[[Any], bytes], value: Any) -> bytes:
    try:
        return dumps(value)
    except SerializationError:
        raise
    except Exception as e:
        raise SerializationError(f"cannot encode {type(value).__name__}: {e}") from e
