"""The RocksDB database behind a worker: keyed state, source checkpoints, offsets.

Layout (column families, raw bytes):

* ``state``    ``<node>\\0<partition:4>`` + key  ->  pickled state of that key
* ``sources``  ``<node>``                       ->  pickled source checkpoint
* ``offsets``  ``<group>\\0<topic>\\0<partition:4>`` -> next offset to process (8 bytes)
* ``log``      ``<topic>\\0<partition:4><first offset:8>`` -> a block of records (embedded broker only)
* ``meta``     topic settings and bookkeeping

Every checkpoint is one :class:`rocksdict.WriteBatch`, so it is applied entirely or not at all.
A large checkpoint batch is written on a worker thread (:meth:`Store.write_batch`): rocksdict
releases the GIL, so the event loop goes on processing the next batch meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import tempfile
import threading
import weakref
from typing import Iterator

import rocksdict

from .errors import BrokerError

CFS = ("state", "sources", "offsets", "log", "meta")
_P = struct.Struct(">I")
_Q = struct.Struct(">Q")
_ON_THREAD = 1000  # write batches of at least this many updates go to a worker thread


def state_prefix(node: str, partition: int) -> bytes:
    return node.encode() + b"\0" + _P.pack(partition)


def split_state_prefix(key: bytes) -> tuple[bytes, str, int]:
    """A state key's prefix, and the node and partition it names (state_prefix() undone)."""
    cut = key.index(b"\0") + 5
    return key[:cut], key[:cut - 5].decode(), _P.unpack(key[cut - 4:cut])[0]


def offset_key(group: str, topic: str, partition: int) -> bytes:
    return f"{group}\0{topic}\0".encode() + _P.pack(partition)


def _options(memory: bool) -> rocksdict.Options:
    o = rocksdict.Options(raw_mode=True)
    o.create_if_missing(True)
    o.create_missing_column_families(True)
    if memory:
        o.set_env(rocksdict.Env.mem_env())
    return o


class Store:
    """One RocksDB database with pipes' column families."""

    def __init__(self, path: str | None, *, read_only: bool = False):
        self.memory = path is None
        self.path = tempfile.mkdtemp(prefix="pipes-mem-") if path is None else path
        if not self.memory and not read_only:
            os.makedirs(self.path, exist_ok=True)
        cfs = {name: rocksdict.Options(raw_mode=True) for name in CFS}
        try:
            if read_only:
                secondary = tempfile.mkdtemp(prefix="pipes-secondary-")
                self._secondary = secondary
                weakref.finalize(self, shutil.rmtree, secondary, True)
                self.db = rocksdict.Rdict(self.path, _options(False), column_families=cfs,
                                          access_type=rocksdict.AccessType.secondary(secondary))
                self.db.try_catch_up_with_primary()
            else:
                self._secondary = None
                self.db = rocksdict.Rdict(self.path, _options(self.memory), column_families=cfs)
        except Exception as e:
            text = str(e)
            if "lock" in text.lower():
                raise BrokerError(f"data dir {self.path} is in use by another pipes worker "
                                  f"(stop it, or pass another --data-dir)") from None
            if read_only and ("No such file" in text or "does not exist" in text or "CURRENT" in text):
                raise BrokerError(f"no pipes data in {self.path}: has a worker run with this data dir?") from None
            raise BrokerError(f"cannot open {self.path}: {text}") from None
        self.cf = {name: self.db.get_column_family(name) for name in CFS}
        self.handle = {name: self.db.get_column_family_handle(name) for name in CFS}
        self._writing = threading.Lock()

    def close(self) -> None:
        if self.db is None:
            return
        with self._writing:  # after a batch still being written on its thread (its task was cancelled)
            try:
                self.db.close()
            except Exception:
                if not self.memory:  # the in-memory environment cannot sync a WAL; nothing to keep
                    raise
            finally:
                # Column family objects keep the database (and its lock) alive until they go.
                self.cf = self.handle = {}
                self.db = None
        for d in (self._secondary, self.path if self.memory else None):
            if d:
                shutil.rmtree(d, ignore_errors=True)

    def catch_up(self) -> None:
        """Secondary (read-only) access: see what the worker has written since."""
        self.db.try_catch_up_with_primary()

    # -- reads -------------------------------------------------------------------
    def get(self, cf: str, key: bytes) -> bytes | None:
        return self.cf[cf].get(key)

    def offsets(self, group: str) -> dict[tuple[str, int], int]:
        prefix = f"{group}\0".encode()
        out = {}
        for k, v in self.scan("offsets", prefix):
            topic, _, part = k[len(prefix):].partition(b"\0")
            out[(topic.decode(), _P.unpack(part)[0])] = _Q.unpack(v)[0]
        return out

    def scan(self, cf: str, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        it = self.cf[cf].iter()
        it.seek(prefix)
        while it.valid():
            k = it.key()
            if not k.startswith(prefix):
                break
            yield k, it.value()
            it.next()

    # -- writes ------------------------------------------------------------------
    def put(self, cf: str, key: bytes, value: bytes) -> None:
        self.cf[cf][key] = value

    def batch(self) -> rocksdict.WriteBatch:
        return rocksdict.WriteBatch(raw_mode=True)

    def stage_offsets(self, wb: rocksdict.WriteBatch, group: str, offsets: dict[tuple[str, int], int]) -> None:
        h = self.handle["offsets"]
        for (topic, part), off in offsets.items():
            wb.put(offset_key(group, topic, part), _Q.pack(off), h)

    def stage_state(self, wb: rocksdict.WriteBatch, changes: dict[bytes, bytes | None]) -> None:
        h = self.handle["state"]
        for k, v in changes.items():
            if v is None:
                wb.delete(k, h)
            else:
                wb.put(k, v, h)

    def stage_sources(self, wb: rocksdict.WriteBatch, checkpoints: dict[str, bytes]) -> None:
        h = self.handle["sources"]
        for node, v in checkpoints.items():
            wb.put(node.encode(), v, h)

    def write(self, wb: rocksdict.WriteBatch) -> None:
        self.db.write(wb)

    async def write_batch(self, wb: rocksdict.WriteBatch) -> None:
        """write() for checkpoints: a large batch on a worker thread (~1 µs a key that the
        event loop's thread spends processing instead), a small one at once (handing it to a
        thread and back would take longer than writing it)."""
        if len(wb) < _ON_THREAD:
            self.write(wb)
        else:
            await asyncio.to_thread(self._write_locked, wb)

    def _write_locked(self, wb: rocksdict.WriteBatch) -> None:
        with self._writing:
            if self.db is None:
                raise BrokerError(f"the store {self.path} was closed before a checkpoint was written")
            self.db.write(wb)

    def delete_prefix(self, cf: str, prefix: bytes) -> int:
        wb = self.batch()
        h = self.handle[cf]
        n = 0
        for k, _ in self.scan(cf, prefix):
            wb.delete(k, h)
            n += 1
        if n:
            self.write(wb)
        return n
