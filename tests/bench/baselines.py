"""The baseline for pipes on local:// and memory:// (run in a child, as pipes is).

The hand loop on rocksdict does the workload's per-message work (orjson loads, the user
function, orjson dumps, keyed state in a dict) over rocksdict: the input already in the
database, read back with an iterator, outputs (plus a consumed-offset key and dirty keyed
state) written in WriteBatches of 1000 messages. On a disk directory it is the practical
ceiling for local://, on RocksDB's in-memory environment for memory://.

For the source workload it also generates and encodes the input (written in batches of
1000 and read back).
"""

from __future__ import annotations

import gc
import shutil
import struct
import tempfile
import time

import rocksdict

from .workloads import Workload, dumps, make_value

_Q = struct.Struct(">Q")
IN_PREFIX = b"in\0"
OUT_PREFIX = b"out\0"
BATCH = 1000


def naive(wl: Workload, n: int, inputs: list[bytes], *, memory: bool, root: str | None) -> float:
    """Seconds for the hand loop over rocksdict (input preloading not counted, except
    for the source workload, whose job is producing it)."""
    path = tempfile.mkdtemp(prefix="pipes-bench-naive-", dir=root)
    opts = rocksdict.Options(raw_mode=True)
    opts.create_if_missing(True)
    if memory:
        opts.set_env(rocksdict.Env.mem_env())
    db = rocksdict.Rdict(path, opts)
    try:
        if wl.preload:
            _write_inputs(db, inputs)
        process, on_batch = wl.naive(db)
        gc.collect()
        t0 = time.perf_counter()
        if not wl.preload:
            _write_inputs(db, (dumps(make_value(i)) for i in range(n)))
        out = _loop(db, process, on_batch)
        seconds = time.perf_counter() - t0
        _count(wl, n, out)
        return seconds
    finally:
        try:
            db.close()
        except Exception:
            if not memory:  # the in-memory environment cannot sync its WAL on close
                raise
        shutil.rmtree(path, ignore_errors=True)


def _write_inputs(db: rocksdict.Rdict, values) -> None:
    wb = rocksdict.WriteBatch(raw_mode=True)
    put = wb.put
    i = 0
    for v in values:
        put(IN_PREFIX + _Q.pack(i), v)
        i += 1
        if i % BATCH == 0:
            db.write(wb)
            wb = rocksdict.WriteBatch(raw_mode=True)
            put = wb.put
    db.write(wb)


def _loop(db: rocksdict.Rdict, process, on_batch) -> int:
    pack = _Q.pack
    it = db.iter()
    it.seek(IN_PREFIX)
    valid, key, value, nxt = it.valid, it.key, it.value, it.next
    wb = rocksdict.WriteBatch(raw_mode=True)
    put = wb.put
    consumed = produced = 0
    while valid():
        if not key().startswith(IN_PREFIX):
            break
        out = process(value())
        if out is not None:
            put(OUT_PREFIX + pack(produced), out)
            produced += 1
        consumed += 1
        if consumed % BATCH == 0:
            if on_batch is not None:
                on_batch(put)
            put(b"offset", pack(consumed))
            db.write(wb)
            wb = rocksdict.WriteBatch(raw_mode=True)
            put = wb.put
        nxt()
    if on_batch is not None:
        on_batch(put)
    put(b"offset", pack(consumed))
    db.write(wb)
    return produced


def _count(wl: Workload, n: int, out: int) -> None:
    if out != wl.expected(n):
        raise AssertionError(f"baseline {wl.name}: {out} outputs, expected {wl.expected(n)}")
