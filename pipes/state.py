"""Keyed state: store -> partition -> key, seen by user code as a plain dict.

A :class:`StateTable` belongs to one stateful node. ``get(partition, key)`` returns the
dict for that key, read from the store once and then cached (read-your-writes); every
dict handed out since the last checkpoint is written back at the checkpoint, an empty
dict deletes the key.
"""

from __future__ import annotations

import pickle

from .store import Store, state_prefix

_MAX_CACHED = 200_000


class StateTable:
    def __init__(self, store: Store, node: str):
        self.store = store
        self.node = node
        self._prefixes: dict[int, bytes] = {}
        self._cache: dict[bytes, dict] = {}
        self._dirty: dict[bytes, dict] = {}

    def _key(self, partition: int, key: bytes | None) -> bytes:
        prefix = self._prefixes.get(partition)
        if prefix is None:
            prefix = self._prefixes[partition] = state_prefix(self.node, partition)
        return prefix + (key or b"")

    def get(self, partition: int, key: bytes | None) -> dict:
        """A key's state, to read and change: written back at the next checkpoint."""
        prefix = self._prefixes.get(partition)  # per message: the prefix inline, _key() only the first time
        k = (prefix + (key or b"")) if prefix is not None else self._key(partition, key)
        state = self._dirty.get(k)
        if state is None:
            state = self._dirty[k] = self._load(k)
        return state

    def peek(self, partition: int, key: bytes | None) -> dict:
        """A key's state for reading only: not marked changed, so not written back (a join's
        lookup of the table side). Changing the dict it returns is a bug."""
        k = self._key(partition, key)
        state = self._dirty.get(k)
        return state if state is not None else self._load(k)

    def _load(self, k: bytes) -> dict:
        state = self._cache.get(k)
        if state is None:
            raw = self.store.get("state", k)
            state = self._cache[k] = pickle.loads(raw) if raw is not None else {}
        return state

    def drain(self, into: dict[bytes, bytes | None]) -> None:
        """Move every state touched since the last checkpoint into `into`, serialized."""
        dumps = pickle.dumps
        for k, state in self._dirty.items():
            into[k] = dumps(state, protocol=5) if state else None
        self._dirty = {}

    def committed(self) -> None:
        """The last drained states are durable in the store: the cache may be trimmed now
        (not before, or a read would find the store without them)."""
        if len(self._cache) > _MAX_CACHED:
            self._cache.clear()

    def forget(self) -> None:
        """Drop cached and uncommitted changes (the checkpoint they belonged to is abandoned)."""
        self._dirty.clear()
        self._cache.clear()
