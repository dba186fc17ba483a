"""Which partition a record goes to: Kafka's murmur2 for keys (so pipes and other Kafka
clients agree), a CRC of the value for unkeyed records (deterministic, so a replay after
a crash lands every record where it landed before)."""

from __future__ import annotations

from zlib import crc32

from aiokafka.partitioner import murmur2

_cache: dict[bytes, int] = {}
_MAX = 100_000


def key_hash(key: bytes) -> int:
    h = _cache.get(key)
    if h is None:
        if len(_cache) >= _MAX:
            _cache.clear()
        h = _cache[key] = murmur2(key) & 0x7FFFFFFF
    return h


def split(outputs: list, n: int) -> list[list]:
    """Outputs (key, value, headers, ts) divided among `n` partitions, order kept."""
    parts: list[list] = [[] for _ in range(n)]
    kh = key_hash
    for out in outputs:
        k = out[0]
        parts[(kh(k) if k is not None else crc32(out[1])) % n].append(out)
    return parts
